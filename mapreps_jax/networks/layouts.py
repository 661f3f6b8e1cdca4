"""Tensor layouts between PyTorch state dicts and Flax parameter trees, and the strict mapping every converter uses.

A *layout* is a tuple of ``(flax_path, torch_key, kind, flax_shape)``, one per parameter, derived from the Flax
model's own parameter tree (``jax.eval_shape`` of its init), so the expected keys and shapes are never written twice.
Kinds and their transposes (PyTorch -> Flax):

    conv      [O, I, kh, kw] -> [kh, kw, I, O]
    conv1d    [O, I, 1]      -> [I, O]        (guided-diffusion's attention qkv / proj_out)
    conv1x1   [O, I, 1, 1]   -> [I, O]        (CompVis attention q / k / v / proj_out)
    linear    [O, I]         -> [I, O]
    vector, table            unchanged       (biases, norm weights, codebooks)

:func:`from_torch` is strict: one ``ValueError`` lists every missing, unexpected, mis-shaped (expected vs given) and
non-floating tensor; :func:`to_torch_state_dict` is its inverse.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import numpy as np

__all__ = ["torch_shape", "to_flax", "to_torch", "path_names", "fmt_list", "is_float_array", "set_path",
           "layout_of", "from_torch", "to_torch_state_dict"]


def torch_shape(kind: str, flax_shape) -> Tuple[int, ...]:
    """The PyTorch shape of a Flax parameter of this ``kind``."""
    if kind == "conv":
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if kind in ("conv1d", "conv1x1", "linear"):
        i, o = flax_shape
        return {"conv1d": (o, i, 1), "conv1x1": (o, i, 1, 1), "linear": (o, i)}[kind]
    return tuple(flax_shape)


def to_flax(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.transpose(a, (2, 3, 1, 0))
    if kind == "conv1d":
        return np.transpose(a[:, :, 0], (1, 0))
    if kind == "conv1x1":
        return np.transpose(a[:, :, 0, 0], (1, 0))
    if kind == "linear":
        return np.transpose(a, (1, 0))
    return a


def to_torch(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.transpose(a, (3, 2, 0, 1))
    if kind == "conv1d":
        return np.transpose(a, (1, 0))[:, :, None]
    if kind == "conv1x1":
        return np.transpose(a, (1, 0))[:, :, None, None]
    if kind == "linear":
        return np.transpose(a, (1, 0))
    return a


def path_names(path) -> Tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def fmt_list(xs, n: int = 8) -> str:
    xs = list(xs)
    s = ", ".join(xs[:n])
    return s + (f", ... ({len(xs)} in all)" if len(xs) > n else "")


def is_float_array(a) -> bool:
    dt = np.asarray(a).dtype
    return np.issubdtype(dt, np.floating) or str(dt) == "bfloat16"


def set_path(tree: dict, path, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def layout_of(shapes, key_fn: Callable[[Tuple[str, ...]], str],
              kind_fn: Callable[[Tuple[str, ...], int], str]) -> tuple:
    """``((flax_path, torch_key, kind, flax_shape), ...)`` of a parameter tree of shapes (``ShapeDtypeStruct``)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = path_names(path)
        out.append((names, key_fn(names), kind_fn(names, len(leaf.shape)), tuple(leaf.shape)))
    return tuple(out)


def from_torch(sd: Mapping[str, Any], layout, what: str):
    """Flax params (nested dict of float32 ``np.ndarray``) from a PyTorch-layout state dict, strictly (module doc).
    ``what`` names the network in the error (e.g. ``"the SD UNet config"``)."""
    if not isinstance(sd, Mapping):
        raise TypeError(f"state dict for {what}: expected a mapping of names to arrays, got {type(sd).__name__}")
    expected = {key: (path, kind, torch_shape(kind, shp)) for path, key, kind, shp in layout}
    given = set(sd)
    common = sorted(set(expected) & given)
    missing = sorted(set(expected) - given)
    unexpected = sorted((str(k) for k in given - set(expected)))
    misshaped = [f"{k} (expected {expected[k][2]}, got {tuple(np.shape(sd[k]))})" for k in common
                 if tuple(np.shape(sd[k])) != expected[k][2]]
    nonfloat = [f"{k} ({np.asarray(sd[k]).dtype})" for k in common if not is_float_array(sd[k])]
    problems = [f"{label}: {fmt_list(v)}" for label, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                                           ("mis-shaped keys", misshaped),
                                                           ("non-floating keys", nonfloat)) if v]
    if problems:
        raise ValueError(f"state dict does not match {what} ({len(expected)} tensors expected, {len(given)} given): "
                         + "; ".join(problems))
    params: dict = {}
    for key, (path, kind, _) in expected.items():
        set_path(params, path, np.ascontiguousarray(to_flax(kind, np.asarray(sd[key]).astype(np.float32))))
    return params


def to_torch_state_dict(params, layout, where: str) -> Dict[str, np.ndarray]:
    """The inverse of :func:`from_torch`: a PyTorch-layout ``{key: np.ndarray}`` from Flax params (a missing, extra
    or mis-shaped parameter is a ``ValueError``)."""
    flat = {path_names(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    problems, out = [], {}
    for path, key, kind, shp in layout:
        if path not in flat:
            problems.append(f"missing {'/'.join(path)}")
        elif tuple(flat[path].shape) != shp:
            problems.append(f"{'/'.join(path)} (expected {shp}, got {tuple(flat[path].shape)})")
        else:
            out[key] = np.ascontiguousarray(to_torch(kind, flat[path]))
    extra = sorted("/".join(p) for p in set(flat) - {p for p, *_ in layout})
    if extra:
        problems.append(f"unexpected {fmt_list(extra)}")
    if problems:
        raise ValueError(f"{where}: params do not match the config: " + "; ".join(problems))
    return out
