"""The paper's settings as named presets: MAP-RPS on the pixel-space FFHQ 256x256 ADM, LMAP-RPS on the CompVis
LDM FFHQ-256 (VQ-f4) and on Stable Diffusion 1.5 (MS-COCO, 512x512).

Each :class:`Preset` holds what the official scripts run for one task: the task definition (the official operator
of :mod:`mapreps_jax.operators`), the measurement noise, Stage 1 (AdamW on the paper's MAP objective, cosine
learning-rate decay from ``lr`` to ``lr_min``, prior read at ``t1``, an explicit prior weight ``w``: a preset never
relies on ``w="auto"``), Stage 2 (a DPS-type step with step ``zeta``) and the list of re-noising times ``t0`` of the
D-P sweep.

Pixel space (``adm-ffhq256``; ``t1 = 10``, ``lr_min = 1e-5``; Stage 2 the paper code's DPS, see below):

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

Latent space, LMAP-RPS (``ALGORITHMS.md`` section 4; ``t1 = 50`` for every latent preset):

=======================  ===========================  =======  ===  ===  =====  =====  =================  ========
preset                   operator                     sigma_y  N    lr   w      zeta   t0                 Stage 2
=======================  ===========================  =======  ===  ===  =====  =====  =================  ========
ldm-ffhq-denoise         ``denoise``                  0.3      70   0.5  0.6    0.015  0, 200, ..., 800   DPS
ldm-ffhq-inpaint-random  ``inpaint_random_official``  0.2      120  0.5  0.3    0.05   0, 200, ..., 800   DPS
ldm-ffhq-sr4             ``sr`` x4 ``avg``            0.2      60   0.5  0.25   0.08   0, 200, ..., 800   DPS
ldm-ffhq-deblur-aniso    ``aniso_blur_svd``           0        100  0.1  0.001  0.04   0, 25, ..., 100    PSLD 0.1
sd15-inpaint             ``inpaint_random_official``  0.1      200  2    0.3    0.01   0, 600             DPS
sd15-sr4                 ``sr`` x4 ``avg``            0.1      100  2    0.15   0.1    0, 600             DPS
sd15-deblur-aniso        ``aniso_blur_svd``           0.05     200  2    0.1    0.1    0, 600 (*)         DPS
sd15-cs2                 ``cs`` ratio 2 (official)    0.05     300  0.5  0.005  1.5    0, 600 (*)         DPS, st.
sd15-hdr                 ``hdr`` (``pinv=identity``)  0.05     400  2    0.005  0.5    0, 600             DPS, st.
=======================  ===========================  =======  ===  ===  =====  =====  =================  ========

* **LDM FFHQ-256** (``model="ldm-ffhq256"``, images 256x256x3, latents 64x64x3): Stage 1 starts at the
  pre-quantisation latent ``E(A_pinv y)`` (``init="mean"``), ``lr_min = 1e-5``; Stage 2
  :meth:`DPSStep.official_latent <mapreps_jax.DPSStep.official_latent>` with ``clip=False`` (the decoded ``D(z0)`` is
  not clamped), or for deblurring :meth:`PSLDStep.official_lmap <mapreps_jax.PSLDStep.official_lmap>` with
  ``gamma = 0.1`` (PSLD lambda), ``sigma_y`` and ``clip=False``. Unconditional.
* **Stable Diffusion 1.5** (``model="sd15"``, images 512x512x3, latents 64x64x4): Stage 1 starts at a *sample* of
  the VAE posterior times 0.18215 (``init="sample"``), ``lr_min = 1e-2`` (the scripts' ``eta_min``);
  Stage 2 :meth:`DPSStep.official_latent` with ``clip=True`` (``D(z0)`` clamped to [-1, 1] in the data fit);
  ``stable=True`` (st.) for CS and HDR: the norm ``||y - A(D(z))||`` instead of its square in both stages.
  Classifier-free guidance with scale ``cfg_scale = 1.5`` in both stages: ``eps = eps_u + 1.5 (eps_c - eps_u)``,
  ``eps_c`` conditioned on the image's caption, ``eps_u`` on the empty prompt. The library has no text encoder: the
  two embeddings (``cond``, ``uncond``, float arrays ``[L, 768]``) are inputs (:data:`TEXT_EMBEDDING_HELP`).

:data:`PRESETS` holds the pixel presets, :data:`LATENT_PRESETS` the latent ones; :func:`get_preset` and
:func:`all_presets` see both.

Units and sources. ``sigma_y`` is in [-1, 1] units as the code uses it: the paper states 0.1 (FFHQ) and 0.05
(MS-COCO) for inpainting and SR x4, and its code doubles the noise of SR and inpainting (and of Gaussian
deblurring, which no preset uses; "to account for scaling to [-1, 1]"), so those presets use 0.2 and 0.1
(``Preset.sigma_y_paper`` keeps the stated value; ``CONVENTIONS.md``). Denoising (0.3), anisotropic deblurring (0 on
FFHQ, 0.05 on MS-COCO), CS and HDR (0.05) are not doubled: stated and used values agree.
AdamW's weight decay is :class:`~mapreps_jax.MAPConfig`'s default (0.01). The LDM numbers and the SD inpainting,
SR and deblurring numbers are the issue's (``ALGORITHMS.md`` section 7). Those it leaves open were read from the
authors' public MS-COCO script (its flags: ``--vae_lr`` = ``lr``, ``--lr`` = ``zeta``, ``--eta_min`` = ``lr_min``,
``--w_prior`` = ``w``, ``--noise_t`` = ``t1``, ``--renoise_t`` = ``t0``), their runner and ``REFERENCE_NUMBERS.md``
d1:

* inpainting operator (LDM and SD): the authors' runner builds the same random mask for every ``--deg inp`` run,
  whatever the model (``randperm(size^2)[:size^2 // 2]`` indexing the channel-interleaved image: 1/6 of the entries
  missing, all in the top third), i.e. ``inpaint_random_official``, as the pixel preset (the 128x128 box appears only
  in the hard-task experiments: paper Fig. 3, rebuttal Table R.1);
* ``sd15-cs2``: ``zeta = 1.5``, the value of the script's line for ``t0 = 600`` (its ``t0 = 0`` line passes 0.1,
  which no step uses at ``t0 = 0``). (*) That line writes to ``.../600`` but passes ``--renoise_t 0``; the reported
  CS x2 results at 0 and 600 are nearly equal (22.87 / 22.90 dB), consistent with two ``t0 = 0`` runs. The preset
  runs the ``t0 = 600`` the script names;
* ``sd15-hdr``: ``zeta = 0.5`` from the script's ``t0 = 600`` line (``t0 = 0`` line: 0.1, unused);
  ``t0 = {0, 600}`` as the script and d1;
* ``sd15-deblur-aniso``: (*) both of the script's lines pass ``--renoise_t 0`` (a duplicated line); the paper
  reports LMAP-RPS(0) and LMAP-RPS(600) for it (d1), so ``t0 = {0, 600}`` as for the other MS-COCO tasks, with the
  script's ``zeta = 0.1``. The script's ``--ps_method dcdp`` is not a method of the SD code path (which knows
  ``latent_dcdp``, ``psld`` and falls back to DPS otherwise), so Stage 2 is DPS, as the issue states.

Pixel Stage 2 as the paper's code runs it differs from the library's clean DPS step in two details
(``ALGORITHMS.md`` section 2): its mean uses the raw network ``eps`` with the clamped ``x0``, and its noise is the
learned-range std computed with ``exp(v)``, added on the last step too. ``Preset.dps_official`` (True for every
pixel preset) selects that form, :meth:`DPSStep.official <mapreps_jax.DPSStep.official>` (``mean="raw"``,
``variance="learned_official"``), so that a preset reproduces the paper's numbers;
``dataclasses.replace(preset, dps_official=False)`` runs the clean step (re-derived ``eps``, guided-diffusion's
learned-range std, no noise on the last step). The latent Stage-2 rules are the official ones by construction.
Like the library's :func:`~mapreps_jax.dp_sweep`, a preset runs Stage 1 once for all ``t0`` (the official scripts
re-run it per ``t0``).

Usage (the weights: :func:`preset_help`)::

    import mapreps_jax as mr
    from mapreps_jax.presets import get_preset, load_preset_model, restore_with_preset

    preset = get_preset("ffhq-sr4")
    model = load_preset_model(preset)                    # the converted 'adm-ffhq256' checkpoint
    op = preset.operator()                               # (256, 256, 3) -> (64, 64, 3)
    y = op.measure(key_y, x, preset.sigma_y)             # x: [B, 256, 256, 3] in [-1, 1]
    res = restore_with_preset(key, model, preset, y, op=op, x_true=x)   # a SweepResult, one output per t0

    sd = get_preset("sd15-sr4")                          # Stable Diffusion: the caption's text embedding and the
    res = restore_with_preset(key, load_preset_model(sd), sd, y_sd,      # empty prompt's, [L, 768] each
                              cond=caption_embedding, uncond=empty_prompt_embedding)

From the command line: ``mapreps restore --preset NAME --input x.png --out DIR`` (``--model DIR`` for a converted
folder elsewhere; SD presets also ``--prompt-embedding FILE.npy --negative-embedding FILE.npy``).

The operators accept any image shape (``preset.operator(shape=(64, 64, 3))``; SR needs sides divisible by 4, CS a
power-of-two pixel count), so a preset also runs on smaller images and networks (the tests run every preset on
tiny random networks at 16x16).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from .map_rps import SweepResult, dp_sweep
from .map_stage import MAP_INITS, MAPConfig
from .operators import Operator, make_operator
from .samplers import DPSStep, PSLDStep

__all__ = ["Preset", "PRESETS", "LATENT_PRESETS", "all_presets", "STAGE2_RULES", "TEXT_EMBEDDING_HELP", "get_preset", "preset_help",
           "load_preset_model", "restore_with_preset", "restore_preset_files", "text_embedding_dim",
           "check_text_embedding"]

#: Stage-2 rules of a preset: ``"dps"`` (pixel space, :class:`~mapreps_jax.DPSStep`), ``"latent_dps"``
#: (:meth:`DPSStep.official_latent <mapreps_jax.DPSStep.official_latent>`), ``"latent_psld"``
#: (:meth:`PSLDStep.official_lmap <mapreps_jax.PSLDStep.official_lmap>`).
STAGE2_RULES = ("dps", "latent_dps", "latent_psld")

#: What a Stable Diffusion preset needs besides the weights, and how to obtain it (the library has no text encoder).
TEXT_EMBEDDING_HELP = (
    "the Stable Diffusion 1.5 text encoder's output (CLIP ViT-L/14, last hidden state) for the image's caption "
    "(cond) and for the empty prompt (uncond), float arrays [L, 768], L the number of tokens with the begin/end "
    "tokens (the paper's code tokenizes without padding to 77); mapreps-jax has no text encoder: compute them with "
    "transformers' CLIPTokenizer and CLIPTextModel from the SD 1.5 folder's tokenizer/ and text_encoder/ "
    "(text_encoder(tokenizer(caption, return_tensors='pt').input_ids).last_hidden_state[0]) and numpy.save each")


@dataclasses.dataclass(frozen=True)
class Preset:
    """The official script's settings for one task (see the module doc for the tables and the units).

    Attributes:
      name: the preset's name (a key of :data:`PRESETS` or :data:`LATENT_PRESETS`).
      task: :func:`~mapreps_jax.make_operator` task name.
      operator_kwargs: the task's keywords, as ``((key, value), ...)`` pairs (``dict(...)`` gives the keywords).
      sigma_y: measurement noise std in [-1, 1] units, as the code uses it (after its doubling for SR and
        inpainting).
      sigma_y_paper: the noise level as the paper states it.
      n_iter: Stage-1 AdamW steps ``N``.
      lr: AdamW's initial learning rate (cosine decay to ``lr_min``), in units of the state (pixels in [-1, 1] or
        latents) per unit of AdamW's normalised step.
      w: the prior weight (explicit; never ``"auto"``).
      zeta: Stage-2 step size (DPS / PSLD ``zeta``).
      t0s: the re-noising times of the D-P sweep (``t0 = 0`` is the MAP estimate itself), diffusion step indices.
      t1: the diffusion step at which Stage 1 reads the prior gradient (10 pixel, 50 latent).
      lr_min: final learning rate of the cosine schedule (1e-5; 1e-2 for SD).
      solver: Stage-1 solver (``"adamw"``, the paper's).
      variance: pixel Stage-2 noise (``"learned"``: the network's learned-range variance) of the clean step.
      dps_official: pixel presets: the paper's DPS form (raw-``eps`` mean, learned noise on every step); see the
        module doc. Latent presets ignore it (their rules are the official ones).
      model: the registered network the preset is for (:func:`~mapreps_jax.load_model` name).
      image_shape: the image shape of the paper's runs (``(256, 256, 3)``; SD ``(512, 512, 3)``); the default of
        :meth:`operator`.
      description: one line for listings.
      stage2: the Stage-2 rule, one of :data:`STAGE2_RULES` (``"dps"`` pixel, ``"latent_dps"``, ``"latent_psld"``).
      clip: latent Stage 2: clamp the decoded ``D(z0)`` to [-1, 1] in the data fit (SD True, LDM False). Pixel
        presets keep :class:`~mapreps_jax.DPSStep`'s default (the Tweedie estimate clipped).
      psld_gamma: PSLD's gluing weight lambda (``stage2="latent_psld"`` only; 0 otherwise).
      stable: the "stable" variant: the norm ``||y - A(D(z))||`` instead of its square, in both stages.
      init: Stage-1 start, :class:`~mapreps_jax.MAPConfig` ``init``: ``"mean"`` (``E(A_pinv y)``, deterministic)
        or ``"sample"`` (a sample of the SD VAE's posterior).
      cfg_scale: classifier-free guidance scale ``s`` (``eps_u + s (eps_c - eps_u)``, both stages) for a
        text-conditioned model (SD: 1.5), or ``None`` for an unconditional one. A preset with a scale needs the
        text embeddings ``cond`` and ``uncond`` (:data:`TEXT_EMBEDDING_HELP`).
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
    stage2: str = "dps"
    clip: bool = True
    psld_gamma: float = 0.0
    stable: bool = False
    init: str = "mean"
    cfg_scale: Optional[float] = None

    def __post_init__(self):
        if isinstance(self.w, str):
            raise ValueError(f"Preset {self.name!r}: w must be a number (presets never use {self.w!r})")
        if not self.t0s or any(int(t) != t or t < 0 for t in self.t0s):
            raise ValueError(f"Preset {self.name!r}: t0s must be a non-empty tuple of ints >= 0, got {self.t0s!r}")
        if self.stage2 not in STAGE2_RULES:
            raise ValueError(f"Preset {self.name!r}: stage2 must be one of {STAGE2_RULES}, got {self.stage2!r}")
        if self.init not in MAP_INITS:
            raise ValueError(f"Preset {self.name!r}: init must be one of {MAP_INITS}, got {self.init!r}")
        if self.stage2 != "latent_psld" and self.psld_gamma != 0:
            raise ValueError(f"Preset {self.name!r}: psld_gamma is PSLD's weight (stage2='latent_psld'); got "
                             f"psld_gamma={self.psld_gamma!r} with stage2={self.stage2!r}")
        if self.cfg_scale is not None:
            if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float)) or not (
                    math.isfinite(self.cfg_scale) and self.cfg_scale > 0):
                raise ValueError(f"Preset {self.name!r}: cfg_scale must be a finite number > 0 or None, got "
                                 f"{self.cfg_scale!r}")
            if not self.is_latent:
                raise ValueError(f"Preset {self.name!r}: cfg_scale (classifier-free guidance) is for the latent "
                                 f"text-conditioned presets; stage2={self.stage2!r} is pixel space")

    @property
    def is_latent(self) -> bool:
        """Whether the preset runs LMAP-RPS on a latent diffusion model (``stage2`` is a latent rule)."""
        return self.stage2 != "dps"

    @property
    def needs_text(self) -> bool:
        """Whether the preset needs text embeddings (``cfg_scale`` set: Stable Diffusion)."""
        return self.cfg_scale is not None

    def operator(self, shape: Optional[Sequence[int]] = None, seed: int = 0) -> Operator:
        """The task's operator for single-image shape ``shape`` (default :attr:`image_shape`), fixed data (the
        inpainting mask, the CS rows) drawn from ``seed``."""
        shape = self.image_shape if shape is None else tuple(shape)
        return make_operator(self.task, shape, seed=seed, **dict(self.operator_kwargs))

    def map_config(self) -> MAPConfig:
        """Stage 1: ``MAPConfig(t1, w, n_iter, lr, lr_min, solver, stable, init)``."""
        return MAPConfig(t1=self.t1, w=self.w, n_iter=self.n_iter, lr=self.lr, lr_min=self.lr_min,
                         solver=self.solver, stable=self.stable, init=self.init)

    def sampler_kwargs(self) -> Dict[str, Any]:
        """Keywords of Stage 2's constructor. Pixel: :class:`~mapreps_jax.DPSStep`'s, the paper code's mean and
        noise when ``dps_official`` (see the module doc), else the clean step with the network's learned variance.
        Latent: the keywords of :meth:`DPSStep.official_latent <mapreps_jax.DPSStep.official_latent>`
        (``zeta, clip, stable``) or :meth:`PSLDStep.official_lmap <mapreps_jax.PSLDStep.official_lmap>`
        (``zeta, gamma, sigma_y, clip, stable``)."""
        if self.stage2 == "latent_dps":
            return {"zeta": self.zeta, "clip": self.clip, "stable": self.stable}
        if self.stage2 == "latent_psld":
            return {"zeta": self.zeta, "gamma": self.psld_gamma, "sigma_y": self.sigma_y, "clip": self.clip,
                    "stable": self.stable}
        if self.dps_official:
            return {"zeta": self.zeta, "mean": "raw", "variance": "learned_official"}
        return {"zeta": self.zeta, "variance": self.variance}

    def sampler(self):
        """Stage 2's step rule: ``DPSStep(**sampler_kwargs())`` (pixel), ``DPSStep.official_latent(...)`` or
        ``PSLDStep.official_lmap(...)`` (latent)."""
        if self.stage2 == "latent_dps":
            return DPSStep.official_latent(**self.sampler_kwargs())
        if self.stage2 == "latent_psld":
            return PSLDStep.official_lmap(**self.sampler_kwargs())
        return DPSStep(**self.sampler_kwargs())

    def image_shape_for(self, y_shape: Sequence[int]) -> Tuple[int, ...]:
        """The single-image shape whose measurement has trailing shape ``y_shape`` (SR: sides times the factor;
        CS: ``y`` is ``[M, C]`` with ``M = H W / ratio``, the image taken square)."""
        y_shape = tuple(int(s) for s in tuple(y_shape))
        kw = dict(self.operator_kwargs)
        if self.task == "cs":
            m, c = y_shape[-2:]
            n = m * int(kw.get("ratio", 2))
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"preset {self.name!r}: a CS measurement of {m} rows (ratio {kw.get('ratio', 2)}) "
                                 f"comes from {n} pixels, not a square image; pass op= (the operator that measured "
                                 f"y)")
            return (side, side, c)
        h, w, c = y_shape[-3:]
        f = int(kw.get("factor", 1)) if self.task == "sr" else 1
        return (h * f, w * f, c)

    def measurement_ndim(self) -> int:
        """Rank of one measurement (``op.out_shape``): 2 for CS (``[M, C]``), else 3 (an image)."""
        return 2 if self.task == "cs" else 3


