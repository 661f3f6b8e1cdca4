"""``mapreps demo``: the distortion-perception traversal on real handwritten digits with the bundled priors.

On the first ``n_images`` held-out digits, for each task of :data:`~mapreps_jax.app.digits.DEMO_TASKS` (super-resolution
x4, 12x12 box inpainting, Gaussian deblur, denoising), with the same measurements for every method:

Pixel space (the bundled digits prior; ``space`` ``"pixel"`` or ``"both"``):

* **MAP-RPS**: Stage 1 (``N`` steps of the preset's solver, proximal gradient, with the task's ``t1``, ``w`` and
  ``eta``; the mean of the last ``3N/4`` iterates) once, then Stage 2 (DPS, ``K``-step
  sub-grid: MAP-RPS-S) for every ``t0`` of the sweep; ``t0 = 0`` is the MAP estimate itself;
* **DPS** (``K``-step sub-grid, DPS-S): the same compiled Stage 2 started from ``t0 = T`` with ``x_init = 0``, i.e.
  ``x_{T-1} ~ N(0, (1 - alpha_bar_{T-1}) I)`` (DPS starts from ``N(0, I)``; the two stds differ by 2e-5);
* **RED-diff** (``S`` steps, lambda 0.25, lr 0.25, linear weighting).

Latent space (the bundled latent digits model, KL autoencoder 32x32x1 <-> 8x8x4 and a latent UNet; ``space``
``"latent"`` or ``"both"``; hyper-parameters :data:`~mapreps_jax.app.digits.LATENT_TASKS`):

* **LMAP-RPS**: Stage 1 (``N_l`` AdamW steps on ``||y - A(D(z))||^2 + w <sg(eps(z_t1, t1)), z>`` from
  ``E(A_pinv y)``) once, then Stage 2 (the paper code's latent DPS step, ``K_l``-step sub-grid) for every ``t0``;
* **Latent-DPS**: the same compiled Stage 2 from pure noise at ``t0 = T``;
* **PSLD**: the latent DPS step plus PSLD's gluing term (:meth:`~mapreps_jax.PSLDStep.official_lmap`), from noise.

All tasks run as ONE batch through :func:`~mapreps_jax.operators.stack_operators` (one compiled program per
algorithm for all tasks; per-image ``sigma_y``, ``w``, ``eta``, ``t1``, ``lr`` and ``zeta``). Distortion is RMSE on
[0, 1] (mean over images, with its standard error over images). Perception, all to the 500 held-out digits
(:mod:`~mapreps_jax.app.perception`): **grey-W1** (the W1 distance between the images' grey levels, with a jackknife
standard error; the index the plot uses, because it resolves the D-P trade-off at 16 digits), digit-FD (not FID;
biased upwards for small sets: ``digit_fd_clean`` is the clean images' own value at the same set size) and digit-KID
(unbiased, with a jackknife standard error); ``docs/digit_index_power.json`` measures which of them resolves what at
16, 32 and 64 digits. Each sweep also gets a ``tradeoff`` summary: the knee (the ``t0`` of lowest grey-W1), the
grey-W1 fall from ``t0 = 0`` to it and the paired RMSE rise, each with its standard error, and whether the two
points' error bars (2 standard errors) are disjoint. NFE per image (:func:`nfe_budget`): MAP-RPS sweep
``N + sum_t0 min(K, t0)``, DPS ``K``, RED-diff ``S``; LMAP-RPS sweep ``N_l + sum_t0 min(K_l, t0)``, Latent-DPS and PSLD ``K_l`` UNet calls, with the decoder and encoder
forwards under ``nfe["latent"]["calls"]``.

Outputs (:func:`write_demo`): ``dp_curve.png`` (RMSE against grey-W1 with 2-standard-error bars, one line or point
per method, ``t0`` labelled), ``grid.png`` (truth, measurement, MAP, each ``t0``, DPS, RED-diff; a second row per
digit for the latent methods), ``metrics.json``; written as a unit (a temporary folder beside ``out_dir``, renamed into place: never a mix
of two runs), into a new or empty folder, or with ``overwrite`` over a previous demo output
(:func:`mapreps_jax.checkpoint_io.write_output_set`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..baselines import REDDiffConfig, red_diff
from .digits import DEMO_TASKS, LATENT_TASKS, dps_zeta, latent_zeta, make_task, map_config
from ..map_rps import dp_sweep, network_calls, rps_jit
from ..map_stage import MAPConfig
from ..metrics import rmse
from ..operators import stack_operators
from ..rng import image_keys
from ..samplers import DPSStep, PSLDStep
from ..validation import check_t0_list

__all__ = ["DemoConfig", "QUICK", "FD_MIN_IMAGES", "DEMO_FILES", "run_demo", "write_demo", "demo_figures",
           "dp_curve_figure", "figure_png", "nfe_budget", "is_demo_file", "dumps_json", "tradeoff_summary"]

DEMO_FILES = ("dp_curve.png", "grid.png", "metrics.json")


def is_demo_file(name: str) -> bool:
    """Whether ``name`` is one of the files :func:`write_demo` writes (what ``--overwrite`` may replace)."""
    return name in DEMO_FILES


def dumps_json(obj, what: str = "result") -> str:
    """``json.dumps(obj, indent=2, allow_nan=False)``: a NaN or infinity (a diverged run) is a ``ValueError`` saying
    so, never a bare ``NaN`` in a file that JSON readers reject."""
    try:
        return json.dumps(obj, indent=2, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"{what} holds NaN or infinite numbers (a run diverged; check the hyper-parameters): "
                         f"{e}") from None


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo and the spaces it runs (measured from a fresh clone on an idle 2-core CPU, both spaces: the
    defaults 236 s, :data:`QUICK` 80 s, about 28 s of it compiling, 57 s with the compiled programs cached; README
    "Cost")."""

    tasks: Sequence[str] = ("sr4", "inpaint", "deblur", "denoise")
    t0: Sequence[int] = (0, 100, 200, 400, 600, 1000)
    n_images: int = 16          # held-out digits per task
    seed: int = 0
    n_iter: int = 100           # Stage-1 N
    stage2_steps: int = 20      # K of MAP-RPS-S and DPS-S
    red_diff_steps: int = 100   # S
    space: str = "both"         # "pixel", "latent" or "both"
    latent_n_iter: int = 30     # LMAP Stage-1 N (AdamW)
    latent_stage2_steps: int = 10  # K of LMAP-RPS, Latent-DPS and PSLD

    def validate(self, T: int = 1000) -> "DemoConfig":
        if isinstance(self.tasks, str):
            raise ValueError(f"demo: tasks must be a sequence of task names, got the string {self.tasks!r}")
        tasks = tuple(self.tasks)
        if not tasks:
            raise ValueError("demo: expected at least one task")
        for t in tasks:
            if t not in DEMO_TASKS:
                raise ValueError(f"demo: unknown task {t!r}; expected one of {list(DEMO_TASKS)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"demo: tasks must be distinct, got {list(tasks)}")
        # t0 = 0 (the MAP estimate) is always shown, so an empty list is the MAP estimate alone
        t0 = tuple(sorted({0, *check_t0_list(tuple(self.t0) or (0,), T, "demo")}))
        if self.space not in SPACES:
            raise ValueError(f"demo: space must be one of {list(SPACES)}, got {self.space!r}")
        for name in ("n_images", "n_iter", "stage2_steps", "red_diff_steps", "seed", "latent_n_iter",
                     "latent_stage2_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"demo: {name} must be an integer, got {v!r}")
        for name in ("n_images", "n_iter", "stage2_steps", "red_diff_steps", "latent_n_iter", "latent_stage2_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"demo: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_images < 2:  # digit-FD fits a covariance to the outputs
            raise ValueError(f"demo: n_images must be at least 2 (digit-FD needs 2 images per task), "
                             f"got {self.n_images}")
        if self.n_images > 500:
            raise ValueError(f"demo: n_images must be at most 500 (the held-out set), got {self.n_images}")
        return dataclasses.replace(self, tasks=tasks, t0=t0)


FD_MIN_IMAGES = 64  # digits per task below which digit-FD's direction between two methods is mostly noise

SPACES = ("pixel", "latent", "both")

QUICK = DemoConfig(t0=(0, 200, 400), n_images=12, n_iter=40, stage2_steps=10, red_diff_steps=10, latent_n_iter=20,
                   latent_stage2_steps=5)


def nfe_budget(cfg: DemoConfig, latent_model=None) -> dict:
    """UNet evaluations per image of the methods :attr:`DemoConfig.space` runs, and their ``total``.

    Pixel space: the MAP-RPS sweep ``N + sum_t0 min(K, t0)`` (Stage 1 once), DPS ``K``, RED-diff ``S``. Latent
    space (under ``"latent"``): the LMAP-RPS sweep ``N_l + sum_t0 min(K_l, t0)``, Latent-DPS ``K_l``, PSLD ``K_l``;
    with ``latent_model`` also each method's decoder and encoder forwards (``"calls"``,
    :func:`~mapreps_jax.map_rps.network_calls`: a forward + VJP counts as one; the outputs' decoding included).
    """
    out, total = {}, 0
    if cfg.space in ("pixel", "both"):
        stage2 = [0 if t == 0 else min(cfg.stage2_steps, t) for t in cfg.t0]
        out.update({"map_rps_sweep": cfg.n_iter + sum(stage2), "map_rps_stage1": cfg.n_iter,
                    "map_rps_stage2": stage2, "dps": cfg.stage2_steps, "red_diff": cfg.red_diff_steps})
        total += out["map_rps_sweep"] + out["dps"] + out["red_diff"]
    if cfg.space in ("latent", "both"):
        K, N = cfg.latent_stage2_steps, cfg.latent_n_iter
        stage2 = [0 if t == 0 else min(K, t) for t in cfg.t0]
        lat = {"lmap_rps_sweep": N + sum(stage2), "lmap_rps_stage1": N, "lmap_rps_stage2": stage2,
               "latent_dps": K, "psld": K}
        if latent_model is not None:
            lat["calls"] = {
                "lmap_rps_sweep": network_calls(latent_model, DPSStep(), stage1_steps=N, stage2_steps=sum(stage2),
                                                encodes=1, decodes=1 + len(cfg.t0)),
                "latent_dps": network_calls(latent_model, DPSStep(), stage2_steps=K, decodes=1),
                "psld": network_calls(latent_model, PSLDStep(), stage2_steps=K, decodes=1)}
        out["latent"] = lat
        total += lat["lmap_rps_sweep"] + lat["latent_dps"] + lat["psld"]
    out["total"] = total
    return out


def _per_image_column(vals, n: int):
    """One value per task, repeated for the task's ``n`` images: ``[k n, 1, 1, 1]`` (the batch is task-major)."""
    return jnp.repeat(jnp.asarray(vals, jnp.float32), n)[:, None, None, None]


class _Setup(NamedTuple):
    """What both spaces share: the same digits, tasks, stacked operator and measurements."""

    x: jax.Array          # [n, 32, 32, 1] the held-out digits
    presets: tuple        # TaskPreset per task
    ops: tuple            # the tasks' operators
    op: object            # their stack (one batch)
    y: jax.Array          # [k n, M] measurements
    sigma: jax.Array      # [k n, 1, 1, 1] per-image sigma_y
    key: jax.Array        # the run's key (fold_in(key, 1) for the latent methods)

    def per_img(self, vals):
        """Per-task values as a per-image ``[k n, 1, 1, 1]`` column."""
        return _per_image_column(vals, self.x.shape[0])

    def slices(self):
        n = self.x.shape[0]
        return [slice(j * n, (j + 1) * n) for j in range(len(self.ops))]


def run_demo(model, cfg: DemoConfig = DemoConfig(), progress: Optional[Callable[[int, str], None]] = None, *,
             latent_model=None) -> dict:
    """Run the demo (see module doc). Returns ``{"metrics": json-able dict, "images": {task: {...}}}``.

    ``model``: the pixel prior (unused, may be ``None``, with ``cfg.space == "latent"``); ``latent_model``: the latent
    diffusion model of ``cfg.space`` ``"latent"`` / ``"both"`` (the bundled one: :func:`~mapreps_jax.app.pretrained.
    load_default_latent`). ``progress(nfe_done, label)`` is called after each compiled stage with the UNet
    evaluations done so far (per image; the total is ``nfe_budget(cfg)["total"]``).
    """
    from .datasets import load_digits, to_model_range
    from .perception import digit_fd_from_features, digit_features, digit_kid_from_features, grey_w1

    def _kid_or_none(feats):
        return digit_kid_from_features(feats) if feats.shape[0] >= 3 else (None, None)

    pixel, latent = cfg.space in ("pixel", "both"), cfg.space in ("latent", "both")
    if pixel and model is None:
        raise ValueError(f"run_demo: space={cfg.space!r} needs the pixel prior (model)")
    if latent and latent_model is None:
        raise ValueError(f"run_demo: space={cfg.space!r} needs a latent diffusion model (latent_model=...)")
    if latent and latent_model.space.is_pixel:
        raise ValueError(f"run_demo: latent_model {latent_model.name!r} runs in pixel space; expected a latent "
                         f"diffusion model")
    cfg = cfg.validate((model if pixel else latent_model).T)
    t_start = time.perf_counter()
    n, k = cfg.n_images, len(cfg.tasks)
    x_u8, _ = load_digits("test")
    x = jnp.asarray(to_model_range(x_u8[:n]))
    presets, ops = zip(*(make_task(t, cfg.seed) for t in cfg.tasks))
    op = stack_operators(ops, [n] * k)
    x_all = jnp.tile(x, (k, 1, 1, 1))
    key = jax.random.PRNGKey(cfg.seed)
    k_meas = jax.random.split(key, 4)[0]
    sigma = _per_image_column([p.sigma_y for p in presets], n)
    y = op.measure(k_meas, x_all, sigma[:, :, 0, 0])
    setup = _Setup(x, presets, ops, op, y, sigma, key)
    done = 0

    def tick(nfe, label):
        nonlocal done
        done += nfe
        if progress is not None:
            progress(done, label)

    def score(imgs):
        """One method's outputs ``[k n, ...]`` scored per task (a list in task order); one classifier pass for the
        whole batch (each image's features are those of a pass on its task's images alone)."""
        imgs = jnp.asarray(imgs)
        feats = np.asarray(digit_features(imgs))
        outs = []
        for sl in setup.slices():
            r = np.asarray(rmse(imgs[sl], x), np.float64)
            out = {"rmse": float(r.mean()),
                   "rmse_se": float(r.std(ddof=1) / np.sqrt(r.size)) if r.size > 1 else None,
                   "digit_fd": float(digit_fd_from_features(feats[sl]))}
            out["digit_kid"], out["digit_kid_se"] = _kid_or_none(feats[sl])
            out["grey_w1"], out["grey_w1_se"] = grey_w1(np.asarray(imgs[sl]))
            outs.append(out)
        return outs

    tasks = {name: {"description": p.description, "operator": o.name, "sigma_y": p.sigma_y}
             for name, p, o in zip(cfg.tasks, presets, ops)}
    images = {name: {"truth": np.asarray(x)} for name in cfg.tasks}
    x_meas = op.x_init(y)
    for name, sl, s in zip(cfg.tasks, setup.slices(), score(jnp.clip(x_meas, -1, 1))):
        tasks[name]["measurement_pinv"] = s
        images[name]["measurement"] = np.asarray(jnp.clip(x_meas[sl], -1, 1))
    timings = {}
    if pixel:
        timings.update(_run_pixel(model, cfg, setup, tick, score, tasks, images))
    nfe = nfe_budget(cfg, latent_model)
    if latent:
        lt, sweep_calls = _run_latent(latent_model, cfg, setup, tick, score, tasks, images)
        timings.update(lt)
        nfe["latent"]["calls"]["lmap_rps_sweep"] = sweep_calls  # as dp_sweep reports it
    for name in cfg.tasks:
        for sweep_key in ("map_rps", "lmap_rps"):
            if sweep_key in tasks[name]:
                tasks[name][f"{sweep_key}_tradeoff"] = tradeoff_summary(
                    tasks[name][sweep_key], images[name][sweep_key], images[name]["truth"])
    f_clean = np.asarray(digit_features(x))  # one classifier pass for both indices of the clean digits
    metrics = {
        "config": {**dataclasses.asdict(cfg), "tasks": list(cfg.tasks), "t0": list(cfg.t0)},
        "digit_fd_clean": float(digit_fd_from_features(f_clean)),
        **dict(zip(("digit_kid_clean", "digit_kid_clean_se"), _kid_or_none(f_clean))),
        **dict(zip(("grey_w1_clean", "grey_w1_clean_se"), grey_w1(np.asarray(x)))),
        "tasks": tasks, "nfe": nfe,
        "seconds": {**{k_: round(v, 2) for k_, v in timings.items()},
                    "total": round(time.perf_counter() - t_start, 2)},
        "model": model.name if pixel else None, "latent_model": latent_model.name if latent else None,
        "backend": jax.default_backend(), "machine": machine_info(),
        "units": "RMSE on [0, 1] (mean over images, rmse_se its standard error over images); grey_w1: W1 distance "
                 "between the grey levels mean(1 - x^2) of the outputs and of the 500 held-out digits, with its "
                 "jackknife standard error (lower is better; the plot's perception axis); digit-FD to the same "
                 "digits (lower is better); digit-KID: unbiased MMD^2 of the classifier features to the same digits, "
                 "with its jackknife standard error (lower is better; null below 3 images)",
    }
    return {"metrics": metrics, "images": images}


def tradeoff_summary(points: list, outputs, truth, n_se: float = 2.0) -> dict:
    """The D-P trade-off of one ``t0`` sweep, measured: ``points`` the sweep's scores (``t0``, ``grey_w1``,
    ``grey_w1_se``, ...), ``outputs [n_t0, n, ...]`` its images and ``truth [n, ...]``.

    ``knee_t0``: the ``t0`` of lowest grey-W1 (the start of the curve's flat part); ``perception_fall`` grey-W1 at
    ``t0 = 0`` minus at the knee, with the standard error of the two independent jackknife errors combined;
    ``rmse_rise`` the mean over images of the per-image RMSE at the knee minus at ``t0 = 0`` (paired: the same
    digits), with its standard error; ``resolved``: the ``n_se``-standard-error bars of grey-W1 at ``t0 = 0`` and at
    the knee are disjoint (what the plot shows)."""
    t0s = [int(p["t0"]) for p in points]
    if 0 not in t0s or len(t0s) < 2:
        return {"knee_t0": None, "resolved": False}
    i0 = t0s.index(0)
    ik = min((i for i in range(len(points)) if t0s[i] != 0), key=lambda i: points[i]["grey_w1"])
    p0, pk = points[i0], points[ik]
    fall = p0["grey_w1"] - pk["grey_w1"]
    fall_se = float(np.hypot(p0["grey_w1_se"], pk["grey_w1_se"]))
    tr = jnp.asarray(truth)
    d = (np.asarray(rmse(jnp.asarray(outputs[ik]), tr), np.float64)
         - np.asarray(rmse(jnp.asarray(outputs[i0]), tr), np.float64))  # per-image RMSE on [0, 1], as score()
    rise_se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else None
    resolved = (p0["grey_w1"] - n_se * p0["grey_w1_se"]) > (pk["grey_w1"] + n_se * pk["grey_w1_se"])
    return {"index": "grey_w1", "knee_t0": t0s[ik], "perception_fall": float(fall), "perception_fall_se": fall_se,
            "rmse_rise": float(d.mean()), "rmse_rise_se": rise_se, "error_bar_se": n_se, "resolved": bool(resolved)}


def cpu_info() -> dict:
    """The first processor's fields of ``/proc/cpuinfo`` (keys lower-cased, e.g. ``"vendor_id"``, ``"cpu family"``,
    ``"model"``, ``"model name"``, ``"flags"``); ``{}`` where there is no such file."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block
                key, _, val = line.partition(":")
                info[key.strip().lower()] = val.strip()
    except OSError:
        pass
    return info


def cpu_model():
    """The CPU from :func:`cpu_info`: its model name with its family, model number and widest vector instruction set,
    e.g. ``"AMD EPYC (family 25, model 17, AVX-512)"`` (a virtual machine's model name alone, such as ``"AMD EPYC"``,
    does not tell its generations apart, whose speed and float32 rounding differ); ``platform.processor()`` or
    ``None`` where there is no such file. Also used by the benchmarks (``benchmarks/_common.py``)."""
    import platform

    info = cpu_info()
    if "model name" not in info:
        return platform.processor() or None
    flags = info.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    extra = [f"family {info['cpu family']}" if "cpu family" in info else None,
             f"model {info['model']}" if "model" in info else None, isa]
    extra = [e for e in extra if e]
    return info["model name"] + (f" ({', '.join(extra)})" if extra else "")


def machine_info() -> dict:
    """Where the run ran: CPU model, logical cores, JAX backend and device (recorded in ``metrics.json``)."""
    import os
    import platform

    return {"cpu": cpu_model() or platform.machine(), "cores": os.cpu_count(), "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind)}


def _run_pixel(model, cfg, setup, tick, score, tasks, images) -> dict:
    """The pixel-space methods (MAP-RPS sweep, DPS, RED-diff) into ``tasks`` / ``images``; returns timings."""
    presets, op, y, per_img = setup.presets, setup.op, setup.y, setup.per_img
    _, k_sweep, k_dps, k_red = jax.random.split(setup.key, 4)
    zeta = per_img([dps_zeta(p, cfg.stage2_steps) for p in presets])
    t1 = per_img([p.t1 for p in presets])[:, 0, 0, 0]
    # RED-diff's data term is a per-image MEAN over y: undo the stack's zero padding (M entries instead of m_j).
    obs_w = per_img([op.out_size / o.out_size for o in setup.ops])[:, 0, 0, 0]

    def sweep_tick(i, n_t0):
        if i == 0:
            tick(cfg.n_iter, "Stage 1 (MAP)")
        else:
            t0 = cfg.t0[i - 1]
            tick(min(cfg.stage2_steps, t0), f"Stage 2, t0={t0}")

    sampler = DPSStep(zeta=zeta, clip=True)
    solvers = {p.solver for p in presets}
    if len(solvers) != 1:  # one compiled Stage 1 for the whole batch: the solver is static
        raise ValueError(f"run_demo: every task must use the same Stage-1 solver, got {sorted(solvers)}")
    # Per-image values; `average` is one integer for the batch (its fraction of N is the same for every preset).
    map_cfg = dataclasses.replace(map_config(presets[0], cfg.n_iter), t1=t1, w=per_img([p.w for p in presets]),
                                  lr=per_img([p.lr for p in presets]),
                                  prox_step=per_img([p.prox_step for p in presets]))
    if len({p.average_frac for p in presets}) != 1:
        raise ValueError("run_demo: every task must average the same fraction of its Stage-1 iterates")
    sweep = dp_sweep(k_sweep, model, op, y, cfg.t0, map_config=map_cfg,
                     sampler=sampler, sigma_y=setup.sigma, n_steps=cfg.stage2_steps, progress=sweep_tick)
    timings = dict(sweep.seconds)
    outs = jnp.clip(sweep.outputs, -1.0, 1.0)
    t = time.perf_counter()
    # The same arguments as dp_sweep's Stage-2 calls (cond=None included; one key per image, as dp_sweep passes
    # them): the compiled program is reused.
    x_dps = jnp.clip(rps_jit(image_keys(k_dps, y.shape[0]), model, op, y, jnp.zeros_like(sweep.x_map),
                             jnp.int32(model.T), sampler=sampler, cond=None, n_steps=cfg.stage2_steps),
                     -1.0, 1.0).block_until_ready()
    timings["dps"] = time.perf_counter() - t
    tick(cfg.stage2_steps, "DPS")
    t = time.perf_counter()
    x_red = jnp.clip(jax.jit(red_diff)(k_red, model, op, y, config=REDDiffConfig(
        n_steps=cfg.red_diff_steps, obs_weight=obs_w)), -1.0, 1.0).block_until_ready()
    timings["red_diff"] = time.perf_counter() - t
    tick(cfg.red_diff_steps, "RED-diff")
    sweep_scores, dps_scores, red_scores = [score(out) for out in outs], score(x_dps), score(x_red)
    for j, (name, p, sl) in enumerate(zip(cfg.tasks, presets, setup.slices())):
        tasks[name].update({
            "t1": p.t1, "w": p.w,
            "stage1": {"solver": p.solver, "prox_step": p.prox_step, "lr": p.lr, "average": int(map_cfg.average)},
            "zeta": dps_zeta(p, cfg.stage2_steps),
            "map_rps": [dict(t0=int(t0), **s[j]) for t0, s in zip(cfg.t0, sweep_scores)],
            "dps": dps_scores[j], "red_diff": red_scores[j]})
        images[name].update({"map_rps": np.asarray(outs[:, sl]), "dps": np.asarray(x_dps[sl]),
                             "red_diff": np.asarray(x_red[sl])})
    return timings


def _run_latent(lmodel, cfg, setup, tick, score, tasks, images):
    """The latent-space methods (LMAP-RPS sweep, Latent-DPS, PSLD) on ``lmodel`` into ``tasks`` / ``images``; returns
    the timings (keys prefixed ``latent_``) and the sweep's network calls as :func:`~mapreps_jax.dp_sweep` reports
    them."""
    op, y, per_img = setup.op, setup.y, setup.per_img
    lp = [LATENT_TASKS[name] for name in cfg.tasks]
    K, N = cfg.latent_stage2_steps, cfg.latent_n_iter
    k_sweep, k_dps, k_psld = jax.random.split(jax.random.fold_in(setup.key, 1), 3)
    zeta = per_img([latent_zeta(p, K) for p in lp])
    map_cfg = MAPConfig(n_iter=N, t1=per_img([p.t1 for p in lp])[:, 0, 0, 0],
                        w=per_img([p.w for p in lp]), lr=per_img([p.lr for p in lp]),
                        lr_min=per_img([p.lr_min for p in lp]))
    sampler = DPSStep.official_latent(zeta=zeta, clip=True)

    def sweep_tick(i, n_t0):
        if i == 0:
            tick(N, "LMAP Stage 1")
        else:
            t0 = cfg.t0[i - 1]
            tick(min(K, t0), f"LMAP Stage 2, t0={t0}")

    sweep = dp_sweep(k_sweep, lmodel, op, y, cfg.t0, map_config=map_cfg, sampler=sampler, sigma_y=setup.sigma,
                     n_steps=K, progress=sweep_tick)
    timings = {"latent_stage1": sweep.seconds["stage1"], "latent_stage2": sweep.seconds["stage2"]}
    outs = jnp.clip(sweep.outputs, -1.0, 1.0)
    z0 = jnp.zeros((y.shape[0],) + lmodel.space.state_shape(op.in_shape), jnp.float32)

    def from_noise(step, label, key_):
        t = time.perf_counter()
        z = rps_jit(image_keys(key_, y.shape[0]), lmodel, op, y, z0, jnp.int32(lmodel.T), sampler=step, cond=None,
                    n_steps=K)
        out = jnp.clip(lmodel.decode(z), -1.0, 1.0).block_until_ready()
        timings[f"latent_{label}"] = time.perf_counter() - t
        tick(K, label)
        return out

    # Latent-DPS: the sweep's compiled Stage 2 (the same arguments, other values: reused) from pure noise at t0 = T,
    # with the baselines' step size
    x_ldps = from_noise(DPSStep.official_latent(zeta=per_img([latent_zeta(p, K, "latent_dps") for p in lp]),
                                                clip=True), "latent_dps", k_dps)
    psld = PSLDStep.official_lmap(zeta=per_img([latent_zeta(p, K, "psld") for p in lp]),
                                  gamma=per_img([p.psld_gamma for p in lp]),
                                  sigma_y=setup.sigma[:, :, 0, 0], clip=True)
    x_psld = from_noise(psld, "psld", k_psld)
    # Stage-1 measurement consistency ||A(D(z_map)) - y|| / (sigma_y sqrt(m)) per image (about 1 at the MAP)
    r = y - op.A(sweep.x_map)
    consistency = jnp.sqrt(jnp.sum(r * r, axis=tuple(range(1, r.ndim))))
    sweep_scores, ldps_scores, psld_scores = [score(out) for out in outs], score(x_ldps), score(x_psld)
    for j, (name, p, pre, o, sl) in enumerate(zip(cfg.tasks, lp, setup.presets, setup.ops, setup.slices())):
        tasks[name].update({
            "latent": {"t1": p.t1, "w": p.w, "lr": p.lr, "lr_min": p.lr_min, "n_iter": N, "zeta": latent_zeta(p, K),
                       "latent_dps_zeta": latent_zeta(p, K, "latent_dps"), "psld_zeta": latent_zeta(p, K, "psld"),
                       "psld_gamma": p.psld_gamma,
                       "stage2_steps": K},
            "lmap_rps": [dict(t0=int(t0), **s[j]) for t0, s in zip(cfg.t0, sweep_scores)],
            "latent_dps": ldps_scores[j], "psld": psld_scores[j],
            "lmap_stage1_consistency": float(jnp.mean(consistency[sl])) / (pre.sigma_y * float(np.sqrt(o.out_size)))})
        images[name].update({"lmap_rps": np.asarray(outs[:, sl]), "latent_dps": np.asarray(x_ldps[sl]),
                             "psld": np.asarray(x_psld[sl])})
    return timings, dict(sweep.nfe["calls"])


_METHOD_STYLE = {"MAP-RPS": dict(marker="o", color="C0"), "DPS": dict(marker="s", color="C3"),
                 "RED-diff": dict(marker="^", color="C2"), "LMAP-RPS": dict(marker="D", color="C1", ls="--"),
                 "Latent-DPS": dict(marker="v", color="C4"), "PSLD": dict(marker="P", color="C5")}

#: The curves (a t0 sweep) and single points of each space: (metrics key, label).
_CURVES = (("map_rps", "MAP-RPS"), ("lmap_rps", "LMAP-RPS"))
_POINTS = (("dps", "DPS"), ("red_diff", "RED-diff"), ("latent_dps", "Latent-DPS"), ("psld", "PSLD"))


def dp_curve_figure(metrics: dict):
    """The ``dp_curve.png`` figure from ``metrics.json`` contents: one panel per task, RMSE against grey-W1 (the
    perception index with power at the demo's set sizes), each point with 2-standard-error bars on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = metrics
    names = list(m["tasks"])
    if "grey_w1_clean" not in m:
        raise ValueError("dp_curve_figure: these metrics have no grey_w1 entries (a metrics.json from before grey-W1, "
                         "the plot's perception axis): run mapreps demo again")
    ncol = min(len(names), 2)
    nrow = (len(names) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.4 * ncol, 4.2 * nrow), dpi=110, squeeze=False)

    def bars(pts):
        xe = [2 * (p.get("grey_w1_se") or 0.0) for p in pts]
        ye = [2 * (p.get("rmse_se") or 0.0) for p in pts]
        return xe, ye

    for ax, name in zip(axes.ravel(), names):
        r = m["tasks"][name]
        for key_, label in _CURVES:
            if key_ not in r:
                continue
            pts = r[key_]
            xe, ye = bars(pts)
            ax.errorbar([p["grey_w1"] for p in pts], [p["rmse"] for p in pts], xerr=xe, yerr=ye, capsize=2,
                        elinewidth=0.8, label=f"{label} (t0 sweep)", **_METHOD_STYLE[label])
            for p in pts:
                ax.annotate(f"t0={p['t0']}", (p["grey_w1"], p["rmse"]), textcoords="offset points", xytext=(5, 4),
                            fontsize=7, color=_METHOD_STYLE[label]["color"])
        for key_, label in _POINTS:
            if key_ in r:
                style = {k_: v for k_, v in _METHOD_STYLE[label].items() if k_ != "ls"}
                xe, ye = bars([r[key_]])
                ax.errorbar([r[key_]["grey_w1"]], [r[key_]["rmse"]], xerr=xe, yerr=ye, capsize=2, elinewidth=0.8,
                            linestyle="none", label=label, **style)
        clean = m.get("grey_w1_clean")
        if clean is not None:
            ax.axvline(clean, color="gray", lw=0.8, ls=":", label="clean digits (same n)")
        ax.set_xlim(left=0.0)  # linear: symmetric error bars read as they are (a log axis stretches them near 0)
        ax.set_title(f"{name}: {r['description']}, sigma_y={r['sigma_y']}", fontsize=9)
        ax.set_xlabel("grey-W1 to held-out digits (perception, lower is better)")
        ax.set_ylabel("RMSE on [0, 1] (distortion)")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    n_img = m["config"]["n_images"]
    fig.suptitle(f"Distortion-perception traversal, {n_img} held-out digits per task; error bars: 2 standard errors "
                 f"over the digits", fontsize=10)
    fig.tight_layout()
    return fig


def demo_figures(result: dict, n_show: int = 4) -> dict:
    """``{"dp_curve.png": bytes, "grid.png": bytes}`` from :func:`run_demo`'s result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["metrics"]
    names = list(m["tasks"])
    files = {"dp_curve.png": figure_png(dp_curve_figure(m))}

    t0s = m["config"]["t0"]
    # one row per digit and space: pixel (MAP-RPS t0 sweep, DPS, RED-diff), latent (LMAP-RPS t0 sweep, Latent-DPS,
    # PSLD); the columns are shared: truth, measurement, t0 = 0 (MAP / LMAP) ... largest t0, the two baselines
    cols = ["truth", "measurement"] + [("MAP" if t == 0 else f"t0={t}") for t in t0s] + ["DPS / L-DPS",
                                                                                        "RED-diff / PSLD"]
    spaces = [s_ for s_, key_ in (("pixel", "map_rps"), ("latent", "lmap_rps")) if key_ in m["tasks"][names[0]]]
    if len(spaces) == 1:
        cols[-2:] = ["DPS", "RED-diff"] if spaces == ["pixel"] else ["Latent-DPS", "PSLD"]
    show = min(n_show, m["config"]["n_images"])
    keys_of = {"pixel": ("map_rps", "dps", "red_diff"), "latent": ("lmap_rps", "latent_dps", "psld")}
    # one mosaic image (one axes: a few hundred axes cost seconds to lay out and draw), panels separated by
    # a 2-pixel white gap
    rows, labels = [], []
    for name in names:
        im = result["images"][name]
        for i in range(show):
            for sp in spaces:
                sweep, b1, b2 = keys_of[sp]
                panels = [im["truth"][i], im["measurement"][i]] + [o[i] for o in im[sweep]] + [im[b1][i],
                                                                                               im[b2][i]]
                rows.append([np.clip(np.asarray(pic, np.float32)[..., 0], -1.0, 1.0) for pic in panels])
                labels.append(f"{name} {sp}" if len(spaces) > 1 else (name if i == 0 else ""))
    h, w = rows[0][0].shape
    gap = 2
    mosaic = np.ones((len(rows) * (h + gap) - gap, len(cols) * (w + gap) - gap), np.float32)
    for r, row in enumerate(rows):
        for c, pic in enumerate(row):
            mosaic[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = pic
    fig, ax = plt.subplots(figsize=(0.9 * len(cols) + 0.6, 0.9 * len(rows) + 0.4), dpi=110)
    ax.imshow(mosaic, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([c * (w + gap) + w / 2 - 0.5 for c in range(len(cols))], [c.replace(" / ", " /\n") for c in cols],
                  fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([r * (h + gap) + h / 2 - 0.5 for r in range(len(rows))], labels, fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    files["grid.png"] = figure_png(fig, tight=True)
    return files


def figure_png(fig, tight: bool = False) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed); ``tight``: cropped to what is drawn, labels
    included."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **({"bbox_inches": "tight", "pad_inches": 0.05} if tight else {}))
    plt.close(fig)
    return buf.getvalue()


def write_demo(result: dict, out_dir: str, overwrite: bool = False) -> list:
    """Write ``dp_curve.png``, ``grid.png`` and ``metrics.json`` as the content of ``out_dir``, as a unit (see
    module doc; ``overwrite`` replaces a previous demo output, never other files). Returns the file names."""
    from ..checkpoint_io import write_output_set

    files = demo_figures(result)
    files["metrics.json"] = (dumps_json(result["metrics"], "metrics.json") + "\n").encode("utf-8")
    write_output_set(out_dir, files, overwrite=overwrite, is_ours=is_demo_file)
    return sorted(files)
