"""Restoration of real images with the bundled digits prior: the engine of ``mapreps demo`` and ``mapreps restore``.

Tasks (32x32x1 digits, [-1, 1] units, ``sigma_y`` in the same units) and their Stage-1 / Stage-2 presets:

==========  =================================================  =======  =====  ======  =====  ======================
name        operator                                           sigma_y  t1     w       eta    zeta (x max(1, 100/K))
==========  =================================================  =======  =====  ======  =====  ======================
sr4         block-average super-resolution x4 (8x8 input)      0.1      150    0.02    50     1.0
inpaint     12x12 centre box removed                           0.1      200    0.3     3.3    1.0
deblur      Gaussian blur 61x61, std 3 (circular), pinv at     0.2      100    0.24    2.5    1.0
            rcond 0.1 (1e-3 would amplify the noise 1000x)
denoise     identity                                           0.8      100    8.0     0.015  0.3
==========  =================================================  =======  =====  ======  =====  ======================

Stage 1 minimises the paper's objective ``||y - A x||^2 + w <sg(eps(x_t1, t1)), x>`` with the proximal-gradient
solver of :mod:`mapreps_jax.map_stage` (``solver="prox"``, step ``eta``, the mean of the last 3/4 of the iterates),
not AdamW. Same objective, same stationary point; on these tasks it gets there in far fewer network evaluations.
Stage-1 RMSE on the first 32 held-out digits (sr4 / inpaint / deblur / denoise, at ``sigma_y`` 0.05, 0.05, 0.05,
0.8, the presets of an earlier version):

- AdamW (lr 0.5, 0.5, 0.1, 0.1), N = 40: 0.137 / 0.138 / 0.120 / 0.076;
- AdamW, N = 300: 0.106 / 0.115 / 0.093 / 0.076;
- prox, N = 40: 0.107 / 0.109 / 0.092 / 0.072.

A sweep over AdamW's lr {0.02 ... 2}, b2 {0.9, 0.99, 0.999}, w, t1, weight decay, lr_min, tail averaging and
plain gradient descent found nothing below 0.125 for SR x4 at N = 40. AdamW's per-coordinate step is set by the
stiff data term, so the prior moves the unobserved null space of ``A`` (most of the image for SR x4 and
inpainting) slowly; the proximal step solves the data term exactly and leaves the step size to the prior term.
``eta`` was picked from ``eta w`` in {0.06 ... 2} (best: about 1 for SR and inpainting, 0.6 for deblurring, 0.12
for denoising), ``w`` from {0.25, 0.5, 1, 2} times the principled-weight scaling ``w ~ sigma_y^2``.

Why these noise levels: with ``sigma_y = 0.05`` and this Stage 1, the deblurring and inpainting MAP estimates are
already nearly as digit-like as the clean digits (quick settings, 64 digits: digit-FD 77 and 83, clean digits 74;
at ``t0 = 400``: 82 and 81), so no ``t0`` can show a perception gain.
``sigma_y = 0.1`` (0.05 on [0, 1]) for SR x4 and inpainting, and 0.2 for deblurring (the paper's 0.1 for SR and
inpainting, doubled as its code does; ``CONVENTIONS.md``), leave posteriors wide enough for the D-P trade-off to
show. Denoising at 0.8 keeps a MAP estimate at the clean digits' digit-FD: it shows the distortion side only.

On this strongly non-Gaussian prior (thin strokes on black) the prior gradient read at the paper's ``t1 = 10``
draws stroke artefacts into the large unobserved regions of x4 super-resolution and inpainting (RMSE above the
pseudo-inverse's); reading it at a larger ``t1`` (a smoother prior) gives the low-distortion MAP start that MAP-RPS
needs. Stage 2 and DPS run on a ``K``-step sub-grid (DPS-S) with ``zeta = preset.zeta * max(1, 100 / K)``: fewer,
larger steps need a proportionally larger guidance step (``zeta = 1`` at ``K = 100``). ``lr`` is AdamW's, for
``dataclasses.replace(preset, solver="adamw")``.

``mapreps demo`` (:mod:`mapreps_jax.app.demo`) runs all of them as one batch; :func:`restore_files` is
``mapreps restore`` (MAP-RPS on one image, one output per ``t0``).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..map_rps import dp_sweep
from ..map_stage import MAPConfig
from ..operators import make_operator
from ..samplers import DPSStep
from ..validation import check_t0_list

__all__ = ["DEMO_TASKS", "RESTORE_TASKS", "TaskPreset", "LATENT_TASKS", "LatentTaskPreset", "latent_zeta", "make_task", "restore", "restore_image", "restore_files",
           "check_restore_args", "is_restore_file", "read_gray_png", "png_bytes", "IMAGE_SHAPE", "dps_zeta",
           "map_config"]

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
    lr: float = 0.5
    zeta: float = 1.0
    solver: str = "prox"
    prox_step: float = 1.0
    average_frac: float = 0.75
    t1: float = 10.0
    description: str = ""


DEMO_TASKS: Dict[str, TaskPreset] = {
    "sr4": TaskPreset("sr4", "sr", {"factor": 4, "kind": "avg"}, 0.1, w=0.02, t1=150.0, prox_step=50.0,
                      description="super-resolution x4"),
    "inpaint": TaskPreset("inpaint", "inpaint_box", {"box": 12}, 0.1, w=0.3, t1=200.0, prox_step=3.3,
                          description="12x12 box inpainting"),
    "deblur": TaskPreset("deblur", "gaussian_blur", {"kernel_size": 61, "std": 3.0, "pinv_rcond": 0.1}, 0.2,
                         w=0.24, t1=100.0, lr=0.1, prox_step=2.5, description="Gaussian deblur (61x61, std 3)"),
    "denoise": TaskPreset("denoise", "denoise", {}, 0.8, w=8.0, t1=100.0, lr=0.1, zeta=0.3, prox_step=0.015,
                          description="denoising"),
}


@dataclasses.dataclass(frozen=True)
class LatentTaskPreset:
    """LMAP-RPS and latent-baseline hyper-parameters of one demo task on the bundled latent digits model
    (``checkpoints/default/latent``; the operator and ``sigma_y`` are the pixel task's, :data:`DEMO_TASKS`).

    Stage 1 is the paper's latent objective ``||y - A(D(z))||^2 + w <sg(eps(z_t1, t1)), z>`` by AdamW (weight decay
    0.01, cosine decay from ``lr`` to ``lr_min``) from ``z = E(A_pinv y)`` (the autoencoder's posterior mean). Stage 2
    uses the paper code's latent step (:meth:`~mapreps_jax.DPSStep.official_latent`:
    ``g = a_t grad ||y - A(clip(D(z0)))||^2``, raw-``eps`` DDPM move) with step ``zeta``; Latent-DPS the same step
    with ``baseline_zeta`` (a run from pure noise needs a larger step than one from the MAP estimate), PSLD adds the
    gluing term with weight ``psld_gamma`` (:meth:`~mapreps_jax.PSLDStep.official_lmap`) at ``psld_zeta`` (its
    squared gluing term diverges at Latent-DPS's step for inpainting: RMSE 0.58 at 10 on 128 digits). Step
    sizes are for ``K = 100`` steps and are multiplied by ``max(1, 100 / K)`` on a ``K``-step sub-grid (as
    :func:`dps_zeta`).
    """

    t1: float
    w: float
    lr: float
    zeta: float
    baseline_zeta: float
    psld_zeta: float
    lr_min: float = 1e-3
    psld_gamma: float = 0.1


def dps_zeta(preset: TaskPreset, n_steps: Optional[int]) -> float:
    """DPS step size on a ``K``-step sub-grid: ``preset.zeta * max(1, 100 / K)`` (``preset.zeta`` from ``K = 100``
    up to the full grid, ``n_steps=None``). ``n_steps`` must be a positive integer or ``None``."""
    if n_steps is not None and (isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer))
                                or n_steps < 1):
        raise ValueError(f"dps_zeta: n_steps (Stage-2 steps K) must be a positive integer or None, got {n_steps!r}")
    return float(preset.zeta) * (1.0 if n_steps is None else max(1.0, 100.0 / int(n_steps)))


#: Latent-space hyper-parameters of the demo tasks (bundled latent digits model); chosen on the first held-out digits
#: (``mapreps_jax/app/demo.py`` gives the search).
LATENT_TASKS: Dict[str, LatentTaskPreset] = {
    "sr4": LatentTaskPreset(t1=150.0, w=0.1, lr=0.2, zeta=0.2, baseline_zeta=0.3, psld_zeta=0.3),
    "inpaint": LatentTaskPreset(t1=150.0, w=1.2, lr=0.1, zeta=0.003, baseline_zeta=1.0, psld_zeta=0.1),
    "deblur": LatentTaskPreset(t1=50.0, w=0.6, lr=0.5, zeta=0.03, baseline_zeta=0.1, psld_zeta=0.1),
    "denoise": LatentTaskPreset(t1=50.0, w=8.0, lr=0.2, zeta=0.001, baseline_zeta=0.1, psld_zeta=0.1),
}


def latent_zeta(preset: LatentTaskPreset, n_steps: Optional[int], method: str = "lmap_rps") -> float:
    """The latent step size on a ``K``-step sub-grid: ``zeta * max(1, 100 / K)`` (as :func:`dps_zeta`), ``zeta`` the
    preset's step of ``method``: ``"lmap_rps"`` (Stage 2), ``"latent_dps"`` or ``"psld"``."""
    zetas = {"lmap_rps": preset.zeta, "latent_dps": preset.baseline_zeta, "psld": preset.psld_zeta}
    if method not in zetas:
        raise ValueError(f"latent_zeta: method must be one of {sorted(zetas)}, got {method!r}")
    return dps_zeta(dataclasses.replace(preset, zeta=zetas[method]), n_steps)


def make_task(name: str, seed: int = 0):
    """``(preset, operator)`` for a demo task name; unknown names raise ``ValueError`` listing the valid ones."""
    if name not in DEMO_TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(DEMO_TASKS)}")
    p = DEMO_TASKS[name]
    return p, make_operator(p.task, IMAGE_SHAPE, seed=seed, **p.kwargs)


