"""Traceability: jit once (no recompilation), vmap over t0, grad over stage hyper-parameters and over t0."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import mapreps_jax as mr
from mapreps_jax.priors import GaussianPrior

SCHED = mr.make_schedule("linear")


def _problem(n=16, d=6, sigma=0.3):
    prior = GaussianPrior.random(jax.random.PRNGKey(0), d)
    op = mr.make_operator("matrix", (d,), rows=3, seed=1)
    x = prior.sample(jax.random.PRNGKey(1), n)
    y = op.measure(jax.random.PRNGKey(2), x, sigma)
    return prior, op, x, y


def _counting(model):
    """The same model whose apply counts how often it is traced (a Python side effect runs at trace time only)."""
    count = {"n": 0}
    inner = model.apply

    def apply(params, x, t, cond=None):
        count["n"] += 1
        return inner(params, x, t, cond)

    return dataclasses.replace(model, apply=apply), count


def test_jitted_entry_points_do_not_recompile():
    prior, op, x, y = _problem()
    model, count = _counting(prior.score_model(SCHED))
    cfg = mr.MAPConfig(n_iter=20, lr=0.05, w=0.1)
    entry = {
        "map": jax.jit(lambda k, yy, c: mr.map_estimate(k, model, op, yy, config=c)),
        "rps": jax.jit(lambda k, yy, t0: mr.rps(k, model, op, yy, op.x_init(yy), t0, sampler=mr.DPSStep(clip=False))),
        "dps": jax.jit(lambda k, yy, z: mr.dps(k, model, op, yy, zeta=z, clip=False, n_steps=5)),
        "red_diff": jax.jit(lambda k, yy, lam: mr.red_diff(k, model, op, yy,
                                                          config=mr.REDDiffConfig(lam=lam, n_steps=5))),
    }
    args2 = {"map": (cfg, dataclasses.replace(cfg, w=0.2, n_iter=35, t1=12.5)), "rps": (jnp.int32(3), jnp.int32(40)),
             "dps": (0.1, 0.3), "red_diff": (0.25, 0.5)}
    for name, f in entry.items():
        a, b = args2[name]
        count["n"] = 0
        out1 = f(jax.random.PRNGKey(0), y, a)
        n_first = count["n"]
        assert n_first >= 1
        out2 = f(jax.random.PRNGKey(1), y + 0.01, b)
        assert count["n"] == n_first, f"{name} retraced on a second call"
        assert np.all(np.isfinite(np.asarray(out1))) and np.all(np.isfinite(np.asarray(out2)))
    # dp_sweep: Stage 2 compiled once for all t0 (one trace of the Stage-2 step for all five t0)
    count["n"] = 0
    mr.dp_sweep(jax.random.PRNGKey(3), model, op, y, [0, 5, 10, 20, 30], map_config=cfg,
                sampler=mr.DPSStep(clip=False))
    first = count["n"]
    mr.dp_sweep(jax.random.PRNGKey(4), model, op, y, [1, 7, 12, 25, 300], map_config=cfg,
                sampler=mr.DPSStep(clip=False))
    assert count["n"] == first


def test_vectorized_sweep_equals_sequential():
    prior, op, x, y = _problem()
    model = prior.score_model(SCHED)
    cfg = mr.MAPConfig(n_iter=30, lr=0.05, w=0.1)
    t0s = [0, 3, 17, 40]
    kw = dict(map_config=cfg, sampler=mr.DPSStep(zeta=0.3, clip=False), x_true=x)
    a = mr.dp_sweep(jax.random.PRNGKey(5), model, op, y, t0s, **kw)
    b = mr.dp_sweep(jax.random.PRNGKey(5), model, op, y, t0s, vectorize=True, **kw)
    np.testing.assert_allclose(np.asarray(a.outputs), np.asarray(b.outputs), rtol=1e-4, atol=1e-5)
    # a second vectorised sweep of the same shape (other key, y, t0 values) reuses the compiled program
    counting, count = _counting(model)
    mr.dp_sweep(jax.random.PRNGKey(6), counting, op, y, t0s, vectorize=True, **kw)
    first = count["n"]
    mr.dp_sweep(jax.random.PRNGKey(7), counting, op, y + 0.01, [1, 5, 9, 40], vectorize=True, **kw)
    assert first >= 1 and count["n"] == first
    np.testing.assert_array_equal(np.asarray(a.outputs[0]), np.asarray(a.x_map))  # t0 = 0 is the MAP estimate
    assert a.nfe["total"] == 30 + sum(t0s)
    assert b.nfe["total_vectorized"] == 30 + len(t0s) * max(t0s)


def test_single_rps_equals_full_loop_written_out():
    """rps(t0) = re-noise with alpha_bar(t0 - 1), then t0 sampler steps i = t0-1..0 (a plain Python loop here)."""
    prior, op, x, y = _problem(n=4)
    model = prior.score_model(SCHED)
    sampler = mr.DPSStep(zeta=0.2, clip=False)
    x_init = op.x_init(y)
    t0 = 6
    key = jax.random.PRNGKey(9)
    out = mr.rps(key, model, op, y, x_init, jnp.int32(t0), sampler=sampler)
    # per-image streams (mapreps_jax.rng): image b re-noises with split(fold_in(key, b))[0] and takes step k with
    # fold_in(split(fold_in(key, b))[1], k); written out here with jax.random alone
    per = [jax.random.split(jax.random.fold_in(key, b)) for b in range(x_init.shape[0])]
    k_noise = jnp.stack([p[0] for p in per])
    k_loop = jnp.stack([p[1] for p in per])
    a = SCHED.alpha_bar_ext[t0]  # alpha_bar(t0 - 1)
    z = jnp.stack([jax.random.normal(k, x_init.shape[1:]) for k in k_noise])
    xx = jnp.sqrt(a) * x_init + jnp.sqrt(1 - a) * z
    for k, i in enumerate(range(t0 - 1, -1, -1)):
        step_keys = jnp.stack([jax.random.fold_in(kl, k) for kl in k_loop])
        xx = sampler.step(step_keys, model, op, y, xx, jnp.int32(i), jnp.int32(i - 1))
    np.testing.assert_allclose(np.asarray(out), np.asarray(xx), rtol=1e-5, atol=1e-6)


def _fd(f, v, h):
    return (f(v + h) - f(v - h)) / (2 * h)


def test_grad_over_map_hyperparameters_matches_finite_difference():
    prior, op, x, y = _problem()
    model = prior.score_model(SCHED)

    def loss(w, lr, t1):
        cfg = mr.MAPConfig(t1=t1, w=w, n_iter=jnp.int32(15), max_iter=20, lr=lr)
        return jnp.mean((mr.map_estimate(jax.random.PRNGKey(0), model, op, y, config=cfg) - x) ** 2)

    g = jax.grad(loss, argnums=(0, 1, 2))(0.2, 0.05, 10.3)
    np.testing.assert_allclose(g[0], _fd(lambda v: loss(v, 0.05, 10.3), 0.2, 1e-2), rtol=2e-2)
    np.testing.assert_allclose(g[1], _fd(lambda v: loss(0.2, v, 10.3), 0.05, 1e-3), rtol=2e-2)
    np.testing.assert_allclose(g[2], _fd(lambda v: loss(0.2, 0.05, v), 10.3, 0.05), rtol=5e-2)


def test_grad_over_dps_step_size_through_stage2_matches_finite_difference():
    """Pixel space: d loss / d zeta through a whole Stage 2 of DPS steps (each step's Tweedie estimate is a
    differentiable function of x_t)."""
    prior, op, x, y = _problem(n=8)
    model = prior.score_model(SCHED)

    def loss(zeta):
        out = mr.rps(jax.random.PRNGKey(2), model, op, y, op.x_init(y), jnp.int32(10),
                     sampler=mr.DPSStep(zeta=zeta, clip=False))
        return jnp.mean((out - x) ** 2)

    g = jax.grad(loss)(0.2)
    np.testing.assert_allclose(g, _fd(jax.jit(loss), 0.2, 1e-3), rtol=2e-2)


def test_grad_over_prox_step_and_average_count_is_traceable():
    """solver="prox": d loss / d eta (through the CG solves) matches a finite difference; ``average`` is traced, so
    one compiled function serves every averaging length."""
    prior, op, x, y = _problem()
    model = prior.score_model(SCHED)

    def loss(eta, average):
        cfg = mr.MAPConfig(t1=10.0, w=0.2, n_iter=jnp.int32(15), max_iter=20, solver="prox", prox_step=eta,
                           average=average, cg_iters=8)
        return jnp.mean((mr.map_estimate(jax.random.PRNGKey(0), model, op, y, config=cfg) - x) ** 2)

    g = jax.grad(loss)(2.0, 5)
    np.testing.assert_allclose(g, _fd(lambda v: loss(v, 5), 2.0, 1e-2), rtol=2e-2)
    f = jax.jit(loss)
    f(2.0, 5)
    n = f._cache_size()
    assert float(f(2.0, 0)) != float(f(2.0, 5))
    assert f._cache_size() == n


def test_continuous_rps_is_differentiable_in_t0():
    prior, op, x, y = _problem(n=8)
    model = prior.score_model(SCHED)
    x_init = op.x_init(y)
    sampler = mr.DDPMStep(eta=0.0)  # deterministic DDIM moves: the output is smooth in t0

    def f(t0):
        out = mr.rps(jax.random.PRNGKey(1), model, op, y, x_init, t0, sampler=sampler, n_steps=8, continuous=True)
        return jnp.mean((out - x) ** 2)

    for t0 in (120.3, 480.6):
        g = jax.grad(f)(jnp.float32(t0))
        fd = _fd(f, jnp.float32(t0), 0.2)
        assert np.isfinite(float(g)) and float(g) != 0.0
        np.testing.assert_allclose(float(g), float(fd), rtol=5e-2, atol=1e-6)


def test_subgrid_times_and_nfe():
    times, nxt = mr.subgrid_times(99, 5)
    np.testing.assert_array_equal(np.asarray(times), [99, 74, 50, 25, 0])
    np.testing.assert_array_equal(np.asarray(nxt), [74, 50, 25, 0, -1])
    assert mr.stage2_nfe(300) == 300 and mr.stage2_nfe(300, 20) == 20 and mr.stage2_nfe(0, 20) == 0


def test_bad_inputs_raise_clear_errors():
    prior, op, x, y = _problem()
    model = prior.score_model(SCHED)
    import pytest

    with pytest.raises(ValueError, match=r"shape \[batch, 3\]"):
        mr.map_estimate(jax.random.PRNGKey(0), model, op, y[:, :2])
    with pytest.raises(ValueError, match="finite"):
        mr.map_estimate(jax.random.PRNGKey(0), model, op, y.at[0, 0].set(jnp.nan), config=mr.MAPConfig(w=0.1))
    with pytest.raises(ValueError, match="sigma_y"):
        mr.map_estimate(jax.random.PRNGKey(0), model, op, y)  # w='auto' without sigma_y
    with pytest.raises(ValueError, match="t0 must be in"):
        mr.rps(jax.random.PRNGKey(0), model, op, y, op.x_init(y), 1001)
    with pytest.raises(TypeError, match="floating"):
        mr.rps(jax.random.PRNGKey(0), model, op, y.astype(jnp.int32), op.x_init(y), 5)
    with pytest.raises(ValueError, match="unknown sampler"):
        mr.make_sampler("langevin")
    with pytest.raises(ValueError, match="weighting"):
        mr.REDDiffConfig(weighting="cubic")
    with pytest.raises(ValueError, match="'auto'"):
        mr.MAPConfig(w="principled")


def test_map_trace_reports_the_data_fit_of_the_iterates():
    prior, op, x, y = _problem()
    model = prior.score_model(SCHED)
    cfg = mr.MAPConfig(n_iter=40, lr=0.05, w=0.05)
    x_map, info = mr.map_estimate_trace(jax.random.PRNGKey(0), model, op, y, config=cfg)
    trace = info.data_fit
    assert trace.shape == (40, y.shape[0])
    np.testing.assert_allclose(np.asarray(x_map), np.asarray(mr.map_estimate(jax.random.PRNGKey(0), model, op, y,
                                                                             config=cfg)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(trace[-1]), np.asarray(jnp.sum((y - op.A(x_map)) ** 2, -1)), rtol=1e-5)
    assert float(trace[-1].mean()) < float(trace[0].mean())


def _latent_problem(n=8, d=6):
    """The Gaussian problem seen through a nonlinear decoder ``D(z) = M (z + 0.1 z^3)`` (``E(x) = M^T x``): a latent
    model whose data fit is not linear in the state."""
    prior, op, x, y = _problem(n=n, d=d)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(d, d)))
    space = mr.latent_space(jnp.asarray(q, jnp.float32), _cubic_encode, _cubic_decode, name="cubic")
    return dataclasses.replace(prior.score_model(SCHED), space=space), op, x, y


def _cubic_encode(m, x, key=None):
    return x @ m


def _cubic_decode(m, z):
    return (z + 0.1 * z ** 3) @ m.T


def test_latent_path_is_traceable_like_the_pixel_path():
    """LMAP-RPS: grad over Stage-1 hyper-parameters and over the Stage-2 step size matches finite differences, the
    vectorised sweep equals the sequential one, and a second sweep does not recompile."""
    model, op, x, y = _latent_problem()

    def loss_map(w, lr):
        cfg = mr.MAPConfig(t1=50.0, w=w, n_iter=jnp.int32(12), max_iter=16, lr=lr)
        z = mr.map_estimate(jax.random.PRNGKey(0), model, op, y, config=cfg)
        return jnp.mean((model.decode(z) - x) ** 2)

    # Adam's normalised steps make the loss strongly curved in w and lr: central differences need small steps here
    # (at h = 1e-2 on w the difference quotient is 3 % off; at 1e-3 it agrees to 1e-4)
    g = jax.grad(loss_map, argnums=(0, 1))(0.2, 0.05)
    np.testing.assert_allclose(g[0], _fd(lambda v: loss_map(v, 0.05), 0.2, 1e-3), rtol=2e-2)
    np.testing.assert_allclose(g[1], _fd(lambda v: loss_map(0.2, v), 0.05, 1e-4), rtol=2e-2)

    z_init = model.encode(op.x_init(y))
    # Stage 2: d loss / d zeta through 8 steps (the step's Tweedie estimate and the gluing target are differentiated
    # too; a stop-gradient on them once made this derivative 9x too small)
    for step in (lambda z: mr.DPSStep.official_latent(zeta=z, clip=False),
                 lambda z: mr.PSLDStep.official_lmap(zeta=z, gamma=0.3, clip=False)):
        def loss_rps(zeta):
            z = mr.rps(jax.random.PRNGKey(1), model, op, y, z_init, jnp.int32(8), sampler=step(zeta))
            return jnp.mean((model.decode(z) - x) ** 2)

        gz = jax.grad(loss_rps)(0.05)
        assert abs(float(gz)) > 0
        np.testing.assert_allclose(gz, _fd(jax.jit(loss_rps), 0.05, 1e-3), rtol=2e-2)

    cfg = mr.MAPConfig(t1=50.0, n_iter=10, lr=0.05, w=0.1)
    kw = dict(map_config=cfg, sampler=mr.DPSStep.official_latent(zeta=0.05, clip=False), x_true=x)
    t0s = [0, 3, 9, 20]
    a = mr.dp_sweep(jax.random.PRNGKey(5), model, op, y, t0s, **kw)
    b = mr.dp_sweep(jax.random.PRNGKey(5), model, op, y, t0s, vectorize=True, **kw)
    np.testing.assert_allclose(np.asarray(a.outputs), np.asarray(b.outputs), rtol=1e-4, atol=1e-5)
    assert a.outputs.shape == (len(t0s),) + x.shape  # decoded images
    counting, count = _counting(model)
    mr.dp_sweep(jax.random.PRNGKey(6), counting, op, y, t0s, **kw)
    first = count["n"]
    mr.dp_sweep(jax.random.PRNGKey(7), counting, op, y + 0.01, [1, 5, 30], **kw)
    assert first >= 1 and count["n"] == first
