"""Batched conjugate gradients: one symmetric positive-definite solve per image, written once.

Used by the proximal data step of Stage 1 (:func:`mapreps_jax.map_stage.prox_data_fit`, in image space) and by the
PiGDM / DMPS guidance (:mod:`mapreps_jax.samplers`, in measurement space).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cg_solve"]


def cg_solve(matvec, b, x0, axes, n_iter: int):
    """``n_iter`` conjugate-gradient steps on ``matvec(x) = b`` from ``x0``, independently per image.

    ``matvec`` must be symmetric positive definite on each image's slice and act on the batch image by image;
    ``axes`` are the event axes over which inner products are taken (``[B, ...]`` arrays). An image whose residual
    falls below 1e-6 of its right-hand side stops (its step sizes become 0): past that point the CG scalars are
    ratios of rounding errors, and their derivatives would overflow to inf/NaN under ``grad``. Exact after as many
    steps as the operator has distinct eigenvalues.
    """

    def dot(p, q):
        return jnp.sum(p * q, axis=axes, keepdims=True)

    tol2 = 1e-12 * dot(b, b)

    def safe_div(num, den, ok):
        return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)

    r = b - matvec(x0)

    def step(_, c):
        x, r, p, rs = c
        active = rs > tol2
        ap = matvec(p)
        alpha = safe_div(rs, dot(p, ap), active)
        x, r = x + alpha * p, r - alpha * ap
        rs_new = dot(r, r)
        return x, r, r + safe_div(rs_new, rs, active) * p, jnp.where(active, rs_new, rs)

    return jax.lax.fori_loop(0, int(n_iter), step, (x0, r, r, dot(r, r)))[0]
