"""Image and distribution metrics.

Image metrics take batches ``[B, ...]`` in the library range **[-1, 1]** (images ``[B, H, W, C]``) and are computed
on **[0, 1]** via ``(x + 1) / 2``, per image (returning ``[B]``), with data range 1:

* ``rmse = sqrt(mean(((x + 1)/2 - (ref + 1)/2)^2))`` over all non-batch axes;
* ``psnr = 10 log10(1 / mse) = -20 log10(rmse)`` in dB (``inf`` for identical images);
* ``ssim``: ``dm_pix.ssim`` (Gaussian window 11, std 1.5, ``k1 = 0.01``, ``k2 = 0.03``) on [0, 1], ``max_val = 1``.

Distribution metrics between sample sets ``X [n, d]``, ``Y [m, d]`` (any range):

* :func:`frechet_distance`: the Fréchet (Gaussian W2^2) distance of the fitted Gaussians (FID formula),
  ``|m1 - m2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})``, in float64 numpy via ``eigh``;
* :func:`sliced_w2`: sliced 2-Wasserstein distance ``(E_theta W2^2(theta#X, theta#Y))^{1/2}`` over random unit
  directions, exact 1-D W2 between the projected empirical distributions (``n != m`` allowed);
* :func:`mmd`: biased (V-statistic) squared MMD with an RBF kernel, median-heuristic bandwidth by default.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .validation import check_finite

__all__ = ["rmse", "psnr", "ssim", "frechet_distance", "frechet_from_statistics", "sliced_w2", "mmd"]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _image_pair(x, ref, min_ndim: int = 2, where: str = "metrics"):
    x = jnp.asarray(x)
    ref = jnp.asarray(ref)
    if x.shape != ref.shape:
        raise ValueError(f"x and ref must have the same shape; got x {list(x.shape)} and ref {list(ref.shape)}")
    if x.ndim < min_ndim:
        raise ValueError(f"x must be batched with at least {min_ndim} axes ([B, ...]); got shape {list(x.shape)}")
    check_finite(x, "x", where)
    check_finite(ref, "ref", where)
    return x, ref


def _mse01(x, ref):
    diff = (x.astype(jnp.float32) - ref.astype(jnp.float32)) / 2.0  # difference on the [0, 1] scale
    return jnp.mean(diff**2, axis=tuple(range(1, x.ndim)))


def rmse(x, ref) -> jax.Array:
    """Per-image RMSE on the [0, 1] scale of [-1, 1] inputs ``[B, ...]``: ``[B]``."""
    x, ref = _image_pair(x, ref, where="rmse")
    return jnp.sqrt(_mse01(x, ref))


def psnr(x, ref) -> jax.Array:
    """Per-image PSNR in dB, ``10 log10(1 / mse)`` with ``mse`` on the [0, 1] scale of [-1, 1] inputs: ``[B]``."""
    x, ref = _image_pair(x, ref, where="psnr")
    return -10.0 * jnp.log10(_mse01(x, ref))


def ssim(x, ref) -> jax.Array:
    """Per-image SSIM of NHWC [-1, 1] images (``dm_pix.ssim`` on ``(x + 1) / 2`` with ``max_val = 1``): ``[B]``.
    Images must be at least 11x11 (the Gaussian window)."""
    import dm_pix

    x, ref = _image_pair(x, ref, min_ndim=4, where="ssim")
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC [B, H, W, C]; got shape {list(x.shape)}")
    if min(x.shape[1], x.shape[2]) < 11:
        raise ValueError(f"x must be at least 11x11 for SSIM's 11-tap window; got {x.shape[1]}x{x.shape[2]}")
    a = (x.astype(jnp.float32) + 1.0) / 2.0
    b = (ref.astype(jnp.float32) + 1.0) / 2.0
    return dm_pix.ssim(a, b, max_val=1.0)


def _sample_sets(X, Y, numpy: bool = False, where: str = "metrics"):
    X = np.asarray(X, np.float64) if numpy else jnp.asarray(X)
    Y = np.asarray(Y, np.float64) if numpy else jnp.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError(f"X and Y must be sample sets [n, d]; got X {list(X.shape)} and Y {list(Y.shape)}")
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"X and Y must have the same feature dimension; got X {list(X.shape)} and Y {list(Y.shape)}")
    if X.shape[0] < 2 or Y.shape[0] < 2:
        raise ValueError(f"X and Y need at least 2 samples each; got X {list(X.shape)} and Y {list(Y.shape)}")
    check_finite(X, "X", where)
    check_finite(Y, "Y", where)
    return X, Y


def frechet_from_statistics(mu1, s1, mu2, s2) -> float:
    """Fréchet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})`` between ``N(mu1, S1)`` and
    ``N(mu2, S2)`` (PSD covariances), float64. ``tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(A S2 A))`` with
    ``A = S1^{1/2}`` (``S1 S2`` is similar to the PSD ``A S2 A``): symmetric eigendecompositions (``eigh``, negative
    eigenvalues of round-off clipped to 0) instead of a non-symmetric matrix square root."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    ev1, V1 = np.linalg.eigh(0.5 * (s1 + s1.T))
    r1 = (V1 * np.sqrt(np.clip(ev1, 0.0, None))) @ V1.T
    M = r1 @ s2 @ r1
    tr_cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (M + M.T)), 0.0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_cross)


