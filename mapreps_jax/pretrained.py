"""Bundled checkpoints (``checkpoints/default/``) and atomic orbax I/O.

Layout of ``checkpoints/default/`` (written by ``scripts/train_classifier.py`` and
``scripts/train_digits_diffusion.py``)::

    classifier/          orbax pytree {"params": ...} of mapreps_jax.networks.classifier.DigitClassifier
    classifier.json      architecture, held-out accuracy, training settings
    diffusion/           ema/ (orbax pytree {"params": EMA params of the ADM UNet}) + info.json (step, EMA decay)
    config.json          ADM config, schedule, training hyper-parameters of the diffusion prior
    train_log.csv        step, loss (EMA of the training MSE), learning rate, wall time

Every directory is written to a temporary sibling first and then swapped in with one ``rename`` (an atomic
exchange on Linux), so a reader never sees a half-written checkpoint. Loading needs neither the training code nor
a GPU: arrays are restored as NumPy arrays and turned into ``jax.Array`` on use.

The checkpoint root is ``$MAPREPS_CHECKPOINTS`` when set, else ``<repository>/checkpoints/default``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import uuid
from typing import Any, Optional

import numpy as np

__all__ = [
    "default_checkpoint_dir",
    "save_pytree",
    "restore_pytree",
    "replace_dir_atomic",
    "write_text_atomic",
    "write_bytes_atomic",
    "load_classifier",
    "load_default_prior",
    "load_default_prior_config",
]


def default_checkpoint_dir() -> str:
    """``$MAPREPS_CHECKPOINTS`` or ``<repo>/checkpoints/default`` (absolute path; may not exist)."""
    env = os.environ.get("MAPREPS_CHECKPOINTS")
    if env:
        return os.path.abspath(env)
    return os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "checkpoints", "default"))


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
    same atomic unit.
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


def _to_numpy(tree):
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a), tree)


def restore_pytree(path: str) -> Any:
    """Restore a pytree saved by :func:`save_pytree` (arrays as NumPy arrays, no sharding information needed)."""
    import jax
    import orbax.checkpoint as ocp

    d = os.path.join(os.path.abspath(path), "tree")
    if not os.path.isdir(d):
        raise FileNotFoundError(f"path: no orbax checkpoint at {d!r}")
    ck = ocp.PyTreeCheckpointer()
    meta = ck.metadata(d)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ck.restore(d, restore_args=restore_args)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------- bundled models


def load_classifier(path: Optional[str] = None):
    """Parameters of the bundled digit classifier (``<checkpoints>/classifier``), a pytree of NumPy arrays for
    :func:`mapreps_jax.networks.classifier.logits` / ``features``."""
    path = path or os.path.join(default_checkpoint_dir(), "classifier")
    tree = restore_pytree(path)
    if "params" not in tree:
        raise ValueError(f"classifier checkpoint at {path!r}: expected key 'params', got {sorted(tree)}")
    return tree["params"]


def load_default_prior_config(path: Optional[str] = None) -> dict:
    """``config.json`` of the bundled diffusion prior (``adm`` config dict, ``schedule``, training settings)."""
    root = path or default_checkpoint_dir()
    return read_json(os.path.join(root, "config.json"))


def load_default_prior(path: Optional[str] = None, name: str = "digits-adm"):
    """The bundled digits prior as a :class:`~mapreps_jax.model.ScoreModel` (EMA weights, epsilon prediction,
    linear 1000-step schedule): images ``[B, 32, 32, 1]`` in ``[-1, 1]``.

    Args:
      path: checkpoint root holding ``config.json`` and ``diffusion/`` (default :func:`default_checkpoint_dir`).
    """
    from .diffusion import make_schedule
    from .networks.adm import ADMConfig, adm_score_model

    root = path or default_checkpoint_dir()
    cfg = load_default_prior_config(root)
    config = ADMConfig.from_dict(cfg["adm"])
    tree = restore_pytree(os.path.join(root, "diffusion"))
    params = jax_tree_to_jnp(tree["params"])
    schedule = make_schedule(cfg.get("schedule", "linear"), T=int(cfg.get("T", 1000)))
    return adm_score_model(config, params, schedule, name=name)


def jax_tree_to_jnp(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(jnp.asarray, tree)
