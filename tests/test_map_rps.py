"""MAP, RPS, MAP-RPS, DPS, RED-diff on the exact testbed (TESTBED.md acceptance criteria 2-5) through the public API."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr
from mapreps_jax.priors import (GMMPrior, GaussianPrior, gaussian_fit, gaussian_w2, ideal_dp_curve, oracle_map_rps_dp,
                                stage1_fixed_point, svd_gains)
from mapreps_jax.metrics import mmd, sliced_w2

SCHED = mr.make_schedule("linear")


def _setup(d=8, keep=4, s=1.0, sigma=0.5, n=512, seed=0):
    prior = GaussianPrior.isotropic(d, s)
    op = mr.make_operator("mask", (d,), keep=keep, seed=seed)
    kx, kn = jax.random.split(jax.random.PRNGKey(seed + 100))
    x = prior.sample(kx, n)
    y = op.measure(kn, x, sigma)
    return prior, op, x, y


def _sq(a, b):
    return np.asarray(jnp.sum((a - b) ** 2, axis=-1))


def test_stage1_exact_prior_principled_weight_reaches_mmse():
    """Criterion 2: Gaussian prior, exact eps, w = w*: Stage 1 adds at most 2 % of D* to the distortion."""
    s, sigma = 1.0, 0.5
    prior, op, x, y = _setup(s=s, sigma=sigma, n=512)
    model = prior.score_model(SCHED)
    a1 = float(model.alpha_bar(jnp.float32(10.0)))
    w = mr.principled_weight(sigma, a1, prior.tweedie_variance(a1))
    # closed form of w* for S = s^2 I (TESTBED.md)
    np.testing.assert_allclose(float(w), 2 * sigma**2 * (a1 * s**2 + 1 - a1) / (s**2 * np.sqrt(a1 * (1 - a1))),
                               rtol=1e-4)
    cfg = mr.MAPConfig(t1=10.0, w=w, n_iter=300, lr=0.05)
    x_map = mr.map_estimate(jax.random.PRNGKey(1), model, op, y, config=cfg)
    post = prior.posterior(op.matrix(), sigma, y)
    d_star = float(jnp.trace(post.cov))
    D_map = float(np.mean(_sq(x_map, x)))
    D_mmse = float(np.mean(_sq(post.mean, x)))
    assert D_map - D_mmse <= 0.02 * d_star, (D_map, D_mmse, d_star)
    assert float(np.mean(_sq(x_map, post.mean))) <= 0.02 * d_star


def _fixed_point_problem():
    prior = GaussianPrior.random(jax.random.PRNGKey(3), 6)
    op = mr.make_operator("matrix", (6,), rows=3, seed=2)
    y = op.measure(jax.random.PRNGKey(5), prior.sample(jax.random.PRNGKey(4), 64), 0.2)
    model = prior.score_model(SCHED)
    return prior, op, y, model, float(model.alpha_bar(jnp.float32(10.0)))


@pytest.mark.parametrize("w", [0.05, 0.3])
def test_stage1_matches_closed_form_fixed_point(w):
    """Any w: the iteration converges to x = (2 A^T A + w B)^{-1} (2 A^T y + w B mu) (the stationary point of L;
    weight decay off, since AdamW's decoupled decay moves the fixed point)."""
    prior, op, y, model, a1 = _fixed_point_problem()
    x_map = mr.map_estimate(jax.random.PRNGKey(6), model, op, y,
                            config=mr.MAPConfig(t1=10.0, w=w, n_iter=2000, lr=0.05, weight_decay=0.0))
    ref = stage1_fixed_point(prior, op.matrix(), y, 0.2, w, a1)
    np.testing.assert_allclose(np.asarray(x_map), np.asarray(ref), atol=2e-2)


@pytest.mark.parametrize("w", [0.05, 0.3])
def test_prox_solver_reaches_the_same_fixed_point_in_ten_times_fewer_steps(w):
    """solver="prox" (exact data step, forward prior step, tail averaging) converges to the same closed-form
    stationary point as AdamW above, in 200 network evaluations instead of 2000. Step eta = 1 / (w lambda_max(B)),
    the largest step for which the prior part of the iteration does not overshoot."""
    prior, op, y, model, a1 = _fixed_point_problem()
    lam_max = float(jnp.max(np.sqrt(a1 * (1 - a1)) / (a1 * prior.evals + 1 - a1)))
    cfg = mr.MAPConfig(t1=10.0, w=w, n_iter=200, solver="prox", prox_step=1.0 / (w * lam_max), average=100)
    x_map = mr.map_estimate(jax.random.PRNGKey(6), model, op, y, config=cfg)
    ref = stage1_fixed_point(prior, op.matrix(), y, 0.2, w, a1)
    np.testing.assert_allclose(np.asarray(x_map), np.asarray(ref), atol=2e-2)


@pytest.mark.parametrize("task,kw,exact_after", [("sr", dict(factor=4, kind="avg"), 2), ("inpaint_box", dict(box=12), 2),
                                                 ("denoise", {}, 1), ("gaussian_blur", dict(kernel_size=61, std=3.0), None),
                                                 ("cs", dict(ratio=2), 2)])
def test_prox_data_fit_solves_its_normal_equations(task, kw, exact_after):
    """prox_data_fit(v) = argmin ||y - A x||^2 + ||x - v||^2 / (2 eta): (I + 2 eta A^T A) x = v + 2 eta A^T y,
    checked against a dense solve. CG is exact after as many steps as A^T A has distinct eigenvalues (masks, block
    averages and subsampled orthogonal transforms: 2; the identity: 1)."""
    op = mr.make_operator(task, (16, 16, 1), seed=0, **kw)
    kv, ky = jax.random.split(jax.random.PRNGKey(0))
    v = jax.random.normal(kv, (3, 16, 16, 1))
    y = op.A(jax.random.normal(ky, (3, 16, 16, 1)))
    eta = jnp.asarray([0.5, 3.0, 40.0]).reshape(3, 1, 1, 1)  # one step per image
    M = np.asarray(op.matrix(), np.float64)
    for i in range(3):
        e = float(eta[i, 0, 0, 0])
        rhs = v[i].reshape(-1) + 2 * e * M.T @ np.asarray(y[i]).reshape(-1)
        ref = np.linalg.solve(np.eye(M.shape[1]) + 2 * e * M.T @ M, rhs)
        for n_iter in ([60] if exact_after is None else [exact_after, 60]):
            out = mr.prox_data_fit(op, y, v, eta, n_iter)
            np.testing.assert_allclose(np.asarray(out[i]).reshape(-1), ref, atol=1e-3 * max(1.0, np.abs(ref).max()))


def test_prox_solver_rejects_what_it_cannot_do():
    model = GaussianPrior.isotropic(4, 1.0).score_model(SCHED)
    square = mr.custom_operator("square", (4,), (4,), lambda data, x: x * x, init_fn=lambda data, y: jnp.sqrt(y))
    with pytest.raises(ValueError, match="solver='prox' needs a linear operator.*'square' is nonlinear"):
        mr.map_estimate(jax.random.PRNGKey(0), model, square, jnp.ones((2, 4)), config=mr.MAPConfig(w=0.1, solver="prox"))
    with pytest.raises(ValueError, match="expected one of"):
        mr.MAPConfig(solver="newton")
    with pytest.raises(ValueError, match="stable=True"):
        mr.MAPConfig(solver="prox", stable=True)
    with pytest.raises(ValueError, match="cg_iters"):
        mr.MAPConfig(solver="prox", cg_iters=0)


def _oracle_outputs(prior, op, y, x_star, sigma, t0, key):
    post_model = prior.posterior_model(op.matrix(), sigma, SCHED)
    return mr.rps(key, post_model, op, y, x_star, t0, sampler=mr.DDPMStep(), cond=y)


def test_oracle_rps_matches_closed_form():
    """Criterion 3: oracle RPS D(t0), P(t0) within 5 % (+ Monte Carlo error) of the closed form."""
    s, sigma, d, keep, n = 1.0, 0.5, 8, 4, 4000
    prior, op, x, y = _setup(d=d, keep=keep, s=s, sigma=sigma, n=n, seed=1)
    post = prior.posterior(op.matrix(), sigma, y)
    sv = np.linalg.svd(np.asarray(op.matrix(), np.float64), compute_uv=False)
    g = svd_gains(s, sv, d, sigma)
    rps_j = jax.jit(_oracle_outputs, static_argnums=(0, 1))
    for t0 in (100, 300, 600, 999):
        out = _oracle_outputs(prior, op, y, post.mean, sigma, jnp.int32(t0), jax.random.PRNGKey(t0))
        a0 = float(SCHED.alpha_bars[t0 - 1])
        Dc, Pc = (float(v) for v in oracle_map_rps_dp(s, sv, d, sigma, a0))
        err = _sq(out, x)
        D = float(err.mean())
        se_D = float(err.std() / np.sqrt(n))
        m, c = gaussian_fit(out)
        P = float(gaussian_w2(m, c, prior.mu, prior.cov))
        # Monte Carlo spread of the Gaussian-fit W2 at this n: exact closed-form outputs, 4 replicates
        v = np.asarray(g.v)
        rho = a0 * v / (a0 * v + 1 - a0)
        reps = []
        for r in range(4):
            xi = jax.random.normal(jax.random.PRNGKey(1000 + r), out.shape)
            exact = post.mean + jnp.sqrt(jnp.asarray(v * (1 - rho**2), jnp.float32))[None] * xi
            me, ce = gaussian_fit(exact)
            reps.append(float(gaussian_w2(me, ce, prior.mu, prior.cov)))
        mc_P = max(abs(np.mean(reps) - Pc), np.std(reps)) * 3 + 1e-3
        assert abs(D - Dc) <= 0.05 * Dc + 3 * se_D, (t0, D, Dc)
        assert abs(P - Pc) <= 0.05 * Pc + mc_P, (t0, P, Pc, reps)
    del rps_j


def test_oracle_endpoints_and_ideal_bound():
    """t0 = 0 gives (D*, P*) exactly (no re-noising); t0 = T is posterior sampling (2 D*, ~0)."""
    s, sigma, d = 1.0, 0.5, 8
    prior, op, x, y = _setup(d=d, s=s, sigma=sigma, n=4000, seed=2)
    post = prior.posterior(op.matrix(), sigma, y)
    out0 = _oracle_outputs(prior, op, y, post.mean, sigma, 0, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(post.mean))
    outT = _oracle_outputs(prior, op, y, post.mean, sigma, SCHED.T, jax.random.PRNGKey(1))
    d_star = float(jnp.trace(post.cov))
    D = float(np.mean(_sq(outT, x)))
    assert abs(D - 2 * d_star) <= 0.05 * 2 * d_star
    m, c = gaussian_fit(outT)
    assert float(gaussian_w2(m, c, prior.mu, prior.cov)) < 0.1 * np.sqrt(d_star)


def _dp_point(out, x, prior):
    m, c = gaussian_fit(out)
    return float(np.mean(_sq(out, x))), float(gaussian_w2(m, c, prior.mu, prior.cov))


def test_map_rps_sweep_monotone_and_above_ideal_curve():
    """Criterion 4: every algorithm's point is above the ideal curve; MAP-RPS D up / P down in t0."""
    s, sigma, d, n = 1.0, 0.5, 8, 2000
    prior, op, x, y = _setup(d=d, s=s, sigma=sigma, n=n, seed=3)
    model = prior.score_model(SCHED)
    post = prior.posterior(op.matrix(), sigma, y)
    d_star = float(jnp.trace(post.cov))
    m, c = gaussian_fit(post.mean)
    p_star = float(gaussian_w2(m, c, prior.mu, prior.cov))
    a1 = float(model.alpha_bar(jnp.float32(10.0)))
    cfg = mr.MAPConfig(t1=10.0, w=mr.principled_weight(sigma, a1, prior.tweedie_variance(a1)), n_iter=300, lr=0.05)
    t0s = [0, 50, 200, 500, 1000]
    res = mr.dp_sweep(jax.random.PRNGKey(7), model, op, y, t0s, map_config=cfg,
                      sampler=mr.DPSStep(zeta=0.2, clip=False), x_true=x)
    assert res.nfe["total"] == 300 + sum(t0s)
    pts = [_dp_point(o, x, prior) for o in res.outputs]
    Ds, Ps = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    np.testing.assert_allclose(np.asarray(res.sq_err).mean(1), Ds, rtol=1e-5)
    tol_D = 3 * np.sqrt(2 * 2 * d_star**2 / n) * 2  # MC error of a mean of ~chi-square sums
    tol_P = 0.05
    assert np.all(np.diff(Ds) >= -tol_D), Ds
    assert np.all(np.diff(Ps) <= tol_P), Ps
    others = {
        "dps": jax.jit(mr.dps, static_argnames=("clip", "n_steps"))(jax.random.PRNGKey(8), model, op, y, zeta=0.2,
                                                                  clip=False),
        "red_diff": mr.red_diff(jax.random.PRNGKey(9), model, op, y, config=mr.REDDiffConfig(lr=0.1, n_steps=200)),
        "ccdf": mr.ccdf(jax.random.PRNGKey(10), model, op, y, 300, sampler=mr.DPSStep(zeta=0.2, clip=False)),
    }
    for D, P in pts + [_dp_point(o, x, prior) for o in others.values()]:
        assert D >= float(ideal_dp_curve(P, d_star, p_star)) - tol_D, (D, P, d_star, p_star)


def test_dp_sweep_keys_progress_and_timings():
    """dp_sweep = Stage 1 with split(keys[i])[0], then Stage 2 with split(keys[i])[1] for every t0, keys[i] the
    key of image i (t0 = 0 is the Stage-1 estimate itself); progress is called with 0 after Stage 1 and with i after the i-th t0; both stages are timed."""
    prior, op, x, y = _setup(d=8, s=1.0, sigma=0.5, n=16, seed=4)
    model = prior.score_model(SCHED)
    cfg = mr.MAPConfig(t1=10.0, w=1.0, n_iter=20, lr=0.05)
    sampler = mr.DPSStep(zeta=0.2, clip=False)
    calls = []
    key = jax.random.PRNGKey(11)
    res = mr.dp_sweep(key, model, op, y, [0, 30, 100], map_config=cfg, sampler=sampler, n_steps=10,
                      progress=lambda i, n: calls.append((i, n)))
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert set(res.seconds) == {"stage1", "stage2"} and all(v > 0 for v in res.seconds.values())
    k1, k2 = mr.split_keys(mr.image_keys(key, y.shape[0]))
    x_map = mr.map_estimate(k1, model, op, y, config=cfg)
    np.testing.assert_allclose(res.x_map, x_map, atol=1e-6)
    np.testing.assert_array_equal(res.outputs[0], res.x_map)
    np.testing.assert_allclose(res.outputs[2], mr.rps(k2, model, op, y, res.x_map, 100, sampler=sampler, n_steps=10),
                               atol=1e-5)
    assert res.nfe == {"stage1": 20, "stage2": [0, 10, 10], "total": 40,
                       "calls": {"unet": 40, "decoder": 0, "encoder": 0}}  # pixel space: no autoencoder calls


def test_gmm_oracle_sampler_matches_exact_posterior():
    """Criterion 5: on a GMM, RPS from pure noise with the exact diffused-posterior model samples the posterior."""
    d, sigma, n = 2, 0.3, 1500
    prior = GMMPrior.random(jax.random.PRNGKey(0), d, n_components=3)
    op = mr.make_operator("mask", (d,), keep=1, seed=0)
    x1 = prior.sample(jax.random.PRNGKey(1), 1)
    y1 = op.measure(jax.random.PRNGKey(2), x1, sigma)
    y = jnp.repeat(y1, n, axis=0)
    post = prior.posterior(op.matrix(), sigma, y1)
    exact_a = post.sample(jax.random.PRNGKey(3), n)[:, 0]
    exact_b = post.sample(jax.random.PRNGKey(4), n)[:, 0]
    post_model = prior.posterior_model(op.matrix(), sigma, SCHED)
    out = mr.rps(jax.random.PRNGKey(5), post_model, op, y, jnp.zeros((n, d)), SCHED.T, sampler=mr.DDPMStep(),
                 cond=y)
    k = jax.random.PRNGKey(6)
    base_sw, base_mmd = float(sliced_w2(k, exact_a, exact_b)), float(mmd(exact_a, exact_b))
    sw, mm = float(sliced_w2(k, out, exact_a)), float(mmd(out, exact_a))
    assert sw <= 3 * base_sw + 0.02, (sw, base_sw)
    assert mm <= 3 * base_mmd + 2e-3, (mm, base_mmd)


def test_dps_and_red_diff_on_gmm_report_distances_and_are_deterministic():
    d, sigma, n = 4, 0.3, 256
    prior = GMMPrior.random(jax.random.PRNGKey(0), d, n_components=3)
    op = mr.make_operator("matrix", (d,), rows=2, seed=1)
    x = prior.sample(jax.random.PRNGKey(1), n)
    y = op.measure(jax.random.PRNGKey(2), x, sigma)
    model = prior.score_model(SCHED)
    post = prior.posterior(op.matrix(), sigma, y)
    exact = post.sample(jax.random.PRNGKey(3), 1)[0]
    dps_j = jax.jit(mr.dps, static_argnames=("clip", "n_steps"))
    a = dps_j(jax.random.PRNGKey(4), model, op, y, zeta=0.3, clip=False, n_steps=100)
    b = dps_j(jax.random.PRNGKey(4), model, op, y, zeta=0.3, clip=False, n_steps=100)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    r = mr.red_diff(jax.random.PRNGKey(5), model, op, y, config=mr.REDDiffConfig(n_steps=100))
    r2 = mr.red_diff(jax.random.PRNGKey(5), model, op, y, config=mr.REDDiffConfig(n_steps=100))
    np.testing.assert_array_equal(np.asarray(r), np.asarray(r2))
    for out in (a, r):
        sw = float(sliced_w2(jax.random.PRNGKey(7), out, exact))
        gap = float(np.mean(_sq(out, post.mean)))
        assert np.isfinite(sw) and np.isfinite(gap)


def test_ddnm_step_enforces_noise_free_consistency():
    """DDNM's range-space replacement: with sigma_y = 0 every output satisfies A x = y (to float precision)."""
    prior, op, x, y = _setup(d=8, keep=4, sigma=0.0, n=64, seed=4)
    model = prior.score_model(SCHED)
    out = mr.rps(jax.random.PRNGKey(0), model, op, y, op.x_init(y), 200, sampler=mr.DDNMStep(clip=False))
    np.testing.assert_allclose(np.asarray(op.A(out)), np.asarray(y), atol=1e-5)
    assert float(jnp.std(out[:, 4:])) > 0.1  # the null space is sampled, not left at zero


def test_red_diff_weightings_follow_their_definitions_and_all_run():
    a = jnp.asarray([0.9, 0.5, 0.01])
    r = np.sqrt(1 - np.asarray(a)) / np.sqrt(np.asarray(a))
    expected = {"linear": r, "sqrt": np.sqrt(r), "square": r**2, "log": np.log1p(r), "clip": np.minimum(r, 1.0),
                "power2over3": r ** (2.0 / 3.0), "const": np.ones(3)}
    assert set(expected) == set(mr.RED_DIFF_WEIGHTINGS)
    prior, op, x, y = _setup(n=32, seed=5)
    model = prior.score_model(SCHED)
    outs = {}
    for name, ref in expected.items():
        np.testing.assert_allclose(np.asarray(mr.baselines.red_diff_weight(a, name)), ref, rtol=1e-5)
        outs[name] = mr.red_diff(jax.random.PRNGKey(1), model, op, y,
                                 config=mr.REDDiffConfig(weighting=name, n_steps=50))
        assert np.all(np.isfinite(np.asarray(outs[name])))
    assert float(jnp.max(jnp.abs(outs["linear"] - outs["const"]))) > 1e-3
