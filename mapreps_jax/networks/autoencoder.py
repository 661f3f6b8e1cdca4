"""First-stage autoencoders of latent diffusion models in Flax, numerically equal to the PyTorch references:
Stable Diffusion 1.5's ``AutoencoderKL`` (diffusers) and CompVis' VQ-f4 (``VQModel``, the first stage of LDM
FFHQ-256 ``ffhq-ldm-vq-4``).

Units and layout
----------------
Images are NHWC float in [-1, 1], ``[B, H, W, in_channels]`` with ``H, W`` multiples of the downsample factor
``f = 2 ** (len(block_out_channels) - 1)``. Latents are NHWC ``[B, H/f, W/f, C_z]`` (``C_z = latent_channels`` for
KL, ``vq_embed_dim`` for VQ) *times* ``scaling_factor`` (the units a latent diffusion model works in: 0.18215 for
SD1.5, 1.0 for the LDM VQ models); :func:`autoencoder_decode` divides by it. Outputs are float32.

Architecture (``c_l = block_out_channels[l]``, ``L`` levels, ``R = layers_per_block``, GroupNorm ``GN`` with
``norm_num_groups`` groups, ``eps = 1e-6``, biased variance, computed in float32; ``SiLU(x) = x sigmoid(x)``)
--------------------------------------------------------------------------------------------------------------
* ResnetBlock ``(x, C_out)``: ``h = conv3(SiLU(GN(x)))``, ``h = conv3(SiLU(GN(h)))`` (dropout 0, no time embedding),
  ``out = s(x) + h`` with ``s`` a 1x1 conv when ``C_in != C_out`` (diffusers ``conv_shortcut``, CompVis
  ``nin_shortcut``), else the identity (``output_scale_factor = 1``).
* Mid attention (single head over the ``C`` channels, ``T = h w`` tokens): ``u = GN(x)``, ``q, k, v = u W_q + b_q,
  u W_k + b_k, u W_v + b_v``, ``A = softmax(q k^T / sqrt(C))`` (row-wise over the keys, float32), ``out = x +
  (A v) W_o + b_o`` (residual connection, ``rescale_output_factor = 1``).
* Downsample: zero pad (top 0, bottom 1, left 0, right 1), then a stride-2 3x3 conv without padding.
  Upsample: nearest-neighbour x2 (``x[i, j] -> y[2i + a, 2j + b]``), then a 3x3 conv (padding 1).
* Encoder: ``conv_in`` (3x3 to ``c_0``); level ``l``: ``R`` ResnetBlocks to ``c_l``, then Downsample except at the
  last level; mid block = ResnetBlock, attention (``mid_block_add_attention``), ResnetBlock at ``c_{L-1}``;
  ``conv_norm_out`` (GN), SiLU, ``conv_out`` (3x3 to ``2 latent_channels`` for KL, ``latent_channels`` for VQ).
  Then ``quant_conv`` (1x1: ``2 latent_channels -> 2 latent_channels`` for KL, ``latent_channels -> vq_embed_dim``
  for VQ).
* KL posterior: ``(mean, logvar) = split(quant_conv(E(x)))`` on channels, ``logvar <- clip(logvar, -30, 20)``;
  ``std = exp(logvar / 2)``.
* VQ: ``q(z)_n = e_{k(n)}``, ``k(n) = argmin_k ||z_n - e_k||^2`` over the ``num_vq_embeddings`` codebook rows
  ``e_k`` (squared Euclidean distance, evaluated as ``||e_k||^2 - 2 <z_n, e_k>`` in float32 at HIGHEST matmul
  precision; ties go to the lowest index), with the straight-through estimator ``z + stop_gradient(q(z) - z)``
  (value ``q(z)`` up to float rounding, gradient the identity): the estimator of diffusers'
  ``VectorQuantizer.forward`` (``z + (z_q - z).detach()``).
* Decoder: ``post_quant_conv`` (1x1: ``latent_channels -> latent_channels`` for KL, ``vq_embed_dim ->
  latent_channels`` for VQ); ``conv_in`` (3x3 to ``c_{L-1}``); mid block as in the encoder; level ``i = 0..L-1``
  of ``up_blocks`` works at width ``c_{L-1-i}``: ``R + 1`` ResnetBlocks, then Upsample except at the last;
  ``conv_norm_out`` (GN), SiLU, ``conv_out`` (3x3 to ``out_channels``).

Public functions:

* ``autoencoder_encode(cfg, params, x, key=None)``: KL: ``s mean`` without a key; with a key the sample
  ``s (mean + std * eps)``, ``eps`` standard normal drawn per image with the library's per-image streams
  (:mod:`mapreps_jax.rng`: one key -> image ``i`` uses ``fold_in(key, i)``; or a ``[B]`` batch of keys, one per image),
  so image ``i``'s noise does not depend on the batch it is in. VQ: the pre-quantisation latents ``s
  quant_conv(E(x))`` (``key`` ignored). ``s = scaling_factor``.
* ``autoencoder_encode_moments(cfg, params, x)``: ``(mean, logvar)`` unscaled (KL only).
* ``autoencoder_decode(cfg, params, z, quantize=True)``: ``D(post_quant_conv(q(z / s)))``; ``q`` is the
  straight-through quantiser for VQ (the identity with ``quantize=False``, diffusers' ``force_not_quantize``) and the
  identity for KL (``quantize`` is ignored).

``dtype`` (compute dtype): ``"bfloat16"`` runs the encoder/decoder bodies (convolutions, attention matmuls) in
bfloat16; parameters stay float32, GroupNorm and softmax are computed in float32, and the output heads
(``conv_norm_out``, ``conv_out``, ``quant_conv``, ``post_quant_conv``) and the quantiser run in float32. ``remat``
wraps every ResnetBlock, attention block and resampler in ``nn.remat`` (same numbers, less activation memory).

Parameter tree and key mapping
------------------------------
Flax module names are the diffusers module paths with ``.N`` written ``_N``::

    params["encoder"]["down_blocks_0"]["resnets_1"]["norm1"]["scale"]
        <-> encoder.down_blocks.0.resnets.1.norm1.weight
    params["decoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"]
        <-> decoder.mid_block.attentions.0.to_out.0.weight
    params["quantize"]["embedding"]  <->  quantize.embedding.weight

Tensor layouts: conv ``[O, I, kh, kw] -> [kh, kw, I, O]``; linear ``[O, I] -> [I, O]``; GroupNorm ``weight ->
scale``, ``bias`` unchanged; codebook ``[K, D]`` unchanged.

diffusers <-> CompVis (``first_stage_model.`` prefix removed; ``L`` levels)::

    {enc,dec}oder.conv_in / conv_out             {enc,dec}oder.conv_in / conv_out
    {enc,dec}oder.conv_norm_out                  {enc,dec}oder.norm_out
    encoder.down_blocks.i.resnets.j.<p>          encoder.down.i.block.j.<p>     (conv_shortcut -> nin_shortcut)
    encoder.down_blocks.i.downsamplers.0.conv    encoder.down.i.downsample.conv
    decoder.up_blocks.i.resnets.j.<p>            decoder.up.(L-1-i).block.j.<p> (CompVis numbers levels bottom-up)
    decoder.up_blocks.i.upsamplers.0.conv        decoder.up.(L-1-i).upsample.conv
    *.mid_block.resnets.0 / resnets.1            *.mid.block_1 / block_2
    *.mid_block.attentions.0.group_norm          *.mid.attn_1.norm
    *.mid_block.attentions.0.to_q/to_k/to_v      *.mid.attn_1.q/k/v            (1x1 Conv2d [O, I, 1, 1])
    *.mid_block.attentions.0.to_out.0            *.mid.attn_1.proj_out         (1x1 Conv2d [O, I, 1, 1])
    quant_conv, post_quant_conv, quantize.embedding.weight: same names

Older diffusers VAE checkpoints (e.g. SD1.x ``vae/`` folders saved before diffusers renamed its attention
parameters) name the attention ``query/key/value/proj_attn`` instead of ``to_q/to_k/to_v/to_out.0``;
:func:`convert_diffusers_autoencoder` accepts those names too, with linear ``[O, I]`` or 1x1-conv ``[O, I, 1, 1]``
weights (both names for one tensor is an error).

Strict conversion: the expected keys and shapes derive from the Flax parameter tree (``jax.eval_shape`` of the
init), so every missing, unexpected, mis-shaped or non-floating tensor is reported in one ``ValueError`` (expected
vs given). The only keys skipped without error are, in the CompVis layout, those starting with
:data:`COMPVIS_IGNORED_PREFIXES` (``loss.``: the LPIPS/discriminator training loss saved in standalone first-stage
checkpoints, not part of the autoencoder). diffusers' ``AutoencoderKL`` / ``VQModel`` state dicts hold parameters
only (no buffers), so nothing is skipped in that layout.

Measured equality (``tests/test_autoencoder_torchref.py``: tiny configs, every reference parameter randomised,
CPU float32, ``jax.default_matmul_precision("highest")``; error ``max |jax - torch| / max |torch|``):
KL encode mean 1.0e-6, logvar 1.1e-6, decode 1.7e-6, decode VJP 2.3e-6 (8.3e-7 on inputs small enough that the
GroupNorm eps matters at O(1)); VQ encode 2.3e-6, decode 1.8e-6 with identical code indices, decode without
quantising 2.7e-6, straight-through gradient 2.5e-6; a random CompVis-layout state dict converts to parameters
bit-identical to diffusers' ``convert_ldm_vae_checkpoint`` and gives outputs within 4.3e-6. Asserted bound 2e-5.
bfloat16 compute against float32 (tiny configs): ~1.5e-2 relative (``tests/test_autoencoder.py`` asserts 5e-2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import rng as _rng
from .adm import GroupNorm32
from .config_dict import DictConfig
from .conv import conv_general_dilated
from .layouts import (fmt_list, is_float_array, path_names, set_path, to_flax, to_torch_state_dict,
                      torch_shape)

__all__ = [
    "AutoencoderConfig",
    "init_autoencoder_params",
    "autoencoder_param_shapes",
    "autoencoder_encode",
    "autoencoder_encode_moments",
    "autoencoder_decode",
    "vq_quantize",
    "convert_diffusers_autoencoder",
    "convert_compvis_first_stage",
    "autoencoder_expected_shapes",
    "autoencoder_to_diffusers_state_dict",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_KINDS = ("kl", "vq")
_EPS = 1e-6  # GroupNorm eps of every norm in both references (diffusers resnet_eps / CompVis Normalize)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

#: CompVis-layout key prefixes that :func:`convert_compvis_first_stage` skips (training-loss modules).
COMPVIS_IGNORED_PREFIXES: Tuple[str, ...] = ("loss.",)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(DictConfig):
    """Static hyper-parameters of a first-stage autoencoder (names follow diffusers' ``config.json``).

    Attributes:
      kind: ``"kl"`` (``AutoencoderKL``: Gaussian posterior) or ``"vq"`` (``VQModel``: codebook quantiser).
      in_channels / out_channels: image channels of the encoder input / decoder output.
      block_out_channels: width of each level (``len`` = number of levels ``L``; downsample factor ``2**(L-1)``).
      layers_per_block: ResnetBlocks per encoder level (the decoder has one more per level).
      latent_channels: encoder output / decoder input channels (``z_channels`` in CompVis).
      norm_num_groups: GroupNorm groups (must divide every width).
      sample_size: nominal image size (metadata only; the networks accept any multiple of the downsample factor).
      scaling_factor: latents are ``scaling_factor * z`` (0.18215 for SD1.5, 1.0 for the LDM VQ models).
      num_vq_embeddings: codebook size (VQ only; ``None`` for KL).
      vq_embed_dim: codebook vector dimension (VQ only; defaults to ``latent_channels``; ``None`` for KL).
      mid_block_add_attention: self-attention in the encoder's and decoder's mid blocks.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (params float32; norms, softmax, heads in float32).
      remat: wrap every block in ``nn.remat``.
    """

    kind: str = "kl"
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    num_vq_embeddings: Optional[int] = None
    vq_embed_dim: Optional[int] = None
    mid_block_add_attention: bool = True
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        def bad(field, expected, got):
            raise ValueError(f"AutoencoderConfig.{field}: expected {expected}, got {got!r}")

        if self.kind not in _KINDS:
            bad("kind", f"one of {list(_KINDS)}", self.kind)
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                     "sample_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                bad(name, "a positive int", v)
            object.__setattr__(self, name, int(v))
        boc = self.block_out_channels
        if isinstance(boc, (str, bytes)) or not hasattr(boc, "__iter__"):
            bad("block_out_channels", "a non-empty sequence of positive ints", boc)
        boc = tuple(boc)
        if not boc or not all(_is_int(c) and c >= 1 for c in boc):
            bad("block_out_channels", "a non-empty sequence of positive ints", boc)
        boc = tuple(int(c) for c in boc)
        object.__setattr__(self, "block_out_channels", boc)
        for c in boc:
            if c % self.norm_num_groups:
                bad("block_out_channels", f"widths divisible by norm_num_groups={self.norm_num_groups}", boc)
        sf = self.scaling_factor
        if isinstance(sf, (bool, np.bool_)) or not isinstance(sf, (int, float, np.floating, np.integer)) \
                or not math.isfinite(float(sf)) or float(sf) <= 0:
            bad("scaling_factor", "a finite positive float", sf)
        object.__setattr__(self, "scaling_factor", float(sf))
        if self.kind == "kl":
            if self.num_vq_embeddings is not None:
                bad("num_vq_embeddings", "None for kind='kl'", self.num_vq_embeddings)
            if self.vq_embed_dim is not None:
                bad("vq_embed_dim", "None for kind='kl'", self.vq_embed_dim)
        else:
            if not _is_int(self.num_vq_embeddings) or self.num_vq_embeddings < 1:
                bad("num_vq_embeddings", "a positive int for kind='vq'", self.num_vq_embeddings)
            object.__setattr__(self, "num_vq_embeddings", int(self.num_vq_embeddings))
            if self.vq_embed_dim is None:
                object.__setattr__(self, "vq_embed_dim", self.latent_channels)
            elif not _is_int(self.vq_embed_dim) or self.vq_embed_dim < 1:
                bad("vq_embed_dim", "a positive int (or None: latent_channels) for kind='vq'", self.vq_embed_dim)
            object.__setattr__(self, "vq_embed_dim", int(self.vq_embed_dim))
        for name in ("mid_block_add_attention", "remat"):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                bad(name, "a bool", v)
            object.__setattr__(self, name, bool(v))
        if self.dtype not in _DTYPES:
            bad("dtype", f"one of {sorted(_DTYPES)}", self.dtype)

    # ------------------------------------------------------------------ presets
    @classmethod
    def sd15(cls, **overrides) -> "AutoencoderConfig":
        """Stable Diffusion 1.5's VAE (``runwayml/stable-diffusion-v1-5/vae``, f8, 4 latent channels): 83.65M
        parameters."""
        kw = dict(kind="kl", in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
                  scaling_factor=0.18215)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def ldm_vq_f4(cls, **overrides) -> "AutoencoderConfig":
        """CompVis VQ-f4 (first stage of LDM FFHQ-256 / CelebA-HQ-256: ``embed_dim 3, n_embed 8192, z_channels 3,
        ch 128, ch_mult [1, 2, 4], num_res_blocks 2``), ``scaling_factor`` 1.0 (LDM's ``scale_factor``)."""
        kw = dict(kind="vq", in_channels=3, out_channels=3, block_out_channels=(128, 256, 512), layers_per_block=2,
                  latent_channels=3, norm_num_groups=32, sample_size=256, scaling_factor=1.0,
                  num_vq_embeddings=8192, vq_embed_dim=3)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny_kl(cls, **overrides) -> "AutoencoderConfig":
        """A tiny KL autoencoder (2 levels, f2) with every block type, for tests."""
        kw = dict(kind="kl", in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.18215)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny_vq(cls, **overrides) -> "AutoencoderConfig":
        """A tiny VQ autoencoder (2 levels, f2, 128 codes of dimension 3), for tests."""
        kw = dict(kind="vq", in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                  latent_channels=3, norm_num_groups=8, sample_size=32, scaling_factor=1.0,
                  num_vq_embeddings=128, vq_embed_dim=3)
        kw.update(overrides)
        return cls(**kw)

    # ------------------------------------------------------------------ derived
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_dim(self) -> int:
        """Channels of the latents :func:`autoencoder_encode` returns (``latent_channels`` or ``vq_embed_dim``)."""
        return self.latent_channels if self.kind == "kl" else self.vq_embed_dim

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @classmethod
    def from_diffusers(cls, config: Mapping, kind: Optional[str] = None, **overrides) -> "AutoencoderConfig":
        """From a diffusers ``config.json`` dict of an ``AutoencoderKL`` (``kind="kl"``) or ``VQModel`` (``"vq"``).

        ``kind`` defaults to the one named by ``_class_name``. Keys this library does not model but that do not
        change the function are ignored (``_class_name``, ``_diffusers_version``, ``force_upcast``,
        ``lookup_from_codebook``, ...); missing keys take diffusers' constructor defaults. Settings this
        implementation does not support (other block types, ``act_fn`` other than silu, ``norm_type="spatial"``,
        ``use_quant_conv=False``, ``shift_factor`` / ``latents_mean`` / ``latents_std``) raise ``ValueError``.
        Note that diffusers' ``VQModel`` default ``scaling_factor`` is 0.18215 while the LDM VQ models use 1.0: pass
        ``scaling_factor=1.0`` in ``overrides`` when the config omits it.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"AutoencoderConfig.from_diffusers: config must be a dict, got {type(config).__name__}")
        by_class = {"AutoencoderKL": "kl", "VQModel": "vq"}
        named = by_class.get(config.get("_class_name"))
        if "_class_name" in config and named is None:
            raise ValueError(f"AutoencoderConfig.from_diffusers: _class_name: expected one of {sorted(by_class)}, "
                             f"got {config['_class_name']!r}")
        if kind is None:
            if named is None:
                raise ValueError("AutoencoderConfig.from_diffusers: kind: expected 'kl' or 'vq' (the config has no "
                                 "_class_name), got None")
            kind = named
        if kind not in _KINDS:
            raise ValueError(f"AutoencoderConfig.from_diffusers: kind: expected one of {list(_KINDS)}, got {kind!r}")
        if named is not None and named != kind:
            raise ValueError(f"AutoencoderConfig.from_diffusers: kind: expected {named!r} (the config is a "
                             f"{config['_class_name']}), got {kind!r}")
        defaults = dict(in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1,
                        norm_num_groups=32, sample_size=32, scaling_factor=0.18215, mid_block_add_attention=True)
        defaults["latent_channels"] = 4 if kind == "kl" else 3
        c = dict(defaults)
        c.update({k: config[k] for k in defaults if k in config})
        ss = c["sample_size"]
        if isinstance(ss, (list, tuple)):
            if not ss or any(s != ss[0] for s in ss):
                raise ValueError(f"AutoencoderConfig.from_diffusers: sample_size: expected an int or equal sizes, "
                                 f"got {ss!r}")
            c["sample_size"] = ss[0]
        n = len(c["block_out_channels"])

        def need(key, ok, expected, default=None):
            v = config.get(key, default)
            if not ok(v):
                raise ValueError(f"AutoencoderConfig.from_diffusers: {key}: expected {expected} (unsupported by this "
                                 f"implementation otherwise), got {v!r}")

        need("down_block_types", lambda v: list(v) == ["DownEncoderBlock2D"] * n,
             f"{n} x 'DownEncoderBlock2D'", ("DownEncoderBlock2D",))
        need("up_block_types", lambda v: list(v) == ["UpDecoderBlock2D"] * n, f"{n} x 'UpDecoderBlock2D'",
             ("UpDecoderBlock2D",))
        need("act_fn", lambda v: v in ("silu", "swish"), "'silu'", "silu")
        if kind == "kl":
            for key in ("use_quant_conv", "use_post_quant_conv"):
                need(key, lambda v: v is True, "True", True)
            for key in ("shift_factor", "latents_mean", "latents_std"):
                need(key, lambda v: v is None, "None", None)
        else:
            need("norm_type", lambda v: v == "group", "'group'", "group")
            c["num_vq_embeddings"] = config.get("num_vq_embeddings", 256)
            c["vq_embed_dim"] = config.get("vq_embed_dim", None)
        c["kind"] = kind
        c["block_out_channels"] = tuple(c["block_out_channels"])
        c.update(overrides)
        return cls(**c)


# ---------------------------------------------------------------------------------------------------------------
# building blocks


def _conv(features, name, dtype, kernel=3, stride=1, padding=None):
    if padding is None:
        p = kernel // 2
        padding = ((p, p), (p, p))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=jnp.float32, name=name, conv_general_dilated=conv_general_dilated)


def _norm(groups, name):
    return GroupNorm32(num_groups=groups, epsilon=_EPS, name=name)


class ResnetBlock(nn.Module):
    """``s(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))))))`` (see the module docstring)."""

    out_channels: int
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_norm(self.num_groups, "norm1")(x))
        h = _conv(self.out_channels, "conv1", self.dtype)(h)
        h = nn.silu(_norm(self.num_groups, "norm2")(h))
        h = _conv(self.out_channels, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, "conv_shortcut", self.dtype, kernel=1)(x)
        return x + h


class MidAttention(nn.Module):
    """Single-head spatial self-attention with GroupNorm and a residual connection (diffusers' VAE ``Attention``)."""

    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        xs = x.reshape(b, hh * ww, c)
        u = _norm(self.num_groups, "group_norm")(xs)
        dense = functools.partial(nn.Dense, c, dtype=self.dtype, param_dtype=jnp.float32)
        q = dense(name="to_q")(u)
        k = dense(name="to_k")(u)
        v = dense(name="to_v")(u)
        w = jnp.einsum("btc,bsc->bts", q, k) * (1.0 / math.sqrt(c))
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
        a = jnp.einsum("bts,bsc->btc", w, v)
        out = dense(name="to_out_0")(a)
        return (xs + out).reshape(b, hh, ww, c)


class Downsample(nn.Module):
    """Zero pad (0, 1, 0, 1), then a stride-2 3x3 conv without padding."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(x.shape[-1], "conv", self.dtype, stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], "conv", self.dtype)(x)


def _maybe_remat(cls, remat: bool):
    return nn.remat(cls) if remat else cls


class _Blocks(nn.Module):
    """A named container (``down_blocks_i`` / ``up_blocks_i`` / ``mid_block``) running its children in order."""

    config: AutoencoderConfig
    kind: str  # "down", "up" or "mid"
    out_channels: int
    resample: bool = False

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        dt = cfg.compute_dtype
        g = cfg.norm_num_groups
        Res = _maybe_remat(ResnetBlock, cfg.remat)
        if self.kind == "mid":
            h = Res(self.out_channels, g, dt, name="resnets_0")(h)
            if cfg.mid_block_add_attention:
                h = _maybe_remat(MidAttention, cfg.remat)(g, dt, name="attentions_0")(h)
            return Res(self.out_channels, g, dt, name="resnets_1")(h)
        n = cfg.layers_per_block + (1 if self.kind == "up" else 0)
        for j in range(n):
            h = Res(self.out_channels, g, dt, name=f"resnets_{j}")(h)
        if self.resample and self.kind == "down":
            h = _maybe_remat(Downsample, cfg.remat)(dt, name="downsamplers_0")(h)
        elif self.resample:
            h = _maybe_remat(Upsample, cfg.remat)(dt, name="upsamplers_0")(h)
        return h


class Encoder(nn.Module):
    """``x [B, H, W, in_channels] -> [B, H/f, W/f, 2 latent_channels (KL) | latent_channels (VQ)]`` (float32),
    before ``quant_conv``."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt = cfg.compute_dtype
        boc = cfg.block_out_channels
        h = _conv(boc[0], "conv_in", dt)(x.astype(dt))
        for i, ch in enumerate(boc):
            h = _Blocks(cfg, "down", ch, resample=i != len(boc) - 1, name=f"down_blocks_{i}")(h)
        h = _Blocks(cfg, "mid", boc[-1], name="mid_block")(h)
        h = nn.silu(_norm(cfg.norm_num_groups, "conv_norm_out")(h.astype(jnp.float32)))
        n_out = 2 * cfg.latent_channels if cfg.kind == "kl" else cfg.latent_channels
        return _conv(n_out, "conv_out", jnp.float32)(h)


class Decoder(nn.Module):
    """``[B, h, w, latent_channels] -> [B, f h, f w, out_channels]`` (float32), after ``post_quant_conv``."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        dt = cfg.compute_dtype
        boc = cfg.block_out_channels
        h = _conv(boc[-1], "conv_in", dt)(z.astype(dt))
        h = _Blocks(cfg, "mid", boc[-1], name="mid_block")(h)
        for i, ch in enumerate(reversed(boc)):
            h = _Blocks(cfg, "up", ch, resample=i != len(boc) - 1, name=f"up_blocks_{i}")(h)
        h = nn.silu(_norm(cfg.norm_num_groups, "conv_norm_out")(h.astype(jnp.float32)))
        return _conv(cfg.out_channels, "conv_out", jnp.float32)(h)


class _Codebook(nn.Module):
    num: int
    dim: int

    @nn.compact
    def __call__(self):
        return self.param("embedding", nn.initializers.normal(1.0), (self.num, self.dim), jnp.float32)


class FirstStageModel(nn.Module):
    """Encoder, ``quant_conv``, (codebook), ``post_quant_conv``, Decoder. Methods ``encode_raw`` (``quant_conv``
    output, float32), ``decode_raw`` (decoder of ``post_quant_conv(z)``, no scaling / quantisation), ``codebook``;
    ``__call__`` (used for init) runs both."""

    config: AutoencoderConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        n_q = 2 * cfg.latent_channels if cfg.kind == "kl" else cfg.vq_embed_dim
        self.quant_conv = _conv(n_q, None, jnp.float32, kernel=1)
        self.post_quant_conv = _conv(cfg.latent_channels, None, jnp.float32, kernel=1)
        if cfg.kind == "vq":
            self.quantize = _Codebook(cfg.num_vq_embeddings, cfg.vq_embed_dim)

    def encode_raw(self, x):
        return self.quant_conv(self.encoder(x))

    def decode_raw(self, z):
        return self.decoder(self.post_quant_conv(z.astype(jnp.float32)))

    def codebook(self):
        return self.quantize()

    def __call__(self, x):
        h = self.encode_raw(x)
        if self.config.kind == "kl":
            return self.decode_raw(h[..., :self.config.latent_channels])
        zq, _ = vq_quantize(self.codebook(), h)
        return self.decode_raw(zq)


# ---------------------------------------------------------------------------------------------------------------
# quantiser

_DIST_BUDGET = 1 << 24  # distance-matrix entries evaluated at once (64 MiB of float32)


def _nearest_code(codebook, zf):
    """``argmin_k ||z_n - e_k||^2`` for the rows of ``zf`` ``[N, D]`` (float32, HIGHEST precision), in chunks of
    rows so that the ``[rows, K]`` distance matrix stays within :data:`_DIST_BUDGET` entries."""
    e2 = jnp.sum(jnp.square(codebook), axis=-1)

    def nearest(zc):
        d = e2[None, :] - 2.0 * jnp.dot(zc, codebook.T, precision=lax.Precision.HIGHEST)
        return jnp.argmin(d, axis=-1).astype(jnp.int32)

    n = zf.shape[0]
    rows = max(1, _DIST_BUDGET // max(codebook.shape[0], 1))
    if n <= rows:
        return nearest(zf)
    m = -(-n // rows)
    zp = jnp.pad(zf, ((0, m * rows - n), (0, 0)))
    return lax.map(nearest, zp.reshape(m, rows, zf.shape[1])).reshape(-1)[:n]


def vq_quantize(codebook, z):
    """Nearest-code quantisation with the straight-through estimator.

    Args:
      codebook: ``[K, D]`` code vectors.
      z: ``[..., D]`` vectors (e.g. NHWC latents).

    Returns:
      ``(z_st, indices)``: ``z_st = z + stop_gradient(e[indices] - z)`` (the value of the nearest code up to float
      rounding; gradient the identity, so ``d z_st / d z = I``) with ``z``'s dtype, and ``indices`` ``[...]`` int32,
      ``argmin_k ||z - e_k||^2`` (computed in float32).
    """
    codebook = jnp.asarray(codebook)
    z = jnp.asarray(z)
    if codebook.ndim != 2:
        raise ValueError(f"vq_quantize: codebook must be [K, D], got shape {codebook.shape}")
    if z.shape[-1:] != codebook.shape[-1:]:
        raise ValueError(f"vq_quantize: z must be [..., {codebook.shape[1]}] (the codebook dimension), got shape "
                         f"{z.shape}")
    cb = codebook.astype(jnp.float32)
    zf = z.astype(jnp.float32).reshape(-1, cb.shape[1])
    idx = _nearest_code(lax.stop_gradient(cb), lax.stop_gradient(zf))
    zq = jnp.take(cb, idx, axis=0).reshape(z.shape).astype(z.dtype)
    return z + lax.stop_gradient(zq - z), idx.reshape(z.shape[:-1])


# ---------------------------------------------------------------------------------------------------------------
# functional API


def autoencoder_param_shapes(cfg: AutoencoderConfig):
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (no computation)."""
    _check_cfg(cfg, "autoencoder_param_shapes")
    return jax.tree_util.tree_map(lambda s: s, _param_shapes(cfg))  # a fresh tree (the cached one stays intact)


@functools.lru_cache(maxsize=64)
def _param_shapes(cfg):
    f = cfg.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, cfg.in_channels), jnp.float32)
    return jax.eval_shape(FirstStageModel(cfg).init, jax.random.PRNGKey(0), x)["params"]


