"""Stage 1 of MAP-RPS: a MAP estimate whose prior gradient is the diffusion model's noise prediction at ``t1``.

Theory (MAP-RPS, Thm 3.3): if ``p(x0 | x_t1) ~ N(E[x0|x_t1], r^2 I)`` then
``grad log p(x) = -(sqrt(1 - a) / (r^2 sqrt(a))) E_n[eps(sqrt(a) x + sqrt(1 - a) n, t1)]``, ``a = alpha_bar(t1)``.

Algorithm (``ALGORITHMS.md`` section 1): ``x <- A_pinv(y)``; then ``N`` AdamW steps (optax; b1 0.9, b2 0.999,
weight decay 0.01, learning rate cosine-decayed from ``lr`` to ``lr_min`` over ``N`` steps) on

    L(x) = ||y - A(x)||^2 + w <sg(eps(sqrt(a) x + sqrt(1 - a) n, t1)), x>      (sums, not means; fresh n per step)

whose gradient is ``2 J_A^T (A(x) - y) + w e``. The "stable" variant uses ``||y - A(x)||`` (the norm) instead of
its square. ``w = "auto"`` uses the principled weight ``w* = 2 sigma_y^2 sqrt(1 - a) / (r^2 sqrt(a))`` that makes
the fixed point the exact MAP for a Gaussian likelihood (``r^2 = (1 - a)/a`` unless given).

Units: images in [-1, 1]; ``sigma_y`` in the same units; ``t1`` a (real) diffusion step index.
Each image of the batch is optimised independently (per-image losses are summed; AdamW is element-wise).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ._loops import bounded_loop
from .diffusion import safe_sqrt
from .model import ScoreModel
from .validation import check_measurement

__all__ = ["MAPConfig", "MAPState", "map_estimate", "principled_weight", "cosine_lr", "safe_norm"]


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


def _event_axes(x, op):
    return tuple(range(x.ndim - len(op.out_shape), x.ndim))


@dataclasses.dataclass(frozen=True)
class MAPConfig:
    """Stage-1 hyper-parameters. Numeric fields are pytree leaves (traceable: ``grad``/``vmap`` over them).

    Attributes:
      t1: diffusion time at which the prior gradient is read (default 10 pixel, 50 latent); a scalar or ``[B]``
        (one per image, e.g. a batch that mixes tasks).
      w: prior weight, or the string ``"auto"`` (principled weight from ``sigma_y``; static). A number, or an
        array broadcastable against ``x`` (e.g. ``[B, 1, 1, 1]``: one weight per image; so is ``sigma_y``).
      n_iter: number of AdamW steps ``N`` (traceable; see ``max_iter``).
      lr, lr_min: cosine learning-rate schedule from ``lr`` to ``lr_min``.
      weight_decay: AdamW decoupled weight decay (0.01).
      stable: static; use ``||y - A x||`` instead of its square.
      max_iter: static upper bound on ``n_iter``; when set, the loop is a masked ``lax.scan`` of that length, so it
        is reverse-mode differentiable with a traced ``n_iter``.
      r2: optional ``r^2`` for ``w = "auto"``.
    """

    t1: Any = 10.0
    w: Any = "auto"
    n_iter: Any = 200
    lr: Any = 0.5
    lr_min: Any = 1e-5
    weight_decay: Any = 0.01
    r2: Any = None
    stable: bool = dataclasses.field(default=False, metadata=dict(static=True))
    max_iter: Optional[int] = dataclasses.field(default=None, metadata=dict(static=True))

    def __post_init__(self):
        if isinstance(self.w, str) and self.w != "auto":
            raise ValueError(f"MAPConfig.w: expected a number or 'auto', got {self.w!r}")


# ``w`` is a leaf unless it is the string "auto"; a str leaf would break tracing, so flatten it statically.
def _mapconfig_flatten(c):
    w_static = c.w if isinstance(c.w, str) else None
    leaves = (c.t1, None if w_static else c.w, c.n_iter, c.lr, c.lr_min, c.weight_decay, c.r2)
    return leaves, (w_static, c.stable, c.max_iter)


def _mapconfig_unflatten(aux, leaves):
    w_static, stable, max_iter = aux
    t1, w, n_iter, lr, lr_min, wd, r2 = leaves
    obj = object.__new__(MAPConfig)
    for k, v in dict(t1=t1, w=w_static if w_static else w, n_iter=n_iter, lr=lr, lr_min=lr_min,
                     weight_decay=wd, r2=r2, stable=stable, max_iter=max_iter).items():
        object.__setattr__(obj, k, v)
    return obj


jax.tree_util.register_pytree_node(MAPConfig, _mapconfig_flatten, _mapconfig_unflatten)


class MAPState(NamedTuple):
    """Carried from step to step: the iterate and the optax state."""

    x: jax.Array
    opt_state: Any


def _resolve_w(cfg: MAPConfig, a, sigma_y):
    if isinstance(cfg.w, str):
        if sigma_y is None:
            raise ValueError("map_estimate: w='auto' needs sigma_y (the measurement noise std, [-1,1] units)")
        return principled_weight(sigma_y, a, cfg.r2)
    return jnp.asarray(cfg.w, jnp.float32)


def map_estimate(key, model: ScoreModel, op, y, *, config: MAPConfig = MAPConfig(), sigma_y=None, x_init=None,
                 cond=None, return_trace: bool = False):
    """Stage 1: ``x_MAP`` for a batch of measurements ``y`` (``[B, *op.out_shape]``).

    Args:
      key: PRNG key (noise ``n`` of each step).
      model: :class:`ScoreModel` (exact prior or network).
      op: forward :class:`~mapreps_jax.operators.Operator`.
      y: measurements, ``[B, *op.out_shape]``.
      config: :class:`MAPConfig`.
      sigma_y: measurement noise std ([-1, 1] units), needed for ``w="auto"``.
      x_init: optional start (default ``op.x_init(y)``, the pseudo-inverse for linear operators).
      cond: conditioning passed to the model.
      return_trace: also return the per-step data-fit loss ``||y - A x||^2`` (``[max_iter or N, B]``; needs a
        concrete ``n_iter`` or ``max_iter``).

    Returns ``x`` with shape ``[B, *op.in_shape]`` (and the trace when asked).
    """
    y = check_measurement(op, y, "map_estimate")
    cfg = config
    x = op.x_init(y) if x_init is None else jnp.asarray(x_init, jnp.float32)
    t1 = jnp.asarray(cfg.t1, jnp.float32)
    a = model.alpha_bar(t1)
    if a.ndim:  # one t1 per image ([B]): broadcast over the event axes
        a = a.reshape(a.shape + (1,) * (x.ndim - a.ndim))
    w = _resolve_w(cfg, a, sigma_y)
    n_iter = cfg.n_iter
    axes = _event_axes(y, op)

    def schedule(count):
        return cosine_lr(count, n_iter, cfg.lr, cfg.lr_min)

    opt = optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )

    def loss_fn(x, e):
        r = y - op.A(x)
        fit = safe_norm(r, axes) if cfg.stable else jnp.sum(r * r, axis=axes)
        return jnp.sum(fit) + jnp.sum(w * e * x), fit

    def body(k, state: MAPState):
        n = jax.random.normal(jax.random.fold_in(key, k), state.x.shape, state.x.dtype)
        x_t = jnp.sqrt(a) * state.x + jnp.sqrt(1.0 - a) * n
        # ``e`` enters the inner gradient as a separate argument: that is the stop-gradient sg(e) of the loss
        # (no back-propagation through the network w.r.t. x), while outer derivatives (w.r.t. t1, w, lr, ...) still
        # flow through it.
        e = model.eps(x_t, t1, cond)
        g, _ = jax.grad(loss_fn, has_aux=True)(state.x, e)
        updates, opt_state = opt.update(g, state.opt_state, state.x)
        return MAPState(optax.apply_updates(state.x, updates), opt_state)

    state = MAPState(x, opt.init(x))
    if not return_trace:
        return bounded_loop(body, state, n_iter, cfg.max_iter).x

    length = cfg.max_iter if cfg.max_iter is not None else int(n_iter)

    def scan_body(st, k):
        st = jax.lax.cond(k < n_iter, lambda s: body(k, s), lambda s: s, st)
        r = y - op.A(st.x)
        return st, jnp.sum(r * r, axis=axes)

    state, trace = jax.lax.scan(scan_body, state, jnp.arange(length, dtype=jnp.int32))
    return state.x, trace

