"""Benchmark of the Flax ADM UNet at the FFHQ-256 configuration against the PyTorch reference (deepinv DiffUNet).

Measures, per image (batch 1, 256x256x3), on the same machine in the same run:

* forward time and forward + VJP time (the gradient of ``<eps(x, t), g>`` with respect to ``x``: the DPS /
  MAP-RPS back-propagation pattern), JAX (each program compiled once, ahead: ``compile_s``; that executable is
  timed, cost-analysed and memory-analysed) vs torch (``eval()``, autograd on ``x``);
* JAX bfloat16 vs float32;
* peak temporary memory of the compiled forward + VJP from XLA's ``compile().memory_analysis()``, with and
  without rematerialisation (``ADMConfig.remat``);
* a roofline in the same run: FLOPs of the forward and forward + VJP from XLA's cost analysis, the GFLOP/s both
  frameworks achieve on them (the same arithmetic), a float32 matmul chain's GFLOP/s timed among the candidates,
  and the rate that 0.7x torch's time would need, as a fraction of the matmul rate.

Random weights (timings do not depend on them). Writes ``benchmarks/results/adm_<backend>.json``.

Usage::

    python benchmarks/bench_adm.py [--reps 3] [--no-torch] [--out benchmarks/results]
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (RESULTS, compile_ahead, finish_result, flops_of, import_torch_reference, jax_fwd_vjp,  # noqa: E402
                     jax_over_torch, machine_info, matmul_reference, time_interleaved, torch_fwd_vjp, torch_info,
                     tree_bytes, vjp_residual_bytes, xla_memory)
from torch_reference import nchw  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mapreps_jax.networks.adm import ADMConfig, adm_apply, init_adm_params  # noqa: E402


def _apply(cfg, t):
    """``(params, x) -> eps`` of the config at the fixed time ``t`` (the function timed and differentiated)."""
    return lambda p, x: adm_apply(cfg, p, x, t)


def roofline(compiled, med, mm_flops, target: float = 0.7) -> dict:
    """GFLOP/s of the float32 forward and forward + VJP (FLOPs: XLA's cost analysis of the timed JAX executables
    ``compiled``; the torch reference does the same arithmetic) for JAX and torch, against the same-run matmul chain's
    rate; and the rate ``target`` x torch's time would need (``needed_fraction_of_matmul`` above 1: beyond what a
    matmul reaches)."""
    flops = {kind: flops_of(compiled[f"jax_float32_{kind}"]) for kind in ("forward", "forward_vjp")}
    mm_rate = mm_flops / med["matmul_reference"] / 1e9
    out = {"matmul_gflop_per_s": mm_rate, "target_over_torch": target}
    for kind, f in flops.items():
        e = {"gflop": None if f is None else f / 1e9}
        for fw in ("jax", "torch"):
            m = med.get(f"{fw}_float32_{kind}")
            if f is not None and m is not None:
                e[f"{fw}_gflop_per_s"] = f / m / 1e9
                e[f"{fw}_fraction_of_matmul"] = e[f"{fw}_gflop_per_s"] / mm_rate
        if "torch_gflop_per_s" in e:
            e["needed_gflop_per_s"] = e["torch_gflop_per_s"] / target
            e["needed_fraction_of_matmul"] = e["needed_gflop_per_s"] / mm_rate
        out[kind] = e
        print(f"roofline {kind}: {e}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-device", default="cpu", help="where deepinv runs: cpu (the default; 2 threads on the "
                    "development machine) or cuda (on a GPU machine, beside JAX on the same GPU)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    cfg = ADMConfig.ffhq256()
    params = init_adm_params(jax.random.PRNGKey(0), cfg)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((1, 256, 256, 3)).astype(np.float32)
    g_np = rng.standard_normal((1, 256, 256, 6)).astype(np.float32)
    x, g = jnp.asarray(x_np), jnp.asarray(g_np)
    t = jnp.array([500.0])
    info = machine_info()
    backend = info["backend"]
    res = {"config": "ffhq256", "batch": 1, "image": [256, 256, 3], "reps": args.reps, **info, "memory": {}}

    def block(o):
        return jax.block_until_ready(o)

    # --- the candidates: each is (name, zero-arg callable); each JAX program compiled once, ahead (its seconds in
    # compile_s), and that executable is timed, cost-analysed (roofline) and memory-analysed (memory) -----------
    cands, outputs, compiled = {}, {}, {}
    res["compile_s"] = {}
    for dtype, remat in (("float32", False), ("bfloat16", False), ("float32", True)):
        fwd, vjp = jax_fwd_vjp(_apply(dataclasses.replace(cfg, dtype=dtype, remat=remat), t))
        progs = {"forward_vjp": (vjp, (params, x, g))} if remat else {"forward": (fwd, (params, x)),
                                                                       "forward_vjp": (vjp, (params, x, g))}
        for kind, (fn, fn_args) in progs.items():
            name = f"jax_{dtype}{'_remat' if remat else ''}_{kind}"
            compiled[name], cands[name] = compile_ahead(fn, fn_args, name, res["compile_s"], outputs)
    mm, mm_args, mm_flops = matmul_reference()
    cands["matmul_reference"] = lambda: block(mm(*mm_args))

    ref = None if args.no_torch else import_torch_reference("deepinv")
    if ref is not None:
        torch, deepinv = ref
        dev = torch.device(args.torch_device)
        net = deepinv.models.DiffUNet(in_channels=3, out_channels=3, large_model=False, pretrained=None).eval().to(dev)
        tt = torch.tensor([500.0], device=dev)
        cands.update(torch_fwd_vjp(lambda xr: net.forward_diffusion(xr, tt), nchw(x_np).to(dev), nchw(g_np).to(dev),
                                   outputs))
        res["torch"] = {**torch_info(torch, deepinv), "device": str(dev)}

    # warm-up (compilation for JAX), then interleaved repetitions; the reported time is the median
    timing = time_interleaved(cands, args.reps)
    res["times_s"], med = timing["times_s"], timing["medians"]
    if "torch_float32_forward" in med:
        res["ratio_jax_over_torch"] = jax_over_torch(med)
        print(f"ratio jax/torch: {res['ratio_jax_over_torch']}", flush=True)
    res["roofline"] = roofline(compiled, med, mm_flops)
    res["ratio_bf16_over_fp32"] = {
        "forward": med["jax_bfloat16_forward"] / med["jax_float32_forward"],
        "forward_vjp": med["jax_bfloat16_forward_vjp"] / med["jax_float32_forward_vjp"]}

    # --- memory ------------------------------------------------------------------------------------------------
    res["memory"]["param_bytes"] = tree_bytes(params)
    res["memory"]["note"] = (
        "vjp_residual_bytes: bytes held between the forward and backward pass (the VJP closure: saved activations "
        "plus the parameters it references). xla_memory_analysis: compile().memory_analysis() of the jitted forward"
        "+VJP; on the CPU backend its temp size does not reflect rematerialisation (a plain matmul-chain test gives "
        "the same temp size with and without jax.checkpoint), so use the residual bytes there.")
    for remat in (False, True):
        entry = {"vjp_residual_bytes": vjp_residual_bytes(_apply(dataclasses.replace(cfg, remat=remat), t), params, x),
                 "xla_memory_analysis": xla_memory(compiled[f"jax_float32{'_remat' if remat else ''}_forward_vjp"])}
        res["memory"]["remat" if remat else "no_remat"] = entry
        print(f"memory (remat={remat}): {entry}", flush=True)
    res["memory"]["forward_only_xla_memory_analysis"] = xla_memory(compiled["jax_float32_forward"])

    path = os.path.join(args.out, f"adm_{backend}.json")
    finish_result(res, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
