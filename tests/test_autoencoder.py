"""Flax first-stage autoencoders (no torch): shapes, the KL posterior and its samples, the VQ quantiser and its
straight-through gradient, strict conversion, config validation, bfloat16 and remat.

Equality with diffusers is in ``test_autoencoder_torchref.py``; here every check is against a property or an
independent numpy (float64) transcription of a block's equation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapreps_jax.networks import autoencoder as ae
from mapreps_jax.networks.autoencoder import (AutoencoderConfig, Downsample, MidAttention, Upsample,
                                              autoencoder_decode, autoencoder_encode, autoencoder_encode_moments,
                                              autoencoder_expected_shapes, autoencoder_param_shapes,
                                              autoencoder_to_diffusers_state_dict, convert_compvis_first_stage,
                                              convert_diffusers_autoencoder, init_autoencoder_params, vq_quantize)

KL = AutoencoderConfig.tiny_kl()
VQ = AutoencoderConfig.tiny_vq()
SIZE = 8  # images 8x8 -> latents 4x4 (f2): the cheapest shapes to compile and run


@pytest.fixture(scope="module")
def kl_params():
    return init_autoencoder_params(jax.random.PRNGKey(0), KL)


@pytest.fixture(scope="module")
def vq_params():
    return init_autoencoder_params(jax.random.PRNGKey(1), VQ)


def _x(b=2, size=SIZE, c=3, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (b, size, size, c), jnp.float32, -1.0, 1.0)


def _np(t):
    return jax.tree_util.tree_map(np.asarray, t)


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _np(a), _np(b))


# ----------------------------------------------------------------------------------------------------------------
# shapes, presets, parameters


def test_presets_downsample_factor_and_sizes():
    assert AutoencoderConfig.sd15().downsample_factor == 8
    assert AutoencoderConfig.ldm_vq_f4().downsample_factor == 4
    assert KL.downsample_factor == VQ.downsample_factor == 2
    count = lambda cfg: sum(int(np.prod(s)) for s in autoencoder_expected_shapes(cfg).values())
    assert count(AutoencoderConfig.sd15()) == 83_653_863  # diffusers' SD1.5 VAE
    assert count(AutoencoderConfig.ldm_vq_f4()) == 55_322_782  # CompVis VQ-f4
    v = AutoencoderConfig.ldm_vq_f4()
    assert (v.num_vq_embeddings, v.vq_embed_dim, v.latent_channels, v.scaling_factor) == (8192, 3, 3, 1.0)
    assert AutoencoderConfig.sd15().scaling_factor == 0.18215
    assert AutoencoderConfig.tiny_vq(vq_embed_dim=None).vq_embed_dim == 3  # defaults to latent_channels


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_shapes(kind, kl_params, vq_params):
    cfg, params = (KL, kl_params) if kind == "kl" else (VQ, vq_params)
    shapes = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), autoencoder_param_shapes(cfg))
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params) == shapes
    for leaf in jax.tree_util.tree_leaves(params):  # random and non-zero everywhere
        assert leaf.dtype == jnp.float32 and np.count_nonzero(np.asarray(leaf)) == leaf.size
    x = _x(b=2, size=SIZE)
    z = autoencoder_encode(cfg, params, x)
    c = cfg.latent_channels if kind == "kl" else cfg.vq_embed_dim
    assert z.shape == (2, SIZE // 2, SIZE // 2, c) and z.dtype == jnp.float32
    out = autoencoder_decode(cfg, params, z)
    assert out.shape == (2, SIZE, SIZE, cfg.out_channels) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def test_three_levels_and_rectangular_images():
    cfg = AutoencoderConfig(kind="kl", block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=2,
                            norm_num_groups=4, sample_size=16, in_channels=1, out_channels=2,
                            mid_block_add_attention=False)
    assert cfg.downsample_factor == 4
    assert not any("attentions" in k for k in autoencoder_expected_shapes(cfg))
    p = init_autoencoder_params(jax.random.PRNGKey(3), cfg)
    x = jax.random.uniform(jax.random.PRNGKey(4), (1, 4, 8, 1), jnp.float32, -1.0, 1.0)
    z = autoencoder_encode(cfg, p, x)
    assert z.shape == (1, 1, 2, 2)
    assert autoencoder_decode(cfg, p, z).shape == (1, 4, 8, 2)


def test_input_validation(kl_params, vq_params):
    with pytest.raises(ValueError, match="multiples of the downsample factor 2"):
        autoencoder_encode(KL, kl_params, jnp.zeros((1, 7, 8, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        autoencoder_encode(KL, kl_params, jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match=r"\[B, h, w, 4\]"):
        autoencoder_decode(KL, kl_params, jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="kind='kl'"):
        autoencoder_encode_moments(VQ, vq_params, _x())
    with pytest.raises(TypeError, match="AutoencoderConfig"):
        autoencoder_encode(dataclasses.asdict(KL), kl_params, _x())


# ----------------------------------------------------------------------------------------------------------------
# blocks against numpy transcriptions of their equations


def _gn(x, groups, eps=1e-6):
    shp = x.shape
    xg = x.reshape(shp[:-1] + (groups, shp[-1] // groups))
    axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
    m = xg.mean(axis=axes, keepdims=True)
    v = ((xg - m) ** 2).mean(axis=axes, keepdims=True)
    return ((xg - m) / np.sqrt(v + eps)).reshape(shp)


def _conv_ref(xp, w, b, stride):
    """Valid 3x3 convolution of the (already padded) NHWC ``xp`` with an HWIO kernel, float64."""
    n_out = (xp.shape[1] - 3) // stride + 1
    out = np.zeros((xp.shape[0], n_out, n_out, w.shape[-1])) + b
    for di in range(3):
        for dj in range(3):
            patch = xp[:, di:di + stride * (n_out - 1) + 1:stride, dj:dj + stride * (n_out - 1) + 1:stride]
            out += patch @ w[di, dj]
    return out


def test_blocks_match_numpy_equations():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 6, 8)).astype(np.float32)
    x64 = x.astype(np.float64)
    P = lambda m, seed: _np(jax.jit(m.init)(jax.random.PRNGKey(seed), x)["params"])
    with jax.default_matmul_precision("highest"):
        # Downsample: zero pad bottom/right by one, stride-2 3x3 conv without padding
        m = Downsample()
        p = P(m, 0)
        ref = _conv_ref(np.pad(x64, ((0, 0), (0, 1), (0, 1), (0, 0))), p["conv"]["kernel"], p["conv"]["bias"], 2)
        assert ref.shape == (2, 3, 3, 8)
        np.testing.assert_allclose(np.asarray(jax.jit(m.apply)({"params": p}, x)), ref, rtol=1e-5, atol=1e-5)

        # Upsample: nearest x2 (y[2i + a, 2j + b] = x[i, j]) then a 3x3 conv with padding 1
        m = Upsample()
        p = P(m, 1)
        up = np.zeros((2, 12, 12, 8))
        for a in range(2):
            for c in range(2):
                up[:, a::2, c::2] = x64
        ref = _conv_ref(np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0))), p["conv"]["kernel"], p["conv"]["bias"], 1)
        np.testing.assert_allclose(np.asarray(jax.jit(m.apply)({"params": p}, x)), ref, rtol=1e-5, atol=1e-5)

        # single-head attention: x + (softmax(q k^T / sqrt(C)) v) W_o + b_o, q, k, v from GN(x) (eps 1e-6)
        m = MidAttention(num_groups=4)
        p = jax.tree_util.tree_map(lambda a: a + 0.1 * rng.standard_normal(a.shape), P(m, 2))
        xs = x64.reshape(2, 36, 8)
        u = _gn(xs, 4) * p["group_norm"]["scale"] + p["group_norm"]["bias"]
        q, k, v = (u @ p[n]["kernel"] + p[n]["bias"] for n in ("to_q", "to_k", "to_v"))
        s = np.einsum("btc,bsc->bts", q, k) / np.sqrt(8)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ref = xs + np.einsum("bts,bsc->btc", a, v) @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]
        p32 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), p)
        np.testing.assert_allclose(np.asarray(jax.jit(m.apply)({"params": p32}, x)), ref.reshape(x.shape),
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# KL posterior


def test_encode_without_key_is_the_scaled_mean(kl_params):
    x = _x(b=2, seed=3)
    z1 = autoencoder_encode(KL, kl_params, x)
    z2 = autoencoder_encode(KL, kl_params, x)
    mean, logvar = autoencoder_encode_moments(KL, kl_params, x)
    np.testing.assert_array_equal(np.asarray(z1), np.asarray(z2))
    np.testing.assert_allclose(np.asarray(z1), KL.scaling_factor * np.asarray(mean), rtol=1e-6, atol=0)
    assert mean.shape == logvar.shape == (2, SIZE // 2, SIZE // 2, KL.latent_channels)


def test_encode_with_key_samples_the_posterior(kl_params):
    n = 1024
    x = _x(b=1, size=4)  # 4x4 images -> 2x2x4 latents: n encoder runs stay cheap
    mean, logvar = (np.asarray(a[0], np.float64) for a in autoencoder_encode_moments(KL, kl_params, x))
    std = np.exp(logvar / 2)
    keys = jax.random.split(jax.random.PRNGKey(11), n)  # a batch of keys: one per (repeated) image
    z = np.asarray(autoencoder_encode(KL, kl_params, jnp.repeat(x, n, axis=0), keys), np.float64)
    z /= KL.scaling_factor
    m_hat, s_hat = z.mean(0), z.std(0, ddof=1)
    # per element: the sample mean within 5 standard errors, the sample std within 5 of its standard errors
    assert np.all(np.abs(m_hat - mean) < 5 * std / np.sqrt(n)), np.max(np.abs(m_hat - mean) / (std / np.sqrt(n)))
    assert np.all(np.abs(s_hat / std - 1) < 5 / np.sqrt(2 * (n - 1)))
    assert np.min(std) > 1e-3 and np.ptp(std) > 0  # a non-degenerate posterior


def test_encode_uses_per_image_streams(kl_params):
    """One key: image i uses fold_in(key, i); a batch of keys: key i for image i, so an image's sample depends on
    its key only (not on the batch it is in)."""
    key = jax.random.PRNGKey(5)
    x = _x(b=2, seed=2)
    z = np.asarray(autoencoder_encode(KL, kl_params, x, key))
    keys = jnp.stack([jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)])
    np.testing.assert_array_equal(np.asarray(autoencoder_encode(KL, kl_params, x, keys)), z)
    z_rev = np.asarray(autoencoder_encode(KL, kl_params, x[::-1], keys[::-1]))
    np.testing.assert_allclose(z_rev[::-1], z, rtol=1e-5, atol=1e-6)
    mean = np.asarray(autoencoder_encode(KL, kl_params, x))
    assert not np.allclose(z, mean, atol=1e-3)
    assert not np.allclose(z, np.asarray(autoencoder_encode(KL, kl_params, x, jax.random.PRNGKey(6))), atol=1e-3)
    with pytest.raises(ValueError, match="one key per image"):
        autoencoder_encode(KL, kl_params, x, jax.random.split(key, 3))


def test_logvar_is_clipped(kl_params):
    c = KL.latent_channels
    for bias, expected in ((100.0, 20.0), (-100.0, -30.0)):
        p = jax.tree_util.tree_map(lambda a: a, kl_params)
        p["quant_conv"] = dict(p["quant_conv"], bias=p["quant_conv"]["bias"].at[c:].set(bias))
        _, logvar = autoencoder_encode_moments(KL, p, _x())
        np.testing.assert_array_equal(np.asarray(logvar), expected)


# ----------------------------------------------------------------------------------------------------------------
# VQ


def test_vq_quantize_picks_the_nearest_code(monkeypatch):
    rng = np.random.default_rng(0)
    cb = rng.standard_normal((200, 3)).astype(np.float32)
    z = (1.5 * rng.standard_normal((2, 5, 7, 3))).astype(np.float32)
    zst, idx = vq_quantize(cb, z)
    d = ((z.astype(np.float64)[..., None, :] - cb.astype(np.float64)) ** 2).sum(-1)  # brute force, float64
    assert idx.shape == (2, 5, 7) and idx.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(idx), d.argmin(-1))
    np.testing.assert_allclose(np.asarray(zst), cb[d.argmin(-1)], atol=1e-6)
    # the chunked path (distance matrices bounded by _DIST_BUDGET) gives the same indices
    monkeypatch.setattr(ae, "_DIST_BUDGET", 200 * 16)  # 16 rows at a time, 70 rows: 5 chunks with padding
    _, idx2 = vq_quantize(cb, z)
    np.testing.assert_array_equal(np.asarray(idx2), np.asarray(idx))
    # straight-through: the Jacobian of z -> z_st is the identity
    jac = jax.jacobian(lambda v: vq_quantize(cb, v)[0])(jnp.asarray(z[0, 0]))
    np.testing.assert_array_equal(np.asarray(jac).reshape(21, 21), np.eye(21))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        vq_quantize(cb, z[..., :2])


def test_vq_decode_straight_through(vq_params):
    """decode(z) = D(z + sg(z_q - z)): its value is the unquantised decoder at the codes z_q, and its gradient
    with respect to z is the unquantised decoder's gradient evaluated at z_q."""
    z = autoencoder_encode(VQ, vq_params, _x(b=2))
    cb = np.asarray(vq_params["quantize"]["embedding"])
    d = ((np.asarray(z, np.float64)[..., None, :] - cb) ** 2).sum(-1)
    assert len(np.unique(d.argmin(-1))) > 4  # several codes in use
    zq = jnp.asarray(cb[d.argmin(-1)] * VQ.scaling_factor)
    g = jax.random.normal(jax.random.PRNGKey(4), (2, SIZE, SIZE, 3))
    with jax.default_matmul_precision("highest"):
        val, grad = jax.jit(jax.value_and_grad(lambda v: jnp.sum(autoencoder_decode(VQ, vq_params, v) * g)))(z)
        val_q, grad_q = jax.jit(jax.value_and_grad(
            lambda v: jnp.sum(autoencoder_decode(VQ, vq_params, v, quantize=False) * g)))(zq)
    np.testing.assert_allclose(float(val), float(val_q), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_q), rtol=1e-4, atol=1e-5 * np.abs(grad_q).max())
    assert np.abs(np.asarray(grad)).max() > 0
    # and quantising does change the output (z is not already on the codes)
    out_nq = autoencoder_decode(VQ, vq_params, z, quantize=False)
    assert not np.allclose(np.asarray(out_nq), np.asarray(autoencoder_decode(VQ, vq_params, z)), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# conversion


@pytest.mark.parametrize("layout", ["diffusers", "compvis"])
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_conversion_round_trip(kind, layout, kl_params, vq_params):
    cfg, params = (KL, kl_params) if kind == "kl" else (VQ, vq_params)
    sd = autoencoder_to_diffusers_state_dict(params, cfg, layout=layout)
    assert {k: v.shape for k, v in sd.items()} == autoencoder_expected_shapes(cfg, layout)
    conv = convert_diffusers_autoencoder if layout == "diffusers" else convert_compvis_first_stage
    _assert_trees_equal(conv(sd, cfg), params)


def test_compvis_key_names():
    cv = autoencoder_expected_shapes(VQ, "compvis")
    for k in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
              "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.block_1.conv1.weight",
              "encoder.mid.block_2.norm2.bias", "encoder.mid.attn_1.norm.weight", "encoder.norm_out.bias",
              "decoder.up.1.block.1.conv2.weight", "decoder.up.1.upsample.conv.weight",
              "decoder.up.0.block.0.nin_shortcut.weight", "quant_conv.weight", "post_quant_conv.bias",
              "quantize.embedding.weight"):
        assert k in cv, k
    for n in ("q", "k", "v", "proj_out"):
        assert cv[f"decoder.mid.attn_1.{n}.weight"] == (64, 64, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in cv and "encoder.down.1.downsample.conv.weight" not in cv
    # CompVis up index is reversed: decoder level 0 (64 wide, first after mid) is CompVis up.1
    assert cv["decoder.up.1.block.0.conv1.weight"] == (64, 64, 3, 3)
    assert cv["decoder.up.0.block.0.conv1.weight"] == (32, 64, 3, 3)
    dk = autoencoder_expected_shapes(KL)
    assert dk["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"] == (32, 64, 1, 1)
    assert dk["encoder.mid_block.attentions.0.to_out.0.weight"] == (64, 64)


def test_strict_conversion_errors(kl_params, vq_params):
    sd = autoencoder_to_diffusers_state_dict(kl_params, KL)
    conv = lambda d: convert_diffusers_autoencoder(d, KL)

    d = dict(sd)
    del d["decoder.up_blocks.1.resnets.0.conv1.bias"]
    with pytest.raises(ValueError, match=r"missing keys: decoder\.up_blocks\.1\.resnets\.0\.conv1\.bias"):
        conv(d)
    with pytest.raises(ValueError, match=r"unexpected keys: encoder\.extra\.weight"):
        conv(dict(sd, **{"encoder.extra.weight": np.zeros(3, np.float32)}))
    d = dict(sd, **{"encoder.conv_in.weight": np.zeros((32, 3, 3, 2), np.float32)})
    with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight \(expected \(32, 3, 3, 3\), got \(32, 3, 3, 2\)\)"):
        conv(d)
    d = dict(sd, **{"quant_conv.bias": np.zeros(8, np.int64)})
    with pytest.raises(ValueError, match=r"non-floating keys: quant_conv\.bias \(int64\)"):
        conv(d)
    # every problem in one error
    d = dict(sd, **{"x": np.zeros(1, np.float32)})
    del d["encoder.conv_out.bias"]
    with pytest.raises(ValueError, match=r"missing keys: encoder\.conv_out\.bias; unexpected keys: x"):
        conv(d)
    # old and new attention names for one tensor
    d = dict(sd, **{"encoder.mid_block.attentions.0.query.weight": sd["encoder.mid_block.attentions.0.to_q.weight"]})
    with pytest.raises(ValueError, match=r"both the old and the new attention name: .*query\.weight"):
        conv(d)
    # the old names: linear or 1x1 conv weights (nothing else)
    d = dict(sd)
    w = d.pop("encoder.mid_block.attentions.0.to_out.0.weight")
    d["encoder.mid_block.attentions.0.proj_attn.weight"] = w[:, :, None, None]
    _assert_trees_equal(conv(d), kl_params)
    d["encoder.mid_block.attentions.0.proj_attn.weight"] = w[:, :, None]
    with pytest.raises(ValueError, match=r"proj_attn\.weight \(expected \(64, 64\) or \(64, 64, 1, 1\)"):
        conv(d)
    # VQ codebook
    sdv = autoencoder_to_diffusers_state_dict(vq_params, VQ)
    d = dict(sdv, **{"quantize.embedding.weight": np.zeros((128, 4), np.float32)})
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight \(expected \(128, 3\)"):
        convert_diffusers_autoencoder(d, VQ)
    with pytest.raises(ValueError, match=r"missing keys: quantize\.embedding\.weight"):
        convert_diffusers_autoencoder(sd, AutoencoderConfig.tiny_vq(latent_channels=4, vq_embed_dim=8))

    # CompVis: loss.* is skipped, the prefix is not stripped for you, diffusers names are not CompVis names
    cv = autoencoder_to_diffusers_state_dict(vq_params, VQ, layout="compvis")
    _assert_trees_equal(convert_compvis_first_stage(dict(cv, **{"loss.discriminator.w": np.zeros(2)}), VQ),
                        vq_params)
    with pytest.raises(ValueError, match="strip the 'first_stage_model.' prefix"):
        convert_compvis_first_stage({f"first_stage_model.{k}": v for k, v in cv.items()}, VQ)
    with pytest.raises(ValueError, match="unexpected keys"):
        convert_compvis_first_stage(sdv, VQ)
    with pytest.raises(ValueError, match="layout"):
        autoencoder_expected_shapes(VQ, "ldm")


# ----------------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("kw, field", [
    (dict(kind="ae"), "kind"),
    (dict(in_channels=0), "in_channels"),
    (dict(out_channels=2.0), "out_channels"),
    (dict(layers_per_block=True), "layers_per_block"),
    (dict(latent_channels=-1), "latent_channels"),
    (dict(block_out_channels=()), "block_out_channels"),
    (dict(block_out_channels=(32, 60)), "block_out_channels"),
    (dict(block_out_channels=32), "block_out_channels"),
    (dict(norm_num_groups=0), "norm_num_groups"),
    (dict(sample_size=0), "sample_size"),
    (dict(scaling_factor=0.0), "scaling_factor"),
    (dict(scaling_factor=float("nan")), "scaling_factor"),
    (dict(num_vq_embeddings=16), "num_vq_embeddings"),
    (dict(vq_embed_dim=3), "vq_embed_dim"),
    (dict(kind="vq"), "num_vq_embeddings"),
    (dict(kind="vq", num_vq_embeddings=8, vq_embed_dim=0), "vq_embed_dim"),
    (dict(mid_block_add_attention=1), "mid_block_add_attention"),
    (dict(dtype="float16"), "dtype"),
    (dict(remat="yes"), "remat"),
])
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=rf"AutoencoderConfig\.{field}: expected .*, got "):
        AutoencoderConfig.tiny_kl(**kw)


