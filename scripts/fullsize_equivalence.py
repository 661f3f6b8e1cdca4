"""Full-size equivalence of the Flax networks with their PyTorch references, random weights, run once outside CI.

The tests (``tests/test_*_torchref.py``) prove the ports equal on tiny configurations; this script checks the real
architectures once, on this machine:

* ``sd_vae``: Stable Diffusion 1.5's VAE (``AutoencoderConfig.sd15()``) vs diffusers ``AutoencoderKL``: encode
  (posterior mean and log-variance of a ``--vae-image`` x ``--vae-image`` image, default 512) and decode (a
  ``--vae-latent`` x ``--vae-latent`` x 4 latent, default 64 -> a 512 x 512 image);
* ``sd_unet``: the SD 1.5 UNet (``SDUNetConfig.sd15()``) vs diffusers ``UNet2DConditionModel``: eps at two t, a
  64x64x4 latent, batch 1, a text context of length 9;
* ``ldm_unet``: the CompVis LDM FFHQ-256 latent UNet (``ADMConfig.ldm_ffhq256()``) vs deepinv's ``DiffUNet`` blocks
  wired for the config (``_ConfigurableReference`` of ``tests/test_adm_torchref.py``): eps at two t, 64x64x3, batch 1;
* ``vq_f4``: CompVis VQ-f4 (``AutoencoderConfig.ldm_vq_f4()``) vs diffusers ``VQModel``: a random CompVis-layout
  state dict converted (a) by ``convert_compvis_first_stage`` and (b) by diffusers' own ``convert_ldm_vae_checkpoint``
  (the oracle; ``quantize.embedding.weight`` copied by hand, as in the tests) and loaded into the ``VQModel``;
  encode a 256x256 image, quantise (are the code indices identical?) and decode.

Every reference parameter is randomised (weights ``N(0, 1/fan_in)``, biases ``0.1 N``, norm weights ``1 + 0.1 N``,
VQ codebook ``N(0, 1)``; ``tests/torch_reference.py``'s ``randomize`` / ``random_tensor``), so no layer is vacuous;
the Flax parameters come from the reference's state dict through the library's converters. float32 on both sides,
JAX under ``jax.default_matmul_precision("highest")``; error ``max |jax - torch| / max |torch|``. Each model is freed
before the next. Records per network the parameter count, the errors, the wall seconds, the peak RSS so far, plus the
CPU model and torch's thread count. Writes ``benchmarks/results/fullsize_equivalence.json`` (``..._tiny.json`` with
``--tiny``) atomically after every network; with ``--only`` the other networks' entries of an existing file are kept.

Usage::

    python scripts/fullsize_equivalence.py [--only sd_vae,sd_unet,ldm_unet,vq_f4] [--tiny] [--vae-image 512]
                                           [--vae-latent 64] [--out benchmarks/results/fullsize_equivalence.json]
"""

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
for _p in (ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")):
    sys.path.insert(0, _p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import (command_line, cpu_model, diffusers_autoencoder, diffusers_unet, rel_err,  # noqa: E402
                     write_json_atomic)
from torch_reference import nchw, nhwc, random_tensor, randomize  # noqa: E402  (imports torch lazily)

SECTIONS = ("sd_vae", "sd_unet", "ldm_unet", "vq_f4")
T_VALUES = (37.0, 640.0)
CONTEXT_LEN = 9


def _count(tree):
    return int(sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(tree)))


def _peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class _Timer:
    def __init__(self):
        self.times = {}

    def __call__(self, name, fn):
        t0 = time.perf_counter()
        out = fn()
        self.times[name] = time.perf_counter() - t0
        print(f"  {name}: {self.times[name]:.1f}s", flush=True)
        return out


def _state_dict_numpy(net, params_only=False):
    items = net.named_parameters() if params_only else net.state_dict().items()
    return {k: v.detach().numpy() for k, v in items}


# ------------------------------------------------------------------------------------------------------------------


def run_sd_vae(args, timer):
    import diffusers
    import torch

    from mapreps_jax.networks.autoencoder import (AutoencoderConfig, autoencoder_decode,
                                                  autoencoder_encode_moments, convert_diffusers_autoencoder)

    cfg = AutoencoderConfig.tiny_kl() if args.tiny else AutoencoderConfig.sd15()
    img = 32 if args.tiny else args.vae_image
    lat = 16 if args.tiny else args.vae_latent
    net = timer("build_reference", lambda: randomize(diffusers_autoencoder(diffusers, cfg), seed=11))
    params = timer("convert", lambda: convert_diffusers_autoencoder(_state_dict_numpy(net), cfg))
    n_ref = sum(p.numel() for p in net.parameters())
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, img, img, cfg.in_channels)).astype(np.float32)
    z = rng.standard_normal((1, lat, lat, cfg.latent_channels)).astype(np.float32)  # diffusion units
    f = cfg.scaling_factor

    def t_enc():
        with torch.no_grad():
            d = net.encode(nchw(x)).latent_dist
            return nhwc(d.mean), nhwc(d.logvar)

    def t_dec():
        with torch.no_grad():
            return nhwc(net.decode(nchw(z / f)).sample)

    with jax.default_matmul_precision("highest"):
        mean_ref, logvar_ref = timer("torch_encode", t_enc)
        mean, logvar = timer("jax_encode_incl_compile",
                             lambda: jax.block_until_ready(autoencoder_encode_moments(cfg, params, x)))
        out_ref = timer("torch_decode", t_dec)
        out = timer("jax_decode_incl_compile", lambda: jax.block_until_ready(autoencoder_decode(cfg, params, z)))
    res = {"config": "tiny_kl" if args.tiny else "sd15", "num_params": _count(params), "num_params_reference": n_ref,
           "encode_image": [1, img, img, cfg.in_channels], "decode_latent": [1, lat, lat, cfg.latent_channels],
           "decode_image": list(out_ref.shape),
           "inputs": "image ~ U(-1, 1); latent ~ N(0, 1) in diffusion units (the reference decodes latent / "
                     "scaling_factor)",
           "rel_err": {"encode_mean": rel_err(mean, mean_ref), "encode_logvar": rel_err(logvar, logvar_ref),
                       "decode": rel_err(out, out_ref)},
           "ref_max_abs": {"encode_mean": float(np.max(np.abs(mean_ref))),
                           "encode_logvar": float(np.max(np.abs(logvar_ref))),
                           "decode": float(np.max(np.abs(out_ref)))}}
    return res  # the models are freed on return (main then runs gc and jax.clear_caches)


