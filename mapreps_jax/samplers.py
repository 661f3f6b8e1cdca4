"""Reverse-diffusion step rules ("samplers") pluggable into the RPS stage and the DPS baselines.

Every sampler is a small frozen dataclass registered as a pytree: numeric hyper-parameters are leaves (so they can
be traced, vmapped, differentiated), flags are static. One method:

    sampler.step(key, model, op, y, x_t, t, t_next, cond=None) -> x_{t_next}

``key`` is one key or ``[B]`` keys (one per image; the step's noise for image ``i`` is drawn from its key alone,
:mod:`mapreps_jax.rng`). ``t`` / ``t_next`` are scalar (integer or real) times with ``t_next < t``; ``t_next = -1`` is the clean end
(``alpha_bar(-1) = 1``). All steps share the DDPM/DDIM(eta) move of ``ALGORITHMS.md`` section 0:

    x0 = Tweedie(x_t, eps)          (clipped to [-1, 1] when ``clip``)
    eps_hat = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)        (re-derived from the possibly clipped x0)
    x_next = sqrt(a_n) x0 + sqrt(1 - a_n - s^2) eps_hat + s z,   s = eta sqrt((1-a_n)/(1-a_t)) sqrt(1 - a_t/a_n)

(eta = 1 on adjacent integer steps is exactly the DDPM posterior mean plus ``sqrt(beta_tilde) z``); with
``variance="learned"`` the mean stays the DDPM posterior mean and the noise std is the network's learned-range std
(as guided-diffusion's ``p_sample``; full integer grid only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .diffusion import _bcast, ddim_sigma_log, ddim_step, eps_from_x0, learned_range_std, log_alpha_bar, tweedie
from .map_stage import safe_norm
from .rng import image_keys, normal_like

__all__ = ["DDPMStep", "DPSStep", "DDNMStep", "SAMPLERS", "make_sampler"]

_VARIANCES = ("ddim", "learned")


def _check_variance(v):
    if v not in _VARIANCES:
        raise ValueError(f"sampler variance: expected one of {_VARIANCES}, got {v!r}")


def _move(key, model, x, x0, t, t_next, a_t, a_n, eta, v, variance, noise_scale):
    """The shared DDPM/DDIM(eta) move from ``x_t`` given ``x0`` (see module doc).

    The mean always uses the DDIM(eta) std ``s`` (for eta = 1: the DDPM posterior mean, independent of the noise
    std); the noise term is ``noise_scale * s_noise * z`` with ``s_noise = s``, or the learned-range std for
    ``variance="learned"`` (as guided-diffusion's ``p_sample``: posterior mean + learned std, none on the last step).
    """
    sched = model.schedule
    s = ddim_sigma_log(log_alpha_bar(sched, t), log_alpha_bar(sched, t_next), eta)
    mean = ddim_step(None, x0, eps_from_x0(x, x0, a_t), a_n, s)
    if variance == "learned":
        if v is None:
            raise ValueError(f"variance='learned' needs a model with learned variance; {model.name!r} has none")
        s = jnp.where(jnp.asarray(t_next) < 0, 0.0, learned_range_std(sched, jnp.asarray(t, jnp.int32), v))
    if jnp.ndim(s) < x.ndim:
        s = _bcast(s, x)
    return mean + noise_scale * s * normal_like(image_keys(key, x.shape[0]), x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDPMStep:
    """Unconditional DDPM/DDIM(eta) step. With the testbed's exact diffused-posterior model (``cond = y``) this is the
    exact "oracle" Stage-2 sampler."""

    eta: Any = 1.0
    noise_scale: Any = 1.0
    clip: bool = dataclasses.field(default=False, metadata=dict(static=True))
    variance: str = dataclasses.field(default="ddim", metadata=dict(static=True))

    def step(self, key, model, op, y, x, t, t_next, cond=None):
        _check_variance(self.variance)
        a_t, a_n = model.alpha_bar(t), model.alpha_bar(t_next)
        e, v = model.eps_and_var(x, t, cond)
        x0 = tweedie(x, e, a_t, self.clip)
        return _move(key, model, x, x0, t, t_next, a_t, a_n, self.eta, v, self.variance, self.noise_scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DPSStep:
    """Diffusion posterior sampling step (Chung et al. 2023):

    ``g = grad_{x_t} ||y - A(x0(x_t))||`` (the norm; ``loss="sq"`` uses its square), then
    ``x_next = move(x_t, x0) - zeta g``. ``noise_scale`` (lambda in [0, 1]) scales the stochastic term
    (VSDPS); ``clip`` clips Tweedie to [-1, 1] (on for image priors, off on the exact testbed).
    Costs one network forward + VJP per step.
    """

    zeta: Any = 1.0
    eta: Any = 1.0
    noise_scale: Any = 1.0
    clip: bool = dataclasses.field(default=True, metadata=dict(static=True))
    loss: str = dataclasses.field(default="norm", metadata=dict(static=True))
    variance: str = dataclasses.field(default="ddim", metadata=dict(static=True))

    def step(self, key, model, op, y, x, t, t_next, cond=None):
        _check_variance(self.variance)
        if self.loss not in ("norm", "sq"):
            raise ValueError(f"DPSStep.loss: expected 'norm' or 'sq', got {self.loss!r}")
        a_t, a_n = model.alpha_bar(t), model.alpha_bar(t_next)
        axes = tuple(range(1, y.ndim))

        def fit(xx):
            e, v = model.eps_and_var(xx, t, cond)
            x0 = tweedie(xx, e, a_t, self.clip)
            r = y - op.A(x0)
            per = safe_norm(r, axes) if self.loss == "norm" else jnp.sum(r * r, axis=axes)
            return jnp.sum(per), (x0, v)

        g, (x0, v) = jax.grad(fit, has_aux=True)(x)
        x0 = jax.lax.stop_gradient(x0)
        x_next = _move(key, model, x, x0, t, t_next, a_t, a_n, self.eta, v, self.variance, self.noise_scale)
        return x_next - self.zeta * g


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDNMStep:
    """Denoising diffusion null-space step (noise-free DDNM, Wang et al. 2023) for a linear operator with a
    pseudo-inverse: ``x0 <- x0 - A_pinv(A x0 - y)`` (range-space replacement), then the shared move."""

    eta: Any = 1.0
    clip: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def step(self, key, model, op, y, x, t, t_next, cond=None):
        if not op.linear or op.pinv_fn is None:
            raise ValueError(f"DDNMStep needs a linear operator with a pseudo-inverse; got {op.name!r}")
        a_t, a_n = model.alpha_bar(t), model.alpha_bar(t_next)
        e, v = model.eps_and_var(x, t, cond)
        x0 = tweedie(x, e, a_t, self.clip)
        x0 = x0 - op.pinv(op.A(x0) - y)
        return _move(key, model, x, x0, t, t_next, a_t, a_n, self.eta, v, "ddim", 1.0)


SAMPLERS = {"dps": DPSStep, "ddpm": DDPMStep, "ddnm": DDNMStep}


def make_sampler(name: str, **kwargs):
    """Build a sampler step by name (``"dps"``, ``"ddpm"``, ``"ddnm"``)."""
    if name not in SAMPLERS:
        raise ValueError(f"make_sampler: unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](**kwargs)