def test_config_dicts():
    for cfg in (KL, VQ, AutoencoderConfig.sd15(dtype="bfloat16", remat=True), AutoencoderConfig.ldm_vq_f4()):
        d = cfg.to_dict()
        assert isinstance(d["block_out_channels"], list)
        assert AutoencoderConfig.from_dict(d) == cfg
        a = cfg.architecture_dict()
        assert "dtype" not in a and "remat" not in a and a["kind"] == cfg.kind
    with pytest.raises(ValueError, match=r"unknown fields \['ch_mult'\]"):
        AutoencoderConfig.from_dict(dict(KL.to_dict(), ch_mult=[1, 2]))
    assert hash(KL) == hash(AutoencoderConfig.tiny_kl())


def test_from_diffusers():
    sd15_json = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
                 "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
                 "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
                 "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
    assert AutoencoderConfig.from_diffusers(sd15_json) == AutoencoderConfig.sd15()
    assert AutoencoderConfig.from_diffusers(dict(sd15_json, force_upcast=False, sample_size=[512, 512])) \
        == AutoencoderConfig.sd15()
    vq_json = {"_class_name": "VQModel", "block_out_channels": [128, 256, 512], "latent_channels": 3,
               "layers_per_block": 2, "num_vq_embeddings": 8192, "sample_size": 256,
               "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}
    cfg = AutoencoderConfig.from_diffusers(vq_json, "vq", scaling_factor=1.0)
    assert cfg == AutoencoderConfig.ldm_vq_f4()
    bad = [
        (dict(sd15_json, act_fn="gelu"), None, "act_fn"),
        (dict(sd15_json, down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]), None,
         "down_block_types"),
        (dict(sd15_json, shift_factor=0.1159), None, "shift_factor"),
        (dict(sd15_json, use_quant_conv=False), None, "use_quant_conv"),
        (dict(vq_json, norm_type="spatial"), None, "norm_type"),
        (sd15_json, "vq", "kind"),
        (dict(sd15_json, _class_name="UNet2DModel"), None, "_class_name"),
        ({k: v for k, v in sd15_json.items() if k != "_class_name"}, None, "kind"),
    ]
    for conf, kind, field in bad:
        with pytest.raises(ValueError, match=rf"from_diffusers: {field}: expected"):
            AutoencoderConfig.from_diffusers(conf, kind)


