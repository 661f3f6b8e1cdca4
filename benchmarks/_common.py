"""Plumbing shared by the benchmarks (``bench_adm.py``, ``bench_sd_unet.py``, ``bench_sd_vae.py``) and
``scripts/fullsize_equivalence.py``: one copy of the timing loop, the machine description, XLA's memory analysis, the
error measure, the atomic JSON writer and the PyTorch-reference model builders.

Importing this module puts the repository root and ``tests/`` on ``sys.path`` (for ``mapreps_jax`` and the
``torch_reference`` / ``torchvision_shim`` helpers), so a benchmark only needs its own folder on the path::

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import ...  # before importing mapreps_jax

torch and diffusers are imported inside the functions that need them; this module imports without them.
"""

import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
for _p in (os.path.join(ROOT, "tests"), ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from torch_reference import diffusers_autoencoder, rel_err as _rel_err  # noqa: E402  (torch-free at import)

from mapreps_jax.app.demo import cpu_model  # noqa: E402  (one reader of /proc/cpuinfo for the demo and benchmarks)
from mapreps_jax.xla_cpu import cpu_defaults_status  # noqa: E402

RESULTS = os.path.join(HERE, "results")
REEXPORTED = (diffusers_autoencoder, cpu_model)  # builders and helpers the benchmarks take from here


# --- the machine ----------------------------------------------------------------------------------------------------


def machine_info():
    """The JSON fields that describe where a benchmark ran: JAX's ``backend``, ``device`` and ``jax_version``, the
    ``machine`` architecture, ``cpu_model``, ``cpu_count``, the load average now (``loadavg_start``) and the XLA:CPU
    settings in effect (``xla_cpu_defaults``: see ``mapreps_jax/xla_cpu.py``)."""
    return {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "jax_version": jax.__version__,
            "machine": platform.machine(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "loadavg_start": list(os.getloadavg()), "xla_cpu_defaults": cpu_defaults_status()}


def available_gib():
    """``MemAvailable`` of ``/proc/meminfo`` in GiB (``None`` where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def command_line(argv=None):
    """The command as run: the script's base name and its arguments (``argv`` when a caller passed its own)."""
    return " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv)))


# --- JAX ------------------------------------------------------------------------------------------------------------


def jax_fwd_vjp(apply):
    """``(fwd, vjp)``, both jitted, for ``apply(params, x, *rest)``: ``fwd(params, x, *rest) = apply(...)`` and
    ``vjp(params, x, *rest, g) = (apply(...), g^T d apply / d x)`` (the gradient of ``<apply, g>`` with respect to
    ``x`` alone, the DPS back-propagation pattern)."""

    def vjp(p, x, *rest_g):
        *rest, g = rest_g
        out, pull = jax.vjp(lambda x: apply(p, x, *rest), x)
        return out, pull(g)[0]

    return jax.jit(apply), jax.jit(vjp)


def vjp_residual_bytes(apply, params, x, *rest):
    """Bytes the VJP closure of ``x -> apply(params, x, *rest)`` keeps between the forward and the backward pass
    (saved activations plus the parameters it references), from ``jax.eval_shape`` (nothing is computed)."""

    def f(p, x, *rest):
        return jax.tree_util.tree_leaves(jax.vjp(lambda x: apply(p, x, *rest), x)[1])

    leaves = jax.eval_shape(f, params, x, *rest)
    return int(sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves))


def tree_bytes(tree):
    """Total bytes of the arrays of a pytree (e.g. the parameters)."""
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree)))


def xla_memory(fn, *args):
    """XLA's ``memory_analysis()`` as a dict of ints (``temp_size_in_bytes`` = peak temporary buffers, argument,
    output, alias and generated-code sizes, ``peak_memory_in_bytes`` where the backend reports it), or ``None``.

    ``fn`` is a compiled executable (``jitted.lower(...).compile()``), or a jitted function, then lowered and
    compiled for ``args``."""
    compiled = fn if hasattr(fn, "memory_analysis") else fn.lower(*args).compile()
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    d = {k: int(getattr(ma, k)) for k in keys if hasattr(ma, k)}
    peak = getattr(ma, "peak_memory_in_bytes", None)
    if peak is not None:
        d["peak_memory_in_bytes"] = int(peak)
    return d


