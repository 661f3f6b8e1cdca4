"""Strict conversion of guided-diffusion (PyTorch) state dicts to :class:`~mapreps_jax.networks.adm.ADMUNet` params,
and orbax save/load of converted checkpoints.

Key mapping (the Flax module names are the PyTorch module paths with ``.`` -> ``_``)::

    input_blocks.{i}.{j}.<sub>.{k}.weight  ->  params["input_blocks_{i}_{j}"]["<sub>_{k}"]["kernel" | "scale"]
    middle_block.{j}.norm.bias             ->  params["middle_block_{j}"]["norm"]["bias"]
    time_embed.{k}.weight                  ->  params["time_embed_{k}"]["kernel"]
    out.{k}.weight                         ->  params["out_{k}"]["kernel" | "scale"]

Tensor layouts: conv ``[O, I, kh, kw] -> [kh, kw, I, O]``; linear ``[O, I] -> [I, O]``; attention ``qkv`` /
``proj_out`` (1x1 ``Conv1d``) ``[O, I, 1] -> [I, O]``; GroupNorm weight/bias unchanged (``weight -> scale``).

Strictness: the expected key/shape set is derived from the Flax model itself (``jax.eval_shape`` of its init), so a
missing, unexpected or mis-shaped key is a ``ValueError`` naming it.

A converted checkpoint is a directory::

    <dst>/meta.json    {"format": "mapreps-adm", "version": 1, "config": {...}, "source_sha256": ..., "source_name": ...,
                        "params_sha256": ..., "num_params": ..., "num_tensors": ...,
                        "schedule": {"kind": "linear", "T": 1000, "params": {}},
                        "files": {"params/<file>": {"sha256": ..., "size": ...}, ...}}
    <dst>/params/      orbax-checkpoint (StandardCheckpointer) of the float32 Flax params

written to a temporary sibling directory and renamed into place (no partial output), with the modes a plain
``mkdir`` / ``open`` would give (the umask), not ``mkdtemp``'s private ``0700``. ``schedule`` (the diffusion
schedule the network was trained with, :func:`mapreps_jax.checkpoint_io.schedule_metadata`) and ``files`` (SHA-256
and size of every file under ``params/``) were added within version 1: :func:`load_converted` reads older
metadata without them (linear schedule; no per-file check). The per-file check runs before orbax reads anything,
so a truncated or altered file is one ``ValueError`` naming it; the params checksum is checked after restoring.

``overwrite`` (``--overwrite``) replaces only an empty folder or a converted checkpoint (a ``meta.json`` of this
format): any other existing folder is refused, never deleted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from typing import Dict, Mapping, Optional, Tuple

import jax
import numpy as np

from ..integrity import file_records, sha256_file, verify_file_records
from .adm import ADMConfig, param_shapes
from .layouts import from_torch, layout_of, path_names, to_torch_state_dict, torch_shape

__all__ = [
    "convert_adm_state_dict",
    "flax_to_torch_state_dict",
    "expected_torch_shapes",
    "torch_key_for",
    "read_manifest",
    "manifest_path",
    "save_converted",
    "load_converted",
    "convert_command",
    "sha256_file",
    "params_sha256",
    "check_replaceable",
    "PRESETS",
]

FORMAT = "mapreps-adm"
FORMAT_VERSION = 1
CONVERTED_FORMATS = (FORMAT, "mapreps-latent")  # folders that --overwrite may replace

PRESETS = {"ffhq256": ADMConfig.ffhq256, "imagenet256": ADMConfig.imagenet256}

_TOP = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)$|^(middle_block|time_embed|out)_(\d+)$")
_SUB = re.compile(r"^(in_layers|out_layers|emb_layers)_(\d+)$")
_CONV1D = ("qkv", "proj_out")


def torch_key_for(flax_path: Tuple[str, ...]) -> str:
    """The guided-diffusion state-dict key of a Flax param path, e.g.
    ``("input_blocks_1_0", "in_layers_2", "kernel") -> "input_blocks.1.0.in_layers.2.weight"``."""
    top, *mid, leaf = flax_path
    m = _TOP.match(top)
    if m is None:
        raise ValueError(f"unexpected top-level Flax module name {top!r}")
    parts = [m.group(1), m.group(2), m.group(3)] if m.group(1) else [m.group(4), m.group(5)]
    for s in mid:
        ms = _SUB.match(s)
        parts += [ms.group(1), ms.group(2)] if ms else [s]
    parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf])
    return ".".join(parts)


def _kind(flax_path, ndim: int) -> str:
    """'conv' (4-D kernel), 'conv1d' (attention qkv/proj_out Dense kernel), 'linear' or 'vector'."""
    if flax_path[-1] == "kernel":
        if ndim == 4:
            return "conv"
        return "conv1d" if len(flax_path) >= 2 and flax_path[-2] in _CONV1D else "linear"
    return "vector"


def _layout(config: ADMConfig):
    """``((flax_path, torch_key, kind, flax_shape), ...)`` for every parameter of the model (no computation)."""
    return layout_of(param_shapes(config), torch_key_for, _kind)


def expected_torch_shapes(config: ADMConfig) -> Dict[str, Tuple[int, ...]]:
    """``{torch key: torch shape}`` of a guided-diffusion state dict for ``config`` (derived from the Flax model)."""
    return {key: torch_shape(kind, shp) for _, key, kind, shp in _layout(config)}


def convert_adm_state_dict(sd: Mapping[str, np.ndarray], config: ADMConfig):
    """Flax params (nested dict of float32 ``np.ndarray``) from a guided-diffusion state dict, strictly.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped key (and non-floating tensors).
    """
    if not isinstance(config, ADMConfig):
        raise TypeError(f"convert_adm_state_dict: config must be an ADMConfig, got {type(config).__name__}")
    return from_torch(sd, _layout(config), "the ADM config")


def flax_to_torch_state_dict(params, config: ADMConfig) -> Dict[str, np.ndarray]:
    """The inverse of :func:`convert_adm_state_dict`: guided-diffusion-layout numpy state dict from Flax params."""
    return to_torch_state_dict(params, _layout(config), "flax_to_torch_state_dict")


# ---------------------------------------------------------------------------------------------------------------
# manifests

_MANIFEST_DIR = os.path.join(os.path.dirname(__file__), "manifests")


def manifest_path(name: str) -> str:
    """Path of a committed manifest (``"ffhq256"`` / ``"imagenet256"``) or ``name`` itself if it is a file."""
    if os.path.isfile(name):
        return name
    p = os.path.join(_MANIFEST_DIR, f"adm_{name}.txt")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no ADM manifest {name!r} (looked for {p})")
    return p


def read_manifest(name: str) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` from a manifest file (lines ``key dim,dim,...``; ``#`` comments)."""
    out = {}
    with open(manifest_path(name)) as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{name}:{ln}: expected 'key shape', got {line!r}")
            out[parts[0]] = tuple(int(d) for d in parts[1].split(",") if d)
    return out


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def params_sha256(params) -> str:
    """SHA-256 over every leaf (path, dtype, shape, little-endian bytes), in path order."""
    h = hashlib.sha256()
    leaves = sorted(((path_names(p), v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]),
                    key=lambda kv: kv[0])
    for path, v in leaves:
        a = np.ascontiguousarray(np.asarray(v))
        h.update("/".join(path).encode())
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _is_converted_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") in CONVERTED_FORMATS


