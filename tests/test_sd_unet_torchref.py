"""Equivalence of the Flax SD UNet (:mod:`mapreps_jax.networks.sd_unet`) with diffusers' ``UNet2DConditionModel``.

Optional: needs ``torch`` (CPU wheel) and ``diffusers`` (imported by ``tests/torch_reference.py``); skipped otherwise,
except with ``MAPREPS_REQUIRE_TORCHREF=1``: then a missing reference is a collection error (CI cannot pass with it
skipped).

Tiny diffusers models with SD 1.5's block types (``CrossAttnDownBlock2D`` ... ``DownBlock2D`` / ``UpBlock2D`` ...
``CrossAttnUpBlock2D``), EVERY parameter randomised (weights ``N(0, 1/fan_in)``, biases ``0.1 N``, norm weights
``1 + 0.1 N``: no layer is vacuous), written with ``save_pretrained(safe_serialization=True)``; the safetensors file
is read back torch-free (``safetensors.numpy.load_file``), the ``config.json`` goes through
``SDUNetConfig.from_diffusers`` and the tensors through ``convert_diffusers_unet``. Both networks run in float32
(JAX with ``jax.default_matmul_precision("highest")``) on the same latents (batch 2), text context of length 7 (not
77) and several integer and real ``t``. Error measure ``max |jax - torch| / max |torch|``, per output and per
down/mid/up block (forward hooks) to localise a mismatch.

Achieved (CPU, float32, diffusers 0.42.1, torch 2.13): eps <= 2.1e-6 and every block <= 2.8e-6 over the three
configs (SD-like tiny; linear projections + 2 transformer layers + upcast; 3 levels with per-level head counts
(1, 2, 4), 2 layers per block, ``flip_sin_to_cos=False``, ``freq_shift=1``); integer t 1.6e-6; the
classifier-free-guidance combination ``eps_u + 7.5 (eps_c - eps_u)`` 1.9e-6; the VJP of ``<eps(z), g>`` w.r.t.
``z`` 1.5e-6. Asserted bound ``REL_TOL = 2e-5``.
"""

import json
import os
import re

import numpy as np
import pytest

from torch_reference import capture_block_outputs, import_reference, nchw, nhwc, randomize, rel_err

pytestmark = pytest.mark.torchref

torch, diffusers, safetensors_numpy = import_reference("diffusers", "safetensors.numpy")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mapreps_jax.networks.sd_unet import (SDUNet, SDUNetConfig, convert_diffusers_unet,  # noqa: E402
                                          sd_unet_apply, sd_unet_expected_shapes)

REL_TOL = 2e-5
L_CTX = 7
_BLOCK = re.compile(r"^(down_blocks_\d+|mid_block|up_blocks_\d+)$")

_TINY = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             cross_attention_dim=32, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)

CONFIGS = {
    "sd_like": dict(_TINY),
    "linear_proj": dict(_TINY, use_linear_projection=True, transformer_layers_per_block=2, upcast_attention=True),
    "tuple_heads": dict(_TINY, block_out_channels=(32, 64, 64), attention_head_dim=(1, 2, 4), layers_per_block=2,
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                        flip_sin_to_cos=False, freq_shift=1),
}


def _build(name, tmp_path, seed=1):
    """(diffusers net, SDUNetConfig from its config.json, Flax params from its safetensors file)."""
    net = randomize(diffusers.UNet2DConditionModel(**CONFIGS[name]).eval(), seed)
    out = os.path.join(str(tmp_path), name)
    net.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "config.json")) as f:
        cfg = SDUNetConfig.from_diffusers(json.load(f))
    sd = safetensors_numpy.load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    ref = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    assert set(sd) == set(ref)
    for k in ref:
        assert sd[k].dtype == np.float32 and np.array_equal(sd[k], ref[k]), k
    return net, cfg, convert_diffusers_unet(sd, cfg)


def _torch_run(net, z, t, ctx):
    """eps (NHWC) and per-block outputs ``{"down_blocks_i" | "mid_block" | "up_blocks_i": NHWC}``."""
    blocks = {f"down_blocks_{i}": m for i, m in enumerate(net.down_blocks)}
    blocks["mid_block"] = net.mid_block
    blocks.update({f"up_blocks_{i}": m for i, m in enumerate(net.up_blocks)})
    out, feats = capture_block_outputs(blocks, lambda: net(nchw(z), torch.as_tensor(t), torch.from_numpy(ctx)).sample)
    return nhwc(out), feats


def _jax_runner(cfg):
    def filt(mdl, method):
        return method == "__call__" and mdl.name is not None and _BLOCK.match(mdl.name) is not None

    @jax.jit
    def run(p, z, t, c):
        out, state = SDUNet(cfg).apply({"params": p}, z, t, c, capture_intermediates=filt, mutable=["intermediates"])
        feats = {}
        for k, v in state["intermediates"].items():
            o = v["__call__"][0]
            feats[k] = o[0] if isinstance(o, tuple) else o
        return out, feats

    def call(p, z, t, c):
        with jax.default_matmul_precision("highest"):
            out, feats = run(p, jnp.asarray(z), jnp.asarray(t), jnp.asarray(c))
        return np.asarray(out), {k: np.asarray(v) for k, v in feats.items()}

    return call