def _preset(name, task, kwargs, sigma_y, sigma_y_paper, n_iter, lr, w, zeta, t0s, description, **extra):
    return Preset(name=name, task=task, operator_kwargs=tuple(sorted(kwargs.items())), sigma_y=sigma_y,
                  sigma_y_paper=sigma_y_paper, n_iter=n_iter, lr=lr, w=w, zeta=zeta, t0s=tuple(t0s),
                  description=description, **extra)


# LDM FFHQ-256 (VQ-f4): t1 50, lr_min 1e-5, E = the pre-quantisation latent, D(z0) not clamped, unconditional
_LDM = dict(model="ldm-ffhq256", image_shape=(256, 256, 3), t1=50.0, lr_min=1e-5, stage2="latent_dps", clip=False,
            init="mean")
# Stable Diffusion 1.5 on MS-COCO 512x512: t1 50, lr_min 1e-2, E = a posterior sample, D(z0) clamped, CFG 1.5
_SD = dict(model="sd15", image_shape=(512, 512, 3), t1=50.0, lr_min=1e-2, stage2="latent_dps", clip=True,
           init="sample", cfg_scale=1.5)
_LDM_T0 = range(0, 801, 200)
_SD_T0 = (0, 600)

#: The pixel-space presets (MAP-RPS, ``adm-ffhq256``) by name. :data:`LATENT_PRESETS` holds the LMAP-RPS ones;
#: :func:`get_preset` and :func:`all_presets` look in both.
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

