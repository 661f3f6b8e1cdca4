"""Benchmark of the Flax Stable Diffusion 1.5 UNet against diffusers' ``UNet2DConditionModel`` (torch), same run.

Measures, batch 1, a 64x64x4 latent and a text context of length 77 (``--context-lengths 77 8`` adds others):

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
16x16 latent, a quick smoke check of the script).

Usage::

    python benchmarks/bench_sd_unet.py [--reps 3] [--context-lengths 77 8] [--bf16] [--no-torch] [--tiny]
                                       [--out benchmarks/results]
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

from mapreps_jax.networks.sd_unet import (SDUNetConfig, init_sd_unet_params, sd_unet_apply,  # noqa: E402
                                          sd_unet_to_diffusers_state_dict)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem(compiled):
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    d = {k: int(getattr(ma, k)) for k in keys if hasattr(ma, k)}
    peak = getattr(ma, "peak_memory_in_bytes", None)
    if peak is not None:
        d["peak_memory_in_bytes"] = int(peak)
    return d


def _jax_fns(cfg, t):
    def fwd(p, z, c):
        return sd_unet_apply(cfg, p, z, t, c)

    def vjp(p, z, c, g):
        out, pull = jax.vjp(lambda z: sd_unet_apply(cfg, p, z, t, c), z)
        return out, pull(g)[0]

    return jax.jit(fwd), jax.jit(vjp)


def _residual_bytes(cfg, t, params, z, c):
    def f(p, z, c):
        return jax.tree_util.tree_leaves(jax.vjp(lambda z: sd_unet_apply(cfg, p, z, t, c), z)[1])

    leaves = jax.eval_shape(f, params, z, c)
    return int(sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--context-lengths", type=int, nargs="+", default=[77])
    ap.add_argument("--bf16", action="store_true", help="also time bfloat16 compute")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny config, 16x16 latent (smoke check)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    cfg = SDUNetConfig.tiny() if args.tiny else SDUNetConfig.sd15()
    size = 16 if args.tiny else 64
    t_val = 500.0
    t = jnp.float32(t_val)
    t0 = time.perf_counter()
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
           "num_params": n_params, "batch": 1, "latent": [size, size, cfg.in_channels],
           "context_lengths": list(args.context_lengths), "t": t_val, "reps": args.reps, "backend": backend,
           "device": str(jax.devices()[0]), "jax_version": jax.__version__, "machine": platform.machine(),
           "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
           "init_params_s": init_s, "compile_s": {}, "memory": {}, "equality": {}}
    print(f"{res['config']}: {n_params:,} parameters, init {init_s:.1f}s", flush=True)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # --- JAX candidates, compiled ahead (compile time and memory analysis from the same executable) -----------
    cands, outputs = {}, {}
    variants = [("float32", False)] + ([("bfloat16", False)] if args.bf16 else []) + [("float32", True)]
    for L, c_np in ctx_np.items():
        c = jnp.asarray(c_np)
        for dtype, remat in variants:
            vcfg = dataclasses.replace(cfg, dtype=dtype, remat=remat)
            fwd, vjp = _jax_fns(vcfg, t)
            tag = f"jax_{dtype}{'_remat' if remat else ''}"
            for kind, jitted, fargs in (("forward", fwd, (params, z, c)), ("forward_vjp", vjp, (params, z, c, g))):
                if remat and kind == "forward":
                    continue  # remat changes only the backward pass
                name = f"{tag}_{kind}_L{L}"
                t0 = time.perf_counter()
                compiled = jitted.lower(*fargs).compile()
                res["compile_s"][name] = time.perf_counter() - t0
                print(f"compiled {name}: {res['compile_s'][name]:.1f}s", flush=True)
                if kind == "forward_vjp" and dtype == "float32":
                    res["memory"][f"{'remat' if remat else 'no_remat'}_L{L}"] = {
                        "xla_memory_analysis": _mem(compiled),
                        "vjp_residual_bytes": _residual_bytes(vcfg, t, params, z, c)}
                if kind == "forward" and dtype == "float32":
                    res["memory"][f"forward_L{L}"] = {"xla_memory_analysis": _mem(compiled)}

                def run(compiled=compiled, fargs=fargs, name=name):
                    outputs[name] = jax.block_until_ready(compiled(*fargs))
                cands[name] = run

    # --- torch reference with the same weights ---------------------------------------------------------------
    net = None
    if not args.no_torch:
        try:
            import torch
            from torchvision_shim import install_torchvision_shim

            install_torchvision_shim()
            import diffusers
        except ImportError as e:
            print(f"torch reference unavailable ({e}); skipping", flush=True)
        else:
            torch.set_num_threads(os.cpu_count())
            kw = dict(sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                      block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                      cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=cfg.attention_head_dim,
                      down_block_types=cfg.down_block_types, up_block_types=cfg.up_block_types,
                      norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
                      flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
                      use_linear_projection=cfg.use_linear_projection,
                      transformer_layers_per_block=cfg.transformer_layers_per_block,
                      upcast_attention=cfg.upcast_attention)
            net = diffusers.UNet2DConditionModel(**kw).eval()
            sd = sd_unet_to_diffusers_state_dict(params, cfg)
            net.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
            del sd
            zt = torch.from_numpy(np.ascontiguousarray(z_np.transpose(0, 3, 1, 2)))
            gt = torch.from_numpy(np.ascontiguousarray(g_np.transpose(0, 3, 1, 2)))
            tt = torch.tensor([t_val])
            for L, c_np in ctx_np.items():
                ct = torch.from_numpy(c_np)

                def tfwd(ct=ct, L=L):
                    with torch.no_grad():
                        outputs[f"torch_float32_forward_L{L}"] = net(zt, tt, ct).sample

                def tvjp(ct=ct, L=L):
                    zr = zt.clone().requires_grad_(True)
                    out = net(zr, tt, ct).sample
                    (gz,) = torch.autograd.grad(out, zr, gt)
                    outputs[f"torch_float32_forward_vjp_L{L}"] = (out.detach(), gz)

                cands[f"torch_float32_forward_L{L}"] = tfwd
                cands[f"torch_float32_forward_vjp_L{L}"] = tvjp
            res["torch"] = {"version": torch.__version__, "diffusers": diffusers.__version__,
                            "threads": torch.get_num_threads()}

    # warm-up, then interleaved repetitions (a shared machine's load hits every candidate alike); medians
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

    res["ratio_jax_over_torch"], res["ratio_bf16_over_fp32"], res["ratio_remat_over_plain"] = {}, {}, {}
    for L in ctx_np:
        if f"torch_float32_forward_L{L}" in med:
            res["ratio_jax_over_torch"][f"L{L}"] = {
                "forward": med[f"jax_float32_forward_L{L}"] / med[f"torch_float32_forward_L{L}"],
                "forward_vjp": med[f"jax_float32_forward_vjp_L{L}"] / med[f"torch_float32_forward_vjp_L{L}"]}
            # same weights, same inputs: full-size equality (default matmul precision, as timed)
            eps_t = outputs[f"torch_float32_forward_L{L}"].permute(0, 2, 3, 1).numpy()
            _, gz_t = outputs[f"torch_float32_forward_vjp_L{L}"]
            _, gz_j = outputs[f"jax_float32_forward_vjp_L{L}"]
            res["equality"][f"L{L}"] = {
                "eps_rel": _rel(outputs[f"jax_float32_forward_L{L}"], eps_t),
                "vjp_rel": _rel(gz_j, gz_t.permute(0, 2, 3, 1).numpy()),
                "note": "max|jax - torch| / max|torch|, float32, JAX default matmul precision"}
            print(f"L={L}: ratio jax/torch {res['ratio_jax_over_torch'][f'L{L}']}, "
                  f"equality {res['equality'][f'L{L}']}", flush=True)
        if args.bf16:
            res["ratio_bf16_over_fp32"][f"L{L}"] = {
                "forward": med[f"jax_bfloat16_forward_L{L}"] / med[f"jax_float32_forward_L{L}"],
                "forward_vjp": med[f"jax_bfloat16_forward_vjp_L{L}"] / med[f"jax_float32_forward_vjp_L{L}"]}
        res["ratio_remat_over_plain"][f"L{L}"] = {
            "forward_vjp": med[f"jax_float32_remat_forward_vjp_L{L}"] / med[f"jax_float32_forward_vjp_L{L}"]}

    param_bytes = int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params)))
    res["memory"]["param_bytes"] = param_bytes
    res["memory"]["note"] = (
        "xla_memory_analysis: compile().memory_analysis() of the compiled function (temp_size_in_bytes = peak "
        "temporary buffers). vjp_residual_bytes: bytes the VJP closure keeps between the forward and backward pass "
        "(saved activations plus the parameters it references); on XLA:CPU the temp size may not reflect "
        "rematerialisation, the residual bytes do.")
    for k, v in res["memory"].items():
        if isinstance(v, dict):
            print(f"memory {k}: {v}", flush=True)

    res["loadavg_end"] = list(os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sd_unet_{'tiny_' if args.tiny else ''}{backend}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