def compile_ahead(jitted, args, name, compile_s, outputs):
    """``(compiled, run)``: ``jitted`` lowered and compiled for ``args`` (the seconds it took stored in
    ``compile_s[name]`` and printed) and a zero-argument ``run`` that calls the executable on ``args``, blocks, and
    stores the result in ``outputs[name]`` (a candidate for :func:`time_interleaved`)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s[name] = time.perf_counter() - t0
    print(f"compiled {name}: {compile_s[name]:.1f}s", flush=True)

    def run():
        outputs[name] = jax.block_until_ready(compiled(*args))

    return compiled, run


# --- timing ---------------------------------------------------------------------------------------------------------


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(cands, reps):
    """Time the zero-argument callables ``cands`` (``{name: fn}``, each blocking until its result is ready): one
    warm-up call each (compilation for a lazily jitted function; its time is ``first_call``), then ``reps``
    repetitions interleaved (every candidate once per repetition), so that the load of a shared machine hits every
    candidate alike. Prints each first call and each repetition.

    Returns ``{"times_s": {name: {"median", "all", "first_call"}}, "medians": {name: median}}`` (seconds)."""
    first = {}
    for name, fn in cands.items():
        first[name] = _timed(fn)
        print(f"first call {name}: {first[name]:.2f}s", flush=True)
    times = {name: [] for name in cands}
    for r in range(reps):
        for name, fn in cands.items():
            times[name].append(_timed(fn))
        print(f"rep {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"times_s": {k: {"median": med[k], "all": v, "first_call": first[k]} for k, v in times.items()},
            "medians": med}


def flops_of(fn, *args):
    """FLOPs by XLA's cost analysis of a compiled program (``None`` where not reported): ``fn`` is the compiled
    executable that is timed (``jitted.lower(...).compile()``, e.g. from :func:`compile_ahead`: nothing is compiled
    again), or a function, then jitted and compiled for ``args``."""
    cost = (fn if hasattr(fn, "cost_analysis") else jax.jit(fn).lower(*args).compile()).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    f = (cost or {}).get("flops")
    return float(f) if f is not None else None


def matmul_reference(n: int = 2048, depth: int = 4):
    """``(fn, args, flops)``: a jitted chain of ``depth`` float32 ``n x n`` matrix products (``2 n^3`` each)."""
    def chain(a, b):
        for _ in range(depth):
            a = jnp.tanh(a @ b)
        return a

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n)).astype(np.float32) / np.sqrt(n))
    b = jnp.asarray(rng.standard_normal((n, n)).astype(np.float32) / np.sqrt(n))
    return jax.jit(chain), (a, b), 2.0 * n ** 3 * depth


def jax_over_torch(med, suffix=""):
    """The JAX float32 / torch time ratios of the medians ``med`` (of :func:`time_interleaved`): ``forward``,
    ``forward_vjp`` and, where the remat candidate was timed, ``forward_vjp_remat`` (the candidates' names end with
    ``suffix``)."""
    pairs = {"forward": ("jax_float32_forward", "torch_float32_forward"),
             "forward_vjp": ("jax_float32_forward_vjp", "torch_float32_forward_vjp"),
             "forward_vjp_remat": ("jax_float32_remat_forward_vjp", "torch_float32_forward_vjp")}
    return {k: med[j + suffix] / med[t + suffix] for k, (j, t) in pairs.items() if j + suffix in med}


# --- results --------------------------------------------------------------------------------------------------------


def rel_err(a, b):
    """``max |a - b| / max |b|`` in float64 (the error measure of the equivalence tests,
    ``tests/torch_reference.rel_err``)."""
    return _rel_err(a, b, np.float64)


MEMORY_NOTE = (
    "xla_memory_analysis: compile().memory_analysis() of the compiled function (temp_size_in_bytes = peak "
    "temporary buffers{extra}). vjp_residual_bytes: bytes the VJP closure keeps between the forward and backward pass "
    "(saved activations plus the parameters it references); on XLA:CPU the temp size may not reflect "
    "rematerialisation, the residual bytes do.")


def finish_memory(memory, params, extra=""):
    """Complete a benchmark's ``memory`` entry: ``param_bytes`` (of ``params``) and the ``note`` that explains its
    fields (:data:`MEMORY_NOTE`, ``extra`` added to its parenthesis); prints every measured entry."""
    memory["param_bytes"] = tree_bytes(params)
    memory["note"] = MEMORY_NOTE.format(extra=extra)
    for k, v in memory.items():
        if isinstance(v, dict):
            print(f"memory {k}: {v}", flush=True)


def read_json(path, default=None):
    """The JSON object in ``path``, or ``default`` (``{}`` when ``None``) where there is no such file."""
    if not os.path.exists(path):
        return {} if default is None else default
    with open(path) as f:
        return json.load(f)


def write_json_atomic(path, obj):
    """``json.dump`` to a temporary file beside ``path``, then ``os.replace`` (readers never see a partial file);
    creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finish_result(res, path, section=None):
    """Record the load average now (``loadavg_end``) in ``res`` and write it to ``path`` atomically: the whole file,
    or with ``section`` as the file's entry ``section`` (the other entries of an existing file kept)."""
    res["loadavg_end"] = list(os.getloadavg())
    write_json_atomic(path, dict(read_json(path), **{section: res}) if section else res)
    print(f"wrote {path}" + (f" (section {section})" if section else ""), flush=True)


