"""The guided-diffusion ("ADM", Dhariwal & Nichol 2021) UNet in Flax, numerically equal to the PyTorch original.

Layout: NHWC float32 images in [-1, 1]; ``t`` is the (integer or real) diffusion step fed to the sinusoidal
timestep embedding exactly as guided-diffusion does (no rescaling: the public checkpoints use 1000 steps).

Architecture (channels ``c = model_channels``, ``E = 4 c``; names mirror the PyTorch state-dict keys with ``.``
replaced by ``_`` so the converter in :mod:`mapreps_jax.networks.convert` is a renaming plus transposes):

* ``emb = time_embed_2(silu(time_embed_0(tau(t))))``, with ``tau(t) = [cos(t f), sin(t f)]``,
  ``f_k = exp(-log(10000) k / half)``, ``k = 0..half-1``, ``half = c // 2`` (zero-padded when ``c`` is odd).
* ``input_blocks_0_0``: 3x3 conv to ``channel_mult[0] * c``; then per level ``num_res_blocks`` ResBlocks
  (+ AttentionBlock where the resolution is in ``attention_resolutions``) and, except at the last level, a
  down-sampling block (a ResBlock with ``down=True`` when ``resblock_updown``, else ``Downsample``).
* ``middle_block``: ResBlock, AttentionBlock, ResBlock.
* ``output_blocks``: per level (reversed) ``num_res_blocks + 1`` ResBlocks on ``concat([h, skip])`` (+ attention),
  the last of each level (except level 0) followed by an up-sampling block.
* ``out``: GroupNorm, SiLU, 3x3 conv to ``out_channels`` (``2 out_channels`` when ``learn_sigma``).

ResBlock: ``h = conv(silu(GN(x)))`` (with nearest x2 up / 2x2 average-pool down of both ``h`` before the conv and
``x`` when ``up``/``down``); ``e = Dense(silu(emb))``; with scale-shift norm ``(scale, shift) = split(e)``,
``h = GN(h) (1 + scale) + shift``, else ``h = GN(h + e)``; ``h = conv(silu(h))``; ``out = skip(x) + h``.

GroupNorm: 32 groups, ``eps = 1e-5``, biased variance, computed in float32 (GroupNorm32).

AttentionBlock: ``qkv = W_qkv GN(x)`` (1x1 conv == Dense over channels), heads ``n = C // num_head_channels``
(or ``num_heads``), per head ``softmax((q s) . (k s)) v`` with ``s = ch^{-1/4}``, softmax in float32, and
``x + proj_out(a)``. The legacy order (``use_new_attention_order=False``, both public checkpoints) splits the
``3C`` qkv channels as ``[head][q|k|v][ch]``; the new order as ``[q|k|v][head][ch]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from ..diffusion import Schedule, make_schedule
from ..model import ScoreModel
from .conv import conv_general_dilated
from .config_dict import DictConfig

__all__ = [
    "ADMConfig",
    "ADMUNet",
    "timestep_embedding",
    "init_adm_params",
    "adm_apply",
    "adm_score_model",
    "count_params",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ADMConfig(DictConfig):
    """Static hyper-parameters of the ADM UNet (the guided-diffusion ``create_model`` arguments).

    Attributes:
      image_size: nominal input size (pixels); used only to turn ``attention_resolutions`` into down-sampling
        factors ``ds = image_size // res`` (the network itself accepts any size divisible by
        ``2 ** (len(channel_mult) - 1)``).
      in_channels: input image channels.
      model_channels: base width ``c``.
      out_channels: epsilon channels (the network outputs ``2 out_channels`` when ``learn_sigma``).
      num_res_blocks: ResBlocks per level (encoder; the decoder has one more).
      attention_resolutions: resolutions (pixels, e.g. ``(32, 16, 8)``) with self-attention.
      channel_mult: per-level width multipliers.
      num_heads: attention heads, used when ``num_head_channels == -1``.
      num_head_channels: channels per head (``-1``: use ``num_heads``).
      num_heads_upsample: heads in the decoder (``-1``: same as ``num_heads``; unused with ``num_head_channels``).
      use_scale_shift_norm: FiLM-style ``GN(h) (1 + scale) + shift`` time conditioning.
      resblock_updown: up/down-sample with ResBlocks instead of (conv) Upsample/Downsample.
      learn_sigma: also predict the learned-range variance channels.
      use_new_attention_order: ``False`` = legacy qkv split (both public checkpoints).
      conv_resample: 3x3 conv in Upsample / strided conv in Downsample (else nearest / average pool only).
      dropout: training-only; ignored (evaluation).
      num_groups: GroupNorm groups (32 in guided-diffusion).
      dtype: compute dtype of the UNet body, ``"float32"`` or ``"bfloat16"`` (params stay float32; GroupNorm,
        softmax, the time embedding and the output head are computed in float32, as guided-diffusion's fp16 mode).
      remat: wrap each block in ``jax.checkpoint`` (recompute activations on the backward pass).
    """

    NON_ARCHITECTURE = ("dtype", "remat", "dropout")  # DictConfig.architecture_dict leaves these out

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 3
    num_res_blocks: int = 1
    attention_resolutions: Tuple[int, ...] = (16,)
    channel_mult: Tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    learn_sigma: bool = True
    use_new_attention_order: bool = False
    conv_resample: bool = True
    dropout: float = 0.0
    num_groups: int = 32
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if self.dtype not in _DTYPES:
            raise ValueError(f"ADMConfig.dtype: expected one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "num_groups"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"ADMConfig.{name}: expected a positive int, got {v!r}")
        if len(self.channel_mult) < 1 or min(self.channel_mult) < 1:
            raise ValueError(f"ADMConfig.channel_mult: expected positive ints, got {self.channel_mult!r}")
        for r in self.attention_resolutions:
            if r < 1 or self.image_size % r:
                raise ValueError(f"ADMConfig.attention_resolutions: each must divide image_size={self.image_size}, "
                                 f"got {self.attention_resolutions!r}")
        for m in set(self.channel_mult):
            ch = m * self.model_channels
            if ch % self.num_groups:
                raise ValueError(f"ADMConfig: width {ch} (= {m} * model_channels) is not divisible by "
                                 f"num_groups={self.num_groups}")
            if self.num_head_channels != -1 and ch % self.num_head_channels:
                raise ValueError(f"ADMConfig: width {ch} is not divisible by num_head_channels="
                                 f"{self.num_head_channels}")
        if self.num_head_channels == -1 and self.num_heads < 1:
            raise ValueError(f"ADMConfig.num_heads: expected >= 1 when num_head_channels == -1, got {self.num_heads}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def ffhq256(cls, **overrides) -> "ADMConfig":
        """FFHQ 256 (``ffhq_10m.pt``, the DPS / MAP-RPS prior): 93.6M parameters."""
        kw = dict(image_size=256, in_channels=3, model_channels=128, out_channels=3, num_res_blocks=1,
                  attention_resolutions=(16,), channel_mult=(1, 1, 2, 2, 4, 4), num_heads=4, num_head_channels=64,
                  use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True, use_new_attention_order=False)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def imagenet256(cls, **overrides) -> "ADMConfig":
        """ImageNet 256 unconditional (``256x256_diffusion_uncond.pt``, guided-diffusion): 552.8M parameters."""
        kw = dict(image_size=256, in_channels=3, model_channels=256, out_channels=3, num_res_blocks=2,
                  attention_resolutions=(32, 16, 8), channel_mult=(1, 1, 2, 2, 4, 4), num_heads=4,
                  num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
                  use_new_attention_order=False)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def ldm_ffhq256(cls, **overrides) -> "ADMConfig":
        """The CompVis LDM FFHQ-256 latent UNet (``ffhq-ldm-vq-4``, on 64x64x3 VQ-f4 latents): 274.1M parameters.

        CompVis's ``openaimodel.UNetModel`` is guided-diffusion's UNet; its config gives ``attention_resolutions
        [8, 4, 2]`` as down-sampling factors, i.e. the resolutions 8, 16, 32 of a 64 input. No learned sigma, no
        scale-shift norm, conv up/down-sampling (not ResBlocks), legacy attention with 32 channels per head."""
        kw = dict(image_size=64, in_channels=3, model_channels=224, out_channels=3, num_res_blocks=2,
                  attention_resolutions=(8, 16, 32), channel_mult=(1, 2, 3, 4), num_heads=-1, num_head_channels=32,
                  use_scale_shift_norm=False, resblock_updown=False, learn_sigma=False,
                  use_new_attention_order=False, conv_resample=True)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, image_size: int = 16, model_channels: int = 32, channel_mult=(1, 2), num_res_blocks: int = 1,
             attention_resolutions=(8,), num_head_channels: int = 16, **overrides) -> "ADMConfig":
        """A small network with every block type (for tests and toy data)."""
        kw = dict(image_size=image_size, in_channels=3, model_channels=model_channels, out_channels=3,
                  num_res_blocks=num_res_blocks, attention_resolutions=tuple(attention_resolutions),
                  channel_mult=tuple(channel_mult), num_heads=4, num_head_channels=num_head_channels,
                  use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True)
        kw.update(overrides)
        return cls(**kw)

    # ------------------------------------------------------------------ derived
    @property
    def total_out_channels(self) -> int:
        return self.out_channels * (2 if self.learn_sigma else 1)

    @property
    def attention_ds(self) -> Tuple[int, ...]:
        """Down-sampling factors at which attention is applied (``image_size // res``)."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def min_size(self) -> int:
        """Input height/width must be a multiple of this (``2 ** (levels - 1)``)."""
        return 2 ** (len(self.channel_mult) - 1)


# ---------------------------------------------------------------------------------------------------------------
# building blocks


def timestep_embedding(t, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` of ``t`` (``[B]`` float), ``f_k = max_period^{-k/half}``."""
    t = jnp.asarray(t, jnp.float32)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm32(nn.Module):
    """GroupNorm computed in float32 (biased variance, ``eps``), result cast back to the input dtype."""

    num_groups: int = 32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        g = self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm32: channels {c} not divisible by num_groups {g}")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        shp = xf.shape
        xg = xf.reshape(shp[:-1] + (g, c // g))
        axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(shp)
        return (y * scale + bias).astype(x.dtype)


def _conv(features, name, dtype, kernel=3, stride=1):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, param_dtype=jnp.float32, name=name, conv_general_dilated=conv_general_dilated)


def _dense(features, name, dtype):
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _upsample_nearest(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avgpool2(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


class ResBlock(nn.Module):
    """Residual block with timestep conditioning (optionally up/down-sampling; see the module docstring)."""

    out_ch: int
    use_scale_shift_norm: bool
    up: bool = False
    down: bool = False
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        in_ch = x.shape[-1]
        h = nn.silu(GroupNorm32(self.num_groups, name="in_layers_0")(x))
        if self.up:
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        elif self.down:
            h, x = _avgpool2(h), _avgpool2(x)
        h = _conv(self.out_ch, "in_layers_2", self.dtype)(h)
        n_emb = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
        e = _dense(n_emb, "emb_layers_1", self.dtype)(nn.silu(emb)).astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = GroupNorm32(self.num_groups, name="out_layers_0")(h) * (1 + scale) + shift
        else:
            h = GroupNorm32(self.num_groups, name="out_layers_0")(h + e)
        h = _conv(self.out_ch, "out_layers_3", self.dtype)(nn.silu(h))
        if self.out_ch != in_ch:
            x = _conv(self.out_ch, "skip_connection", self.dtype, kernel=1)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with guided-diffusion's qkv layout (legacy or new head order)."""

    num_heads: int
    num_head_channels: int
    legacy_order: bool = True
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb=None):
        b, hh, ww, c = x.shape
        heads = self.num_heads if self.num_head_channels == -1 else c // self.num_head_channels
        if c % heads:
            raise ValueError(f"AttentionBlock: channels {c} not divisible by heads {heads}")
        ch = c // heads
        xs = x.reshape(b, hh * ww, c)
        qkv = _dense(3 * c, "qkv", self.dtype)(GroupNorm32(self.num_groups, name="norm")(xs))
        if self.legacy_order:
            qkv = qkv.reshape(b, hh * ww, heads, 3, ch)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        else:
            qkv = qkv.reshape(b, hh * ww, 3, heads, ch)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        s = 1.0 / math.sqrt(math.sqrt(ch))
        w = jnp.einsum("bthc,bshc->bhts", q * s, k * s)
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(w.dtype)
        a = jnp.einsum("bhts,bshc->bthc", w, v).reshape(b, hh * ww, c)
        h = _dense(c, "proj_out", self.dtype)(a)
        return (xs + h).reshape(b, hh, ww, c)


class Upsample(nn.Module):
    conv_resample: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb=None):
        x = _upsample_nearest(x)
        if self.conv_resample:
            x = _conv(x.shape[-1], "conv", self.dtype)(x)
        return x


class Downsample(nn.Module):
    conv_resample: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb=None):
        if self.conv_resample:
            return _conv(x.shape[-1], "op", self.dtype, stride=2)(x)
        return _avgpool2(x)


def _maybe_remat(cls, remat: bool):
    return nn.remat(cls) if remat else cls


class ADMUNet(nn.Module):
    """The guided-diffusion UNet: ``(x [B,H,W,in_channels], t [B] or scalar) -> [B,H,W,total_out_channels]``.

    Output float32 (the raw network output: ``eps`` in the first ``out_channels`` channels, then the learned-range
    variance channels ``v`` when ``learn_sigma``).
    """

    config: ADMConfig

    @nn.compact
    def __call__(self, x, t):
        cfg = self.config
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"ADMUNet: x must be [B, H, W, {cfg.in_channels}] (NHWC), got shape {x.shape}")
        b, hh, ww, _ = x.shape
        if hh % cfg.min_size or ww % cfg.min_size:
            raise ValueError(f"ADMUNet: x height/width must be multiples of {cfg.min_size}, got {(hh, ww)}")
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (b,))
        if t.shape != (b,):
            raise ValueError(f"ADMUNet: t must be a scalar or of shape ({b},), got shape {t.shape}")

        dt = cfg.compute_dtype
        c0 = cfg.model_channels
        emb_dim = 4 * c0
        emb = timestep_embedding(t, c0)
        emb = _dense(emb_dim, "time_embed_0", jnp.float32)(emb)
        emb = _dense(emb_dim, "time_embed_2", jnp.float32)(nn.silu(emb))

        Res = _maybe_remat(ResBlock, cfg.remat)
        Attn = _maybe_remat(AttentionBlock, cfg.remat)
        rkw = dict(use_scale_shift_norm=cfg.use_scale_shift_norm, num_groups=cfg.num_groups, dtype=dt)
        legacy = not cfg.use_new_attention_order
        nh_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample

        def attn(name, heads):
            return Attn(num_heads=heads, num_head_channels=cfg.num_head_channels, legacy_order=legacy,
                        num_groups=cfg.num_groups, dtype=dt, name=name)

        h = x.astype(dt)
        ch = int(cfg.channel_mult[0] * c0)
        h = _conv(ch, "input_blocks_0_0", dt)(h)
        hs = [h]
        ds = 1
        idx = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                ch = int(mult * c0)
                h = Res(out_ch=ch, name=f"input_blocks_{idx}_0", **rkw)(h, emb)
                if ds in cfg.attention_ds:
                    h = attn(f"input_blocks_{idx}_1", cfg.num_heads)(h)
                hs.append(h)
                idx += 1
            if level != len(cfg.channel_mult) - 1:
                if cfg.resblock_updown:
                    h = Res(out_ch=ch, down=True, name=f"input_blocks_{idx}_0", **rkw)(h, emb)
                else:
                    h = Downsample(cfg.conv_resample, dt, name=f"input_blocks_{idx}_0")(h)
                hs.append(h)
                idx += 1
                ds *= 2

        h = Res(out_ch=ch, name="middle_block_0", **rkw)(h, emb)
        h = attn("middle_block_1", cfg.num_heads)(h)
        h = Res(out_ch=ch, name="middle_block_2", **rkw)(h, emb)

        idx = 0
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                ch = int(mult * c0)
                j = 0
                h = Res(out_ch=ch, name=f"output_blocks_{idx}_{j}", **rkw)(h, emb)
                j += 1
                if ds in cfg.attention_ds:
                    h = attn(f"output_blocks_{idx}_{j}", nh_up)(h)
                    j += 1
                if level and i == cfg.num_res_blocks:
                    if cfg.resblock_updown:
                        h = Res(out_ch=ch, up=True, name=f"output_blocks_{idx}_{j}", **rkw)(h, emb)
                    else:
                        h = Upsample(cfg.conv_resample, dt, name=f"output_blocks_{idx}_{j}")(h)
                    ds //= 2
                idx += 1

        h = h.astype(jnp.float32)
        h = nn.silu(GroupNorm32(cfg.num_groups, name="out_0")(h))
        return _conv(cfg.total_out_channels, "out_2", jnp.float32)(h)


# ---------------------------------------------------------------------------------------------------------------
# functional API


def init_adm_params(key, config: ADMConfig, zero_init: bool = False):
    """Random parameters of :class:`ADMUNet` (float32 pytree with the converter's names and shapes).

    Kernels ``~ N(0, 1 / fan_in)`` (``fan_in`` = product of all but the last kernel dimension), biases 0, GroupNorm
    scales 1. With ``zero_init`` the residual-branch output convolutions (``out_layers_3``), attention ``proj_out``
    and the final ``out_2`` are zero, as in guided-diffusion's ``zero_module`` (the usual choice for training from
    scratch; the default random values make every block matter, which tests need).

    One normal draw for all kernels (cheap to trace; parameter shapes come from ``jax.eval_shape``).
    """
    shapes = param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [int(np.prod(leaf.shape)) if path[-1].key == "kernel" else 0 for path, leaf in flat]
    z = jax.random.normal(key, (max(sum(sizes), 1),), jnp.float32)
    leaves, off = [], 0
    for (path, leaf), n in zip(flat, sizes):
        names = [getattr(k, "key", str(k)) for k in path]
        if names[-1] == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            zero = zero_init and (names[-2] in ("out_layers_3", "proj_out") or names[0] == "out_2")
            w = z[off:off + n].reshape(leaf.shape) / math.sqrt(fan_in)
            leaves.append(jnp.zeros(leaf.shape, jnp.float32) if zero else w)
            off += n
        elif names[-1] == "scale":
            leaves.append(jnp.ones(leaf.shape, jnp.float32))
        else:
            leaves.append(jnp.zeros(leaf.shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def param_shapes(config: ADMConfig):
    """The parameter tree of :class:`ADMUNet` as ``jax.ShapeDtypeStruct`` leaves (no computation)."""
    s = config.min_size
    x = jax.ShapeDtypeStruct((1, s, s, config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(ADMUNet(config).init, jax.random.PRNGKey(0), x, t)["params"]


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def adm_apply(config: ADMConfig, params, x, t) -> jax.Array:
    """Raw network output ``[B, H, W, total_out_channels]`` (float32)."""
    return ADMUNet(config).apply({"params": params}, x, t)


@dataclasses.dataclass(frozen=True)
class _ADMApply:
    """Hashable ``apply(params, x_t, t, cond) -> eps`` or ``(eps, v)`` (static field of :class:`ScoreModel`;
    equal configs compare equal, so rebuilding a model with the same config does not retrace)."""

    config: ADMConfig

    def __call__(self, params, x_t, t, cond=None):
        out = adm_apply(self.config, params, x_t, t)
        c = self.config.out_channels
        if self.config.learn_sigma:
            return out[..., :c], out[..., c:]
        return out


def adm_score_model(config: ADMConfig, params, schedule: Optional[Schedule] = None,
                    name: str = "adm") -> ScoreModel:
    """Wrap ADM parameters into a :class:`~mapreps_jax.model.ScoreModel` (default: linear 1000-step schedule).

    With ``learn_sigma`` the model has ``learned_variance=True``: ``apply`` returns ``(eps, v)``, ``eps`` the first
    ``out_channels`` output channels and ``v`` the remaining ones (for :func:`~mapreps_jax.diffusion.learned_range_std`).
    ``cond`` is ignored (unconditional network).
    """
    if not isinstance(config, ADMConfig):
        raise TypeError(f"adm_score_model: config must be an ADMConfig, got {type(config).__name__}")
    if schedule is None:
        schedule = make_schedule("linear", T=1000)
    return ScoreModel(params=params, schedule=schedule, apply=_ADMApply(config),
                      learned_variance=bool(config.learn_sigma), name=name)


__all__ += ["param_shapes", "GroupNorm32", "ResBlock", "AttentionBlock", "Upsample", "Downsample"]
