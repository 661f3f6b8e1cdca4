"""Input checks shared by the public entry points: clear errors naming the argument, expected and given values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import math
import numbers

import numpy as np

__all__ = ["check_batched", "check_measurement", "check_signal", "check_state", "check_finite", "concrete_value",
           "check_scalar", "check_t0", "check_same_batch"]


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


@jax.jit
def _count_nonfinite(x):
    return jnp.sum(~jnp.isfinite(x))


def check_finite(x, name: str, where: str):
    """Raise ``ValueError`` if a concrete array holds NaN or inf (traced values are not inspected).

    A ``jax.Array`` is checked where it lives: one reduction on its devices and a single integer back to the host
    (no copy of the batch; works for arrays sharded over several hosts, where every process runs the same check).
    NumPy and Python inputs are checked on the host."""
    if _is_tracer(x):
        return x
    if isinstance(x, jax.Array):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        with jax.ensure_compile_time_eval():  # also inside a trace, for a concrete array the trace closes over
            bad_arr = _count_nonfinite(x)
        if _is_tracer(bad_arr):
            return x
        bad = int(np.asarray(bad_arr.addressable_data(0)))  # a replicated scalar: every process holds it
        size = x.size
    else:
        arr = np.asarray(x)
        if not jnp.issubdtype(arr.dtype, jnp.inexact):
            return x
        bad, size = int(np.size(arr) - np.count_nonzero(np.isfinite(arr))), arr.size
    if bad:
        raise ValueError(f"{where}: {name} must be finite; got {bad} NaN/inf value(s) of {size}")
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


def check_state(model, op, x, where: str, name: str = "x"):
    """``x`` must be a batch of states of ``model``'s space for ``op``'s images: ``[B, *op.in_shape]`` in pixel
    space, ``[B, *latent_shape]`` in a latent space; floating, finite."""
    space = getattr(model, "space", None)
    if space is None or space.is_pixel:
        return check_signal(op, x, where, name)
    return check_batched(x, space.state_shape(op.in_shape), f"{name} ({space.name} latent)", where)


def concrete_value(v):
    """``v`` as a NumPy array if it is a concrete number or array (Python, NumPy or a non-traced JAX value), else
    ``None`` (tracers, ``None``, strings and other placeholders are not inspected)."""
    if v is None or isinstance(v, (str, bool)) or _is_tracer(v):
        return None
    if isinstance(v, numbers.Number):
        return np.asarray(v)
    if isinstance(v, (np.ndarray, np.generic, jax.Array)):
        try:
            return np.asarray(v)
        except Exception:  # a non-addressable or otherwise non-fetchable array: not inspected here
            return None
    return None


def check_scalar(v, name: str, where: str, *, lo=None, lo_inclusive: bool = True, integer: bool = False):
    """Concrete values of ``v`` (a number or an array) must be finite, ``>= lo`` (``> lo`` unless ``lo_inclusive``)
    and, with ``integer``, whole numbers. Traced values pass unchecked. Returns ``v`` unchanged."""
    arr = concrete_value(v)
    if arr is None or arr.dtype.kind not in "biuf":
        return v
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: {name} must be finite, got {_show(arr)}")
    if integer and arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
        raise ValueError(f"{where}: {name} must be a whole number, got {_show(arr)}")
    if lo is not None:
        bad = arr < lo if lo_inclusive else arr <= lo
        if np.any(bad):
            rel = ">=" if lo_inclusive else ">"
            raise ValueError(f"{where}: {name} must be {rel} {lo}, got {_show(arr)}")
    return v


def _show(arr):
    return repr(arr.item()) if arr.size == 1 else f"an array with values in [{np.nanmin(arr)}, {np.nanmax(arr)}]"


def check_t0(t0, T: int, where: str, continuous: bool = False):
    """A concrete re-noising time must be finite and in ``[0, T]``; without ``continuous`` also a whole number (a
    float such as ``100.0`` is accepted, ``100.7`` is not). Returns it as a Python int (float when continuous) when
    concrete, else unchanged (traced values are the caller's responsibility)."""
    arr = concrete_value(t0)
    if arr is None:
        return t0
    if arr.ndim != 0:
        raise ValueError(f"{where}: t0 must be a scalar, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{where}: t0 must be a number, got dtype {arr.dtype}")
    v = float(arr)
    if not math.isfinite(v):
        raise ValueError(f"{where}: t0 must be finite, got {v}")
    if not 0 <= v <= T:
        raise ValueError(f"{where}: t0 must be in [0, {T}], got {arr.item()!r}")
    if continuous:
        return v
    if v != round(v):
        raise ValueError(f"{where}: t0 must be a whole number of steps in [0, {T}] (real t0 needs continuous=True), "
                         f"got {v!r}")
    return int(round(v))


def check_t0_list(t0s, T: int, where: str) -> list:
    """A D-P sweep's re-noising times (the command line's ``--t0`` list): at least one, each a whole number of diffusion
    steps in ``[0, T]`` (an int, or a float such as ``200.0``; not a bool, not ``200.7``, not NaN). Returns them as
    Python ints, in the given order. ``ValueError`` naming every value that is not allowed."""
    if isinstance(t0s, (str, bytes)) or not hasattr(t0s, "__iter__"):
        raise ValueError(f"{where}: t0 must be a list of whole numbers in [0, {T}], got {t0s!r}")
    vals = [np.asarray(t).item() if np.ndim(t) == 0 and not isinstance(t, str) else t for t in t0s]
    if not vals:
        raise ValueError(f"{where}: expected at least one re-noising time t0, got none")

    def ok(t):  # check_t0's rule for one value; a bool, a string or a nested list is not a number of steps
        if concrete_value(t) is None:
            return False
        try:
            check_t0(t, T, where)
        except (TypeError, ValueError):
            return False
        return True

    bad = [t for t in vals if not ok(t)]
    if bad:
        raise ValueError(f"{where}: every t0 must be a whole number of steps in [0, {T}], got {vals} "
                         f"(not allowed: {bad})")
    return [int(round(t)) for t in vals]


def check_same_batch(a, b, name_a: str, name_b: str, where: str):
    """``a`` and ``b`` must have the same leading (batch) size."""
    if jnp.shape(a)[0] != jnp.shape(b)[0]:
        raise ValueError(f"{where}: {name_a} and {name_b} must have the same batch size; got {jnp.shape(a)[0]} and "
                         f"{jnp.shape(b)[0]}")
