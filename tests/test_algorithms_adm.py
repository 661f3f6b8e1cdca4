"""Every algorithm of the core library runs on a tiny random ADM UNet under jit: shapes, finite, deterministic,
the learned-variance DDPM step included."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr

CFG = mr.ADMConfig.tiny(in_channels=1, out_channels=1)


@pytest.fixture(scope="module")
def setup():
    params = mr.init_adm_params(jax.random.PRNGKey(0), CFG)
    model = mr.adm_score_model(CFG, params)
    shape = (CFG.image_size, CFG.image_size, CFG.in_channels)
    op = mr.make_operator("sr", shape, factor=2, kind="avg")
    x = jnp.clip(0.5 * jax.random.normal(jax.random.PRNGKey(1), (2,) + shape), -1, 1)
    y = op.measure(jax.random.PRNGKey(2), x, 0.05)
    return model, op, x, y


def _check(fn, *args, shape):
    a = fn(*args)
    b = fn(*args)
    assert a.shape == shape
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return a


def test_all_algorithms_on_tiny_adm(setup):
    model, op, x, y = setup
    assert model.learned_variance
    key = jax.random.PRNGKey(3)
    cfg = mr.MAPConfig(n_iter=5, lr=0.05)
    runs = {
        "map_stable": jax.jit(lambda k: mr.map_estimate(k, model, op, y, sigma_y=0.05,
                                                         config=mr.MAPConfig(n_iter=5, lr=0.05, stable=True))),
        "rps_dps": jax.jit(lambda k: mr.rps(k, model, op, y, op.x_init(y), 6)),
        "rps_dps_learned_var": jax.jit(lambda k: mr.rps(k, model, op, y, op.x_init(y), 6,
                                                        sampler=mr.DPSStep(variance="learned"))),
        "rps_subgrid": jax.jit(lambda k: mr.rps(k, model, op, y, op.x_init(y), 300, n_steps=4)),
        "rps_ddnm": jax.jit(lambda k: mr.rps(k, model, op, y, op.x_init(y), 6, sampler=mr.DDNMStep())),
        "map_rps": jax.jit(lambda k: mr.map_rps(k, model, op, y, 5, map_config=cfg, sigma_y=0.05)),
        "vsdps_s": jax.jit(lambda k: mr.dps(k, model, op, y, n_steps=4, noise_scale=0.5)),
        "ccdf": jax.jit(lambda k: mr.ccdf(k, model, op, y, 5)),
        "red_diff": jax.jit(lambda k: mr.red_diff(k, model, op, y, config=mr.REDDiffConfig(n_steps=5))),
        "rps_sde": jax.jit(lambda k: mr.rps_sde(k, model, op.x_init(y), 50.0, n_steps=4, clip=True)),
    }
    for name, f in runs.items():
        _check(f, key, shape=x.shape)
    res = mr.dp_sweep(key, model, op, y, [0, 3, 6], map_config=cfg, sigma_y=0.05, x_true=x)
    assert res.outputs.shape == (3,) + x.shape and res.nfe["total"] == 5 + 9
    assert res.psnr.shape == (3, 2) and np.all(np.isfinite(np.asarray(res.psnr)))


def test_learned_variance_step_uses_the_variance_channels(setup):
    """A DDPM step with learned variance differs from the fixed-variance step only through the noise std."""
    model, op, x, y = setup
    key = jax.random.PRNGKey(4)
    xt = jax.random.normal(key, x.shape)
    i = jnp.int32(500)
    a = mr.DDPMStep(variance="learned").step(key, model, op, y, xt, i, i - 1)
    b = mr.DDPMStep().step(key, model, op, y, xt, i, i - 1)
    mean = mr.DDPMStep(noise_scale=0.0).step(key, model, op, y, xt, i, i - 1)
    _, v = model.eps_and_var(xt, i)
    s_learned = mr.learned_range_std(model.schedule, i, v)
    z = (b - mean) / jnp.sqrt(mr.posterior_variance(model.schedule, i))
    np.testing.assert_allclose(np.asarray(a - mean), np.asarray(s_learned * z), rtol=1e-3, atol=1e-5)