def frechet_distance(feats1, feats2) -> float:
    """Fréchet distance (squared Gaussian W2, as in FID) between the Gaussians fitted to ``feats1 [n, d]`` and
    ``feats2 [m, d]`` (means and unbiased covariances), in float64: :func:`frechet_from_statistics`."""
    f1, f2 = _sample_sets(feats1, feats2, numpy=True, where="frechet_distance")
    return frechet_from_statistics(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def _w2sq_1d_sorted(xs, ys):
    """Exact squared W2 between 1-D empirical distributions given sorted samples ``xs [n]``, ``ys [m]``:
    ``int_0^1 (F^{-1}(u) - G^{-1}(u))^2 du``, on the merged grid of quantile breakpoints."""
    n, m = xs.shape[0], ys.shape[0]
    if n == m:
        return jnp.mean((xs - ys) ** 2)
    u = jnp.sort(jnp.concatenate([jnp.arange(1, n + 1) / n, jnp.arange(1, m + 1) / m]))
    lo = jnp.concatenate([jnp.zeros((1,), u.dtype), u[:-1]])
    mid = 0.5 * (lo + u)
    ix = jnp.clip(jnp.floor(mid * n).astype(jnp.int32), 0, n - 1)
    iy = jnp.clip(jnp.floor(mid * m).astype(jnp.int32), 0, m - 1)
    return jnp.sum((u - lo) * (xs[ix] - ys[iy]) ** 2)


def sliced_w2(key, X, Y, n_proj: int = 256) -> jax.Array:
    """Sliced 2-Wasserstein distance between sample sets ``X [n, d]`` and ``Y [m, d]``:
    ``sqrt(mean_j W2^2(<theta_j, X>, <theta_j, Y>))`` with ``n_proj`` directions ``theta_j`` uniform on the sphere
    (drawn from ``key``); each 1-D W2 is exact between the empirical distributions."""
    X, Y = _sample_sets(X, Y, where="sliced_w2")
    if not isinstance(n_proj, (int, np.integer)) or n_proj < 1:
        raise ValueError(f"n_proj must be a positive integer; got {n_proj!r}")
    return _sliced_w2(key, X, Y, int(n_proj))


@partial(jax.jit, static_argnums=3)
def _sliced_w2(key, X, Y, n_proj):
    dtype = jnp.result_type(X.dtype, Y.dtype, jnp.float32)
    theta = jax.random.normal(key, (n_proj, X.shape[1]), dtype)
    theta = theta / jnp.linalg.norm(theta, axis=1, keepdims=True)
    px = jnp.sort(X.astype(dtype) @ theta.T, axis=0)  # [n, n_proj]
    py = jnp.sort(Y.astype(dtype) @ theta.T, axis=0)
    w2sq = jax.vmap(_w2sq_1d_sorted, in_axes=(1, 1))(px, py)
    return jnp.sqrt(jnp.mean(w2sq))


_MEDIAN_MAX_POINTS = 1000


def _sqdist(a, b):
    d2 = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None, :] - 2.0 * a @ b.T
    return jnp.clip(d2, 0.0, None)


def mmd(X, Y, bandwidth=None) -> jax.Array:
    """Biased (V-statistic) squared MMD with the RBF kernel ``k(x, y) = exp(-|x - y|^2 / (2 h^2))``:
    ``mean K_XX + mean K_YY - 2 mean K_XY >= 0`` (0 up to float rounding, ~1e-8, for identical sets; clipped at 0).

    ``bandwidth = None`` uses the median heuristic: ``h^2`` = median of the squared pairwise distances
    ``|z_i - z_j|^2``, ``i < j``, of the pooled sample ``Z = [X; Y]`` (of an evenly strided subset of 1000 pooled
    points when there are more). Memory is ``O((n + m)^2)``.
    """
    X, Y = _sample_sets(X, Y, where="mmd")
    if bandwidth is not None and _is_concrete(bandwidth) and not (
            np.ndim(bandwidth) == 0 and np.isfinite(bandwidth) and float(bandwidth) > 0):
        raise ValueError(f"bandwidth must be a finite positive number or None; got {bandwidth!r}")
    return _mmd(X, Y, bandwidth)


@jax.jit
def _mmd(X, Y, bandwidth):
    dtype = jnp.result_type(X.dtype, Y.dtype, jnp.float32)
    X = X.astype(dtype)
    Y = Y.astype(dtype)
    dxx, dyy, dxy = _sqdist(X, X), _sqdist(Y, Y), _sqdist(X, Y)
    if bandwidth is None:
        Z = jnp.concatenate([X, Y], axis=0)
        if Z.shape[0] > _MEDIAN_MAX_POINTS:  # evenly strided subset: deterministic, O(1) cost of the median
            Z = Z[np.linspace(0, Z.shape[0] - 1, _MEDIAN_MAX_POINTS).round().astype(np.int64)]
        iu = np.triu_indices(Z.shape[0], k=1)
        h2 = jnp.median(_sqdist(Z, Z)[iu])  # median of squared distances = (median distance)^2 (odd count)
    else:
        h2 = jnp.asarray(bandwidth, dtype) ** 2
    h2 = jnp.maximum(h2, jnp.finfo(dtype).tiny)
    k = lambda d2: jnp.exp(-d2 / (2.0 * h2))
    # >= 0 for the PSD RBF kernel; the clip removes float rounding below 0 (identical sets give ~1e-8)
    return jnp.maximum(jnp.mean(k(dxx)) + jnp.mean(k(dyy)) - 2.0 * jnp.mean(k(dxy)), 0.0)
