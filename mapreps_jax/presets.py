"""The paper's settings for the pixel-space FFHQ 256x256 ADM, as named presets (MAP-RPS, Stage 2 = DPS).

Each :class:`Preset` holds what the official scripts run for one task: the task definition (the official operator
of :mod:`mapreps_jax.operators`), the measurement noise, Stage 1 (AdamW on the paper's MAP objective, cosine
learning-rate decay from ``lr`` to ``lr_min = 1e-5``, prior read at ``t1 = 10``, an explicit prior weight ``w``:
a preset never relies on ``w="auto"``), Stage 2 (DPS with step ``zeta`` and the network's learned variance) and the
list of re-noising times ``t0`` of the D-P sweep.

================  ====================================  =======  =====  ===  ====  ====  ===================
preset            operator                              sigma_y  N      lr   w     zeta  t0
================  ====================================  =======  =====  ===  ====  ====  ===================
ffhq-denoise      ``denoise``                           0.3      60     0.5  2.0   1.0   0, 25, ..., 100
ffhq-inpaint-     ``inpaint_random_official``           0.2      400    0.5  0.7   1.0   0, 25, ..., 100
random            (1/6 of the entries, top third)
ffhq-sr4          ``sr``, ``factor=4``, ``kind="avg"``  0.2      300    0.5  0.25  1.0   0, 100, ..., 400
                  (block average, replication pinv)
ffhq-deblur-      ``aniso_blur_svd`` (9 taps, std 1     0       200    0.5  0.01  2.0   0, 25, ..., 100
aniso             vertical / 20 horizontal, SVD 0.03)
================  ====================================  =======  =====  ===  ====  ====  ===================

``sigma_y`` is in [-1, 1] units as the code uses it: the paper states 0.1 for inpainting and SR x4, and its code
doubles the noise of those two tasks, so the presets use 0.2 (``Preset.sigma_y_paper`` keeps the stated value;
``CONVENTIONS.md``). Denoising (0.3) and deblurring (noise-free) are not doubled. AdamW's weight decay is
:class:`~mapreps_jax.MAPConfig`'s default (0.01).

Stage 2 as the paper's code runs it differs from the library's clean DPS step in two details (``ALGORITHMS.md``
section 2): its mean uses the raw network ``eps`` with the clamped ``x0``, and its noise is the learned-range std
computed with ``exp(v)``, added on the last step too. ``Preset.dps_official`` (True for every preset) selects that
form, :meth:`DPSStep.official <mapreps_jax.DPSStep.official>` (``mean="raw"``, ``variance="learned_official"``), so
that a preset reproduces the paper's numbers; ``dataclasses.replace(preset, dps_official=False)`` runs the clean
step (re-derived ``eps``, guided-diffusion's learned-range std, no noise on the last step).

Usage (the weights: :func:`preset_help`)::

    import mapreps_jax as mr
    from mapreps_jax.presets import get_preset, load_preset_model, restore_with_preset

    preset = get_preset("ffhq-sr4")
    model = load_preset_model(preset)                    # the converted 'adm-ffhq256' checkpoint
    op = preset.operator()                               # (256, 256, 3) -> (64, 64, 3)
    y = op.measure(key_y, x, preset.sigma_y)             # x: [B, 256, 256, 3] in [-1, 1]
    res = restore_with_preset(key, model, preset, y, op=op, x_true=x)   # a SweepResult, one output per t0

The operators accept any image shape (``preset.operator(shape=(64, 64, 3))``; SR needs sides divisible by 4), so a
preset also runs on smaller images and networks (the tests run every preset on a tiny random ADM at 16x16).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from .map_rps import SweepResult, dp_sweep
from .map_stage import MAPConfig
from .operators import Operator, make_operator
from .samplers import DPSStep

__all__ = ["Preset", "PRESETS", "get_preset", "preset_help", "load_preset_model", "restore_with_preset",
           "restore_preset_files"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """The official script's settings for one task (see the module doc for the table and the units).

    Attributes:
      name: the preset's name (a key of :data:`PRESETS`).
      task: :func:`~mapreps_jax.make_operator` task name.
      operator_kwargs: the task's keywords, as ``((key, value), ...)`` pairs (``dict(...)`` gives the keywords).
      sigma_y: measurement noise std in [-1, 1] units, as the code uses it (after its doubling for SR and
        inpainting).
      sigma_y_paper: the noise level as the paper states it.
      n_iter: Stage-1 AdamW steps ``N``.
      lr: AdamW's initial learning rate (cosine decay to ``lr_min``).
      w: the prior weight (explicit; never ``"auto"``).
      zeta: DPS step size of Stage 2.
      t0s: the re-noising times of the D-P sweep (``t0 = 0`` is the MAP estimate itself).
      t1: the diffusion step at which Stage 1 reads the prior gradient.
      lr_min: final learning rate of the cosine schedule.
      solver: Stage-1 solver (``"adamw"``, the paper's).
      variance: Stage-2 noise (``"learned"``: the network's learned-range variance).
      dps_official: the paper's DPS form (raw-``eps`` mean, learned noise on every step). Not applied yet by
        :meth:`sampler` (see the module doc).
      model: the registered network the preset is for (:func:`~mapreps_jax.load_model` name).
      image_shape: the image shape of the paper's runs (``(256, 256, 3)``); the default of :meth:`operator`.
      description: one line for listings.
    """

    name: str
    task: str
    operator_kwargs: Tuple[Tuple[str, Any], ...]
    sigma_y: float
    sigma_y_paper: float
    n_iter: int
    lr: float
    w: float
    zeta: float
    t0s: Tuple[int, ...]
    t1: float = 10.0
    lr_min: float = 1e-5
    solver: str = "adamw"
    variance: str = "learned"
    dps_official: bool = True
    model: str = "adm-ffhq256"
    image_shape: Tuple[int, int, int] = (256, 256, 3)
    description: str = ""

    def __post_init__(self):
        if isinstance(self.w, str):
            raise ValueError(f"Preset {self.name!r}: w must be a number (presets never use {self.w!r})")
        if not self.t0s or any(int(t) != t or t < 0 for t in self.t0s):
            raise ValueError(f"Preset {self.name!r}: t0s must be a non-empty tuple of ints >= 0, got {self.t0s!r}")

    def operator(self, shape: Optional[Sequence[int]] = None, seed: int = 0) -> Operator:
        """The task's operator for single-image shape ``shape`` (default :attr:`image_shape`), fixed data (the
        inpainting mask) drawn from ``seed``."""
        shape = self.image_shape if shape is None else tuple(shape)
        return make_operator(self.task, shape, seed=seed, **dict(self.operator_kwargs))

    def map_config(self) -> MAPConfig:
        """Stage 1: ``MAPConfig(t1, w, n_iter, lr, lr_min, solver)``."""
        return MAPConfig(t1=self.t1, w=self.w, n_iter=self.n_iter, lr=self.lr, lr_min=self.lr_min,
                         solver=self.solver)

    def sampler_kwargs(self) -> Dict[str, Any]:
        """Keywords of :class:`~mapreps_jax.DPSStep` for Stage 2: the paper code's mean and noise when
        ``dps_official`` (see the module doc), else the clean step with the network's learned variance."""
        if self.dps_official:
            return {"zeta": self.zeta, "mean": "raw", "variance": "learned_official"}
        return {"zeta": self.zeta, "variance": self.variance}

    def sampler(self) -> DPSStep:
        """Stage 2's step rule: ``DPSStep(**sampler_kwargs())``."""
        return DPSStep(**self.sampler_kwargs())

    def image_shape_for(self, y_shape: Sequence[int]) -> Tuple[int, ...]:
        """The single-image shape whose measurement has trailing shape ``y_shape`` (SR: sides times the factor)."""
        h, w, c = (int(s) for s in tuple(y_shape)[-3:])
        f = int(dict(self.operator_kwargs).get("factor", 1)) if self.task == "sr" else 1
        return (h * f, w * f, c)


def _preset(name, task, kwargs, sigma_y, sigma_y_paper, n_iter, lr, w, zeta, t0s, description):
    return Preset(name=name, task=task, operator_kwargs=tuple(sorted(kwargs.items())), sigma_y=sigma_y,
                  sigma_y_paper=sigma_y_paper, n_iter=n_iter, lr=lr, w=w, zeta=zeta, t0s=tuple(t0s),
                  description=description)


#: The presets by name.
PRESETS: Dict[str, Preset] = {p.name: p for p in (
    _preset("ffhq-denoise", "denoise", {}, 0.3, 0.3, 60, 0.5, 2.0, 1.0, range(0, 101, 25),
            "FFHQ 256 denoising, sigma_y 0.3"),
    _preset("ffhq-inpaint-random", "inpaint_random_official", {}, 0.2, 0.1, 400, 0.5, 0.7, 1.0, range(0, 101, 25),
            "FFHQ 256 random inpainting (the official mask), sigma_y 0.2 (the paper's 0.1, doubled)"),
    _preset("ffhq-sr4", "sr", {"factor": 4, "kind": "avg"}, 0.2, 0.1, 300, 0.5, 0.25, 1.0, range(0, 401, 100),
            "FFHQ 256 super-resolution x4 (block average), sigma_y 0.2 (the paper's 0.1, doubled)"),
    _preset("ffhq-deblur-aniso", "aniso_blur_svd", {}, 0.0, 0.0, 200, 0.5, 0.01, 2.0, range(0, 101, 25),
            "FFHQ 256 anisotropic deblurring (the official SVD operator), noise-free"),
)}


def get_preset(name: Union[str, Preset]) -> Preset:
    """The preset called ``name`` (a :class:`Preset` is returned as is). ``ValueError`` lists the known names."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_help(name: Union[str, Preset]) -> str:
    """How to obtain and convert the network a preset runs on (for when its weights are absent)."""
    from .networks.registry import registered_models

    p = get_preset(name)
    entry = registered_models().get(p.model)
    how = entry.how_to_obtain if entry is not None else (
        f"'{p.model}' is not a registered model: convert its weights with `mapreps convert adm` (see "
        f"checkpoints/README.md) and pass the converted directory to mapreps_jax.load_model.")
    return (f"Preset {p.name!r} ({p.description}) runs on the pixel-space network {p.model!r}, whose weights are "
            f"not shipped with the library.\n{how}\n"
            f"Then load it with mapreps_jax.load_model({p.model!r}) (or load_model('DIR') for a converted "
            f"directory elsewhere; $MAPREPS_CHECKPOINTS sets the checkpoints root).")


def load_preset_model(preset: Union[str, Preset], checkpoints_dir=None, **kwargs):
    """``load_model(preset.model, checkpoints_dir, **kwargs)``; when the checkpoint is absent, the
    :class:`~mapreps_jax.networks.registry.ModelNotFoundError` carries :func:`preset_help`."""
    from .networks.registry import ModelNotFoundError, load_model

    p = get_preset(preset)
    try:
        return load_model(p.model, checkpoints_dir=checkpoints_dir, **kwargs)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{e.args[0].splitlines()[0]}\n{preset_help(p)}") from None


def restore_with_preset(key, model, preset: Union[str, Preset], y, t0s: Optional[Sequence[int]] = None, *,
                        op: Optional[Operator] = None, seed: int = 0, x_true=None, n_steps: Optional[int] = None,
                        vectorize: bool = False, progress=None) -> SweepResult:
    """MAP-RPS D-P sweep of ``y`` (``[B, *out_shape]``) with a preset's settings: :func:`~mapreps_jax.dp_sweep`
    with the preset's ``MAPConfig``, ``DPSStep`` and ``sigma_y``, over ``t0s`` (default: the preset's list).

    ``op``: the operator that measured ``y``; default ``preset.operator(shape, seed)`` with the image shape
    implied by ``y`` (pass the same ``seed`` as for the measurement: the inpainting mask depends on it).
    ``x_true``, ``n_steps``, ``vectorize``, ``progress``: as in :func:`~mapreps_jax.dp_sweep`.
    Returns its :class:`~mapreps_jax.SweepResult`.
    """
    p = get_preset(preset)
    if op is None:
        shape = getattr(y, "shape", None)
        if shape is None or len(shape) < 4:
            raise ValueError(f"restore_with_preset: y must be a batch of measurements [B, H, W, C], got shape "
                             f"{shape}")
        op = p.operator(p.image_shape_for(shape), seed=seed)
    return dp_sweep(key, model, op, y, p.t0s if t0s is None else t0s, map_config=p.map_config(),
                    sampler=p.sampler(), sigma_y=p.sigma_y, x_true=x_true, n_steps=n_steps, vectorize=vectorize,
                    progress=progress)


def read_image_png(path: str, shape: Sequence[int], what: str = "input"):
    """Read an 8-bit PNG of single-image shape ``shape`` (``(H, W, C)``, C = 1 or 3) into float32 [-1, 1];
    ``ValueError`` naming the file, the expected and the given size / channels."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    H, W, C = (int(s) for s in shape)
    try:
        with Image.open(path) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode not in ("L", "RGB"):
                raise ValueError(f"{what}: expected an 8-bit {'RGB' if C == 3 else 'grayscale'} PNG, got mode "
                                 f"{mode!r} in {path}")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise ValueError(f"{what}: file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what}: could not read {path} as an image ({e})") from None
    channels = 1 if arr.ndim == 2 else arr.shape[-1]
    if (size[1], size[0]) != (H, W) or channels != C:
        raise ValueError(f"{what}: expected a {W}x{H} image with {C} channel(s), got {size[0]}x{size[1]} with "
                         f"{channels} in {path}")
    arr = arr.reshape(H, W, C).astype(np.float32)
    return arr / 127.5 - 1.0