#: The latent-space presets (LMAP-RPS on ``ldm-ffhq256`` and ``sd15``) by name.
LATENT_PRESETS: Dict[str, Preset] = {p.name: p for p in (
    # ---- LDM FFHQ-256
    _preset("ldm-ffhq-denoise", "denoise", {}, 0.3, 0.3, 70, 0.5, 0.6, 0.015, _LDM_T0,
            "LMAP-RPS, LDM FFHQ 256 denoising, sigma_y 0.3", **_LDM),
    _preset("ldm-ffhq-inpaint-random", "inpaint_random_official", {}, 0.2, 0.1, 120, 0.5, 0.3, 0.05, _LDM_T0,
            "LMAP-RPS, LDM FFHQ 256 random inpainting (the official mask), sigma_y 0.2 (the paper's 0.1, doubled)",
            **_LDM),
    _preset("ldm-ffhq-sr4", "sr", {"factor": 4, "kind": "avg"}, 0.2, 0.1, 60, 0.5, 0.25, 0.08, _LDM_T0,
            "LMAP-RPS, LDM FFHQ 256 super-resolution x4 (block average), sigma_y 0.2 (the paper's 0.1, doubled)",
            **_LDM),
    _preset("ldm-ffhq-deblur-aniso", "aniso_blur_svd", {}, 0.0, 0.0, 100, 0.1, 0.001, 0.04, range(0, 101, 25),
            "LMAP-RPS, LDM FFHQ 256 anisotropic deblurring (the official SVD operator), noise-free, PSLD 0.1",
            **dict(_LDM, stage2="latent_psld", psld_gamma=0.1)),
    # ---- Stable Diffusion 1.5 (MS-COCO 512)
    _preset("sd15-inpaint", "inpaint_random_official", {}, 0.1, 0.05, 200, 2.0, 0.3, 0.01, _SD_T0,
            "LMAP-RPS, SD 1.5 512 random inpainting (the official mask), sigma_y 0.1 (the paper's 0.05, doubled)",
            **_SD),
    _preset("sd15-sr4", "sr", {"factor": 4, "kind": "avg"}, 0.1, 0.05, 100, 2.0, 0.15, 0.1, _SD_T0,
            "LMAP-RPS, SD 1.5 512 super-resolution x4 (block average), sigma_y 0.1 (the paper's 0.05, doubled)",
            **_SD),
    _preset("sd15-deblur-aniso", "aniso_blur_svd", {}, 0.05, 0.05, 200, 2.0, 0.1, 0.1, _SD_T0,
            "LMAP-RPS, SD 1.5 512 anisotropic deblurring (the official SVD operator), sigma_y 0.05", **_SD),
    _preset("sd15-cs2", "cs", {"ratio": 2, "construction": "official"}, 0.05, 0.05, 300, 0.5, 0.005, 1.5, _SD_T0,
            "LMAP-RPS, SD 1.5 512 compressed sensing x2 (official Walsh-Hadamard), sigma_y 0.05, stable",
            **dict(_SD, stable=True)),
    _preset("sd15-hdr", "hdr", {"pinv": "identity"}, 0.05, 0.05, 400, 2.0, 0.005, 0.5, _SD_T0,
            "LMAP-RPS, SD 1.5 512 HDR clip(2x) (A^+ y = y as the official code), sigma_y 0.05, stable",
            **dict(_SD, stable=True)),
)}


