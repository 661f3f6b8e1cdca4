"""The Flax SD UNet (:mod:`mapreps_jax.networks.sd_unet`) without torch: shapes, context handling, strict conversion,
config validation, bf16 / remat / jit behaviour. Equality with diffusers is in ``test_sd_unet_torchref.py``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapreps_jax.networks.sd_unet import (SDUNetConfig, convert_diffusers_unet, init_sd_unet_params,
                                          sd_unet_apply, sd_unet_expected_shapes, sd_unet_param_shapes,
                                          sd_unet_to_diffusers_state_dict)

CFG = SDUNetConfig.tiny()
B, HW, L = 2, 16, 7


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(b))), 1e-30))


@pytest.fixture(scope="module")
def params():
    return init_sd_unet_params(jax.random.PRNGKey(0), CFG)


@pytest.fixture(scope="module")
def inputs():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    z = jax.random.normal(k1, (B, HW, HW, 4))
    ctx = jnp.broadcast_to(jax.random.normal(k2, (L, CFG.cross_attention_dim)), (B, L, CFG.cross_attention_dim))
    return z, jnp.float32(500.5), ctx  # one prompt for the batch (rows equal: see the broadcast test)


@pytest.fixture(scope="module")
def traced():
    return []


@pytest.fixture(scope="module")
def fwd(traced):
    def f(p, z, t, c):
        traced.append(1)
        return sd_unet_apply(CFG, p, z, t, c)

    return jax.jit(f)


@pytest.fixture(scope="module")
def eps(fwd, params, inputs):
    return np.asarray(fwd(params, *inputs))


def _shape(cfg, z_shape, t_shape, c_shape, params_shapes=None):
    p = params_shapes if params_shapes is not None else sd_unet_param_shapes(cfg)
    return jax.eval_shape(lambda p, z, t, c: sd_unet_apply(cfg, p, z, t, c), p,
                          jax.ShapeDtypeStruct(z_shape, jnp.float32), jax.ShapeDtypeStruct(t_shape, jnp.float32),
                          jax.ShapeDtypeStruct(c_shape, jnp.float32))


# ------------------------------------------------------------------------------------------------ forward pass


def test_output_shape_dtype_and_jit_does_not_retrace(fwd, params, inputs, eps, traced):
    assert eps.shape == (B, HW, HW, 4) and eps.dtype == np.float32
    assert np.all(np.isfinite(eps)) and np.std(eps) > 1e-2
    z, t, ctx = inputs
    n = len(traced)
    out2 = np.asarray(fwd(params, z + 0.5, jnp.float32(3.0), ctx * 2))  # same shapes, new values
    assert len(traced) == n == 1
    assert _rel(out2, eps) > 1e-3


def test_shapes_for_any_context_length_size_and_t_form():
    ps = sd_unet_param_shapes(CFG)
    d = CFG.cross_attention_dim
    for ll in (1, 77):
        for c_shape in ((B, ll, d), (ll, d), (1, ll, d)):
            out = _shape(CFG, (B, HW, HW, 4), (), c_shape, ps)
            assert out.shape == (B, HW, HW, 4) and out.dtype == jnp.float32
    for t_shape in ((), (1,), (B,)):
        assert _shape(CFG, (B, HW, HW, 4), t_shape, (B, L, d), ps).shape == (B, HW, HW, 4)
    assert _shape(CFG, (3, 8, 24, 4), (3,), (3, L, d), ps).shape == (3, 8, 24, 4)
    assert _shape(SDUNetConfig.sd15(), (1, 64, 64, 4), (), (1, 9, 768)).shape == (1, 64, 64, 4)


@pytest.mark.parametrize("z_shape,t_shape,c_shape,match", [
    ((B, 15, 16, 4), (), (B, L, 32), "multiples of 2"),
    ((B, 16, 16, 3), (), (B, L, 32), r"\[B, H, W, 4\]"),
    ((B, 16, 16, 4), (3,), (B, L, 32), "t must be"),
    ((B, 16, 16, 4), (), (B, L, 31), "context must be"),
    ((B, 16, 16, 4), (), (3, L, 32), "context must be"),
    ((B, 16, 16, 4), (), (B, 0, 32), "context must be"),
])
def test_bad_inputs_are_refused(z_shape, t_shape, c_shape, match):
    with pytest.raises(ValueError, match=match):
        _shape(CFG, z_shape, t_shape, c_shape)


def test_unbatched_context_broadcasts_like_batched(fwd, params, inputs, eps):
    """``[L, D]`` gives what ``[B, L, D]`` with that row repeated gives."""
    z, t, ctx = inputs
    a = np.asarray(fwd(params, z, t, ctx[0]))
    np.testing.assert_allclose(a, eps, rtol=0, atol=1e-5 * np.max(np.abs(eps)))


def test_bf16_close_to_fp32(params, inputs, eps):
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    out = np.asarray(jax.jit(lambda p, z, t, c: sd_unet_apply(cfg, p, z, t, c))(params, *inputs))
    assert out.dtype == np.float32
    err = _rel(out, eps)
    assert err < 0.1, err  # bf16 has 8 mantissa bits; measured 1.5e-2
    assert err > 0  # it really ran in bf16


def test_remat_gives_equal_outputs_and_input_gradients(inputs):
    """On a one-level config (every block type but the resamplers, compiled twice in half the time)."""
    z, t, ctx = inputs
    one = SDUNetConfig.tiny(block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                            up_block_types=("CrossAttnUpBlock2D",))
    params = init_sd_unet_params(jax.random.PRNGKey(2), one)
    g = jax.random.normal(jax.random.PRNGKey(5), z.shape)
    res = {}
    for remat in (False, True):
        cfg = dataclasses.replace(one, remat=remat)

        @jax.jit
        def vjp(p, z, c):
            out, pull = jax.vjp(lambda z: sd_unet_apply(cfg, p, z, t, c), z)
            return out, pull(g)[0]

        res[remat] = [np.asarray(a) for a in vjp(params, z, ctx)]
    for a, b in zip(res[True], res[False]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.max(np.abs(b)))


# ------------------------------------------------------------------------------------------------ parameters


def test_init_is_nonzero_everywhere_and_matches_the_shapes(params):
    shapes = sd_unet_param_shapes(CFG)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    for (path, s), p in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree_util.tree_leaves(params)):
        p = np.asarray(p)
        assert p.shape == s.shape and p.dtype == np.float32, path
        assert np.all(p != 0) and (p.size == 1 or np.std(p) > 0), path
    again = init_sd_unet_params(jax.random.PRNGKey(0), CFG)
    other = init_sd_unet_params(jax.random.PRNGKey(1), CFG)
    leaf = ("conv_in", "kernel")
    assert np.array_equal(params[leaf[0]][leaf[1]], again[leaf[0]][leaf[1]])
    assert not np.array_equal(params[leaf[0]][leaf[1]], other[leaf[0]][leaf[1]])


def test_sd15_parameter_count_and_key_layout():
    cfg = SDUNetConfig.sd15()
    n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(sd_unet_param_shapes(cfg)))
    assert n == 859_520_964
    shapes = sd_unet_expected_shapes(cfg)
    assert len(shapes) == 686
    assert shapes["conv_in.weight"] == (320, 4, 3, 3)
    assert shapes["time_embedding.linear_1.weight"] == (1280, 320)
    assert shapes["down_blocks.0.attentions.0.proj_in.weight"] == (320, 320, 1, 1)
    assert shapes["down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"] == (2560, 320)
    assert shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"] == (320,)
    assert shapes["down_blocks.1.resnets.0.conv_shortcut.weight"] == (640, 320, 1, 1)
    assert shapes["down_blocks.2.downsamplers.0.conv.weight"] == (1280, 1280, 3, 3)
    assert "down_blocks.3.downsamplers.0.conv.weight" not in shapes
    assert shapes["up_blocks.0.resnets.0.conv1.weight"] == (1280, 2560, 3, 3)
    assert shapes["up_blocks.3.resnets.0.conv1.weight"] == (320, 960, 3, 3)
    assert shapes["up_blocks.2.upsamplers.0.conv.weight"] == (640, 640, 3, 3)
    assert "up_blocks.3.upsamplers.0.conv.weight" not in shapes
    assert "up_blocks.0.attentions.0.norm.weight" not in shapes
    assert shapes["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == (1280, 1280)
    assert shapes["conv_out.weight"] == (4, 320, 3, 3)
    lin = sd_unet_expected_shapes(dataclasses.replace(cfg, use_linear_projection=True))
    assert lin["down_blocks.0.attentions.0.proj_out.weight"] == (320, 320)
    assert set(lin) == set(shapes)


def test_round_trip_through_diffusers_layout(params, eps, fwd, inputs):
    sd = sd_unet_to_diffusers_state_dict(params, CFG)
    assert {k: v.shape for k, v in sd.items()} == sd_unet_expected_shapes(CFG)
    back = convert_diffusers_unet(sd, CFG)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        assert np.array_equal(a, np.asarray(b))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    np.testing.assert_array_equal(np.asarray(fwd(back, *inputs)), eps)
    lin = dataclasses.replace(CFG, use_linear_projection=True)
    sd_lin = sd_unet_to_diffusers_state_dict(params, lin)  # same Flax tree, linear-layer layout
    assert sd_lin["down_blocks.0.attentions.0.proj_in.weight"].ndim == 2
    np.testing.assert_array_equal(sd_lin["down_blocks.0.attentions.0.proj_in.weight"][:, :, None, None],
                                  sd["down_blocks.0.attentions.0.proj_in.weight"])


def test_converter_lists_every_problem(params):
    sd = sd_unet_to_diffusers_state_dict(params, CFG)
    sd.pop("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.bias"] = np.zeros(32, np.float32)
    sd["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
    sd["conv_out.bias"] = np.zeros(4, np.int64)
    with pytest.raises(ValueError) as e:
        convert_diffusers_unet(sd, CFG)
    msg = str(e.value)
    assert "missing keys: down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in msg
    assert "unexpected keys: down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.bias" in msg
    assert "conv_in.weight (expected (32, 4, 3, 3), got (32, 4, 1, 1))" in msg
    assert "non-floating keys: conv_out.bias (int64)" in msg
    # a 1x1-conv proj_in given to a linear-projection config is mis-shaped
    good = sd_unet_to_diffusers_state_dict(params, CFG)
    with pytest.raises(ValueError, match=r"proj_in.weight \(expected \(32, 32\), got \(32, 32, 1, 1\)\)"):
        convert_diffusers_unet(good, dataclasses.replace(CFG, use_linear_projection=True))
    with pytest.raises(ValueError, match="unexpected"):
        bad = dict(params)
        bad["extra"] = {"kernel": np.zeros((1, 1))}
        sd_unet_to_diffusers_state_dict(bad, CFG)
    with pytest.raises(TypeError):
        convert_diffusers_unet(good, CFG.to_dict())


# ------------------------------------------------------------------------------------------------ config


def test_config_dict_round_trip_and_hashable():
    for cfg in (CFG, SDUNetConfig.sd15(), SDUNetConfig.tiny(attention_head_dim=[1, 2], dtype="bfloat16",
                                                             remat=True)):
        d = cfg.to_dict()
        assert SDUNetConfig.from_dict(d) == cfg and hash(SDUNetConfig.from_dict(d)) == hash(cfg)
        arch = cfg.architecture_dict()
        assert "dtype" not in arch and "remat" not in arch
        assert arch == dataclasses.replace(cfg, dtype="float32", remat=False).architecture_dict()
    assert SDUNetConfig.tiny(attention_head_dim=[1, 2]).heads_per_level == (1, 2)
    assert SDUNetConfig.sd15().heads_per_level == (8, 8, 8, 8) and SDUNetConfig.sd15().min_size == 8
    with pytest.raises(ValueError, match="unknown fields"):
        SDUNetConfig.from_dict({**CFG.to_dict(), "bogus": 1})


@pytest.mark.parametrize("overrides,field", [
    (dict(block_out_channels=(32, 60)), "norm_num_groups"),
    (dict(block_out_channels=()), "block_out_channels"),
    (dict(attention_head_dim=(2,)), "attention_head_dim"),
    (dict(attention_head_dim=3), "attention_head_dim"),
    (dict(attention_head_dim=0), "attention_head_dim"),
    (dict(down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D")), "down_block_types"),
    (dict(up_block_types=("UpBlock2D",)), "up_block_types"),
    (dict(dtype="float16"), "dtype"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(cross_attention_dim=1.5), "cross_attention_dim"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(use_linear_projection=1), "use_linear_projection"),
    (dict(transformer_layers_per_block=(1, 1)), "transformer_layers_per_block"),
    (dict(freq_shift=16), "freq_shift"),
    (dict(sample_size=-1), "sample_size"),
])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"SDUNetConfig\.{field}: expected .*, got"):
        SDUNetConfig.tiny(**overrides)


def test_only_cross_attention_not_implemented():
    with pytest.raises(NotImplementedError, match="only_cross_attention"):
        SDUNetConfig.tiny(only_cross_attention=True)
    with pytest.raises(NotImplementedError, match="only_cross_attention"):
        SDUNetConfig.from_diffusers({**_diffusers_tiny(), "only_cross_attention": [True, False]})


def _diffusers_tiny():
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "sample_size": 16,
            "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
            "attention_head_dim": 2, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "norm_num_groups": 8, "act_fn": "silu",
            "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
            "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4}


def test_from_diffusers_reads_sd15_style_configs():
    assert SDUNetConfig.from_diffusers(_diffusers_tiny()) == CFG
    # the SD 1.5 unet/config.json (diffusers 0.6-era keys; the rest take diffusers' defaults)
    sd15 = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
            "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
    assert SDUNetConfig.from_diffusers(sd15) == SDUNetConfig.sd15()
    assert SDUNetConfig.from_diffusers(sd15, dtype="bfloat16", remat=True) == SDUNetConfig.sd15(
        dtype="bfloat16", remat=True)
    # uniform per-level lists collapse; a tuple head count is kept
    d = {**_diffusers_tiny(), "layers_per_block": [1, 1], "attention_head_dim": [1, 2],
         "transformer_layers_per_block": [2, 2], "use_linear_projection": True}
    cfg = SDUNetConfig.from_diffusers(d)
    assert (cfg.layers_per_block, cfg.attention_head_dim, cfg.transformer_layers_per_block,
            cfg.use_linear_projection) == (1, (1, 2), 2, True)


@pytest.mark.parametrize("extra,match", [
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"num_class_embeds": 10}, "num_class_embeds"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"time_cond_proj_dim": 256}, "time_cond_proj_dim"),
    ({"num_attention_heads": 8}, "num_attention_heads"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"center_input_sample": True}, "center_input_sample"),
    ({"conv_in_kernel": 7}, "conv_in_kernel"),
    ({"layers_per_block": [1, 2]}, "layers_per_block"),
    ({"cross_attention_dim": [32, 64]}, "cross_attention_dim"),
    ({"encoder_hid_dim": 1024}, "encoder_hid_dim"),
    ({"some_future_option": 1}, "unknown keys"),
])
def test_from_diffusers_refuses_unimplemented_features(extra, match):
    with pytest.raises(ValueError, match=match):
        SDUNetConfig.from_diffusers({**_diffusers_tiny(), **extra})


def test_from_diffusers_lists_every_refusal():
    with pytest.raises(ValueError) as e:
        SDUNetConfig.from_diffusers({**_diffusers_tiny(), "class_embed_type": "timestep",
                                     "addition_embed_type": "text", "time_cond_proj_dim": 4})
    for key in ("class_embed_type", "addition_embed_type", "time_cond_proj_dim"):
        assert key in str(e.value)
