"""Where a first ``mapreps demo --quick`` spends its compile time: every XLA program the demo compiles that takes more
than ``--min-s`` seconds (the pixel Stage-1, Stage-2 and RED-diff programs; the latent Stage 1, Stage 2, PSLD and the
decoder), with

* its compile time in the demo (wall and process CPU seconds: XLA:CPU compiles the LLVM modules of one program on
  several threads, so CPU / wall is the parallelism of the compile),
* the loop kernels XLA:CPU generates through LLVM for it (``fusion`` instructions of the optimised HLO: count, and
  distinct bodies up to names, i.e. how many would remain if identical kernels were compiled once), and
* the same module compiled again, after the demo, as it was (``package``: the package's XLA:CPU settings, the
  same-run reference) and under variants: ``llvm_O0`` (``xla_backend_optimization_level=0``: LLVM without its
  optimisation passes, a lower bound for all but LLVM's optimisation) and ``vector_width_128``
  (``xla_cpu_prefer_vector_width=128``), each as a ratio to ``package`` measured in this run;
* what each variant does to the run time (``runtime``): the step the demo's programs repeat, compiled under each
  variant and timed with the variants interleaved (medians of ``--reps``): the digits ADM's forward (Stage 1,
  RED-diff) and forward + VJP (a DPS step), and the latent UNet + decoder forward + VJP (a latent DPS step), at the
  quick demo's batch (4 tasks x 12 digits), bundled weights, random inputs.

It also records the demo's own stage seconds and a same-run float32 matmul chain's GFLOP/s (the machine's speed that
day). The programs are captured by wrapping JAX's internal
``jax._src.compiler.backend_compile_and_load`` (the persistent compilation cache is switched off, so every program
is compiled); a JAX without that function is refused with a message. Writes
``benchmarks/results/compile_<backend>.json`` (atomically).

Usage::

    python benchmarks/bench_compile.py [--space both] [--min-s 0.5] [--reps 3] [--out benchmarks/results]
"""

import argparse
import collections
import dataclasses
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (RESULTS, command_line, finish_result, machine_info, matmul_reference,  # noqa: E402
                     time_interleaved)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

#: XLA options of each variant (JAX's ``compiler_options``; on top of the package's XLA:CPU settings)
VARIANTS = {"package": {}, "llvm_O0": {"xla_backend_optimization_level": 0},
            "vector_width_128": {"xla_cpu_prefer_vector_width": 128}}


