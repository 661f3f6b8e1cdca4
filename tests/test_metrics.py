"""Metrics against hand computations, closed forms and exact properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapreps_jax.metrics import frechet_distance, mmd, psnr, rmse, sliced_w2, ssim
from mapreps_jax.priors import gaussian_fit, gaussian_w2


def _imgs(key, shape=(3, 16, 16, 3)):
    return jax.random.uniform(jax.random.PRNGKey(key), shape, minval=-1.0, maxval=1.0)


def test_rmse_and_psnr_by_hand():
    x = _imgs(0)
    delta = 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape) * jnp.array([1.0, 2.0, 0.5])[:, None, None, None]
    y = x + delta
    x01, y01 = (np.asarray(x, np.float64) + 1) / 2, (np.asarray(y, np.float64) + 1) / 2
    mse = ((x01 - y01) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(psnr(y, x), 10 * np.log10(1.0 / mse), rtol=1e-5)
    np.testing.assert_allclose(rmse(y, x), np.sqrt(mse), rtol=1e-5)
    np.testing.assert_allclose(psnr(y, x), -20 * np.log10(np.asarray(rmse(y, x))), rtol=1e-5)
    # a constant offset of 0.2 in [-1,1] units is 0.1 on [0,1]: rmse 0.1, psnr 20 dB
    np.testing.assert_allclose(rmse(x + 0.2, x), 0.1, rtol=1e-5)
    np.testing.assert_allclose(psnr(x + 0.2, x), 20.0, rtol=1e-5)
    assert np.all(np.isinf(psnr(x, x)))


def test_ssim_identity_noise_and_constant_images():
    x = _imgs(2, (2, 24, 24, 3))
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-5)
    vals = [float(ssim(x + s * jax.random.normal(jax.random.PRNGKey(3), x.shape), x)[0]) for s in (0.05, 0.2, 0.5)]
    assert 1.0 > vals[0] > vals[1] > vals[2]
    # constant images c1, c2 (in [-1,1]): only the luminance term survives,
    # SSIM = (2 u1 u2 + C1) / (u1^2 + u2^2 + C1) with u = (c+1)/2 and C1 = (0.01 * 1)^2 (data range 1)
    c1, c2 = 0.4, -0.3
    a, b = jnp.full((1, 16, 16, 1), c1), jnp.full((1, 16, 16, 1), c2)
    u1, u2, C1 = (c1 + 1) / 2, (c2 + 1) / 2, 0.01**2
    np.testing.assert_allclose(ssim(a, b), (2 * u1 * u2 + C1) / (u1**2 + u2**2 + C1), rtol=1e-5)


def test_image_metric_validation():
    x = _imgs(4)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:, :8])
    with pytest.raises(ValueError, match="finite"):
        rmse(x.at[0, 0, 0, 0].set(jnp.nan), x)
    with pytest.raises(ValueError, match="11x11"):
        ssim(x[:, :8, :8], x[:, :8, :8])
    with pytest.raises(ValueError, match="NHWC"):
        ssim(x.reshape(3, 16, 16, 3, 1), x.reshape(3, 16, 16, 3, 1))


def _gauss_samples(key, n, d, mean=0.0, cov=None):
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(key), (n, d)), np.float64)
    if cov is not None:
        z = z @ np.linalg.cholesky(cov).T
    return z + mean


def test_frechet_distance():
    rng = np.random.default_rng(0)
    B = rng.normal(size=(5, 5))
    cov = B @ B.T / 5 + 0.2 * np.eye(5)
    X = _gauss_samples(5, 3000, 5, cov=cov)
    Y = _gauss_samples(6, 2000, 5, mean=0.3, cov=np.diag(np.linspace(0.5, 2.0, 5)))
    # equals gaussian_w2^2 of the fitted Gaussians (two independent implementations)
    with jax.enable_x64(True):
        m1, S1 = gaussian_fit(jnp.asarray(X))
        m2, S2 = gaussian_fit(jnp.asarray(Y))
        ref = float(gaussian_w2(m1, S1, m2, S2)) ** 2
    np.testing.assert_allclose(frechet_distance(X, Y), ref, rtol=1e-6)
    # two large samples of one Gaussian: ~0 (Monte Carlo bias only)
    X2 = _gauss_samples(7, 20000, 5, cov=cov)
    X3 = _gauss_samples(8, 20000, 5, cov=cov)
    assert frechet_distance(X2, X3) < 0.01 * np.trace(cov)
    # a pure shift dm: FD = |dm|^2 (covariances identical)
    dm = np.array([0.5, -1.0, 0.0, 0.25, 2.0])
    np.testing.assert_allclose(frechet_distance(X2, X2 + dm), np.sum(dm**2), rtol=1e-8)
    with pytest.raises(ValueError, match="feature dimension"):
        frechet_distance(X, Y[:, :4])


def test_sliced_w2():
    key = jax.random.PRNGKey(9)
    X = jnp.asarray(_gauss_samples(10, 500, 3), jnp.float32)
    assert float(sliced_w2(key, X, X)) == 0.0
    # 1-D: the exact W2 between equal-size empirical laws is the sorted-sample RMS difference
    x1 = np.asarray(X[:, :1], np.float64)
    y1 = np.asarray(_gauss_samples(11, 500, 1), np.float64) * 1.5 + 0.3
    np.testing.assert_allclose(sliced_w2(key, x1, y1, n_proj=3),
                               np.sqrt(np.mean((np.sort(x1[:, 0]) - np.sort(y1[:, 0])) ** 2)), rtol=1e-5)
    # unequal sizes: duplicating every sample leaves the empirical law, hence the distance, unchanged
    Y = jnp.asarray(_gauss_samples(12, 300, 3), jnp.float32) + 0.5
    np.testing.assert_allclose(sliced_w2(key, jnp.concatenate([X, X]), Y), sliced_w2(key, X, Y), rtol=1e-5)
    # 1-D unequal sizes against a hand computation on a fine common quantile grid
    a, b = np.array([0.0, 1.0, 3.0]), np.array([0.5, 2.0])
    u = (np.arange(60000) + 0.5) / 60000
    ref = np.sqrt(np.mean((np.sort(a)[(u * 3).astype(int)] - np.sort(b)[(u * 2).astype(int)]) ** 2))
    np.testing.assert_allclose(sliced_w2(key, a[:, None], b[:, None], n_proj=1), ref, rtol=1e-4)
    # grows with a mean shift; a pure shift by c e_1 gives sqrt(mean (theta_1 c)^2) ~ c / sqrt(d)
    vals = [float(sliced_w2(key, X, X + jnp.array([c, 0.0, 0.0]), n_proj=2000)) for c in (0.5, 1.0, 2.0)]
    assert vals[0] < vals[1] < vals[2]
    np.testing.assert_allclose(vals, np.array([0.5, 1.0, 2.0]) / math.sqrt(3), rtol=0.05)
    with pytest.raises(ValueError, match="n_proj"):
        sliced_w2(key, X, Y, n_proj=0)


def test_mmd():
    X = jnp.asarray(_gauss_samples(13, 400, 2), jnp.float32)
    same = float(mmd(X, X))
    assert 0.0 <= same < 1e-6  # exactly 0 in exact arithmetic
    vals = [float(mmd(X, X + jnp.array([c, 0.0]))) for c in (0.2, 0.5, 1.5)]
    assert 1e3 * same < vals[0] < vals[1] < vals[2]
    # tiny sets: biased MMD^2 with the RBF kernel written as a double loop
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) + 0.7
    h = 0.9
    k = lambda u, v: math.exp(-np.sum((u - v) ** 2) / (2 * h * h))
    ref = (sum(k(u, v) for u in a for v in a) / 25 + sum(k(u, v) for u in b for v in b) / 16
           - 2 * sum(k(u, v) for u in a for v in b) / 20)
    np.testing.assert_allclose(mmd(a, b, bandwidth=h), ref, rtol=1e-5)
    # median heuristic: h^2 = median squared pairwise distance of the pooled set
    z = np.concatenate([a, b])
    d2 = np.sum((z[:, None] - z[None]) ** 2, -1)[np.triu_indices(9, 1)]
    np.testing.assert_allclose(mmd(a, b), mmd(a, b, bandwidth=math.sqrt(np.median(d2))), rtol=1e-5)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(a, b, bandwidth=-1.0)
    with pytest.raises(ValueError, match="finite"):
        mmd(np.array([[np.inf, 0.0], [0.0, 0.0]]), np.zeros((3, 2)))
