"""Data-parallel restoration over all devices and hosts with JAX's own runtime (``jax.sharding``).

Every algorithm of the library treats the images of a batch independently (per-image keys, :mod:`mapreps_jax.rng`;
per-image losses and norms), so the batch axis is the natural one to shard. :func:`run_sharded` runs any of them
(``map_rps``, ``dps``, ``red_diff``, :func:`sweep_stages`, ...) under one ``jax.jit`` over a one-axis
:class:`~jax.sharding.Mesh` named ``"batch"`` of all devices:

* the per-image inputs (the keys, ``y``, the per-image data of a :func:`~mapreps_jax.operators.stack_operators`
  operator, and the keyword arguments named in ``batched``) are sharded along their leading axis,
  ``NamedSharding(mesh, P("batch"))``; the model's parameters and every other argument are replicated;
* the outputs are constrained to the same sharding (``lax.with_sharding_constraint`` on their batch axis), so a
  caller that keeps computing on them (metrics, a second stage) stays on the devices;
* a batch of ``B`` images on ``n`` devices is padded to ``ceil(B / n) n`` by repeating its last image (key included)
  and the outputs are trimmed back to ``B``; the padded rows cost compute but cannot change the others (images do not
  interact).

The per-image keys are ``image_keys(key, B)`` of the *unpadded* batch, so image ``i`` gets the same key as in a
single-device call: the sharded outputs equal the single-device ones up to the float rounding of the network
evaluated on a different per-device batch size (``tests/test_sharding.py`` states the bound).

Multi-host (TPU pod slices, several GPU hosts, or CPU processes): call :func:`initialize_distributed` in every
process first (``jax.distributed.initialize``; on TPU pods and SLURM/Open MPI clusters it reads the environment;
on CPU pass the coordinator address, the number of processes and this process's id). The mesh then spans every
device of every process; each process builds its rows of a global batch with :func:`shard_rows` (``local=True``:
``jax.make_array_from_process_local_data``) and reads back only its rows (:func:`local_rows`). Every process runs the
same program (SPMD). ``mapreps restore-batch`` (:mod:`mapreps_jax.batch_restore`) does exactly this.

Memory: the jitted program is compiled once per (function, static options, shapes, mesh) and reused (a module-level
cache of jitted callables); :func:`memory_per_device` reads XLA's compiled memory analysis of a call.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .rng import image_keys, split_keys

__all__ = ["BATCH_AXIS", "batch_mesh", "batch_sharding", "replicated_sharding", "padded_size", "pad_rows",
           "pad_operator", "shard_rows", "place", "replicate", "local_rows", "run_sharded", "sweep_stages",
           "initialize_distributed", "memory_per_device"]

BATCH_AXIS = "batch"


def batch_mesh(devices: Optional[Sequence] = None) -> Mesh:
    """A one-axis mesh ``("batch",)`` over ``devices`` (default: ``jax.devices()``, every device of every process)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("batch_mesh: expected at least one device")
    return Mesh(np.asarray(devs, dtype=object), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """``NamedSharding`` that splits axis ``axis`` over the mesh's ``"batch"`` axis (the others replicated)."""
    return NamedSharding(mesh, P(*([None] * axis + [BATCH_AXIS])))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """``NamedSharding`` that holds a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def padded_size(n: int, n_shards: int) -> int:
    """The smallest multiple of ``n_shards`` that is ``>= n`` (and ``>= n_shards``)."""
    n, n_shards = int(n), int(n_shards)
    if n < 1 or n_shards < 1:
        raise ValueError(f"padded_size: expected a batch >= 1 and a device count >= 1, got {n} and {n_shards}")
    return -(-n // n_shards) * n_shards


def pad_rows(x, size: int):
    """``x`` (leading axis ``B``) padded to ``size`` rows by repeating its last row (works for typed keys too)."""
    b = x.shape[0]
    if size < b:
        raise ValueError(f"pad_rows: cannot pad a batch of {b} rows to {size}")
    if size == b:
        return x
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.repeat(x[-1:], size - b, axis=0)], axis=0)
    return jnp.concatenate([x, jnp.repeat(x[-1:], size - b, axis=0)], axis=0)


def _n_per_image(op) -> Optional[int]:
    if not getattr(op, "per_image_data", False):
        return None
    return jax.tree_util.tree_leaves(op.data[0])[0].shape[0]


def pad_operator(op, size: int):
    """An operator whose per-image data (:func:`~mapreps_jax.operators.stack_operators`) is padded to ``size``
    images by repeating the last image's; an operator with the same data for every image is returned unchanged."""
    if _n_per_image(op) is None:
        return op
    per, shared = op.data
    return dataclasses.replace(op, data=(jax.tree_util.tree_map(lambda v: pad_rows(v, size), per), shared))


def _fully_addressable(x) -> bool:
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def shard_rows(x, mesh: Mesh, local: bool = False, axis: int = 0):
    """Place ``x`` with its axis ``axis`` sharded over ``mesh``.

    ``local=False``: ``x`` is the whole batch (``jax.device_put``; each device receives only its rows).
    ``local=True`` (multi-process): ``x`` holds this process's rows only, in the order of its devices in the mesh;
    the global array is ``jax.make_array_from_process_local_data`` (every process must call this, SPMD)."""
    sharding = batch_sharding(mesh, axis)
    if local:
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.device_put(x, sharding)


def place(tree, sharding: NamedSharding):
    """``jax.device_put(tree, sharding)`` that also works when ``sharding`` spans several processes: a leaf already
    placed that way is kept; otherwise every process contributes its own copy of the value (parameters, configs,
    operator data are the same in every process; rows of a batch are this process's) through
    ``jax.make_array_from_callback``, which asks for the addressable devices' slices only (no cross-process check,
    no collective); PRNG key arrays travel as their key data."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(v):
        if isinstance(v, jax.Array):
            if v.sharding.is_equivalent_to(sharding, v.ndim):
                return v
            if jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(one(jax.random.key_data(v)), impl=jax.random.key_impl(v))
        host = np.asarray(v)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(one, tree)


def replicate(tree, mesh: Mesh):
    """A pytree (model parameters, an operator's shared data, a config) with a full copy on every device of
    ``mesh``: host arrays go to every device directly, not through the default device."""
    return place(tree, replicated_sharding(mesh))


def local_rows(x, axis: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """This process's rows of a batch-sharded array: ``(indices, values)``, the global row indices (sorted) along
    ``axis`` and the values ``[len(indices), ...]`` as NumPy (only addressable shards are read: no transfer of other
    processes' rows; on one process, every row)."""
    if not isinstance(x, jax.Array):
        arr = np.asarray(x)
        return np.arange(arr.shape[axis]), arr
    pieces = {}
    for shard in x.addressable_shards:
        sl = shard.index[axis]
        start = 0 if sl.start is None else sl.start
        if start not in pieces:
            pieces[start] = np.asarray(shard.data)
    starts = sorted(pieces)
    rows = np.concatenate([np.arange(s, s + pieces[s].shape[axis]) for s in starts])
    return rows, np.concatenate([pieces[s] for s in starts], axis=axis)


# -------------------------------------------------------------------------------------------------------------------
# run_sharded
# -------------------------------------------------------------------------------------------------------------------

_STATIC_TYPES = (bool, int, float, str, type(None))


def _is_static(v) -> bool:
    if isinstance(v, _STATIC_TYPES):
        return True
    if isinstance(v, tuple):
        return all(_is_static(e) for e in v)
    return False


_JIT_CACHE: Dict[tuple, Callable] = {}


def _constrain(out, mesh: Mesh, out_axis):
    """Constrain every leaf of ``out`` to the batch sharding on its batch axis (``out_axis``: an int for every leaf,
    or a pytree prefix of ``out`` of ints / ``None`` for leaves that are not per image)."""
    if isinstance(out_axis, int):
        axes = jax.tree_util.tree_map(lambda _: out_axis, out)
    else:
        axes = jax.tree_util.tree_map(lambda a, sub: jax.tree_util.tree_map(lambda _: a, sub), out_axis, out,
                                      is_leaf=lambda a: a is None or isinstance(a, int))

    def one(leaf, ax):
        if ax is None or not hasattr(leaf, "ndim") or leaf.ndim <= ax:
            return leaf
        return jax.lax.with_sharding_constraint(leaf, batch_sharding(mesh, ax))

    return jax.tree_util.tree_map(one, out, axes)


def _jitted(fn, static_kw: tuple, traced_names: tuple, mesh: Mesh, out_axis) -> Callable:
    cache_key = (fn, static_kw, traced_names, mesh, out_axis if isinstance(out_axis, int) else repr(out_axis))
    jitted = _JIT_CACHE.get(cache_key)
    if jitted is None:
        def call(keys, model, op, y, args, traced):
            out = fn(keys, model, op, y, *args, **dict(static_kw), **dict(zip(traced_names, traced)))
            return _constrain(out, mesh, out_axis)

        jitted = _JIT_CACHE[cache_key] = jax.jit(call)
    return jitted


def _trim(out, b: int, out_axis):
    if isinstance(out_axis, int):
        return jax.tree_util.tree_map(
            lambda v: (v if not hasattr(v, "ndim") or v.ndim <= out_axis
                       else jax.lax.slice_in_dim(v, 0, b, axis=out_axis)), out)
    return jax.tree_util.tree_map(
        lambda a, sub: sub if a is None else _trim(sub, b, a), out_axis, out,
        is_leaf=lambda a: a is None or isinstance(a, int))


def run_sharded(fn: Callable, key, model, op, y, *args, mesh: Optional[Mesh] = None, batched: Sequence[str] = (),
                out_axis: Any = 0, trim: bool = True, **kwargs):
    """``fn(keys, model, op, y, *args, **kwargs)`` data-parallel over ``mesh`` (default :func:`batch_mesh` of all
    devices), jitted once per configuration (see the module doc).

    Args:
      fn: an algorithm of the library taking ``(key, model, op, y, ...)`` and returning per-image outputs (a
        pytree) whose batch axis is ``out_axis`` (0 for ``map_rps``, ``dps``, ``red_diff``; 1 for the ``[n, B]``
        outputs of :func:`sweep_stages`; a pytree prefix of ints / ``None`` for mixed outputs).
      key: one key (image ``i`` gets ``fold_in(key, i)`` as in a single-device call) or ``[B]`` keys.
      y: ``[B, *op.out_shape]`` measurements (a host array, or a global ``jax.Array`` already batch-sharded, e.g.
        from :func:`shard_rows` with ``local=True`` on several hosts; such an array must hold a multiple of the
        device count and is not padded here).
      batched: names of keyword arguments whose leaves have the batch as leading axis (e.g. ``("x_init",)`` for
        ``rps``); they are padded and sharded like ``y``.
      kwargs: Python scalars, strings, ``None`` and tuples of them are static (compiled in); everything else (arrays,
        configs, samplers: pytrees) is traced, so another value of a hyper-parameter reuses the compiled program.
      trim: return the first ``B`` images (default); ``False`` returns the padded outputs, still sharded.

    Returns ``fn``'s outputs, batch-sharded over the mesh (trimmed to ``B`` unless ``trim=False``). When ``B`` is
    not a multiple of the device count the trimmed outputs cannot be split evenly over the devices, and JAX lays them
    out replicated (a gather); pass ``trim=False`` to keep them sharded and drop the padded rows later
    (``mapreps restore-batch`` reads each process's rows with :func:`local_rows`).
    """
    mesh = batch_mesh() if mesh is None else mesh
    _check_cpu_mesh(mesh)
    n_dev = mesh.devices.size
    b = int(y.shape[0])
    global_input = isinstance(y, jax.Array) and not y.is_fully_addressable
    n_img = _n_per_image(op)
    if n_img is not None and n_img != b:
        raise ValueError(f"run_sharded: the operator holds one task per image for {n_img} images, but y has {b}")
    size = b if global_input else padded_size(b, n_dev)
    if size % n_dev:
        raise ValueError(f"run_sharded: a global (multi-process) batch must hold a multiple of the {n_dev} devices; "
                         f"got {b} images (pad it before building it)")
    keys = image_keys(key, b, "run_sharded")
    for name in batched:
        if name not in kwargs:
            raise ValueError(f"run_sharded: batched names {name!r}, which is not among the keyword arguments "
                             f"{sorted(kwargs)}")
    static_kw = tuple(sorted((k, v) for k, v in kwargs.items() if k not in batched and _is_static(v)))
    traced_names = tuple(sorted(k for k in kwargs if k in batched or not _is_static(kwargs[k])))
    rows = batch_sharding(mesh)
    rep = replicated_sharding(mesh)

    def place_rows(v):
        if isinstance(v, jax.Array) and not v.is_fully_addressable:
            return v
        return place(pad_rows(v, size), rows)

    keys = place_rows(keys)
    y = place_rows(y)
    if n_img is not None:
        per, shared = op.data
        op = dataclasses.replace(op, data=(jax.tree_util.tree_map(place_rows, per), place(shared, rep)))
    else:
        op = place(op, rep)
    model = place(model, rep)
    args = place(args, rep)
    traced = tuple(jax.tree_util.tree_map(place_rows, kwargs[k]) if k in batched else place(kwargs[k], rep)
                   for k in traced_names)
    out = _jitted(fn, static_kw, traced_names, mesh, out_axis)(keys, model, op, y, args, traced)
    return _trim(out, b, out_axis) if trim and size != b else out


def _check_cpu_mesh(mesh: Mesh) -> None:
    """Refuse a mesh of several CPU devices of this process while the package's XLA:CPU flag is in effect: XLA's
    classic CPU convolutions miscompute programs partitioned over them (:mod:`mapreps_jax.xla_cpu`)."""
    local_cpu = [d for d in mesh.devices.flat if d.platform == "cpu" and d.process_index == jax.process_index()]
    if len(local_cpu) < 2:
        return
    from .xla_cpu import OPT_OUT_ENV, cpu_defaults_status

    if cpu_defaults_status()["effective"]:
        raise RuntimeError(
            f"run_sharded: a mesh of {len(local_cpu)} CPU devices in one process with the package's XLA:CPU flag in "
            f"effect (YNNPACK off) gives wrong results (XLA:CPU's classic convolutions miscompute programs "
            f"partitioned over several CPU devices; mapreps_jax/xla_cpu.py). Ask for the CPU devices before "
            f"importing mapreps_jax (XLA_FLAGS=--xla_force_host_platform_device_count=N or JAX_NUM_CPU_DEVICES=N: "
            f"the flag is then left out), set {OPT_OUT_ENV}=0, or use one device per process")


def sweep_stages(key, model, op, y, t0s, *, map_config=None, sampler=None, sigma_y=None, cond=None,
                 n_steps: Optional[int] = None, clip: bool = False):
    """MAP-RPS over a list of re-noising times in ONE traceable function (the jit-able core of
    :func:`~mapreps_jax.map_rps.dp_sweep`, for :func:`run_sharded` and ``mapreps restore-batch``).

    Stage 1 once: ``x_map = map_estimate(split(keys[i])[0], ...)``; Stage 2 for each ``t0`` in ``t0s`` (a ``[n]`` int
    array, traced) by ``lax.map``: ``rps(split(keys[i])[1], ..., t0)``, the same key for every ``t0`` (as
    ``dp_sweep``), on a ``K = n_steps`` sub-grid (each ``t0 > 0`` costs ``min(K, t0)`` network evaluations; ``t0 = 0``
    returns ``x_map``) or, with ``n_steps=None``, the full grid (a scan of ``max(t0s)`` steps skipped past each
    ``t0``). Returns ``(x_map [B, ...], outputs [n, B, ...])``, decoded to images for a latent model; ``clip``: clip
    the outputs to [-1, 1]."""
    from .map_stage import MAPConfig, map_estimate
    from .rps_stage import rps
    from .samplers import DPSStep

    map_config = MAPConfig() if map_config is None else map_config
    sampler = DPSStep() if sampler is None else sampler
    k1, k2 = split_keys(image_keys(key, y.shape[0], "sweep_stages"))
    x_map = map_estimate(k1, model, op, y, config=map_config, sigma_y=sigma_y, cond=cond)
    t0s = jnp.asarray(t0s, jnp.int32).reshape(-1)
    max_steps = None if n_steps is not None else model.T

    def one(t0):
        return rps(k2, model, op, y, x_map, t0, sampler=sampler, cond=cond, n_steps=n_steps, max_steps=max_steps)

    outs = jax.lax.map(one, t0s)
    if not model.space.is_pixel:
        x_map, outs = model.decode(x_map), jax.vmap(model.decode)(outs)
    if clip:
        outs = jnp.clip(outs, -1.0, 1.0)
    return x_map, outs


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> dict:
    """``jax.distributed.initialize`` for a multi-process run; returns ``{"process_index", "process_count",
    "local_devices", "devices"}``.

    TPU pod slices and SLURM / Open MPI clusters: call without arguments (JAX reads its environment). Elsewhere
    (several CPU processes, GPU hosts without a cluster manager) pass all three: ``coordinator`` ``"host:port"`` of
    process 0, ``num_processes``, and this process's ``process_id`` in ``[0, num_processes)``. On CPU the
    cross-process collectives use gloo (``jax_cpu_collectives_implementation``). Must run before any other JAX
    computation in the process."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("initialize_distributed: give all of coordinator, num_processes and process_id (or none, "
                         "to read them from a TPU / cluster environment)")
    if all(given):
        num_processes, process_id = int(num_processes), int(process_id)
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"initialize_distributed: process_id must be in [0, {num_processes}), got {process_id}")
        if ":" not in str(coordinator):
            raise ValueError(f"initialize_distributed: coordinator must be 'host:port', got {coordinator!r}")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # an older/newer jax without the option: the default implementation
            pass
    if all(given):
        jax.distributed.initialize(coordinator_address=str(coordinator), num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count()}


def memory_per_device(fn: Callable, *args, **kwargs) -> Optional[dict]:
    """XLA's compiled memory analysis of ``jax.jit(fn)(*args, **kwargs)`` (bytes per device: ``argument``,
    ``output``, ``temp``, ``generated_code``, and ``total`` = their sum less aliased bytes), or ``None`` where the
    backend does not report it. ``args`` may be ``jax.ShapeDtypeStruct`` (nothing is computed)."""
    compiled = jax.jit(fn).lower(*args, **kwargs).compile()
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "temp", "generated_code",
                                                                       "alias")}
    out["total"] = out["argument"] + out["output"] + out["temp"] + out["generated_code"] - out["alias"]
    return out
