"""Stage 2 of MAP-RPS: re-noised posterior sampling (RPS).

``RPS(key, x_init, y; t0, sampler)`` (``ALGORITHMS.md`` section 2):

1. ``t0 = 0``: return ``x_init``;
2. ``x <- sqrt(a) x_init + sqrt(1 - a) z`` with ``a = alpha_bar(t0 - 1)``;
3. reverse loop with the sampler step: on the full grid ``i = t0-1, ..., 0`` (each step ``i -> i-1``; Stage-2
   NFE = ``t0``), or on a ``K``-step sub-grid ``tau_k = (t0 - 1)(1 - k/(K-1))``, ``k = 0..K-1``, then to ``-1``
   (rounded to integers, or real-valued with ``continuous=True``, which makes the output differentiable in ``t0``).

``t0`` is a traced value: one compiled function serves every ``t0`` and can be ``vmap``-ed over a list of them. The
full-grid loop is a ``lax.scan`` of static length ``max_steps`` (default ``T``, or ``t0`` when ``t0`` is a concrete
int) whose step is skipped (``lax.cond``) past ``t0``: compile time does not depend on ``t0``; outside ``vmap`` the
skipped steps cost no network evaluation; under ``vmap`` over ``t0`` every lane runs ``max_steps`` steps, so pass
``max_steps = max(t0s)``.

The state lives in the model's space (:mod:`mapreps_jax.space`): pixels, or a latent diffusion model's latents, where
``x_init`` is a latent (``model.encode(image)``) and the output is one too (``model.decode`` gives the image).
:func:`rps_trace` also returns what each step reports (:class:`~mapreps_jax.samplers.StepInfo`: the clean estimate
``x0`` and the residual ``||y - A(D(x0))||``), collected as scan outputs.

``remat=True`` (static, every entry point) wraps each step of the loop in ``jax.checkpoint``: reverse-mode
differentiation through Stage 2 (w.r.t. ``t0``, the sampler's step sizes, ``x_init``) then keeps each step's state
(O(steps x state) memory) instead of each step's network activations and their VJP residuals (O(steps x
activations)), and pays one extra step forward (network forward and, for DPS, its VJP) per step in the backward
pass. Outputs are unchanged (bitwise).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ._loops import bounded_loop, bounded_scan, concrete_int, masked_step, maybe_remat
from .diffusion import renoise
from .model import ScoreModel
from .rng import fold_keys, image_keys, split_keys
from .samplers import DPSStep
from .space import Problem
from .validation import check_measurement, check_same_batch, check_scalar, check_state, check_t0

__all__ = ["rps", "rps_trace", "reverse_loop", "subgrid_times", "stage2_nfe", "keep_info"]


def keep_info(state, info):
    """The default ``collect`` of the traces: each step's :class:`~mapreps_jax.samplers.StepInfo`."""
    return info


def subgrid_times(t_start, n_steps: int, continuous: bool = False):
    """``n_steps`` evaluation times from ``t_start`` down to 0 and their successors (ending at -1).

    Returns ``(times, next_times)``, each ``[n_steps]``: ``times[k] = t_start (1 - k/(K-1))`` (``K = n_steps``),
    ``next_times[k] = times[k+1]``, ``next_times[-1] = -1``. Integer (rounded) unless ``continuous``.
    """
    K = int(n_steps)
    if K < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps!r}")
    t_start = jnp.asarray(t_start, jnp.float32)
    frac = 1.0 - jnp.arange(K, dtype=jnp.float32) / max(K - 1, 1)
    times = t_start * frac
    if not continuous:
        times = jnp.round(times).astype(jnp.int32)
    nxt = jnp.concatenate([times[1:], jnp.full((1,), -1, times.dtype)])
    return times, nxt


def reverse_loop(key, model: ScoreModel, op, y, x, t_start, *, sampler=DPSStep(), cond=None,
                 n_steps: Optional[int] = None, continuous: bool = False, max_steps: Optional[int] = None,
                 collect=None, remat: bool = False):
    """Run the sampler from ``x`` at time ``t_start`` down to the clean end (-1).

    ``key``: one key or ``[B]`` keys; step ``k`` of image ``i`` uses ``fold_in(keys[i], k)``.
    Full grid (``n_steps=None``): ``t_start + 1`` steps ``i -> i - 1``, ``i = t_start, ..., 0``.
    Sub-grid: ``n_steps`` steps on :func:`subgrid_times` (steps whose rounded times coincide are skipped).
    ``collect(state, info) -> pytree``: when given, returns ``(x, trace)`` with the collected values stacked over
    the loop's steps (entry ``k`` is the ``k``-th step; zeros for steps that were skipped); else ``x``.
    ``remat`` (static): ``jax.checkpoint`` on each step (module doc: memory O(steps x state) instead of O(steps x
    activations) under ``jax.grad``, one extra step forward per step in the backward pass; same outputs).
    """
    keys = image_keys(key, x.shape[0])
    problem = Problem(model, op, y, cond)
    want = collect is not None

    def one(k, st, t, tn):
        st, info = sampler.one_step(fold_keys(keys, k), problem, st, t, tn)
        return st, (collect(st, info.complete(problem)) if want else None)

    state = sampler.init(problem, x)
    if n_steps is None:
        if continuous:
            raise ValueError("continuous=True needs n_steps (a fixed number of steps on [0, t0])")
        t_start = jnp.asarray(t_start, jnp.int32)
        n = t_start + 1
        ts = concrete_int(t_start)
        max_n = max_steps if max_steps is not None else (None if ts is not None else model.T)
        if want:
            state, trace = bounded_scan(lambda k, st: one(k, st, t_start - k, t_start - k - 1), state,
                                        n if ts is None else ts + 1, max_n, remat=remat)
            return state.x, trace
        return bounded_loop(lambda k, st: one(k, st, t_start - k, t_start - k - 1)[0], state,
                            n if ts is None else ts + 1, max_n, remat=remat).x

    times, nxt = subgrid_times(t_start, n_steps, continuous)

    def scan_body(st, inp):
        k, t, tn = inp
        return masked_step(tn < t, lambda s: one(k, s, t, tn), st, want)

    state, trace = jax.lax.scan(maybe_remat(scan_body, remat), state, (jnp.arange(int(n_steps)), times, nxt))
    return (state.x, trace) if want else state.x