def restore_preset_files(model, preset: Union[str, Preset], input_path: str, t0s: Optional[Sequence[int]] = None, *,
                         observed: bool = False, seed: int = 0, image_shape: Optional[Sequence[int]] = None):
    """``mapreps restore --preset NAME``: restore one image with a preset on a converted network; returns
    ``{filename: png_bytes}`` (``measurement.png`` and ``restored_t0_<t0>.png``; nothing is written here).

    ``observed=False``: ``input_path`` is a clean image of the network's size, measured with the preset's operator
    and ``sigma_y`` (key ``split(PRNGKey(seed))[0]``); ``observed=True``: it is the measurement itself (an image of
    the operator's output shape). The restoration uses ``split(PRNGKey(seed))[1]``. ``image_shape``: the network's
    image size (default the preset's, 256x256x3).
    """
    import jax
    import jax.numpy as jnp

    from .app.digits import png_bytes

    p = get_preset(preset)
    t0s = list(p.t0s if t0s is None else t0s)
    shape = tuple(int(s) for s in (p.image_shape if image_shape is None else image_shape))
    op = p.operator(shape, seed=seed)
    k_meas, k_run = jax.random.split(jax.random.PRNGKey(seed))
    if observed:
        if len(op.out_shape) != 3:
            raise ValueError(f"--observed: preset {p.name!r} measures a vector of shape {op.out_shape}, not an "
                             f"image; give the clean image instead")
        y = jnp.asarray(read_image_png(input_path, op.out_shape, "input (observed measurement)"))[None]
    else:
        x = jnp.asarray(read_image_png(input_path, shape, "input"))[None]
        y = op.measure(k_meas, x, p.sigma_y)
    res = restore_with_preset(k_run, model, p, y, t0s, op=op)
    files = {}
    if len(op.out_shape) == 3:
        files["measurement.png"] = png_bytes(jnp.clip(op.x_init(y)[0], -1.0, 1.0))
    for t0, out in zip(res.t0, res.outputs):
        files[f"restored_t0_{int(t0)}.png"] = png_bytes(jnp.clip(out[0], -1.0, 1.0))
    return files