def all_presets() -> Dict[str, Preset]:
    """Every preset by name: :data:`PRESETS` (pixel) then :data:`LATENT_PRESETS` (a new dict, read at call time)."""
    return {**PRESETS, **LATENT_PRESETS}


def get_preset(name: Union[str, Preset]) -> Preset:
    """The preset called ``name`` (pixel or latent; a :class:`Preset` is returned as is). ``ValueError`` lists the
    known names."""
    if isinstance(name, Preset):
        return name
    presets = all_presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(presets)}")
    return presets[name]


def preset_help(name: Union[str, Preset]) -> str:
    """How to obtain and convert the network a preset runs on (for when its weights are absent); for a Stable
    Diffusion preset also what text embeddings it needs."""
    from .networks.registry import registered_models

    p = get_preset(name)
    entry = registered_models().get(p.model)
    if p.is_latent:
        what = "latent diffusion model"
        fallback = (f"'{p.model}' is not a registered model: convert its weights with `mapreps convert sd` (Stable "
                    f"Diffusion, diffusers folder) or `mapreps convert ldm-ffhq` (CompVis LDM checkpoint; see "
                    f"checkpoints/README.md) and pass the converted directory to mapreps_jax.load_model.")
    else:
        what = "pixel-space network"
        fallback = (f"'{p.model}' is not a registered model: convert its weights with `mapreps convert adm` (see "
                    f"checkpoints/README.md) and pass the converted directory to mapreps_jax.load_model.")
    how = entry.how_to_obtain if entry is not None else fallback
    text = (f"Preset {p.name!r} ({p.description}) runs on the {what} {p.model!r}, whose weights are not shipped "
            f"with the library.\n{how}\n"
            f"Then load it with mapreps_jax.load_model({p.model!r}) (or load_model('DIR') for a converted "
            f"directory elsewhere; $MAPREPS_CHECKPOINTS sets the checkpoints root).")
    if p.needs_text:
        text += (f"\nIt is text-conditioned (classifier-free guidance {p.cfg_scale}): it also needs "
                 f"{TEXT_EMBEDDING_HELP} (restore_with_preset(..., cond=, uncond=); `mapreps restore` "
                 f"--prompt-embedding / --negative-embedding).")
    return text