# ----------------------------------------------------------------------------------------------------------------
# bfloat16, remat


def test_bfloat16_close_to_float32(vq_params):
    """Loose bound: the body in bfloat16 (8-bit mantissa) through ~10 layers; measured ~1e-2 relative."""
    x = _x(b=2)
    cfg16 = dataclasses.replace(VQ, dtype="bfloat16")
    z32 = np.asarray(autoencoder_encode(VQ, vq_params, x))
    z16 = autoencoder_encode(cfg16, vq_params, x)
    assert z16.dtype == jnp.float32
    err = lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))
    assert err(z16, z32) < 5e-2
    out32 = np.asarray(autoencoder_decode(VQ, vq_params, z32, quantize=False))
    out16 = autoencoder_decode(cfg16, vq_params, z32, quantize=False)
    assert out16.dtype == jnp.float32
    assert err(out16, out32) < 5e-2
    assert err(out16, out32) > 0  # it did run in bfloat16


def test_remat_gives_identical_outputs_and_gradients(kl_params):
    """Same encoder and decoder outputs; same gradient of the decoder w.r.t. the latents (what the latent
    algorithms differentiate, and where remat saves memory)."""
    x = _x(b=2)
    cfg_r = dataclasses.replace(KL, remat=True)
    assert autoencoder_param_shapes(cfg_r) == autoencoder_param_shapes(KL)
    z = autoencoder_encode(KL, kl_params, x)
    np.testing.assert_allclose(np.asarray(autoencoder_encode(cfg_r, kl_params, x)), np.asarray(z), rtol=1e-6,
                               atol=1e-7)
    g = jax.random.normal(jax.random.PRNGKey(2), x.shape)

    def loss(cfg, v):
        return jnp.sum(autoencoder_decode(cfg, kl_params, v) * g)

    l0, g0 = jax.jit(jax.value_and_grad(lambda v: loss(KL, v)))(z)
    l1, g1 = jax.jit(jax.value_and_grad(lambda v: loss(cfg_r, v)))(z)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=1e-6 * float(np.abs(g0).max()))
