"""Schedules and DDPM/DDIM formulas against independent float64 NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapreps_jax import diffusion as dif


def _np_alpha_bar(betas):
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("kind,b0,b1", [("linear", 1e-4, 2e-2), ("scaled_linear", 0.00085, 0.012),
                                        ("ldm_linear", 0.0015, 0.0195)])
def test_schedule_endpoints_and_alpha_bar(kind, b0, b1):
    s = dif.make_schedule(kind)
    betas = np.asarray(s.betas, np.float64)
    assert s.T == 1000
    np.testing.assert_allclose(betas[0], b0, rtol=1e-6)
    np.testing.assert_allclose(betas[-1], b1, rtol=1e-6)
    if kind != "linear":  # sqrt-linspace: sqrt(beta) is affine in the index
        np.testing.assert_allclose(np.diff(np.sqrt(betas), 2), 0.0, atol=1e-8)
    ref = _np_alpha_bar(np.linspace(b0, b1, 1000) if kind == "linear"
                        else np.linspace(b0 ** 0.5, b1 ** 0.5, 1000) ** 2)
    t = np.arange(1000)
    np.testing.assert_allclose(np.asarray(dif.alpha_bar(s, jnp.asarray(t))), ref, rtol=2e-6)
    assert float(dif.alpha_bar(s, -1)) == 1.0
    # real t at integers equals the table exactly; monotone decreasing in between
    tr = jnp.asarray(t[::37], jnp.float32)
    np.testing.assert_allclose(np.asarray(dif.alpha_bar(s, tr)), ref[t[::37]], rtol=2e-6)
    assert float(dif.alpha_bar(s, -1.0)) == pytest.approx(1.0)
    fine = np.asarray(dif.alpha_bar(s, jnp.linspace(-1.0, 999.0, 4001)))
    assert np.all(np.diff(fine) <= 0)


def test_bad_schedule_kind():
    with pytest.raises(ValueError, match="unknown schedule kind"):
        dif.make_schedule("cosine-ish")


def test_alpha_bar_real_t_derivative_matches_finite_difference():
    s = dif.make_schedule("linear")
    f = lambda t: dif.alpha_bar(s, t)
    for t in (3.3, 250.5, 800.25):
        g = float(jax.grad(f)(jnp.float32(t)))
        # log-linear interpolation: d/dt a = a * (log a[k+1] - log a[k]) inside a cell
        k = int(np.floor(t)) + 1
        la = np.asarray(s.log_alpha_bar_ext, np.float64)
        ref = float(f(jnp.float32(t))) * (la[k + 1] - la[k])
        assert g == pytest.approx(ref, rel=1e-4)


def test_ddpm_step_is_posterior_mean_and_variance():
    """eta = 1 on adjacent steps with eps re-derived from x0 equals the DDPM posterior q(x_{i-1} | x_i, x0)."""
    s = dif.make_schedule("linear")
    betas = np.asarray(s.betas, np.float64)
    ab = np.cumprod(1 - betas)
    rng = np.random.default_rng(0)
    x_i = rng.normal(size=(3, 5)).astype(np.float32)
    x0 = rng.normal(size=(3, 5)).astype(np.float32)
    for i in (1, 10, 500, 999):
        a_i, a_j = ab[i], ab[i - 1]
        mu = np.sqrt(a_j) * betas[i] / (1 - a_i) * x0 + np.sqrt(1 - betas[i]) * (1 - a_j) / (1 - a_i) * x_i
        var = betas[i] * (1 - a_j) / (1 - a_i)
        A_i, A_j = dif.alpha_bar(s, i), dif.alpha_bar(s, i - 1)
        sig = dif.ddim_sigma_log(dif.log_alpha_bar(s, i), dif.log_alpha_bar(s, i - 1), 1.0)
        np.testing.assert_allclose(float(sig) ** 2, var, rtol=1e-5)
        np.testing.assert_allclose(float(dif.ddim_sigma(A_i, A_j, 1.0)) ** 2, var, rtol=5e-3)  # cancellation
        np.testing.assert_allclose(float(dif.posterior_variance(s, i)), var, rtol=1e-6)
        eps = dif.eps_from_x0(jnp.asarray(x_i), jnp.asarray(x0), A_i)
        mean = dif.ddim_step(None, jnp.asarray(x0), eps, A_j, sig)
        np.testing.assert_allclose(np.asarray(mean), mu, rtol=2e-3, atol=2e-4)


def test_last_step_lands_on_x0_and_ddim_eta0_is_deterministic():
    s = dif.make_schedule("linear")
    x0 = jnp.ones((2, 3)) * 0.3
    eps = jnp.ones((2, 3)) * -0.7
    a0, am1 = dif.alpha_bar(s, 0), dif.alpha_bar(s, -1)
    sig = dif.ddim_sigma(a0, am1, 1.0)
    assert float(sig) == 0.0
    assert float(dif.ddim_sigma_log(dif.log_alpha_bar(s, 0), dif.log_alpha_bar(s, -1), 1.0)) == 0.0
    np.testing.assert_allclose(dif.ddim_step(jax.random.PRNGKey(0), x0, eps, am1, sig), x0)
    a5, a4 = dif.alpha_bar(s, 5), dif.alpha_bar(s, 4)
    k = jax.random.PRNGKey(1)
    assert float(dif.ddim_sigma(a5, a4, 0.0)) == 0.0
    np.testing.assert_allclose(dif.ddim_step(k, x0, eps, a4, 0.0), dif.ddim_step(None, x0, eps, a4, 0.0))


def test_tweedie_inverts_forward_and_clip():
    a = jnp.asarray([0.3, 0.9])
    x0 = jnp.asarray([[0.5, -0.2], [2.0, -3.0]])
    eps = jnp.asarray([[0.1, 1.0], [-1.0, 0.3]])
    x_t = jnp.sqrt(a)[:, None] * x0 + jnp.sqrt(1 - a)[:, None] * eps
    np.testing.assert_allclose(dif.tweedie(x_t, eps, a), x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dif.tweedie(x_t, eps, a, clip=True), jnp.clip(x0, -1, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dif.eps_from_x0(x_t, x0, a), eps, rtol=1e-4, atol=1e-5)


def test_renoise_moments():
    x = jnp.full((20000, 2), 0.8)
    a = 0.36
    z = dif.renoise(jax.random.PRNGKey(3), x, a)
    np.testing.assert_allclose(np.mean(np.asarray(z), 0), 0.6 * 0.8, atol=0.02)
    np.testing.assert_allclose(np.std(np.asarray(z), 0), 0.8, atol=0.02)


def test_learned_range_std_endpoints():
    s = dif.make_schedule("linear")
    betas = np.asarray(s.betas, np.float64)
    ab = np.cumprod(1 - betas)
    for i in (0, 1, 300):
        bt = betas[max(i, 1)] * (1 - ab[max(i, 1) - 1]) / (1 - ab[max(i, 1)])
        hi = dif.learned_range_std(s, i, jnp.ones((1, 2)))
        lo = dif.learned_range_std(s, i, -jnp.ones((1, 2)))
        mid = dif.learned_range_std(s, i, jnp.zeros((1, 2)))
        np.testing.assert_allclose(np.asarray(hi), np.sqrt(betas[i]), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(lo), np.sqrt(bt), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(mid), (betas[i] * bt) ** 0.25, rtol=1e-6)


def test_t_for_noise_std_inverts_alpha_bar():
    """(1 - a(t)) / a(t) = sigma^2 at the returned t, for scalars and arrays (property of the inverse)."""
    from mapreps_jax.diffusion import alpha_bar, make_schedule, t_for_noise_std

    sched = make_schedule("linear")
    sig = jnp.asarray([0.01, 0.1, 0.4, 1.0, 10.0])
    t = t_for_noise_std(sched, sig)
    a = alpha_bar(sched, t)
    np.testing.assert_allclose((1 - a) / a, sig ** 2, rtol=1e-3)
    assert bool(jnp.all(jnp.diff(t) > 0))
    # integer grid points come back as themselves
    t_int = jnp.asarray([5, 100, 700])
    a_int = alpha_bar(sched, t_int)
    np.testing.assert_allclose(t_for_noise_std(sched, jnp.sqrt((1 - a_int) / a_int)), t_int, atol=1e-2)
