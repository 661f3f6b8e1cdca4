"""Per-image randomness (mapreps_jax.rng): image i restored alone, inside a batch of 8, or inside a batch split
differently gives the same output, for MAP-RPS, DPS, RED-diff (and the other stochastic entry points).

Reference: the same computation on a different batch. On the exact prior the network is a per-row matrix product,
so the outputs agree to float rounding (atol 1e-6 stated). On the tiny ADM UNet, XLA's batched convolutions round
differently with the batch size (about 1e-7 relative per call), and RED-diff's Adam step, which divides by the root
of its second moment, amplifies that: the largest difference measured was 1.2e-5 over 256 pixels in [-1, 1], so the
ADM check uses atol 5e-5. A broken stream (a draw that depends on the batch) moves outputs by O(0.1-1).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr

SCHED = mr.make_schedule("linear")
B = 8


def _exact_problem():
    prior = mr.GaussianPrior.isotropic(8, 1.0)
    op = mr.make_operator("mask", (8,), keep=4, seed=0)
    x = prior.sample(jax.random.PRNGKey(0), B)
    y = op.measure(jax.random.PRNGKey(1), x, 0.5)
    return prior.score_model(SCHED), op, x, y


def _adm_problem():
    cfg = mr.ADMConfig.tiny(in_channels=1, out_channels=1)
    model = mr.adm_score_model(cfg, mr.init_adm_params(jax.random.PRNGKey(0), cfg))
    shape = (cfg.image_size, cfg.image_size, 1)
    op = mr.make_operator("sr", shape, factor=2, kind="avg")
    x = jnp.clip(0.5 * jax.random.normal(jax.random.PRNGKey(1), (B,) + shape), -1, 1)
    y = op.measure(jax.random.PRNGKey(2), x, 0.05)
    return model, op, x, y


def _algorithms(model, op, small):
    cfg = mr.MAPConfig(w=0.5 if small else 0.05, lr=0.05, n_iter=20 if small else 4)
    sampler = mr.DPSStep(zeta=0.2, clip=not small)
    n = 10 if small else 3
    return {
        "map_rps": lambda k, y: mr.map_rps(k, model, op, y, 100, map_config=cfg, sigma_y=0.5, sampler=sampler,
                                           n_steps=n),
        "dps": lambda k, y: mr.dps(k, model, op, y, zeta=0.2, clip=not small, n_steps=n),
        "red_diff": lambda k, y: mr.red_diff(k, model, op, y, config=mr.REDDiffConfig(n_steps=n)),
    }


def _check_alone_and_split(f, y, atol, split=True):
    key = jax.random.PRNGKey(42)
    keys = mr.image_keys(key, B)
    full = np.asarray(f(key, y))
    for i in ((0, 5) if split else (5,)):  # image i alone, with its own key
        alone = np.asarray(f(keys[i:i + 1], y[i:i + 1]))
        np.testing.assert_allclose(alone[0], full[i], atol=atol, rtol=0)
    if split:  # the batch split differently: [0:3] and [3:8], each with its slice of the keys
        parts = np.concatenate([np.asarray(f(keys[:3], y[:3])), np.asarray(f(keys[3:], y[3:]))])
        np.testing.assert_allclose(parts, full, atol=atol, rtol=0)
    # and the draws really differ between images and keys (the check is not vacuous)
    other = np.asarray(f(jax.random.PRNGKey(43), y))
    assert np.max(np.abs(other - full)) > 1e-3


@pytest.mark.parametrize("algo", ["map_rps", "dps", "red_diff"])
def test_image_alone_equals_image_in_batch_exact_prior(algo):
    model, op, x, y = _exact_problem()
    _check_alone_and_split(_algorithms(model, op, small=True)[algo], y, atol=1e-6)


@pytest.mark.parametrize("algo", ["map_rps", "dps", "red_diff"])
def test_image_alone_equals_image_in_batch_tiny_adm(algo):
    model, op, x, y = _adm_problem()
    # alone vs in the batch of 8 only (each batch size is a new compilation of the network)
    _check_alone_and_split(jax.jit(_algorithms(model, op, small=False)[algo]), y, atol=5e-5, split=False)


def test_other_stochastic_entry_points_are_per_image():
    model, op, x, y = _exact_problem()
    post = mr.GaussianPrior.isotropic(8, 1.0).posterior_model(op.matrix(), 0.5, SCHED)
    fns = {
        "measure": lambda k, yy: op.measure(k, op.pinv(yy), 0.5),
        "renoise": lambda k, yy: mr.renoise(k, op.pinv(yy), 0.3),
        "rps_sde": lambda k, yy: mr.rps_sde(k, post, op.pinv(yy), 200.0, n_steps=8, cond=yy),
        "dps_average": lambda k, yy: mr.dps_average(k, model, op, yy, 3, zeta=0.2, clip=False, n_steps=5),
        "prior_sample": lambda k, yy: mr.prior_sample(k, model, yy.shape[:1] + (8,), n_steps=5),
        "pigdm": lambda k, yy: mr.rps(k, model, op, yy, op.pinv(yy), 50, sampler=mr.PiGDMStep(sigma_y=0.5, clip=False)),
        "dp_sweep": lambda k, yy: mr.dp_sweep(k, model, op, yy, [0, 30], map_config=mr.MAPConfig(w=0.5, n_iter=5),
                                              sampler=mr.DPSStep(zeta=0.2, clip=False), n_steps=4).outputs[1],
    }
    for name, f in fns.items():  # alone vs in the batch (the split batch is covered above)
        _check_alone_and_split(f if name == "dp_sweep" else jax.jit(f), y, atol=1e-6, split=False)


def test_keys_are_checked():
    model, op, x, y = _exact_problem()
    with pytest.raises(ValueError, match="one key per image: expected 8, got 3"):
        mr.dps(mr.image_keys(jax.random.PRNGKey(0), 3), model, op, y, n_steps=2)
    with pytest.raises(TypeError, match="expected a jax.random key"):
        mr.dps(0, model, op, y, n_steps=2)
    # typed keys work the same way as legacy ones
    typed = jax.random.key(7)
    a = mr.dps(typed, model, op, y, n_steps=3, clip=False)
    b = mr.dps(mr.image_keys(typed, B), model, op, y, n_steps=3, clip=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
