"""mapreps_jax.tune on the exact Gaussian prior (TESTBED.md): gradients against central finite differences in
float64, recovery of the closed-form Stage-1 weight w*, t0 for a distortion budget against the closed-form oracle
D(t0) curve, one compilation for all updates, and the adjoint of the diffrax Stage 2."""
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr
from mapreps_jax import tune as tn
from mapreps_jax.continuous import rps_sde

SCHED = mr.make_schedule("linear")
D_DIM, SIGMA_Y, T1 = 8, 0.5, 10.0


def _testbed(n, seed=0, schedule=SCHED, dtype=jnp.float32):
    """N(0, I) in d = 8, a 4-of-8 mask, sigma_y = 0.5 (notebook 03)."""
    prior = mr.GaussianPrior.isotropic(D_DIM, 1.0)
    op = mr.make_operator("mask", (D_DIM,), keep=4, seed=0)
    x = jnp.asarray(prior.sample(jax.random.PRNGKey(seed), n), dtype)
    y = op.measure(jax.random.PRNGKey(seed + 1), x, SIGMA_Y)
    return prior, prior.score_model(schedule), op, x, y


def test_gradient_of_the_tuning_objective_matches_central_differences_float64(x64):
    """d L / d (w, lr, t1, t0) of L = MSE(RPS(MAP(y; w, lr, t1), t0)) (20 AdamW steps, 8-step continuous DPS
    Stage 2, float64 data and schedule) against central differences. Tolerance 1e-3 relative: the library rounds
    w, t1 and t0 to float32 inside (relative 6e-8, so the differences carry about 1e-5 of rounding noise with these
    steps h) and the O(h^2) truncation is about 1e-5; measured agreement 2e-5 to 8e-5."""
    sched64 = mr.make_schedule("linear", dtype=jnp.float64)
    prior, model, op, x, y = _testbed(16, schedule=sched64, dtype=jnp.float64)
    assert y.dtype == jnp.float64
    cfg = mr.MAPConfig(n_iter=20, lr=0.1, t1=T1)
    p0 = {"w": 5.0, "lr": 0.1, "t1": 10.3, "t0": 300.4}

    def loss(p, y, x):
        return tn.tuning_loss(jax.random.PRNGKey(2), model, op, y, x, p, map_config=cfg,
                              sampler=mr.DPSStep(zeta=0.3, clip=False), n_steps=8)[0]

    g = jax.jit(jax.grad(loss))(p0, y, x)
    f = jax.jit(loss)
    assert f(p0, y, x).dtype == jnp.float64
    for name, h in (("w", 1e-2), ("lr", 1e-4), ("t1", 1e-2), ("t0", 0.1)):
        fd = (f({**p0, name: p0[name] + h}, y, x) - f({**p0, name: p0[name] - h}, y, x)) / (2 * h)
        assert float(g[name]) != 0.0, name
        np.testing.assert_allclose(float(g[name]), float(fd), rtol=1e-3, err_msg=name)


def test_tune_w_from_a_poor_start_recovers_the_closed_form_w_star():
    """Start at w*/10; 60 Adam updates of log w through 100 AdamW Stage-1 steps on 2048 validation pairs.

    Reference: w* = 2 sigma^2 (a s^2 + 1 - a) / (s^2 sqrt(a (1 - a))) (TESTBED.md), whose fixed point is the
    posterior mean for every y. On a finite batch the loss minimiser differs from w* by sampling error: for the mask,
    the fixed point is x_obs = c y_obs with c = 2 / (2 + w b), b = sqrt(a (1-a)) / (a s^2 + 1 - a), so this batch's
    minimiser of the fixed-point MSE is c_hat = <x, y> / <y, y> over the observed coordinates, with a sandwich
    standard error; by the delta method SE(w_hat) = 2 SE(c_hat) / (b c_hat^2) (about 2.7 % of w* here). Tolerance:
    3 standard errors. Measured: tuned w within 0.2 % of w*."""
    prior, model, op, x, y = _testbed(2048, seed=10)
    a1 = float(mr.alpha_bar(SCHED, jnp.float32(T1)))
    w_star = 2 * SIGMA_Y**2 * (a1 + 1 - a1) / np.sqrt(a1 * (1 - a1))
    np.testing.assert_allclose(w_star, float(mr.principled_weight(SIGMA_Y, a1, prior.tweedie_variance(a1))),
                               rtol=1e-5)
    cfg = mr.MAPConfig(t1=T1, n_iter=100, lr=0.1)
    res = tn.tune(jax.random.PRNGKey(5), model, op, y, x, params={"w": w_star / 10}, map_config=cfg, n_updates=60)
    w = res.params["w"]

    keep = np.asarray(jnp.any(op.matrix() != 0, axis=0))
    xo, yo = np.asarray(x, np.float64)[:, keep], np.asarray(op.AT(y), np.float64)[:, keep]
    c_hat = np.sum(xo * yo) / np.sum(yo * yo)
    se_c = np.sqrt(np.sum(((xo - c_hat * yo) * yo) ** 2)) / np.sum(yo * yo)
    b = np.sqrt(a1 * (1 - a1)) / (a1 + 1 - a1)
    se_w = 2 * se_c / (b * c_hat**2)
    assert abs(w - w_star) <= 3 * se_w, (w, w_star, se_w)
    # the optimiser reached the minimum of this batch's loss: a grid of 41 weights over [w*/2, 2 w*] (one vmap)
    grid = jnp.exp(jnp.linspace(np.log(w_star / 2), np.log(2 * w_star), 41))
    grid_loss = jax.jit(jax.vmap(lambda w, y, x: tn.tuning_loss(jax.random.PRNGKey(5), model, op, y, x, {"w": w},
                                                               map_config=cfg)[0], in_axes=(0, None, None)))(grid, y, x)
    assert res.loss <= float(grid_loss.min()) * (1 + 1e-4), (res.loss, float(grid_loss.min()))
    # one compiled value_and_grad for all updates; the history starts at the start and decreases
    assert res.traces == 1
    assert res.history["loss"].shape == (60,) and res.history["params"]["w"].shape == (60,)
    np.testing.assert_allclose(res.history["params"]["w"][0], w_star / 10, rtol=1e-5)
    assert res.loss < res.history["loss"][0]


