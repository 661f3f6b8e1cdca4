"""The Stable Diffusion 1.5 denoiser (diffusers' ``UNet2DConditionModel``) in Flax, numerically equal to diffusers.

Layout and units: latents ``z [B, H, W, in_channels]`` (NHWC, the VAE latent already multiplied by its scaling
factor, ``H, W`` multiples of ``2 ** (levels - 1)``, i.e. 8 for SD 1.5); ``t`` a scalar or ``[B]`` (or ``[1]``)
diffusion step in ``[0, 1000)``, integer or real, used as float32 exactly as diffusers does (no rescaling); text
context ``c [B, L, cross_attention_dim]`` (or ``[L, D]`` / ``[1, L, D]``, broadcast over the batch) of ANY length
``L`` (nothing assumes CLIP's 77: the paper's code tokenises without padding, so the UNet sees ``len(prompt) + 2``
tokens). Output: ``eps [B, H, W, out_channels]`` float32.

Architecture (``C_l = block_out_channels[l]``, ``E = 4 C_0``, ``n_l`` heads at level ``l``, see the quirk below)::

    tau(t)    = [cos(t f), sin(t f)]  (flip_sin_to_cos=True; [sin, cos] otherwise), zero-padded when C_0 is odd,
                f_k = exp(-ln(10000) k / (C_0/2 - freq_shift)), k = 0 .. C_0/2 - 1     (diffusers' Timesteps)
    emb       = linear_2(silu(linear_1(tau(t))))                                          (time_embedding, [B, E])
    h         = conv_in(z)                                                                 (3x3, C_0)
    skips     = [h]
    level l   : layers_per_block x (ResnetBlock2D(C_l) [+ Transformer2DModel(n_l)]; skips += h)
                + Downsample2D except at the last level (3x3 conv, stride 2, padding 1);   skips += h
    mid_block : ResnetBlock2D, Transformer2DModel(n_{-1}), ResnetBlock2D                   (UNetMidBlock2DCrossAttn)
    up level l (from the deepest): (layers_per_block + 1) x
                (h = ResnetBlock2D(C_l)(concat[h, skips.pop()]) [+ Transformer2DModel(n_l)])
                + Upsample2D except at level 0 (nearest x2, then 3x3 conv)
    eps       = conv_out(silu(GN(h)))                                                      (3x3, out_channels)

``[+ Transformer2DModel]`` where the block type is ``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D``
(``DownBlock2D`` / ``UpBlock2D``: resnets only). Channel concatenation is ``[h, skip]`` in that order.

* ``ResnetBlock2D(C)(x, emb) = S(x) + conv2(silu(GN2(conv1(silu(GN1(x))) + time_emb_proj(silu(emb)))))``, GN with
  ``norm_num_groups`` groups and ``norm_eps`` (1e-5), ``S`` the 1x1 ``conv_shortcut`` when the channels change
  (identity otherwise), output scale factor 1.
* ``Transformer2DModel(n)(x, c) = x + proj_out(blocks(proj_in(GN(x))))`` with GN eps 1e-6 (and ``norm_num_groups``
  groups) over the ``H W`` tokens; ``proj_in`` / ``proj_out`` are 1x1 convolutions (``use_linear_projection=False``,
  SD 1.5) or linear layers (True): the same per-pixel affine map, stored as ``[O, I, 1, 1]`` or ``[O, I]``.
  ``transformer_layers_per_block`` BasicTransformerBlocks, each (LayerNorms eps 1e-5)::

      h = h + attn1(norm1(h))            self-attention
      h = h + attn2(norm2(h), c)         cross-attention on the text context
      h = h + ff.net.2(a * gelu(g)),  [a, g] = split(ff.net.0.proj(norm3(h)))   GEGLU, 4 C hidden, exact (erf) GELU

  ``attn(x, y) = to_out.0(concat_heads(softmax(q k^T / sqrt(d)) v))`` with ``q = to_q x``, ``k = to_k y``,
  ``v = to_v y`` (no biases; ``to_out.0`` with bias), ``n`` heads of ``d = C / n`` channels (head ``i`` = channels
  ``[i d, (i + 1) d)``), softmax in float32.

Head-count quirk: SD 1.5's ``config.json`` says ``attention_head_dim: 8`` but that is the NUMBER of heads (diffusers
issue 2011: ``num_attention_heads = num_attention_heads or attention_head_dim``; passing ``num_attention_heads``
itself is refused). So level ``l`` has ``n_l = attention_head_dim[l]`` heads (an int is broadcast to every level),
each of ``C_l / n_l`` channels (SD 1.5: 8 heads of 40, 80, 160 channels); the mid block uses
``attention_head_dim[-1]``; up level ``l`` uses the same ``n_l`` as down level ``l`` (diffusers reverses the list
together with the levels). :class:`SDUNetConfig` keeps diffusers' name and semantics; ``heads_per_level`` gives
``n_l``.

Compute dtype: ``dtype="bfloat16"`` runs convolutions, linear layers and attention products in bfloat16 with
float32 parameters; GroupNorm / LayerNorm statistics, softmax, the time embedding and ``conv_out`` stay float32.
``remat=True`` wraps every ResnetBlock2D and Transformer2DModel in ``nn.remat``.

Key mapping (Flax module path -> diffusers key: list containers ``down_blocks, up_blocks, resnets, attentions,
transformer_blocks, downsamplers, upsamplers, to_out, net`` carry their index as a ``_<i>`` suffix; ``kernel`` and
LayerNorm/GroupNorm ``scale`` -> ``weight``)::

    down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_out_0/kernel
                             -> down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0.weight
    down_blocks_1/resnets_0/conv_shortcut/kernel -> down_blocks.1.resnets.0.conv_shortcut.weight
    mid_block/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel
                             -> mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight
    time_embedding/linear_1/kernel -> time_embedding.linear_1.weight
    up_blocks_0/upsamplers_0/conv/kernel -> up_blocks.0.upsamplers.0.conv.weight
    conv_norm_out/scale -> conv_norm_out.weight

Layouts: conv ``[O, I, kh, kw] <-> [kh, kw, I, O]``; linear ``[O, I] <-> [I, O]``; ``proj_in``/``proj_out`` as
1x1 conv ``[O, I, 1, 1] <-> [I, O]``; norms unchanged. The expected set of keys and shapes is derived from the Flax
parameter shapes (``jax.eval_shape``), so the converter, :func:`sd_unet_expected_shapes` and the inverse
:func:`sd_unet_to_diffusers_state_dict` cannot disagree with the model. SD 1.5: 686 tensors, 859,520,964 parameters.

Measured equality with diffusers 0.42.1 (torch 2.13 CPU, float32, ``jax.default_matmul_precision("highest")``,
every parameter randomised, ``max |jax - torch| / max |torch|``; ``tests/test_sd_unet_torchref.py``): eps
<= 2.1e-6 and every down/mid/up block output <= 2.8e-6 on three tiny SD-like configs (1x1-conv and linear
projections, 2 transformer layers, per-level head counts, context length 7, t = 0, 1, 500.5, 999 and integer t);
the classifier-free-guidance combination ``eps_u + 7.5 (eps_c - eps_u)`` 1.9e-6; the input VJP of ``<eps, g>``
1.5e-6. Asserted bound 2e-5. The SD 1.5 key set and shapes equal diffusers' (checked on torch's meta device).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from .adm import GroupNorm32
from .config_dict import DictConfig
from .conv import conv_general_dilated
from .layouts import from_torch, layout_of, path_names, to_torch_state_dict, torch_shape

__all__ = [
    "SDUNetConfig",
    "SDUNet",
    "sd_timestep_embedding",
    "init_sd_unet_params",
    "sd_unet_param_shapes",
    "sd_unet_apply",
    "convert_diffusers_unet",
    "sd_unet_expected_shapes",
    "sd_unet_to_diffusers_state_dict",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_bool(v) -> bool:
    return isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class SDUNetConfig(DictConfig):
    """Static hyper-parameters of :class:`SDUNet` (diffusers' ``UNet2DConditionModel`` field names and semantics).

    Attributes:
      sample_size: nominal latent size (informational; any multiple of ``2 ** (levels - 1)`` is accepted), or None.
      in_channels / out_channels: latent channels (4).
      block_out_channels: per-level widths ``C_l``.
      layers_per_block: resnets per down level (up levels have one more).
      cross_attention_dim: width ``D`` of the text context.
      attention_head_dim: diffusers' (mis)named head COUNT per level: an int (every level) or a tuple with one entry
        per level (see the module docstring).
      down_block_types / up_block_types: ``CrossAttnDownBlock2D`` / ``DownBlock2D`` and ``UpBlock2D`` /
        ``CrossAttnUpBlock2D`` per level (up types listed from the deepest level).
      norm_num_groups / norm_eps: GroupNorm of the resnets, the transformers (eps 1e-6 there) and the output.
      flip_sin_to_cos / freq_shift: sinusoidal time embedding options.
      use_linear_projection: ``proj_in``/``proj_out`` as linear layers (SD 2) instead of 1x1 convolutions (SD 1.5).
      transformer_layers_per_block: BasicTransformerBlocks per Transformer2DModel.
      upcast_attention: attention logits in float32 (only matters with ``dtype="bfloat16"``; they are float32
        anyway in float32 mode).
      only_cross_attention: not implemented (must be False).
      dtype: compute dtype ``"float32"`` / ``"bfloat16"`` (parameters float32; norms and softmax float32).
      remat: ``nn.remat`` around each ResnetBlock2D and Transformer2DModel.
    """

    sample_size: Optional[int] = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    cross_attention_dim: int = 768
    attention_head_dim: Union[int, Tuple[int, ...]] = 8
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    up_block_types: Tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    use_linear_projection: bool = False
    transformer_layers_per_block: int = 1
    upcast_attention: bool = False
    only_cross_attention: bool = False
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        def bad(field, expected, got):
            raise ValueError(f"SDUNetConfig.{field}: expected {expected}, got {got!r}")

        def as_tuple(field, v, kind):
            if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)):
                bad(field, f"a tuple of {kind}", v)
            return tuple(v)

        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, as_tuple(name, getattr(self, name), "values"))
        if isinstance(self.attention_head_dim, (tuple, list)):
            object.__setattr__(self, "attention_head_dim", tuple(self.attention_head_dim))

        if self.only_cross_attention is not False:
            if _is_bool(self.only_cross_attention) and self.only_cross_attention:
                raise NotImplementedError("SDUNetConfig.only_cross_attention=True (attn1 attending to the text "
                                          "context) is not implemented; expected False")
            bad("only_cross_attention", "False", self.only_cross_attention)
        if self.dtype not in _DTYPES:
            bad("dtype", f"one of {sorted(_DTYPES)}", self.dtype)
        if self.sample_size is not None and not (_is_int(self.sample_size) and self.sample_size >= 1):
            bad("sample_size", "a positive int or None", self.sample_size)
        for name in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups",
                     "transformer_layers_per_block"):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 1):
                bad(name, "a positive int", v)
        for name in ("flip_sin_to_cos", "use_linear_projection", "upcast_attention", "remat"):
            if not _is_bool(getattr(self, name)):
                bad(name, "a bool", getattr(self, name))
        if not (_is_real(self.norm_eps) and self.norm_eps > 0):
            bad("norm_eps", "a positive float", self.norm_eps)
        if not _is_real(self.freq_shift):
            bad("freq_shift", "a real number", self.freq_shift)
        n = len(self.block_out_channels)
        if n < 1 or not all(_is_int(c) and c >= 1 for c in self.block_out_channels):
            bad("block_out_channels", "a non-empty tuple of positive ints", self.block_out_channels)
        if self.block_out_channels[0] // 2 == self.freq_shift:
            bad("freq_shift", f"a value other than block_out_channels[0] // 2 = {self.block_out_channels[0] // 2} "
                              "(the frequency denominator would be 0)", self.freq_shift)
        if len(self.down_block_types) != n or any(b not in _DOWN_TYPES for b in self.down_block_types):
            bad("down_block_types", f"{n} entries (one per block_out_channels level) from {_DOWN_TYPES}",
                self.down_block_types)
        if len(self.up_block_types) != n or any(b not in _UP_TYPES for b in self.up_block_types):
            bad("up_block_types", f"{n} entries (one per block_out_channels level) from {_UP_TYPES}",
                self.up_block_types)
        ahd = self.attention_head_dim
        if isinstance(ahd, tuple):
            if len(ahd) != n or not all(_is_int(h) and h >= 1 for h in ahd):
                bad("attention_head_dim", f"a positive int or a tuple of {n} positive ints (head counts per level)",
                    ahd)
        elif not (_is_int(ahd) and ahd >= 1):
            bad("attention_head_dim", f"a positive int or a tuple of {n} positive ints (head counts per level)", ahd)
        for l, c in enumerate(self.block_out_channels):
            if c % self.norm_num_groups:
                bad("norm_num_groups", f"a divisor of every block_out_channels entry (level {l} has {c})",
                    self.norm_num_groups)
        heads = self.heads_per_level
        for l, c in enumerate(self.block_out_channels):
            uses_attn = (self.down_block_types[l] == "CrossAttnDownBlock2D"
                         or self.up_block_types[n - 1 - l] == "CrossAttnUpBlock2D" or l == n - 1)
            if uses_attn and c % heads[l]:
                bad("attention_head_dim", f"head counts dividing the level widths (level {l}: {c} channels)", ahd)

    # ------------------------------------------------------------------ presets
    @classmethod
    def sd15(cls, **overrides) -> "SDUNetConfig":
        """Stable Diffusion 1.5 (``runwayml/stable-diffusion-v1-5`` ``unet/config.json``): 859,520,964 parameters."""
        kw = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32, norm_eps=1e-5,
                  flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides) -> "SDUNetConfig":
        """Two levels with SD 1.5's block types, widths (32, 64), 2 heads, context width 32 (tests, smoke runs)."""
        kw = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  cross_attention_dim=32, attention_head_dim=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
        kw.update(overrides)
        return cls(**kw)

    # ------------------------------------------------------------------ derived
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def heads_per_level(self) -> Tuple[int, ...]:
        """Attention head count ``n_l`` of each level (diffusers: ``num_attention_heads = attention_head_dim``)."""
        a = self.attention_head_dim
        return tuple(int(h) for h in a) if isinstance(a, tuple) else (int(a),) * self.num_levels

    @property
    def min_size(self) -> int:
        """Latent height/width must be a multiple of this (``2 ** (levels - 1)``; 8 for SD 1.5)."""
        return 2 ** (self.num_levels - 1)

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], dtype: str = "float32", remat: bool = False) -> "SDUNetConfig":
        """From a diffusers ``unet/config.json`` dict (absent keys take diffusers' defaults; ``_``-keys ignored).

        Raises ``ValueError`` listing every option this implementation does not reproduce (class / addition
        embeddings, ``time_cond_proj_dim``, other block or mid-block types, non-default activations, kernels,
        padding or scale factors, per-level lists that are not uniform, ``num_attention_heads``, ...) and every
        unknown key; ``NotImplementedError`` for ``only_cross_attention=True``.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"SDUNetConfig.from_diffusers: expected a dict, got {type(config).__name__}")
        cfg = {k: v for k, v in config.items() if not str(k).startswith("_")}
        unknown = sorted(set(cfg) - set(_DIFFUSERS_DEFAULTS))
        problems = []
        if unknown:
            problems.append(f"unknown keys {unknown}")
        full = dict(_DIFFUSERS_DEFAULTS)
        full.update(cfg)
        for key, (ok, expected) in _UNSUPPORTED.items():
            if key in full and not ok(full[key]):
                problems.append(f"{key}={full[key]!r} (supported: {expected})")

        def uniform(key):
            v = full[key]
            if isinstance(v, (list, tuple)):
                if len(v) == 0 or any(x != v[0] for x in v) or isinstance(v[0], (list, tuple)):
                    problems.append(f"{key}={v!r} (supported: one value for every level)")
                    return None
                return v[0]
            return v

        layers = uniform("layers_per_block")
        cad = uniform("cross_attention_dim")
        tlpb = uniform("transformer_layers_per_block")
        oca = full["only_cross_attention"]
        if isinstance(oca, (list, tuple)):
            oca = any(bool(x) for x in oca)
        sample = full["sample_size"]
        if isinstance(sample, (list, tuple)):
            if len(sample) == 2 and sample[0] == sample[1]:
                sample = sample[0]
            else:
                problems.append(f"sample_size={sample!r} (supported: an int; it is informational)")
        if problems:
            raise ValueError("SDUNetConfig.from_diffusers: unsupported diffusers UNet2DConditionModel config: "
                             + "; ".join(problems))
        if oca:
            raise NotImplementedError("SDUNetConfig.from_diffusers: only_cross_attention=True is not implemented")
        ahd = full["attention_head_dim"]
        return cls(sample_size=sample, in_channels=full["in_channels"], out_channels=full["out_channels"],
                   block_out_channels=tuple(full["block_out_channels"]), layers_per_block=layers,
                   cross_attention_dim=cad,
                   attention_head_dim=tuple(ahd) if isinstance(ahd, (list, tuple)) else ahd,
                   down_block_types=tuple(full["down_block_types"]), up_block_types=tuple(full["up_block_types"]),
                   norm_num_groups=full["norm_num_groups"], norm_eps=full["norm_eps"],
                   flip_sin_to_cos=bool(full["flip_sin_to_cos"]), freq_shift=full["freq_shift"],
                   use_linear_projection=bool(full["use_linear_projection"]), transformer_layers_per_block=tlpb,
                   upcast_attention=bool(full["upcast_attention"]), only_cross_attention=False, dtype=dtype,
                   remat=remat)


# diffusers 0.42 ``UNet2DConditionModel.__init__`` defaults (used for keys a config.json omits)
_DIFFUSERS_DEFAULTS: Dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}


def _is_none(v):
    return v is None


def _not_true(v):
    return not (v is True or (isinstance(v, (list, tuple)) and any(x is True for x in v)))


# options of diffusers' UNet2DConditionModel this implementation does not reproduce: key -> (accepted?, supported)
_UNSUPPORTED = {
    "center_input_sample": (lambda v: v is False, "False"),
    "mid_block_type": (lambda v: v == "UNetMidBlock2DCrossAttn", "'UNetMidBlock2DCrossAttn'"),
    "downsample_padding": (lambda v: v == 1, "1"),
    "mid_block_scale_factor": (lambda v: v == 1, "1"),
    "act_fn": (lambda v: v in ("silu", "swish"), "'silu'"),
    "norm_num_groups": (lambda v: v is not None, "an int"),
    "reverse_transformer_layers_per_block": (_is_none, "None"),
    "encoder_hid_dim": (_is_none, "None"),
    "encoder_hid_dim_type": (_is_none, "None"),
    "num_attention_heads": (_is_none, "None (diffusers itself refuses it; the head count is attention_head_dim)"),
    "dual_cross_attention": (lambda v: v is False, "False"),
    "class_embed_type": (_is_none, "None (no class embeddings)"),
    "addition_embed_type": (_is_none, "None (no addition embeddings)"),
    "addition_time_embed_dim": (_is_none, "None"),
    "num_class_embeds": (_is_none, "None (no class embeddings)"),
    "resnet_time_scale_shift": (lambda v: v == "default", "'default'"),
    "resnet_skip_time_act": (lambda v: v is False, "False"),
    "resnet_out_scale_factor": (lambda v: v == 1, "1.0"),
    "time_embedding_type": (lambda v: v == "positional", "'positional'"),
    "time_embedding_dim": (_is_none, "None"),
    "time_embedding_act_fn": (_is_none, "None"),
    "timestep_post_act": (_is_none, "None"),
    "time_cond_proj_dim": (_is_none, "None (no timestep condition projection)"),
    "conv_in_kernel": (lambda v: v == 3, "3"),
    "conv_out_kernel": (lambda v: v == 3, "3"),
    "projection_class_embeddings_input_dim": (_is_none, "None"),
    "attention_type": (lambda v: v == "default", "'default'"),
    "class_embeddings_concat": (lambda v: v is False, "False"),
    "mid_block_only_cross_attention": (_not_true, "None or False"),
    "cross_attention_norm": (_is_none, "None"),
    "dropout": (lambda v: _is_real(v) and v >= 0, "a dropout rate (ignored: evaluation)"),
}


# ---------------------------------------------------------------------------------------------------------------
# building blocks


def sd_timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0,
                          max_period: float = 10000.0) -> jax.Array:
    """diffusers' ``get_timestep_embedding`` (float32): ``[sin(t f), cos(t f)]`` (or ``[cos, sin]`` when
    ``flip_sin_to_cos``) with ``f_k = exp((-ln(max_period) k) / (dim // 2 - freq_shift))``, zero-padded if odd."""
    t = jnp.asarray(t).astype(jnp.float32)
    half = dim // 2
    exponent = (-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)) / jnp.float32(half - freq_shift)
    args = t[:, None] * jnp.exp(exponent)[None, :]
    if flip_sin_to_cos:
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    else:
        emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class LayerNorm32(nn.Module):
    """LayerNorm over the last axis computed in float32 (biased variance), result in the input dtype."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale + bias).astype(x.dtype)


def _conv(features, name, dtype, kernel=3, stride=1):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, param_dtype=jnp.float32, name=name, conv_general_dilated=conv_general_dilated)


def _dense(features, name, dtype, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def _upsample_nearest(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResnetBlock2D(nn.Module):
    """``S(x) + conv2(silu(GN2(conv1(silu(GN1(x))) + time_emb_proj(silu(emb)))))``."""

    out_channels: int
    groups: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        dt = self.dtype
        h = nn.silu(GroupNorm32(num_groups=self.groups, epsilon=self.eps, name="norm1")(x))
        h = _conv(self.out_channels, "conv1", dt)(h)
        e = _dense(self.out_channels, "time_emb_proj", dt)(nn.silu(emb)).astype(h.dtype)
        h = h + e[:, None, None, :]
        h = nn.silu(GroupNorm32(num_groups=self.groups, epsilon=self.eps, name="norm2")(h))
        h = _conv(self.out_channels, "conv2", dt)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, "conv_shortcut", dt, kernel=1)(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention of ``x [B, N, C]`` over ``y [B, M, D]`` (``y = x``: self-attention)."""

    heads: int
    upcast: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        b, n, c = x.shape
        m = y.shape[1]
        h = self.heads
        d = c // h
        dt = self.dtype
        q = _dense(c, "to_q", dt, use_bias=False)(x).reshape(b, n, h, d)
        k = _dense(c, "to_k", dt, use_bias=False)(y).reshape(b, m, h, d)
        v = _dense(c, "to_v", dt, use_bias=False)(y).reshape(b, m, h, d)
        if self.upcast:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
        w = jnp.einsum("bnhd,bmhd->bhnm", q, k)
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
        o = jnp.einsum("bhnm,bmhd->bnhd", w, v).reshape(b, n, c)
        return _dense(c, "to_out_0", dt)(o)


class GEGLU(nn.Module):
    """``a * gelu(g)`` (exact erf GELU) with ``[a, g] = split(proj(x))``."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        a, g = jnp.split(_dense(2 * self.hidden, "proj", self.dtype)(x), 2, axis=-1)
        return a * jax.nn.gelu(g, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.mult * self.dim, self.dtype, name="net_0")(x)
        return _dense(self.dim, "net_2", self.dtype)(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the context, GEGLU feed-forward; pre-LayerNorm residual branches."""

    heads: int
    upcast: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, ctx):
        c = h.shape[-1]
        kw = dict(heads=self.heads, upcast=self.upcast, dtype=self.dtype)
        n1 = LayerNorm32(1e-5, name="norm1")(h)
        h = h + Attention(name="attn1", **kw)(n1, n1)
        h = h + Attention(name="attn2", **kw)(LayerNorm32(1e-5, name="norm2")(h), ctx)
        h = h + FeedForward(c, dtype=self.dtype, name="ff")(LayerNorm32(1e-5, name="norm3")(h))
        return h