def fusion_kernels(hlo_text: str) -> dict:
    """``{"fusions", "distinct"}``: the ``fusion`` instructions of an optimised HLO module (one LLVM-compiled loop
    kernel each on XLA:CPU) and how many distinct fused computations they call, compared with instruction names,
    metadata and called-computation names removed."""
    bodies, cur = {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^%?([\w.\-]+) .*\{$", line) if not line.startswith(" ") else None
        if m:
            cur = m.group(1)
            bodies[cur] = []
        elif cur is not None and line.strip() not in ("", "}"):
            bodies[cur].append(line)
    called = re.findall(r" fusion\(.*?calls=%?([\w.\-]+)", hlo_text)

    def norm(lines):
        out = []
        for ln in lines:
            ln = re.sub(r", metadata=\{.*?\}", "", ln)
            out.append(re.sub(r"%[\w.\-]+", "%v", ln).strip())
        return "\n".join(out)

    distinct = {norm(bodies.get(c, [c])) for c in called}
    return {"fusions": len(called), "distinct": len(distinct)}


def runtime_effect(pm, lm, batch: int, reps: int) -> dict:
    """Compile seconds and median run seconds of the demo's repeated steps on the pixel prior ``pm`` and the latent
    model ``lm`` under each of :data:`VARIANTS` (module doc), and their ratios to ``package``."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 1)).astype(np.float32))
    z = jnp.asarray(rng.standard_normal((batch,) + lm.space.state_shape((32, 32, 1))).astype(np.float32))
    t = jnp.full((batch,), 300, jnp.int32)

    def grad_of_clean_estimate(model, decode):  # d/dx sum(D(x0(x))^2), x0 = (x - sqrt(1 - a) eps) / sqrt(a)
        def loss(v):
            a = model.alpha_bar(t)[:, None, None, None]
            return jnp.sum(decode((v - jnp.sqrt(1 - a) * model.eps(v, t)) / jnp.sqrt(a)) ** 2)
        return jax.grad(loss)

    steps = {"digits_adm_forward": (lambda v: pm.eps(v, t), x),
             "digits_adm_forward_vjp": (grad_of_clean_estimate(pm, lambda v: v), x),
             "latent_unet_decoder_forward_vjp": (grad_of_clean_estimate(lm, lm.decode), z)}
    cands, compile_s = {}, {}
    for variant, opts in VARIANTS.items():
        for name, (fn, arg) in steps.items():
            t0 = time.perf_counter()
            exe = jax.jit(fn, compiler_options=opts or None).lower(arg).compile()
            compile_s[f"{name}/{variant}"] = round(time.perf_counter() - t0, 3)
            cands[f"{name}/{variant}"] = lambda exe=exe, arg=arg: jax.block_until_ready(exe(arg))
    med = time_interleaved(cands, reps)["medians"]
    out = {}
    for name in steps:
        base = med[f"{name}/package"]
        out[name] = {v: {"compile_s": compile_s[f"{name}/{v}"], "run_s": round(med[f"{name}/{v}"], 4),
                         "run_ratio_to_package": round(med[f"{name}/{v}"] / base, 3)} for v in VARIANTS}
        print(f"runtime {name}: {out[name]}", flush=True)
    return out


def _timed_compile(compile_fn):
    t, c = time.perf_counter(), time.process_time()
    out = compile_fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="both", choices=("pixel", "latent", "both"))
    ap.add_argument("--min-s", type=float, default=0.5, help="programs compiling faster than this are not recorded")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of the run-time part")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    from jax._src import compiler
    from jax._src.interpreters import mlir
    from jax._src.lib import xla_client as xc

    if not hasattr(compiler, "backend_compile_and_load"):
        raise SystemExit(f"bench_compile: this JAX ({jax.__version__}) has no jax._src.compiler."
                         f"backend_compile_and_load to capture the programs with; expected the JAX 0.10 internals")
    jax.config.update("jax_enable_compilation_cache", False)  # every program compiled, none loaded
    info = machine_info()  # the load average before the run
    mm, mm_args, mm_flops = matmul_reference()  # the machine's speed in this run (it varies from day to day)
    mm_s = time_interleaved({"matmul": lambda: jax.block_until_ready(mm(*mm_args))}, 3)["medians"]["matmul"]
    info["matmul_reference_gflop_per_s"] = round(mm_flops / mm_s / 1e9, 1)

    from mapreps_jax.app.demo import QUICK, run_demo
    from mapreps_jax.app.pretrained import load_default_latent, load_default_prior

    pm, lm = load_default_prior(), load_default_latent()  # the demo's and the run-time part's models
    captured, original = [], compiler.backend_compile_and_load

    def recording(backend, module, devices, options, host_callbacks):
        exe, wall, cpu = _timed_compile(lambda: original(backend, module, devices, options, host_callbacks))
        if wall >= args.min_s:
            name = str(module.operation.attributes["sym_name"]).strip('"')
            captured.append({"program": name, "compile_s": wall, "compile_cpu_s": cpu,
                             **fusion_kernels(exe.get_hlo_text()), "_module": mlir.module_to_bytecode(module)})
            print(f"compiled {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, {captured[-1]['fusions']} fusion kernels "
                  f"({captured[-1]['distinct']} distinct)", flush=True)
        return exe

    compiler.backend_compile_and_load = recording
    try:
        cfg = dataclasses.replace(QUICK, space=args.space)
        t0 = time.perf_counter()
        demo = run_demo(pm if args.space != "latent" else None, cfg,
                        latent_model=lm if args.space != "pixel" else None)
        demo_s = time.perf_counter() - t0
    finally:
        compiler.backend_compile_and_load = original

    backend = jax.devices()[0].client
    devices = xc.DeviceList(tuple(jax.devices()[:1]))
    totals = collections.defaultdict(lambda: [0.0, 0.0])
    for variant, how in VARIANTS.items():  # variants one after the other, each over every program
        opts = compiler.get_compile_options(num_replicas=1, num_partitions=1,
                                            device_assignment=np.array([[jax.devices()[0].id]]),
                                            env_options_overrides={k: str(v) for k, v in how.items()})
        for p in captured:
            _, wall, cpu = _timed_compile(lambda: backend.compile_and_load(p["_module"], devices, opts))
            p.setdefault("recompile_s", {})[variant] = [round(wall, 3), round(cpu, 3)]
            totals[variant][0] += wall
            totals[variant][1] += cpu
        print(f"recompiled every program, {variant}: {totals[variant][0]:.1f} s wall, {totals[variant][1]:.1f} s CPU",
              flush=True)

    runtime = runtime_effect(pm, lm, len(cfg.tasks) * cfg.n_images, args.reps)
    programs = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items() if k != "_module"}
                for p in captured]
    in_demo = [sum(p["compile_s"] for p in captured), sum(p["compile_cpu_s"] for p in captured)]
    res = {"command": command_line(argv), **info, "config": {**dataclasses.asdict(cfg), "tasks": list(
        cfg.tasks), "t0": list(cfg.t0)},
           "demo_wall_s": round(demo_s, 2), "demo_seconds": demo["metrics"]["seconds"], "programs": programs,
           "compile_in_demo_s": {"wall": round(in_demo[0], 2), "cpu": round(in_demo[1], 2),
                                 "share_of_demo": round(in_demo[0] / demo_s, 3)},
           "fusion_kernels": {"total": sum(p["fusions"] for p in captured),
                              "distinct_per_program_sum": sum(p["distinct"] for p in captured)},
           "recompile_total_s": {k: [round(w, 2), round(c, 2)] for k, (w, c) in totals.items()},
           "recompile_ratio_to_package": {k: round(w / totals["package"][0], 3) for k, (w, _) in totals.items()},
           "variants": VARIANTS, "runtime": runtime,
           "note": "compile_s / compile_cpu_s: wall and process-CPU seconds of each program's compile inside the demo "
                   "run; fusions / distinct: LLVM-compiled loop kernels of the optimised program and their distinct "
                   "bodies; recompile_s: [wall, cpu] of compiling the same module again after the demo under each "
                   "variant (package: the package's XLA:CPU settings; llvm_O0: xla_backend_optimization_level=0; "
                   "vector_width_128: xla_cpu_prefer_vector_width=128); runtime: the demo's repeated steps compiled "
                   "under each variant (compile_s) and their median run seconds, variants interleaved"}
    finish_result(res, os.path.join(args.out, f"compile_{jax.default_backend()}.json"))


if __name__ == "__main__":
    main()
