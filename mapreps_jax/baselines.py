"""Baselines users compare MAP-RPS against (``ALGORITHMS.md`` section 5).

* :func:`prior_sample`: unconditional samples of the prior (ancestral DDPM over all ``T`` steps, or DDIM(eta) on a
  ``K``-step sub-grid): the reference for "what the prior alone produces".
* :func:`dps`: DPS from ``N(0, I)`` at ``T - 1`` over all ``T`` steps (NFE ``T``, each a forward + VJP);
  ``n_steps=K`` gives DPS-S (K-step sub-grid), ``noise_scale=lambda`` VSDPS, :func:`dps_average` DPS-A.
* :func:`resample`: ReSample (Song et al. 2024) from ``N(0, I)`` at ``T - 1``: the latent DPS step every step, hard
  data consistency and stochastic resampling on its schedule (:class:`~mapreps_jax.samplers.ReSampleStep`).
* :func:`ccdf`: RPS started from ``A_pinv(y)`` instead of the MAP estimate (CCDF-style "come closer").
* :func:`red_diff`: RED-diff (Mardani et al. 2023), a variational optimisation of ``mu``:
  ``x_t = sqrt(a) mu + sqrt(1-a) eps``, ``e = sg(eps_fn(x_t, t))`` and one Adam step on
  ``mean((y - A mu)^2)/2 + lambda w(t) mean(sg(e - eps) * mu)`` for each ``t`` of a descending grid of ``S`` steps.

Each runs in the model's space (:mod:`mapreps_jax.space`): for a latent diffusion model DPS starts from ``N(0, I)``
latents (Latent-DPS), CCDF from ``E(A_pinv y)``, RED-diff optimises a latent ``mu`` against ``y - A(D(mu))``; the
outputs are states (``model.decode`` gives images).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .config import pytree_config, static
from .model import ScoreModel
from .rng import fold_keys, image_keys, normal, normal_like, split_keys
from .rps_stage import reverse_loop, rps, subgrid_times
from .samplers import DDPMStep, DPSStep, ReSampleStep
from .space import Problem
from .validation import check_measurement, check_same_batch, check_scalar, check_state, check_t0

__all__ = ["prior_sample", "dps", "dps_average", "resample", "ccdf", "red_diff", "REDDiffConfig", "RED_DIFF_WEIGHTINGS",
           "red_diff_weight"]


def prior_sample(key, model: ScoreModel, shape, *, n_steps: Optional[int] = None, sampler=None, cond=None):
    """``x_{T-1} ~ N(0, I)`` of ``shape`` (``[B, *event]``), then the unconditional step (default
    ``DDPMStep(clip=True)``: ancestral DDPM, each step ``x_{t-1} = mu_t(x_t, x0_hat) + sqrt(beta_tilde_t) z``) for all
    ``T`` steps (NFE ``T``) or a ``K``-step sub-grid."""
    sampler = DDPMStep(clip=True) if sampler is None else sampler
    shape = tuple(shape)
    k0, k1 = split_keys(image_keys(key, shape[0], "prior_sample"))
    x = normal(k0, shape[1:])
    return reverse_loop(k1, model, None, None, x, model.T - 1, sampler=sampler, cond=cond, n_steps=n_steps)


def dps(key, model: ScoreModel, op, y, *, sampler=None, cond=None, n_steps: Optional[int] = None,
        zeta=1.0, noise_scale=1.0, clip: bool = True, remat: bool = False):
    """DPS: ``x_{T-1} ~ N(0, I)``, then the DPS step for all ``T`` steps (or a ``K``-step sub-grid: DPS-S).

    ``sampler`` overrides the default ``DPSStep(zeta, noise_scale=noise_scale, clip=clip)``; ``noise_scale < 1`` is
    VSDPS. Returns ``[B, *state_shape]`` (``op.in_shape`` in pixel space).
    ``remat`` (static): ``jax.checkpoint`` on each step (:func:`~mapreps_jax.rps_stage.reverse_loop`): under
    ``jax.grad`` the loop keeps O(steps x state) memory instead of O(steps x activations), at one extra step forward
    (network forward and VJP) per step in the backward pass; the output is the same (bitwise).
    """
    y = check_measurement(op, y, "dps")
    if sampler is None:
        sampler = DPSStep(zeta=zeta, noise_scale=noise_scale, clip=clip)
    if n_steps is not None:
        check_scalar(n_steps, "n_steps", "dps", lo=1, integer=True)
    k0, k1 = split_keys(image_keys(key, y.shape[0], "dps"))
    x = normal(k0, Problem(model, op, y).state_shape(), y.dtype)  # float64 measurements give a float64 run
    return reverse_loop(k1, model, op, y, x, model.T - 1, sampler=sampler, cond=cond, n_steps=n_steps, remat=remat)


def resample(key, model: ScoreModel, op, y, *, sampler=None, n_steps: Optional[int] = None, cond=None):
    """ReSample: ``z_{T-1} ~ N(0, I)`` in the model's space, then :class:`~mapreps_jax.samplers.ReSampleStep` (default
    ``ReSampleStep()``) for all ``T`` steps ``T - 1, ..., 0`` or on a ``K``-step sub-grid
    (:func:`~mapreps_jax.rps_stage.subgrid_times` of ``T - 1``). Keys as :func:`dps`. Returns ``[B, *state_shape]``
    (latents for a latent model: ``model.decode`` gives images).

    Cost per image: ``model.eps_calls`` UNet calls per step (forward + VJP); decoder and encoder forwards
    ``sampler.calls_over(times, T)`` with ``times`` the executed step times (hard-DC steps cost ``latent_iters``
    more decoder calls and one encoder call)."""
    if op is None:
        raise ValueError("resample: op is required (a forward operator; ReSample enforces consistency with y)")
    y = check_measurement(op, y, "resample")
    if sampler is None:
        sampler = ReSampleStep()
    elif not isinstance(sampler, ReSampleStep):
        raise TypeError(f"resample: sampler must be a ReSampleStep, got {type(sampler).__name__} (use dps or "
                        f"reverse_loop for other step rules)")
    if n_steps is not None:
        check_scalar(n_steps, "n_steps", "resample", lo=1, integer=True)
    k0, k1 = split_keys(image_keys(key, y.shape[0], "resample"))
    z = normal(k0, Problem(model, op, y).state_shape(), y.dtype)
    return reverse_loop(k1, model, op, y, z, model.T - 1, sampler=sampler, cond=cond, n_steps=n_steps)


def dps_average(key, model: ScoreModel, op, y, n_samples: int, **kwargs):
    """DPS-A: the average of ``n_samples`` independent DPS outputs (a ``lax.map`` over samples; sample ``j`` of
    image ``i`` runs :func:`dps` with key ``fold_in(keys[i], j)``)."""
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or int(n_samples) < 1:
        raise ValueError(f"dps_average: n_samples must be a positive integer, got {n_samples!r}")
    keys = image_keys(key, jnp.shape(y)[0], "dps_average")
    outs = jax.lax.map(lambda j: dps(fold_keys(keys, j), model, op, y, **kwargs), jnp.arange(int(n_samples)))
    return jnp.mean(outs, axis=0)


def ccdf(key, model: ScoreModel, op, y, t0, *, sampler=DPSStep(), cond=None, n_steps: Optional[int] = None,
         max_steps: Optional[int] = None):
    """CCDF-style RPS: :func:`~mapreps_jax.rps_stage.rps` from ``E(op.x_init(y))`` (``A_pinv y``, encoded for a
    latent model)."""
    y = check_measurement(op, y, "ccdf")
    check_t0(t0, model.T, "ccdf")
    return rps(key, model, op, y, Problem(model, op, y, cond).x_init(), t0, sampler=sampler, cond=cond, n_steps=n_steps,
               max_steps=max_steps)


RED_DIFF_WEIGHTINGS = ("linear", "sqrt", "square", "log", "clip", "power2over3", "const")


def red_diff_weight(a, weighting: str = "linear"):
    """RED-diff's weight of the regulariser at level ``a``; base ``r = sqrt(1 - a)/sqrt(a)`` (inverse SNR^1/2):
    linear ``r``, sqrt ``sqrt(r)``, square ``r^2``, log ``log(1 + r)``, clip ``min(r, 1)``, power2over3 ``r^(2/3)``,
    const ``1`` (the weightings of NVlabs' RED-diff code)."""
    r = jnp.sqrt(1.0 - a) / jnp.sqrt(a)
    if weighting == "linear":
        return r
    if weighting == "sqrt":
        return jnp.sqrt(r)
    if weighting == "square":
        return r * r
    if weighting == "log":
        return jnp.log1p(r)
    if weighting == "clip":
        return jnp.minimum(r, 1.0)
    if weighting == "power2over3":
        return r ** (2.0 / 3.0)
    if weighting == "const":
        return jnp.ones_like(r)
    raise ValueError(f"red_diff: unknown weighting {weighting!r}; expected one of {RED_DIFF_WEIGHTINGS}")


RED_DIFF_GRIDS = ("clean", "nvlabs")


@pytree_config
class REDDiffConfig:
    """RED-diff hyper-parameters (numbers are traceable leaves; ``n_steps``/``weighting``/``grid``/``return_before_last``
    static).

    ``lam`` = lambda (0.25), ``lr`` Adam learning rate (0.1..0.5, b1 0.9, b2 0.99), ``n_steps`` S, ``weighting`` one
    of :data:`RED_DIFF_WEIGHTINGS`, ``obs_weight`` the data term's weight (1).

    ``grid="clean"`` (default): ``S`` times evenly from ``T - 1`` down to 0. ``grid="nvlabs"``: NVlabs' grid
    ``{T - skip, T - 2 skip, ..., 0}``, ``skip = T // S``. ``return_before_last=True`` returns the estimate before
    the last Adam step, as NVlabs' code does. :meth:`nvlabs` gives their whole configuration.
    """

    lam: Any = 0.25
    lr: Any = 0.25
    obs_weight: Any = 1.0
    n_steps: int = static(1000)
    weighting: str = static("linear")
    grid: str = static("clean")
    return_before_last: bool = static(False)

    def __post_init__(self):
        if self.weighting not in RED_DIFF_WEIGHTINGS:
            raise ValueError(f"REDDiffConfig.weighting: expected one of {RED_DIFF_WEIGHTINGS}, got {self.weighting!r}")
        if self.grid not in RED_DIFF_GRIDS:
            raise ValueError(f"REDDiffConfig.grid: expected one of {RED_DIFF_GRIDS}, got {self.grid!r}")
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise ValueError(f"REDDiffConfig.n_steps: expected a positive int, got {self.n_steps!r}")
        check_scalar(self.lam, "lam", "REDDiffConfig")
        check_scalar(self.lr, "lr", "REDDiffConfig", lo=0.0, lo_inclusive=False)
        check_scalar(self.obs_weight, "obs_weight", "REDDiffConfig", lo=0.0)

    @classmethod
    def nvlabs(cls, **overrides) -> "REDDiffConfig":
        """RED-diff as NVlabs' code runs it: lr 0.1, lambda 0.25, 50 steps on the grid ``{T - skip, ..., 0}``, Adam
        betas (0.9, 0.99), linear weighting, the estimate taken before the last Adam step."""
        kw = dict(lam=0.25, lr=0.1, n_steps=50, weighting="linear", grid="nvlabs", return_before_last=True)
        kw.update(overrides)
        return cls(**kw)

    def times(self, T: int):
        """The descending grid of diffusion times, ``[n_steps]`` int32."""
        if self.grid == "nvlabs":
            skip = T // self.n_steps
            if skip < 1:
                raise ValueError(f"REDDiffConfig: grid='nvlabs' needs n_steps <= T = {T}, got {self.n_steps}")
            return jnp.asarray(T - skip * (np.arange(self.n_steps) + 1), jnp.int32)
        return subgrid_times(T - 1, self.n_steps)[0]


def red_diff(key, model: ScoreModel, op, y, *, config: REDDiffConfig = REDDiffConfig(), cond=None, x_init=None):
    """RED-diff (see module doc). Per-image means (so images of a batch do not interact). NFE = ``n_steps``."""
    y = check_measurement(op, y, "red_diff")
    problem = Problem(model, op, y, cond)
    if x_init is not None:
        x_init = check_state(model, op, x_init, "red_diff", "x_init")
        check_same_batch(x_init, y, "x_init", "y", "red_diff")
    mu = problem.x_init() if x_init is None else x_init
    keys = image_keys(key, y.shape[0], "red_diff")
    opt = optax.adam(config.lr, b1=0.9, b2=0.99)
    times = config.times(model.T)
    axes_y = tuple(range(1, y.ndim))
    axes_x = tuple(range(1, mu.ndim))

    def loss_fn(m, e_minus_eps, wt):
        r = problem.residual(m)
        fit = jnp.mean(r * r, axis=axes_y) / 2.0
        reg = jnp.mean(e_minus_eps * m, axis=axes_x)
        return jnp.sum(config.obs_weight * fit + config.lam * wt * reg)

    def body(carry, inp):
        m, st = carry
        k, t = inp
        a = model.alpha_bar(t)
        eps = normal_like(fold_keys(keys, k), m)
        x_t = jnp.sqrt(a) * m + jnp.sqrt(1.0 - a) * eps
        e = model.eps(x_t, t, cond)  # sg(e): an argument of the inner gradient, not differentiated w.r.t. mu
        g = jax.grad(loss_fn)(m, e - eps, red_diff_weight(a, config.weighting))
        upd, st = opt.update(g, st, m)
        return (optax.apply_updates(m, upd), st), None

    def scan_body(carry, inp):
        new = body(carry, inp)[0]
        return new, carry[0]  # also emit the estimate before this step

    (mu, _), before = jax.lax.scan(scan_body, (mu, opt.init(mu)), (jnp.arange(config.n_steps), times))
    return before[-1] if config.return_before_last else mu

