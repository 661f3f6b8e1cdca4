"""Continuous-time Stage 2 (diffrax reverse SDE): oracle closed form of TESTBED.md, differentiability in t0."""
import jax
import jax.numpy as jnp
import numpy as np

import mapreps_jax as mr
from mapreps_jax.priors import GaussianPrior, gaussian_fit, gaussian_w2, oracle_map_rps_dp, svd_gains

SCHED = mr.make_schedule("linear")


def _setup(n, d=8, keep=4, s=1.0, sigma=0.5):
    prior = GaussianPrior.isotropic(d, s)
    op = mr.make_operator("mask", (d,), keep=keep, seed=0)
    x = prior.sample(jax.random.PRNGKey(1), n)
    y = op.measure(jax.random.PRNGKey(2), x, sigma)
    post = prior.posterior(op.matrix(), sigma, y)
    return prior, op, x, y, post


def test_reverse_sde_oracle_matches_closed_form():
    d, s, sigma, n = 8, 1.0, 0.5, 4000
    prior, op, x, y, post = _setup(n, d=d, s=s, sigma=sigma)
    pm = prior.posterior_model(op.matrix(), sigma, SCHED)
    sv = np.linalg.svd(np.asarray(op.matrix(), np.float64), compute_uv=False)
    v = np.asarray(svd_gains(s, sv, d, sigma).v)
    f = jax.jit(lambda k, t0: mr.rps_sde(k, pm, post.mean, t0, n_steps=200, cond=y))
    for t0 in (100.0, 300.0, 999.0):
        out = f(jax.random.PRNGKey(int(t0)), jnp.float32(t0))
        a0 = float(mr.alpha_bar(SCHED, jnp.float32(t0 - 1.0)))
        Dc, Pc = (float(u) for u in oracle_map_rps_dp(s, sv, d, sigma, a0))
        err = np.asarray(jnp.sum((out - x) ** 2, -1))
        assert abs(err.mean() - Dc) <= 0.05 * Dc + 3 * err.std() / np.sqrt(n), (t0, err.mean(), Dc)
        m, c = gaussian_fit(out)
        P = float(gaussian_w2(m, c, prior.mu, prior.cov))
        # Monte Carlo floor of the Gaussian-fit W2 at this n, from exact samples of the closed-form output law
        rho = a0 * v / (a0 * v + 1 - a0)
        reps = []
        for r in range(4):
            exact = post.mean + jnp.sqrt(jnp.asarray(v * (1 - rho**2), jnp.float32)) * jax.random.normal(
                jax.random.PRNGKey(50 + r), out.shape)
            me, ce = gaussian_fit(exact)
            reps.append(float(gaussian_w2(me, ce, prior.mu, prior.cov)))
        assert abs(P - Pc) <= 0.05 * Pc + 3 * max(abs(np.mean(reps) - Pc), np.std(reps)) + 1e-3, (t0, P, Pc, reps)


def test_reverse_sde_gradient_in_t0_matches_finite_difference():
    prior, op, x, y, post = _setup(64)
    pm = prior.posterior_model(op.matrix(), 0.5, SCHED)

    def f(t0):
        out = mr.rps_sde(jax.random.PRNGKey(3), pm, post.mean, t0, n_steps=40, cond=y)
        return jnp.mean((out - x) ** 2)

    g = float(jax.grad(f)(jnp.float32(300.3)))
    fd = float((f(jnp.float32(300.5)) - f(jnp.float32(300.1))) / 0.4)
    assert g != 0.0
    np.testing.assert_allclose(g, fd, rtol=5e-2)
    # t0 = 0 returns the start unchanged
    np.testing.assert_array_equal(np.asarray(mr.rps_sde(jax.random.PRNGKey(0), pm, post.mean, 0.0, cond=y)),
                                  np.asarray(post.mean))
