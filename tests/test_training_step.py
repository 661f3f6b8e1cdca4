"""The DDPM training step of the bundled models' training scripts (``mapreps_jax.app.training``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mapreps_jax.app.training import ddpm_train_step


def test_ddpm_step_against_a_hand_computation():
    """One step on a linear 'network' eps = w * x_t: the loss, gradient norm, SGD update and EMA equal a direct
    computation with the documented randomness (t, eps from split(fold_in(key, step))) and batch slice."""
    T, B, spe = 50, 4, 3
    alpha_bar = jnp.linspace(0.99, 0.05, T)
    data = jax.random.normal(jax.random.PRNGKey(0), (12, 2, 2, 1))
    key = jax.random.PRNGKey(7)
    perm = jnp.asarray(np.random.default_rng(0).permutation(12), jnp.int32)
    apply = lambda p, xt, t: p["w"] * xt  # noqa: E731
    opt = optax.sgd(0.1)
    step_fn = ddpm_train_step(apply, opt, data, batch=B, steps_per_epoch=spe, alpha_bar=alpha_bar, ema=0.999, key=key)
    params = {"w": jnp.float32(0.3)}
    step = 4  # the second batch of the second epoch
    p1, e1, _, loss, gnorm = step_fn(params, params, opt.init(params), step, perm)

    k_t, k_eps = jax.random.split(jax.random.fold_in(key, step))
    x0 = np.asarray(data)[np.asarray(perm)[(step % spe) * B:(step % spe + 1) * B]]
    t = np.asarray(jax.random.randint(k_t, (B,), 0, T))
    eps = np.asarray(jax.random.normal(k_eps, x0.shape, jnp.float32))
    a = np.asarray(alpha_bar)[t][:, None, None, None]
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    r = 0.3 * xt - eps
    want_loss = np.mean(r ** 2)
    want_g = np.mean(2 * r * xt)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(gnorm), abs(want_g), rtol=1e-4)
    np.testing.assert_allclose(float(p1["w"]), 0.3 - 0.1 * want_g, rtol=1e-5)
    d = min(0.999, (1 + step) / (10 + step))
    np.testing.assert_allclose(float(e1["w"]), d * 0.3 + (1 - d) * float(p1["w"]), rtol=1e-6)