def rps(key, model: ScoreModel, op, y, x_init, t0, *, sampler=DPSStep(), cond=None, n_steps: Optional[int] = None,
        continuous: bool = False, max_steps: Optional[int] = None, remat: bool = False):
    """Stage 2: re-noise ``x_init`` to ``alpha_bar(t0 - 1)`` and sample back to 0 (see module doc). Returns the
    state ``[B, *state_shape]`` (images in pixel space; latents for a latent model).

    Args:
      key: one PRNG key, or ``[B]`` keys (one per image; see :mod:`mapreps_jax.rng`): image ``i``'s re-noising and
        steps use ``split(keys[i])``, so its output does not depend on the rest of the batch.
      model, op, y: the prior, the forward operator, the measurements ``[B, *op.out_shape]``.
      x_init: ``[B, *state_shape]`` starting estimate in the model's space (the MAP estimate in MAP-RPS;
        ``E(A_pinv y)`` in CCDF).
      t0: re-noising time in ``{0, ..., T}`` (traced; real-valued with ``continuous=True``). ``0`` returns ``x_init``.
      sampler: step rule (:class:`~mapreps_jax.samplers.DPSStep` by default).
      n_steps: ``K`` for the sub-grid variant (MAP-RPS-S); ``None`` = full grid (NFE = ``t0``).
      continuous: real-valued sub-grid times (differentiable in ``t0``).
      max_steps: static bound on ``t0`` for the full-grid scan (default ``T``).
      remat: static; ``jax.checkpoint`` on each reverse step (module doc): under ``jax.grad`` memory O(steps x
        state) instead of O(steps x activations), one extra step forward per step in the backward pass; the output
        is the same (bitwise).
    """
    return _rps(key, model, op, y, x_init, t0, sampler, cond, n_steps, continuous, max_steps, None, "rps", remat)


def rps_trace(key, model: ScoreModel, op, y, x_init, t0, *, sampler=DPSStep(), cond=None,
              n_steps: Optional[int] = None, continuous: bool = False, max_steps: Optional[int] = None,
              collect=keep_info, remat: bool = False):
    """:func:`rps` that also returns a trace: ``(x, trace)``, ``trace`` the values of ``collect(state, info)``
    (default: each step's :class:`~mapreps_jax.samplers.StepInfo`, ``x0 [S, B, ...]`` and ``residual [S, B]``)
    stacked over the loop's ``S`` steps (full grid: ``S = max_steps`` or ``t0`` when it is a concrete int, step
    ``k`` at time ``t0 - 1 - k``; sub-grid: ``S = n_steps``; zeros for skipped steps). A concrete ``t0 = 0`` gives
    ``(x_init, None)``. ``remat`` as in :func:`rps`."""
    return _rps(key, model, op, y, x_init, t0, sampler, cond, n_steps, continuous, max_steps, collect, "rps_trace",
                remat)


def _rps(key, model, op, y, x_init, t0, sampler, cond, n_steps, continuous, max_steps, collect, where, remat=False):
    y = check_measurement(op, y, where)
    x_init = check_state(model, op, x_init, where, "x_init")
    check_same_batch(y, x_init, "y", "x_init", where)
    t0 = check_t0(t0, model.T, where, continuous)
    t0c = None if continuous else concrete_int(t0)
    if n_steps is not None:
        check_scalar(n_steps, "n_steps", where, lo=1, integer=True)
    x_init = x_init.astype(jnp.result_type(x_init.dtype, y.dtype))  # one dtype through the loop (float64 runs)
    k_noise, k_loop = split_keys(image_keys(key, x_init.shape[0], where))
    if continuous:
        t0 = jnp.asarray(t0, jnp.float32)
    else:
        t0 = jnp.asarray(t0, jnp.int32)
    x = renoise(k_noise, x_init, model.alpha_bar(t0 - 1))
    if not isinstance(remat, bool):
        raise ValueError(f"{where}: remat must be a bool, got {remat!r}")
    kw = dict(sampler=sampler, cond=cond, max_steps=max_steps, collect=collect, remat=remat)
    if n_steps is None and t0c is not None and not continuous:
        if collect is not None and t0c == 0:  # nothing to run
            return x_init, None
        out = reverse_loop(k_loop, model, op, y, x, t0c - 1, **kw)
    else:
        out = reverse_loop(k_loop, model, op, y, x, t0 - 1, n_steps=n_steps, continuous=continuous, **kw)
    if collect is None:
        return jnp.where(t0 > 0, out, x_init)
    out, trace = out
    return jnp.where(t0 > 0, out, x_init), trace


def stage2_nfe(t0, n_steps: Optional[int] = None) -> int:
    """Network evaluations of Stage 2 at ``t0``: ``t0`` on the full grid, ``min(K, t0)`` on a sub-grid."""
    t0 = int(t0)
    return t0 if n_steps is None else (0 if t0 == 0 else min(int(n_steps), t0))
