"""Restoration of real images with the bundled digits prior: the engine of ``mapreps demo`` and ``mapreps restore``.

Tasks (32x32x1 digits, [-1, 1] units, ``sigma_y`` in the same units):

==========  ===============================================  ========
name        operator                                         sigma_y
==========  ===============================================  ========
sr4         block-average super-resolution x4 (8x8 input)    0.05
inpaint     12x12 centre box removed                         0.05
deblur      Gaussian blur 61x61, std 3 (circular)            0.05
denoise     identity                                         0.4
==========  ===============================================  ========

For each task: MAP-RPS over a ``t0`` sweep with Stage 1 computed once (Stage 2 on a ``K``-step sub-grid, the
MAP-RPS-S variant, so that the demo fits a CPU budget), DPS (``K``-step, DPS-S) and RED-diff. Distortion is RMSE on
[0, 1]; perception is digit-FD to the held-out digits (:mod:`mapreps_jax.perception`, not FID).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .baselines import REDDiffConfig, dps, red_diff
from .map_rps import map_estimate_jit, rps_jit
from .map_stage import MAPConfig
from .metrics import rmse
from .operators import make_operator
from .samplers import DPSStep

__all__ = ["DEMO_TASKS", "RESTORE_TASKS", "TaskPreset", "make_task", "DemoConfig", "run_demo", "restore_image",
           "restore_files", "read_gray_png", "png_bytes", "IMAGE_SHAPE"]

IMAGE_SHAPE = (32, 32, 1)


@dataclasses.dataclass(frozen=True)
class TaskPreset:
    """Operator and hyper-parameters of one demo task."""

    name: str
    task: str
    kwargs: dict
    sigma_y: float
    w: object = "auto"
    n_iter: int = 100
    lr: float = 0.05
    zeta: float = 1.0
    description: str = ""


DEMO_TASKS: Dict[str, TaskPreset] = {
    "sr4": TaskPreset("sr4", "sr", {"factor": 4, "kind": "avg"}, 0.05, description="super-resolution x4"),
    "inpaint": TaskPreset("inpaint", "inpaint_box", {"box": 12}, 0.05, description="12x12 box inpainting"),
    "deblur": TaskPreset("deblur", "gaussian_blur", {"kernel_size": 61, "std": 3.0}, 0.05,
                         description="Gaussian deblur (61x61, std 3)"),
    "denoise": TaskPreset("denoise", "denoise", {}, 0.4, description="denoising"),
}


def make_task(name: str, seed: int = 0):
    """``(preset, operator)`` for a demo task name; unknown names raise ``ValueError`` listing the valid ones."""
    if name not in DEMO_TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(DEMO_TASKS)}")
    p = DEMO_TASKS[name]
    return p, make_operator(p.task, IMAGE_SHAPE, seed=seed, **p.kwargs)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    tasks: Sequence[str] = ("sr4", "inpaint", "deblur", "denoise")
    t0: Sequence[int] = (0, 100, 200, 400, 600)
    n_images: int = 16
    seed: int = 0
    stage2_steps: int = 40      # K of the MAP-RPS-S sub-grid
    dps_steps: int = 100        # K of DPS-S
    red_diff_steps: int = 100
    n_iter: Optional[int] = None  # Stage-1 N (default: the task preset)


def _prepare(images_u8):
    from .datasets import to_model_range

    return jnp.asarray(to_model_range(images_u8))


def _map_config(p: TaskPreset, n_iter: Optional[int]):
    return MAPConfig(t1=10.0, w=p.w, n_iter=int(n_iter or p.n_iter), lr=p.lr)


def restore_image(key, model, name: str, y, t0s: Sequence[int], *, stage2_steps: Optional[int] = 40,
                  n_iter: Optional[int] = None, seed: int = 0):
    """MAP-RPS outputs ``[len(t0s), B, 32, 32, 1]`` for measurements ``y`` of task ``name`` (Stage 1 once)."""
    p, op = make_task(name, seed)
    k1, k2 = jax.random.split(key)
    x_map = map_estimate_jit(k1, model, op, y, config=_map_config(p, n_iter), sigma_y=p.sigma_y)
    outs = [rps_jit(k2, model, op, y, x_map, jnp.int32(t0), sampler=DPSStep(zeta=p.zeta, clip=True),
                    n_steps=stage2_steps) for t0 in t0s]
    return jnp.clip(jnp.stack(outs), -1.0, 1.0), x_map


def run_demo(model, cfg: DemoConfig, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run every task of ``cfg`` on held-out digits; returns the numbers and the images for the figures."""
    from .datasets import load_digits
    from .perception import digit_fd

    for t in cfg.tasks:
        make_task(t)  # validate names before any work
    x_u8, _ = load_digits("test")
    if not 1 <= cfg.n_images <= len(x_u8):
        raise ValueError(f"n_images must be in [1, {len(x_u8)}], got {cfg.n_images}")
    x = _prepare(x_u8[:cfg.n_images])
    key = jax.random.PRNGKey(cfg.seed)
    results, images = {}, {}
    for ti, name in enumerate(cfg.tasks):
        p, op = make_task(name, cfg.seed)
        kt = jax.random.fold_in(key, ti)
        k_meas, k_map, k_dps, k_red = jax.random.split(kt, 4)
        y = op.measure(k_meas, x, p.sigma_y)
        t_start = time.perf_counter()
        outs, x_map = restore_image(k_map, model, name, y, cfg.t0, stage2_steps=cfg.stage2_steps,
                                    n_iter=cfg.n_iter, seed=cfg.seed)
        if progress:
            progress(f"{name}: MAP-RPS sweep")
        x_dps = jnp.clip(jax.jit(dps, static_argnames=("n_steps", "clip"))(
            k_dps, model, op, y, zeta=p.zeta, n_steps=cfg.dps_steps), -1, 1)
        if progress:
            progress(f"{name}: DPS")
        x_red = jnp.clip(jax.jit(red_diff)(k_red, model, op, y, config=REDDiffConfig(n_steps=cfg.red_diff_steps)),
                         -1, 1)
        if progress:
            progress(f"{name}: RED-diff")
        rows = []
        for t0, o in zip(cfg.t0, outs):
            rows.append({"t0": int(t0), "rmse": float(jnp.mean(rmse(o, x))), "digit_fd": float(digit_fd(o))})
        results[name] = {
            "task": p.description, "sigma_y": p.sigma_y,
            "map_rps": rows,
            "dps": {"rmse": float(jnp.mean(rmse(x_dps, x))), "digit_fd": float(digit_fd(x_dps)),
                    "steps": cfg.dps_steps},
            "red_diff": {"rmse": float(jnp.mean(rmse(x_red, x))), "digit_fd": float(digit_fd(x_red)),
                         "steps": cfg.red_diff_steps},
            "nfe_map_rps": int(cfg.n_iter or p.n_iter) + sum(min(int(t), cfg.stage2_steps) for t in cfg.t0),
            "seconds": time.perf_counter() - t_start,
        }
        images[name] = {"truth": x, "measurement": op.x_init(y), "map": x_map, "map_rps": outs, "dps": x_dps,
                        "red_diff": x_red}
    return {"results": results, "images": images}


