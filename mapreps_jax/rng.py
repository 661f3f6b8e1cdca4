"""Per-image random streams: every random draw for image ``i`` of a batch derives from that image's key alone.

Contract (``CONVENTIONS.md``, randomness): every stochastic entry point takes ``key`` first, either

* ONE key (``jax.random.key(s)`` or the legacy ``PRNGKey(s)``, shape ``(2,)``): image ``i`` of a batch of ``B``
  gets ``image_keys(key, B)[i] = fold_in(key, i)``; or
* a BATCH of keys, one per image (``[B]`` typed keys or ``[B, 2]`` legacy keys), used as given.

Inside the algorithms every draw for image ``i`` is a function of its key only (``fold_in`` with the step index,
``split`` into sub-streams, ``normal`` of the event shape), never of the batch shape. So restoring image ``i`` alone
with ``image_keys(key, B)[i:i + 1]`` gives the same output as restoring it inside the batch of ``B`` with ``key``,
or inside any other batch whose key array holds the same key at its position (up to the float rounding of batched
network evaluation). This is also what makes data-parallel sharding exact: each shard takes its slice of the keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["image_keys", "fold_keys", "split_keys", "normal_like", "normal"]


def _is_typed(key) -> bool:
    return jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key)


def _n_keys(key):
    """``None`` for a single key, ``B`` for a batch of keys; raises for anything else."""
    if _is_typed(key):
        if key.ndim == 0:
            return None
        if key.ndim == 1:
            return key.shape[0]
        raise ValueError(f"key: expected one PRNG key or a [B] batch of keys, got typed keys of shape {key.shape}")
    shape = getattr(key, "shape", None)
    dtype = getattr(key, "dtype", None)
    if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.unsignedinteger):
        raise TypeError(f"key: expected a jax.random key (jax.random.key(seed) or jax.random.PRNGKey(seed)) or a "
                        f"batch of keys, got {type(key).__name__}"
                        + (f" of dtype {dtype}" if dtype is not None else ""))
    if len(shape) == 1:
        return None
    if len(shape) == 2:
        return shape[0]
    raise ValueError(f"key: expected one legacy PRNG key of shape (2,) or a batch [B, 2], got shape {tuple(shape)}")


def image_keys(key, batch: int, where: str = "key"):
    """One key per image, ``[B]`` (typed) or ``[B, 2]`` (legacy): ``fold_in(key, i)`` for a single key, the given
    keys for a batch of keys (whose length must equal ``batch``)."""
    n = _n_keys(key)
    batch = int(batch)
    if n is None:
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch, dtype=jnp.uint32))
    if n != batch:
        raise ValueError(f"{where}: a batch of keys must hold one key per image: expected {batch}, got {n}")
    return key


def fold_keys(keys, data):
    """``fold_in(keys[i], data)`` for every image (``data`` a scalar, e.g. the step index)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def split_keys(keys, num: int = 2):
    """Split every image's key into ``num`` sub-streams: a tuple of ``num`` key batches."""
    parts = jax.vmap(lambda k: jax.random.split(k, num))(keys)
    return tuple(parts[:, j] for j in range(num))


def normal(keys, event_shape, dtype=jnp.float32):
    """``[B, *event_shape]`` standard normals; row ``i`` is ``normal(keys[i], event_shape)``."""
    return jax.vmap(lambda k: jax.random.normal(k, tuple(event_shape), dtype))(keys)


def normal_like(keys, x):
    """Standard normals shaped like ``x`` (``[B, ...]``), row ``i`` drawn from ``keys[i]``."""
    return normal(keys, x.shape[1:], x.dtype)
