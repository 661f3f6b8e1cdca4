"""XLA:CPU runtime settings the library applies when it is imported (CPU only; GPU and TPU are unaffected).

**What and why.** jaxlib 0.10 hands most convolutions, elementwise fusions, reductions and matrix products on CPU to
YNNPACK ("ynn_fusion" thunks) by default. For the UNets of this library that path is much slower than XLA's own
(Eigen convolutions and matrix products, LLVM-emitted fused loops): the bundled digits ADM at batch 64 ran its forward
pass in 0.59 s and its forward + VJP in 1.48 s, the process using about 1.3 of the 2 cores. With every YNNPACK
fusion type switched off (:data:`FLAG`) the same programs take 0.35 s and 0.93 s, on both cores
(``benchmarks/bench_roofline.py``, ``benchmarks/bench_profile.py``; numbers in the README's performance section).
Outputs agree to float32 rounding (``tests/test_xla_cpu.py``).

Why all of YNNPACK and not only part of it: keeping YNNPACK for fused matrix products alone
(``--xla_cpu_experimental_ynn_fusion_type=dot``) was another 12 % faster on the digits ADM but **miscompiled** a
vmapped ``lax.switch`` over the tasks' forward maps (``stack_operators``: every output of the SR x4 branch equal to
its first; ``tests/test_stack_operators.py`` caught it). XLA's classic CPU path is the one with the longest record.

With YNNPACK off, XLA's classic LLVM loop emitters (:data:`EMITTER_FLAG`) run the fused elementwise loops and
reductions (GroupNorm, SiLU, the residual adds) another 5-12 % faster than its newer MLIR fusion emitters.

LLVM compiles those loops at ``-O1`` (:data:`OPT_FLAG`) instead of ``-O3``: a quarter less compile time for the same
run time on these networks (numbers at :data:`OPT_FLAG`), which is what a first ``mapreps demo`` mostly waits for. It
is left out where a GPU / TPU plugin is installed, because the same option sets LLVM's effort for GPU kernels.

**How.** XLA reads ``XLA_FLAGS`` once, when JAX creates its CPU client (the first computation, not ``import
jax``). :func:`apply_cpu_defaults`, run by ``import mapreps_jax``, appends :data:`FLAG` (and
:data:`EMITTER_FLAG` and :data:`OPT_FLAG`, unless ``XLA_FLAGS`` chooses ``xla_cpu_use_fusion_emitters`` or
``xla_backend_optimization_level`` itself) to ``XLA_FLAGS`` when

* ``MAPREPS_JAX_XLA_DEFAULTS`` is not ``0`` (the opt-out),
* ``XLA_FLAGS`` does not already choose ``xla_cpu_experimental_ynn_fusion_type`` (the user's choice wins),
* the installed jaxlib is one where the flag was measured (:data:`VERIFIED_JAXLIB`): an unknown flag makes XLA
  abort the process, so on any other version nothing is changed;
* the process does not ask for several CPU devices (``--xla_force_host_platform_device_count=N`` in ``XLA_FLAGS`` or
  ``JAX_NUM_CPU_DEVICES``, ``N > 1``). With several CPU devices in one process, XLA:CPU's classic convolution path
  gives **wrong results** for a program partitioned over them: the first image of each device's rows of a
  data-parallel Stage 1 on the digits ADM differed by up to 0.6 from the single-device result, not reproducibly
  from run to run (2 devices, 4 images each; switching off only YNNPACK's convolutions is enough to trigger it),
  while with YNNPACK every image agrees to 3e-6. There the flag is left out, and
  :func:`mapreps_jax.sharding.run_sharded` refuses a mesh of several CPU devices of one process while the flag is in
  effect. One CPU device per process (multi-process runs) and GPU / TPU devices are unaffected.

If JAX's backends were already initialised when the package was imported, the flag cannot take effect any more;
:func:`cpu_defaults_status` says so (``"effective": False``). To be sure, import ``mapreps_jax`` before running
any JAX computation, or set ``XLA_FLAGS`` yourself.
"""

from __future__ import annotations

import os
from importlib import metadata

__all__ = ["FLAG", "EMITTER_FLAG", "OPT_FLAG", "PACKAGE_FLAGS", "VERIFIED_JAXLIB", "OPT_OUT_ENV", "apply_cpu_defaults",
           "cpu_defaults_status", "without_flag"]

#: the flag appended to ``XLA_FLAGS``: every YNNPACK fusion type of jaxlib 0.10 removed from the default list (XLA's
#: own convolutions, matrix products and fused loops)
FLAG = "--xla_cpu_experimental_ynn_fusion_type=-dot,-individual_dot,-individual_convolution,-eltwise,-reduce"
#: appended with :data:`FLAG` (unless ``XLA_FLAGS`` sets it): XLA:CPU's classic LLVM loop emitters for fused
#: elementwise and reduction loops instead of the newer MLIR fusion emitters. Measured on the digits ADM (2-core AMD
#: EPYC, processes interleaved, medians of 5): forward 5-12 % and forward + VJP 6-10 % faster at batch 16 and 64,
#: compile about 8 % slower; same numbers to float32 rounding (``tests/test_xla_cpu.py``).
EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
#: appended with :data:`FLAG` (unless ``XLA_FLAGS`` sets ``xla_backend_optimization_level``, or a GPU / TPU plugin is
#: installed: the level is not CPU-specific, and on GPU it is LLVM's effort for the kernels): LLVM at ``-O1`` instead of
#: ``-O3`` for the loops XLA:CPU emits (not XLA's HLO passes). Measured on a 2-core AMD EPYC: the compile of a
#: ``mapreps demo --quick`` 36.6 -> 27.7 s (its six programs' run times unchanged); the FFHQ ADM forward + VJP
#: (``benchmarks/bench_adm.py``) compiles in 16.0 s against 17.1-18.0 s and runs in 6.32-6.51 s against 6.06-6.62 s
#: (runs interleaved); numbers equal to float32 rounding (``tests/test_xla_cpu.py``).
OPT_FLAG = "--xla_backend_optimization_level=1"
#: every flag :func:`apply_cpu_defaults` may add
PACKAGE_FLAGS = (FLAG, EMITTER_FLAG, OPT_FLAG)
#: ``(major, minor)`` jaxlib versions on which :data:`FLAG` exists and was measured to help
VERIFIED_JAXLIB = ((0, 10),)
#: environment variable: ``0`` leaves ``XLA_FLAGS`` untouched
OPT_OUT_ENV = "MAPREPS_JAX_XLA_DEFAULTS"

