"""``mapreps restore-batch``: restore a folder of observed measurements at several ``t0`` on every device, resumably.

What it does (:func:`restore_batch`):

* **inputs**: a folder (its ``*.png``) or a glob, sorted by name; each file is an observed measurement (as
  ``mapreps restore --observed``: for the digits ``sr4`` task an 8x8 image, for a preset its operator's output
  image). Output names are the file's stem: ``<stem>_t0_<t0>.png``.
* **what runs**: MAP-RPS with the task's settings (the bundled digits prior and its task presets by default; a
  converted network with ``--preset NAME [--model DIR]``): Stage 1 once per image, then Stage 2 for every ``t0``
  (:func:`mapreps_jax.sharding.sweep_stages`), as ONE jitted program over a ``"batch"`` mesh of all devices
  (:func:`mapreps_jax.sharding.run_sharded`): compiled once, reused for every batch.
* **randomness**: ``k_run = split(PRNGKey(seed))[1]`` (as ``mapreps restore``); image ``f`` uses
  ``fold_in(k_run, crc32(name of f))``, so its output does not depend on which other files are in the folder or
  on the batch it lands in (up to the float rounding of the batched network), and a resumed run draws the same noise.
* **batches**: the sorted file list is cut into fixed batches of ``--batch-size`` slots (rounded up to a multiple
  of the device count; the last batch's empty slots compute a zero measurement and are discarded). A batch always
  holds the same files, so recomputing it gives the same bytes.
* **outputs**: each PNG is written atomically (temporary file, fsync, rename); then one ``results.jsonl`` line per
  image and ``t0`` (``file``, ``t0``, ``output``, the measurement residual ``||y - A(x_hat)||`` in [-1, 1] units,
  the batch's wall time and time per image, the process). A file that cannot be used (unreadable, wrong size or
  channel count) gets an ``{"file", "error"}`` line, is reported on stderr, does not stop the batch, and is listed
  at the end (exit status 1 when any file failed).
* **resume**: killed at any moment and run again with the same arguments, it skips every batch whose readable files
  all have their outputs and their ``results.jsonl`` lines, recomputes the others in full (same batch, same bytes),
  and writes only the lines still missing; the final PNGs are byte-identical to an uninterrupted run's. A trailing
  partial line of ``results.jsonl`` (a kill mid-write) is dropped.
* **several processes** (``--coordinator HOST:PORT --num-processes N --process-id I`` on CPU or GPU hosts;
  ``--distributed`` to read a TPU pod's or cluster's environment): every process runs the same command on a shared
  output folder; the mesh spans all their devices; each process reads only the input files of its devices' rows
  (``jax.make_array_from_callback``) and writes only those images' outputs and lines.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import json
import os
import sys
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .validation import check_t0_list

__all__ = ["BatchJob", "restore_batch", "check_t0s", "list_inputs", "digits_job", "preset_job", "image_key_data",
           "RESULTS_FILE"]

RESULTS_FILE = "results.jsonl"


@dataclasses.dataclass(frozen=True)
class BatchJob:
    """What each image goes through: the model, the operator, Stage 1 and Stage 2 settings, and how an input file
    becomes a measurement ``[*op.out_shape]`` (``read(path)``, raising ``ValueError`` for a bad file)."""

    model: Any
    op: Any
    map_config: Any
    sampler: Any
    sigma_y: float
    n_steps: Optional[int]
    read: Callable[[str], np.ndarray]
    name: str


def digits_job(task: str, *, model=None, seed: int = 0, steps: Optional[int] = 40,
               n_iter: Optional[int] = None) -> BatchJob:
    """The bundled digits prior (or ``model``) with a digits task preset (:data:`~mapreps_jax.app.digits.DEMO_TASKS`:
    ``sr4``, ``inpaint``, ``deblur``, ``denoise``); inputs are observed 32x32 (8x8 for ``sr4``) grayscale PNGs."""
    from .app.digits import DEMO_TASKS, dps_zeta, make_task, map_config, read_gray_png
    from .app.pretrained import load_default_prior
    from .samplers import DPSStep

    if task not in DEMO_TASKS:
        extra = " (inpaint_mask needs one mask per image: use mapreps restore)" if task == "inpaint_mask" else ""
        raise ValueError(f"unknown task {task!r} for restore-batch; expected one of {sorted(DEMO_TASKS)}{extra}")
    preset, op = make_task(task, seed)
    model = load_default_prior() if model is None else model
    hw = op.out_shape[:2]
    return BatchJob(model=model, op=op, map_config=map_config(preset, n_iter),
                    sampler=DPSStep(zeta=dps_zeta(preset, steps), clip=True), sigma_y=float(preset.sigma_y),
                    n_steps=steps, read=lambda path: read_gray_png(path, hw, "input (observed measurement)"),
                    name=f"digits/{task}")


def preset_job(preset, model, *, seed: int = 0, steps: Optional[int] = None, cond=None, uncond=None) -> BatchJob:
    """A preset of :mod:`mapreps_jax.presets` on a converted network; inputs are observed measurements, images of
    the operator's output shape at the preset's image size."""
    from .presets import _check_model, get_preset, read_image_png

    p = get_preset(preset)
    run_model = _check_model(p, model, cond, uncond)
    op = p.operator(tuple(p.image_shape), seed=seed)
    if len(op.out_shape) != 3:
        raise ValueError(f"restore-batch: preset {p.name!r} measures a vector of shape {op.out_shape}, not an image; "
                         f"its observed measurements cannot be read from PNG files")
    shape = op.out_shape
    return BatchJob(model=run_model, op=op, map_config=p.map_config(), sampler=p.sampler(), sigma_y=float(p.sigma_y),
                    n_steps=steps, read=lambda path: read_image_png(path, shape, "input (observed measurement)"),
                    name=f"preset/{p.name}")


def list_inputs(inputs: str) -> List[str]:
    """The input files: a folder's ``*.png`` (not recursive) or the matches of a glob pattern, sorted; ``ValueError``
    when there is none or two share a stem (their outputs would collide)."""
    if os.path.isdir(inputs):
        files = sorted(os.path.join(inputs, f) for f in os.listdir(inputs) if f.lower().endswith(".png"))
        what = f"folder {inputs!r} holds no *.png file"
    else:
        files = sorted(f for f in _glob.glob(inputs) if os.path.isfile(f))
        what = f"--inputs {inputs!r} is neither a folder nor a pattern that matches files"
    if not files:
        raise ValueError(f"restore-batch: {what}")
    stems: Dict[str, str] = {}
    for f in files:
        s = _stem(f)
        if s in stems:
            raise ValueError(f"restore-batch: {stems[s]} and {f} have the same name {s!r}; their outputs would "
                             f"collide")
        stems[s] = f
    return files


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def image_key_data(k_run, names: Sequence[str]) -> np.ndarray:
    """``[len(names), 2]`` uint32 legacy keys ``fold_in(k_run, crc32(name))``: one stream per input file name."""
    h = jnp.asarray(np.asarray([zlib.crc32(n.encode("utf-8")) for n in names], np.uint32))
    return np.asarray(jax.vmap(lambda d: jax.random.fold_in(k_run, d))(h))


def _output_name(stem: str, t0: int) -> str:
    return f"{stem}_t0_{int(t0)}.png"


def _restore_fn(keys, model, op, y, t0s, *, map_config, sampler, sigma_y, n_steps):
    """The jitted core: clipped outputs ``[n, B, ...]`` and the residual ``||y - A(x_hat)||`` ``[n, B]``."""
    from .sharding import sweep_stages

    _, outs = sweep_stages(keys, model, op, y, t0s, map_config=map_config, sampler=sampler, sigma_y=sigma_y,
                           n_steps=n_steps, clip=True)
    r = jax.vmap(op.A)(outs) - y[None]
    return outs, jnp.sqrt(jnp.sum(r * r, axis=tuple(range(2, r.ndim))))


# --------------------------------------------------------------------------------------------------------------------
# results.jsonl
# --------------------------------------------------------------------------------------------------------------------


def _repair_results(path: str) -> None:
    """Drop a trailing partial line (a writer killed mid-line)."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _read_results(path: str) -> Dict[tuple, dict]:
    """``{(file, t0): line}`` of the result lines already written (``t0 = None`` for error lines)."""
    done: Dict[tuple, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as f:
        for raw in f:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and "file" in line:
                done[(line["file"], line.get("t0"))] = line
    return done


def _append_lines(path: str, lines: List[dict]) -> None:
    """Append lines with one ``write`` each on an ``O_APPEND`` descriptor (whole lines, also with several writer
    processes on one local file system), then fsync."""
    if not lines:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        for line in lines:
            os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------------
# the batch loop
# --------------------------------------------------------------------------------------------------------------------


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))))


