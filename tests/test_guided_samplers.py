"""PiGDM, DMPS, the paper-code options of DPS and NVlabs' RED-diff, each against an independent reference.

* PiGDM: on an isotropic Gaussian prior with a linear operator, ``p(x0 | x_t)`` is exactly ``N(x0_hat, r_t^2 I)``, so
  its guided step IS the exact conditional step: equal (float64) to the DDPM step of the exact diffused posterior
  (``GaussianPrior.posterior_model``), and a full run samples the exact posterior: ``D = 2 D*``, ``P = 0`` within MC
  error (``TESTBED.md``).
* DMPS: exact only for a flat prior, so its step and a whole run are compared with a float64 NumPy transcription
  of its update written here from the paper's formulas (analytic eps, ``np.linalg.solve``, the DDPM posterior mean).
* ``DPSStep(mean="raw")`` / ``variance="learned_official"``: against the formulas of ``ALGORITHMS.md`` section 2.
* ``REDDiffConfig.nvlabs()``: against a NumPy transcription of NVlabs' loop (their grid, hand-written Adam with
  betas (0.9, 0.99), the estimate before the last step).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr
from mapreps_jax.priors import GaussianPrior, gaussian_fit, gaussian_w2

SCHED = mr.make_schedule("linear")


@pytest.fixture
def x64():
    """float64 everywhere, the schedule included (SCHED64); A_EXT[k] = alpha_bar(k - 1) in float64."""
    global SCHED64, A_EXT
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    SCHED64 = mr.make_schedule("linear", dtype=jnp.float64)
    A_EXT = np.asarray(SCHED64.alpha_bar_ext, np.float64)
    yield
    jax.config.update("jax_enable_x64", prev)




def _problem(op_name="mask", d=8, sigma=0.3, n=6, seed=0, **kw):
    prior = GaussianPrior.isotropic(d, 1.0)
    kw = kw or (dict(keep=4) if op_name == "mask" else dict(rows=5))
    op = mr.make_operator(op_name, (d,), seed=seed, **kw)
    x = prior.sample(jax.random.PRNGKey(seed), n)
    y = op.measure(jax.random.PRNGKey(seed + 1), x, sigma)
    return prior, op, x, y


def _step_noise(key, shape):
    """The noise a sampler step draws for each image: normal(keys[i]) with keys = image_keys(key, B)."""
    keys = [jax.random.fold_in(key, i) for i in range(shape[0])]
    return np.stack([np.asarray(jax.random.normal(k, shape[1:], jnp.float64)) for k in keys])


@pytest.mark.parametrize("op_name", ["mask", "matrix"])
@pytest.mark.parametrize("t", [999, 500, 50, 3, 0])
def test_pigdm_step_is_the_exact_conditional_step_on_a_gaussian_prior(x64, op_name, t):
    prior, op, x, y = _problem(op_name)
    sig = 0.3
    post = prior.posterior_model(op.matrix(), sig, SCHED64)
    xt = jax.random.normal(jax.random.PRNGKey(2), (6, 8), jnp.float64)
    key = jax.random.PRNGKey(5)
    exact = mr.DDPMStep().step(key, post, op, y, xt, jnp.int32(t), jnp.int32(t - 1), cond=y)
    pigdm = mr.PiGDMStep(sigma_y=sig, clip=False).step(key, prior.score_model(SCHED64), op, y, xt, jnp.int32(t),
                                                       jnp.int32(t - 1))
    np.testing.assert_allclose(np.asarray(pigdm), np.asarray(exact), atol=1e-8)
    # without its guidance it is the unconditional step, which is far from the exact one
    off = mr.PiGDMStep(zeta=0.0, sigma_y=sig, clip=False).step(key, prior.score_model(SCHED64), op, y, xt,
                                                               jnp.int32(t), jnp.int32(t - 1))
    if t < 999:
        assert float(jnp.max(jnp.abs(off - exact))) > 1e-3


def test_pigdm_samples_the_exact_posterior():
    """From pure noise over all T steps: D = E|x_hat - x|^2 = 2 D* and P = W2(fit(outputs), prior) = 0, within MC
    error (n = 2000: the std of D/D* is about sqrt(2/(n d_null)) ~ 2 %, of P about 0.1)."""
    d, sig, n = 8, 0.5, 2000
    prior, op, x, y = _problem("mask", d=d, sigma=sig, n=n, seed=3, keep=4)
    model = prior.score_model(SCHED)
    out = jax.jit(mr.rps, static_argnames=("n_steps", "continuous", "max_steps"))(
        jax.random.PRNGKey(7), model, op, y, jnp.zeros_like(x), 1000, sampler=mr.PiGDMStep(sigma_y=sig, clip=False))
    post = prior.posterior(op.matrix(), sig, y)
    d_star = float(jnp.trace(post.cov))
    D = float(jnp.mean(jnp.sum((out - x) ** 2, axis=-1)))
    m, c = gaussian_fit(out)
    P = float(gaussian_w2(m, c, prior.mu, prior.cov))
    assert abs(D / (2 * d_star) - 1) < 0.08, (D, 2 * d_star)
    assert P < 0.2, P
    # without its guidance (zeta = 0) it samples the prior: D = 2 tr(S) = 16, far from 2 D* = 9.6
    out0 = mr.rps(jax.random.PRNGKey(7), model, op, y, jnp.zeros_like(x), 1000,
                  sampler=mr.PiGDMStep(zeta=0.0, sigma_y=sig, clip=False))
    D0 = float(jnp.mean(jnp.sum((out0 - x) ** 2, axis=-1)))
    assert abs(D0 / (2 * d_star) - 1) > 0.3, (D0, 2 * d_star)


# ---------------------------------------------------------------- DMPS: float64 NumPy transcription

def _np_eps(x, a, s2=1.0):
    """Exact eps of N(0, s2 I): sqrt(1 - a) x / (a s2 + 1 - a)."""
    return np.sqrt(1 - a) * x / (a * s2 + 1 - a)


def _np_dmps_step(x, y, M, sig, a_t, a_n, z, zeta=1.0):
    e = _np_eps(x, a_t)
    x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
    C = sig**2 * np.eye(M.shape[0]) + (1 - a_t) / a_t * M @ M.T
    resid = y - x / np.sqrt(a_t) @ M.T
    g = np.linalg.solve(C, resid.T).T @ M / np.sqrt(a_t)
    x0c = x0 + zeta * (1 - a_t) / np.sqrt(a_t) * g
    # DDPM posterior mean from x0c and x_t, plus sqrt(beta_tilde) z
    alpha_t = a_t / a_n
    beta_t = 1 - alpha_t
    mean = np.sqrt(a_n) * beta_t / (1 - a_t) * x0c + np.sqrt(alpha_t) * (1 - a_n) / (1 - a_t) * x
    std = np.sqrt(beta_t * (1 - a_n) / (1 - a_t))
    return mean + std * z


@pytest.mark.parametrize("op_name", ["mask", "matrix"])
@pytest.mark.parametrize("t", [900, 200, 10, 0])
def test_dmps_step_matches_its_float64_transcription(x64, op_name, t):
    prior, op, x, y = _problem(op_name)
    sig = 0.3
    M = np.asarray(op.matrix(), np.float64)
    xt = jax.random.normal(jax.random.PRNGKey(2), (6, 8), jnp.float64)
    key = jax.random.PRNGKey(5)
    out = mr.DMPSStep(sigma_y=sig, clip=False).step(key, prior.score_model(SCHED64), op, y, xt, jnp.int32(t),
                                                    jnp.int32(t - 1))
    a = A_EXT  # a[k] = alpha_bar(k - 1)
    ref = _np_dmps_step(np.asarray(xt), np.asarray(y, np.float64), M, sig, a[t + 1], a[t], _step_noise(key, xt.shape))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-7, atol=1e-8)


def test_dmps_run_matches_its_float64_transcription(x64):
    """A whole 1000-step DMPS run from pure noise, step for step with the same noise, and its D-P point."""
    d, sig, n = 4, 0.4, 64
    prior, op, x, y = _problem("matrix", d=d, sigma=sig, n=n, seed=1, rows=2)
    M = np.asarray(op.matrix(), np.float64)
    key = jax.random.PRNGKey(11)
    y = jnp.asarray(y, jnp.float64)
    out = mr.rps(key, prior.score_model(SCHED64), op, y, jnp.zeros(x.shape, jnp.float64), 1000,
                 sampler=mr.DMPSStep(sigma_y=sig, clip=False))
    # rps: per image i, keys_i = fold_in(key, i); (k_noise, k_loop) = split(keys_i); step k uses fold_in(k_loop, k)
    per = [jax.random.split(jax.random.fold_in(key, i)) for i in range(n)]
    a = A_EXT
    z0 = np.stack([np.asarray(jax.random.normal(p[0], (d,), jnp.float64)) for p in per])
    xx = np.sqrt(a[1000]) * np.zeros((n, d)) + np.sqrt(1 - a[1000]) * z0
    loop_keys = jnp.stack([p[1] for p in per])
    fold = jax.jit(jax.vmap(jax.random.fold_in, (0, None)))
    norm = jax.jit(jax.vmap(lambda k: jax.random.normal(k, (d,), jnp.float64)))
    yn = np.asarray(y, np.float64)
    for k, i in enumerate(range(999, -1, -1)):
        z = np.asarray(norm(fold(loop_keys, k)))
        xx = _np_dmps_step(xx, yn, M, sig, a[i + 1], a[i], z)
    np.testing.assert_allclose(np.asarray(out), xx, rtol=1e-6, atol=1e-6)
    post = prior.posterior(op.matrix(), sig, y)
    D_ref = float(np.mean(np.sum((xx - np.asarray(x)) ** 2, axis=-1)))
    D = float(jnp.mean(jnp.sum((out - x) ** 2, axis=-1)))
    assert abs(D - D_ref) < 1e-6 * D_ref
    assert D > float(jnp.trace(post.cov))  # a sampler: above the MMSE


# ---------------------------------------------------------------- DPS, the paper code's options

def _fake_learned_variance_model(v_value):
    """Exact eps of N(0, I) plus constant learned-variance channels ``v``."""
    prior = GaussianPrior.isotropic(4, 1.0)
    base = prior.score_model(SCHED64)

    def eps_fn(p, x, t, cond=None):
        return base.eps(x, t, cond)

    def var_fn(p, x, t, cond=None):
        return jnp.full_like(x, v_value)

    return mr.model.from_eps_fn(eps_fn, None, SCHED64, var_fn=var_fn)


@pytest.mark.parametrize("t", [500, 1, 0])
def test_dps_official_update_raw_eps_and_official_learned_noise(x64, t):
    """DPSStep.official(): x_next = sqrt(a_n) x0c + sqrt(1 - a_n - s^2) eps_raw + s z - zeta g, with
    s = exp(0.5 (f log beta_t + (1 - f) log beta_tilde_clipped_t)), f = (exp(v) + 1)/2, noise also at t = 0."""
    v = -0.3
    model = _fake_learned_variance_model(v)
    op = mr.make_operator("mask", (4,), keep=2, seed=0)
    y = jnp.asarray([[0.3, -0.2], [1.0, 0.5]], jnp.float64)
    xt = jax.random.normal(jax.random.PRNGKey(1), (2, 4), jnp.float64)
    key = jax.random.PRNGKey(3)
    zeta = 0.7
    out = mr.DPSStep.official(zeta=zeta).step(key, model, op, y, xt, jnp.int32(t), jnp.int32(t - 1))

    a = A_EXT
    a_t, a_n = a[t + 1], a[t]
    betas = np.asarray(SCHED64.betas, np.float64)
    x = np.asarray(xt)
    e = _np_eps(x, a_t)
    x0 = np.clip((x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t), -1, 1)
    bt = lambda i: betas[i] * (1 - a[i]) / (1 - a[i + 1])  # beta_tilde_i = beta_i (1 - a_{i-1}) / (1 - a_i)
    f = (np.exp(v) + 1) / 2
    s = np.exp(0.5 * (f * np.log(betas[t]) + (1 - f) * np.log(bt(max(t, 1)))))
    mean = np.sqrt(a_n) * x0 + np.sqrt(max(1 - a_n - s**2, 0.0)) * e
    # gradient of ||y - A x0(x)|| by finite differences of the float64 NumPy loss
    M = np.asarray(op.matrix(), np.float64)

    def loss(xv):
        x0v = np.clip((xv - np.sqrt(1 - a_t) * _np_eps(xv, a_t)) / np.sqrt(a_t), -1, 1)
        return np.sum(np.linalg.norm(np.asarray(y) - x0v @ M.T, axis=-1))

    h = 1e-6
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        dx = np.zeros_like(x)
        dx[idx] = h
        g[idx] = (loss(x + dx) - loss(x - dx)) / (2 * h)
    ref = mean + s * _step_noise(key, x.shape) - zeta * g
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-7)
    # the clean default (re-derived eps, guided-diffusion noise) differs, and adds no noise at t = 0
    clean = mr.DPSStep(zeta=zeta, variance="learned").step(key, model, op, y, xt, jnp.int32(t), jnp.int32(t - 1))
    if t <= 1:  # where beta_t and beta_tilde_t differ (mid-schedule they agree to 1e-5, and x0 is not clipped here)
        assert float(jnp.max(jnp.abs(clean - out))) > 1e-3
    if t == 0:
        clean0 = mr.DPSStep(zeta=zeta, variance="learned", noise_scale=0.0).step(key, model, op, y, xt, jnp.int32(0),
                                                                                   jnp.int32(-1))
        np.testing.assert_allclose(np.asarray(clean), np.asarray(clean0), atol=1e-12)


def test_dps_raw_mean_without_learned_variance_is_ddim_form(x64):
    """mean="raw" with the DDIM(eta) std: sqrt(a_n) x0 + sqrt(1 - a_n - s^2) eps_raw + s z - zeta g (g from the
    default step, which shares it)."""
    prior, op, x, y = _problem("mask", d=8, sigma=0.2, n=3)
    model = prior.score_model(SCHED64)
    xt = 2.0 * jax.random.normal(jax.random.PRNGKey(4), (3, 8), jnp.float64)  # far out: x0 gets clipped
    key, t = jax.random.PRNGKey(9), 300
    raw = mr.DPSStep(zeta=0.0, mean="raw").step(key, model, op, y, xt, jnp.int32(t), jnp.int32(t - 1))
    a = A_EXT
    a_t, a_n = a[t + 1], a[t]
    x_np = np.asarray(xt)
    e = _np_eps(x_np, a_t)
    x0 = np.clip((x_np - np.sqrt(1 - a_t) * e) / np.sqrt(a_t), -1, 1)
    s = np.sqrt((1 - a_n) / (1 - a_t)) * np.sqrt(1 - a_t / a_n)
    ref = np.sqrt(a_n) * x0 + np.sqrt(1 - a_n - s**2) * e + s * _step_noise(key, x_np.shape)
    np.testing.assert_allclose(np.asarray(raw), ref, rtol=1e-7, atol=1e-8)
    rederived = mr.DPSStep(zeta=0.0).step(key, model, op, y, xt, jnp.int32(t), jnp.int32(t - 1))
    assert float(jnp.max(jnp.abs(rederived - raw))) > 1e-3  # clipping makes the two means differ


def test_sampler_options_are_checked():
    with pytest.raises(ValueError, match="DPSStep.mean: expected one of"):
        mr.DPSStep(mean="official")
    with pytest.raises(ValueError, match="variance"):
        mr.DDPMStep(variance="fixed")
    with pytest.raises(ValueError, match="zeta must be finite"):
        mr.DPSStep(zeta=float("nan"))
    with pytest.raises(ValueError, match="sigma_y must be >= 0"):
        mr.PiGDMStep(sigma_y=-0.1)
    with pytest.raises(ValueError, match="data_var must be > 0"):
        mr.PiGDMStep(data_var=0.0)
    square = mr.custom_operator("square", (4,), (4,), lambda data, x: x * x)
    model = GaussianPrior.isotropic(4, 1.0).score_model(SCHED)
    for step in (mr.PiGDMStep(), mr.DMPSStep()):
        with pytest.raises(ValueError, match="needs a linear operator"):
            step.step(jax.random.PRNGKey(0), model, square, jnp.ones((1, 4)), jnp.ones((1, 4)), 5, 4)


# ---------------------------------------------------------------- RED-diff as NVlabs runs it

def test_red_diff_nvlabs_matches_a_numpy_transcription(x64):
    """Grid {T - skip, ..., 0}, skip = T/S; per step: x_t = sqrt(a) mu + sqrt(1-a) eps; loss
    mean((y - A mu)^2)/2 + lam r_t mean((e - eps) mu); Adam (b 0.9/0.99, eps 1e-8, lr 0.1); the returned estimate is
    the one before the last Adam step."""
    S, lam, lr = 5, 0.25, 0.1
    prior, op, x, y = _problem("matrix", d=6, sigma=0.2, n=3, seed=2, rows=3)
    cfg = mr.REDDiffConfig.nvlabs(n_steps=S)
    assert (cfg.lr, cfg.lam, cfg.grid, cfg.return_before_last) == (0.1, 0.25, "nvlabs", True)
    np.testing.assert_array_equal(np.asarray(mr.REDDiffConfig.nvlabs().times(1000)), np.arange(980, -1, -20))
    np.testing.assert_array_equal(np.asarray(cfg.times(1000)), [800, 600, 400, 200, 0])
    key = jax.random.PRNGKey(4)
    y = jnp.asarray(y, jnp.float64)  # a float64 run: its noise draws are float64 normals, as below
    out = mr.red_diff(key, prior.score_model(SCHED64), op, y, config=cfg)
    after = mr.red_diff(key, prior.score_model(SCHED64), op, y,
                        config=mr.REDDiffConfig.nvlabs(n_steps=S, return_before_last=False))

    M = np.asarray(op.matrix(), np.float64)
    yn = np.asarray(y, np.float64)
    mu = yn @ np.linalg.pinv(M).T
    m1, m2 = np.zeros_like(mu), np.zeros_like(mu)
    a_ext = A_EXT
    d, m = M.shape[1], M.shape[0]
    iterates = [mu.copy()]
    for k, t in enumerate([800, 600, 400, 200, 0]):
        a = a_ext[t + 1]
        eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), k), (d,),
                                                     jnp.float64)) for i in range(3)])
        xt = np.sqrt(a) * mu + np.sqrt(1 - a) * eps
        e = _np_eps(xt, a)
        r_t = np.sqrt(1 - a) / np.sqrt(a)
        g = -(yn - mu @ M.T) @ M / m + lam * r_t * (e - eps) / d
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.99 * m2 + 0.01 * g * g
        mhat, vhat = m1 / (1 - 0.9 ** (k + 1)), m2 / (1 - 0.99 ** (k + 1))
        mu = mu - lr * mhat / (np.sqrt(vhat) + 1e-8)
        iterates.append(mu.copy())
    np.testing.assert_allclose(np.asarray(after), iterates[-1], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(np.asarray(out), iterates[-2], rtol=1e-7, atol=1e-9)


def test_testbed_runs_pigdm_and_dmps_and_uses_them_as_stage2():
    """`mapreps testbed --algo pigdm|dmps` (pure noise, full grid) and `--algo map-rps --stage2 pigdm`: PiGDM's point
    is the exact posterior sampler's (2 D*, 0) within MC error (n = 1000); every point respects the ideal D-P bound."""
    from mapreps_jax.testbed import TestbedConfig, run_testbed

    res = {a: run_testbed(TestbedConfig(algo=a, n_measurements=1000))["points"] for a in ("pigdm", "dmps")}
    p = res["pigdm"][0]
    assert p["t0"] == 1000 and abs(p["D"] / (2 * p["D_star"]) - 1) < 0.08 and p["P"] < 0.25, p
    q = res["dmps"][0]
    assert q["D"] >= q["D_ideal"] - 0.3 and q["D"] > q["D_star"], q
    sweep = run_testbed(TestbedConfig(algo="map-rps", stage2="pigdm", t0=(0, 999), n_measurements=512))["points"]
    # t0 = 0: the MAP estimate (D*, P*); t0 = 999: the exact posterior sampler from a re-noised MAP (2 D*, 0)
    assert abs(sweep[0]["D"] / sweep[0]["D_star"] - 1) < 0.05
    assert abs(sweep[1]["D"] / (2 * sweep[1]["D_star"]) - 1) < 0.1 and sweep[1]["P"] < 0.3, sweep[1]
    with pytest.raises(ValueError, match="--stage2 expected one of"):
        TestbedConfig(stage2="ddim").validate()
