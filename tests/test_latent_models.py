"""Latent models from a fresh conversion: ``mapreps convert sd`` / ``ldm-ffhq`` then ``mr.load_model`` (tiny configs).

* SD: a tiny diffusers ``AutoencoderKL`` + ``UNet2DConditionModel`` (+ ``DDPMScheduler``) saved with
  ``save_pretrained``, converted by the command line, loaded with :func:`mapreps_jax.load_model`; the loaded model's
  ``encode`` (posterior mean times the scale factor), ``decode``, ``eps`` on latents with a text embedding of a
  non-77 length, classifier-free guidance and ``alpha_bar`` are compared with diffusers run on the same inputs.
* LDM: a CompVis-layout checkpoint (``model.diffusion_model.*``, ``first_stage_model.*``, ``model_ema.*``, the schedule
  buffers) written with ``torch.save``, converted with and without ``--ema``; the loaded model equals the networks
  converted directly from the right weight set; a wrong schedule, a foreign key and missing EMA weights are refused.
* Then every algorithm runs on the loaded latent model (LMAP-RPS, DPS, RED-diff) and returns images.

Needs torch and diffusers (the optional reference, installed by ``.ci/install_torchref.sh``, imported by
``tests/torch_reference.py``): skipped without them, except with ``MAPREPS_REQUIRE_TORCHREF=1``.
"""

import json

import numpy as np
import pytest

from torch_reference import import_reference, nchw, nhwc, randomize, rel_err

pytestmark = pytest.mark.torchref

torch, _ = import_reference("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mapreps_jax as mr  # noqa: E402
from mapreps_jax.cli import main  # noqa: E402
from mapreps_jax.networks.adm import ADMConfig, adm_apply, init_adm_params  # noqa: E402
from mapreps_jax.networks.autoencoder import (AutoencoderConfig, autoencoder_decode, autoencoder_encode,  # noqa: E402
                                              autoencoder_expected_shapes, convert_compvis_first_stage)
from mapreps_jax.networks.convert import convert_adm_state_dict, flax_to_torch_state_dict  # noqa: E402

REL = 2e-5


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    root = tmp_path_factory.mktemp("sd_src")
    vae = randomize(AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8, sample_size=16,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2), 0).eval()
    unet = randomize(UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                          layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
                                          norm_num_groups=8,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), 1).eval()
    vae.save_pretrained(root / "vae", safe_serialization=True)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          num_train_timesteps=1000)
    sched.save_pretrained(root / "scheduler")
    dst = tmp_path_factory.mktemp("sd_out") / "sd-tiny"
    assert main(["convert", "sd", "--src", str(root), "--dst", str(dst)]) == 0
    return vae, unet, sched, root, dst


def test_convert_sd_then_load_model_equals_diffusers(sd):
    vae, unet, sched, root, dst = sd
    meta = json.loads((dst / "meta.json").read_text())
    assert meta["format"] == "mapreps-latent" and meta["kind"] == "sd15" and meta["unet"]["arch"] == "sd-unet"
    assert meta["schedule"]["kind"] == "scaled_linear" and meta["prediction_type"] == "epsilon"
    assert set(meta["sources"]) == {"vae/diffusion_pytorch_model.safetensors",
                                    "unet/diffusion_pytorch_model.safetensors"}
    m = mr.load_model(str(dst))
    assert not m.space.is_pixel
    rng = np.random.default_rng(0)
    x = np.tanh(rng.normal(size=(2, 16, 16, 3))).astype(np.float32)
    with jax.default_matmul_precision("highest"), torch.no_grad():
        post = vae.encode(nchw(x)).latent_dist
        z_ref = nhwc(post.mean) * vae.config.scaling_factor
        z = m.encode(jnp.asarray(x))
        assert rel_err(z, z_ref, dtype=np.float64) < REL
        x_ref = nhwc(vae.decode(nchw(z_ref) / vae.config.scaling_factor).sample)
        assert rel_err(m.decode(z), x_ref, dtype=np.float64) < REL
        # a key gives a sample: mean + std * noise, so it differs from the mean by O(std)
        zs = m.encode(jnp.asarray(x), jax.random.PRNGKey(0))
        std = nhwc(post.std) * vae.config.scaling_factor
        dev = (np.asarray(zs) - z_ref) / std
        assert 0.5 < float(np.std(dev)) < 1.5 and abs(float(np.mean(dev))) < 0.3
        ctx = rng.normal(size=(2, 7, 32)).astype(np.float32)   # 7 tokens, not 77
        unc = rng.normal(size=(2, 3, 32)).astype(np.float32)
        zt = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
        for t in (0, 417, 999):
            e_ref = nhwc(unet(nchw(zt), t, encoder_hidden_states=torch.from_numpy(ctx)).sample)
            assert rel_err(m.eps(jnp.asarray(zt), t, jnp.asarray(ctx)), e_ref, dtype=np.float64) < REL
        u_ref = nhwc(unet(nchw(zt), 417, encoder_hidden_states=torch.from_numpy(unc)).sample)
        c_ref = nhwc(unet(nchw(zt), 417, encoder_hidden_states=torch.from_numpy(ctx)).sample)
        g = m.guided(jnp.asarray(ctx), 1.5, jnp.asarray(unc))
        assert rel_err(g.eps(jnp.asarray(zt), 417), u_ref + 1.5 * (c_ref - u_ref), dtype=np.float64) < REL
    np.testing.assert_allclose(np.asarray(m.alpha_bar(jnp.arange(1000))), sched.alphas_cumprod.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="text embedding"):
        m.eps(jnp.asarray(zt), 3)