def check_replaceable(dst, overwrite: bool) -> str:
    """Raise unless ``dst`` may be written: absent, or with ``overwrite`` an empty folder or a converted checkpoint
    (``FileExistsError`` without ``overwrite``; ``ValueError`` for anything else). Returns the absolute path."""
    dst = os.path.abspath(os.fspath(dst))
    if not os.path.lexists(dst):
        return dst
    if not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace a converted checkpoint)")
    if not os.path.isdir(dst) or os.path.islink(dst):
        raise ValueError(f"--dst: {dst} exists and is not a folder; --overwrite replaces only a converted checkpoint "
                         f"folder (or an empty one)")
    if os.listdir(dst) and not _is_converted_dir(dst):
        raise ValueError(f"--dst: {dst} is not a converted checkpoint (no meta.json of format "
                         f"{' or '.join(map(repr, CONVERTED_FORMATS))}) and not empty; "
                         f"--overwrite refuses to delete it: choose another --dst")
    return dst


def _verify_files(path: str, records: Dict[str, dict]) -> None:
    """Every recorded file present with its size and SHA-256, and no other file under ``params/``."""
    if not isinstance(records, dict):
        raise ValueError(f"{path}: meta.json 'files' must be an object, got {type(records).__name__}")
    verify_file_records(path, "params", records, "meta.json", "corrupt checkpoint: convert it again")


