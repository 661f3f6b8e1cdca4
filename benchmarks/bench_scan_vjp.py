"""Benchmark (not a test): the DPS step inside ``lax.scan`` vs one jitted call per step, on the bundled digits ADM.

XLA:CPU (jaxlib 0.10) ran the input-gradient convolution of JAX's own transpose rule (kernel in ``HWOI`` layout) on a
slow path inside loop bodies: a DPS step at batch 16 took 1.5 s inside the scan against 0.29 s as a standalone call.
``mapreps_jax.networks.conv`` gives the ADM convolutions an explicit ``HWIO`` input gradient; this benchmark keeps
the two in view. Medians of interleaved repetitions, after compilation; results in
``benchmarks/results/scan_vjp_<backend>.json``.

    python benchmarks/bench_scan_vjp.py [--batch 16] [--steps 10] [--repeat 3]
"""
import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mapreps_jax.app.digits import make_task  # noqa: E402
from mapreps_jax.map_rps import rps_jit  # noqa: E402
from mapreps_jax.app.pretrained import load_default_prior  # noqa: E402
from mapreps_jax.checkpoint_io import write_text_atomic  # noqa: E402
from mapreps_jax.rps_stage import subgrid_times  # noqa: E402
from mapreps_jax.samplers import DPSStep  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    model = load_default_prior()
    _, op = make_task("sr4")
    x = jax.random.normal(jax.random.PRNGKey(0), (a.batch, 32, 32, 1))
    y = op.A(x)
    sampler = DPSStep(zeta=10.0, clip=True)
    t0 = 1000
    times, nxt = (np.asarray(v) for v in subgrid_times(t0 - 1, a.steps))

    step = jax.jit(lambda k, xx, t, tn: sampler.step(k, model, op, y, xx, t, tn))

    def per_call():
        xx = x
        for i in range(a.steps):
            xx = step(jax.random.PRNGKey(i), xx, jnp.int32(times[i]), jnp.int32(nxt[i]))
        return xx.block_until_ready()

    def in_scan():
        return rps_jit(jax.random.PRNGKey(0), model, op, y, x, jnp.int32(t0), sampler=sampler,
                       n_steps=a.steps).block_until_ready()

    per_call(), in_scan()  # compile
    runs = {"per_call": [], "scan": []}
    for _ in range(a.repeat):
        for name, f in (("per_call", per_call), ("scan", in_scan)):
            t = time.perf_counter()
            f()
            runs[name].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in runs.items()}
    out = {"backend": jax.default_backend(), "machine": platform.processor() or platform.machine(),
           "batch": a.batch, "steps": a.steps, "seconds_per_step": {k: v / a.steps for k, v in med.items()},
           "scan_over_per_call": med["scan"] / med["per_call"], "runs": runs}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"scan_vjp_{jax.default_backend()}.json")
    write_text_atomic(path, json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("batch", "steps", "seconds_per_step", "scan_over_per_call")}, indent=1))


if __name__ == "__main__":
    main()