def _local_slots(sharding, n_slots: int) -> List[int]:
    rows = set()
    for idx in sharding.addressable_devices_indices_map((n_slots,)).values():
        sl = idx[0]
        rows.update(range(sl.start or 0, n_slots if sl.stop is None else sl.stop))
    return sorted(rows)


def check_t0s(t0s, T: int) -> list:
    """``restore-batch``'s ``--t0`` list (:func:`~mapreps_jax.validation.check_t0_list`): Python ints, each a whole
    number in ``[0, T]``, at least one."""
    return check_t0_list(t0s, T, "restore-batch: --t0")


def restore_batch(job: BatchJob, inputs: str, out_dir: str, t0s: Sequence[int], *, seed: int = 0,
                  batch_size: Optional[int] = None, mesh=None, progress: bool = True,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run ``restore-batch`` (see the module doc). Returns ``{"files", "restored", "skipped", "failed": {file:
    error}, "batches", "computed_batches", "seconds", "images_per_second"}`` (this process's counts)."""
    from .checkpoint_io import write_bytes_atomic
    from .sharding import batch_mesh, batch_sharding, run_sharded

    from .app.digits import png_bytes

    t0s = check_t0s(t0s, int(job.model.T))
    files = list_inputs(inputs)
    names = [os.path.basename(f) for f in files]
    stems = [_stem(f) for f in files]
    mesh = batch_mesh() if mesh is None else mesh
    n_dev = int(mesh.devices.size)
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"restore-batch: --batch-size must be >= 1, got {batch_size}")
    bs = n_dev * -(-int(batch_size) // n_dev) if batch_size else max(n_dev, 8)
    n_batches = -(-len(files) // bs)
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, RESULTS_FILE)
    if jax.process_index() == 0:
        _repair_results(results_path)
    _sync("mapreps-restore-batch-start")
    done = _read_results(results_path)
    k_run = jax.random.split(jax.random.PRNGKey(int(seed)))[1]
    rows = batch_sharding(mesh)
    slots = _local_slots(rows, bs)
    out_shape = tuple(job.op.out_shape)
    t0_arr = jnp.asarray(t0s, jnp.int32)
    failed: Dict[str, str] = {}
    restored = skipped = computed = 0
    show = progress and jax.process_index() == 0
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="restore-batch", unit="img", file=sys.stderr, leave=True)
    t_start = time.perf_counter()

    def finished_any(i):  # every output PNG and results line of input i exists
        return _finished(out_dir, stems[i], names[i], t0s, done)

    for j in range(n_batches):
        members = list(range(j * bs, min((j + 1) * bs, len(files))))
        mine = [j * bs + s for s in slots if j * bs + s < len(files)]
        data: Dict[int, np.ndarray] = {}
        for i in mine:
            try:
                y_i = np.asarray(job.read(files[i]), np.float32)
                if y_i.shape != out_shape:
                    raise ValueError(f"input {files[i]}: expected a measurement of shape {out_shape}, got "
                                     f"{y_i.shape}")
                if not np.all(np.isfinite(y_i)):
                    raise ValueError(f"input {files[i]}: non-finite values")
                data[i] = y_i
            except ValueError as e:
                if names[i] not in failed:
                    failed[names[i]] = str(e)
                    log(f"restore-batch: skipping {files[i]}: {e}")
                    if (names[i], None) not in done:
                        _append_lines(results_path, [{"file": names[i], "error": str(e)}])
                        done[(names[i], None)] = {}

        need = _any_process(any(not finished_any(i) for i in data))
        if not need:
            skipped += len(data)
            if bar is not None:
                bar.update(len(members))
            continue
        key_data = image_key_data(k_run, [names[i] if i < len(files) else "" for i in range(j * bs, (j + 1) * bs)])

        def y_rows(index):
            sl = index[0]
            lo, hi = sl.start or 0, bs if sl.stop is None else sl.stop
            return np.stack([data.get(j * bs + s, np.zeros(out_shape, np.float32)) for s in range(lo, hi)])

        y = jax.make_array_from_callback((bs,) + out_shape, rows, y_rows)
        keys = jax.make_array_from_callback((bs, 2), rows, lambda index: key_data[index])
        t_batch = time.perf_counter()
        outs, resid = run_sharded(_restore_fn, keys, job.model, job.op, y, t0_arr, mesh=mesh, out_axis=(1, 1),
                                  map_config=job.map_config, sampler=job.sampler, sigma_y=job.sigma_y,
                                  n_steps=job.n_steps)
        out_rows, out_vals = _local_values(outs)
        _, res_vals = _local_values(resid)
        seconds = time.perf_counter() - t_batch
        computed += 1
        n_valid = max(1, len(members))
        lines = []
        for r, slot in enumerate(out_rows):
            i = j * bs + int(slot)
            if i not in data:
                continue
            for k, t in enumerate(t0s):
                write_bytes_atomic(os.path.join(out_dir, _output_name(stems[i], t)), png_bytes(out_vals[k, r]))
            for k, t in enumerate(t0s):
                if (names[i], t) not in done:
                    line = {"file": names[i], "t0": t, "output": _output_name(stems[i], t),
                            "residual": float(res_vals[k, r]), "batch_seconds": round(seconds, 4),
                            "seconds_per_image": round(seconds / n_valid, 4), "process": jax.process_index()}
                    lines.append(line)
                    done[(names[i], t)] = line
            restored += 1
        _append_lines(results_path, lines)
        if bar is not None:
            bar.update(len(members))
    if bar is not None:
        bar.close()
    _sync("mapreps-restore-batch-end")
    elapsed = time.perf_counter() - t_start
    # every process reports every failure (each read only its own files): the error lines of files still without
    # their outputs, from the shared results.jsonl
    done = _read_results(results_path)
    for i, name in enumerate(names):
        line = done.get((name, None))
        if line is not None and "error" in line and name not in failed and not finished_any(i):
            failed[name] = line["error"]
    failed = {k: failed[k] for k in sorted(failed) if not finished_any(names.index(k))}
    return {"files": len(files), "restored": restored, "skipped": skipped, "failed": failed, "batches": n_batches,
            "computed_batches": computed, "batch_size": bs, "devices": n_dev, "processes": jax.process_count(),
            "seconds": round(elapsed, 3), "images_per_second": round(restored / elapsed, 3) if elapsed > 0 else None,
            "job": job.name}


def _finished(out_dir, stem, name, t0s, done) -> bool:
    """Whether an input has every output PNG and every ``results.jsonl`` line."""
    return all(os.path.exists(os.path.join(out_dir, _output_name(stem, t))) and (name, t) in done for t in t0s)


def _local_values(x):
    """This process's rows of an ``[n, B, ...]`` (or ``[n, B]``) output: ``(rows, values [n, len(rows), ...])``."""
    from .sharding import local_rows

    return local_rows(x, axis=1)