def _check(out, feats, ref_out, ref_feats, what):
    assert set(feats) == set(ref_feats)
    block_err = {k: rel_err(feats[k], ref_feats[k]) for k in ref_feats}
    assert max(block_err.values()) < REL_TOL, f"{what}: mismatching blocks: " + ", ".join(
        f"{k}: {v:.2e}" for k, v in sorted(block_err.items()))
    err = rel_err(out, ref_out)
    assert err < REL_TOL, f"{what}: eps relative error {err:.2e}"
    return err, max(block_err.values())


def _inputs(cfg, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch, 16, 16, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((batch, L_CTX, cfg.cross_attention_dim)).astype(np.float32)
    return rng, z, ctx


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_matches_diffusers(name, tmp_path):
    net, cfg, params = _build(name, tmp_path)
    assert cfg.architecture_dict() == SDUNetConfig(**{**CONFIGS[name], "only_cross_attention": False}
                                                   ).architecture_dict()
    _, z, ctx = _inputs(cfg)
    run = _jax_runner(cfg)
    for t in (np.array([0.0, 999.0], np.float32), np.array([1.0, 500.5], np.float32)):
        ref_out, ref_feats = _torch_run(net, z, t, ctx)
        out, feats = run(params, z, t, ctx)
        _check(out, feats, ref_out, ref_feats, f"{name} t={t}")
    # the output depends on t and on the context (neither branch is vacuous)
    assert rel_err(out, _torch_run(net, z, np.array([3.0, 3.0], np.float32), ctx)[0]) > 1e-3
    assert rel_err(out, _torch_run(net, z, t, ctx[::-1].copy())[0]) > 1e-3


def test_integer_t_and_cfg_combination(tmp_path):
    """Integer t (int64 in torch, int32 in JAX) and the classifier-free-guidance combination agree."""
    net, cfg, params = _build("sd_like", tmp_path, seed=3)
    rng, z, ctx_c = _inputs(cfg, seed=5)
    ctx_u = rng.standard_normal(ctx_c.shape).astype(np.float32)
    t_int = np.array([1, 999], np.int64)
    with torch.no_grad():
        ref_int = nhwc(net(nchw(z), torch.from_numpy(t_int), torch.from_numpy(ctx_c)).sample)
    with jax.default_matmul_precision("highest"):
        out_int = np.asarray(sd_unet_apply(cfg, params, z, jnp.asarray(t_int, jnp.int32), ctx_c))
    assert rel_err(out_int, ref_int) < REL_TOL, rel_err(out_int, ref_int)

    run = _jax_runner(cfg)
    s = 7.5
    t = np.array([500.5, 500.5], np.float32)
    eu, ec = run(params, z, t, ctx_u)[0], run(params, z, t, ctx_c)[0]
    ru, rc = _torch_run(net, z, t, ctx_u)[0], _torch_run(net, z, t, ctx_c)[0]
    guided, guided_ref = eu + s * (ec - eu), ru + s * (rc - ru)
    assert rel_err(rc - ru, ru) > 1e-2  # the conditional and unconditional predictions differ
    err = rel_err(guided, guided_ref)
    assert err < REL_TOL, err


def test_input_vjp_matches_torch_autograd(tmp_path):
    """The DPS pattern: the gradient of ``<eps(z, t, c), g>`` with respect to ``z``."""
    net, cfg, params = _build("sd_like", tmp_path, seed=4)
    rng, z, ctx = _inputs(cfg, seed=7)
    g = rng.standard_normal(z.shape[:3] + (cfg.out_channels,)).astype(np.float32)
    t = np.array([250.0, 731.25], np.float32)

    zt = nchw(z).requires_grad_(True)
    out = net(zt, torch.from_numpy(t), torch.from_numpy(ctx)).sample
    (gz_ref,) = torch.autograd.grad(out, zt, nchw(g))
    gz_ref = nhwc(gz_ref)

    @jax.jit
    def vjp(p, z, t, c, g):
        out, pull = jax.vjp(lambda z: sd_unet_apply(cfg, p, z, t, c), z)
        return out, pull(g)[0]

    with jax.default_matmul_precision("highest"):
        out_j, gz = vjp(params, jnp.asarray(z), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(g))
    assert rel_err(out_j, nhwc(out)) < REL_TOL
    err = rel_err(gz, gz_ref)
    assert err < REL_TOL, err
    assert float(np.max(np.abs(gz_ref))) > 1e-3


def test_sd15_state_dict_layout_matches_diffusers():
    """Every key and shape of the real SD 1.5 UNet (built on torch's meta device: no memory, no compute), its config
    through ``from_diffusers``, and the parameter count."""
    with torch.device("meta"):
        net = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    cfg = SDUNetConfig.from_diffusers(dict(net.config))
    assert cfg == SDUNetConfig.sd15()
    ref = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert sd_unet_expected_shapes(cfg) == ref
    assert sum(int(np.prod(s)) for s in ref.values()) == 859_520_964
