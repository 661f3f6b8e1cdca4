"""MAP-RPS and the distortion-perception (D-P) traversal.

``x_hat(t0) = RPS(MAP(y), t0)`` (``ALGORITHMS.md`` section 3): ``t0 = 0`` is the low-distortion end (the MAP
estimate itself), ``t0 = T`` is plain DPS. :func:`dp_sweep` runs Stage 1 ONCE and Stage 2 for every ``t0`` with one
compiled Stage-2 function (``t0`` is traced), so a sweep costs ``NFE = N + sum(t0)`` network evaluations
(``vectorize=True`` instead evaluates all ``t0`` in one ``vmap``-ed call, costing ``N + len(t0) * max(t0)``).
The same Stage-2 key is used for every ``t0`` (common random numbers: the curve's points differ by ``t0`` only).

With a latent diffusion model both stages run on latents (LMAP-RPS) and the outputs here are the decoded images
(the pixel-space identity leaves pixel results unchanged).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .map_stage import MAPConfig, map_estimate
from .model import ScoreModel
from .rng import image_keys, split_keys
from .rps_stage import rps, stage2_nfe
from .samplers import DPSStep
from .validation import check_measurement, check_same_batch, check_scalar, check_signal, check_state, check_t0

__all__ = ["map_rps", "dp_sweep", "SweepResult", "map_estimate_jit", "rps_jit", "network_calls"]

map_estimate_jit = jax.jit(map_estimate)
rps_jit = jax.jit(rps, static_argnames=("n_steps", "continuous", "max_steps", "remat"))


def _rps_over_t0(key, model, op, y, x_map, t0s, sampler, cond, n_steps, max_steps):
    """Stage 2 for every ``t0`` of ``t0s`` in one ``vmap`` (the same key for all: common random numbers)."""
    return jax.vmap(lambda t0: rps(key, model, op, y, x_map, t0, sampler=sampler, cond=cond, n_steps=n_steps,
                                   max_steps=max_steps))(t0s)


# module level, so repeated vectorised sweeps reuse one compilation (a jit built per call would recompile each time)
_rps_over_t0_jit = jax.jit(_rps_over_t0, static_argnames=("n_steps", "max_steps"))


def map_rps(key, model: ScoreModel, op, y, t0, *, map_config: MAPConfig = MAPConfig(), sampler=DPSStep(),
            sigma_y=None, cond=None, n_steps: Optional[int] = None, max_steps: Optional[int] = None,
            remat: bool = False):
    """MAP-RPS at one ``t0``: Stage 1 (:func:`~mapreps_jax.map_stage.map_estimate`) then Stage 2
    (:func:`~mapreps_jax.rps_stage.rps`). Keys (one or ``[B]``, :mod:`mapreps_jax.rng`): image ``i``'s Stage 1 uses
    ``split(keys[i])[0]``, its Stage 2 ``split(keys[i])[1]``. Returns images ``[B, *op.in_shape]`` (decoded for a
    latent model). ``remat`` (static): ``jax.checkpoint`` on the steps of both stages (Stage 1 also when
    ``map_config.remat``): under ``jax.grad`` memory O(steps x state) instead of O(steps x activations), one extra
    step forward per step in the backward pass; the same output."""
    y = check_measurement(op, y, "map_rps")
    check_t0(t0, model.T, "map_rps")  # before Stage 1, so a bad t0 fails before the work
    k1, k2 = split_keys(image_keys(key, jnp.shape(y)[0], "map_rps"))
    if remat and not map_config.remat:
        map_config = dataclasses.replace(map_config, remat=True)
    x_map = map_estimate(k1, model, op, y, config=map_config, sigma_y=sigma_y, cond=cond)
    return model.decode(rps(k2, model, op, y, x_map, t0, sampler=sampler, cond=cond, n_steps=n_steps,
                            max_steps=max_steps, remat=remat))


def _rps_step_times(t0: int, n_steps: Optional[int] = None) -> list:
    """The times of the steps one RPS run at ``t0`` executes, in order: ``t0 - 1, ..., 0`` on the full grid; on a
    ``K``-step sub-grid the :func:`~mapreps_jax.rps_stage.subgrid_times` whose successor is earlier (the loop skips
    the others). ``t0 = 0``: none."""
    from .rps_stage import subgrid_times

    t0 = int(t0)
    if t0 == 0:
        return []
    if n_steps is None:
        return list(range(t0 - 1, -1, -1))
    times, nxt = (np.asarray(v) for v in subgrid_times(t0 - 1, int(n_steps)))
    return [int(t) for t, tn in zip(times, nxt) if tn < t]


def network_calls(model: ScoreModel, sampler=None, *, stage1_steps: int = 0, stage2_steps: int = 0,
                  encodes: int = 0, decodes: int = 0, stage2_times: Optional[Sequence] = None) -> dict:
    """Per-image network evaluations of a run: ``{"unet", "decoder", "encoder"}``.

    ``unet = model.eps_calls (stage1_steps + stage2_steps)`` (a classifier-free-guided model evaluates the network
    twice per ``eps``). In a latent space each Stage-1 step makes one decoder forward (its VJP included) and each
    Stage-2 step ``sampler.latent_calls`` decoder and encoder forwards; ``encodes`` / ``decodes`` add the others (the
    Stage-1 start ``E(A_pinv y)``, the outputs' ``D(z)``). Pixel space: no decoder or encoder calls.

    ``stage2_times``: the Stage-2 runs, each a sequence of the times of the steps it executes, in order (each run
    starts from a fresh ``sampler.init``; e.g. ``t0 - 1, ..., 0`` for RPS at ``t0``). With it the Stage-2 decoder and
    encoder forwards are ``sampler.calls_over(times, model.T)`` summed over the runs, which a rule whose cost varies by
    step (``sampler.calls_vary_by_step``: :class:`~mapreps_jax.samplers.ReSampleStep`) needs; ``stage2_steps`` is
    then their total number of steps (0: taken from ``stage2_times``; another value must equal it)."""
    where = "network_calls"
    for name, v in (("stage1_steps", stage1_steps), ("stage2_steps", stage2_steps), ("encodes", encodes),
                    ("decodes", decodes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{where}: {name} must be an int >= 0, got {v!r}")
    if sampler is not None and not hasattr(sampler, "latent_calls"):
        raise TypeError(f"{where}: sampler must be a step rule (mapreps_jax.samplers), got {type(sampler).__name__}")
    if stage2_times is not None:
        if isinstance(stage2_times, (str, bytes)) or not hasattr(stage2_times, "__iter__"):
            raise TypeError(f"{where}: stage2_times must be a list of runs, each a sequence of step times; got "
                            f"{type(stage2_times).__name__}")
        runs = [list(np.asarray(r, dtype=np.float64).reshape(-1)) if np.ndim(r) <= 1 else None for r in stage2_times]
        if any(r is None for r in runs):
            raise ValueError(f"{where}: stage2_times must be a list of runs, each a 1-D sequence of step times")
        n_times = sum(len(r) for r in runs)
        if stage2_steps == 0:
            stage2_steps = n_times
        elif stage2_steps != n_times:
            raise ValueError(f"{where}: stage2_steps ({stage2_steps}) must equal the number of step times in "
                             f"stage2_times ({n_times})")
    unet = int(model.eps_calls) * (int(stage1_steps) + int(stage2_steps))
    if model.space.is_pixel:
        return {"unet": unet, "decoder": 0, "encoder": 0}
    if sampler is None:
        dec2 = enc2 = 0
    elif stage2_times is not None:
        per_run = [sampler.calls_over(r, model.T) for r in runs]
        dec2, enc2 = sum(c[0] for c in per_run), sum(c[1] for c in per_run)
    elif getattr(sampler, "calls_vary_by_step", False) and stage2_steps > 0:
        raise ValueError(f"{where}: the cost of a {type(sampler).__name__} step varies by step; pass stage2_times "
                         f"(the step times of each Stage-2 run) to count its decoder and encoder calls")
    else:
        dec, enc = sampler.latent_calls
        dec2, enc2 = dec * int(stage2_steps), enc * int(stage2_steps)
    return {"unet": unet, "decoder": int(stage1_steps) + int(dec2) + int(decodes), "encoder": int(enc2) + int(encodes)}


class SweepResult(NamedTuple):
    """Outputs of :func:`dp_sweep`.

    Attributes:
      t0: ``[n]`` the re-noising times.
      x_map: ``[B, *in_shape]`` the Stage-1 estimate (shared by all ``t0``; decoded for a latent model).
      outputs: ``[n, B, *in_shape]`` MAP-RPS outputs per ``t0`` (images; decoded for a latent model).
      nfe: dict with ``stage1`` (N), ``stage2`` (list per ``t0``) and ``total`` diffusion steps per image, and
        ``calls``: the per-image evaluations of each network over the whole sweep (:func:`network_calls`: UNet calls,
        two per step with classifier-free guidance; decoder and encoder forwards of a latent model; the sequential
        sweep's, also when ``vectorize=True``).
      sq_err: ``[n, B]`` summed squared error ``|x_hat - x|^2`` (when ``x_true`` was given, else ``None``).
      rmse, psnr: ``[n, B]`` image metrics on [0, 1] (when ``x_true`` was given and inputs are images).
      seconds: wall time of ``stage1`` and ``stage2`` (all ``t0``), compile time included (each stage is waited for
        with ``block_until_ready``).
    """

    t0: np.ndarray
    x_map: Any
    outputs: Any
    nfe: dict
    sq_err: Any = None
    rmse: Any = None
    psnr: Any = None
    seconds: Optional[dict] = None


def dp_sweep(key, model: ScoreModel, op, y, t0s: Sequence[int], *, map_config: MAPConfig = MAPConfig(),
             sampler=DPSStep(), sigma_y=None, x_true=None, cond=None, n_steps: Optional[int] = None,
             vectorize: bool = False, x_map=None, progress=None) -> SweepResult:
    """D-P traversal: Stage 1 once, Stage 2 for each ``t0`` in ``t0s`` (see module doc).

    Keys (one or ``[B]``, :mod:`mapreps_jax.rng`): image ``i``'s Stage 1 uses ``split(keys[i])[0]``, its Stage 2
    ``split(keys[i])[1]`` (the same for every ``t0``). ``x_map`` may be given
    to skip Stage 1 (a state of the model's space, e.g. CCDF: pass ``model.encode(op.x_init(y))``; the oracle sweep
    of the testbed: the exact posterior mean).
    ``progress`` is an optional callable ``progress(i, n)``, called with ``i = 0`` when Stage 1 is done (also when it
    was skipped) and with ``i`` after the ``i``-th of the ``n`` ``t0`` values.
    """
    y = check_measurement(op, y, "dp_sweep")
    t0_list = list(np.asarray(t0s).reshape(-1)) if np.ndim(t0s) else None
    if not t0_list:
        raise ValueError(f"dp_sweep: t0s must be a non-empty list of integers, got {t0s!r}")
    t0s = np.asarray([check_t0(t, model.T, "dp_sweep") for t in t0_list], np.int32)
    check_scalar(sigma_y, "sigma_y (measurement noise std, [-1, 1] units)", "dp_sweep", lo=0.0)
    if x_true is not None:
        x_true = check_signal(op, x_true, "dp_sweep", "x_true")
        check_same_batch(x_true, y, "x_true", "y", "dp_sweep")
    if x_map is not None:
        x_map = check_state(model, op, x_map, "dp_sweep", "x_map")
        check_same_batch(x_map, y, "x_map", "y", "dp_sweep")
    k1, k2 = split_keys(image_keys(key, y.shape[0], "dp_sweep"))
    t_start = time.perf_counter()
    if x_map is None:
        x_map = map_estimate_jit(k1, model, op, y, config=map_config, sigma_y=sigma_y, cond=cond)
        x_map.block_until_ready()
        n1 = int(map_config.n_iter)
    else:
        n1 = 0
    seconds = {"stage1": time.perf_counter() - t_start}
    if progress is not None:
        progress(0, len(t0s))
    t_start = time.perf_counter()
    max_steps = int(t0s.max()) if t0s.max() > 0 else None
    if vectorize:
        outputs = _rps_over_t0_jit(k2, model, op, y, x_map, jnp.asarray(t0s), sampler, cond, n_steps=n_steps,
                                   max_steps=None if n_steps is not None else max_steps).block_until_ready()
        if progress is not None:
            progress(len(t0s), len(t0s))
    else:
        outs = []
        for i, t0 in enumerate(t0s):
            # t0 traced (a jnp scalar): one compiled Stage-2 function serves every t0.
            # The full-grid scan has length T (steps past t0 are skipped by lax.cond, costing no network call), so
            # sweeps with different t0 lists reuse the same compiled function.
            # t0 = 0 is the Stage-1 estimate itself (no network evaluation; rps would return x_map as well).
            outs.append(x_map if t0 == 0 else rps_jit(k2, model, op, y, x_map, jnp.int32(t0), sampler=sampler,
                                                      cond=cond, n_steps=n_steps).block_until_ready())
            if progress is not None:
                progress(i + 1, len(t0s))
        outputs = jnp.stack(outs)
    seconds["stage2"] = time.perf_counter() - t_start
    if not model.space.is_pixel:
        x_map, outputs = model.decode(x_map), jax.vmap(model.decode)(outputs)
    stage2 = [stage2_nfe(t, n_steps) for t in t0s]
    nfe = {"stage1": n1, "stage2": stage2, "total": n1 + int(sum(stage2))}
    latent = not model.space.is_pixel
    nfe["calls"] = network_calls(model, sampler, stage1_steps=n1, stage2_steps=int(sum(stage2)),
                                 encodes=int(latent and n1 > 0), decodes=(1 + len(t0s)) if latent else 0,
                                 stage2_times=[_rps_step_times(t, n_steps) for t in t0s])
    if vectorize:
        nfe["total_vectorized"] = n1 + len(t0s) * (int(n_steps) if n_steps else int(t0s.max()))
    sq_err = rmse = psnr = None
    if x_true is not None:
        axes = tuple(range(2, outputs.ndim))
        sq_err = jnp.sum((outputs - x_true[None]) ** 2, axis=axes)
        if len(op.in_shape) == 3:
            from .metrics import psnr as _psnr, rmse as _rmse
            rmse = jax.vmap(lambda o: _rmse(o, x_true))(outputs)
            psnr = jax.vmap(lambda o: _psnr(o, x_true))(outputs)
    return SweepResult(t0s, x_map, outputs, nfe, sq_err, rmse, psnr, seconds)
