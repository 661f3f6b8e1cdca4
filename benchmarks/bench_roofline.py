"""Roofline of the network path on this machine: FLOPs (XLA's cost analysis of the compiled program), measured time
and achieved GFLOP/s of the bundled digits ADM (forward and forward + VJP at batch 16 and 64; ``--ffhq`` adds the
FFHQ-256 ADM at batch 1), beside a same-run float32 matmul reference (a chain of 2048x2048 products), so the fraction
of the machine's attainable rate is a ratio measured in one run.

Random inputs, the bundled weights for the digits ADM (random weights for FFHQ: time does not depend on them).
Writes ``benchmarks/results/roofline_<backend>.json`` with the CPU model, core count and XLA's thread settings.

Usage::

    python benchmarks/bench_roofline.py [--reps 3] [--ffhq] [--out benchmarks/results]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (RESULTS, compile_ahead, finish_result, flops_of, jax_fwd_vjp, machine_info,  # noqa: E402
                     matmul_reference, time_interleaved)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mapreps_jax.networks.adm import ADMConfig, adm_apply, init_adm_params  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ffhq", action="store_true", help="also the FFHQ-256 ADM at batch 1")
    ap.add_argument("--batches", default="16,64", help="digits ADM batch sizes")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    from mapreps_jax.app.pretrained import load_default_prior

    info = machine_info()
    res = {"reps": args.reps, **info, "xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": {}}
    nets = {}
    digits = load_default_prior()
    for b in (int(v) for v in args.batches.split(",")):
        nets[f"digits_adm_b{b}"] = (digits.params, (b, 32, 32, 1), lambda p, x, m=digits: m.apply(p, x, jnp.full(
            (x.shape[0],), 500.0), None))
    if args.ffhq:
        cfg = ADMConfig.ffhq256()
        nets["ffhq_adm_b1"] = (init_adm_params(jax.random.PRNGKey(0), cfg), (1, 256, 256, 3),
                               lambda p, x, cfg=cfg: adm_apply(cfg, p, x, jnp.array([500.0])))

    cands, flops, compile_s = {}, {}, {}
    mm, mm_args, mm_flops = matmul_reference()
    cands["matmul_reference"] = lambda: jax.block_until_ready(mm(*mm_args))
    flops["matmul_reference"] = mm_flops
    rng = np.random.default_rng(0)
    for name, (params, shape, apply) in nets.items():
        x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
        out = jax.eval_shape(apply, params, x)
        g = jnp.asarray(rng.standard_normal(out.shape).astype(np.float32))
        fwd, vjp = jax_fwd_vjp(apply)
        for kind, fn, fn_args in (("forward", fwd, (params, x)), ("forward_vjp", vjp, (params, x, g))):
            # compiled once: the executable timed is the one cost-analysed
            compiled, cands[f"{name}_{kind}"] = compile_ahead(fn, fn_args, f"{name}_{kind}", compile_s, {})
            flops[f"{name}_{kind}"] = flops_of(compiled)
    timed = time_interleaved(cands, args.reps)
    ref_rate = flops["matmul_reference"] / timed["medians"]["matmul_reference"] / 1e9
    for name, med in timed["medians"].items():
        f = flops.get(name)
        rate = None if f is None else f / med / 1e9
        res["cases"][name] = {"gflop": None if f is None else f / 1e9, "median_s": med,
                              "first_call_s": timed["times_s"][name]["first_call"],
                              "compile_s": compile_s.get(name), "gflop_per_s": rate,
                              "fraction_of_matmul": None if rate is None else rate / ref_rate}
        print(f"{name:36s} {0 if f is None else f / 1e9:9.2f} GFLOP {med:8.3f} s "
              f"{0 if rate is None else rate:7.1f} GFLOP/s ({0 if rate is None else rate / ref_rate:.0%} of matmul)")
    res["note"] = ("gflop: XLA cost analysis of the timed executable (forward: apply; forward_vjp: apply's output and "
                   "the input VJP); compile_s: its compile seconds (compiled ahead, once); fraction_of_matmul: "
                   "achieved GFLOP/s over the same-run 2048^2 float32 matmul chain's")
    finish_result(res, os.path.join(args.out, f"roofline_{info['backend']}.json"))


if __name__ == "__main__":
    main()
