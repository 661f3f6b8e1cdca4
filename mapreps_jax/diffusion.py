"""VP / DDPM diffusion: beta schedules, ``alpha_bar`` at integer and real time, Tweedie, re-noising, DDPM/DDIM steps.

Conventions (``CONVENTIONS.md``):

* discrete index ``t in {0, ..., T-1}``, ``alpha_bar[t] = prod_{s<=t} (1 - beta_s)`` and ``alpha_bar[-1] := 1``
  (clean signal);
* real time: ``alpha_bar(t)`` for ``t in [-1, T-1]`` interpolates ``log alpha_bar`` linearly between integer steps
  of the extended grid ``[-1, 0, ..., T-1]``; integer inputs give the discrete values exactly, and the function is
  differentiable in ``t`` (so ``t0``/``t1`` can be differentiated);
* Tweedie: ``x0_hat = (x_t - sqrt(1 - a) eps) / sqrt(a)``, ``a = alpha_bar(t)``.

A :class:`Schedule` is a pytree of arrays (a leaf, not a constant baked into a jitted function), so it can be passed
through ``jit``/``vmap`` and, e.g., differentiated with respect to.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from .rng import image_keys, normal_like

__all__ = [
    "Schedule",
    "t_for_noise_std",
    "make_schedule",
    "linear_betas",
    "scaled_linear_betas",
    "ldm_linear_betas",
    "alpha_bar",
    "log_alpha_bar",
    "ddim_sigma_log",
    "tweedie",
    "eps_from_x0",
    "renoise",
    "ddim_sigma",
    "ddim_step",
    "posterior_variance",
    "learned_range_std",
]


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> np.ndarray:
    """ADM / DDPM linear schedule: ``beta = linspace(beta_start, beta_end, T)`` (float64)."""
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """Stable Diffusion "scaled linear": ``beta = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``."""
    return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


def ldm_linear_betas(T: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195) -> np.ndarray:
    """CompVis LDM "linear": ``beta = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``."""
    return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


_BETA_FNS = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "ldm_linear": ldm_linear_betas,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Discrete VP schedule (a pytree).

    Attributes:
      betas: ``[T]`` float32, ``beta_t``.
      alpha_bar_ext: ``[T + 1]`` float32, ``alpha_bar`` on the extended grid ``[-1, 0, ..., T-1]``
        (``alpha_bar_ext[0] = 1``, ``alpha_bar_ext[t + 1] = alpha_bar[t]``).
      log_alpha_bar_ext: ``[T + 1]`` float32, its logarithm (computed in float64, then rounded).
      posterior_var: ``[T]`` float32, ``beta_tilde_t = beta_t (1 - a_{t-1}) / (1 - a_t)`` (computed in float64;
        ``beta_tilde_0 = 0``).
    """

    betas: jax.Array
    alpha_bar_ext: jax.Array
    log_alpha_bar_ext: jax.Array
    posterior_var: jax.Array

    @property
    def T(self) -> int:
        return int(self.betas.shape[-1])

    @property
    def alpha_bars(self) -> jax.Array:
        """``alpha_bar[t]`` for ``t = 0..T-1``."""
        return self.alpha_bar_ext[1:]

    def __call__(self, t) -> jax.Array:
        return alpha_bar(self, t)