def run_sd_unet(args, timer):
    import diffusers
    import torch

    from mapreps_jax.networks.sd_unet import SDUNetConfig, convert_diffusers_unet, sd_unet_apply

    cfg = SDUNetConfig.tiny() if args.tiny else SDUNetConfig.sd15()
    net = timer("build_reference", lambda: randomize(diffusers_unet(diffusers, cfg), seed=12))
    assert SDUNetConfig.from_diffusers(dict(net.config)) == cfg
    params = timer("convert", lambda: convert_diffusers_unet(_state_dict_numpy(net), cfg))
    n_ref = sum(p.numel() for p in net.parameters())
    size = 16 if args.tiny else 64
    rng = np.random.default_rng(1)
    z = rng.standard_normal((1, size, size, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((1, CONTEXT_LEN, cfg.cross_attention_dim)).astype(np.float32)
    fwd = jax.jit(lambda p, z, t, c: sd_unet_apply(cfg, p, z, t, c))
    res = {"config": "tiny" if args.tiny else "sd15", "num_params": _count(params), "num_params_reference": n_ref,
           "latent": list(z.shape), "context": list(ctx.shape), "t": list(T_VALUES),
           "inputs": "latent and context ~ N(0, 1)", "rel_err": {}, "ref_max_abs": {}}
    refs = {}
    with jax.default_matmul_precision("highest"):
        for t in T_VALUES:
            def t_fwd(t=t):
                with torch.no_grad():
                    return nhwc(net(nchw(z), torch.tensor([t]), torch.from_numpy(ctx)).sample)

            refs[t] = ref = timer(f"torch_eps_t{t:g}", t_fwd)
            out = timer(f"jax_eps_t{t:g}" + ("_incl_compile" if t == T_VALUES[0] else ""),
                        lambda t=t: jax.block_until_ready(fwd(params, z, jnp.array([t], jnp.float32), ctx)))
            res["rel_err"][f"eps_t{t:g}"] = rel_err(out, ref)
            res["ref_max_abs"][f"eps_t{t:g}"] = float(np.max(np.abs(ref)))
    res["reference_t_sensitivity"] = rel_err(refs[T_VALUES[0]], refs[T_VALUES[1]])  # > 0: t is not vacuous
    return res  # the models are freed on return (main then runs gc and jax.clear_caches)


def run_ldm_unet(args, timer):
    import torch

    from mapreps_jax.networks.adm import ADMConfig, adm_apply
    from mapreps_jax.networks.convert import convert_adm_state_dict
    from test_adm_torchref import _ConfigurableReference

    if args.tiny:  # the LDM options (no learned sigma, additive time embedding, conv resampling, head channels)
        cfg = ADMConfig.tiny(image_size=16, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8, 4),
                             num_heads=-1, num_head_channels=16, use_scale_shift_norm=False, resblock_updown=False,
                             learn_sigma=False, conv_resample=True)
    else:
        cfg = ADMConfig.ldm_ffhq256()
    net = timer("build_reference", lambda: randomize(_ConfigurableReference(cfg).eval(), seed=13))
    params = timer("convert", lambda: convert_adm_state_dict(_state_dict_numpy(net, params_only=True), cfg))
    n_ref = sum(p.numel() for p in net.parameters())
    size = cfg.image_size
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, size, size, cfg.in_channels)).astype(np.float32)
    fwd = jax.jit(lambda p, x, t: adm_apply(cfg, p, x, t))
    res = {"config": "tiny_ldm_like" if args.tiny else "ldm_ffhq256", "num_params": _count(params),
           "num_params_reference": n_ref, "input": list(x.shape), "t": list(T_VALUES), "inputs": "x ~ N(0, 1)",
           "rel_err": {}, "ref_max_abs": {}}
    refs = {}
    with jax.default_matmul_precision("highest"):
        for t in T_VALUES:
            def t_fwd(t=t):
                with torch.no_grad():
                    return nhwc(net.forward_diffusion(nchw(x), torch.tensor([t], dtype=torch.float32)))

            refs[t] = ref = timer(f"torch_eps_t{t:g}", t_fwd)
            out = timer(f"jax_eps_t{t:g}" + ("_incl_compile" if t == T_VALUES[0] else ""),
                        lambda t=t: jax.block_until_ready(fwd(params, x, jnp.array([t], jnp.float32))))
            assert out.shape == ref.shape == (1, size, size, cfg.out_channels), (out.shape, ref.shape)
            res["rel_err"][f"eps_t{t:g}"] = rel_err(out, ref)
            res["ref_max_abs"][f"eps_t{t:g}"] = float(np.max(np.abs(ref)))
    res["reference_t_sensitivity"] = rel_err(refs[T_VALUES[0]], refs[T_VALUES[1]])
    return res  # the models are freed on return (main then runs gc and jax.clear_caches)


