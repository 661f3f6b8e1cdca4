"""Gradient-based fitting of the MAP-RPS stage hyper-parameters on a small validation batch (optax).

What is fitted. Any subset of

* Stage 1 (:mod:`mapreps_jax.map_stage`): the prior weight ``w`` (dimensionless: the weight of
  ``<sg(eps), x>`` against the data term ``||y - A x||^2``, both in squared [-1, 1] units), the AdamW learning rate
  ``lr`` ([-1, 1] units of ``x`` per step; the cosine schedule decays it to ``map_config.lr_min``) and the prior
  read-out time ``t1`` (a real diffusion step index);
* Stage 2 (:mod:`mapreps_jax.rps_stage`): the re-noising time ``t0`` (a real diffusion step index in ``(1, T)``),
  through the continuous-time sub-grid ``rps(..., n_steps=K, continuous=True)`` (``stage2="rps"``, any step rule)
  or the diffrax reverse SDE :func:`mapreps_jax.continuous.rps_sde` (``stage2="sde"``, score-only models).

The outputs at hyper-parameters ``theta`` are ``x_hat(theta) = D(RPS(MAP(y; w, lr, t1), t0))`` (``D`` the decoder
of a latent model, the identity in pixel space), or the Stage-1 estimate ``D(MAP(y))`` when no ``t0`` is given.
All randomness is fixed across updates (common random numbers: the same ``key`` at every update, split as in
:func:`mapreps_jax.map_rps.map_rps`), so ``L(theta)`` is a deterministic, differentiable function and its
gradient is exact (the gradient of the computed loss, not of its expectation).

Objectives (``objective(outputs, x_val) -> scalar`` or ``(scalar, aux dict)``):

* distortion: :func:`mse`, ``D = (1/B) sum_i ||x_hat_i - x_i||^2`` (summed over pixels, averaged over images;
  squared [-1, 1] units; ``objective="mse"``);
* a target on the D-P plane, with a user perception function ``P = perception(outputs)`` (a distance to the
  prior's law, e.g. :func:`gaussian_perception`, the W2 distance of the outputs' Gaussian fit to a Gaussian prior):
  :func:`dp_objective` ``D + lam P^2`` (``lam`` in units of distortion per squared perception; on the ideal curve
  ``D* + (P* - P)^2`` its minimiser is ``P = P*/(1 + lam)``), or :func:`perception_under_budget`
  ``P^2 + penalty (D - D_max)_+^2`` (minimise perception subject to ``D <= D_max``, by a quadratic penalty);
* a distortion budget: :func:`distortion_target` ``(D - D_target)^2``, whose minimiser over ``t0`` is the ``t0``
  with ``D(t0) = D_target`` (``D`` increases with ``t0``); :func:`tune_t0_for_distortion`.

Parametrisation (so that every optimizer step stays in range): ``w = exp(u)``, ``lr = exp(u)`` and, for a bounded
time, ``t = lo + (hi - lo) sigmoid(u)`` with default bounds ``t1 in (0, T - 1)``, ``t0 in (1, T)``
(:data:`DEFAULT_BOUNDS`; :func:`to_unconstrained` / :func:`from_unconstrained`). The optimizer (default Adam with
``b1 = 0.5`` and a learning rate cosine-decayed from 0.1 to 0 over ``n_updates``) acts on ``u``; Adam's step is
about ``lr`` in ``u`` whatever the scale of the gradient, i.e. about 10 % of ``w`` or ``lr``, and about
``0.1 (hi - lo) s (1 - s)`` in a time (``s`` the sigmoid), per update at the start.

Cost and memory. One update is one forward and one backward pass through all unrolled steps (``N`` Stage-1 steps
and ``K`` Stage-2 steps, one network evaluation each, on the ``B`` validation images). The gradient is compiled once
(one ``jax.jit(jax.value_and_grad(...))`` serves every update: the hyper-parameters, key and data are traced
arguments; :attr:`TuneResult.traces` counts the traces). With ``remat=True`` (default) every step of both loops is
wrapped in ``jax.checkpoint`` (:mod:`mapreps_jax._loops`): the backward pass stores one state per step (the
iterate and the AdamW moments: O(steps x state)) instead of every network activation of every step
(O(steps x activations)), and recomputes each step's forward once (about 1.3-1.5x the compute of the plain
gradient). That is what makes the gradient of a 1000-step MAP loop of an image network fit in memory.

Adjoint of the diffrax Stage 2 (``stage2="sde"``, :func:`mapreps_jax.continuous.rps_sde`). The default, and the
one used here, is :class:`diffrax.RecursiveCheckpointAdjoint` ("discretise then optimise"): it differentiates the
computed Euler-Maruyama solution exactly (so the gradient agrees with finite differences of the same computation and
with the unrolled ``stage2="rps"`` loops), and stores only about ``log2(n_steps)`` checkpoints of the state
(binomial checkpointing; ``max_steps = n_steps + 1`` is known), recomputing the rest: the same memory argument as
``remat``, applied by diffrax itself. Not used:

* :class:`diffrax.BacksolveAdjoint` ("optimise then discretise", O(1) memory) solves the adjoint SDE backwards in
  time; its gradient is only approximate (the backward solve has its own discretisation error and the Brownian
  path must be reconstructed), it supports only Stratonovich solvers (not the default Ito
  :class:`diffrax.Euler`; our noise is additive, so ``diffrax.Heun()`` solves the same SDE) and differentiates only
  what enters through ``y0``/``args`` (``rps_sde`` passes ``t0`` through ``args`` for this reason). Pass it with
  ``adjoint=diffrax.BacksolveAdjoint(solver=diffrax.Heun())`` and ``solver=diffrax.Heun()`` if memory is tighter
  than ``log2(n_steps)`` states; with ``n_steps`` of 100 or so the checkpointing already costs little.
* :class:`diffrax.DirectAdjoint` also supports forward mode but nests scans and checkpoints over ``max_steps``:
  more compute for no benefit in reverse mode (diffrax itself advises against it); forward mode
  (:class:`diffrax.ForwardMode`) would only pay for a single scalar hyper-parameter.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .map_stage import MAPConfig, map_estimate
from .model import ScoreModel
from .priors import gaussian_fit, gaussian_w2
from .rng import image_keys, split_keys
from .rps_stage import rps
from .samplers import DPSStep

__all__ = ["tune", "tune_t0_for_distortion", "TuneResult", "tuning_loss", "stage_outputs", "mse", "dp_objective",
           "perception_under_budget", "distortion_target", "gaussian_perception", "to_unconstrained",
           "from_unconstrained", "TUNABLE", "DEFAULT_BOUNDS"]

#: The hyper-parameters :func:`tune` can fit.
TUNABLE = ("w", "lr", "t1", "t0")

#: Default ranges: ``None`` is a log parametrisation of a positive number; a pair ``(lo, hi)`` a sigmoid onto it
#: (``"T"`` in a bound is the model's number of diffusion steps).
DEFAULT_BOUNDS = {"w": None, "lr": None, "t1": (0.0, "T-1"), "t0": (1.0, "T")}


def _resolve_bounds(bounds, T: int) -> dict:
    out = dict(DEFAULT_BOUNDS)
    if bounds:
        unknown = sorted(set(bounds) - set(TUNABLE))
        if unknown:
            raise ValueError(f"tune: bounds for unknown hyper-parameters {unknown}; tunable: {list(TUNABLE)}")
        out.update(bounds)
    res = {}
    for name, b in out.items():
        if b is None:
            res[name] = None
            continue
        lo, hi = ({"T": float(T), "T-1": float(T - 1)}.get(v, v) if isinstance(v, str) else v for v in b)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"tune: bounds[{name!r}] must be finite with lo < hi, got {b!r}")
        res[name] = (lo, hi)
    return res


def to_unconstrained(params: dict, T: int = 1000, bounds: Optional[dict] = None) -> dict:
    """Natural values to the optimizer's variables: ``log v`` (``w``, ``lr``), ``logit((v - lo)/(hi - lo))``
    (``t1``, ``t0``; :data:`DEFAULT_BOUNDS` unless ``bounds`` says otherwise). Values must be inside their range."""
    b = _resolve_bounds(bounds, T)
    out = {}
    for name, v in params.items():
        if name not in TUNABLE:
            raise ValueError(f"tune: cannot tune {name!r}; tunable hyper-parameters: {list(TUNABLE)}")
        if isinstance(v, str) or isinstance(v, bool) or np.ndim(v) != 0:
            raise ValueError(f"tune: params[{name!r}] must be a real scalar, got {v!r}")
        v = float(v)
        if b[name] is None:
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"tune: params[{name!r}] must be positive and finite, got {v!r}")
            u = math.log(v)
        else:
            lo, hi = b[name]
            if not lo < v < hi:
                raise ValueError(f"tune: params[{name!r}] = {v!r} must lie strictly inside its range ({lo}, {hi})")
            s = (v - lo) / (hi - lo)
            u = math.log(s) - math.log1p(-s)
        out[name] = jnp.asarray(u, jnp.result_type(float))
    return out


def from_unconstrained(u: dict, T: int = 1000, bounds: Optional[dict] = None) -> dict:
    """Inverse of :func:`to_unconstrained` (traceable and differentiable): ``exp(u)`` or
    ``lo + (hi - lo) sigmoid(u)``."""
    b = _resolve_bounds(bounds, T)
    out = {}
    for name, v in u.items():
        if b[name] is None:
            out[name] = jnp.exp(v)
        else:
            lo, hi = b[name]
            out[name] = lo + (hi - lo) * jax.nn.sigmoid(v)
    return out


# --------------------------------------------------------------------------------------------- objectives
def mse(outputs, x_val):
    """Distortion ``D = (1/B) sum_i ||x_hat_i - x_i||^2`` (summed over pixels, mean over the ``B`` images; squared
    [-1, 1] units: the ``D`` of ``TESTBED.md``)."""
    axes = tuple(range(1, outputs.ndim))
    return jnp.mean(jnp.sum((outputs - x_val) ** 2, axis=axes))


def gaussian_perception(prior_mean, prior_cov):
    """A perception function for flat outputs ``[B, d]``: ``P = W2(N(m, C), N(prior_mean, prior_cov))`` with
    ``(m, C)`` the outputs' mean and covariance (:func:`~mapreps_jax.priors.gaussian_fit`; [-1, 1] units). For the
    Gaussian testbed this is the ``P`` of ``TESTBED.md`` up to sampling error (needs ``B`` well above ``d``)."""
    def perception(outputs):
        m, c = gaussian_fit(outputs.reshape(outputs.shape[0], -1))
        return gaussian_w2(m, c, prior_mean, prior_cov)

    return perception


def dp_objective(perception: Callable, lam: float):
    """``L = D + lam P^2`` (``D`` :func:`mse`, ``P = perception(outputs)``; ``lam`` distortion per squared
    perception). Returns ``objective(outputs, x_val) -> (L, {"D": D, "P": P})``."""
    def objective(outputs, x_val):
        D, P = mse(outputs, x_val), perception(outputs)
        return D + lam * P**2, {"D": D, "P": P}

    return objective


def perception_under_budget(perception: Callable, d_max: float, penalty: float = 100.0):
    """Minimise perception subject to ``D <= d_max`` by a quadratic penalty:
    ``L = P^2 + penalty max(D - d_max, 0)^2`` (``penalty`` in squared perception per squared distortion; the
    constraint is met up to ``O(1/penalty)``). Returns ``objective(outputs, x_val) -> (L, {"D", "P"})``."""
    def objective(outputs, x_val):
        D, P = mse(outputs, x_val), perception(outputs)
        return P**2 + penalty * jnp.maximum(D - d_max, 0.0) ** 2, {"D": D, "P": P}

    return objective


def distortion_target(d_target: float):
    """``L = (D - d_target)^2`` (squared [-1, 1] units squared): its minimiser over ``t0`` is the re-noising time
    whose distortion equals the budget. Returns ``objective(outputs, x_val) -> (L, {"D": D})``."""
    def objective(outputs, x_val):
        D = mse(outputs, x_val)
        return (D - d_target) ** 2, {"D": D}

    return objective


# --------------------------------------------------------------------------------------------- the pipeline
def _stage1_config(map_config: MAPConfig, params: dict, remat: bool) -> MAPConfig:
    over = {k: params[k] for k in ("w", "lr", "t1") if k in params}
    if remat != map_config.remat:
        over["remat"] = remat
    return dataclasses.replace(map_config, **over) if over else map_config


def stage_outputs(key, model: ScoreModel, op, y, params: dict, *, map_config: MAPConfig = MAPConfig(),
                  sampler=DPSStep(), n_steps: int = 20, sigma_y=None, cond=None, t0=None, stage2: str = "rps",
                  stage2_model: Optional[ScoreModel] = None, stage2_cond=None, x_map=None, remat: bool = True,
                  adjoint=None):
    """The outputs ``x_hat(theta)`` at the hyper-parameters ``params`` (natural units; a subset of :data:`TUNABLE`,
    the others from ``map_config`` and ``t0``), differentiable in every value of ``params``.

    Stage 1: :func:`~mapreps_jax.map_stage.map_estimate` with ``map_config`` updated by ``params["w"/"lr"/"t1"]``
    (skipped when ``x_map`` is given and no Stage-1 value is in ``params``). Stage 2, when ``params["t0"]`` or
    ``t0`` is given: ``stage2="rps"``, :func:`~mapreps_jax.rps_stage.rps` with ``n_steps=K, continuous=True`` and
    the step rule ``sampler``; ``stage2="sde"``, :func:`~mapreps_jax.continuous.rps_sde` with ``n_steps`` Euler
    steps and ``adjoint``. ``stage2_model`` / ``stage2_cond`` (default ``model`` / ``cond``) give Stage 2 another
    model, e.g. the testbed's exact diffused posterior ``prior.posterior_model(A, sigma_y, schedule)`` with
    ``stage2_cond = y`` (the oracle). Keys: image ``i``'s Stage 1 uses ``split(keys[i])[0]``, Stage 2
    ``split(keys[i])[1]`` (as :func:`~mapreps_jax.map_rps.map_rps`). Returns images ``[B, *op.in_shape]``."""
    if stage2 not in ("rps", "sde"):
        raise ValueError(f"tune: stage2 must be 'rps' or 'sde', got {stage2!r}")
    k1, k2 = split_keys(image_keys(key, y.shape[0], "tune"))
    stage1_tuned = any(k in params for k in ("w", "lr", "t1"))
    if x_map is None or stage1_tuned:
        x_map = map_estimate(k1, model, op, y, config=_stage1_config(map_config, params, remat), sigma_y=sigma_y,
                             cond=cond)
    t0 = params.get("t0", t0)
    if t0 is None:
        return model.decode(x_map)
    m2 = model if stage2_model is None else stage2_model
    c2 = cond if stage2_cond is None else stage2_cond
    if stage2 == "rps":
        out = rps(k2, m2, op, y, x_map, t0, sampler=sampler, cond=c2, n_steps=int(n_steps), continuous=True,
                  remat=remat)
    else:
        from .continuous import rps_sde

        out = rps_sde(k2, m2, x_map, t0, n_steps=int(n_steps), cond=c2, adjoint=adjoint)
    return m2.decode(out)


def _objective_fn(objective):
    if objective == "mse":
        return mse
    if isinstance(objective, str) or not callable(objective):
        raise ValueError(f"tune: objective must be 'mse' or a callable(outputs, x_val), got {objective!r}")
    return objective


def _split_aux(value):
    if isinstance(value, tuple):
        loss, aux = value
        return loss, dict(aux)
    return value, {}


def tuning_loss(key, model: ScoreModel, op, y_val, x_val, params: dict, *, objective: Union[str, Callable] = "mse",
                **kw):
    """The tuning objective ``L(theta) = objective(stage_outputs(theta), x_val)`` at natural ``params``; returns
    ``(L, aux)`` (``aux`` the objective's dict, empty for a scalar objective). Keyword arguments as
    :func:`stage_outputs`. Differentiable in ``params`` (what :func:`tune` differentiates, up to the
    reparametrisation)."""
    out = stage_outputs(key, model, op, y_val, params, **kw)
    return _split_aux(_objective_fn(objective)(out, x_val))


class TuneResult(NamedTuple):
    """What :func:`tune` returns.

    Attributes:
      params: the tuned values (natural units, Python floats).
      loss: the objective at ``params`` (same key and batch).
      aux: the objective's auxiliary values at ``params`` (e.g. ``{"D", "P"}``; floats).
      history: ``{"loss": [n_updates], "params": {name: [n_updates]}, "aux": {name: [n_updates]}}`` (NumPy), the
        values *before* each update (entry 0 is the start).
      traces: how many times the objective was traced (1: one compiled ``value_and_grad`` served every update).
      seconds: wall time of the updates, the first compilation included.
    """

    params: dict
    loss: float
    aux: dict
    history: dict
    traces: int
    seconds: float


def _default_optimizer(n_updates: int, learning_rate: float = 0.1):
    return optax.adam(optax.cosine_decay_schedule(learning_rate, max(int(n_updates), 1)), b1=0.5)


def tune(key, model: ScoreModel, op, y_val, x_val, *, params: Optional[dict] = None,
         objective: Union[str, Callable] = "mse", map_config: MAPConfig = MAPConfig(), sampler=DPSStep(),
         n_steps: int = 20, sigma_y=None, cond=None, t0=None, stage2: str = "rps",
         stage2_model: Optional[ScoreModel] = None, stage2_cond=None, x_map=None, bounds: Optional[dict] = None,
         optimizer: Optional[optax.GradientTransformation] = None, n_updates: int = 60, remat: bool = True,
         adjoint=None) -> TuneResult:
    """Fit ``params`` (a subset of :data:`TUNABLE`: Stage-1 ``w``, ``lr``, ``t1``, Stage-2 ``t0``; start values in
    natural units, default ``{"w": 1.0}``) by ``n_updates`` optax updates on the validation batch
    ``(y_val [B, *op.out_shape], x_val [B, *op.in_shape])``; see the module doc for the parametrisation, the
    objectives, the cost and ``remat``.

    ``objective``: ``"mse"`` or ``objective(outputs, x_val) -> scalar | (scalar, aux dict)`` (e.g.
    :func:`dp_objective`, :func:`perception_under_budget`, :func:`distortion_target`). The hyper-parameters not in
    ``params`` come from ``map_config`` (``w="auto"`` needs ``sigma_y``) and ``t0`` (``None``: no Stage 2 unless
    ``"t0"`` is tuned: the objective is then that of the Stage-1 estimate). ``x_map``: a fixed Stage-1 estimate in
    the model's space, used when no Stage-1 value is tuned (e.g. the exact posterior mean). ``key`` is the same at
    every update (common random numbers). ``optimizer`` acts on the unconstrained variables (default
    ``optax.adam(cosine_decay_schedule(0.1, n_updates), b1=0.5)``). Other keywords as :func:`stage_outputs`.

    Returns a :class:`TuneResult`.
    """
    params = {"w": 1.0} if params is None else dict(params)
    if not params:
        raise ValueError("tune: params is empty; give start values for some of " + str(list(TUNABLE)))
    if isinstance(n_updates, bool) or not isinstance(n_updates, (int, np.integer)) or n_updates < 1:
        raise ValueError(f"tune: n_updates must be a positive int, got {n_updates!r}")
    if not isinstance(remat, bool):
        raise ValueError(f"tune: remat must be a bool, got {remat!r}")
    obj = _objective_fn(objective)
    if ("t0" in params) and t0 is not None:
        raise ValueError("tune: t0 is both tuned (params['t0']) and fixed (t0=...); give one")
    y_val = jnp.asarray(y_val)
    x_val = jnp.asarray(x_val)
    if x_val.shape[0] != y_val.shape[0]:
        raise ValueError(f"tune: x_val and y_val must have the same batch size; got {x_val.shape[0]} and "
                         f"{y_val.shape[0]}")
    T = int(model.T)
    names = tuple(params)
    u = to_unconstrained(params, T, bounds)
    opt = optimizer if optimizer is not None else _default_optimizer(n_updates)
    traces = [0]
    kw = dict(map_config=map_config, sampler=sampler, n_steps=n_steps, stage2=stage2, stage2_model=stage2_model,
              remat=remat, adjoint=adjoint)

    def loss_u(u, key, y, x, arrays):
        traces[0] += 1  # a Python side effect: runs once per trace, not per call
        theta = from_unconstrained(u, T, bounds)
        out = stage_outputs(key, model, op, y, theta, sigma_y=arrays["sigma_y"], cond=arrays["cond"],
                            t0=arrays["t0"], stage2_cond=arrays["stage2_cond"], x_map=arrays["x_map"], **kw)
        loss, aux = _split_aux(obj(out, x))
        return loss, (aux, theta)

    # every array (data, key, fixed values) is an argument, so the compiled gradient depends on shapes only
    arrays = {"sigma_y": sigma_y, "cond": cond, "t0": None if t0 is None else jnp.asarray(t0, jnp.result_type(float)),
              "stage2_cond": stage2_cond, "x_map": x_map}
    value_and_grad = jax.jit(jax.value_and_grad(loss_u, has_aux=True))
    state = opt.init(u)
    hist_loss, hist_params, hist_aux = [], {n: [] for n in names}, {}
    start = time.perf_counter()
    for _ in range(int(n_updates)):
        (loss, (aux, theta)), g = value_and_grad(u, key, y_val, x_val, arrays)
        hist_loss.append(float(loss))
        for n in names:
            hist_params[n].append(float(theta[n]))
        for n, v in aux.items():
            hist_aux.setdefault(n, []).append(float(v))
        if not (np.isfinite(hist_loss[-1]) and all(np.all(np.isfinite(np.asarray(v))) for v in g.values())):
            raise FloatingPointError(f"tune: non-finite loss or gradient at update {len(hist_loss) - 1} "
                                     f"(params {({n: hist_params[n][-1] for n in names})}); lower the learning rate")
        updates, state = opt.update(g, state, u)
        u = optax.apply_updates(u, updates)
    (loss, (aux, theta)), _ = value_and_grad(u, key, y_val, x_val, arrays)
    seconds = time.perf_counter() - start
    history = {"loss": np.asarray(hist_loss), "params": {n: np.asarray(v) for n, v in hist_params.items()},
               "aux": {n: np.asarray(v) for n, v in hist_aux.items()}}
    return TuneResult(params={n: float(theta[n]) for n in names}, loss=float(loss),
                      aux={n: float(v) for n, v in aux.items()}, history=history, traces=traces[0], seconds=seconds)


def tune_t0_for_distortion(key, model: ScoreModel, op, y_val, x_val, d_target: float, *, t0: float = 500.0,
                           **kwargs) -> TuneResult:
    """The re-noising time whose validation distortion equals the budget: :func:`tune` of ``{"t0": t0}`` (start)
    on :func:`distortion_target` ``(D(t0) - d_target)^2`` (``d_target`` in squared [-1, 1] units summed over pixels,
    between the Stage-1 estimate's ``D`` at ``t0 -> 1`` and posterior sampling's at ``t0 -> T``). Keyword arguments
    as :func:`tune` (pass ``x_map`` to run Stage 1 once, outside the loop). ``result.aux["D"]`` is the distortion
    reached."""
    if "params" in kwargs or "objective" in kwargs:
        raise ValueError("tune_t0_for_distortion: params and objective are set by this function")
    return tune(key, model, op, y_val, x_val, params={"t0": float(t0)}, objective=distortion_target(d_target),
                **kwargs)