def _check_cfg(cfg, where):
    if not isinstance(cfg, AutoencoderConfig):
        raise TypeError(f"{where}: cfg must be an AutoencoderConfig, got {type(cfg).__name__}")


def init_autoencoder_params(key, cfg: AutoencoderConfig):
    """Random float32 parameters, non-zero everywhere (so every layer matters in tests): kernels ``~ N(0, 1 /
    fan_in)`` (``fan_in`` = product of all but the last kernel dimension), biases ``~ 0.02 N(0, 1)``, GroupNorm
    scales ``~ 1 + 0.1 N(0, 1)``, codebook ``~ N(0, 1)``: consecutive slices (leaves in path order) of one
    ``jax.random.normal(key, (num_params,))`` draw."""
    _check_cfg(cfg, "init_autoencoder_params")
    flat, treedef = jax.tree_util.tree_flatten_with_path(_param_shapes(cfg))
    sizes = [int(np.prod(leaf.shape)) for _, leaf in flat]
    # one draw, sliced on the host (slicing ~100 leaves inside a jit takes seconds to compile on CPU)
    z_all = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))
    leaves, off = [], 0
    for (path, leaf), n in zip(flat, sizes):
        names = path_names(path)
        z = z_all[off:off + n].reshape(leaf.shape)
        off += n
        if names[-1] == "kernel":
            leaves.append(z / math.sqrt(int(np.prod(leaf.shape[:-1]))))
        elif names[-1] == "scale":
            leaves.append(1.0 + 0.1 * z)
        elif names[-1] == "embedding":
            leaves.append(z)
        else:
            leaves.append(0.02 * z)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a, jnp.float32) for a in leaves])


