"""Read PyTorch checkpoints (``torch.save`` zip format) and safetensors files into numpy, without torch and without
executing any code from the file.

A ``torch.save`` file (PyTorch >= 1.6 default) is a zip archive ``<prefix>/data.pkl`` (a pickle of the object with
tensors replaced by *persistent ids* ``('storage', StorageType, key, location, numel)``), ``<prefix>/data/<key>``
(the raw bytes of each storage), ``<prefix>/byteorder`` (``little``/``big``, optional) and ``<prefix>/version``.

The pickle is read with a restricted unpickler: ``find_class`` resolves only the handful of globals a state dict
needs (the tensor/parameter rebuild functions, the typed-storage classes and ``collections.OrderedDict``), each
mapped to a local, side-effect-free stand-in; any other global (``os.system``, ``builtins.eval``, ...) raises
:class:`pickle.UnpicklingError` naming it *before* anything is called. Tensors are rebuilt as inert
:class:`_Tensor` records (no ``__dict__``, no ``__setstate__``), so pickle ``BUILD`` instructions cannot mutate them,
and are turned into numpy arrays only after the pickle has been fully read.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Dict

import numpy as np

__all__ = ["load_torch_state_dict", "load_torch_pickle", "load_safetensors", "load_state_dict",
           "extract_state_dict"]


def _bf16():
    import ml_dtypes  # shipped with jax

    return np.dtype(ml_dtypes.bfloat16)


# torch typed-storage class name -> numpy dtype (name; bfloat16 resolved lazily)
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}


def _np_dtype(name: str) -> np.dtype:
    return _bf16() if name == "bfloat16" else np.dtype(name)


class _StorageType:
    """Stand-in for ``torch.<X>Storage`` classes: only carries the dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = _np_dtype(_STORAGE_DTYPES[name])

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """A storage read from the archive: a flat numpy array."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _Tensor:
    """Inert tensor record (converted to ``np.ndarray`` after unpickling)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _as_int_tuple(v, what):
    if isinstance(v, int):
        v = (v,)
    if not isinstance(v, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2: {what} must be a tuple of ints, got {v!r}")
    return tuple(v)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """``torch._utils._rebuild_tensor_v2`` for a dense strided tensor: a bounds-checked strided copy."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2: expected a storage, got {type(storage).__name__}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2: bad storage_offset {storage_offset!r}")
    size = _as_int_tuple(size, "size")
    stride = _as_int_tuple(stride, "stride")
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2: bad size {size} / stride {stride}")
    flat = storage.array
    if any(s == 0 for s in size):
        return _Tensor(np.zeros(size, flat.dtype))
    last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= flat.size:
        raise pickle.UnpicklingError(
            f"_rebuild_tensor_v2: tensor of size {size}, stride {stride}, offset {storage_offset} reads past the end "
            f"of its storage ({flat.size} elements)")
    base = flat[storage_offset:]
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(base, shape=size, strides=tuple(st * item for st in stride),
                                           writeable=False)
    return _Tensor(np.array(view, copy=True))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError(f"_rebuild_parameter: expected a tensor, got {type(data).__name__}")
    return data



_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only :data:`_ALLOWED_GLOBALS` and ``torch.<X>Storage``; storages come from the zip."""

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._zf = zf
        self._prefix = prefix
        self._byteorder = byteorder
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module, name):
        fn = _ALLOWED_GLOBALS.get((module, name))
        if fn is not None:
            return fn
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only tensor/state-dict globals are allowed in a checkpoint "
            f"read by mapreps_jax (the file may be malicious, or not a plain state dict)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"persistent id: unsupported storage type {stype!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"persistent id: bad key/numel {key!r}/{numel!r}")
        if key in self._storages:
            return self._storages[key]
        member = f"{self._prefix}data/{key}"
        try:
            raw = self._zf.read(member)
        except KeyError:
            raise pickle.UnpicklingError(f"checkpoint archive lacks storage member {member!r}") from None
        nbytes = numel * stype.dtype.itemsize
        if len(raw) < nbytes:
            raise pickle.UnpicklingError(f"storage {member!r}: {len(raw)} bytes, expected {nbytes} "
                                         f"({numel} x {stype.dtype})")
        buf = raw[:nbytes]
        if self._byteorder == "little" or stype.dtype.itemsize == 1:
            arr = np.frombuffer(buf, dtype=stype.dtype)
        elif stype.name == "BFloat16Storage":
            arr = np.frombuffer(buf, dtype=">u2").astype("<u2").view(stype.dtype)
        else:
            arr = np.frombuffer(buf, dtype=stype.dtype.newbyteorder(">")).astype(stype.dtype)
        st = _Storage(arr)
        self._storages[key] = st
        return st