RESTORE_TASKS = tuple(sorted(DEMO_TASKS)) + ("inpaint_mask",)


def read_gray_png(path: str, expected_hw, what: str = "input") -> np.ndarray:
    """Read a single-channel 8-bit PNG into ``[H, W, 1]`` float32 in [-1, 1]; clear errors for an unreadable file,
    a wrong channel count or a wrong size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode, size = im.mode, im.size
            arr = np.asarray(im)
    except FileNotFoundError:
        raise ValueError(f"{what}: file not found: {path}")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what}: could not read {path} as an image ({e})")
    if mode not in ("L", "1", "P", "I;16", "I"):
        bands = len(mode) if mode in ("RGB", "RGBA", "LA", "CMYK") else mode
        raise ValueError(f"{what}: expected a single-channel (grayscale) image, got mode {mode!r} "
                         f"({bands} channels) in {path}")
    if mode == "P":
        raise ValueError(f"{what}: expected a grayscale image, got a palette image in {path}")
    H, W = expected_hw
    if arr.shape[:2] != (H, W):
        raise ValueError(f"{what}: expected a {W}x{H} image, got {size[0]}x{size[1]} in {path}")
    arr = arr.astype(np.float64)
    scale = 1.0 if mode == "1" else (65535.0 if mode in ("I;16", "I") else 255.0)
    return ((arr / scale) * 2.0 - 1.0).astype(np.float32)[..., None]


def png_bytes(x) -> bytes:
    """Encode one ``[H, W, 1]`` image in [-1, 1] as 8-bit grayscale PNG bytes."""
    import io

    from PIL import Image

    from .datasets import from_model_range

    u8 = np.asarray(from_model_range(np.asarray(x)[None]))[0, ..., 0]
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def restore_files(model, task: str, input_path: str, t0s: Sequence[int], *, mask_path: Optional[str] = None,
                  observed: bool = False, seed: int = 0, sigma_y: Optional[float] = None,
                  stage2_steps: Optional[int] = 40):
    """``mapreps restore``: returns ``{filename: png_bytes}`` (nothing is written here, so a failure leaves no
    partial output). ``observed=False`` simulates the measurement from a clean 32x32 image; ``observed=True`` reads
    the measurement itself (8x8 for ``sr4``)."""
    if task not in RESTORE_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(RESTORE_TASKS)}")
    t0s = [int(t) for t in t0s]
    if any(t < 0 or t > model.T for t in t0s):
        raise ValueError(f"--t0 values must be in [0, {model.T}], got {t0s}")
    if task == "inpaint_mask":
        if mask_path is None:
            raise ValueError("task inpaint_mask needs --mask M.png (white = observed, black = missing)")
        mask = (read_gray_png(mask_path, IMAGE_SHAPE[:2], "mask") > 0).astype(np.float32)
        preset = dataclasses.replace(DEMO_TASKS["inpaint"], name="inpaint_mask", task="inpaint_mask", kwargs={})
        op = make_operator("inpaint_mask", IMAGE_SHAPE, mask=mask[..., 0])
    else:
        if mask_path is not None:
            raise ValueError(f"--mask is only used by task inpaint_mask, not {task!r}")
        preset, op = make_task(task, seed)
    sig = preset.sigma_y if sigma_y is None else float(sigma_y)
    if sig < 0:
        raise ValueError(f"--sigma-y must be >= 0, got {sig}")
    key = jax.random.PRNGKey(seed)
    k_meas, k_run = jax.random.split(key)
    if observed:
        y = jnp.asarray(read_gray_png(input_path, op.out_shape[:2], "input (observed measurement)"))[None]
    else:
        x = jnp.asarray(read_gray_png(input_path, IMAGE_SHAPE[:2], "input"))[None]
        y = op.measure(k_meas, x, sig)
    cfg = _map_config(dataclasses.replace(preset, sigma_y=sig), None)
    k1, k2 = jax.random.split(k_run)
    x_map = map_estimate_jit(k1, model, op, y, config=cfg, sigma_y=sig)
    files = {"measurement.png": png_bytes(jnp.clip(op.x_init(y)[0], -1, 1))}
    for t0 in t0s:
        out = rps_jit(k2, model, op, y, x_map, jnp.int32(t0), sampler=DPSStep(zeta=preset.zeta, clip=True),
                      n_steps=stage2_steps)
        files[f"restored_t0_{t0}.png"] = png_bytes(jnp.clip(out[0], -1, 1))
    return files