def _check_images(cfg, x, where):
    x = jnp.asarray(x)
    f = cfg.downsample_factor
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
        raise ValueError(f"{where}: x must be [B, H, W, {cfg.in_channels}] (NHWC images), got shape {x.shape}")
    if x.shape[1] % f or x.shape[2] % f:
        raise ValueError(f"{where}: image height/width must be multiples of the downsample factor {f}, got "
                         f"{x.shape[1:3]}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{where}: x must be floating point, got {x.dtype}")
    return x


@functools.partial(jax.jit, static_argnums=0)
def _encode_raw(cfg, params, x):
    return FirstStageModel(cfg).apply({"params": params}, x, method=FirstStageModel.encode_raw)


@functools.partial(jax.jit, static_argnums=0)
def _decode_raw(cfg, params, z):
    return FirstStageModel(cfg).apply({"params": params}, z, method=FirstStageModel.decode_raw)


def _moments(cfg, params, x):
    h = _encode_raw(cfg, params, x)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def autoencoder_encode_moments(cfg: AutoencoderConfig, params, x):
    """KL posterior ``(mean, logvar)`` ``[B, H/f, W/f, latent_channels]`` each, float32, unscaled, ``logvar``
    clipped to [-30, 20]. ``ValueError`` for a VQ config."""
    _check_cfg(cfg, "autoencoder_encode_moments")
    if cfg.kind != "kl":
        raise ValueError(f"autoencoder_encode_moments: expected a kind='kl' config, got kind={cfg.kind!r} (a VQ "
                         f"encoder has no posterior moments: use autoencoder_encode)")
    x = _check_images(cfg, x, "autoencoder_encode_moments")
    return _moments(cfg, params, x)