def _closed_form_t0(sv, d_target):
    """The t0 with oracle D(t0) = d_target (closed form, a0 = alpha_bar(t0 - 1) as rps re-noises), and dD/dt0."""
    def D(t0):
        return float(mr.oracle_map_rps_dp(1.0, sv, D_DIM, SIGMA_Y, mr.alpha_bar(SCHED, jnp.float32(t0 - 1.0)))[0])

    lo, hi = 1.0, 1000.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if D(mid) < d_target else (lo, mid)
    t0 = 0.5 * (lo + hi)
    return t0, (D(t0 + 2.0) - D(t0 - 2.0)) / 4.0


def test_tune_t0_for_a_distortion_budget_lands_on_the_closed_form_curve():
    """Oracle MAP-RPS: Stage 1 exact (x_map = the posterior mean), Stage 2 the exact diffused-posterior model with
    DDPM steps on a 100-step continuous sub-grid. Budget D = 7.5 (between D* = 4.8 and 2 D* = 9.6); start t0 = 500.

    The tuned t0 matches this batch's D to the budget; it differs from the closed-form t0 by this batch's sampling
    error of D (3 standard errors of the per-image squared errors) plus the bias of the 100-step discretisation of
    Stage 2, measured on 65536 pairs against the closed form: D low by 0.037 / 0.057 / 0.062 at t0 = 120 / 160 /
    200 (standard error 0.005; the bias shrinks as 1/K), allowance 0.08; both converted to t0 by the closed-form
    slope dD/dt0. Measured: tuned t0 180.6, closed form 181.0."""
    prior, model, op, x, y = _testbed(4096, seed=20)
    A = op.matrix()
    post = prior.posterior(A, SIGMA_Y, y)
    d_target = 7.5
    res = tn.tune_t0_for_distortion(jax.random.PRNGKey(7), model, op, y, x, d_target, t0=500.0,
                                    sampler=mr.DDPMStep(), n_steps=100, x_map=post.mean,
                                    stage2_model=prior.posterior_model(A, SIGMA_Y, SCHED), stage2_cond=y,
                                    n_updates=40)
    assert res.traces == 1
    assert abs(res.aux["D"] - d_target) < 0.01, res.aux
    sv = np.linalg.svd(np.asarray(A, np.float64), compute_uv=False)
    t0_closed, slope = _closed_form_t0(sv, d_target)
    out = tn.stage_outputs(jax.random.PRNGKey(7), model, op, y, {"t0": res.params["t0"]}, sampler=mr.DDPMStep(),
                           n_steps=100, x_map=post.mean, stage2_model=prior.posterior_model(A, SIGMA_Y, SCHED),
                           stage2_cond=y)
    per_image = np.asarray(jnp.sum((out - x) ** 2, axis=-1), np.float64)
    np.testing.assert_allclose(per_image.mean(), res.aux["D"], rtol=1e-5)
    se = per_image.std(ddof=1) / np.sqrt(per_image.size)
    tol = (3 * se + 0.08) / slope
    assert abs(res.params["t0"] - t0_closed) <= tol, (res.params["t0"], t0_closed, tol)


