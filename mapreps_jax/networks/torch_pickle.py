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

Limits (a hostile or damaged file gives a clear error, never ``RecursionError`` / ``MemoryError``): containers may
nest at most :data:`MAX_DEPTH` levels (self-referencing containers are refused the same way); the bytes a file
may make the reader allocate (storages read from the archive plus tensor copies) are capped at
``ALLOC_FACTOR * file size + ALLOC_SLACK``, checked *before* allocating. A truncated or damaged zip archive is
reported as such (not as the legacy format).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
import zlib
from typing import Any, Dict

import numpy as np

__all__ = ["load_torch_state_dict", "load_torch_pickle", "load_safetensors", "load_state_dict",
           "extract_state_dict", "MAX_DEPTH", "ALLOC_FACTOR", "ALLOC_SLACK"]

MAX_DEPTH = 64              # nesting of dicts / lists / tuples in a checkpoint (a state dict needs 2 or 3)
ALLOC_FACTOR = 4            # bytes allocated per byte of the file (storages + tensor copies: about 2 for a real one)
ALLOC_SLACK = 64 << 20      # plus this many bytes


class _Budget:
    """What a file may make the reader allocate; :meth:`take` refuses before the allocation happens."""

    __slots__ = ("left", "total", "path")

    def __init__(self, total: int, path: str = "checkpoint"):
        self.left = self.total = int(total)
        self.path = path

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise pickle.UnpicklingError(
                f"{what} declares {nbytes} bytes, more than this file (of its size) can hold: at most "
                f"{self.total} bytes in all may be allocated for {self.path} ({ALLOC_FACTOR} x its size + "
                f"{ALLOC_SLACK >> 20} MiB); the file is damaged or malicious")
        self.left -= nbytes


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
                       metadata=None, *, _budget: "_Budget" = None):
    """``torch._utils._rebuild_tensor_v2`` for a dense strided tensor: a bounds-checked strided copy (its bytes
    taken from ``_budget`` first)."""
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
    numel = 1
    for n in size:
        numel *= n
    if _budget is not None:
        _budget.take(numel * flat.dtype.itemsize, f"_rebuild_tensor_v2: a tensor of size {size}")
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

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, byteorder: str, budget: "_Budget"):
        super().__init__(file)
        self._zf = zf
        self._prefix = prefix
        self._byteorder = byteorder
        self._budget = budget
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module, name):
        fn = _ALLOWED_GLOBALS.get((module, name))
        if fn is _rebuild_tensor_v2:
            budget = self._budget

            def rebuild(*args, **kwargs):
                return _rebuild_tensor_v2(*args, _budget=budget, **{k: v for k, v in kwargs.items()
                                                                    if k != "_budget"})

            return rebuild
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
            info = self._zf.getinfo(member)
        except KeyError:
            raise pickle.UnpicklingError(f"checkpoint archive lacks storage member {member!r}") from None
        nbytes = numel * stype.dtype.itemsize
        if info.file_size < nbytes:
            raise pickle.UnpicklingError(f"storage {member!r}: {info.file_size} bytes, expected {nbytes} "
                                         f"({numel} x {stype.dtype})")
        self._budget.take(nbytes, f"storage {member!r}")
        raw = _read_member(self._zf, member, nbytes)
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


def _read_member(zf: zipfile.ZipFile, member: str, nbytes: int) -> bytes:
    """The first ``nbytes`` bytes of a zip member (read in chunks: a member declaring more is not loaded whole)."""
    chunks, left = [], nbytes
    with zf.open(member) as f:
        while left > 0:
            b = f.read(min(left, 1 << 24))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
    raw = b"".join(chunks)
    if len(raw) < nbytes:
        raise pickle.UnpicklingError(f"storage {member!r}: {len(raw)} bytes, expected {nbytes}")
    return raw


def _finalize(obj, depth: int = 0):
    """Replace :class:`_Tensor` records by arrays in (nested) dicts / lists / tuples (at most :data:`MAX_DEPTH`
    levels: deeper or self-referencing containers are refused)."""
    if isinstance(obj, _Tensor):
        return obj.array
    if isinstance(obj, (dict, list, tuple)):
        if depth >= MAX_DEPTH:
            raise pickle.UnpicklingError(f"containers nested more than {MAX_DEPTH} levels deep (or referencing "
                                         f"themselves); a state dict needs 2 or 3: not a plain state dict")
        if isinstance(obj, dict):
            return {k: _finalize(v, depth + 1) for k, v in obj.items()}
        return type(obj)(_finalize(v, depth + 1) for v in obj)
    if isinstance(obj, (_Storage, _StorageType)):
        raise pickle.UnpicklingError("checkpoint contains a bare storage; only tensors are supported")
    return obj


def _zip_hint(path: str) -> str:
    """Why ``path`` is not a readable zip archive, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return (" It starts like a zip archive but its end-of-archive directory is missing: the file is truncated "
                "or damaged (an incomplete download?). Compare its size and SHA-256 with the source and download "
                "it again.")
    if head[:1] == b"\x80":
        return (" It looks like a pickle: the legacy (non-zip) torch.save format (PyTorch < 1.6 or "
                "_use_new_zipfile_serialization=False). Only the zip format (default since PyTorch 1.6) and "
                "safetensors can be read without executing code; re-save it once with PyTorch: "
                "torch.save(torch.load(src, weights_only=True), dst), or convert it to safetensors.")
    if not head:
        return " The file is empty."
    return " Expected a torch.save zip archive (.pt/.pth/.ckpt) or a .safetensors file."


def load_torch_pickle(path) -> Any:
    """Read a ``torch.save`` zip archive into nested Python containers of numpy arrays (no torch, no code run).

    Raises:
      ValueError: the file is not a zip archive (legacy ``torch.save`` format, truncated download, ...), is a
        damaged archive (CRC error), or lacks ``data.pkl``.
      pickle.UnpicklingError: the pickle references a disallowed global, is inconsistent with its storages, nests
        deeper than :data:`MAX_DEPTH`, or declares more bytes than the file's size allows (see module doc).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a zip-format PyTorch checkpoint.{_zip_hint(path)}")
    budget = _Budget(ALLOC_FACTOR * os.path.getsize(path) + ALLOC_SLACK, path)
    try:
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
            size = zf.getinfo(pkls[0]).file_size
            budget.take(size, f"{pkls[0]}")
            data = _read_member(zf, pkls[0], size)
            try:
                obj = _RestrictedUnpickler(io.BytesIO(data), zf, prefix, byteorder, budget).load()
            except EOFError:
                raise pickle.UnpicklingError(f"{path}: {pkls[0]} is truncated (the pickle ends early)") from None
            except (TypeError, AttributeError, IndexError, KeyError) as e:
                raise pickle.UnpicklingError(f"{path}: malformed pickle in {pkls[0]} ({type(e).__name__}: {e})") \
                    from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f"{path}: damaged zip archive ({type(e).__name__}: {e}); the file is truncated or "
                         f"corrupt: compare its size and SHA-256 with the source") from None
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
    try:
        return dict(load_file(os.fspath(path)))
    except (OSError, MemoryError):
        raise
    except Exception as e:  # safetensors raises its own SafetensorError for damaged files
        raise ValueError(f"{os.fspath(path)}: not a readable safetensors file ({type(e).__name__}: {e})") from None


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
