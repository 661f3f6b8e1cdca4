"""LMAP-RPS and the three latent baselines on tiny random latent models with the real network code, under ``jit``.

Models (random weights, the library's own tiny configs; no checkpoint, no torch):

* **SD-shaped**: an :meth:`SDUNetConfig.tiny` text-conditioned UNet reduced to one level (cross-attention down and up
  blocks around the mid block), :meth:`AutoencoderConfig.tiny_kl` (f2, 4 latent channels, scale 0.18215), the
  scaled-linear schedule, classifier-free guidance on (``model.guided(cond, 1.5, uncond)`` with a 5-token caption and
  a 2-token empty prompt: two UNet calls per ``eps``), the decoded image clipped in the data fits.
* **LDM-shaped**: a one-level :class:`ADMConfig` UNet (unconditional, no learned variance, with attention) on the VQ
  first stage of :meth:`AutoencoderConfig.tiny_vq` (decode quantises, straight-through gradient), the LDM linear
  schedule, no clip.

Methods: LMAP-RPS (:func:`dp_sweep`: Stage 1 on latents, Stage 2 with the paper's latent DPS step), Latent-DPS
(:func:`dps` in the latent space), PSLD (:class:`PSLDStep` from noise, the LMAP-RPS code's variant) and ReSample
(:func:`resample`). For each: outputs finite with the right shapes (latents ``[B, 8, 8, C]``, images
``[B, 16, 16, 3]``); deterministic (the same key gives the bitwise-same output, another key another output); the
UNet, decoder and encoder calls counted by callbacks inside the networks (``tests/test_nfe_counted.py``'s pattern)
equal what ``dp_sweep`` / ``network_calls`` report, and the counts written out from the step counts (UNet:
``eps_calls`` = 2 with guidance, per diffusion step).

Time: XLA compilation dominates (about 10 programs holding a UNet forward + VJP and an autoencoder; image size and
step counts barely matter), about two minutes of one core; marked ``slow`` (``-m "not slow"`` deselects it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr
from mapreps_jax.networks.adm import ADMConfig, init_adm_params
from mapreps_jax.networks.autoencoder import AutoencoderConfig, init_autoencoder_params
from mapreps_jax.networks.latent import latent_score_model
from mapreps_jax.networks.sd_unet import SDUNetConfig, init_sd_unet_params
from call_counter import counted, counting_latent_model

pytestmark = pytest.mark.slow  # end-to-end runs on tiny networks (compilation dominates; module doc)

B, HW, K = 2, 16, 3  # batch, image size, diffusion steps of the baselines


def _counting(model):
    """``model`` whose UNet, decoder and encoder report every executed call (with its batch) to three counters."""
    return counting_latent_model(model, B)


def _sd():
    # one UNet level (cross-attention down and up blocks around the mid block): SD's block types at a fraction of the
    # compile time of the two-level SDUNetConfig.tiny()
    unet_cfg = SDUNetConfig.tiny(block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                                 up_block_types=("CrossAttnUpBlock2D",))
    ae_cfg = AutoencoderConfig.tiny_kl()
    m = latent_score_model(unet_cfg, init_sd_unet_params(jax.random.PRNGKey(0), unet_cfg), ae_cfg,
                           init_autoencoder_params(jax.random.PRNGKey(1), ae_cfg), mr.make_schedule("scaled_linear"),
                           name="sd-tiny")
    m, counters = _counting(m)
    rng = np.random.default_rng(0)
    cond = jnp.asarray(rng.normal(size=(5, unet_cfg.cross_attention_dim)), jnp.float32)   # a 5-token caption
    uncond = jnp.asarray(rng.normal(size=(2, unet_cfg.cross_attention_dim)), jnp.float32)  # the empty prompt
    return m.guided(cond, 1.5, uncond), counters, True, 4


def _ldm():
    unet_cfg = ADMConfig.tiny(image_size=8, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                              attention_resolutions=(8,), num_head_channels=16, in_channels=3,
                              use_scale_shift_norm=False, resblock_updown=False, learn_sigma=False)
    ae_cfg = AutoencoderConfig.tiny_vq()
    m = latent_score_model(unet_cfg, init_adm_params(jax.random.PRNGKey(2), unet_cfg), ae_cfg,
                           init_autoencoder_params(jax.random.PRNGKey(3), ae_cfg), mr.make_schedule("ldm_linear"),
                           name="ldm-tiny")
    m, counters = _counting(m)
    return m, counters, False, 3


@pytest.fixture(scope="module", params=["sd", "ldm"])
def setup(request):
    model, counters, clip, channels = (_sd if request.param == "sd" else _ldm)()
    x = jnp.tanh(jax.random.normal(jax.random.PRNGKey(4), (B, HW, HW, 3)))
    op = mr.make_operator("sr", (HW, HW, 3), factor=2, kind="avg")
    y = op.measure(jax.random.PRNGKey(5), x, 0.05)
    return dict(name=request.param, model=model, counters=counters, clip=clip, latent=(B, HW // 2, HW // 2, channels),
                op=op, y=y, x=x)


def _reset(counters):
    for c in counters:
        c.reset()


_counted = counted


def _subgrid_executed(t_start, n):
    """The times of the steps a K-step sub-grid run from t_start executes (written out: round(t_start (1 - k/(K-1))),
    steps whose successor is not earlier are skipped)."""
    times = [int(np.round(t_start * (1 - k / (n - 1)))) for k in range(n)]
    return [t for t, tn in zip(times, times[1:] + [-1]) if tn < t]


def _check_run(fn, counters, want_shape):
    """Run the jitted ``fn`` twice with one key and once with another: finite, shaped, bitwise deterministic, and
    the counted calls of one run; returns them."""
    _reset(counters)
    out = fn(jax.random.PRNGKey(7))
    out.block_until_ready()
    counted = _counted(counters)
    assert out.shape == want_shape, (out.shape, want_shape)
    assert bool(jnp.all(jnp.isfinite(out)))
    again = fn(jax.random.PRNGKey(7))
    assert np.array_equal(np.asarray(out), np.asarray(again))  # bitwise
    other = fn(jax.random.PRNGKey(8))
    assert not np.array_equal(np.asarray(out), np.asarray(other))
    return counted


def test_lmap_rps(setup):
    """LMAP-RPS (dp_sweep, Stage 1 once + Stage 2 per t0, both jitted inside): counted = nfe["calls"]."""
    s = setup
    m, counters = s["model"], s["counters"]
    cfg = mr.MAPConfig(t1=50.0, w=0.1, n_iter=3, lr=0.05)
    sampler = mr.DPSStep.official_latent(zeta=0.5, clip=s["clip"])
    t0s = [0, 4]
    _reset(counters)
    res = mr.dp_sweep(jax.random.PRNGKey(7), m, s["op"], s["y"], t0s, map_config=cfg, sampler=sampler)
    counted = _counted(counters)
    assert res.outputs.shape == (len(t0s), B, HW, HW, 3) and res.x_map.shape == (B, HW, HW, 3)
    assert bool(jnp.all(jnp.isfinite(res.outputs)))
    assert counted == res.nfe["calls"], (counted, res.nfe)
    # written out: 3 Stage-1 + 4 Stage-2 steps; one decoder per step, E(A_pinv y) once, D(x_map) and D(each output)
    steps = 3 + 4
    assert counted == {"unet": m.eps_calls * steps, "decoder": steps + 1 + len(t0s), "encoder": 1}
    assert m.eps_calls == (2 if s["name"] == "sd" else 1)
    again = mr.dp_sweep(jax.random.PRNGKey(7), m, s["op"], s["y"], t0s, map_config=cfg, sampler=sampler)
    assert np.array_equal(np.asarray(res.outputs), np.asarray(again.outputs))
    assert np.array_equal(np.asarray(res.x_map), np.asarray(again.x_map))


def test_latent_dps(setup):
    s = setup
    m, counters = s["model"], s["counters"]
    sampler = mr.DPSStep.official_latent(zeta=0.5, clip=s["clip"])
    fn = jax.jit(lambda k: mr.dps(k, m, s["op"], s["y"], sampler=sampler, n_steps=K))
    counted = _check_run(fn, counters, s["latent"])
    assert counted == mr.network_calls(m, sampler, stage2_steps=K)
    assert counted == {"unet": m.eps_calls * K, "decoder": K, "encoder": 0}


def test_psld(setup):
    s = setup
    m, counters = s["model"], s["counters"]
    sampler = mr.PSLDStep.official_lmap(zeta=0.5, gamma=0.1, sigma_y=0.05, clip=s["clip"])
    fn = jax.jit(lambda k: m.decode(mr.dps(k, m, s["op"], s["y"], sampler=sampler, n_steps=K)))
    counted = _check_run(fn, counters, (B, HW, HW, 3))
    assert counted == mr.network_calls(m, sampler, stage2_steps=K, decodes=1)
    assert counted == {"unet": m.eps_calls * K, "decoder": K + 1, "encoder": K}


def test_resample(setup):
    """ReSample on a K = 5 sub-grid with a hard-DC step every 2nd step (all in the last two thirds but the first)."""
    s = setup
    m, counters = s["model"], s["counters"]
    n, lat_it = 5, 2
    sampler = mr.ReSampleStep(every=2, pixel_iters=3, latent_iters=lat_it, clip=s["clip"])
    fn = jax.jit(lambda k: m.decode(mr.resample(k, m, s["op"], s["y"], sampler=sampler, n_steps=n)))
    counted = _check_run(fn, counters, (B, HW, HW, 3))
    times = _subgrid_executed(m.T - 1, n)  # 999, 749, 500, 250, 0
    assert mr.network_calls(m, sampler, stage2_times=[times], decodes=1) == counted
    n_dc = sum(1 for k, t in enumerate(times) if (k + 1) % 2 == 0 and t < 2 * m.T / 3)  # t = 749 and 250: only 250
    assert n_dc == 1
    assert counted == {"unet": m.eps_calls * len(times), "decoder": len(times) + lat_it * n_dc + 1, "encoder": n_dc}