def autoencoder_encode(cfg: AutoencoderConfig, params, x, key=None):
    """Latents ``[B, H/f, W/f, latent_dim]`` (float32) in diffusion units (times ``scaling_factor``).

    KL: the posterior mean without ``key``; with ``key`` the sample ``mean + exp(logvar / 2) eps``, ``eps ~ N(0, I)``
    drawn per image (one key: image ``i`` uses ``fold_in(key, i)``; or a ``[B]`` batch of keys). VQ: the
    pre-quantisation latents (``quant_conv`` output; ``key`` ignored).
    """
    _check_cfg(cfg, "autoencoder_encode")
    x = _check_images(cfg, x, "autoencoder_encode")
    if cfg.kind == "vq":
        return _encode_raw(cfg, params, x) * cfg.scaling_factor
    mean, logvar = _moments(cfg, params, x)
    if key is None:
        return mean * cfg.scaling_factor
    keys = _rng.image_keys(key, x.shape[0])
    eps = _rng.normal(keys, mean.shape[1:], mean.dtype)
    return (mean + jnp.exp(0.5 * logvar) * eps) * cfg.scaling_factor


def autoencoder_decode(cfg: AutoencoderConfig, params, z, quantize: bool = True):
    """Images ``[B, f h, f w, out_channels]`` (float32, nominally [-1, 1], not clipped) from latents ``z`` ``[B, h,
    w, latent_dim]`` in diffusion units: ``D(post_quant_conv(q(z / scaling_factor)))``, ``q`` the straight-through
    nearest-code quantiser for VQ (skipped with ``quantize=False``), the identity for KL (``quantize`` ignored)."""
    _check_cfg(cfg, "autoencoder_decode")
    z = jnp.asarray(z)
    if z.ndim != 4 or z.shape[-1] != cfg.latent_dim:
        raise ValueError(f"autoencoder_decode: z must be [B, h, w, {cfg.latent_dim}] (NHWC latents), got shape "
                         f"{z.shape}")
    z = z.astype(jnp.float32) / cfg.scaling_factor
    if cfg.kind == "vq" and quantize:
        z, _ = vq_quantize(params["quantize"]["embedding"], z)
    return _decode_raw(cfg, params, z)