def load_preset_model(preset: Union[str, Preset], checkpoints_dir=None, **kwargs):
    """``load_model(preset.model, checkpoints_dir, **kwargs)``; when the checkpoint is absent, the
    :class:`~mapreps_jax.networks.registry.ModelNotFoundError` carries :func:`preset_help`."""
    from .networks.registry import ModelNotFoundError, load_model

    p = get_preset(preset)
    try:
        return load_model(p.model, checkpoints_dir=checkpoints_dir, **kwargs)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{e.args[0].splitlines()[0]}\n{preset_help(p)}") from None


def text_embedding_dim(model) -> Optional[int]:
    """The text-embedding width a text-conditioned latent model's UNet attends to (768 for SD 1.5), or ``None`` for
    a model without text conditioning (pixel ADM, LDM FFHQ) or one already wrapped by ``guided``."""
    cfg = getattr(getattr(model, "apply", None), "config", None)
    dim = getattr(cfg, "cross_attention_dim", None)
    return int(dim) if dim is not None else None


def check_text_embedding(e, dim: Optional[int], what: str = "cond"):
    """``e`` as a float32 array ``[L, dim]`` (or ``[B, L, dim]``), finite; ``ValueError`` naming ``what``, the
    expected and the given shape / dtype otherwise. ``dim=None`` accepts any width."""
    import numpy as np

    import jax.numpy as jnp

    want = f"[L, {dim if dim is not None else 'D'}]"
    try:
        arr = np.asarray(e)
    except Exception as err:  # noqa: BLE001 - anything that is not array-like
        raise TypeError(f"{what}: expected a text embedding, a float array {want}, got {type(e).__name__} "
                        f"({err})") from None
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{what}: expected a float text embedding {want}, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3) or arr.shape[-2] < 1 or (dim is not None and arr.shape[-1] != dim):
        raise ValueError(f"{what}: expected a text embedding of shape {want} (or [B, L, {dim or 'D'}]), L >= 1 "
                         f"tokens, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: the text embedding has non-finite values")
    return jnp.asarray(arr, jnp.float32)