# --- the PyTorch references -----------------------------------------------------------------------------------------


def import_torch_reference(*modules):
    """``(torch, *modules)`` imported after ``torchvision_shim`` (``modules``: dotted names such as ``"diffusers"``)
    with torch set to ``os.cpu_count()`` threads, or ``None`` (and a printed line) when one is not importable."""
    import importlib

    try:
        import torch
        from torchvision_shim import install_torchvision_shim

        install_torchvision_shim()
        mods = tuple(importlib.import_module(m) for m in modules)
    except ImportError as e:
        print(f"torch reference unavailable ({e}); skipping", flush=True)
        return None
    torch.set_num_threads(os.cpu_count())
    return (torch, *mods)


def torch_info(torch, *modules):
    """The ``torch`` entry of a result: torch's version, each reference module's version under its name, the
    number of threads."""
    return {"version": torch.__version__, **{m.__name__: getattr(m, "__version__", None) for m in modules},
            "threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def torch_fwd_vjp(call, x, g, outputs, suffix=""):
    """Torch candidates for :func:`time_interleaved`: ``{"torch_float32_forward<suffix>": call(x) under no_grad,
    "torch_float32_forward_vjp<suffix>": (call(x), the gradient of <call(x), g> with respect to x)}`` (``x``, ``g``:
    NCHW tensors, on the device ``call`` runs on); each stores its result in ``outputs`` under its name. On a CUDA
    device each candidate waits for the device (``torch.cuda.synchronize``), as the JAX ones block on their result."""
    import torch

    fwd_name, vjp_name = f"torch_float32_forward{suffix}", f"torch_float32_forward_vjp{suffix}"
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def fwd():
        with torch.no_grad():
            outputs[fwd_name] = call(x)
        sync()

    def vjp():
        xr = x.clone().requires_grad_(True)
        out = call(xr)
        (gx,) = torch.autograd.grad(out, xr, g)
        outputs[vjp_name] = (out.detach(), gx)
        sync()

    return {fwd_name: fwd, vjp_name: vjp}


def load_numpy_state_dict(net, state_dict):
    """Copy a ``{name: numpy array}`` state dict into the torch module ``net`` in place, strictly (the same names as
    ``net.state_dict()``, else ``KeyError``), emptying ``state_dict`` as it goes so that no second copy of the weights
    is held (a full-size model's weights are GBs). Returns ``net``."""
    import torch

    target = net.state_dict()
    missing, unexpected = sorted(set(target) - set(state_dict)), sorted(set(state_dict) - set(target))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k in list(state_dict):
            target[k].copy_(torch.from_numpy(np.require(state_dict.pop(k), requirements=("C", "W"))))
    return net


def diffusers_unet(diffusers, cfg):
    """The diffusers ``UNet2DConditionModel`` of an ``SDUNetConfig`` (``eval()``, diffusers' own initialisation;
    ``architecture_dict``'s fields are its keyword arguments)."""
    return diffusers.UNet2DConditionModel(**cfg.architecture_dict()).eval()