def _finalize(obj):
    """Replace :class:`_Tensor` records by arrays in (nested) dicts / lists / tuples."""
    if isinstance(obj, _Tensor):
        return obj.array
    if isinstance(obj, dict):
        return {k: _finalize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_finalize(v) for v in obj)
    if isinstance(obj, (_Storage, _StorageType)):
        raise pickle.UnpicklingError("checkpoint contains a bare storage; only tensors are supported")
    return obj


def load_torch_pickle(path) -> Any:
    """Read a ``torch.save`` zip archive into nested Python containers of numpy arrays (no torch, no code run).

    Raises:
      ValueError: the file is not a zip archive (legacy ``torch.save`` format) or lacks ``data.pkl``.
      pickle.UnpicklingError: the pickle references a disallowed global, or is inconsistent with its storages.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        hint = (" It looks like a pickle: the legacy (non-zip) torch.save format (PyTorch < 1.6 or "
                "_use_new_zipfile_serialization=False)." if head[:1] == b"\x80" else "")
        raise ValueError(
            f"{path}: not a zip-format PyTorch checkpoint.{hint} Only the zip format (default since PyTorch 1.6) and "
            f"safetensors can be read without executing code; re-save it once with PyTorch: "
            f"torch.save(torch.load(src, weights_only=True), dst), or convert it to safetensors.")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pkls) != 1:
            raise ValueError(f"{path}: expected exactly one '<prefix>/data.pkl' in the archive, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = zf.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
        data = zf.read(pkls[0])
        obj = _RestrictedUnpickler(io.BytesIO(data), zf, prefix, byteorder).load()
    return _finalize(obj)


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "ema_model", "net")


def extract_state_dict(obj, source: str = "checkpoint") -> Dict[str, np.ndarray]:
    """A flat ``{name: array}`` state dict from a loaded object.

    Accepts a plain state dict, or (trivial wrappers) a dict whose only dict-valued entry under one of
    ``state_dict``/``model_state_dict``/``model``/``ema_model``/``net`` is the state dict. A ``module.`` prefix on
    every key (``DataParallel``) is stripped.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a dict (state dict), got {type(obj).__name__}")
    if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        sd = obj
    else:
        cands = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        if len(cands) != 1 or not all(isinstance(v, np.ndarray) for v in obj[cands[0]].values()):
            raise ValueError(f"{source}: not a plain state dict (keys {list(obj)[:10]}...); expected name -> tensor, "
                             f"or a single wrapper key among {_WRAPPER_KEYS}")
        sd = obj[cands[0]]
    sd = {str(k): v for k, v in sd.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_torch_state_dict(path) -> Dict[str, np.ndarray]:
    """``{name: np.ndarray}`` from a ``torch.save`` zip checkpoint, read without torch (see module docstring)."""
    return extract_state_dict(load_torch_pickle(path), source=os.fspath(path))


def load_safetensors(path) -> Dict[str, np.ndarray]:
    """``{name: np.ndarray}`` from a safetensors file (needs the ``safetensors`` package)."""
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ImportError("reading .safetensors files needs the 'safetensors' package (pip install safetensors)") from e
    return dict(load_file(os.fspath(path)))


def _is_safetensors(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= 100_000_000 and head[8:9] == b"{"


def load_state_dict(path) -> Dict[str, np.ndarray]:
    """Read a state dict from a ``.pt``/``.pth``/``.ckpt`` (torch zip) or ``.safetensors`` file, by content."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if zipfile.is_zipfile(path):
        return load_torch_state_dict(path)
    if path.endswith(".safetensors") or _is_safetensors(path):
        return load_safetensors(path)
    return load_torch_state_dict(path)  # raises the legacy-format error
