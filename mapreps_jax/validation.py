"""Input checks shared by the public entry points: clear errors naming the argument, expected and given values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_batched", "check_measurement", "check_signal", "check_finite"]


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_finite(x, name: str, where: str):
    """Raise ``ValueError`` if a concrete array holds NaN or inf (traced values are not inspected)."""
    if not _is_tracer(x):
        arr = np.asarray(x)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(f"{where}: {name} must be finite; got {bad} NaN/inf value(s) of {arr.size}")
    return x


def check_batched(x, event_shape, name: str, where: str):
    """``x`` must be a float array of shape ``[B, *event_shape]``; returns it as float32 (float64 kept)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating)):
        raise TypeError(f"{where}: {name} must be a floating-point array, got dtype {x.dtype}")
    event_shape = tuple(event_shape)
    if x.ndim != len(event_shape) + 1 or tuple(x.shape[1:]) != event_shape:
        raise ValueError(f"{where}: {name} must have shape [batch, {', '.join(map(str, event_shape))}]"
                         f" (a batch of {event_shape}); got shape {tuple(x.shape)}")
    check_finite(x, name, where)
    return jnp.asarray(x)


def check_measurement(op, y, where: str):
    """``y`` must be ``[B, *op.out_shape]``, floating, finite."""
    return check_batched(y, op.out_shape, "y (measurement)", where)


def check_signal(op, x, where: str, name: str = "x"):
    """``x`` must be ``[B, *op.in_shape]``, floating, finite."""
    return check_batched(x, op.in_shape, name, where)