class Transformer2DModel(nn.Module):
    """``x + proj_out(blocks(proj_in(GN(x))))`` over the ``H W`` tokens (GN eps 1e-6)."""

    heads: int
    groups: int
    num_layers: int = 1
    upcast: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, ctx):
        b, hh, ww, c = x.shape
        h = GroupNorm32(num_groups=self.groups, epsilon=1e-6, name="norm")(x).reshape(b, hh * ww, c)
        h = _dense(c, "proj_in", self.dtype)(h)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.upcast, self.dtype, name=f"transformer_blocks_{i}")(h, ctx)
        h = _dense(c, "proj_out", self.dtype)(h)
        return h.reshape(b, hh, ww, c) + x


class Downsample2D(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(x.shape[-1], "conv", self.dtype, stride=2)(x)


class Upsample2D(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(x.shape[-1], "conv", self.dtype)(_upsample_nearest(x))


def _blocks(cfg: SDUNetConfig):
    res = nn.remat(ResnetBlock2D) if cfg.remat else ResnetBlock2D
    tr = nn.remat(Transformer2DModel) if cfg.remat else Transformer2DModel
    dt = cfg.compute_dtype

    def resnet(ch, name):
        return res(ch, cfg.norm_num_groups, float(cfg.norm_eps), dt, name=name)

    def transformer(heads, name):
        return tr(heads, cfg.norm_num_groups, cfg.transformer_layers_per_block, cfg.upcast_attention, dt, name=name)

    return resnet, transformer


class DownLevel(nn.Module):
    """``CrossAttnDownBlock2D`` (``cross_attn=True``) or ``DownBlock2D``: returns ``(h, skips)``."""

    config: SDUNetConfig
    level: int
    cross_attn: bool
    add_downsample: bool

    @nn.compact
    def __call__(self, h, emb, ctx):
        cfg = self.config
        resnet, transformer = _blocks(cfg)
        ch = cfg.block_out_channels[self.level]
        skips = []
        for i in range(cfg.layers_per_block):
            h = resnet(ch, f"resnets_{i}")(h, emb)
            if self.cross_attn:
                h = transformer(cfg.heads_per_level[self.level], f"attentions_{i}")(h, ctx)
            skips.append(h)
        if self.add_downsample:
            h = Downsample2D(cfg.compute_dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, tuple(skips)


class UpLevel(nn.Module):
    """``CrossAttnUpBlock2D`` (``cross_attn=True``) or ``UpBlock2D``: consumes ``layers_per_block + 1`` skips."""

    config: SDUNetConfig
    level: int
    cross_attn: bool
    add_upsample: bool

    @nn.compact
    def __call__(self, h, skips, emb, ctx):
        cfg = self.config
        resnet, transformer = _blocks(cfg)
        ch = cfg.block_out_channels[self.level]
        skips = list(skips)
        for i in range(cfg.layers_per_block + 1):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = resnet(ch, f"resnets_{i}")(h, emb)
            if self.cross_attn:
                h = transformer(cfg.heads_per_level[self.level], f"attentions_{i}")(h, ctx)
        if self.add_upsample:
            h = Upsample2D(cfg.compute_dtype, name="upsamplers_0")(h)
        return h


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: ResnetBlock2D, Transformer2DModel, ResnetBlock2D."""

    config: SDUNetConfig

    @nn.compact
    def __call__(self, h, emb, ctx):
        cfg = self.config
        resnet, transformer = _blocks(cfg)
        ch = cfg.block_out_channels[-1]
        h = resnet(ch, "resnets_0")(h, emb)
        h = transformer(cfg.heads_per_level[-1], "attentions_0")(h, ctx)
        return resnet(ch, "resnets_1")(h, emb)


class TimestepEmbedding(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        x = _dense(self.dim, "linear_1", jnp.float32)(x)
        return _dense(self.dim, "linear_2", jnp.float32)(nn.silu(x))


class SDUNet(nn.Module):
    """diffusers' ``UNet2DConditionModel``: ``(z [B,H,W,in], t, context [B,L,D]) -> eps [B,H,W,out]`` float32."""

    config: SDUNetConfig

    @nn.compact
    def __call__(self, z, t, context):
        cfg = self.config
        z = jnp.asarray(z)
        if z.ndim != 4 or z.shape[-1] != cfg.in_channels:
            raise ValueError(f"SDUNet: z must be [B, H, W, {cfg.in_channels}] (NHWC latents), got shape {z.shape}")
        b, hh, ww, _ = z.shape
        if hh % cfg.min_size or ww % cfg.min_size:
            raise ValueError(f"SDUNet: latent height/width must be multiples of {cfg.min_size} "
                             f"(2 ** (levels - 1); diffusers' odd-size upsampling path is not implemented), "
                             f"got {(hh, ww)}")
        t = jnp.asarray(t)
        if t.ndim == 0 or t.shape == (1,):
            t = jnp.broadcast_to(t.reshape(()), (b,))
        if t.shape != (b,):
            raise ValueError(f"SDUNet: t must be a scalar, [1] or [{b}], got shape {t.shape}")
        context = jnp.asarray(context)
        d = cfg.cross_attention_dim
        if context.ndim == 2:
            context = context[None]
        if context.ndim != 3 or context.shape[-1] != d or context.shape[1] < 1 or context.shape[0] not in (1, b):
            raise ValueError(f"SDUNet: context must be [{b}, L, {d}], [1, L, {d}] or [L, {d}] with L >= 1, "
                             f"got shape {context.shape}")
        if context.shape[0] != b:
            context = jnp.broadcast_to(context, (b,) + context.shape[1:])

        dt = cfg.compute_dtype
        c0 = cfg.block_out_channels[0]
        t_emb = sd_timestep_embedding(t, c0, cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(4 * c0, name="time_embedding")(t_emb)
        ctx = context.astype(dt)

        h = _conv(c0, "conv_in", dt)(z.astype(dt))
        skips = [h]
        n = cfg.num_levels
        for l in range(n):
            h, s = DownLevel(cfg, l, cfg.down_block_types[l] == "CrossAttnDownBlock2D", l != n - 1,
                             name=f"down_blocks_{l}")(h, emb, ctx)
            skips.extend(s)
        h = MidBlock(cfg, name="mid_block")(h, emb, ctx)
        for i in range(n):
            l = n - 1 - i
            k = cfg.layers_per_block + 1
            level_skips, skips = tuple(skips[-k:]), skips[:-k]
            h = UpLevel(cfg, l, cfg.up_block_types[i] == "CrossAttnUpBlock2D", i != n - 1,
                        name=f"up_blocks_{i}")(h, level_skips, emb, ctx)
        h = h.astype(jnp.float32)
        h = GroupNorm32(num_groups=cfg.norm_num_groups, epsilon=float(cfg.norm_eps), name="conv_norm_out")(h)
        h = nn.silu(h)
        return _conv(cfg.out_channels, "conv_out", jnp.float32)(h)


# ---------------------------------------------------------------------------------------------------------------
# functional API


def sd_unet_param_shapes(cfg: SDUNetConfig):
    """The parameter tree of :class:`SDUNet` as ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``, no compute)."""
    if not isinstance(cfg, SDUNetConfig):
        raise TypeError(f"sd_unet_param_shapes: cfg must be an SDUNetConfig, got {type(cfg).__name__}")
    shapes = _param_shapes(dataclasses.replace(cfg, dtype="float32", remat=False))
    return jax.tree_util.tree_map(lambda s: s, shapes)  # a fresh tree: the cached one stays intact


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: SDUNetConfig):
    s = cfg.min_size
    z = jax.ShapeDtypeStruct((1, s, s, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    c = jax.ShapeDtypeStruct((1, 1, cfg.cross_attention_dim), jnp.float32)
    return jax.eval_shape(SDUNet(cfg).init, jax.random.PRNGKey(0), z, t, c)["params"]


def init_sd_unet_params(key, cfg: SDUNetConfig):
    """Random float32 parameters, non-zero everywhere (so that no layer is vacuous in tests and benchmarks).

    Kernels ``~ N(0, 1 / fan_in)`` (``fan_in`` = product of all but the last kernel axis), biases ``~ 0.02 N(0, 1)``,
    norm scales ``~ 1 + 0.1 N(0, 1)``. The normals come from NumPy's PCG64 seeded by the key's data, leaf by leaf in
    tree order (deterministic in ``key``; no per-shape compilation, no model-sized temporary).
    """
    shapes = sd_unet_param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    try:
        data = jax.random.key_data(key)
    except (TypeError, ValueError):
        data = key
    rng = np.random.Generator(np.random.PCG64(np.asarray(data, np.uint32).ravel().tolist()))
    leaves = []
    for path, leaf in flat:
        z = rng.standard_normal(tuple(leaf.shape), dtype=np.float32)
        name = path_names(path)[-1]
        if name == "kernel":
            z *= np.float32(1.0 / math.sqrt(int(np.prod(leaf.shape[:-1]))))
        elif name == "scale":
            z = np.float32(1.0) + np.float32(0.1) * z
        else:
            z *= np.float32(0.02)
        leaves.append(jnp.asarray(z))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def sd_unet_apply(cfg: SDUNetConfig, params, z, t, context) -> jax.Array:
    """``eps [B, H, W, out_channels]`` (float32) of the latents ``z [B, H, W, in_channels]`` at step ``t`` (scalar,
    ``[1]`` or ``[B]``; integer or real) given the text context ``[B, L, D]`` / ``[1, L, D]`` / ``[L, D]``."""
    return SDUNet(cfg).apply({"params": params}, z, t, context)


# ---------------------------------------------------------------------------------------------------------------
# conversion from / to diffusers state dicts

_CONTAINERS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
               "upsamplers", "to_out", "net")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _torch_key(flax_path: Tuple[str, ...]) -> str:
    parts = []
    for s in flax_path[:-1]:
        base, _, idx = s.rpartition("_")
        parts.extend([base, idx] if base in _CONTAINERS and idx.isdigit() else [s])
    parts.append(_LEAF[flax_path[-1]])
    return ".".join(parts)


def _kind(cfg: SDUNetConfig, flax_path, ndim: int) -> str:
    """'conv' (4-D kernel), 'conv1x1' (proj_in/proj_out Dense stored as a 1x1 conv), 'linear' or 'vector'."""
    if flax_path[-1] != "kernel":
        return "vector"
    if ndim == 4:
        return "conv"
    if flax_path[-2] in ("proj_in", "proj_out") and not cfg.use_linear_projection:
        return "conv1x1"
    return "linear"


def _layout(cfg: SDUNetConfig):
    """``((flax_path, diffusers_key, kind, flax_shape), ...)`` for every parameter (no computation)."""
    return layout_of(sd_unet_param_shapes(cfg), _torch_key, lambda names, ndim: _kind(cfg, names, ndim))


def sd_unet_expected_shapes(cfg: SDUNetConfig) -> Dict[str, Tuple[int, ...]]:
    """``{diffusers key: torch shape}`` of a diffusers ``UNet2DConditionModel`` state dict for ``cfg`` (derived from
    the Flax parameter shapes)."""
    return {key: torch_shape(kind, shp) for _, key, kind, shp in _layout(cfg)}


def convert_diffusers_unet(state_dict: Mapping[str, Any], cfg: SDUNetConfig):
    """Flax params (nested dict of float32 ``np.ndarray``) from a diffusers ``UNet2DConditionModel`` state dict
    (``{key: array}`` in torch layouts, e.g. ``safetensors.numpy.load_file`` of
    ``unet/diffusion_pytorch_model.safetensors``), strictly.

    Raises:
      ValueError: one message listing every missing, unexpected, mis-shaped (expected vs given) and non-floating
        tensor.
    """
    if not isinstance(cfg, SDUNetConfig):
        raise TypeError(f"convert_diffusers_unet: cfg must be an SDUNetConfig, got {type(cfg).__name__}")
    return from_torch(state_dict, _layout(cfg), "the SD UNet config")


def sd_unet_to_diffusers_state_dict(params, cfg: SDUNetConfig) -> Dict[str, np.ndarray]:
    """The inverse of :func:`convert_diffusers_unet`: a diffusers-layout ``{key: np.ndarray}`` from Flax params
    (strict: a missing, extra or mis-shaped parameter is a ``ValueError``)."""
    return to_torch_state_dict(params, _layout(cfg), "sd_unet_to_diffusers_state_dict")
