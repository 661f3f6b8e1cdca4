"""Benchmark of the Flax ADM UNet at the FFHQ-256 configuration against the PyTorch reference (deepinv DiffUNet).

Measures, per image (batch 1, 256x256x3), on the same machine in the same run:

* forward time and forward + VJP time (the gradient of ``<eps(x, t), g>`` with respect to ``x``: the DPS /
  MAP-RPS back-propagation pattern), JAX (jit, after a warm-up call) vs torch (``eval()``, autograd on ``x``);
* JAX bfloat16 vs float32;
* peak temporary memory of the compiled forward + VJP from XLA's ``compile().memory_analysis()``, with and
  without rematerialisation (``ADMConfig.remat``).

Random weights (timings do not depend on them). Writes ``benchmarks/results/adm_<backend>.json``.

Usage::

    python benchmarks/bench_adm.py [--reps 3] [--no-torch] [--out benchmarks/results]
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mapreps_jax.networks.adm import ADMConfig, adm_apply, init_adm_params  # noqa: E402


def _jax_fns(cfg, params, x, t, g):
    fwd = jax.jit(lambda p, x: adm_apply(cfg, p, x, t))

    def vjp_fn(p, x):
        out, pull = jax.vjp(lambda x: adm_apply(cfg, p, x, t), x)
        return out, pull(g)[0]

    vjp = jax.jit(vjp_fn)
    return fwd, vjp


def _mem(jitted, *args):
    ma = jitted.lower(*args).compile().memory_analysis()
    if ma is None:
        return None
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    d = {k: int(getattr(ma, k)) for k in keys if hasattr(ma, k)}
    peak = getattr(ma, "peak_memory_in_bytes", None)
    if peak is not None:
        d["peak_memory_in_bytes"] = int(peak)
    return d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    cfg = ADMConfig.ffhq256()
    params = init_adm_params(jax.random.PRNGKey(0), cfg)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((1, 256, 256, 3)).astype(np.float32)
    g_np = rng.standard_normal((1, 256, 256, 6)).astype(np.float32)
    x, g = jnp.asarray(x_np), jnp.asarray(g_np)
    t = jnp.array([500.0])
    res = {"config": "ffhq256", "batch": 1, "image": [256, 256, 3], "reps": args.reps, "backend": backend,
           "device": str(jax.devices()[0]), "jax_version": jax.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()), "memory": {}}

    def block(o):
        return jax.block_until_ready(o)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # --- the candidates: each is (name, zero-arg callable) -------------------------------------------------
    cands = {}
    for dtype in ("float32", "bfloat16"):
        fwd, vjp = _jax_fns(dataclasses.replace(cfg, dtype=dtype), params, x, t, g)
        cands[f"jax_{dtype}_forward"] = lambda fwd=fwd: block(fwd(params, x))
        cands[f"jax_{dtype}_forward_vjp"] = lambda vjp=vjp: block(vjp(params, x))
    _, vjp_remat = _jax_fns(dataclasses.replace(cfg, remat=True), params, x, t, g)
    cands["jax_float32_remat_forward_vjp"] = lambda: block(vjp_remat(params, x))

    if not args.no_torch:
        try:
            from torchvision_shim import install_torchvision_shim
            import torch

            install_torchvision_shim()
            import deepinv
        except ImportError as e:
            print(f"torch reference unavailable ({e}); skipping", flush=True)
        else:
            torch.set_num_threads(os.cpu_count())
            net = deepinv.models.DiffUNet(in_channels=3, out_channels=3, large_model=False, pretrained=None).eval()
            xt = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
            gt = torch.from_numpy(np.ascontiguousarray(g_np.transpose(0, 3, 1, 2)))
            tt = torch.tensor([500.0])

            def tfwd():
                with torch.no_grad():
                    return net.forward_diffusion(xt, tt)

            def tvjp():
                xr = xt.clone().requires_grad_(True)
                out = net.forward_diffusion(xr, tt)
                (gx,) = torch.autograd.grad(out, xr, gt)
                return out, gx

            cands["torch_float32_forward"] = tfwd
            cands["torch_float32_forward_vjp"] = tvjp
            res["torch"] = {"version": torch.__version__, "deepinv": deepinv.__version__,
                            "threads": torch.get_num_threads()}

    # warm-up (compilation for JAX), then interleaved repetitions so that the load of a shared machine hits every
    # candidate alike; the reported time is the median
    first = {}
    for name, fn in cands.items():
        first[name] = timed(fn)
        print(f"first call {name}: {first[name]:.2f}s", flush=True)
    times = {name: [] for name in cands}
    for r in range(args.reps):
        for name, fn in cands.items():
            times[name].append(timed(fn))
        print(f"rep {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    res["times_s"] = {k: {"median": float(np.median(v)), "all": v, "first_call": first[k]} for k, v in times.items()}
    med = {k: float(np.median(v)) for k, v in times.items()}
    if "torch_float32_forward" in med:
        res["ratio_jax_over_torch"] = {
            "forward": med["jax_float32_forward"] / med["torch_float32_forward"],
            "forward_vjp": med["jax_float32_forward_vjp"] / med["torch_float32_forward_vjp"]}
        print(f"ratio jax/torch: {res['ratio_jax_over_torch']}", flush=True)
    res["ratio_bf16_over_fp32"] = {
        "forward": med["jax_bfloat16_forward"] / med["jax_float32_forward"],
        "forward_vjp": med["jax_bfloat16_forward_vjp"] / med["jax_float32_forward_vjp"]}

    # --- memory ------------------------------------------------------------------------------------------------
    def residual_bytes(c):
        def f(p, x):
            return jax.tree_util.tree_leaves(jax.vjp(lambda x: adm_apply(c, p, x, t), x)[1])
        leaves = jax.eval_shape(f, params, x)
        return int(sum(int(np.prod(l.shape)) * l.dtype.itemsize for l in leaves))

    param_bytes = int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params)))
    res["memory"]["param_bytes"] = param_bytes
    res["memory"]["note"] = (
        "vjp_residual_bytes: bytes held between the forward and backward pass (the VJP closure: saved activations "
        "plus the parameters it references). xla_memory_analysis: compile().memory_analysis() of the jitted forward"
        "+VJP; on the CPU backend its temp size does not reflect rematerialisation (a plain matmul-chain test gives "
        "the same temp size with and without jax.checkpoint), so use the residual bytes there.")
    for remat in (False, True):
        c = dataclasses.replace(cfg, remat=remat)
        _, vjp = _jax_fns(c, params, x, t, g)
        entry = {"vjp_residual_bytes": residual_bytes(c), "xla_memory_analysis": _mem(vjp, params, x)}
        res["memory"]["remat" if remat else "no_remat"] = entry
        print(f"memory (remat={remat}): {entry}", flush=True)
    fwd, _ = _jax_fns(cfg, params, x, t, g)
    res["memory"]["forward_only_xla_memory_analysis"] = _mem(fwd, params, x)

    res["loadavg_end"] = list(os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"adm_{backend}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