def make_schedule(kind: str = "linear", T: int = 1000, dtype=jnp.float32, **kwargs) -> Schedule:
    """Build a :class:`Schedule`: ``kind`` in ``{"linear", "scaled_linear", "ldm_linear"}`` (see module doc).

    The tables are computed in float64 and stored as ``dtype`` (float32 by default; ``jnp.float64`` with
    ``jax_enable_x64`` for float64 reference computations)."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"make_schedule: dtype must be float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("make_schedule: dtype float64 needs jax_enable_x64 (jax.config.update('jax_enable_x64', True))")
    if kind not in _BETA_FNS:
        raise ValueError(f"make_schedule: unknown schedule kind {kind!r}; expected one of {sorted(_BETA_FNS)}")
    if not isinstance(T, (int, np.integer)) or T < 2:
        raise ValueError(f"make_schedule: T must be an integer >= 2, got {T!r}")
    betas = _BETA_FNS[kind](int(T), **kwargs)
    log_ab = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
    one_minus = -np.expm1(log_ab)  # 1 - alpha_bar on the extended grid, without cancellation
    post_var = betas * one_minus[:-1] / one_minus[1:]
    return Schedule(
        betas=jnp.asarray(betas, dtype),
        alpha_bar_ext=jnp.asarray(np.exp(log_ab), dtype),
        log_alpha_bar_ext=jnp.asarray(log_ab, dtype),
        posterior_var=jnp.asarray(post_var, dtype),
    )


def alpha_bar(schedule: Schedule, t) -> jax.Array:
    """``alpha_bar(t)`` for integer or real ``t in [-1, T-1]`` (array of any shape).

    Integer dtypes index the table exactly. Real ``t`` interpolates ``log alpha_bar`` linearly between
    ``floor(t)`` and ``floor(t) + 1`` on the extended grid: exact at integers and differentiable in ``t``.
    Values outside ``[-1, T-1]`` are clamped.
    """
    t = jnp.asarray(t)
    if jnp.issubdtype(t.dtype, jnp.integer):
        return schedule.alpha_bar_ext[jnp.clip(t + 1, 0, schedule.T)]
    return jnp.exp(log_alpha_bar(schedule, t))


def log_alpha_bar(schedule: Schedule, t) -> jax.Array:
    """``log alpha_bar(t)`` (same interpolation as :func:`alpha_bar`); use it where ``1 - alpha_bar`` is needed
    to full float32 precision near ``t = 0`` (``1 - a = -expm1(log a)``)."""
    t = jnp.asarray(t)
    T = schedule.T
    la = schedule.log_alpha_bar_ext
    if jnp.issubdtype(t.dtype, jnp.integer):
        return la[jnp.clip(t + 1, 0, T)]
    s = jnp.clip(t.astype(la.dtype) + 1.0, 0.0, float(T))
    lo = jnp.clip(jnp.floor(s), 0.0, float(T - 1))
    frac = s - lo
    lo_i = lo.astype(jnp.int32)
    return la[lo_i] * (1.0 - frac) + la[lo_i + 1] * frac


def safe_sqrt(v):
    """``sqrt(max(v, 0))`` with a zero (not infinite/NaN) derivative at 0, so that steps landing exactly on
    ``alpha_bar = 1`` (``t = -1``) stay differentiable in the times."""
    pos = v > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


def _bcast(a, x):
    """Broadcast a per-sample scalar array ``a`` (shape ``[]`` or ``[B]``) against ``x`` of shape ``[B, ...]``."""
    a = jnp.asarray(a, x.dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def t_for_noise_std(schedule: Schedule, sigma, n_iter: int = 40) -> jax.Array:
    """The real time ``t`` at which ``x_t / sqrt(alpha_bar(t))`` carries Gaussian noise of std ``sigma``:
    ``(1 - alpha_bar(t)) / alpha_bar(t) = sigma^2`` (so ``y = x + sigma n`` is ``x_t = sqrt(alpha_bar(t)) y``).

    Bisection on :func:`alpha_bar`'s interpolation over ``[-1, T-1]`` (``n_iter`` halvings: exact to
    ``T / 2^n_iter``); ``sigma`` of any shape, clamped to the schedule's range. Traceable, not differentiable.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    target = -jnp.log1p(sigma * sigma)  # log alpha_bar(t) at the answer
    lo = jnp.full(sigma.shape, -1.0, jnp.float32)
    hi = jnp.full(sigma.shape, float(schedule.T - 1), jnp.float32)

    def body(_, lh):
        lo, hi = lh
        mid = 0.5 * (lo + hi)
        above = log_alpha_bar(schedule, mid) > target  # alpha_bar decreases in t: the answer is later than mid
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, int(n_iter), body, (lo, hi))
    return 0.5 * (lo + hi)


def tweedie(x_t, eps, a, clip: bool = False):
    """``x0_hat = (x_t - sqrt(1 - a) eps) / sqrt(a)``, optionally clipped to [-1, 1]. ``a`` per sample."""
    a = _bcast(a, x_t)
    x0 = (x_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    return jnp.clip(x0, -1.0, 1.0) if clip else x0


def eps_from_x0(x_t, x0, a):
    """Inverse of Tweedie: ``eps = (x_t - sqrt(a) x0) / sqrt(1 - a)``."""
    a = _bcast(a, x_t)
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)


