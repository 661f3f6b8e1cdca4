"""Bad input to the algorithm API gives one clear ValueError/TypeError (argument, expected, given), before any long
computation; nothing hangs, nothing is silently cut or clamped."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr

SCHED = mr.make_schedule("linear")


@pytest.fixture(scope="module")
def problem():
    prior = mr.GaussianPrior.isotropic(4, 1.0)
    op = mr.make_operator("mask", (4,), keep=2, seed=0)
    x = prior.sample(jax.random.PRNGKey(0), 3)
    y = op.measure(jax.random.PRNGKey(1), x, 0.3)
    return prior.score_model(SCHED), op, x, y


KEY = jax.random.PRNGKey(0)
SAMPLER = mr.DPSStep(zeta=0.1, clip=False)


@pytest.mark.parametrize("t0,msg", [(1e9, r"t0 must be in \[0, 1000\], got 1000000000.0"),
                                    (3000.0, r"t0 must be in \[0, 1000\], got 3000.0"),
                                    (100.7, "t0 must be a whole number of steps"),
                                    (-50.0, r"t0 must be in \[0, 1000\], got -50.0"),
                                    (float("nan"), "t0 must be finite, got nan"),
                                    (1001, r"t0 must be in \[0, 1000\], got 1001")])
def test_bad_t0_is_refused_everywhere(problem, t0, msg):
    model, op, x, y = problem
    calls = {
        "rps": lambda: mr.rps(KEY, model, op, y, op.x_init(y), t0, sampler=SAMPLER),
        "map_rps": lambda: mr.map_rps(KEY, model, op, y, t0, map_config=mr.MAPConfig(w=0.1), sampler=SAMPLER),
        "ccdf": lambda: mr.ccdf(KEY, model, op, y, t0, sampler=SAMPLER),
        "dp_sweep": lambda: mr.dp_sweep(KEY, model, op, y, [0, t0], map_config=mr.MAPConfig(w=0.1), sampler=SAMPLER),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError, match=msg):
            call()


def test_whole_float_t0_is_accepted_and_equals_the_int(problem):
    model, op, x, y = problem
    a = mr.rps(KEY, model, op, y, op.x_init(y), 20.0, sampler=SAMPLER)
    b = mr.rps(KEY, model, op, y, op.x_init(y), 20, sampler=SAMPLER)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"t0 must be in \[0, 1000\], got 1500.0"):
        mr.rps(KEY, model, op, y, op.x_init(y), 1500.0, sampler=SAMPLER, n_steps=4, continuous=True)


def test_t0_list_one_rule_for_every_command():
    """``check_t0_list`` (the ``--t0`` list of demo, restore, restore --preset and restore-batch): whole numbers of
    steps in [0, T], at least one; a float is refused unless whole (``restore_batch`` used to truncate 200.7 to 200)."""
    from mapreps_jax.batch_restore import check_t0s
    from mapreps_jax.validation import check_t0_list

    got = check_t0_list([0, 200.0, np.int64(400), np.float32(1000), jnp.asarray(7)], 1000, "x")
    assert got == [0, 200, 400, 1000, 7] and all(type(t) is int for t in got)
    for bad, shown in [([0, 200.7], "200.7"), ([0, 1001], "1001"), ([-1], "-1"), ([True], "True"),
                       ([float("nan")], "nan"), ([0, "a"], "'a'"), ([[1, 2]], "[1, 2]")]:
        with pytest.raises(ValueError, match=r"x: every t0 must be a whole number of steps in \[0, 1000\]") as e:
            check_t0_list(bad, 1000, "x")
        assert f"(not allowed: [{shown}])" in str(e.value), str(e.value)
    for bad in ([], ()):
        with pytest.raises(ValueError, match="x: expected at least one re-noising time t0, got none"):
            check_t0_list(bad, 1000, "x")
    with pytest.raises(ValueError, match="x: t0 must be a list"):
        check_t0_list(200, 1000, "x")
    with pytest.raises(ValueError, match=r"restore-batch: --t0: .*\(not allowed: \[200.7\]\)"):
        check_t0s([0, 200.7], 1000)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(n_iter=0), "n_iter .* must be >= 1, got 0"),
    (dict(n_iter=2.5), "n_iter .* must be a whole number"),
    (dict(lr=-1.0), r"lr must be > 0.0, got -1.0"),
    (dict(lr=float("nan")), "lr must be finite"),
    (dict(w=float("nan")), r"w \(prior weight\) must be finite"),
    (dict(w=-0.5), r"w \(prior weight\) must be >= 0"),
    (dict(t1=-5.0), r"t1 .* must be > -1.0, got -5.0"),
    (dict(prox_step=0.0), "prox_step must be > 0"),
    (dict(average=-1), "average must be >= 0"),
])
def test_map_config_garbage_is_refused(kwargs, msg):
    with pytest.raises(ValueError, match="MAPConfig: " + msg):
        mr.MAPConfig(**kwargs)


def test_traced_config_values_are_not_inspected(problem):
    """Validation reads concrete values only: jit/grad over the hyper-parameters still works."""
    model, op, x, y = problem
    f = jax.jit(lambda lr: mr.map_estimate(KEY, model, op, y, config=mr.MAPConfig(w=0.1, n_iter=3, lr=lr)))
    assert np.all(np.isfinite(np.asarray(f(0.05))))
    g = jax.grad(lambda z: jnp.sum(mr.rps(KEY, model, op, y, op.x_init(y), 5,
                                          sampler=mr.DPSStep(zeta=z, clip=False))))(0.1)
    assert math.isfinite(float(g))


@pytest.mark.parametrize("sigma_y", [float("nan"), -0.1])
def test_sigma_y_garbage_is_refused(problem, sigma_y):
    model, op, x, y = problem
    with pytest.raises(ValueError, match="sigma_y .* must be"):
        mr.map_estimate(KEY, model, op, y, config=mr.MAPConfig(n_iter=3), sigma_y=sigma_y)
    with pytest.raises(ValueError, match="sigma_y .* must be"):
        mr.dp_sweep(KEY, model, op, y, [0], map_config=mr.MAPConfig(n_iter=3), sigma_y=sigma_y)


def test_sampler_and_baseline_garbage_is_refused(problem):
    model, op, x, y = problem
    with pytest.raises(ValueError, match="DPSStep: zeta must be finite"):
        mr.DPSStep(zeta=float("nan"))
    with pytest.raises(ValueError, match="noise_scale must be >= 0"):
        mr.DPSStep(noise_scale=-1.0)
    with pytest.raises(ValueError, match="n_samples must be a positive integer, got 0"):
        mr.dps_average(KEY, model, op, y, n_samples=0)
    with pytest.raises(ValueError, match="REDDiffConfig: lr must be > 0.0"):
        mr.REDDiffConfig(lr=-0.1)
    with pytest.raises(ValueError, match="REDDiffConfig.n_steps"):
        mr.REDDiffConfig(n_steps=0)
    with pytest.raises(ValueError, match="dps: n_steps must be >= 1"):
        mr.dps(KEY, model, op, y, n_steps=0)


def test_batch_mismatches_are_refused(problem):
    model, op, x, y = problem
    with pytest.raises(ValueError, match="map_estimate: x_init and y must have the same batch size; got 2 and 3"):
        mr.map_estimate(KEY, model, op, y, config=mr.MAPConfig(w=0.1, n_iter=2), x_init=x[:2])
    with pytest.raises(ValueError, match="red_diff: x_init and y must have the same batch size"):
        mr.red_diff(KEY, model, op, y, x_init=x[:2], config=mr.REDDiffConfig(n_steps=2))
    with pytest.raises(ValueError, match="dp_sweep: x_true and y must have the same batch size; got 2 and 3"):
        mr.dp_sweep(KEY, model, op, y, [0], map_config=mr.MAPConfig(w=0.1, n_iter=2), x_true=x[:2])
    with pytest.raises(ValueError, match="rps: y and x_init must have the same batch size"):
        mr.rps(KEY, model, op, y, x[:2], 5, sampler=SAMPLER)


def test_float64_runs_stay_float64(problem):
    model, op, x, y = problem
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        y64 = jnp.asarray(y, jnp.float64)
        for name, out in {
            "dps": mr.dps(KEY, model, op, y64, n_steps=3, clip=False),
            "rps": mr.rps(KEY, model, op, y64, op.x_init(y64), 5, sampler=SAMPLER),
            "map_estimate": mr.map_estimate(KEY, model, op, y64, config=mr.MAPConfig(w=0.1, n_iter=2)),
            "red_diff": mr.red_diff(KEY, model, op, y64, config=mr.REDDiffConfig(n_steps=2)),
        }.items():
            assert out.dtype == jnp.float64, (name, out.dtype)
    finally:
        jax.config.update("jax_enable_x64", prev)


@pytest.mark.parametrize("sigma_y", [float("nan"), -0.2, np.array([0.1, -0.1, 0.1])])
def test_measure_refuses_bad_noise_levels(problem, sigma_y):
    model, op, x, y = problem
    with pytest.raises(ValueError, match=r"measure: sigma_y \(measurement noise std"):
        op.measure(KEY, x, sigma_y if np.ndim(sigma_y) == 0 else sigma_y[:, None])
