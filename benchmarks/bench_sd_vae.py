"""Benchmark of the Flax Stable Diffusion 1.5 VAE decoder against diffusers' ``AutoencoderKL`` (torch), same run.

Measures, batch 1, a 64x64x4 latent decoded to a 512x512x3 image (``--latent`` changes the size):

* forward time and forward + VJP time (the gradient of ``<decode(z), g>`` with respect to the latent ``z``: the
  latent-DPS pattern), JAX (``jit``, compiled ahead with ``lower().compile()``, whose duration is reported as the
  compile time) vs torch (``eval()``, autograd on ``z``), medians of ``--reps`` interleaved repetitions after a
  warm-up call; the JAX / torch time ratios;
* optionally (``--bf16``) JAX bfloat16 compute;
* peak temporary memory of the compiled forward + VJP from ``compile().memory_analysis()``, with and without
  ``remat``, plus the bytes the VJP closure keeps between the passes (``jax.eval_shape``);
* the relative difference ``max |jax - torch| / max |torch|`` of the decoded image and of the VJP (both networks hold
  the same random weights: the torch model is loaded from ``autoencoder_to_diffusers_state_dict``).

``z`` is in diffusion units (``autoencoder_decode`` divides by ``scaling_factor``; the torch side decodes
``z / scaling_factor`` with autograd through the division, so both gradients are with respect to the same ``z``).
Random weights (timings do not depend on them). Records ``torch.get_num_threads()``, the CPU model and the load.
Writes ``<out>/sd_vae_<backend>.json`` (``sd_vae_tiny_<backend>.json`` with ``--tiny``: the tiny KL config on a
16x16 latent, a quick smoke check of the script), atomically.

Usage::

    python benchmarks/bench_sd_vae.py [--reps 3] [--latent 64] [--bf16] [--no-torch] [--tiny]
                                      [--out benchmarks/results]
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (RESULTS, command_line, compile_ahead, diffusers_autoencoder, finish_memory,  # noqa: E402
                     finish_result, import_torch_reference, jax_fwd_vjp, jax_over_torch, load_numpy_state_dict,
                     machine_info, rel_err, time_interleaved, torch_fwd_vjp, torch_info, vjp_residual_bytes, xla_memory)
from torch_reference import nchw  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mapreps_jax.networks.autoencoder import (AutoencoderConfig, autoencoder_decode,  # noqa: E402
                                              autoencoder_to_diffusers_state_dict, init_autoencoder_params)


def _decode(cfg):
    """``(params, z) -> image``: the decoder of the config (the function timed and differentiated)."""
    return lambda p, z: autoencoder_decode(cfg, p, z)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--latent", type=int, default=None, help="latent height/width (default 64; 16 with --tiny)")
    ap.add_argument("--bf16", action="store_true", help="also time bfloat16 compute")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny KL config, 16x16 latent (smoke check)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    cfg = AutoencoderConfig.tiny_kl() if args.tiny else AutoencoderConfig.sd15()
    size = args.latent or (16 if args.tiny else 64)
    fct = cfg.downsample_factor
    t0 = time.perf_counter()
    params = jax.block_until_ready(init_autoencoder_params(jax.random.PRNGKey(0), cfg))
    init_s = time.perf_counter() - t0
    # the timed function is the decoder: count its parameters (decoder, post_quant_conv) beside the total
    n_params = int(sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)))
    n_dec = int(sum(int(np.prod(p.shape)) for k in ("decoder", "post_quant_conv") if k in params
                    for p in jax.tree_util.tree_leaves(params[k])))
    rng = np.random.default_rng(0)
    z_np = rng.standard_normal((1, size, size, cfg.latent_channels)).astype(np.float32)
    g_np = rng.standard_normal((1, size * fct, size * fct, cfg.out_channels)).astype(np.float32)
    z, g = jnp.asarray(z_np), jnp.asarray(g_np)
    info = machine_info()
    backend = info["backend"]
    res = {"config": "tiny_kl" if args.tiny else "sd15", "architecture": cfg.architecture_dict(),
           "num_params": n_params, "num_params_decoder": n_dec, "batch": 1, "latent": [size, size, cfg.latent_channels],
           "image": [size * fct, size * fct, cfg.out_channels], "reps": args.reps, **info,
           "command": command_line(argv), "init_params_s": init_s, "compile_s": {}, "memory": {}, "equality": {}}
    print(f"{res['config']}: {n_params:,} parameters ({n_dec:,} in the decoder), latent {size}x{size} -> "
          f"{size * fct}x{size * fct}, init {init_s:.1f}s", flush=True)

    # --- JAX candidates, compiled ahead (compile time and memory analysis from the same executable) -----------
    cands, outputs = {}, {}
    variants = [("float32", False)] + ([("bfloat16", False)] if args.bf16 else []) + [("float32", True)]
    for dtype, remat in variants:
        decode = _decode(dataclasses.replace(cfg, dtype=dtype, remat=remat))
        fwd, vjp = jax_fwd_vjp(decode)
        tag = f"jax_{dtype}{'_remat' if remat else ''}"
        for kind, jitted, fargs in (("forward", fwd, (params, z)), ("forward_vjp", vjp, (params, z, g))):
            if remat and kind == "forward":
                continue  # remat changes only the backward pass
            name = f"{tag}_{kind}"
            compiled, cands[name] = compile_ahead(jitted, fargs, name, res["compile_s"], outputs)
            if dtype == "float32":
                if kind == "forward_vjp":
                    res["memory"]["remat" if remat else "no_remat"] = {
                        "xla_memory_analysis": xla_memory(compiled),
                        "vjp_residual_bytes": vjp_residual_bytes(decode, params, z)}
                else:
                    res["memory"]["forward"] = {"xla_memory_analysis": xla_memory(compiled)}

    # --- torch reference with the same weights ---------------------------------------------------------------
    ref = None if args.no_torch else import_torch_reference("diffusers")
    if ref is not None:
        torch, diffusers = ref
        net = load_numpy_state_dict(diffusers_autoencoder(diffusers, cfg),
                                    autoencoder_to_diffusers_state_dict(params, cfg))
        f = cfg.scaling_factor
        cands.update(torch_fwd_vjp(lambda zr: net.decode(zr / f).sample, nchw(z_np), nchw(g_np), outputs))
        res["torch"] = torch_info(torch, diffusers)

    # warm-up, then interleaved repetitions (a shared machine's load hits every candidate alike); medians
    timing = time_interleaved(cands, args.reps)
    res["times_s"], med = timing["times_s"], timing["medians"]

    if "torch_float32_forward" in med:
        res["ratio_jax_over_torch"] = jax_over_torch(med)
        # same weights, same inputs: full-size equality (default matmul precision, as timed)
        def nhwc(t):
            return t.permute(0, 2, 3, 1).numpy()

        out_t, gz_t = outputs["torch_float32_forward_vjp"]
        out_j, gz_j = outputs["jax_float32_forward_vjp"]
        res["equality"] = {
            "decode_rel": rel_err(outputs["jax_float32_forward"], nhwc(outputs["torch_float32_forward"])),
            "decode_in_vjp_rel": rel_err(out_j, nhwc(out_t)),
            "vjp_rel": rel_err(gz_j, nhwc(gz_t)),
            "vjp_remat_rel": rel_err(outputs["jax_float32_remat_forward_vjp"][1], nhwc(gz_t)),
            "note": "max|jax - torch| / max|torch|, float32, JAX default matmul precision"}
        print(f"ratio jax/torch {res['ratio_jax_over_torch']}, equality {res['equality']}", flush=True)
    if args.bf16:
        res["ratio_bf16_over_fp32"] = {
            "forward": med["jax_bfloat16_forward"] / med["jax_float32_forward"],
            "forward_vjp": med["jax_bfloat16_forward_vjp"] / med["jax_float32_forward_vjp"]}
    res["ratio_remat_over_plain"] = {"forward_vjp": med["jax_float32_remat_forward_vjp"] /
                                     med["jax_float32_forward_vjp"]}

    finish_memory(res["memory"], params, "; argument size includes all VAE parameters, encoder too")

    path = os.path.join(args.out, f"sd_vae_{'tiny_' if args.tiny else ''}{backend}.json")
    finish_result(res, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
