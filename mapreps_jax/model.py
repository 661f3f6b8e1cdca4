"""The score-model contract shared by exact priors and neural networks.

A score network is a pure function ``eps_fn(params, x_t, t, cond=None) -> eps`` (epsilon prediction):

* ``x_t``: ``[B, *event_shape]`` float (images: ``[B, H, W, C]`` in [-1, 1] units at ``t = -1``);
* ``t``: scalar or ``[B]``; integer step indices or real times in ``[-1, T-1]`` (see :mod:`mapreps_jax.diffusion`);
* ``cond``: optional conditioning pytree (a caption embedding, or the measurement ``y`` for the exact
  diffused-posterior "oracle" model of the testbed);
* returns ``eps`` with the shape of ``x_t``.

:class:`ScoreModel` bundles such a function (static) with its ``params`` and :class:`~mapreps_jax.diffusion.Schedule`
(both pytree leaves, so a jitted algorithm takes them as arguments, never as baked-in constants). Networks that also
predict a variance (ADM ``learn_sigma``) supply ``var_fn``-style output through ``apply``: ``apply`` returns either
``eps`` or a tuple ``(eps, v)`` with ``v`` in [-1, 1] (the learned-range interpolation weight channels).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from .diffusion import Schedule, alpha_bar, t_for_noise_std, tweedie
from .space import PIXEL, Space

__all__ = ["ScoreModel"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreModel:
    """An epsilon-prediction model on a VP schedule (a pytree: ``params`` and ``schedule`` are leaves).

    Attributes:
      params: the network's (or exact prior's) parameters.
      schedule: the diffusion schedule the model was trained on.
      apply: static ``apply(params, x_t, t, cond) -> eps`` or ``-> (eps, v)`` when ``learned_variance``.
      learned_variance: static; whether ``apply`` also returns learned-range variance channels.
      name: static, for messages.
      space: the :class:`~mapreps_jax.space.Space` the network's state lives in (:data:`~mapreps_jax.space.PIXEL`,
        or a latent diffusion model's autoencoder); every algorithm runs in it.
    """

    params: Any
    schedule: Schedule
    apply: Callable = dataclasses.field(metadata=dict(static=True))
    learned_variance: bool = dataclasses.field(default=False, metadata=dict(static=True))
    name: str = dataclasses.field(default="model", metadata=dict(static=True))
    space: Space = PIXEL

    @property
    def T(self) -> int:
        return self.schedule.T

    def alpha_bar(self, t) -> jax.Array:
        return alpha_bar(self.schedule, t)

    def eps_and_var(self, x_t, t, cond=None):
        """``(eps, v)``; ``v`` is ``None`` for a model without learned variance."""
        t = jnp.asarray(t)
        out = self.apply(self.params, x_t, t, cond)
        if self.learned_variance:
            eps, v = out
            return eps, v
        return out, None

    def eps(self, x_t, t, cond=None):
        """``eps_fn(params, x_t, t, cond)``: the epsilon prediction only."""
        return self.eps_and_var(x_t, t, cond)[0]

    def denoise(self, y, sigma, clip: bool = True, cond=None):
        """One-step (Tweedie) denoiser of ``y = x + sigma n`` (``[B, ...]``, ``sigma`` a scalar in the data's units):
        ``x_t = sqrt(a) y`` with ``(1 - a)/a = sigma^2`` (:func:`~mapreps_jax.diffusion.t_for_noise_std`), then
        ``x0 = (x_t - sqrt(1 - a) eps(x_t, t)) / sqrt(a)``, clipped to [-1, 1] when ``clip``."""
        y = jnp.asarray(y)
        t = t_for_noise_std(self.schedule, sigma)
        a = alpha_bar(self.schedule, t)
        x_t = jnp.sqrt(a) * y
        return tweedie(x_t, self.eps(x_t, jnp.full((y.shape[0],), t, jnp.float32), cond), a, clip)

    @property
    def eps_calls(self) -> int:
        """Network evaluations per ``eps``: 2 for a classifier-free-guided model (:meth:`guided`), else 1."""
        return 2 * self.apply.base_calls if isinstance(self.apply, _Guided) else 1

    def encode(self, x, key=None):
        """Images ``[B, ...]`` in [-1, 1] to the state space (identity in pixel space; a latent model: the
        encoder's posterior mean without a key, a sample with one, times the latent scale factor)."""
        return self.space.encode(x, key)

    def decode(self, z):
        """States to images in [-1, 1] units (identity in pixel space)."""
        return self.space.decode(z)

    def guided(self, cond, scale, uncond) -> "ScoreModel":
        """Classifier-free guidance: a model whose ``eps`` is ``eps_u + s (eps_c - eps_u)`` with
        ``eps_c = eps(x_t, t, cond)``, ``eps_u = eps(x_t, t, uncond)`` (two network calls; the conditionings may
        differ in shape, e.g. text embeddings of different lengths). ``cond``, ``uncond`` and ``scale`` are leaves
        (traceable); the ``cond`` passed to the guided model's ``eps`` is ignored. With learned variance the
        conditional branch's variance channels are returned."""
        return dataclasses.replace(self, params=(self.params, cond, uncond, jnp.asarray(scale, jnp.float32)),
                                   apply=_Guided(self.apply, self.learned_variance), name=f"{self.name}+cfg")

    def eps_fn(self) -> Callable:
        """The bare contract ``eps_fn(params, x_t, t, cond=None)`` of this model."""

        def eps_fn(params, x_t, t, cond=None):
            return dataclasses.replace(self, params=params).eps(x_t, t, cond)

        return eps_fn


@dataclasses.dataclass(frozen=True)
class _Guided:
    """Hashable apply of :meth:`ScoreModel.guided` (equal base applies compare equal: no retrace)."""

    base: Callable
    learned_variance: bool

    @property
    def base_calls(self) -> int:
        return 2 * self.base.base_calls if isinstance(self.base, _Guided) else 1

    def __call__(self, params, x_t, t, cond=None):
        p, c, u, s = params
        out_c, out_u = self.base(p, x_t, t, c), self.base(p, x_t, t, u)
        if self.learned_variance:
            (e_c, v_c), (e_u, _) = out_c, out_u
            return e_u + s * (e_c - e_u), v_c
        return out_u + s * (out_c - out_u)


def from_eps_fn(eps_fn: Callable, params: Any, schedule: Schedule, name: str = "model",
                var_fn: Optional[Callable] = None) -> ScoreModel:
    """Wrap a bare ``eps_fn(params, x_t, t, cond=None)`` (and optionally ``var_fn`` with the same signature,
    returning the learned-range channels ``v``) into a :class:`ScoreModel`."""
    if var_fn is None:
        return ScoreModel(params=params, schedule=schedule, apply=eps_fn, learned_variance=False, name=name)

    def apply(p, x, t, cond=None):
        return eps_fn(p, x, t, cond), var_fn(p, x, t, cond)

    return ScoreModel(params=params, schedule=schedule, apply=apply, learned_variance=True, name=name)


__all__.append("from_eps_fn")