def _chmod_tree_umask(root: str) -> None:
    """Give ``root`` and everything under it the modes of a plain ``mkdir`` / ``open`` (0o777 / 0o666 less the
    umask): ``mkdtemp`` makes 0700 folders and some writers 0600 files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for r, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(r, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(r, f), 0o666 & ~umask)


def save_converted(dst, params, config: ADMConfig, source_sha256: Optional[str] = None,
                   source_name: Optional[str] = None, overwrite: bool = False, schedule: Optional[dict] = None) -> str:
    """Save converted params with orbax and ``meta.json`` (config, diffusion schedule, source SHA-256, params
    SHA-256, per-file SHA-256) under ``dst``.

    Written to a temporary sibling directory, then renamed into place. ``schedule`` is a record of
    :func:`mapreps_jax.checkpoint_io.schedule_metadata` (default: linear, 1000 steps, the ADM models' schedule).
    ``overwrite`` replaces only an empty folder or a converted checkpoint. Returns the absolute ``dst``.
    """
    from ..checkpoint_io import schedule_metadata

    dst = check_replaceable(dst, overwrite)
    if schedule is None:
        schedule = schedule_metadata()
    elif not isinstance(schedule, dict) or "kind" not in schedule:
        raise ValueError(f"save_converted: schedule must be a schedule_metadata() record, got {schedule!r}")
    else:
        schedule = schedule_metadata(schedule["kind"], schedule.get("T", 1000), **(schedule.get("params") or {}))
    if source_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", source_sha256):
        raise ValueError(f"save_converted: source_sha256 must be 64 lowercase hex digits, got {source_sha256!r}")
    expected = param_shapes(config)
    got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), params)
    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), expected)
    if got != want:
        raise ValueError("save_converted: params do not match the config's parameter tree")
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": config.to_dict(),
        "source_sha256": source_sha256,
        "source_name": source_name,
        "schedule": schedule,
    }
    return write_checkpoint(dst, params, meta, overwrite)


def write_checkpoint(dst, params, meta: dict, overwrite: bool = False) -> str:
    """Write ``params`` (orbax, float32) and ``meta.json`` (``meta`` plus ``params_sha256``, ``num_params``,
    ``num_tensors`` and per-file ``files`` records) as the folder ``dst``: built in a temporary sibling folder and
    renamed into place (no partial output). Shared by every converted-checkpoint format. Returns ``dst``."""
    dst = check_replaceable(dst, overwrite)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    meta = dict(meta, params_sha256=params_sha256(params),
                num_params=int(sum(a.size for a in jax.tree_util.tree_leaves(params))),
                num_tensors=len(jax.tree_util.tree_leaves(params)))
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
    try:
        ocp = _ocp()
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "params"), params)
        ckptr.wait_until_finished()
        ckptr.close()
        meta["files"] = file_records(tmp, "params")
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        _chmod_tree_umask(tmp)
        if os.path.lexists(dst):
            check_replaceable(dst, overwrite)  # the folder may have changed while converting
            old = dst + ".old-" + os.path.basename(tmp)
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_meta(path, fmt: str = FORMAT, version: int = FORMAT_VERSION, required=("config", "params_sha256")) -> dict:
    """The ``meta.json`` of a converted-checkpoint folder of format ``fmt``: well-formed JSON, the format and version
    this library reads, and the ``required`` fields (a ``ValueError`` saying which, otherwise)."""
    mp = os.path.join(path, "meta.json")
    if not os.path.isfile(mp):
        raise ValueError(f"{path}: not a converted {fmt!r} checkpoint (no meta.json)")
    try:
        with open(mp) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt meta.json ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ValueError(f"{path}: meta.json is not a {fmt!r} checkpoint description")
    if meta.get("version") != version:
        raise ValueError(f"{path}: checkpoint format version {meta.get('version')!r}, this library reads "
                         f"{version}")
    for k in required:
        if k not in meta:
            raise ValueError(f"{path}: meta.json lacks {k!r}")
    return meta


def load_converted(path, expected_config: Optional[ADMConfig] = None,
                   expected_source_sha256: Optional[str] = None, verify: bool = True):
    """Load a checkpoint written by :func:`save_converted`: ``(params, config, meta)``.

    Checks: ``meta.json`` is well formed; the recorded config equals ``expected_config`` in every architectural
    field (``dtype``/``remat`` of ``expected_config`` are applied to the returned config); the recorded source
    SHA-256 equals ``expected_source_sha256`` when given; the restored params have the config's shapes and (with
    ``verify``) hash to the recorded ``params_sha256``; with ``verify``, before orbax reads anything, every file
    under ``params/`` matches the size and SHA-256 recorded in ``meta["files"]`` (when recorded). Any failure is a
    ``ValueError`` saying which. ``meta["schedule"]`` is the recorded diffusion schedule (absent in older
    checkpoints: read it with :func:`mapreps_jax.checkpoint_io.schedule_from_metadata`, which defaults to linear).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"converted checkpoint not found: {path}")
    meta = read_meta(path)
    try:
        config = ADMConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid config in meta.json ({e})") from e
    if expected_config is not None:
        a, b = config.architecture_dict(), expected_config.architecture_dict()
        diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        if diff:
            msg = ", ".join(f"{k}: checkpoint {v[0]!r} != expected {v[1]!r}" for k, v in diff.items())
            raise ValueError(f"{path}: checkpoint config does not match the expected config ({msg})")
        config = expected_config
    if expected_source_sha256 is not None and meta.get("source_sha256") != expected_source_sha256:
        raise ValueError(f"{path}: converted from a source with SHA-256 {meta.get('source_sha256')!r}, expected "
                         f"{expected_source_sha256!r}")
    return restore_checkpoint(path, param_shapes(config), meta, verify), config, meta