def _near_ties(codebook, h, rel=1e-4):
    """Positions whose nearest and second-nearest codes are within ``rel`` (relative squared distance): the ones
    where float rounding could flip the choice. float64, chunked."""
    cb = codebook.astype(np.float64)
    e2 = np.sum(cb ** 2, axis=1)
    zf = h.reshape(-1, cb.shape[1]).astype(np.float64)
    n = 0
    for i in range(0, zf.shape[0], 512):
        zc = zf[i:i + 512]
        d = np.sum(zc ** 2, axis=1, keepdims=True) + e2[None] - 2 * zc @ cb.T
        two = np.partition(d, 1, axis=1)[:, :2]
        n += int(np.sum(two[:, 1] - two[:, 0] <= rel * np.maximum(np.abs(two[:, 0]), 1e-12)))
    return n


def run_vq_f4(args, timer):
    import importlib

    import diffusers
    import torch

    from mapreps_jax.networks.autoencoder import (AutoencoderConfig, autoencoder_decode, autoencoder_encode,
                                                  autoencoder_expected_shapes, convert_compvis_first_stage,
                                                  convert_diffusers_autoencoder, vq_quantize)

    sfu = importlib.import_module("diffusers.loaders.single_file_utils")
    cfg = AutoencoderConfig.tiny_vq() if args.tiny else AutoencoderConfig.ldm_vq_f4()
    img = 32 if args.tiny else 256
    g = torch.Generator().manual_seed(14)
    compvis = {k: random_tensor(k, s, g, unit_normal=("embedding.weight",)).numpy()
               for k, s in autoencoder_expected_shapes(cfg, "compvis").items()}
    n = len(cfg.block_out_channels)
    oracle_cfg = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    dsd = timer("oracle_convert_ldm_vae_checkpoint", lambda: sfu.convert_ldm_vae_checkpoint(
        {f"first_stage_model.{k}": v for k, v in compvis.items()}, oracle_cfg))
    codebook_mapped_by_oracle = "quantize.embedding.weight" in dsd
    dsd["quantize.embedding.weight"] = compvis["quantize.embedding.weight"]  # same name in both layouts
    params = timer("convert_compvis", lambda: convert_compvis_first_stage(compvis, cfg))
    p_oracle = convert_diffusers_autoencoder(dsd, cfg)
    same_params = all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), params, p_oracle)))
    net = diffusers_autoencoder(diffusers, cfg)
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in dsd.items()}, strict=True)
    n_ref = sum(p.numel() for p in net.parameters())
    f = cfg.scaling_factor
    x = np.random.default_rng(3).uniform(-1, 1, (1, img, img, cfg.in_channels)).astype(np.float32)
    codebook = np.asarray(params["quantize"]["embedding"])

    def t_enc():
        with torch.no_grad():
            h = net.encode(nchw(x)).latents
            _, _, (_, _, idx) = net.quantize(h)
            return nhwc(h), idx.numpy().reshape(-1)

    def t_dec(h, force_not_quantize):
        with torch.no_grad():
            return nhwc(net.decode(nchw(h), force_not_quantize=force_not_quantize).sample)

    with jax.default_matmul_precision("highest"):
        h_ref, idx_ref = timer("torch_encode_quantize", t_enc)
        z = timer("jax_encode_incl_compile", lambda: jax.block_until_ready(autoencoder_encode(cfg, params, x)))
        idx_jax = np.asarray(vq_quantize(codebook, jnp.asarray(z) / f)[1]).reshape(-1)
        idx_jax_on_ref = np.asarray(vq_quantize(codebook, jnp.asarray(h_ref))[1]).reshape(-1)
        # both decoders on the reference's latent: the decoder (and the quantiser inside it) alone
        out_ref = timer("torch_decode", lambda: t_dec(h_ref, False))
        out = timer("jax_decode_incl_compile",
                    lambda: jax.block_until_ready(autoencoder_decode(cfg, params, h_ref * f)))
        out_nq_ref = timer("torch_decode_no_quantize", lambda: t_dec(h_ref, True))
        out_nq = timer("jax_decode_no_quantize",
                       lambda: jax.block_until_ready(autoencoder_decode(cfg, params, h_ref * f, quantize=False)))
    res = {"config": "tiny_vq" if args.tiny else "ldm_vq_f4", "num_params": _count(params),
           "num_params_reference": n_ref, "image": list(x.shape), "latent": list(h_ref.shape),
           "inputs": "image ~ U(-1, 1); both decoders get the reference encoder's latent",
           "parameters_bit_identical_to_oracle_path": same_params,
           "oracle_maps_codebook": codebook_mapped_by_oracle,
           "rel_err": {"encode": rel_err(z, f * h_ref), "decode": rel_err(out, out_ref),
                       "decode_no_quantize": rel_err(out_nq, out_nq_ref)},
           "ref_max_abs": {"encode": float(np.max(np.abs(h_ref))), "decode": float(np.max(np.abs(out_ref)))},
           "code_indices": {
               "positions": int(idx_ref.size),
               "identical_on_reference_latent": bool(np.array_equal(idx_jax_on_ref, idx_ref)),
               "mismatches_on_reference_latent": int(np.sum(idx_jax_on_ref != idx_ref)),
               "identical_end_to_end": bool(np.array_equal(idx_jax, idx_ref)),
               "mismatches_end_to_end": int(np.sum(idx_jax != idx_ref)),
               "unique_codes_used": int(len(np.unique(idx_ref))),
               "near_ties_rel_1e-4": _near_ties(codebook, h_ref),
               "note": "identical_on_reference_latent: our quantiser vs diffusers' on the same latent (the one both "
                       "decoders get); end_to_end: our quantiser on our encoder's latent. near_ties: positions whose "
                       "two nearest codes are within 1e-4 relative squared distance (float64)."}}
    return res  # the models are freed on return (main then runs gc and jax.clear_caches)