def renoise(key, x, a):
    """``sqrt(a) x + sqrt(1 - a) z``, ``z ~ N(0, I)``: the forward diffusion to the level ``a = alpha_bar(t)``.

    ``x`` is ``[B, ...]``; ``key`` one key or ``[B]`` keys: row ``i`` of ``z`` is drawn from image ``i``'s key
    (:func:`mapreps_jax.rng.image_keys`), so it does not depend on the rest of the batch."""
    a = _bcast(a, x)
    return jnp.sqrt(a) * x + safe_sqrt(1.0 - a) * _per_image_normal(key, x)


def _per_image_normal(key, x):
    return normal_like(image_keys(key, x.shape[0]), x)


def ddim_sigma_log(la_i, la_j, eta=1.0):
    """:func:`ddim_sigma` from ``log alpha_bar`` values, free of the cancellation in ``1 - a`` near ``a = 1``:
    ``s = eta * sqrt(expm1(la_j) / expm1(la_i)) * sqrt(-expm1(la_i - la_j))``."""
    ratio = jnp.where(la_i < 0, jnp.expm1(la_j) / jnp.where(la_i < 0, jnp.expm1(la_i), -1.0), 0.0)
    return eta * safe_sqrt(ratio) * safe_sqrt(-jnp.expm1(la_i - la_j))


def ddim_sigma(a_i, a_j, eta=1.0):
    """DDIM noise std from level ``a_i`` to ``a_j`` (``a_j >= a_i``):
    ``s = eta * sqrt((1 - a_j) / (1 - a_i)) * sqrt(1 - a_i / a_j)``. ``eta = 1`` gives the DDPM posterior std
    ``sqrt(beta_tilde)`` on adjacent steps."""
    return eta * safe_sqrt((1.0 - a_j) / (1.0 - a_i)) * safe_sqrt(1.0 - a_i / a_j)


def ddim_step(key, x0_hat, eps_hat, a_j, s):
    """One DDPM/DDIM step to level ``a_j``:
    ``x_j = sqrt(a_j) x0_hat + sqrt(1 - a_j - s^2) eps_hat + s z``.

    ``s`` is the step's noise std (per sample or scalar): :func:`ddim_sigma` for DDIM(eta), or
    :func:`learned_range_std` for a network with learned variance. With ``eps_hat`` re-derived from the
    (possibly clipped) ``x0_hat`` by :func:`eps_from_x0`, ``eta = 1`` is exactly the DDPM posterior mean
    ``mu = sqrt(a_j) beta_i / (1 - a_i) x0 + sqrt(alpha_i) (1 - a_j) / (1 - a_i) x_i`` plus ``s z``.
    ``key`` may be ``None`` for a deterministic step (then ``s`` must be 0); otherwise one key or ``[B]`` keys
    (``z`` drawn per image, as :func:`renoise`).
    """
    a_j = _bcast(a_j, x0_hat)
    s = _bcast(s, x0_hat)
    mean = jnp.sqrt(a_j) * x0_hat + safe_sqrt(1.0 - a_j - s**2) * eps_hat
    if key is None:
        return mean
    return mean + s * _per_image_normal(key, x0_hat)


def posterior_variance(schedule: Schedule, i):
    """DDPM posterior variance ``beta_tilde_i = beta_i (1 - a_{i-1}) / (1 - a_i)`` at integer step ``i``."""
    return schedule.posterior_var[jnp.asarray(i, jnp.int32)]


def learned_range_std(schedule: Schedule, i, v):
    """Learned-range std of the ADM ("learn_sigma") networks at integer step ``i``.

    ``log var = f log(beta_i) + (1 - f) log(beta_tilde_clipped_i)``, ``f = (v + 1) / 2``, where ``v`` in [-1, 1]
    are the network's variance channels and ``beta_tilde_clipped_0 := beta_tilde_1`` (the DDPM log-variance
    clipping). Returns ``exp(0.5 log var)`` with the shape of ``v``.
    """
    i = jnp.asarray(i, jnp.int32)
    bt = posterior_variance(schedule, jnp.maximum(i, 1))  # clipped at i = 0
    log_max = jnp.log(schedule.betas[i])
    log_min = jnp.log(bt)
    f = (v + 1.0) / 2.0
    log_min = _bcast(log_min, v)
    log_max = _bcast(log_max, v)
    return jnp.exp(0.5 * (f * log_max + (1.0 - f) * log_min))