def restore_checkpoint(path, abstract, meta: dict, verify: bool = True):
    """The params of a folder written by :func:`write_checkpoint`, restored against ``abstract`` (the expected tree
    of ``jax.ShapeDtypeStruct``): with ``verify``, every file's size and SHA-256 first, the params checksum after.
    Any failure is a ``ValueError`` saying which."""
    if verify and "files" in meta:
        _verify_files(path, meta["files"])
    ocp = _ocp()
    try:
        ckptr = ocp.StandardCheckpointer()
        params = ckptr.restore(os.path.join(path, "params"), abstract)
        ckptr.close()
    except Exception as e:  # orbax raises a variety of errors for damaged / mismatched files
        raise ValueError(f"{path}: cannot restore params (corrupt or mismatched checkpoint): "
                         f"{type(e).__name__}: {e}") from e
    got = jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), params)
    want = jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), abstract)
    if got != want:
        raise ValueError(f"{path}: restored params do not match the config's parameter tree (expected "
                         f"{len(jax.tree_util.tree_leaves(want))} tensors)")
    if verify:
        h = params_sha256(params)
        if h != meta["params_sha256"]:
            raise ValueError(f"{path}: params checksum mismatch (corrupt checkpoint): recorded "
                             f"{meta['params_sha256']}, computed {h}")
    return params


# ---------------------------------------------------------------------------------------------------------------
# command line


def _parser():
    p = argparse.ArgumentParser(prog="mapreps convert adm",
                                description="Convert a guided-diffusion (ADM) PyTorch checkpoint to a mapreps-jax "
                                            "(orbax) checkpoint, without torch.")
    p.add_argument("--config", required=True,
                   help=f"architecture preset ({', '.join(PRESETS)}) or a JSON file of ADMConfig fields")
    p.add_argument("--src", required=True, help="source .pt/.pth/.ckpt (torch.save zip) or .safetensors file")
    p.add_argument("--dst", default=None, help="output directory (default: checkpoints/adm-<config>)")
    p.add_argument("--expected-sha256", default=None, help="refuse a source file with another SHA-256")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --dst that is a converted checkpoint (or an empty folder)")
    p.add_argument("--schedule", default="linear",
                   help="diffusion schedule the network was trained with, recorded in meta.json (make_schedule "
                        "kind: linear, scaled_linear, ldm_linear; default linear, the ADM models')")
    p.add_argument("--T", type=int, default=1000, help="number of diffusion steps of that schedule (default 1000)")
    return p