def test_convert_sd_refuses_bad_sources(sd, tmp_path, capsys):
    vae, unet, sched, root, dst = sd
    assert main(["convert", "sd", "--src", str(tmp_path), "--dst", str(tmp_path / "o")]) == 2
    assert "vae/" in capsys.readouterr().err
    assert main(["convert", "sd", "--src", str(root), "--dst", str(dst)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["convert", "sd", "--src", str(root), "--dst", str(dst), "--overwrite"]) == 0


def _ldm_configs():
    unet = ADMConfig.tiny(image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(4,), num_head_channels=16, in_channels=3, use_scale_shift_norm=False,
                          resblock_updown=False, learn_sigma=False)
    return unet, AutoencoderConfig.tiny_vq()


def _ldm_checkpoint(path, with_ema=True, schedule=None, extra=None):
    unet_cfg, ae_cfg = _ldm_configs()
    rng = np.random.default_rng(3)
    unet_sd = flax_to_torch_state_dict(init_adm_params(jax.random.PRNGKey(4), unet_cfg), unet_cfg)
    ema_sd = flax_to_torch_state_dict(init_adm_params(jax.random.PRNGKey(5), unet_cfg), unet_cfg)
    ae_sd = {k: rng.normal(size=s).astype(np.float32) / np.sqrt(max(int(np.prod(s[1:])), 1)) if len(s) > 1
             else (1.0 + 0.1 * rng.normal(size=s)).astype(np.float32)
             for k, s in autoencoder_expected_shapes(ae_cfg, "compvis").items()}
    sd = {f"model.diffusion_model.{k}": torch.from_numpy(np.array(v)) for k, v in unet_sd.items()}
    sd.update({f"first_stage_model.{k}": torch.from_numpy(v) for k, v in ae_sd.items()})
    if with_ema:
        sd.update({"model_ema." + ("diffusion_model" + k).replace(".", ""): torch.from_numpy(np.array(v))
                   for k, v in ema_sd.items()})
        sd["model_ema.decay"] = torch.tensor(0.9999)
    sched = mr.make_schedule(*(schedule or ("ldm_linear",)))
    sd["alphas_cumprod"] = torch.from_numpy(np.array(sched.alpha_bars, np.float32))
    sd["betas"] = torch.from_numpy(np.array(sched.betas, np.float32))
    sd.update(extra or {})
    torch.save({"state_dict": sd}, str(path))
    cfg_path = path.parent / "tiny_ldm.json"
    cfg_path.write_text(json.dumps({"unet": unet_cfg.to_dict(), "autoencoder": ae_cfg.to_dict()}))
    return unet_sd, ema_sd, ae_sd, cfg_path


@pytest.mark.parametrize("ema", [False, True])
def test_convert_ldm_then_load_model(tmp_path, ema):
    unet_cfg, ae_cfg = _ldm_configs()
    unet_sd, ema_sd, ae_sd, cfg_path = _ldm_checkpoint(tmp_path / "model.ckpt")
    dst = tmp_path / "ldm"
    args = ["convert", "ldm-ffhq", "--src", str(tmp_path / "model.ckpt"), "--config", str(cfg_path), "--dst", str(dst)]
    assert main(args + (["--ema"] if ema else [])) == 0
    m = mr.load_model(str(dst))
    assert json.loads((dst / "meta.json").read_text())["ema"] is ema
    unet_p = convert_adm_state_dict(ema_sd if ema else unet_sd, unet_cfg)
    ae_p = convert_compvis_first_stage(ae_sd, ae_cfg)
    rng = np.random.default_rng(6)
    x = jnp.asarray(np.tanh(rng.normal(size=(2, 16, 16, 3))), jnp.float32)
    z = m.encode(x)
    np.testing.assert_allclose(np.asarray(z), np.asarray(autoencoder_encode(ae_cfg, ae_p, x)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m.decode(z)), np.asarray(autoencoder_decode(ae_cfg, ae_p, z)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m.eps(z, 250)), np.asarray(adm_apply(unet_cfg, unet_p, z, 250)),
                               rtol=1e-6, atol=1e-6)
    other = convert_adm_state_dict(unet_sd if ema else ema_sd, unet_cfg)
    # the other weight set differs
    assert rel_err(m.eps(z, 250), adm_apply(unet_cfg, other, z, 250), dtype=np.float64) > 1e-2
    np.testing.assert_allclose(np.asarray(m.alpha_bar(jnp.arange(1000))),
                               np.asarray(mr.make_schedule("ldm_linear").alpha_bars), rtol=1e-6)


def test_convert_ldm_refuses_mismatches(tmp_path, capsys):
    _, _, _, cfg_path = _ldm_checkpoint(tmp_path / "lin.ckpt", schedule=("linear",))
    assert main(["convert", "ldm-ffhq", "--src", str(tmp_path / "lin.ckpt"), "--config", str(cfg_path),
                 "--dst", str(tmp_path / "a")]) == 2
    assert "alphas_cumprod" in capsys.readouterr().err
    _ldm_checkpoint(tmp_path / "extra.ckpt", extra={"cond_stage_model.w": torch.zeros(2)})
    assert main(["convert", "ldm-ffhq", "--src", str(tmp_path / "extra.ckpt"), "--config", str(cfg_path),
                 "--dst", str(tmp_path / "b")]) == 2
    assert "cond_stage_model.w" in capsys.readouterr().err
    _ldm_checkpoint(tmp_path / "noema.ckpt", with_ema=False)
    assert main(["convert", "ldm-ffhq", "--src", str(tmp_path / "noema.ckpt"), "--config", str(cfg_path),
                 "--dst", str(tmp_path / "c"), "--ema"]) == 2
    assert "model_ema" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_algorithms_run_on_a_loaded_latent_model(sd):
    """LMAP-RPS, Latent-DPS and latent RED-diff on the converted SD model: image outputs, finite, measured-consistent
    shapes, and the data fit through the decoder decreases over Stage 1."""
    vae, unet, sched, root, dst = sd
    m = mr.load_model(str(dst))
    rng = np.random.default_rng(1)
    x = jnp.asarray(np.tanh(rng.normal(size=(2, 16, 16, 3))), jnp.float32)
    op = mr.make_operator("sr", (16, 16, 3), factor=2, kind="avg")
    y = op.measure(jax.random.PRNGKey(0), x, 0.05)
    ctx = jnp.asarray(rng.normal(size=(5, 32)), jnp.float32)
    cfg = mr.MAPConfig(t1=50.0, w=0.1, n_iter=6, lr=0.05)
    z_map, info = mr.map_estimate_trace(jax.random.PRNGKey(1), m, op, y, config=cfg, cond=ctx)
    assert z_map.shape == (2, 8, 8, 4) and info.data_fit.shape == (6, 2)
    assert float(info.data_fit[-1].sum()) < float(info.data_fit[0].sum())
    out = mr.map_rps(jax.random.PRNGKey(2), m, op, y, 5, map_config=cfg, cond=ctx, sampler=mr.DPSStep(zeta=0.5))
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    assert mr.dps(jax.random.PRNGKey(3), m, op, y, cond=ctx, n_steps=3).shape == (2, 8, 8, 4)
    red = mr.red_diff(jax.random.PRNGKey(4), m, op, y, cond=ctx, config=mr.REDDiffConfig(n_steps=3))
    assert m.decode(red).shape == x.shape