def test_tune_t0_for_a_dp_trade_off_reaches_the_closed_form_optimum():
    """Objective D + 2 P^2 (P the W2 of the outputs' Gaussian fit to the prior), oracle MAP-RPS as above. The
    closed-form curve's minimiser is t0 = 157 (L = 8.15); L is flat there (+0.01 at +-10 steps, +0.1 at +-30), so
    the test checks that the tuned t0 is near-optimal *on the closed-form curve* (L within 1 % of its minimum) and
    within 30 steps of the minimiser. Measured: t0 = 160.7. Start t0 = 300: the 100-step DDPM Stage 2
    under-disperses at large t0 (D low by 0.2 at t0 = 600), which gives the batch loss a spurious local minimum near
    t0 = 880, where a start at 500 ends."""
    prior, model, op, x, y = _testbed(4096, seed=40)
    A = op.matrix()
    lam = 2.0
    res = tn.tune(jax.random.PRNGKey(8), model, op, y, x, params={"t0": 300.0},
                  objective=tn.dp_objective(tn.gaussian_perception(prior.mu, prior.cov), lam),
                  sampler=mr.DDPMStep(), n_steps=100, x_map=prior.posterior(A, SIGMA_Y, y).mean,
                  stage2_model=prior.posterior_model(A, SIGMA_Y, SCHED), stage2_cond=y, n_updates=40)
    assert res.traces == 1 and set(res.aux) == {"D", "P"}
    sv = np.linalg.svd(np.asarray(A, np.float64), compute_uv=False)

    def closed_L(t0):
        D, P = mr.oracle_map_rps_dp(1.0, sv, D_DIM, SIGMA_Y, mr.alpha_bar(SCHED, jnp.asarray(t0, jnp.float32) - 1.0))
        return np.asarray(D + lam * P**2)

    grid = np.linspace(2.0, 999.0, 2000)
    L = closed_L(grid)
    t0_best, L_best = grid[np.argmin(L)], L.min()
    assert float(closed_L(res.params["t0"])) <= 1.01 * L_best, (res.params, t0_best)
    assert abs(res.params["t0"] - t0_best) <= 30.0, (res.params, t0_best)


def test_tune_validates_its_inputs_and_round_trips_the_parametrisation():
    prior, model, op, x, y = _testbed(8)
    u = tn.to_unconstrained({"w": 3.0, "lr": 0.2, "t1": 12.5, "t0": 700.0}, 1000)
    back = tn.from_unconstrained(u, 1000)
    for k, v in {"w": 3.0, "lr": 0.2, "t1": 12.5, "t0": 700.0}.items():
        np.testing.assert_allclose(float(back[k]), v, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot tune 'zeta'"):
        tn.tune(jax.random.PRNGKey(0), model, op, y, x, params={"zeta": 0.1})
    with pytest.raises(ValueError, match="must lie strictly inside its range"):
        tn.tune(jax.random.PRNGKey(0), model, op, y, x, params={"t0": 1000.0})
    with pytest.raises(ValueError, match="must be positive"):
        tn.tune(jax.random.PRNGKey(0), model, op, y, x, params={"w": -1.0})
    with pytest.raises(ValueError, match="same batch size"):
        tn.tune(jax.random.PRNGKey(0), model, op, y, x[:4], params={"w": 1.0})
    with pytest.raises(ValueError, match="objective must be"):
        tn.tune(jax.random.PRNGKey(0), model, op, y, x, params={"w": 1.0}, objective="psnr")


def test_rps_sde_backsolve_adjoint_approximates_the_default_adjoint():
    """The diffrax Stage 2 (``rps_sde``, t0 traced through ``args``): BacksolveAdjoint with a Stratonovich solver
    (Heun; the noise is additive, so it solves the same SDE) approximates the gradient that the default
    RecursiveCheckpointAdjoint computes exactly (the latter is checked against finite differences in
    tests/test_continuous.py); measured 4e-5 relative at 40 steps. Also under jit with traced conditioning."""
    prior, model, op, x, y = _testbed(32, seed=30)
    A = op.matrix()
    post_model = prior.posterior_model(A, SIGMA_Y, SCHED)
    xm = prior.posterior(A, SIGMA_Y, y).mean
    heun = diffrax.Heun()

    def f(t0, y, xm, adjoint):
        out = rps_sde(jax.random.PRNGKey(3), post_model, xm, t0, n_steps=20, cond=y, adjoint=adjoint, solver=heun)
        return jnp.mean(jnp.sum((out - x) ** 2, -1))

    g_rc = float(jax.jit(jax.grad(lambda t, y, xm: f(t, y, xm, diffrax.RecursiveCheckpointAdjoint())))(300.3, y, xm))
    g_bs = float(jax.jit(jax.grad(lambda t, y, xm: f(t, y, xm, diffrax.BacksolveAdjoint(solver=heun))))(
        300.3, y, xm))
    assert g_rc != 0.0
    np.testing.assert_allclose(g_bs, g_rc, rtol=1e-2)