_STATE = {"applied": False, "reason": "not run"}


def _jaxlib_version():
    try:
        parts = metadata.version("jaxlib").split(".")
        return int(parts[0]), int(parts[1])
    except (metadata.PackageNotFoundError, ValueError, IndexError):
        return None


def _backends_initialised() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # a JAX without this private module: assume the safe answer
        return False


def without_flag(xla_flags: str) -> str:
    """``xla_flags`` without the package's flags (:data:`PACKAGE_FLAGS`): the ``XLA_FLAGS`` to hand a child process
    (this process's carry them since ``import mapreps_jax``), so that the child's import decides again (e.g. leaves
    them out for several CPU devices)."""
    return " ".join(f for f in xla_flags.split() if f not in PACKAGE_FLAGS)


def _forced_cpu_devices(env) -> int:
    """The CPU device count the environment asks for (1 when it asks for none)."""
    import re

    counts = [int(m) for m in re.findall(r"--xla_force_host_platform_device_count=(\d+)", env.get("XLA_FLAGS", ""))]
    try:
        counts.append(int(env.get("JAX_NUM_CPU_DEVICES", "1") or 1))
    except ValueError:
        pass
    return max([1] + counts)


def _accelerator_plugin():
    """The name of an installed JAX GPU / TPU plugin (found as JAX finds them: the ``jax_plugins`` entry points and
    namespace package, and ``libtpu``), or ``None``."""
    import importlib.util
    import pkgutil

    try:
        eps = [ep.name for ep in metadata.entry_points(group="jax_plugins")]
    except Exception:  # a broken distribution's metadata: not a reason to fail the import
        eps = []
    if eps:
        return eps[0]
    try:
        spec = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        names = [m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations))]
        if names:
            return names[0]
    return "libtpu" if importlib.util.find_spec("libtpu") is not None else None


def apply_cpu_defaults(environ=None) -> dict:
    """Append :data:`FLAG` (with :data:`EMITTER_FLAG` and :data:`OPT_FLAG`, each unless ``XLA_FLAGS`` already chooses
    that setting; :data:`OPT_FLAG` also not when a GPU / TPU plugin is installed) to ``environ["XLA_FLAGS"]`` under the
    conditions in the module docstring.

    Returns :func:`cpu_defaults_status`'s record. Idempotent. ``environ`` defaults to ``os.environ``."""
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    version = _jaxlib_version()
    if env.get(OPT_OUT_ENV, "1") == "0":
        state = {"applied": False, "reason": f"{OPT_OUT_ENV}=0"}
    elif "xla_cpu_experimental_ynn_fusion_type" in flags:
        state = {"applied": FLAG in flags.split(), "reason": "XLA_FLAGS already sets xla_cpu_experimental_ynn_fusion_type"}
    elif version is None or version not in VERIFIED_JAXLIB:
        state = {"applied": False,
                 "reason": f"jaxlib {version} is not one of the verified versions {list(VERIFIED_JAXLIB)}"}
    elif _forced_cpu_devices(env) > 1:
        state = {"applied": False,
                 "reason": f"{_forced_cpu_devices(env)} CPU devices in one process: XLA:CPU's classic convolutions "
                           f"miscompute programs partitioned over several CPU devices (YNNPACK kept)"}
    else:
        extra = [FLAG] + ([] if "xla_cpu_use_fusion_emitters" in flags else [EMITTER_FLAG])
        if "xla_backend_optimization_level" not in flags and _accelerator_plugin() is None:
            extra.append(OPT_FLAG)
        env["XLA_FLAGS"] = " ".join([flags] + extra).strip()
        state = {"applied": True, "reason": "appended to XLA_FLAGS"}
    if environ is None:
        _STATE.clear()
        _STATE.update(state, backends_initialised_before=_backends_initialised())
    return cpu_defaults_status() if environ is None else dict(state)


def cpu_defaults_status() -> dict:
    """``{"flag", "applied", "reason", "effective", "xla_flags"}``: whether :data:`FLAG` was added at import,
    why (or why not), and whether it can be in effect (``False`` when JAX's backends existed before the
    package set it)."""
    flags = os.environ.get("XLA_FLAGS", "")
    effective = FLAG in flags.split() and not _STATE.get("backends_initialised_before", False)
    return {"flag": FLAG, "applied": _STATE.get("applied", False), "reason": _STATE.get("reason"),
            "effective": effective, "xla_flags": flags}