def map_config(p: TaskPreset, n_iter: Optional[int] = None) -> MAPConfig:
    """The Stage-1 :class:`MAPConfig` of a preset (``N = n_iter`` or the preset's; the mean of the last
    ``round(average_frac * N)`` iterates is returned)."""
    n = int(n_iter or p.n_iter)
    return MAPConfig(t1=p.t1, w=p.w, n_iter=n, lr=p.lr, solver=p.solver, prox_step=p.prox_step,
                     average=int(round(p.average_frac * n)))


def restore(key, model, preset: TaskPreset, op, y, t0s: Sequence[int], *, stage2_steps: Optional[int] = 40,
            n_iter: Optional[int] = None, sigma_y: Optional[float] = None):
    """MAP-RPS of measurements ``y`` with a task preset and its operator: returns the outputs
    ``[len(t0s), B, 32, 32, 1]`` (clipped to [-1, 1]) and the Stage-1 estimate. This is
    :func:`~mapreps_jax.map_rps.dp_sweep` with the preset's Stage-1 config and DPS step: Stage 1 once (key
    ``split(key)[0]``), Stage 2 for each ``t0`` (key ``split(key)[1]``, the same for every ``t0``)."""
    sig = preset.sigma_y if sigma_y is None else float(sigma_y)
    sweep = dp_sweep(key, model, op, y, t0s, map_config=map_config(preset, n_iter), sigma_y=sig,
                     sampler=DPSStep(zeta=dps_zeta(preset, stage2_steps), clip=True), n_steps=stage2_steps)
    return jnp.clip(sweep.outputs, -1.0, 1.0), sweep.x_map