# ---------------------------------------------------------------------------------------------------------------
# conversion

_INDEXED = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "embedding.weight"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTN_KEY = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)"
                           r"\.(weight|bias)$")


def _diffusers_key(names: Tuple[str, ...]) -> str:
    parts = []
    for s in names[:-1]:
        m = _INDEXED.match(s)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else s)
    parts.append(_LEAF[names[-1]])
    return ".".join(parts)


def _compvis_key(dkey: str, n_levels: int) -> str:
    """CompVis key of a diffusers key (see the module docstring's table)."""
    p = dkey.split(".")
    if p[0] in ("encoder", "decoder"):
        rest = p[1:]
        if rest[0] == "conv_norm_out":
            rest = ["norm_out"] + rest[1:]
        elif rest[0] in ("down_blocks", "up_blocks"):
            i = int(rest[1])
            lvl = i if rest[0] == "down_blocks" else n_levels - 1 - i
            head = ["down" if rest[0] == "down_blocks" else "up", str(lvl)]
            if rest[2] == "resnets":
                rest = head + ["block", rest[3]] + rest[4:]
            else:  # downsamplers.0.conv / upsamplers.0.conv
                rest = head + ["downsample" if rest[2] == "downsamplers" else "upsample"] + rest[4:]
        elif rest[0] == "mid_block":
            if rest[1] == "resnets":
                rest = ["mid", f"block_{int(rest[2]) + 1}"] + rest[3:]
            else:  # attentions.0.<sub>.<leaf>
                sub = ".".join(rest[3:-1])
                rest = ["mid", "attn_1", _ATTN[sub], rest[-1]]
        rest = ["nin_shortcut" if s == "conv_shortcut" else s for s in rest]
        p = [p[0]] + rest
    return ".".join(p)


