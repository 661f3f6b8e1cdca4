"""Loops over a (possibly traced) number of steps, with compile time independent of that number."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["bounded_loop", "concrete_int"]


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


def bounded_loop(body, carry, n, max_n=None):
    """Run ``carry = body(k, carry)`` for ``k = 0, ..., n - 1``.

    * ``max_n`` given (static int): a ``lax.scan`` of length ``max_n`` whose step is ``lax.cond(k < n, body, id)``.
      Reverse-mode differentiable and vmappable in ``n``; without vmap, the skipped steps cost nothing but the
      branch; under ``vmap`` over ``n`` both branches run (cost ``max_n`` per lane).
    * ``n`` concrete: a ``lax.scan`` of exactly ``n`` steps.
    * ``n`` traced and no ``max_n``: ``lax.fori_loop`` (a while loop: exactly ``n`` body evaluations, forward-mode
      and vmap only).

    In every case the body is traced once, so compile time does not grow with the number of steps.
    """
    n_static = concrete_int(n)
    if max_n is not None:
        max_n = int(max_n)
        if max_n <= 0:
            return carry

        def scan_body(c, k):
            return lax.cond(k < n, lambda cc: body(k, cc), lambda cc: cc, c), None

        carry, _ = lax.scan(scan_body, carry, jnp.arange(max_n, dtype=jnp.int32))
        return carry
    if n_static is not None:
        if n_static <= 0:
            return carry

        def scan_body(c, k):
            return body(k, c), None

        carry, _ = lax.scan(scan_body, carry, jnp.arange(n_static, dtype=jnp.int32))
        return carry
    return lax.fori_loop(jnp.int32(0), jnp.asarray(n, jnp.int32), body, carry)