def restore_image(key, model, name: str, y, t0s: Sequence[int], *, stage2_steps: Optional[int] = 40,
                  n_iter: Optional[int] = None, seed: int = 0):
    """:func:`restore` for a demo task name (its preset and operator, built from ``seed``)."""
    p, op = make_task(name, seed)
    return restore(key, model, p, op, y, t0s, stage2_steps=stage2_steps, n_iter=n_iter)


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
    """Encode one ``[H, W, C]`` image in [-1, 1] (C = 1: grayscale, C = 3: RGB) as 8-bit PNG bytes."""
    import io

    from PIL import Image

    from .datasets import from_model_range

    u8 = np.asarray(from_model_range(np.asarray(x)[None]))[0]
    buf = io.BytesIO()
    Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8, mode="L" if u8.shape[-1] == 1 else "RGB").save(
        buf, format="PNG")
    return buf.getvalue()


def is_restore_file(name: str) -> bool:
    """Whether ``name`` is a file :func:`restore_files` produces (what ``restore --overwrite`` may replace)."""
    import re

    return name == "measurement.png" or re.fullmatch(r"restored_t0_\d+\.png", name) is not None


def check_restore_args(task: str, t0s: Sequence[int], *, mask_path: Optional[str] = None, observed: bool = False,
                       sigma_y: Optional[float] = None, stage2_steps: Optional[int] = 40, T: int = 1000) -> None:
    """The checks of :func:`restore_files` that need no file and no model (the command line runs them before
    loading anything). ``ValueError`` naming the option, what was expected and what was given."""
    import math

    if task not in RESTORE_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(RESTORE_TASKS)}")
    check_t0_list(t0s, T, "--t0")
    if stage2_steps is not None and (isinstance(stage2_steps, bool)
                                     or not isinstance(stage2_steps, (int, np.integer)) or stage2_steps < 1):
        raise ValueError(f"--steps (Stage-2 steps K) must be a positive integer, got {stage2_steps!r}")
    if sigma_y is not None:
        try:
            sig = float(sigma_y)
        except (TypeError, ValueError):
            raise ValueError(f"--sigma-y must be a number >= 0, got {sigma_y!r}") from None
        if not math.isfinite(sig) or sig < 0:
            raise ValueError(f"--sigma-y must be a finite number >= 0, got {sigma_y!r}")
    if task == "inpaint_mask":
        if mask_path is None:
            raise ValueError("task inpaint_mask needs --mask M.png (white = observed, black = missing)")
        preset = DEMO_TASKS["inpaint"]
    else:
        if mask_path is not None:
            raise ValueError(f"--mask is only used by task inpaint_mask, not {task!r}")
        preset = DEMO_TASKS[task]
    if observed and sigma_y is not None and preset.w != "auto":
        raise ValueError(f"--sigma-y sets the noise added when simulating the measurement of a clean --input; with "
                         f"--observed the measurement is given, and task {task!r} uses a fixed Stage-1 weight "
                         f"(w={preset.w}), so --sigma-y {sigma_y} would be ignored: drop it")


