"""Benchmark of the Flax Stable Diffusion 1.5 UNet against diffusers' ``UNet2DConditionModel`` (torch), same run.

Measures, batch 1, a ``--latent-size`` x ``--latent-size`` x 4 latent (default 64, SD's 512x512 images; 32 is
256x256) and a text context of length 77 (``--context-lengths 77 8`` adds others):

* forward time and forward + VJP time (the gradient of ``<eps(z, t, c), g>`` with respect to ``z``: the DPS
  pattern), JAX (``jit``, compiled ahead with ``lower().compile()``, whose duration is reported as the compile time)
  vs torch (``eval()``, autograd on ``z``), medians of ``--reps`` interleaved repetitions after a warm-up call;
* optionally (``--bf16``) JAX bfloat16 compute;
* peak temporary memory of the compiled forward + VJP from ``compile().memory_analysis()``, with and without
  ``remat``, plus the bytes the VJP closure keeps between the passes (``jax.eval_shape``);
* the relative difference ``max |jax - torch| / max |torch|`` of eps and of the VJP at full size (both networks
  hold the same random weights: the torch model is loaded from ``sd_unet_to_diffusers_state_dict``).

Random weights (timings do not depend on them). Records ``torch.get_num_threads()``, the CPU model and the load.
Writes ``<out>/sd_unet_<backend>.json`` (``sd_unet_tiny_<backend>.json`` with ``--tiny``: the tiny config on a
16x16 latent, a quick smoke check of the script), atomically.

Memory: at the 64x64 latent the compiled float32 forward + VJP needs about 13.3 GB of XLA:CPU temporaries plus
3.4 GB of weights (~16.8 GB), and the torch model holds another 3.4 GB. ``--section NAME`` stores the run under the
key ``NAME`` of an existing result file instead of replacing it (e.g. a ``--latent-size 64 --no-torch`` run beside
a ``--latent-size 32`` run with torch); ``--min-available-gib G`` first checks ``MemAvailable`` and, when it is
below ``G``, runs nothing and records why under ``"not_run"`` (keyed by the section) in the result file.
``--memory-only`` compiles the JAX functions for abstract parameters (``jax.eval_shape``: no weights are allocated
and nothing runs) and records only their memory analysis: the memory a size needs, measured without running it.

Usage::

    python benchmarks/bench_sd_unet.py [--reps 3] [--latent-size 64] [--context-lengths 77 8] [--bf16]
                                       [--no-torch] [--tiny] [--section NAME] [--min-available-gib G]
                                       [--memory-only]
                                       [--out benchmarks/results]
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (RESULTS, available_gib, command_line, compile_ahead, diffusers_unet, finish_memory,  # noqa: E402
                     finish_result, import_torch_reference, jax_fwd_vjp, jax_over_torch, load_numpy_state_dict,
                     machine_info, read_json, rel_err, time_interleaved, torch_fwd_vjp, torch_info, vjp_residual_bytes,
                     write_json_atomic, xla_memory)
from torch_reference import nchw  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mapreps_jax.networks.sd_unet import (SDUNetConfig, init_sd_unet_params, sd_unet_apply,  # noqa: E402
                                          sd_unet_param_shapes, sd_unet_to_diffusers_state_dict)

# measured (XLA:CPU, jaxlib 0.10.2, float32, batch 1, context 77; --latent-size 64 --memory-only): temporaries of the
# compiled forward + VJP at a 64x64x4 latent and its arguments (the SD 1.5 UNet's weights, 859.5 M parameters)
FULL_VJP_TEMP_BYTES, WEIGHTS_BYTES = 13_312_396_544, 3_438_451_472


def _apply(cfg, t):
    """``(params, z, context) -> eps`` of the config at the fixed time ``t`` (the function timed and differentiated)."""
    return lambda p, z, c: sd_unet_apply(cfg, p, z, t, c)


def _record_not_run(path, section, latent, need_gib, have_gib, command, sd15):
    """Record under ``"not_run"`` of ``path`` that the run was skipped for want of memory (nothing else changes)."""
    old = read_json(path)
    old.setdefault("not_run", {})[section or "run"] = {
        "command": command, "latent": latent, "required_available_gib": need_gib,
        "available_gib": None if have_gib is None else round(have_gib, 2),
        "checked": time.strftime("%Y-%m-%d %H:%M:%S"),
        "note": (f"not run on this machine: the compiled float32 forward + VJP of the SD 1.5 UNet at a 64x64x4 "
                 f"latent needs ~{(FULL_VJP_TEMP_BYTES + WEIGHTS_BYTES) / 1e9:.1f} GB on XLA:CPU "
                 f"({FULL_VJP_TEMP_BYTES / 1e9:.1f} GB of temporaries by compile().memory_analysis(), see a "
                 f"--memory-only run, plus {WEIGHTS_BYTES / 1e9:.1f} GB of weights); MemAvailable was below the "
                 f"required {need_gib:g} GiB when checked")
        if sd15 and latent == 64 else f"not run: MemAvailable below the required {need_gib:g} GiB when checked"}
    write_json_atomic(path, old)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--latent-size", type=int, default=None,
                    help="latent height/width (default 64, the 512x512 images of SD 1.5; 16 with --tiny)")
    ap.add_argument("--context-lengths", type=int, nargs="+", default=[77])
    ap.add_argument("--bf16", action="store_true", help="also time bfloat16 compute")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny config, 16x16 latent (smoke check)")
    ap.add_argument("--section", default=None,
                    help="store the run under this key of an existing result file instead of replacing the file")
    ap.add_argument("--min-available-gib", type=float, default=None,
                    help="run only when MemAvailable is at least this; otherwise record a not_run note")
    ap.add_argument("--memory-only", action="store_true",
                    help="only compile (abstract parameters: nothing allocated or run); record XLA's memory analysis")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    path = os.path.join(args.out, f"sd_unet_{'tiny_' if args.tiny else ''}{backend}.json")
    size = args.latent_size or (16 if args.tiny else 64)
    command = command_line(argv)
    if args.min_available_gib is not None:
        have = available_gib()
        if have is None or have < args.min_available_gib:
            print(f"MemAvailable {have} GiB < {args.min_available_gib} GiB: not running; noting it in {path}",
                  flush=True)
            _record_not_run(path, args.section, size, args.min_available_gib, have, command, not args.tiny)
            return 0

    cfg = SDUNetConfig.tiny() if args.tiny else SDUNetConfig.sd15()
    t_val = 500.0
    t = jnp.float32(t_val)
    t0 = time.perf_counter()
    if args.memory_only:  # shapes and dtypes only: compile() and memory_analysis() need no values
        params = sd_unet_param_shapes(cfg)
    else:
        params = jax.block_until_ready(init_sd_unet_params(jax.random.PRNGKey(0), cfg))
    init_s = time.perf_counter() - t0
    n_params = int(sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)))
    rng = np.random.default_rng(0)
    z_np = rng.standard_normal((1, size, size, cfg.in_channels)).astype(np.float32)
    g_np = rng.standard_normal((1, size, size, cfg.out_channels)).astype(np.float32)
    ctx_np = {L: rng.standard_normal((1, L, cfg.cross_attention_dim)).astype(np.float32)
              for L in args.context_lengths}
    z, g = jnp.asarray(z_np), jnp.asarray(g_np)
    res = {"config": "tiny" if args.tiny else "sd15", "architecture": cfg.architecture_dict(),
           "num_params": n_params, "batch": 1, "latent_size": size, "latent": [size, size, cfg.in_channels],
           "image": [8 * size, 8 * size, 3], "context_lengths": list(args.context_lengths), "t": t_val,
           "reps": 0 if args.memory_only else args.reps, "memory_only": args.memory_only, **machine_info(),
           "command": command,
           "init_params_s": init_s, "compile_s": {}, "memory": {}, "equality": {}}
    print(f"{res['config']}: {n_params:,} parameters, latent {size}x{size}, init {init_s:.1f}s", flush=True)

    # --- JAX candidates, compiled ahead (compile time and memory analysis from the same executable) -----------
    cands, outputs = {}, {}
    variants = [("float32", False)] + ([("bfloat16", False)] if args.bf16 else []) + [("float32", True)]
    for L, c_np in ctx_np.items():
        c = jnp.asarray(c_np)
        for dtype, remat in variants:
            apply = _apply(dataclasses.replace(cfg, dtype=dtype, remat=remat), t)
            fwd, vjp = jax_fwd_vjp(apply)
            tag = f"jax_{dtype}{'_remat' if remat else ''}"
            for kind, jitted, fargs in (("forward", fwd, (params, z, c)), ("forward_vjp", vjp, (params, z, c, g))):
                if remat and kind == "forward":
                    continue  # remat changes only the backward pass
                name = f"{tag}_{kind}_L{L}"
                compiled, cands[name] = compile_ahead(jitted, fargs, name, res["compile_s"], outputs)
                if kind == "forward_vjp" and dtype == "float32":
                    res["memory"][f"{'remat' if remat else 'no_remat'}_L{L}"] = {
                        "xla_memory_analysis": xla_memory(compiled),
                        "vjp_residual_bytes": vjp_residual_bytes(apply, params, z, c)}
                if kind == "forward" and dtype == "float32":
                    res["memory"][f"forward_L{L}"] = {"xla_memory_analysis": xla_memory(compiled)}

    if args.memory_only:
        finish_memory(res["memory"], params)
        finish_result(res, path, args.section)
        return 0

    # --- torch reference with the same weights ---------------------------------------------------------------
    ref = None if args.no_torch else import_torch_reference("diffusers")
    if ref is not None:
        torch, diffusers = ref
        net = load_numpy_state_dict(diffusers_unet(diffusers, cfg), sd_unet_to_diffusers_state_dict(params, cfg))
        zt, gt, tt = nchw(z_np), nchw(g_np), torch.tensor([t_val])
        for L, c_np in ctx_np.items():
            ct = torch.from_numpy(c_np)
            cands.update(torch_fwd_vjp(lambda zr, ct=ct: net(zr, tt, ct).sample, zt, gt, outputs, f"_L{L}"))
        res["torch"] = torch_info(torch, diffusers)

    # warm-up, then interleaved repetitions (a shared machine's load hits every candidate alike); medians
    timing = time_interleaved(cands, args.reps)
    res["times_s"], med = timing["times_s"], timing["medians"]

    res["ratio_jax_over_torch"], res["ratio_bf16_over_fp32"], res["ratio_remat_over_plain"] = {}, {}, {}
    for L in ctx_np:
        if f"torch_float32_forward_L{L}" in med:
            res["ratio_jax_over_torch"][f"L{L}"] = jax_over_torch(med, f"_L{L}")
            # same weights, same inputs: full-size equality (default matmul precision, as timed)
            eps_t = outputs[f"torch_float32_forward_L{L}"].permute(0, 2, 3, 1).numpy()
            _, gz_t = outputs[f"torch_float32_forward_vjp_L{L}"]
            _, gz_j = outputs[f"jax_float32_forward_vjp_L{L}"]
            _, gz_jr = outputs[f"jax_float32_remat_forward_vjp_L{L}"]
            gz_t = gz_t.permute(0, 2, 3, 1).numpy()
            res["equality"][f"L{L}"] = {
                "eps_rel": rel_err(outputs[f"jax_float32_forward_L{L}"], eps_t),
                "vjp_rel": rel_err(gz_j, gz_t),
                "vjp_remat_rel": rel_err(gz_jr, gz_t),
                "note": "max|jax - torch| / max|torch|, float32, JAX default matmul precision"}
            print(f"L={L}: ratio jax/torch {res['ratio_jax_over_torch'][f'L{L}']}, "
                  f"equality {res['equality'][f'L{L}']}", flush=True)
        if args.bf16:
            res["ratio_bf16_over_fp32"][f"L{L}"] = {
                "forward": med[f"jax_bfloat16_forward_L{L}"] / med[f"jax_float32_forward_L{L}"],
                "forward_vjp": med[f"jax_bfloat16_forward_vjp_L{L}"] / med[f"jax_float32_forward_vjp_L{L}"]}
        res["ratio_remat_over_plain"][f"L{L}"] = {
            "forward_vjp": med[f"jax_float32_remat_forward_vjp_L{L}"] / med[f"jax_float32_forward_vjp_L{L}"]}

    finish_memory(res["memory"], params)

    finish_result(res, path, args.section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
