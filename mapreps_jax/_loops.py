"""Loops over a (possibly traced) number of steps, with compile time independent of that number.

Rematerialisation (``remat=True`` in :func:`bounded_scan` / :func:`bounded_loop`): the per-step function of the
``lax.scan`` is wrapped in ``jax.checkpoint``, so reverse-mode differentiation saves only each step's *input* (the
carry, O(steps x state) memory) instead of every intermediate of the step (O(steps x activations): for a network
step, all its layer activations), and recomputes the step's forward pass from the saved carry during the backward
pass (one extra forward evaluation per step, i.e. about 1.3-1.5x the gradient's compute). The forward values are
unchanged (bitwise: ``jax.checkpoint`` only changes what the transpose keeps); the option is static.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["bounded_loop", "bounded_scan", "masked_step", "concrete_int", "maybe_remat"]


def maybe_remat(step, remat: bool):
    """``jax.checkpoint(step)`` when ``remat`` (a scan step: saves its inputs, recomputes its forward pass in the
    backward pass; see module doc), else ``step`` unchanged. ``prevent_cse=False``: inside ``lax.scan`` the
    recomputation cannot be merged with the forward pass anyway (JAX's advice for checkpointed scan bodies)."""
    return jax.checkpoint(step, prevent_cse=False) if remat else step


def concrete_int(n):
    """``int(n)`` if ``n`` is a concrete integer (Python/NumPy int or a concrete 0-d array), else ``None``."""
    if isinstance(n, bool):
        raise TypeError(f"expected an integer step count, got bool {n!r}")
    if isinstance(n, numbers.Integral):
        return int(n)
    if isinstance(n, jax.core.Tracer):
        return None
    try:
        arr = jnp.asarray(n)
    except TypeError:
        return None
    if arr.ndim == 0 and jnp.issubdtype(arr.dtype, jnp.integer):
        return int(arr)
    return None


def masked_step(active, step, carry, collect: bool):
    """``step(carry) -> (carry, out)`` when ``active`` else ``(carry, zeros like out)`` (a ``lax.cond``).

    Without ``collect`` the step's ``out`` is dropped (``step`` may return ``None`` for it) and nothing is traced
    twice; with it, the zero branch is built from ``jax.eval_shape`` of the step (one more trace of the step)."""
    if not collect:
        return lax.cond(active, lambda c: (step(c)[0], None), lambda c: (c, None), carry)
    shapes = jax.eval_shape(lambda c: step(c)[1], carry)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return lax.cond(active, step, lambda c: (c, zeros), carry)


def bounded_scan(body, carry, n, max_n=None, collect: bool = True, remat: bool = False):
    """``carry, out_k = body(k, carry)`` for ``k = 0, ..., n - 1``; returns ``(carry, outs)`` with ``outs`` stacked
    over a static number of steps: ``max_n`` (the entries past ``n`` are zeros) or the concrete ``n``.

    A traced ``n`` needs ``max_n`` here (use :func:`bounded_loop` to run a traced number of steps without
    outputs). Without ``collect`` the outputs are dropped (``outs`` is ``None``). ``remat`` (static): wrap the
    per-step function in ``jax.checkpoint`` (module doc: the backward pass keeps O(steps x carry) memory instead of
    O(steps x activations) and recomputes one forward step per step; same values)."""
    if max_n is None:
        n_static = concrete_int(n)
        if n_static is None:
            raise ValueError("bounded_scan: a traced number of steps needs max_n (a static bound) to stack outputs")
        if n_static <= 0:
            return carry, None

        def scan_body(c, k):
            c, out = body(k, c)
            return c, (out if collect else None)

        return lax.scan(maybe_remat(scan_body, remat), carry, jnp.arange(n_static, dtype=jnp.int32))
    max_n = int(max_n)
    if max_n <= 0:
        return carry, None

    def masked(c, k):
        return masked_step(k < n, lambda cc: body(k, cc), c, collect)

    return lax.scan(maybe_remat(masked, remat), carry, jnp.arange(max_n, dtype=jnp.int32))


def bounded_loop(body, carry, n, max_n=None, remat: bool = False):
    """Run ``carry = body(k, carry)`` for ``k = 0, ..., n - 1``.

    * ``max_n`` given (static int): a ``lax.scan`` of length ``max_n`` whose step is ``lax.cond(k < n, body, id)``.
      Reverse-mode differentiable and vmappable in ``n``; without vmap, the skipped steps cost nothing but the
      branch; under ``vmap`` over ``n`` both branches run (cost ``max_n`` per lane).
    * ``n`` concrete: a ``lax.scan`` of exactly ``n`` steps.
    * ``n`` traced and no ``max_n``: ``lax.fori_loop`` (a while loop: exactly ``n`` body evaluations, forward-mode
      and vmap only).

    In every case the body is traced once, so compile time does not grow with the number of steps.
    ``remat`` (static): ``jax.checkpoint`` on the scan step (see :func:`bounded_scan`; no effect on the
    ``fori_loop`` mode, which reverse mode does not differentiate).
    """
    if max_n is not None or concrete_int(n) is not None:
        return bounded_scan(lambda k, c: (body(k, c), None), carry, n, max_n, collect=False, remat=remat)[0]
    return lax.fori_loop(jnp.int32(0), jnp.asarray(n, jnp.int32), body, carry)