def _check_model(p: Preset, model, cond, uncond):
    """The model a preset runs on (pixel / latent, text-conditioned or not) and its conditioning; returns the model
    Stage 1 and 2 use (the guided one for a text-conditioned preset)."""
    from .model import _Guided

    if p.needs_text and isinstance(getattr(model, "apply", None), _Guided):
        raise ValueError(f"restore_with_preset: preset {p.name!r} applies its own classifier-free guidance; pass the "
                         f"model itself (not model.guided(...)) and the embeddings as cond= and uncond=")
    pixel = model.space.is_pixel
    if p.is_latent and pixel:
        raise ValueError(f"restore_with_preset: preset {p.name!r} runs LMAP-RPS on the latent model {p.model!r}; "
                         f"got the pixel-space model {model.name!r}")
    if not p.is_latent and not pixel:
        raise ValueError(f"restore_with_preset: preset {p.name!r} runs on the pixel-space network {p.model!r}; got "
                         f"the latent model {model.name!r}")
    dim = text_embedding_dim(model)
    if p.needs_text:
        if dim is None:
            raise ValueError(f"restore_with_preset: preset {p.name!r} needs a text-conditioned (Stable Diffusion) "
                             f"UNet; {model.name!r} has none")
        if cond is None or uncond is None:
            missing = " and ".join(n for n, v in (("cond", cond), ("uncond", uncond)) if v is None)
            raise ValueError(f"restore_with_preset: preset {p.name!r} (classifier-free guidance {p.cfg_scale}) needs "
                             f"cond= and uncond=, {missing} missing: {TEXT_EMBEDDING_HELP}")
        c = check_text_embedding(cond, dim, "cond (the caption's text embedding)")
        u = check_text_embedding(uncond, dim, "uncond (the empty prompt's text embedding)")
        return model.guided(c, p.cfg_scale, u)
    if cond is not None or uncond is not None:
        raise ValueError(f"restore_with_preset: preset {p.name!r} is unconditional; cond / uncond are for the text-"
                         f"conditioned (sd15-*) presets")
    if dim is not None:
        raise ValueError(f"restore_with_preset: preset {p.name!r} is for the unconditional {p.model!r}; "
                         f"{model.name!r} is a text-conditioned UNet (use an sd15-* preset)")
    return model


