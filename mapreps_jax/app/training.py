"""The DDPM training step shared by the bundled models' training scripts (``scripts/train_digits_diffusion.py``: the
pixel digits prior; ``scripts/train_digits_latent.py``: the latent UNet on autoencoder latents).

One step, for ``x0`` the batch ``perm[i B:(i + 1) B]`` of the training set (``i = step mod steps_per_epoch``):

    t ~ U{0, ..., T - 1},  eps ~ N(0, I),  x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,
    L = mean (eps_theta(x_t, t) - eps)^2                                              (the epsilon objective)

then the optimizer's update and an EMA of the parameters with decay ``min(ema, (1 + step) / (10 + step))``. The
randomness of step ``s`` is ``split(fold_in(key, s))`` (``t`` then ``eps``), so a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["ddpm_train_step"]


def ddpm_train_step(apply, opt: optax.GradientTransformation, data, *, batch: int, steps_per_epoch: int,
                    alpha_bar, ema: float, key):
    """A jitted ``step(params, ema_params, opt_state, step, perm) -> (params, ema_params, opt_state, loss, gnorm)``
    (see the module doc). ``apply(params, x_t, t) -> eps``; ``data [n, ...]`` the training set (images or latents,
    on the device); ``alpha_bar [T]`` with ``alpha_bar[t]`` the cumulative product at step ``t = 0, ..., T - 1``;
    ``perm`` a permutation of the epoch's indices."""
    sqrt_ab = jnp.sqrt(alpha_bar)
    sqrt_1m_ab = jnp.sqrt(1.0 - alpha_bar)
    T = int(alpha_bar.shape[0])

    def loss_fn(p, x0, t, eps):
        shape = (-1,) + (1,) * (x0.ndim - 1)
        xt = sqrt_ab[t].reshape(shape) * x0 + sqrt_1m_ab[t].reshape(shape) * eps
        return jnp.mean(jnp.square(apply(p, xt, t) - eps))

    @jax.jit
    def step_fn(params, ema_params, opt_state, step, perm):
        k_t, k_eps = jax.random.split(jax.random.fold_in(key, step))
        i = step % steps_per_epoch
        x0 = data[jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)]
        t = jax.random.randint(k_t, (batch,), 0, T)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        loss, g = jax.value_and_grad(loss_fn)(params, x0, t, eps)
        gnorm = optax.global_norm(g)
        upd, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, upd)
        d = jnp.minimum(ema, (1.0 + step) / (10.0 + step))
        ema_params = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)
        return params, ema_params, opt_state, loss, gnorm

    return step_fn