def _config_from_arg(s: str) -> Tuple[ADMConfig, str]:
    if s in PRESETS:
        return PRESETS[s](), s
    if os.path.isfile(s):
        with open(s) as f:
            return ADMConfig.from_dict(json.load(f)), os.path.splitext(os.path.basename(s))[0]
    raise ValueError(f"--config: expected one of {sorted(PRESETS)} or a JSON file, got {s!r}")


def convert_command(argv) -> int:
    """``mapreps convert adm --config ffhq256|imagenet256|FILE.json --src FILE --dst DIR`` (argv after ``convert``);
    ``convert sd --src DIR --dst OUT`` and ``convert ldm-ffhq --src model.ckpt [--ema] --dst OUT`` go to
    :func:`mapreps_jax.networks.latent.convert_latent_command`, ``convert lpips|inception ...`` to
    :func:`mapreps_jax.perceptual.convert_perceptual_command`.

    Returns the process exit status (0 on success, 2 on a usage/input error).
    """
    from .torch_pickle import load_state_dict

    argv = list(argv)
    if argv and argv[0] in ("sd", "ldm-ffhq"):
        from .latent import convert_latent_command

        return convert_latent_command(argv[0], argv[1:])
    if argv and argv[0] in ("lpips", "inception"):
        from ..perceptual import convert_perceptual_command

        return convert_perceptual_command(argv[0], argv[1:])
    if argv and argv[0] == "adm":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"mapreps convert: unknown network kind {argv[0]!r} (supported: adm, sd, ldm-ffhq, lpips, inception)",
              file=sys.stderr)
        return 2
    from ..checkpoint_io import schedule_metadata

    args = _parser().parse_args(argv)
    try:
        config, cname = _config_from_arg(args.config)
        try:
            schedule = schedule_metadata(args.schedule, args.T)
        except ValueError as e:
            raise ValueError(f"--schedule/--T: {e}") from None
        dst = args.dst or os.path.join("checkpoints", f"adm-{cname}")
        check_replaceable(dst, args.overwrite)
        if not os.path.isfile(args.src):
            raise FileNotFoundError(f"--src: file not found: {args.src}")
        print(f"[1/4] hashing {args.src} ...", flush=True)
        digest = sha256_file(args.src)
        print(f"      sha256 {digest}", flush=True)
        if args.expected_sha256 and digest != args.expected_sha256.lower():
            raise ValueError(f"--src: SHA-256 {digest} does not match --expected-sha256 {args.expected_sha256}")
        print("[2/4] reading state dict (restricted unpickler, no code executed) ...", flush=True)
        sd = load_state_dict(args.src)
        print(f"      {len(sd)} tensors", flush=True)
        print(f"[3/4] converting to Flax ({cname}) ...", flush=True)
        params = convert_adm_state_dict(sd, config)
        del sd
        print(f"[4/4] saving to {dst} ...", flush=True)
        out = save_converted(dst, params, config, source_sha256=digest, source_name=os.path.basename(args.src),
                             overwrite=args.overwrite, schedule=schedule)
        n = sum(a.size for a in jax.tree_util.tree_leaves(params))
        print(f"done: {out} ({n / 1e6:.1f}M parameters)", flush=True)
        return 0
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        print(f"mapreps convert adm: error: {e}", file=sys.stderr)
        return 2
    except RecursionError:  # the reader caps nesting; this is a last resort
        print(f"mapreps convert adm: error: {args.src}: structure nested too deeply to read (damaged or malicious "
              f"file)", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"mapreps convert adm: error: out of memory while converting {args.src} (the file declares more data "
              f"than fits in memory)", file=sys.stderr)
        return 1
