"""Benchmark (not a test): D-P sweep cost, compile time vs number of steps, sampler overhead.

For the exact Gaussian prior and for a tiny Flax network stand-in (the library's ADM UNet, random weights):
  * NFE and wall time of a 5-point D-P sweep with Stage 1 shared (``dp_sweep``) vs recomputed per t0 (``map_rps``);
  * compile time of MAP (N = 10 vs 1000) and RPS (t0 = 10 vs 1000): a lax.scan loop compiles in about the same time;
  * sampler overhead: RPS wall time / pure network (forward + VJP, the DPS step's cost) time at the same NFE.
Writes benchmarks/results/sweep_<backend>.json and prints a Markdown table.

    python benchmarks/bench_sweep.py [--quick]
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
import mapreps_jax as mr  # noqa: E402
from mapreps_jax.priors import GaussianPrior  # noqa: E402


def tiny_model(shape=(16, 16, 1)):
    """The library's ADM UNet in a tiny configuration with random weights (a network stand-in, not trained)."""
    cfg = mr.ADMConfig.tiny(image_size=shape[0], in_channels=shape[-1], out_channels=shape[-1], learn_sigma=False)
    return mr.adm_score_model(cfg, mr.init_adm_params(jax.random.PRNGKey(0), cfg), name="tiny-adm")


def block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)


def timed(f, *a, repeat=1):
    block(f(*a))  # compile / warm
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        block(f(*a))
        best = min(best, time.perf_counter() - t)
    return best


def compile_time(f, *args):
    t = time.perf_counter()
    f.lower(*args).compile()
    return time.perf_counter() - t


def problem(kind, batch):
    if kind == "exact":
        prior = GaussianPrior.isotropic(64, 1.0)
        op = mr.make_operator("mask", (64,), keep=32, seed=0)
        model = prior.score_model(mr.make_schedule("linear"))
        x = prior.sample(jax.random.PRNGKey(1), batch)
        clip = False
    else:
        model = tiny_model()
        op = mr.make_operator("sr", (16, 16, 1), factor=2, kind="avg")
        x = jnp.clip(jax.random.normal(jax.random.PRNGKey(1), (batch, 16, 16, 1)) * 0.5, -1, 1)
        clip = True
    y = op.measure(jax.random.PRNGKey(2), x, 0.05)
    return model, op, x, y, clip


def bench(kind, quick):
    batch = 4
    model, op, x, y, clip = problem(kind, batch)
    N = 50 if quick else 100
    t0s = [0, 25, 50, 100, 200] if quick else [0, 50, 100, 200, 400]
    cfg = mr.MAPConfig(n_iter=N, w=0.1, lr=0.05)
    sampler = mr.DPSStep(zeta=0.3, clip=clip)
    key = jax.random.PRNGKey(0)
    out = {"kind": kind, "batch": batch, "N": N, "t0s": t0s}
    log = lambda msg: print(f"[{kind}] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    log("start")
    # shared Stage 1 (dp_sweep) vs recomputed per t0
    mrps = jax.jit(lambda k, yy, t0: mr.map_rps(k, model, op, yy, t0, map_config=cfg, sampler=sampler,
                                                max_steps=max(t0s)))

    def shared():
        return mr.dp_sweep(key, model, op, y, t0s, map_config=cfg, sampler=sampler)

    def recomputed():
        return [block(mrps(key, y, jnp.int32(t0))) for t0 in t0s]

    res = shared()
    recomputed()  # compile both first
    shared_s, recomputed_s = [], []
    for _ in range(2):  # interleaved repetitions (shared machine): keep the best of each
        t = time.perf_counter()
        block(shared().outputs)
        shared_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        recomputed()
        recomputed_s.append(time.perf_counter() - t)
    out["sweep_shared_s"] = min(shared_s)
    out["sweep_shared_nfe"] = res.nfe["total"]
    out["sweep_recomputed_s"] = min(recomputed_s)
    out["sweep_recomputed_nfe"] = len(t0s) * N + sum(t0s)

    log(f"sweep shared {out['sweep_shared_s']:.2f}s recomputed {out['sweep_recomputed_s']:.2f}s")
    # compile time flat in the number of steps
    for n in (10, 1000):
        # N concrete (closed over) -> a scan of exactly N steps
        f_map = jax.jit(lambda k, yy, n=n: mr.map_estimate(k, model, op, yy, config=mr.MAPConfig(n_iter=n, w=0.1)))
        out[f"compile_map_N{n}_s"] = compile_time(f_map, key, y)
    f_rps = jax.jit(lambda k, yy, xx, t0: mr.rps(k, model, op, yy, xx, t0, sampler=sampler))
    for t0 in (10, 1000):
        # t0 concrete (static) -> a scan of exactly t0 steps
        g = jax.jit(lambda k, yy, xx, t0=t0: mr.rps(k, model, op, yy, xx, t0, sampler=sampler))
        out[f"compile_rps_t0_{t0}_s"] = compile_time(g, key, y, op.x_init(y))
    out["compile_rps_traced_t0_s"] = compile_time(f_rps, key, y, op.x_init(y), jnp.int32(5))

    log("compile times done")
    # sampler overhead at the same NFE: RPS (full grid) vs a scan of pure network forward+VJP calls
    T0 = 100 if quick else 300
    xi = op.x_init(y)

    def net_only(k, xx):
        def body(c, i):
            f = lambda v: jnp.sum(model.eps(v, i) ** 2)
            return c + 1e-3 * jax.grad(f)(c), None

        return jax.lax.scan(body, xx, jnp.arange(T0 - 1, -1, -1))[0]

    t_net = timed(jax.jit(net_only), key, xi, repeat=3)
    t_rps = timed(jax.jit(lambda k, yy, xx: mr.rps(k, model, op, yy, xx, T0, sampler=sampler)), key, y, xi, repeat=3)
    out["overhead_nfe"] = T0
    out["network_fwd_vjp_s"] = t_net
    out["rps_s"] = t_rps
    out["sampler_overhead_ratio"] = t_rps / t_net
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    backend = jax.default_backend()
    rows = [bench(k, a.quick) for k in ("exact", "tiny-adm")]
    meta = {"backend": backend, "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(), "quick": a.quick,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"sweep_{backend}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    os.replace(tmp, path)
    print("| prior | NFE shared / recomputed | wall shared / recomputed (s) | compile MAP N=10 / 1000 (s) |"
          " compile RPS t0=10 / 1000 (s) | RPS / network time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['sweep_shared_nfe']} / {r['sweep_recomputed_nfe']} | "
              f"{r['sweep_shared_s']:.2f} / {r['sweep_recomputed_s']:.2f} | "
              f"{r['compile_map_N10_s']:.2f} / {r['compile_map_N1000_s']:.2f} | "
              f"{r['compile_rps_t0_10_s']:.2f} / {r['compile_rps_t0_1000_s']:.2f} | "
              f"{r['sampler_overhead_ratio']:.3f} (NFE {r['overhead_nfe']}) |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