RUNNERS = {"sd_vae": run_sd_vae, "sd_unet": run_sd_unet, "ldm_unet": run_ldm_unet, "vq_f4": run_vq_f4}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny configurations (a quick smoke check)")
    ap.add_argument("--vae-image", type=int, default=512, help="SD VAE encode image size (multiple of 8)")
    ap.add_argument("--vae-latent", type=int, default=64, help="SD VAE decode latent size (image = 8x)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        ap.error(f"--only: unknown {bad}; choose from {','.join(SECTIONS)}")
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"fullsize_equivalence{'_tiny' if args.tiny else ''}.json")

    command = command_line(argv)

    import torch

    from torchvision_shim import install_torchvision_shim

    install_torchvision_shim()
    import deepinv
    import diffusers

    torch.set_num_threads(os.cpu_count())
    res = {}
    if os.path.exists(out):  # keep the other networks' entries (runs with --only)
        with open(out) as fh:
            old = json.load(fh)
        if old.get("tiny") == args.tiny:
            res["networks"] = old.get("networks", {})
    res.update({"tiny": args.tiny, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                "versions": {"jax": jax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                             "deepinv": getattr(deepinv, "__version__", None)},
                "backend": jax.default_backend(),
                "precision": "float32 both sides; JAX under jax.default_matmul_precision('highest')",
                "error": "max|jax - torch| / max|torch|",
                "randomisation": "every reference parameter: weights N(0, 1/fan_in), biases 0.1 N, norm weights "
                                 "1 + 0.1 N, VQ codebook N(0, 1)",
                "command": command})
    res.setdefault("networks", {})
    for name in only:
        print(f"== {name}", flush=True)
        timer = _Timer()
        t0 = time.perf_counter()
        entry = RUNNERS[name](args, timer)
        gc.collect()
        entry.update({"wall_s": time.perf_counter() - t0, "times_s": timer.times,
                      "peak_rss_gib_so_far": _peak_rss_gib(), "loadavg_end": list(os.getloadavg()),
                      "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command})
        res["networks"][name] = entry
        print(f"  {name}: {entry['num_params']:,} params, rel_err {entry['rel_err']}, "
              f"{entry['wall_s']:.0f}s, peak RSS {entry['peak_rss_gib_so_far']:.1f} GiB", flush=True)
        if "code_indices" in entry:
            print(f"  code indices: {entry['code_indices']}", flush=True)
        write_json_atomic(out, res)
        jax.clear_caches()
        gc.collect()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
