"""Exact testbed priors: every quantity is checked against an independent reference written here (explicit
log-densities differentiated by ``jax.grad``, the precision form of the posterior, scipy densities, matrix-form
laws of the oracle estimators, Monte Carlo with its error bound)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg as sla
from scipy import stats

from mapreps_jax.diffusion import (alpha_bar, ddim_sigma, ddim_step, eps_from_x0, make_schedule, tweedie)
from mapreps_jax.metrics import mmd, sliced_w2
from mapreps_jax.priors import (GaussianPrior, GMMPrior, gaussian_fit, gaussian_w2, ideal_dp_curve,
                                operator_matrix, oracle_map_rps_dp, principled_weight, stage1_fixed_point,
                                svd_gains)

SCHED = make_schedule("linear", 1000)
T_VALUES = [-1, 0, 10, 500, 999, 3.7, 250.25, 998.5]


def a_of(t):
    return float(alpha_bar(SCHED, jnp.asarray(t)))


def f64(x):
    return np.asarray(x, np.float64)


# ------------------------------------------------------------------------------------------------ references

def log_normal(x, m, M):
    """log N(x; m, M), written out (float64 under x64)."""
    d = x.shape[-1]
    r = x - m
    _, logdet = jnp.linalg.slogdet(M)
    return -0.5 * r @ jnp.linalg.solve(M, r) - 0.5 * logdet - 0.5 * d * jnp.log(2 * jnp.pi)


def ref_mixture_eps(x, a, weights, means, covs):
    """-sqrt(1-a) grad log sum_k w_k N(x; sqrt(a) mu_k, a S_k + (1-a) I), by jax.grad in float64.
    ``means``: [K, d] or per-row [B, K, d]; ``weights``: [K] or [B, K]."""
    x, weights, means, covs = (f64(v) for v in (x, weights, means, covs))
    if means.ndim == 2:
        means = np.broadcast_to(means, (x.shape[0],) + means.shape)
        weights = np.broadcast_to(weights, (x.shape[0],) + weights.shape)
    with jax.enable_x64(True):
        g = _ref_grad_logp(jnp.asarray(x), jnp.float64(a), jnp.asarray(weights), jnp.asarray(means),
                           jnp.asarray(covs))
        return -math.sqrt(1 - a) * np.asarray(g)


@jax.jit
def _ref_grad_logp(x, a, weights, means, covs):
    d = x.shape[-1]

    def logp(xi, w, mus):
        comps = jnp.stack([jnp.log(w[k]) + log_normal(xi, jnp.sqrt(a) * mus[k], a * covs[k] + (1 - a) * jnp.eye(d))
                           for k in range(covs.shape[0])])
        return jax.scipy.special.logsumexp(comps)

    return jax.vmap(jax.grad(logp))(x, weights, means)


def precision_posterior(mu, S, A, sigma, y):
    """TESTBED form C = (S^-1 + A^T A / s^2)^-1, m = C (S^-1 mu + A^T y / s^2) in float64 numpy; y [B, m]."""
    mu, S, A, y = f64(mu), f64(S), f64(A), f64(y)
    Si = np.linalg.inv(S)
    C = np.linalg.inv(Si + A.T @ A / sigma**2)
    m = (C @ (Si @ mu[:, None] + A.T @ y.T / sigma**2)).T
    return m, C


def block_posterior(mu, S, A, sigma, y):
    """Joint-Gaussian block conditioning of x on y = A x + sigma n (valid at sigma = 0): float64 numpy."""
    mu, S, A, y = f64(mu), f64(S), f64(A), f64(y)
    Sxy, Syy = S @ A.T, A @ S @ A.T + sigma**2 * np.eye(A.shape[0])
    m = mu + (Sxy @ np.linalg.solve(Syy, (y - A @ mu).T)).T
    return m, S - Sxy @ np.linalg.solve(Syy, Sxy.T)


def gmm_posterior_weights_ref(prior, A, sigma, y):
    """Posterior weights by scipy densities pi_k N(y; A mu_k, A S_k A^T + s^2 I): [B, K]."""
    w, mus, covs, A, y = f64(prior.weights), f64(prior.means), f64(prior.covs), f64(A), f64(y)
    K = w.shape[0]
    logw = np.stack([np.log(w[k]) + stats.multivariate_normal(A @ mus[k], A @ covs[k] @ A.T
                                                              + sigma**2 * np.eye(A.shape[0])).logpdf(y)
                     for k in range(K)], axis=-1).reshape(y.shape[0], K)
    pw = np.exp(logw - logw.max(1, keepdims=True))
    return pw / pw.sum(1, keepdims=True)


def gmm_posterior_ref(prior, A, sigma, y):
    """Weights by scipy densities; components by the precision form (sigma > 0) or block conditioning (sigma = 0)."""
    form = precision_posterior if sigma > 0 else block_posterior
    ms, Cs = zip(*[form(mu, S, A, sigma, y) for mu, S in zip(f64(prior.means), f64(prior.covs))])
    return gmm_posterior_weights_ref(prior, A, sigma, y), np.stack(ms, axis=1), np.stack(Cs)


@pytest.fixture(scope="module")
def gauss():
    return GaussianPrior.random(jax.random.PRNGKey(0), 4)


@pytest.fixture(scope="module")
def gmm():
    return GMMPrior.random(jax.random.PRNGKey(1), 4, n_components=3)


@pytest.fixture(scope="module")
def A24():
    return jax.random.normal(jax.random.PRNGKey(2), (2, 4)) / 1.5


def _x(key, B=6, d=4, scale=2.0):
    return scale * jax.random.normal(jax.random.PRNGKey(key), (B, d))


# ------------------------------------------------------------------------------------------------ prior scores

@pytest.mark.parametrize("t", T_VALUES)
def test_gaussian_eps_is_scaled_score(gauss, t):
    x = _x(3)
    eps = gauss.score_model(SCHED).eps(x, t)
    a = a_of(t)
    ref = ref_mixture_eps(x, a, np.ones(1), f64(gauss.mu)[None], f64(gauss.cov)[None])
    np.testing.assert_allclose(eps, ref, rtol=2e-4, atol=2e-5)
    # the TESTBED closed form sqrt(1-a) (aS + (1-a)I)^{-1} (x - sqrt(a) mu), as a second reference
    M = a * f64(gauss.cov) + (1 - a) * np.eye(4)
    closed = math.sqrt(1 - a) * np.linalg.solve(M, (f64(x) - math.sqrt(a) * f64(gauss.mu)).T).T
    np.testing.assert_allclose(eps, closed, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("t", T_VALUES)
def test_gmm_eps_is_scaled_score(gmm, t):
    x = _x(4)
    eps = gmm.score_model(SCHED).eps(x, t)
    ref = ref_mixture_eps(x, a_of(t), gmm.weights, gmm.means, gmm.covs)
    np.testing.assert_allclose(eps, ref, rtol=5e-4, atol=5e-5)


def test_gmm_eps_equals_tweedie_form(gmm):
    """eps = (x_t - sqrt(a) E[x0|x_t]) / sqrt(1-a) with the TESTBED E[x0|x_t] (responsibilities by scipy)."""
    x, t = _x(5), 300
    a = a_of(t)
    eps = gmm.score_model(SCHED).eps(x, t)
    w, mus, covs = f64(gmm.weights), f64(gmm.means), f64(gmm.covs)
    X = f64(x)
    M = [a * covs[k] + (1 - a) * np.eye(4) for k in range(3)]
    logr = np.stack([np.log(w[k]) + stats.multivariate_normal(math.sqrt(a) * mus[k], M[k]).logpdf(X)
                     for k in range(3)], -1)
    r = np.exp(logr - logr.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    ex0 = sum(r[:, k:k + 1] * (mus[k] + math.sqrt(a) * (covs[k] @ np.linalg.solve(M[k], (X - math.sqrt(a) * mus[k]).T)).T)
              for k in range(3))
    np.testing.assert_allclose(eps, (X - math.sqrt(a) * ex0) / math.sqrt(1 - a), rtol=5e-4, atol=5e-5)


@pytest.mark.parametrize("which", ["gauss", "gmm"])
def test_real_t_at_integer_equals_integer_t_and_per_sample_t(which, gauss, gmm):
    model = (gauss if which == "gauss" else gmm).score_model(SCHED)
    x = _x(6, B=4)
    for t in (0, 17, 640, 999):
        np.testing.assert_allclose(model.eps(x, float(t)), model.eps(x, t), rtol=2e-5, atol=1e-6)
    ts = jnp.array([0, 17, 640, 999])
    per_row = jnp.stack([model.eps(x[i:i + 1], ts[i])[0] for i in range(4)])
    np.testing.assert_allclose(model.eps(x, ts), per_row, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.eps(x, ts.astype(jnp.float32) + 0.5),
                               jnp.stack([model.eps(x[i:i + 1], float(ts[i]) + 0.5)[0] for i in range(4)]),
                               rtol=1e-6, atol=1e-7)


def test_eps_differentiable_in_real_t(gmm):
    model = gmm.score_model(SCHED)
    x = _x(7, B=3)
    f = jax.jit(lambda t: jnp.sum(model.eps(x, t) ** 2))
    t0, h = 100.3, 0.05  # within one interpolation interval: central difference is accurate
    fd = (f(t0 + h) - f(t0 - h)) / (2 * h)
    g = jax.grad(f)(jnp.float32(t0))
    np.testing.assert_allclose(g, fd, rtol=2e-2)
    assert np.isfinite(g)


def test_model_is_a_pytree_jit_traces_once():
    traces = []

    @jax.jit
    def f(model, x, t):
        traces.append(1)
        return model.eps(x, t)

    x = _x(8)
    p1 = GaussianPrior.random(jax.random.PRNGKey(10), 4)
    p2 = GaussianPrior.random(jax.random.PRNGKey(11), 4)
    for p in (p1, p2):
        m = p.score_model(SCHED)
        np.testing.assert_allclose(f(m, x, 42), m.eps(x, 42), rtol=1e-5, atol=1e-6)
    assert len(traces) == 1


# ------------------------------------------------------------------------------------------------ sampling

def test_prior_samples_moments(gauss, gmm):
    n = 20000
    xs = gauss.sample(jax.random.PRNGKey(12), n)
    m, C = gaussian_fit(xs)
    sd = np.sqrt(np.diag(f64(gauss.cov)))
    assert np.all(np.abs(f64(m) - f64(gauss.mu)) < 5 * sd / math.sqrt(n))
    tol = 5 * np.sqrt((np.outer(sd**2, sd**2) + f64(gauss.cov) ** 2) / n)
    assert np.all(np.abs(f64(C) - f64(gauss.cov)) < tol)

    xs = gmm.sample(jax.random.PRNGKey(13), n)
    w, mus, covs = f64(gmm.weights), f64(gmm.means), f64(gmm.covs)
    mean = w @ mus
    cov = np.einsum("k,kde->de", w, covs) + np.einsum("k,kd,ke->de", w, mus, mus) - np.outer(mean, mean)
    m, C = gaussian_fit(xs)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(f64(m) - mean) < 5 * sd / math.sqrt(n))
    np.testing.assert_allclose(C, cov, atol=0.12 * np.max(np.diag(cov)))


def test_gmm_random_recipe():
    g1 = GMMPrior.random(jax.random.PRNGKey(3), 3, n_components=5, radius=2.0, var_range=(0.1, 0.5))
    g2 = GMMPrior.random(jax.random.PRNGKey(3), 3, n_components=5, radius=2.0, var_range=(0.1, 0.5))
    np.testing.assert_array_equal(g1.means, g2.means)
    np.testing.assert_array_equal(g1.covs, g2.covs)
    np.testing.assert_allclose(np.sum(g1.weights), 1.0, rtol=1e-6)
    mus = f64(g1.means)
    dist = np.linalg.norm(mus[:, None] - mus[None], axis=-1)[np.triu_indices(5, 1)]
    assert dist.min() >= 2.0 * math.sqrt(2) - 1e-4
    np.testing.assert_allclose(np.linalg.norm(mus, axis=1), 2.0, rtol=1e-5)
    ev = np.linalg.eigvalsh(f64(g1.covs))
    assert ev.min() >= 0.1 - 1e-5 and ev.max() <= 0.5 + 1e-5
    # covariances are genuinely rotated (not diagonal)
    assert np.abs(f64(g1.covs) - np.stack([np.diag(np.diag(c)) for c in f64(g1.covs)])).max() > 1e-2
    g3 = GMMPrior.random(jax.random.PRNGKey(4), 3, n_components=5)
    assert not np.allclose(g1.means, g3.means)


# ------------------------------------------------------------------------------------------------ posteriors

@pytest.mark.parametrize("sigma", [0.3, 0.02])
def test_gaussian_posterior_vs_precision_form(gauss, A24, sigma):
    y = jax.random.normal(jax.random.PRNGKey(14), (5, 2))
    post = gauss.posterior(A24, sigma, y)
    m_ref, C_ref = precision_posterior(gauss.mu, gauss.cov, A24, sigma, y)
    np.testing.assert_allclose(post.mean, m_ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(post.cov, C_ref, rtol=1e-4, atol=2e-5)
    mean, cov = post  # unpacks
    assert mean.shape == (5, 4) and cov.shape == (4, 4)


def test_gaussian_posterior_noiseless(gauss, A24):
    """sigma_y = 0: joint-Gaussian block conditioning written here; A m = y and A C = 0."""
    y = jax.random.normal(jax.random.PRNGKey(15), (3, 2))
    post = gauss.posterior(A24, 0.0, y)
    S, A, mu = f64(gauss.cov), f64(A24), f64(gauss.mu)
    m_ref, C_ref = block_posterior(mu, S, A, 0.0, y)
    np.testing.assert_allclose(post.mean, m_ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(post.cov, C_ref, atol=2e-5)
    np.testing.assert_allclose(f64(post.mean) @ A.T, f64(y), atol=5e-5)
    np.testing.assert_allclose(A @ f64(post.cov), 0.0, atol=5e-5)
    # continuity: the precision form at a tiny sigma tends to the same limit
    m_small, C_small = precision_posterior(mu, S, A, 1e-4, y)
    np.testing.assert_allclose(post.mean, m_small, rtol=1e-4, atol=1e-4)


def test_matrix_and_function_operator_agree(gauss, gmm):
    kern = jnp.array([0.5, -0.25, 1.0])
    A_fn = lambda x: jnp.convolve(x, kern, mode="valid")  # [4] -> [2]
    A_mat = np.stack([np.asarray(A_fn(jnp.eye(4)[j])) for j in range(4)], axis=1)  # column j = A e_j
    np.testing.assert_allclose(operator_matrix(A_fn, 4), A_mat, atol=1e-7)
    y = jax.random.normal(jax.random.PRNGKey(16), (3, 2))
    for prior in (gauss, gmm):
        p1, p2 = prior.posterior(A_mat, 0.2, y), prior.posterior(A_fn, 0.2, y)
        np.testing.assert_allclose(p1.mean, p2.mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(p1.cov, p2.cov, rtol=1e-6, atol=1e-7)
        x = _x(17, B=3)
        e1 = prior.posterior_model(A_mat, 0.2, SCHED).eps(x, 50, y)
        e2 = prior.posterior_model(A_fn, 0.2, SCHED).eps(x, 50, y)
        np.testing.assert_allclose(e1, e2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.25, 0.0])
def test_gmm_posterior_vs_scipy(gmm, A24, sigma):
    y = (f64(gmm.sample(jax.random.PRNGKey(18), 4)) @ f64(A24).T
         + sigma * np.asarray(jax.random.normal(jax.random.PRNGKey(19), (4, 2))))
    post = gmm.posterior(A24, sigma, y)
    w_ref, m_ref, C_ref = gmm_posterior_ref(gmm, A24, sigma, y)
    np.testing.assert_allclose(post.weights, w_ref, atol=2e-5)
    np.testing.assert_allclose(post.means, m_ref, rtol=2e-4, atol=5e-5)
    np.testing.assert_allclose(post.covs, C_ref, rtol=2e-4, atol=5e-5)
    np.testing.assert_allclose(post.mean, np.einsum("bk,bkd->bd", w_ref, m_ref), rtol=2e-4, atol=5e-5)


def test_gmm_posterior_samples_moments(gmm, A24):
    y = jnp.array([[0.7, -1.2], [2.0, 0.1]])
    post = gmm.posterior(A24, 0.3, y)
    n = 20000
    xs = post.sample(jax.random.PRNGKey(20), n)
    assert xs.shape == (n, 2, 4)
    w, ms, Cs = gmm_posterior_ref(gmm, A24, 0.3, y)
    for b in range(2):
        mean = w[b] @ ms[b]
        cov = np.einsum("k,kde->de", w[b], Cs) + np.einsum("k,kd,ke->de", w[b], ms[b], ms[b]) - np.outer(mean, mean)
        np.testing.assert_allclose(post.cov[b], cov, rtol=2e-4, atol=5e-5)
        m, C = gaussian_fit(xs[:, b])
        sd = np.sqrt(np.diag(cov))
        assert np.all(np.abs(f64(m) - mean) < 5 * sd / math.sqrt(n))
        np.testing.assert_allclose(C, cov, atol=0.1 * np.max(np.diag(cov)))


def test_gaussian_posterior_samples_moments(gauss, A24):
    y = jnp.array([[0.3, -0.4]])
    post = gauss.posterior(A24, 0.2, y)
    n = 20000
    xs = post.sample(jax.random.PRNGKey(21), n)[:, 0]
    m, C = gaussian_fit(xs)
    sd = np.sqrt(np.diag(f64(post.cov)))
    assert np.all(np.abs(f64(m) - f64(post.mean[0])) < 5 * sd / math.sqrt(n))
    tol = 5 * np.sqrt((np.outer(sd**2, sd**2) + f64(post.cov) ** 2) / n)
    assert np.all(np.abs(f64(C) - f64(post.cov)) < tol)


# ------------------------------------------------------------------------------------------------ posterior models

@pytest.mark.parametrize("t", [-1, 5, 400.5, 999])
@pytest.mark.parametrize("which", ["gauss", "gmm"])
def test_posterior_model_eps_is_diffused_posterior_score(which, gauss, gmm, A24, t):
    prior = gauss if which == "gauss" else gmm
    sigma = 0.3
    y = jax.random.normal(jax.random.PRNGKey(22), (5, 2))
    x = _x(23, B=5)
    eps = prior.posterior_model(A24, sigma, SCHED).eps(x, t, y)
    if which == "gauss":
        m, C = precision_posterior(gauss.mu, gauss.cov, A24, sigma, y)
        ref = ref_mixture_eps(x, a_of(t), np.ones((5, 1)), m[:, None], C[None])
    else:
        w, m, C = gmm_posterior_ref(gmm, A24, sigma, y)
        ref = ref_mixture_eps(x, a_of(t), w, m, C)
    np.testing.assert_allclose(eps, ref, rtol=5e-4, atol=5e-5)


def test_posterior_model_noiseless(gmm, A24):
    """sigma_y = 0: the diffused posterior is degenerate only at a = 1; eps is finite (0) there and exact elsewhere."""
    y = jax.random.normal(jax.random.PRNGKey(41), (3, 2))
    x = _x(42, B=3)
    pm = gmm.posterior_model(A24, 0.0, SCHED)
    np.testing.assert_allclose(pm.eps(x, -1, y), 0.0, atol=1e-6)
    w, m, C = gmm_posterior_ref(gmm, A24, 0.0, y)
    # (at small t the near-degenerate mixture makes float32 responsibilities ill-conditioned, as the docstring of
    # posterior_model says; at t = 50 the float32 error already depends on the CPU: 5e-4 at an entry of -0.33 on some
    # machines. t >= 100 here.)
    for t in (100, 250.5):
        np.testing.assert_allclose(pm.eps(x, t, y), ref_mixture_eps(x, a_of(t), w, m, C), rtol=1e-3, atol=1e-4)


def test_posterior_model_tweedie_means(gauss, gmm, A24):
    sigma = 0.3
    y = jax.random.normal(jax.random.PRNGKey(24), (4, 2))
    # Gaussian: at x_t = sqrt(a) m the Tweedie mean is m exactly, at every t
    pm = gauss.posterior_model(A24, sigma, SCHED)
    m, C = precision_posterior(gauss.mu, gauss.cov, A24, sigma, y)
    for t in (0, 10, 300, 999):
        a = a_of(t)
        xt = jnp.asarray(math.sqrt(a) * m, jnp.float32)
        np.testing.assert_allclose(tweedie(xt, pm.eps(xt, t, y), a), m, rtol=1e-3, atol=1e-4)
    # ... and at any x_t it is m + sqrt(a) C (aC + (1-a)I)^{-1} (x_t - sqrt(a) m)
    x = _x(25, B=4)
    a = a_of(200)
    M = a * C + (1 - a) * np.eye(4)
    ref = m + math.sqrt(a) * (C @ np.linalg.solve(M, (f64(x) - math.sqrt(a) * m).T)).T
    np.testing.assert_allclose(tweedie(x, pm.eps(x, 200, y), a), ref, rtol=1e-3, atol=2e-4)
    # GMM: at the largest t the Tweedie mean of the diffused posterior is (nearly) the MMSE sum pi'_k m_k,
    # while at the smallest noise it is (nearly) x_t itself
    pm = gmm.posterior_model(A24, sigma, SCHED)
    mmse = f64(gmm.posterior(A24, sigma, y).mean)
    a = a_of(999)
    np.testing.assert_allclose(tweedie(x, pm.eps(x, 999, y), a), mmse, atol=0.05)
    assert np.abs(f64(tweedie(x, pm.eps(x, 999, y), a)) - mmse).max() < 0.2 * np.abs(f64(x) - mmse).max()
    np.testing.assert_allclose(tweedie(x, pm.eps(x, -1, y), 1.0), x, atol=1e-6)


def _ddpm_oracle(key, model, y, n, d):
    """Plain 1000-step ancestral DDPM (eta = 1) from N(0, I), eps re-derived from x0, no clipping."""
    yb = jnp.broadcast_to(y, (n, y.shape[-1]))
    k0, key = jax.random.split(key)
    x = jax.random.normal(k0, (n, d))

    def step(x, inp):
        i, k = inp
        a_i, a_j = alpha_bar(SCHED, i), alpha_bar(SCHED, i - 1)
        eps = model.eps(x, i, yb)
        x0 = tweedie(x, eps, a_i)
        eps = eps_from_x0(x, x0, a_i)
        return ddim_step(k, x0, eps, a_j, ddim_sigma(a_i, a_j, 1.0)), None

    ts = jnp.arange(SCHED.T - 1, -1, -1)
    x, _ = jax.jit(lambda x: jax.lax.scan(step, x, (ts, jax.random.split(key, SCHED.T))))(x)
    return x


def test_oracle_ddpm_gaussian_matches_posterior(gauss, A24):
    y = jnp.array([[0.5, -0.8]])
    n = 2000
    xs = _ddpm_oracle(jax.random.PRNGKey(26), gauss.posterior_model(A24, 0.2, SCHED), y, n, 4)
    post = gauss.posterior(A24, 0.2, y)
    m, C = gaussian_fit(xs)
    sd = np.sqrt(np.diag(f64(post.cov)))
    assert np.all(np.abs(f64(m) - f64(post.mean[0])) < 5 * sd / math.sqrt(n))
    tol = 5 * np.sqrt((np.outer(sd**2, sd**2) + f64(post.cov) ** 2) / n)
    assert np.all(np.abs(f64(C) - f64(post.cov)) < tol)


def test_oracle_ddpm_gmm_matches_posterior_samples():
    prior = GMMPrior.random(jax.random.PRNGKey(27), 2, n_components=4)
    A = jnp.array([[1.0, 0.4]])
    sigma = 0.3
    y = prior.sample(jax.random.PRNGKey(28), 1) @ A.T
    post = prior.posterior(A, sigma, y)
    assert np.sum(f64(post.weights) > 0.05) >= 2, "test set-up should give a multimodal posterior"
    n = 2000
    oracle = _ddpm_oracle(jax.random.PRNGKey(29), prior.posterior_model(A, sigma, SCHED), y, n, 2)
    ex1 = post.sample(jax.random.PRNGKey(30), n)[:, 0]
    ex2 = post.sample(jax.random.PRNGKey(31), n)[:, 0]
    wrong = prior.sample(jax.random.PRNGKey(32), n)
    kp = jax.random.PRNGKey(33)
    sw_base, sw_oracle, sw_wrong = (float(sliced_w2(kp, z, ex1)) for z in (ex2, oracle, wrong))
    mmd_base, mmd_oracle, mmd_wrong = (float(mmd(z, ex1)) for z in (ex2, oracle, wrong))
    assert sw_oracle < 2.0 * sw_base, (sw_oracle, sw_base)
    assert mmd_oracle < 3.0 * mmd_base + 1e-4, (mmd_oracle, mmd_base)
    # the comparison is discriminative: prior samples (the wrong law) are far outside the baseline
    assert sw_wrong > 5 * sw_base and mmd_wrong > 10 * mmd_base


# ------------------------------------------------------------------------------------------------ closed forms

def test_gaussian_w2_closed_forms():
    # 1-D: W2 = sqrt((m1-m2)^2 + (s1-s2)^2)
    w = gaussian_w2(jnp.array([0.3]), jnp.array([[4.0]]), jnp.array([-1.0]), jnp.array([[0.25]]))
    np.testing.assert_allclose(w, math.sqrt(1.3**2 + 1.5**2), rtol=1e-6)
    # commuting covariances (same eigenbasis): W2^2 = |dm|^2 + sum (sqrt l1 - sqrt l2)^2
    Q = np.linalg.qr(np.asarray(jax.random.normal(jax.random.PRNGKey(34), (5, 5)), np.float64))[0]
    l1, l2 = np.array([0.1, 0.5, 1.0, 2.0, 3.0]), np.array([1.0, 0.2, 0.3, 2.5, 0.05])
    m1, m2 = np.arange(5.0) / 5, np.ones(5) / 3
    S1, S2 = (Q * l1) @ Q.T, (Q * l2) @ Q.T
    ref = math.sqrt(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2))
    np.testing.assert_allclose(gaussian_w2(m1, S1, m2, S2), ref, rtol=1e-5)
    # general (non-commuting) covariances: scipy sqrtm reference; symmetric; zero on itself
    S3 = f64(GaussianPrior.random(jax.random.PRNGKey(35), 5).cov)
    r1 = sla.sqrtm(S1)
    ref = math.sqrt(np.sum((m1 - m2) ** 2) + np.trace(S1 + S3 - 2 * np.real(sla.sqrtm(r1 @ S3 @ r1))))
    np.testing.assert_allclose(gaussian_w2(m1, S1, m2, S3), ref, rtol=1e-4)
    np.testing.assert_allclose(gaussian_w2(m2, S3, m1, S1), ref, rtol=1e-4)
    assert float(gaussian_w2(m1, S1, m1, S1)) < 2e-3


ISO = dict(s=1.3, l=np.array([2.0, 0.7, 0.2]), d=5, sigma=0.2)


def _iso_problem():
    s, l, d = ISO["s"], ISO["l"], ISO["d"]
    U = np.linalg.qr(np.asarray(jax.random.normal(jax.random.PRNGKey(36), (3, 3)), np.float64))[0]
    V = np.linalg.qr(np.asarray(jax.random.normal(jax.random.PRNGKey(37), (d, d)), np.float64))[0]
    A = U @ np.diag(l) @ V[:, :3].T  # [3, 5], singular values l, two null directions
    return GaussianPrior.isotropic(d, s), A


def test_svd_gains_match_matrix_posterior():
    prior, A = _iso_problem()
    s, d = ISO["s"], ISO["d"]
    gains = svd_gains(s, ISO["l"], d, ISO["sigma"])
    _, C = precision_posterior(prior.mu, prior.cov, A, ISO["sigma"], np.zeros((1, 3)))
    np.testing.assert_allclose(gains.D_star, np.trace(C), rtol=1e-5)
    np.testing.assert_allclose(np.sort(f64(gains.v)), np.sort(np.linalg.eigvalsh(C)), rtol=1e-5, atol=1e-7)
    # P* = W2(prior, law of X*), Cov(X*) = S - C (law of total variance)
    S = s**2 * np.eye(d)
    with jax.enable_x64(True):  # the reference W2 in float64 (float32 square roots of S - C err by ~1e-4)
        w2_ref = float(gaussian_w2(np.zeros(d), S, np.zeros(d), f64(S) - f64(C)))
    np.testing.assert_allclose(gains.P_star, w2_ref, rtol=1e-4)
    # sigma = 0: measured directions fully known
    g0 = svd_gains(s, ISO["l"], d, 0.0)
    np.testing.assert_allclose(g0.g, [1, 1, 1, 0, 0])
    np.testing.assert_allclose(g0.D_star, 2 * s**2, rtol=1e-6)
    with pytest.raises(ValueError, match="singular_values"):
        svd_gains(1.0, np.ones(6), 5, 0.1)


def _oracle_law(prior, A, sigma, a0):
    """Matrix-form law of oracle MAP-RPS: out = E[x0 | x_t0, y] + conditional noise, x_t0 = renoise(X*, a0).
    Returns (D = E|out - x|^2, Cov(out)); float64, no SVD."""
    S, mu = f64(prior.cov), f64(prior.mu)
    d = S.shape[0]
    _, C = precision_posterior(mu, S, A, sigma, np.zeros((1, A.shape[0])))
    M = a0 * C + (1 - a0) * np.eye(d)
    G = math.sqrt(a0) * C @ np.linalg.inv(M)  # E[x0|x_t,y] = m + G (x_t - sqrt(a0) m)
    noise_cov = (1 - a0) * G @ G.T + (C - G @ (math.sqrt(a0) * C))  # renoising spread + conditional covariance
    D = np.trace(C) + np.trace(noise_cov)
    return D, (S - C) + noise_cov


def test_oracle_map_rps_closed_form_vs_matrix_law():
    prior, A = _iso_problem()
    s, d = ISO["s"], ISO["d"]
    a0s = np.array([1.0, 0.999, 0.9, 0.5, 0.1, 1e-3, 0.0])
    D, P = oracle_map_rps_dp(s, ISO["l"], d, ISO["sigma"], a0s)
    assert D.shape == P.shape == (7,)
    for i, a0 in enumerate(a0s):
        D_ref, cov_out = _oracle_law(prior, A, ISO["sigma"], a0)
        P_ref = gaussian_w2(np.zeros(d), s**2 * np.eye(d), np.zeros(d), cov_out)
        np.testing.assert_allclose(D[i], D_ref, rtol=1e-5)
        np.testing.assert_allclose(P[i], P_ref, rtol=1e-3, atol=1e-3)
        Ds, Ps = oracle_map_rps_dp(s, ISO["l"], d, ISO["sigma"], float(a0))  # scalar a0: same values
        np.testing.assert_allclose([Ds, Ps], [D[i], P[i]], rtol=1e-6)
    g = svd_gains(s, ISO["l"], d, ISO["sigma"])
    np.testing.assert_allclose([D[0], P[0]], [g.D_star, g.P_star], rtol=1e-6)  # a0 = 1: (D*, P*)
    np.testing.assert_allclose([D[-1], P[-1]], [2 * g.D_star, 0.0], rtol=1e-6, atol=1e-6)  # a0 = 0: (2D*, 0)
    assert np.all(np.diff(f64(D)) >= -1e-6) and np.all(np.diff(f64(P)) <= 1e-6)  # monotone as a0 decreases
    # every oracle point lies on or above the ideal D-P curve (a bound), strictly above inside
    ideal = ideal_dp_curve(P, g.D_star, g.P_star)
    assert np.all(f64(D) >= f64(ideal) - 1e-5)
    assert f64(D)[3] > f64(ideal)[3] + 1e-3


def test_ideal_dp_curve():
    P = jnp.array([0.0, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(ideal_dp_curve(P, 3.0, 1.0), [4.0, 3.25, 3.0, 3.0])
    # posterior sampling (2 D*, 0) is above the curve's P = 0 end D* + P*^2 (TESTBED isotropic formulas)
    g = svd_gains(1.3, ISO["l"], 5, 0.2)
    assert float(2 * g.D_star) >= float(ideal_dp_curve(0.0, g.D_star, g.P_star))


def test_tweedie_variance_and_principled_weight():
    p = GaussianPrior.random(jax.random.PRNGKey(38), 4)
    S = f64(p.cov)
    for a in (0.999, 0.9, 0.3):
        cov_ref = S - a * S @ np.linalg.solve(a * S + (1 - a) * np.eye(4), S)  # Cov[x0 | x_t]
        np.testing.assert_allclose(p.tweedie_covariance(a), cov_ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(p.tweedie_variance(a), np.trace(cov_ref) / 4, rtol=1e-4)
        iso = GaussianPrior.isotropic(4, 0.7)
        np.testing.assert_allclose(iso.tweedie_variance(a), 0.49 * (1 - a) / (a * 0.49 + 1 - a), rtol=5e-5)
        np.testing.assert_allclose(principled_weight(0.1, a), 2 * 0.01 * math.sqrt(a / (1 - a)), rtol=1e-5)
        np.testing.assert_allclose(principled_weight(0.1, a, iso.tweedie_variance(a)),
                                   2 * 0.01 * (a * 0.49 + 1 - a) / (0.49 * math.sqrt(a * (1 - a))), rtol=1e-5)


def test_stage1_fixed_point_principled_weight_is_posterior_mean():
    prior, A = _iso_problem()
    sigma = ISO["sigma"]
    y = jax.random.normal(jax.random.PRNGKey(39), (6, 3))
    m_ref, _ = precision_posterior(prior.mu, prior.cov, A, sigma, y)
    for t1 in (10, 37.5, 400):
        a = a_of(t1)
        w = principled_weight(sigma, a, prior.tweedie_variance(a))
        np.testing.assert_allclose(stage1_fixed_point(prior, A, y, sigma, w, a), m_ref, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(stage1_fixed_point(prior, A, y, sigma, "auto", a), m_ref, rtol=2e-4, atol=2e-5)
    # the image-prior default r2 = (1-a)/a is close to exact only for a -> 1: at t1 = 400 (a ~ 0.19) the weight
    # is off by the factor (a s^2 + 1 - a) / (a s^2) and the fixed point misses X*
    a = a_of(400)
    x_def = stage1_fixed_point(prior, A, y, sigma, principled_weight(sigma, a), a)
    assert np.abs(f64(x_def) - m_ref).max() > 1e-2


def test_stage1_fixed_point_is_stationary_for_the_exact_eps(gauss, A24):
    """Any w, non-isotropic prior: 2 A^T (A x - y) + w E_n[eps(sqrt(a) x + sqrt(1-a) n, t1)] = 0, where the exact eps is
    affine so E_n[eps(.)] = eps(sqrt(a) x) (evaluated through the score model at real t1)."""
    y = jax.random.normal(jax.random.PRNGKey(40), (4, 2))
    t1, w = 12.5, 0.37
    a = a_of(t1)
    x = stage1_fixed_point(gauss, A24, y, 0.1, w, a)
    e = gauss.score_model(SCHED).eps(math.sqrt(a) * x, t1)
    grad = 2 * (f64(x) @ f64(A24).T - f64(y)) @ f64(A24) + w * f64(e)
    assert np.abs(grad).max() < 1e-4 * max(1.0, np.abs(f64(e)).max() * w)


# ------------------------------------------------------------------------------------------------ validation

def test_input_validation(gauss, gmm, A24):
    with pytest.raises(ValueError, match="y must be batched"):
        gauss.posterior(A24, 0.1, jnp.ones(2))
    with pytest.raises(ValueError, match=r"y must be batched with shape \[B, 2\]"):
        gmm.posterior(A24, 0.1, jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="A must be a matrix"):
        gauss.posterior(jnp.ones((2, 5)), 0.1, jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="sigma_y"):
        gauss.posterior(A24, -0.1, jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="finite"):
        gauss.posterior(A24, 0.1, jnp.array([[jnp.nan, 0.0]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianPrior(jnp.zeros(2), jnp.array([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="cov must have shape"):
        GaussianPrior(jnp.zeros(2), jnp.eye(3))
    with pytest.raises(ValueError, match="covs must have shape"):
        GMMPrior(jnp.ones(2), jnp.zeros((2, 3)), jnp.ones((2, 3, 2)))
    with pytest.raises(ValueError, match="t must be a scalar"):
        gauss.score_model(SCHED).eps(jnp.zeros((3, 4)), jnp.zeros(2))
    with pytest.raises(ValueError, match="cond"):
        gauss.posterior_model(A24, 0.1, SCHED).eps(jnp.zeros((3, 4)), 5)
    with pytest.raises(TypeError, match="schedule"):
        gauss.score_model("linear")
