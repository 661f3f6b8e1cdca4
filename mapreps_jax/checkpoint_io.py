"""Checkpoint and output I/O: the checkpoint root, checksum manifests, atomic orbax pytree save/restore, diffusion
schedule records, output sets. The digits application's bundled models are loaded by :mod:`mapreps_jax.app.pretrained`.

**Where checkpoints live.** ``$MAPREPS_CHECKPOINTS``, when set, is the *checkpoint root*: the folder that holds
``default/`` (the bundled digits prior and classifier, :mod:`mapreps_jax.app.pretrained`) and the converted model folders
(``adm-ffhq256/``, ... : :mod:`mapreps_jax.networks.registry`). It means the same thing in both modules. Unset,
this module uses ``<repository>/checkpoints`` (:func:`checkpoints_root`) and the registry ``./checkpoints``. A
``$MAPREPS_CHECKPOINTS`` that names a missing folder, or the ``default/`` bundle itself, is an error that says so.

Layout of ``<root>/default/`` (written by ``scripts/train_classifier.py`` and
``scripts/train_digits_diffusion.py``)::

    classifier/          orbax pytree {"params": ...} of mapreps_jax.app.classifier.DigitClassifier
    classifier.json      architecture, held-out accuracy, training settings
    diffusion/           tree/ (orbax pytree {"params": EMA params of the ADM UNet}) + info.json (step, EMA decay)
    train_state/         the training state (resumes scripts/train_digits_diffusion.py)
    config.json          ADM config, diffusion schedule (``schedule`` kind, ``T``, ``schedule_params``: the
                         keyword arguments of ``make_schedule``), training hyper-parameters of the diffusion prior
    checksums.json       SHA-256 and size of every file under classifier/, diffusion/ and train_state/
    train_log.csv        step, loss (EMA of the training MSE), learning rate, wall time

**Integrity.** :func:`restore_pytree` checks every file of a checkpoint folder against ``checksums.json`` next to
it (when the manifest lists that folder) *before* orbax reads anything: a flipped byte, a truncated, missing or
extra file is one ``ValueError`` naming the file and what was expected. :func:`save_pytree` refreshes the
manifest's entries of the folder it writes when a manifest exists, and :func:`write_manifest` records one.
:func:`~mapreps_jax.app.pretrained.load_default_prior` also checks the restored parameter tree against the ADM config (a reshaped or missing
tensor is named).

Every directory is written to a temporary sibling first and then swapped in with one ``rename`` (an atomic
exchange on Linux), so a reader never sees a half-written checkpoint. Output sets of the command line
(:func:`write_output_set`) are written the same way. Loading needs neither the training code nor a GPU: arrays
are restored as NumPy arrays and turned into ``jax.Array`` on use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import uuid
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from .integrity import files_under, sha256_file, verify_file_records

__all__ = [
    "ENV_CHECKPOINTS",
    "checkpoints_root",
    "default_checkpoint_dir",
    "bundle_dir",
    "MANIFEST_NAME",
    "write_manifest",
    "verify_checkpoint_files",
    "schedule_metadata",
    "schedule_from_metadata",
    "check_param_tree",
    "check_output_dir",
    "check_output_file",
    "write_output_set",
    "save_pytree",
    "restore_pytree",
    "replace_dir_atomic",
    "write_text_atomic",
    "write_bytes_atomic",
]


ENV_CHECKPOINTS = "MAPREPS_CHECKPOINTS"


def checkpoints_root() -> str:
    """The checkpoint root: ``$MAPREPS_CHECKPOINTS`` when set, else ``<repository>/checkpoints`` (absolute; may
    not exist). It holds ``default/`` (the bundled models) and converted model folders (see module doc)."""
    env = os.environ.get(ENV_CHECKPOINTS)
    if env:
        return os.path.abspath(env)
    return os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "checkpoints"))


def default_checkpoint_dir() -> str:
    """``<checkpoint root>/default``, the bundled digits prior and classifier (absolute path; may not exist)."""
    return os.path.join(checkpoints_root(), "default")


def bundle_dir(path: Optional[str] = None) -> str:
    """The bundled-checkpoint folder to read: ``path`` when given, else :func:`default_checkpoint_dir`, checked to
    exist (``FileNotFoundError`` saying which setting is wrong)."""
    if path is not None:
        path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint folder not found: {path}")
        return path
    env = os.environ.get(ENV_CHECKPOINTS)
    root = checkpoints_root()
    bundle = os.path.join(root, "default")
    if env and not os.path.isdir(root):
        raise FileNotFoundError(f"{ENV_CHECKPOINTS}={env!r}: no such folder (it must name the checkpoint root, "
                                f"the folder that holds default/ and the converted models; unset it to use the "
                                f"bundled checkpoints)")
    if not os.path.isdir(bundle):
        if env and os.path.isfile(os.path.join(root, "config.json")):
            fix = (f"set it to {os.path.dirname(root)!r}" if os.path.basename(root) == "default" else
                   f"rename the bundle to default/ and set it to {os.path.dirname(root)!r}")
            raise FileNotFoundError(f"{ENV_CHECKPOINTS}={env!r} names a checkpoint bundle itself; it must name the "
                                    f"checkpoint root that holds the bundle as default/ ({fix})")
        where = f" ({ENV_CHECKPOINTS}={env!r})" if env else ""
        raise FileNotFoundError(f"bundled checkpoint not found: {bundle}{where}; expected default/ with "
                                f"config.json, diffusion/ and classifier/ (git checkout -- checkpoints/default)")
    return bundle


# --------------------------------------------------------------------------------------------- atomic file system


def _renameat2_exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False when unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def replace_dir_atomic(src: str, dst: str) -> None:
    """Move directory ``src`` to ``dst``, replacing an existing ``dst`` (atomic exchange where the OS allows it;
    otherwise ``dst`` is moved aside and ``src`` renamed in, a window in which ``dst`` is briefly absent but never
    partial). ``src`` and ``dst`` must be on the same file system."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if not os.path.isdir(src):
        raise ValueError(f"src: expected an existing directory, got {src!r}")
    if not os.path.exists(dst):
        os.rename(src, dst)
        return
    if _renameat2_exchange(src, dst):  # now src holds the old contents
        shutil.rmtree(src)
        return
    old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, then ``os.replace``
    (a failure leaves no partial file and removes the temporary one). The file gets the mode a plain ``open`` would
    give it (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``."""
    import tempfile

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _tmp_sibling(path: str, stale_seconds: float = 3600.0) -> str:
    """A fresh temporary sibling name ``.<name>.tmp-<random>``; leftovers of a writer killed mid-save (older than
    ``stale_seconds``) are removed."""
    import glob
    import time

    path = os.path.abspath(path.rstrip("/"))
    prefix = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-")
    for old in glob.glob(glob.escape(prefix) + "*"):
        try:
            if time.time() - os.path.getmtime(old) > stale_seconds:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return prefix + uuid.uuid4().hex[:8]


def save_pytree(path: str, tree: Any, extra_files: Optional[dict] = None) -> None:
    """Save a pytree of arrays with orbax into directory ``path`` atomically (replacing an existing one).

    The orbax checkpoint goes to ``path/tree``; ``extra_files`` (name -> text) are written next to it, inside the
    same atomic unit. When the parent folder holds a ``checksums.json`` manifest, its entries for ``path`` are
    refreshed (see :func:`write_manifest`).
    """
    import orbax.checkpoint as ocp

    tmp = _tmp_sibling(path)
    os.makedirs(tmp)
    try:
        tree = _to_numpy(tree)
        ocp.PyTreeCheckpointer().save(os.path.join(tmp, "tree"), tree)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        replace_dir_atomic(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    root = os.path.dirname(os.path.abspath(path.rstrip("/")))
    if os.path.isfile(os.path.join(root, MANIFEST_NAME)):
        write_manifest(root, [os.path.basename(os.path.abspath(path.rstrip("/")))])


def _to_numpy(tree):
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a), tree)


def restore_pytree(path: str, verify: bool = True) -> Any:
    """Restore a pytree saved by :func:`save_pytree` (arrays as NumPy arrays, no sharding information needed).

    With ``verify`` (default) the folder's files are first checked against the ``checksums.json`` manifest of its
    parent folder when that manifest lists them (:func:`verify_checkpoint_files`). A damaged checkpoint is a
    ``ValueError`` naming the file, never an orbax traceback.
    """
    import jax
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    d = os.path.join(path, "tree")
    if not os.path.isdir(d):
        raise FileNotFoundError(f"path: no orbax checkpoint at {d!r}")
    if verify:
        verify_checkpoint_files(path)
    try:
        ck = ocp.PyTreeCheckpointer()
        meta = ck.metadata(d)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ck.restore(d, restore_args=restore_args)
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
        _silence_closed_loop_callbacks()
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ValueError(f"{d}: cannot restore the checkpoint (corrupt or incomplete files; no checksum manifest "
                         f"lists them): {type(e).__name__}: {first}") from e


_HOOK_INSTALLED = False


def _silence_closed_loop_callbacks() -> None:
    """After a failed orbax restore, tensorstore's pending reads complete on threads and try to wake orbax's
    already-closed asyncio loop: each prints an "Exception ignored ... RuntimeError: Event loop is closed"
    traceback (about 30 for a truncated file). Install, once, an ``sys.unraisablehook`` that drops exactly those
    and passes everything else to the previous hook."""
    import sys

    global _HOOK_INSTALLED
    if _HOOK_INSTALLED:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _HOOK_INSTALLED = True


def read_json(path: str) -> dict:
    """A JSON file as a dict; a missing or malformed file is an error naming it."""
    try:
        with open(path) as f:
            out = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


# --------------------------------------------------------------------------------------------- checksum manifest

MANIFEST_NAME = "checksums.json"
MANIFEST_FORMAT = "mapreps-checksums"
MANIFEST_VERSION = 1
_MANIFEST_DIRS = ("classifier", "diffusion", "train_state")


def _read_manifest(root: str) -> Optional[dict]:
    mp = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(mp):
        return None
    m = read_json(mp)
    if m.get("format") != MANIFEST_FORMAT or m.get("version") != MANIFEST_VERSION or not isinstance(
            m.get("files"), dict):
        raise ValueError(f"{mp}: expected a {MANIFEST_FORMAT!r} version {MANIFEST_VERSION} manifest with a 'files' "
                         f"object, got format {m.get('format')!r} version {m.get('version')!r}")
    return m


def write_manifest(root: str, subdirs=None) -> dict:
    """Record SHA-256 and size of every file under ``root/<subdir>`` in ``root/checksums.json`` (atomically).

    ``subdirs`` (default: those of ``classifier``, ``diffusion``, ``train_state`` that exist) are re-recorded;
    the entries of other folders already in the manifest are kept. Returns the manifest.
    """
    root = os.path.abspath(os.fspath(root))
    old = _read_manifest(root)
    files = dict(old["files"]) if old else {}
    subdirs = [d for d in _MANIFEST_DIRS if os.path.isdir(os.path.join(root, d))] if subdirs is None else subdirs
    for sub in subdirs:
        files = {k: v for k, v in files.items() if not k.startswith(sub + "/")}
        for rel in files_under(root, sub):
            full = os.path.join(root, rel)
            files[rel] = {"sha256": sha256_file(full), "size": os.path.getsize(full)}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "algorithm": "sha256",
                "files": dict(sorted(files.items()))}
    write_text_atomic(os.path.join(root, MANIFEST_NAME), json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify_checkpoint_files(path: str) -> bool:
    """Check every file of checkpoint folder ``path`` against the ``checksums.json`` of its parent folder.

    Returns False (nothing checked) when there is no manifest or it lists nothing under ``path``; True when every
    recorded file is present with its size and SHA-256 and no other file exists under ``path``. Otherwise raises
    ``ValueError`` naming the first bad file and what was expected (sizes are compared before hashing, so a
    truncated file is reported as such).
    """
    path = os.path.abspath(os.fspath(path)).rstrip(os.sep)
    root, sub = os.path.dirname(path), os.path.basename(path)
    manifest = _read_manifest(root)
    if manifest is None:
        return False
    want = {k: v for k, v in manifest["files"].items() if k.startswith(sub + "/")}
    if not want:
        return False
    mp = os.path.join(root, MANIFEST_NAME)
    hint = (f"the checkpoint is damaged or was modified: restore the original files (the bundled one: git checkout "
            f"-- checkpoints/default) or, if you changed it on purpose, re-record the manifest with "
            f"mapreps_jax.checkpoint_io.write_manifest({root!r})")
    verify_file_records(root, sub, want, mp, hint)
    return True


# --------------------------------------------------------------------------------------------- schedule metadata


def schedule_metadata(kind: str = "linear", T: int = 1000, **params) -> dict:
    """The JSON record of a diffusion schedule, ``{"kind", "T", "params"}`` (``params``: the keyword arguments of
    :func:`~mapreps_jax.diffusion.make_schedule`, e.g. ``beta_start`` / ``beta_end``), validated by building it."""
    from .diffusion import make_schedule

    make_schedule(kind, T=int(T), **params)
    return {"kind": str(kind), "T": int(T), "params": {k: float(v) for k, v in params.items()}}


def schedule_from_metadata(meta: Optional[dict], where: str = "checkpoint metadata"):
    """``(Schedule, record)`` from checkpoint metadata. Accepts ``meta["schedule"]`` as a record
    ``{"kind", "T", "params"}`` or as a kind string (with ``meta["T"]`` and ``meta["schedule_params"]``); metadata
    without a schedule (older checkpoints) gets the linear 1000-step schedule, as before."""
    from .diffusion import make_schedule

    meta = meta or {}
    sch = meta.get("schedule", "linear")
    if isinstance(sch, str):
        kind, T, params = sch, meta.get("T", 1000), meta.get("schedule_params") or {}
    elif isinstance(sch, dict):
        kind, T, params = sch.get("kind"), sch.get("T", meta.get("T", 1000)), sch.get("params") or {}
    else:
        raise ValueError(f"{where}: schedule must be a kind name or a {{kind, T, params}} record, got {sch!r}")
    if not isinstance(params, dict):
        raise ValueError(f"{where}: schedule parameters must be a JSON object, got {params!r}")
    if isinstance(T, float) and T.is_integer():
        T = int(T)
    try:
        record = schedule_metadata(kind, T, **params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid diffusion schedule {sch!r} (T={T!r}, params={params!r}): {e}") from e
    return make_schedule(record["kind"], T=record["T"], **record["params"]), record


# --------------------------------------------------------------------------------------------- output sets


def _nearest_existing(path: str) -> str:
    p = path
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _check_parent_writable(path: str, what: str) -> None:
    anc = _nearest_existing(os.path.dirname(path))
    if not os.path.isdir(anc):
        raise ValueError(f"{what}: cannot create {path}: {anc} exists and is not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write {path}: folder {anc} is not writable")
    try:  # the real test (read-only file systems, ACLs): create and remove a temporary entry
        import tempfile

        probe = tempfile.mkdtemp(dir=anc, prefix=".mapreps-probe-")
        os.rmdir(probe)
    except OSError as e:
        raise ValueError(f"{what}: cannot write {path}: folder {anc} is not writable ({e.strerror or e})") from None


def check_output_dir(path: str, overwrite: bool = False, is_ours: Optional[Callable[[str], bool]] = None,
                     what: str = "--out") -> str:
    """Check, before any computation, that folder ``path`` can receive an output set (:func:`write_output_set`).

    ``path`` must be absent, an empty folder, or (with ``overwrite``) a folder whose entries are all plain files
    accepted by ``is_ours(name)`` (the files a previous run wrote: anything else is never deleted). Its nearest
    existing ancestor must be a writable folder. Returns the absolute path. Raises ``ValueError`` saying which.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{what}: expected an output folder, got an existing file {path}")
        path = os.path.realpath(path)
        entries = sorted(os.listdir(path))
        if entries and not overwrite:
            raise ValueError(f"{what}: {path} exists and is not empty ({len(entries)} entries, e.g. {entries[0]}); "
                             f"pass --overwrite to replace a previous output there, or choose a new folder")
        if entries:
            foreign = [e for e in entries
                       if not os.path.isfile(os.path.join(path, e)) or os.path.islink(os.path.join(path, e))
                       or (is_ours is not None and not is_ours(e))]
            if foreign:
                raise ValueError(f"{what}: --overwrite replaces only a previous output of this command, but {path} "
                                 f"also holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}; "
                                 f"choose another folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{what}: folder {path} is not writable")
    _check_parent_writable(path, what)
    return path


def check_output_file(path: str, what: str = "--out") -> str:
    """Check, before any computation, that file ``path`` can be written by :func:`write_text_atomic` (not a folder;
    its folder exists or can be created, and is writable: the file is replaced by a rename there)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{what}: expected a file name, got the folder {path}")
    _check_parent_writable(path, what)
    return path


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_output_set(path: str, files: Dict[str, bytes], overwrite: bool = False,
                     is_ours: Optional[Callable[[str], bool]] = None, what: str = "--out") -> str:
    """Write ``files`` (name -> bytes) as the whole content of folder ``path``, as a unit.

    The files go into a temporary sibling folder, which is then renamed into place (replacing an empty folder, or
    with ``overwrite`` a previous output, see :func:`check_output_dir`, in one atomic exchange where the OS allows
    it). A failure part-way (disk full, ...) leaves ``path`` as it was and no temporary folder. File and folder
    modes follow the umask. Returns the absolute path.
    """
    path = check_output_dir(path, overwrite=overwrite, is_ours=is_ours, what=what)
    for name in files:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"write_output_set: bad file name {name!r}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_sibling(path)
    os.makedirs(tmp)
    try:
        for name, data in files.items():
            _write_file(os.path.join(tmp, name), data)
        replace_dir_atomic(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------- parameter trees


def _tree_shapes(tree) -> Dict[str, Tuple[int, ...]]:
    import jax

    out = {}
    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p)] = tuple(np.shape(v))
    return out


def check_param_tree(params, expected, where: str) -> None:
    """``ValueError`` naming every missing, unexpected or mis-shaped tensor of ``params`` against ``expected``
    (a tree of arrays or ``ShapeDtypeStruct``)."""
    got, want = _tree_shapes(params), _tree_shapes(expected)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    bad = sorted(f"{k} (expected {want[k]}, got {got[k]})" for k in set(want) & set(got) if want[k] != got[k])
    problems = [f"{label}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''} ({len(v)} in all)"
                for label, v in (("missing tensors", missing), ("unexpected tensors", extra),
                                 ("mis-shaped tensors", bad)) if v]
    if problems:
        raise ValueError(f"{where}: parameters do not match the architecture ({len(want)} tensors expected, "
                         f"{len(got)} found): " + "; ".join(problems))