def _kind(names: Tuple[str, ...], ndim: int, layout: str) -> str:
    """'conv' (4-D kernel), 'conv1x1' (attention Dense kernel stored as a 1x1 conv: CompVis), 'linear' (Dense
    kernel), 'vector' (bias, norm scale) or 'table' (codebook)."""
    if names[-1] == "kernel":
        if ndim == 4:
            return "conv"
        return "conv1x1" if layout == "compvis" else "linear"
    return "table" if names[-1] == "embedding" else "vector"


_LAYOUTS = ("diffusers", "compvis")


@functools.lru_cache(maxsize=64)
def _layout(cfg: AutoencoderConfig, layout: str):
    """``((flax_path, torch_key, kind, flax_shape), ...)`` for every parameter (from the Flax parameter tree)."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout: expected one of {list(_LAYOUTS)}, got {layout!r}")
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(_param_shapes(cfg))[0]:
        names = path_names(path)
        key = _diffusers_key(names)
        if layout == "compvis":
            key = _compvis_key(key, len(cfg.block_out_channels))
        out.append((names, key, _kind(names, len(leaf.shape), layout), tuple(leaf.shape)))
    return tuple(out)


def autoencoder_expected_shapes(cfg: AutoencoderConfig, layout: str = "diffusers") -> Dict[str, Tuple[int, ...]]:
    """``{key: torch shape}`` of a state dict in the ``"diffusers"`` or ``"compvis"`` layout for ``cfg`` (derived
    from the Flax parameter tree; CompVis attention weights are 1x1 convs ``[O, I, 1, 1]``)."""
    _check_cfg(cfg, "autoencoder_expected_shapes")
    return {key: torch_shape(kind, shp) for _, key, kind, shp in _layout(cfg, layout)}


def _convert(sd: Mapping[str, Any], cfg: AutoencoderConfig, layout: str, where: str):
    _check_cfg(cfg, where)
    if not isinstance(sd, Mapping):
        raise TypeError(f"{where}: state_dict must be a mapping of names to arrays, got {type(sd).__name__}")
    lay = _layout(cfg, layout)
    expected = {key: (path, kind, torch_shape(kind, shp)) for path, key, kind, shp in lay}
    # given key -> (expected key, kind, allowed shapes)
    given: Dict[str, Tuple[str, str, Tuple[Tuple[int, ...], ...]]] = {}
    unexpected, duplicated = [], []
    for k in sd:
        if not isinstance(k, str):
            unexpected.append(repr(k))
            continue
        if layout == "compvis" and k.startswith(COMPVIS_IGNORED_PREFIXES):
            continue
        m = _OLD_ATTN_KEY.match(k) if layout == "diffusers" else None
        if m is not None:
            new = f"{m.group(1)}.{_OLD_ATTN[m.group(2)]}.{m.group(3)}"
            if new in sd:
                duplicated.append(f"{k} and {new}")
                continue
            if new in expected:
                shp = expected[new][2]
                allowed = (shp, shp + (1, 1)) if m.group(3) == "weight" else (shp,)
                given[k] = (new, expected[new][1], allowed)
                continue
        if k in expected:
            given[k] = (k, expected[k][1], (expected[k][2],))
        else:
            unexpected.append(k)
    covered = {new for new, _, _ in given.values()}
    missing = sorted(set(expected) - covered)
    misshaped, nonfloat = [], []
    for k, (_, _, allowed) in sorted(given.items()):
        shp = tuple(np.shape(sd[k]))
        if shp not in allowed:
            exp = " or ".join(str(a) for a in allowed)
            misshaped.append(f"{k} (expected {exp}, got {shp})")
        elif not is_float_array(sd[k]):
            nonfloat.append(f"{k} ({np.asarray(sd[k]).dtype})")
    problems = []
    if missing:
        problems.append(f"missing keys: {fmt_list(missing)}")
    if unexpected:
        hint = ""
        if layout == "compvis" and any(str(k).startswith("first_stage_model.") for k in unexpected):
            hint = " (strip the 'first_stage_model.' prefix first)"
        problems.append(f"unexpected keys: {fmt_list(sorted(unexpected))}{hint}")
    if duplicated:
        problems.append(f"keys given under both the old and the new attention name: {fmt_list(duplicated)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {fmt_list(misshaped)}")
    if nonfloat:
        problems.append(f"non-floating keys: {fmt_list(nonfloat)}")
    if problems:
        raise ValueError(f"{where}: state dict does not match the {cfg.kind.upper()} autoencoder config "
                         f"({layout} layout, {len(expected)} tensors expected, {len(sd)} given): "
                         + "; ".join(problems))
    params: dict = {}
    for k, (new, kind, _) in given.items():
        a = np.asarray(sd[k]).astype(np.float32)
        if kind == "linear" and a.ndim == 4:  # old attention name stored as a 1x1 conv
            a = a[:, :, 0, 0]
        set_path(params, expected[new][0], np.ascontiguousarray(to_flax(kind, a)))
    return params


def convert_diffusers_autoencoder(state_dict: Mapping[str, Any], cfg: AutoencoderConfig):
    """Flax params (nested dict of float32 ``np.ndarray``) from a diffusers ``AutoencoderKL`` / ``VQModel`` state
    dict (torch layouts), strictly. The old attention names ``query/key/value/proj_attn`` (linear or 1x1-conv
    weights) are accepted in place of ``to_q/to_k/to_v/to_out.0``.

    Raises:
      ValueError: one error listing every missing, unexpected, mis-shaped or non-floating tensor.
    """
    return _convert(state_dict, cfg, "diffusers", "convert_diffusers_autoencoder")


def convert_compvis_first_stage(state_dict: Mapping[str, Any], cfg: AutoencoderConfig):
    """Flax params from a CompVis (``ldm`` / ``taming``) first-stage state dict, keys without the
    ``first_stage_model.`` prefix (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, and for
    VQ ``quantize.embedding.weight``), strictly; keys under :data:`COMPVIS_IGNORED_PREFIXES` (``loss.``) are
    skipped.

    Raises:
      ValueError: one error listing every missing, unexpected, mis-shaped or non-floating tensor.
    """
    return _convert(state_dict, cfg, "compvis", "convert_compvis_first_stage")


def autoencoder_to_diffusers_state_dict(params, cfg: AutoencoderConfig, layout: str = "diffusers"
                                        ) -> Dict[str, np.ndarray]:
    """The inverse of the converters: a torch-layout numpy state dict (``layout="diffusers"`` (default) or
    ``"compvis"``) from Flax params."""
    _check_cfg(cfg, "autoencoder_to_diffusers_state_dict")
    return to_torch_state_dict(params, _layout(cfg, layout), "autoencoder_to_diffusers_state_dict")
