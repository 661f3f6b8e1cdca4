"""Stage 1 of MAP-RPS: a MAP estimate whose prior gradient is the diffusion model's noise prediction at ``t1``.

Theory (MAP-RPS, Thm 3.3): if ``p(x0 | x_t1) ~ N(E[x0|x_t1], r^2 I)`` then
``grad log p(x) = -(sqrt(1 - a) / (r^2 sqrt(a))) E_n[eps(sqrt(a) x + sqrt(1 - a) n, t1)]``, ``a = alpha_bar(t1)``.

Algorithm (``ALGORITHMS.md`` section 1): ``x <- A_pinv(y)``; then ``N`` AdamW steps (optax; b1 0.9, b2 0.999,
weight decay 0.01, learning rate cosine-decayed from ``lr`` to ``lr_min`` over ``N`` steps) on

    L(x) = ||y - A(x)||^2 + w <sg(eps(sqrt(a) x + sqrt(1 - a) n, t1)), x>      (sums, not means; fresh n per step)

whose gradient is ``2 J_A^T (A(x) - y) + w e``. The "stable" variant uses ``||y - A(x)||`` (the norm) instead of
its square. ``w = "auto"`` uses the principled weight ``w* = 2 sigma_y^2 sqrt(1 - a) / (r^2 sqrt(a))`` that makes
the fixed point the exact MAP for a Gaussian likelihood (``r^2 = (1 - a)/a`` unless given).

Second solver, same objective (``MAPConfig(solver="prox")``, linear ``A`` only): proximal gradient (forward step on
the prior term, exact proximal step on the data term), with a constant step ``eta`` (``prox_step``):

    x_{k+1} = argmin_x ||y - A x||^2 + ||x - (x_k - eta w e_k)||^2 / (2 eta)
            = (I + 2 eta A^T A)^{-1} (x_k - eta w e_k + 2 eta A^T y)             (``cg_iters`` conjugate-gradient steps)

Its fixed points are the stationary points of ``L`` (``2 A^T (A x - y) + w E_n[e] = 0``), as for AdamW without weight
decay. The data term is solved exactly at every step, so the step size is limited only by the prior term: on problems
with a large null space (super-resolution, inpainting) it reaches a given distortion in far fewer network
evaluations than AdamW, whose per-coordinate step is set by the stiff data term (measured on the digits prior: see
:mod:`mapreps_jax.app.digits`). With a constant step the iterate keeps the noise of the one-sample estimate of
``E_n[e]``: ``average = M`` returns the mean of the last ``M`` iterates (Polyak-Ruppert tail averaging; either solver).
Step size: the prior part of the iteration is stable while ``eta w lambda_max < 2``, ``lambda_max`` the largest
eigenvalue of ``d E_n[e] / dx`` (for a Gaussian prior ``N(mu, S)``: ``sqrt(a (1 - a)) / (a s_min^2 + 1 - a)``; at most
``sqrt(a / (1 - a))``, approached by priors concentrated near low-dimensional sets such as images), and converges
fastest near ``eta w lambda_max = 1``. The digits presets use ``eta w`` of 0.35 to 2 times ``sqrt((1 - a) / a)``.

Spaces (:mod:`mapreps_jax.space`): the iterate lives in the model's space; with a latent diffusion model this is
LMAP (``z`` the latent, ``L(z) = ||y - A(D(z))||^2 + w <sg(eps(sqrt(a) z + sqrt(1 - a) n, t1)), z>``, started at
``E(A_pinv y)``; AdamW only, the proximal step needs ``A`` linear in the state). The data fit is
``Problem.data_fit``, the one every algorithm uses. :func:`map_estimate_trace` also returns each step's
:class:`MAPInfo` (the data fit of the iterate), collected as scan outputs.

Start (``x_init`` not given): ``E(A_pinv y)`` with ``E`` the encoder's deterministic encoding (``init="mean"``: the
posterior mean of a KL autoencoder, the pre-quantisation latent of a VQ one, the identity in pixel space), or with
``init="sample"`` a *sample* of a KL encoder's posterior (what the paper's Stable Diffusion code starts from). The
sample for image ``i`` is drawn from ``fold_in(keys[i], INIT_KEY_DATA)``, ``INIT_KEY_DATA = 2**32 - 1``, ``keys[i]``
the image's Stage-1 key: the step keys are ``fold_in(keys[i], k)`` for ``k = 0, ..., N - 1`` (``k`` an int32 step
index, below ``2**31``), so the start never shares a key with a step (``split(keys[i])[j]`` would: with JAX's
partitionable threefry, the default, it equals ``fold_in(keys[i], j)``), and the per-step noise is the same with
either start (:func:`init_keys`). A VQ encoder and pixel space ignore the key (``"sample"`` is then ``"mean"``).

Units: images in [-1, 1]; ``sigma_y`` in the same units; ``t1`` a (real) diffusion step index; ``eta`` in units of
``x`` per unit of the gradient of ``L``. Each image of the batch is optimised independently (per-image losses are
summed; AdamW is element-wise; the conjugate-gradient inner products are per image).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._loops import bounded_loop, bounded_scan
from .diffusion import safe_sqrt
from .config import pytree_config, static
from .linalg import cg_solve
from .model import ScoreModel
from .rng import fold_keys, image_keys, normal_like
from .space import Problem
from .validation import check_measurement, check_same_batch, check_scalar, check_state

__all__ = ["MAPConfig", "MAPState", "MAPInfo", "map_estimate", "map_estimate_trace", "principled_weight", "cosine_lr",
           "safe_norm", "prox_data_fit", "init_keys", "MAP_SOLVERS", "MAP_INITS", "INIT_KEY_DATA"]

MAP_SOLVERS = ("adamw", "prox")
MAP_INITS = ("mean", "sample")

#: ``fold_in`` data of the start's key (``init="sample"``): the largest uint32, a step index Stage 1 never reaches.
INIT_KEY_DATA = 0xFFFFFFFF


def init_keys(key, batch: int):
    """The keys of the ``init="sample"`` start for a batch of ``batch`` images: ``fold_in(keys[i], INIT_KEY_DATA)``,
    ``keys = image_keys(key, batch)`` (the Stage-1 key of :func:`map_estimate`; see the module doc)."""
    return fold_keys(image_keys(key, batch, "init_keys"), np.uint32(INIT_KEY_DATA))


def principled_weight(sigma_y, a, r2=None):
    """``w* = 2 sigma_y^2 sqrt(1 - a) / (r2 sqrt(a))``; default ``r2 = (1 - a) / a`` (gives ``2 sigma_y^2 sqrt(a/(1-a))``)."""
    a = jnp.asarray(a, jnp.float32)
    if r2 is None:
        r2 = (1.0 - a) / a
    return 2.0 * jnp.asarray(sigma_y, jnp.float32) ** 2 * jnp.sqrt(1.0 - a) / (r2 * jnp.sqrt(a))


def cosine_lr(k, n, lr, lr_min):
    """Cosine decay ``lr_min + (lr - lr_min) (1 + cos(pi min(k, n) / n)) / 2`` (traceable in every argument)."""
    k = jnp.asarray(k, jnp.float32)
    n = jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)
    frac = jnp.minimum(k, n) / n
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def safe_norm(r, axes):
    """Euclidean norm over ``axes`` with a zero (not NaN) gradient at ``r = 0``."""
    return safe_sqrt(jnp.sum(r * r, axis=axes))


@pytree_config
class MAPConfig:
    """Stage-1 hyper-parameters. Numeric fields are pytree leaves (traceable: ``grad``/``vmap`` over them).

    Attributes:
      t1: diffusion time at which the prior gradient is read (default 10 pixel, 50 latent); a scalar or ``[B]``
        (one per image, e.g. a batch that mixes tasks).
      w: prior weight, or the string ``"auto"`` (principled weight from ``sigma_y``; static). A number, or an
        array broadcastable against ``x`` (e.g. ``[B, 1, 1, 1]``: one weight per image; so is ``sigma_y``).
      n_iter: number of steps ``N`` (one network evaluation each; traceable; see ``max_iter``).
      lr, lr_min: cosine learning-rate schedule from ``lr`` to ``lr_min`` (``solver="adamw"``).
      weight_decay: AdamW decoupled weight decay (0.01; ``solver="adamw"``).
      r2: optional ``r^2`` for ``w = "auto"``.
      prox_step: ``eta`` of ``solver="prox"`` (constant; a number or an array broadcastable against ``x``; see the
        module doc for its stable range).
      average: return the mean of the last ``average`` iterates (0: the last iterate); traceable.
      stable: static; use ``||y - A x||`` instead of its square (``solver="adamw"`` only).
      max_iter: static upper bound on ``n_iter``; when set, the loop is a masked ``lax.scan`` of that length, so it
        is reverse-mode differentiable with a traced ``n_iter``.
      solver: static; ``"adamw"`` (the paper's, default) or ``"prox"`` (see the module doc; linear operators).
      cg_iters: static; conjugate-gradient steps of the proximal step (``solver="prox"``).
      init: static; the start when ``x_init`` is not given: ``"mean"`` (default, ``E(A_pinv y)`` deterministic) or
        ``"sample"`` (a sample of a KL encoder's posterior, key ``fold_in(keys[i], INIT_KEY_DATA)``; module doc).
      remat: static; rematerialise the steps under reverse-mode differentiation (``jax.checkpoint`` on the scan
        step, :mod:`mapreps_jax._loops`): the gradient of a function of the result (w.r.t. ``w``, ``lr``, ``t1``,
        ``y``, ...) keeps only each step's carry (iterate and AdamW moments: O(steps x state) memory) instead of
        each step's network activations (O(steps x activations)), at the cost of one extra network forward per
        step in the backward pass. The result is the same (bitwise); only the memory and time of ``jax.grad``
        change. Used by :func:`mapreps_jax.tune.tune`.
    """

    t1: Any = 10.0
    w: Any = "auto"
    n_iter: Any = 200
    lr: Any = 0.5
    lr_min: Any = 1e-5
    weight_decay: Any = 0.01
    r2: Any = None
    prox_step: Any = 1.0
    average: Any = 0
    stable: bool = static(False)
    max_iter: Optional[int] = static(None)
    solver: str = static("adamw")
    cg_iters: int = static(20)
    init: str = static("mean")
    remat: bool = static(False)

    def __post_init__(self):
        if self.init not in MAP_INITS:
            raise ValueError(f"MAPConfig.init: expected one of {MAP_INITS}, got {self.init!r}")
        if isinstance(self.w, str) and self.w != "auto":
            raise ValueError(f"MAPConfig.w: expected a number or 'auto', got {self.w!r}")
        if self.solver not in MAP_SOLVERS:
            raise ValueError(f"MAPConfig.solver: expected one of {MAP_SOLVERS}, got {self.solver!r}")
        if self.solver == "prox" and self.stable:
            raise ValueError("MAPConfig: solver='prox' solves the squared data term exactly; stable=True (the norm) "
                             "needs solver='adamw'")
        if not isinstance(self.remat, bool):
            raise ValueError(f"MAPConfig.remat: expected a bool, got {self.remat!r}")
        if isinstance(self.cg_iters, bool) or not isinstance(self.cg_iters, int) or self.cg_iters < 1:
            raise ValueError(f"MAPConfig.cg_iters: expected a positive int, got {self.cg_iters!r}")
        w = "MAPConfig"
        check_scalar(self.t1, "t1 (Stage-1 diffusion time)", w, lo=-1.0, lo_inclusive=False)
        if not isinstance(self.w, str):
            check_scalar(self.w, "w (prior weight)", w, lo=0.0)
        check_scalar(self.n_iter, "n_iter (number of Stage-1 steps)", w, lo=1, integer=True)
        check_scalar(self.lr, "lr", w, lo=0.0, lo_inclusive=False)
        check_scalar(self.lr_min, "lr_min", w, lo=0.0)
        check_scalar(self.weight_decay, "weight_decay", w, lo=0.0)
        check_scalar(self.r2, "r2", w, lo=0.0, lo_inclusive=False)
        check_scalar(self.prox_step, "prox_step", w, lo=0.0, lo_inclusive=False)
        check_scalar(self.average, "average", w, lo=0, integer=True)
        if self.max_iter is not None:
            check_scalar(self.max_iter, "max_iter", w, lo=1, integer=True)


class MAPState(NamedTuple):
    """Carried from step to step: the iterate and the optax state."""

    x: jax.Array
    opt_state: Any


class MAPInfo(NamedTuple):
    """What a Stage-1 step reports: ``data_fit`` (``[B]``), ``||y - A(D(x))||^2`` of the new iterate."""

    data_fit: jax.Array


def _resolve_w(cfg: MAPConfig, a, sigma_y):
    if isinstance(cfg.w, str):
        if sigma_y is None:
            raise ValueError("map_estimate: w='auto' needs sigma_y (the measurement noise std, [-1,1] units)")
        return principled_weight(sigma_y, a, cfg.r2)
    return jnp.asarray(cfg.w, jnp.float32)


def prox_data_fit(op, y, v, eta, n_iter: int = 20, aty=None):
    """Proximal step of the data term: ``argmin_x ||y - A x||^2 + ||x - v||^2 / (2 eta)``, i.e. the solution of
    ``(I + 2 eta A^T A) x = v + 2 eta A^T y``, by ``n_iter`` conjugate-gradient steps per image started at ``v``.

    ``op`` linear; ``v`` of shape ``[B, *op.in_shape]``; ``eta`` a scalar or an array broadcastable against ``v``
    (one per image: ``[B, 1, ...]``); ``aty`` optionally ``op.AT(y)`` precomputed. The system is symmetric positive
    definite with eigenvalues in ``[1, 1 + 2 eta ||A||^2]``: CG is exact after as many steps as ``A^T A`` has
    distinct eigenvalues (2 for masks and block averages, 1 for the identity) and converges geometrically otherwise.
    """
    if not op.linear:
        raise ValueError(f"prox_data_fit: needs a linear operator (A^T); {op.name!r} is nonlinear")
    axes = tuple(range(v.ndim - len(op.in_shape), v.ndim))
    eta = jnp.asarray(eta, v.dtype)
    aty = op.AT(y) if aty is None else aty

    def mv(u):
        return u + 2.0 * eta * op.AT(op.A(u))

    return cg_solve(mv, v + 2.0 * eta * aty, v, axes, n_iter)


def map_estimate(key, model: ScoreModel, op, y, *, config: MAPConfig = MAPConfig(), sigma_y=None, x_init=None,
                 cond=None):
    """Stage 1: ``x_MAP`` for a batch of measurements ``y`` (``[B, *op.out_shape]``).

    Args:
      key: one PRNG key or ``[B]`` keys (:mod:`mapreps_jax.rng`); the noise ``n`` of step ``k`` for image ``i`` is
        ``normal(fold_in(keys[i], k))``.
      model: :class:`ScoreModel` (exact prior or network).
      op: forward :class:`~mapreps_jax.operators.Operator` (linear for ``solver="prox"``).
      y: measurements, ``[B, *op.out_shape]``.
      config: :class:`MAPConfig`.
      sigma_y: measurement noise std ([-1, 1] units), needed for ``w="auto"``.
      x_init: optional start in the model's space (default ``E(op.x_init(y))``: the pseudo-inverse for linear
        operators, encoded for a latent model; with ``config.init="sample"`` a posterior sample of the encoder from
        the keys :func:`init_keys` ``(key, B)``).
      cond: conditioning passed to the model.

    Returns ``x`` with shape ``[B, *state_shape]`` (``op.in_shape`` in pixel space, the latent shape for a latent
    model; the mean of the last ``config.average`` iterates when that is positive).
    """
    return _map(key, model, op, y, config, sigma_y, x_init, cond, None, "map_estimate")


def map_estimate_trace(key, model: ScoreModel, op, y, *, config: MAPConfig = MAPConfig(), sigma_y=None,
                       x_init=None, cond=None, collect=None):
    """:func:`map_estimate` that also returns a trace: ``(x, trace)``, ``trace`` the values of
    ``collect(state, info)`` (default: each step's :class:`MAPInfo`, ``data_fit [S, B]``) stacked over
    ``S = max_iter`` (zeros past ``n_iter``) or the concrete ``n_iter`` steps."""
    if collect is None:
        collect = _keep_info
    return _map(key, model, op, y, config, sigma_y, x_init, cond, collect, "map_estimate_trace")


def _keep_info(state, info):
    return info


def _map(key, model, op, y, cfg, sigma_y, x_init, cond, collect, where):
    y = check_measurement(op, y, where)
    check_scalar(sigma_y, "sigma_y (measurement noise std, [-1, 1] units)", where, lo=0.0)
    if x_init is not None:
        x_init = check_state(model, op, x_init, where, "x_init")
        check_same_batch(x_init, y, "x_init", "y", where)
    problem = Problem(model, op, y, cond)
    prox = cfg.solver == "prox"
    if prox and not op.linear:
        raise ValueError(f"{where}: solver='prox' needs a linear operator (it solves the data term with A^T); "
                         f"{op.name!r} is nonlinear: use solver='adamw'")
    if prox and not problem.space.is_pixel:
        raise ValueError(f"{where}: solver='prox' needs the data term linear in the state; {model.name!r} runs in "
                         f"the {problem.space.name!r} space (y - A(D(z)) is not linear in z): use solver='adamw'")
    keys = image_keys(key, y.shape[0], where)
    if x_init is not None:
        x = x_init
    elif cfg.init == "sample":
        x = problem.x_init(init_keys(keys, y.shape[0]))  # never a step's key (module doc)
    else:
        x = problem.x_init()
    t1 = jnp.asarray(cfg.t1, jnp.float32)
    a = model.alpha_bar(t1)
    if a.ndim:  # one t1 per image ([B]): broadcast over the event axes
        a = a.reshape(a.shape + (1,) * (x.ndim - a.ndim))
    w = _resolve_w(cfg, a, sigma_y)
    n_iter = cfg.n_iter
    average = jnp.asarray(cfg.average, jnp.int32)

    def schedule(count):
        return cosine_lr(count, n_iter, cfg.lr, cfg.lr_min)

    opt = optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    if prox:
        eta = jnp.asarray(cfg.prox_step, jnp.float32)
        aty = op.AT(y)

    def loss_fn(x, e):
        fit = problem.data_fit(x, "norm" if cfg.stable else "sq")
        return jnp.sum(fit) + jnp.sum(w * e * x), fit

    def body(k, carry):
        state, x_sum = carry
        n = normal_like(fold_keys(keys, k), state.x)  # image i, step k: normal(fold_in(keys[i], k))
        x_t = jnp.sqrt(a) * state.x + jnp.sqrt(1.0 - a) * n
        # ``e`` enters the inner gradient as a separate argument: that is the stop-gradient sg(e) of the loss
        # (no back-propagation through the network w.r.t. x), while outer derivatives (w.r.t. t1, w, lr, ...) still
        # flow through it.
        e = model.eps(x_t, t1, cond)
        if prox:
            state = MAPState(prox_data_fit(op, y, state.x - eta * w * e, eta, cfg.cg_iters, aty=aty), ())
        else:
            g, _ = jax.grad(loss_fn, has_aux=True)(state.x, e)
            updates, opt_state = opt.update(g, state.opt_state, state.x)
            state = MAPState(optax.apply_updates(state.x, updates), opt_state)
        carry = (state, jnp.where(k >= n_iter - average, x_sum + state.x, x_sum))
        return carry, (collect(state, MAPInfo(problem.data_fit(state.x))) if collect is not None else None)

    def result(carry):
        state, x_sum = carry
        m = jnp.clip(jnp.minimum(average, jnp.asarray(n_iter, jnp.int32)), 1, None).astype(x_sum.dtype)
        return jnp.where(average > 0, x_sum / m, state.x)

    carry = (MAPState(x, () if prox else opt.init(x)), jnp.zeros_like(x))
    if collect is None:
        return result(bounded_loop(lambda k, c: body(k, c)[0], carry, n_iter, cfg.max_iter, remat=cfg.remat))
    carry, trace = bounded_scan(body, carry, n_iter, cfg.max_iter, remat=cfg.remat)
    return result(carry), trace