def restore_with_preset(key, model, preset: Union[str, Preset], y, t0s: Optional[Sequence[int]] = None, *,
                        op: Optional[Operator] = None, seed: int = 0, x_true=None, n_steps: Optional[int] = None,
                        vectorize: bool = False, progress=None, cond=None, uncond=None) -> SweepResult:
    """MAP-RPS / LMAP-RPS D-P sweep of ``y`` (``[B, *out_shape]``) with a preset's settings:
    :func:`~mapreps_jax.dp_sweep` with the preset's ``MAPConfig``, Stage-2 rule and ``sigma_y``, over ``t0s``
    (default: the preset's list).

    ``model``: the network the preset is for (pixel ADM; a latent model for the ``ldm-ffhq-*`` / ``sd15-*``
    presets, :func:`load_preset_model`), not wrapped by ``guided``. ``cond``, ``uncond``: for a text-conditioned
    preset (``sd15-*``), required: the caption's and the empty prompt's text embeddings, float arrays ``[L, 768]``
    (or ``[B, L, 768]``; :data:`TEXT_EMBEDDING_HELP`); both stages then use ``model.guided(cond, cfg_scale,
    uncond)``. Unconditional presets take neither.
    ``op``: the operator that measured ``y``; default ``preset.operator(shape, seed)`` with the image shape
    implied by ``y`` (pass the same ``seed`` as for the measurement: the inpainting mask and the CS rows depend on
    it). ``x_true``, ``n_steps``, ``vectorize``, ``progress``: as in :func:`~mapreps_jax.dp_sweep`.
    Returns its :class:`~mapreps_jax.SweepResult` (images: decoded for a latent model).
    """
    p = get_preset(preset)
    if op is None:
        shape = getattr(y, "shape", None)
        want = p.measurement_ndim() + 1
        if shape is None or len(shape) != want:
            layout = "[B, M, C]" if want == 3 else "[B, H, W, C]"
            raise ValueError(f"restore_with_preset: y must be a batch of measurements {layout} for preset "
                             f"{p.name!r}, got shape {shape}")
        op = p.operator(p.image_shape_for(shape), seed=seed)
    run_model = _check_model(p, model, cond, uncond)
    return dp_sweep(key, run_model, op, y, p.t0s if t0s is None else t0s, map_config=p.map_config(),
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
                         observed: bool = False, seed: int = 0, image_shape: Optional[Sequence[int]] = None,
                         cond=None, uncond=None):
    """``mapreps restore --preset NAME``: restore one image with a preset on a converted network; returns
    ``{filename: png_bytes}`` (``measurement.png``, when the measurement is an image, and ``restored_t0_<t0>.png``;
    nothing is written here).

    ``observed=False``: ``input_path`` is a clean image of the network's size, measured with the preset's operator
    and ``sigma_y`` (key ``split(PRNGKey(seed))[0]``); ``observed=True``: it is the measurement itself (an image of
    the operator's output shape). The restoration uses ``split(PRNGKey(seed))[1]``. ``image_shape``: the network's
    image size (default the preset's: 256x256x3, SD 512x512x3). ``cond``, ``uncond``: the text embeddings of a
    text-conditioned preset (:func:`restore_with_preset`).
    """
    import jax
    import jax.numpy as jnp

    from .app.digits import png_bytes

    p = get_preset(preset)
    _check_model(p, model, cond, uncond)  # before reading or measuring anything
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
    res = restore_with_preset(k_run, model, p, y, t0s, op=op, cond=cond, uncond=uncond)
    files = {}
    if len(op.out_shape) == 3:
        files["measurement.png"] = png_bytes(jnp.clip(op.x_init(y)[0], -1.0, 1.0))
    for t0, out in zip(res.t0, res.outputs):
        files[f"restored_t0_{int(t0)}.png"] = png_bytes(jnp.clip(out[0], -1.0, 1.0))
    return files