def restore_files(model, task: str, input_path: str, t0s: Sequence[int], *, mask_path: Optional[str] = None,
                  observed: bool = False, seed: int = 0, sigma_y: Optional[float] = None,
                  stage2_steps: Optional[int] = 40):
    """``mapreps restore``: returns ``{filename: png_bytes}`` (nothing is written here, so a failure leaves no
    partial output). ``observed=False`` simulates the measurement from a clean 32x32 image; ``observed=True`` reads
    the measurement itself (8x8 for ``sr4``). Bad arguments (:func:`check_restore_args`), unreadable images and an
    inpainting mask without any observed (white) pixel raise ``ValueError`` before any computation."""
    check_restore_args(task, t0s, mask_path=mask_path, observed=observed, sigma_y=sigma_y,
                       stage2_steps=stage2_steps, T=model.T)
    t0s = [int(t) for t in t0s]
    if task == "inpaint_mask":
        mask = (read_gray_png(mask_path, IMAGE_SHAPE[:2], "mask") > 0).astype(np.float32)
        if not mask.any():
            raise ValueError(f"mask: no observed pixel in {mask_path} (all black; white = observed, black = "
                             f"missing): there is nothing to restore from")
        preset = dataclasses.replace(DEMO_TASKS["inpaint"], name="inpaint_mask", task="inpaint_mask", kwargs={})
        op = make_operator("inpaint_mask", IMAGE_SHAPE, mask=mask[..., 0])
    else:
        preset, op = make_task(task, seed)
    sig = preset.sigma_y if sigma_y is None else float(sigma_y)
    key = jax.random.PRNGKey(seed)
    k_meas, k_run = jax.random.split(key)
    if observed:
        y = jnp.asarray(read_gray_png(input_path, op.out_shape[:2], "input (observed measurement)"))[None]
    else:
        x = jnp.asarray(read_gray_png(input_path, IMAGE_SHAPE[:2], "input"))[None]
        y = op.measure(k_meas, x, sig)
    outs, _ = restore(k_run, model, preset, op, y, t0s, stage2_steps=stage2_steps, sigma_y=sig)
    files = {"measurement.png": png_bytes(jnp.clip(op.x_init(y)[0], -1, 1))}
    for t0, out in zip(t0s, outs):
        files[f"restored_t0_{t0}.png"] = png_bytes(out[0])
    return files
