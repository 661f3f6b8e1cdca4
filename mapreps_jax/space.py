"""Where an algorithm's state lives, and the one data fit every algorithm goes through.

A :class:`Space` is a pair of pure functions

    encode(params, x[, key]) -> z          decode(params, z) -> x

between images ``x`` (``[B, *op.in_shape]``, [-1, 1] units) and the sampler's state ``z``. Pixel space
(:data:`PIXEL`, the default of every :class:`~mapreps_jax.model.ScoreModel`) is the identity; a latent diffusion
model carries its first-stage autoencoder as a latent space (:func:`latent_space`), and the same algorithms then run
on latents: that is all LMAP-RPS and the latent baselines are (``ALGORITHMS.md``).

:class:`Problem` bundles ``(model, op, y, cond)`` and writes the data fit once:

    r(z) = y - A(D(z))        (``Problem.residual``)
    fit(z) = ||r(z)||^2  or  ||r(z)||   per image   (``Problem.data_fit``)

used by Stage 1 (:func:`~mapreps_jax.map_stage.map_estimate`), every Stage-2 step (:mod:`~mapreps_jax.samplers`)
and every baseline (:mod:`~mapreps_jax.baselines`). In pixel space ``D`` is the identity function, so every pixel
result is the number it was before spaces existed (tested).

Clipping is a pixel-space operation: ``Problem.tweedie(..., clip=True)`` clips the clean estimate to [-1, 1] in
pixel space and leaves latents alone (latents are unbounded); a latent method that wants a clipped image clips after
decoding (``Problem.image(z, clip=True)``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from .diffusion import safe_sqrt, tweedie

__all__ = ["Space", "PIXEL", "latent_space", "Problem"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Space:
    """The state space of an algorithm (a pytree: ``params`` is the only leaf).

    Attributes:
      params: the encoder/decoder parameters (``None`` in pixel space).
      encode_fn: static ``encode_fn(params, x, key=None) -> z`` (``None``: identity). Without a key a deterministic
        encoding (a posterior mean); with one a sample.
      decode_fn: static ``decode_fn(params, z) -> x`` (``None``: identity).
      name: static, for messages.
    """

    params: Any = None
    encode_fn: Optional[Callable] = dataclasses.field(default=None, metadata=dict(static=True))
    decode_fn: Optional[Callable] = dataclasses.field(default=None, metadata=dict(static=True))
    name: str = dataclasses.field(default="pixel", metadata=dict(static=True))

    def __post_init__(self):
        if (self.encode_fn is None) != (self.decode_fn is None):
            raise ValueError(f"Space {self.name!r}: give both encode_fn and decode_fn (a latent space) or neither "
                             f"(pixel space)")

    @property
    def is_pixel(self) -> bool:
        return self.decode_fn is None

    def encode(self, x, key=None):
        """``z = E(x)`` (``x`` images ``[B, ...]`` in [-1, 1]); identity in pixel space."""
        if self.is_pixel:
            return x
        return self.encode_fn(self.params, x, key)

    def decode(self, z):
        """``x = D(z)``; identity in pixel space."""
        if self.is_pixel:
            return z
        return self.decode_fn(self.params, z)

    def state_shape(self, image_shape) -> tuple:
        """The state's event shape for images of event shape ``image_shape`` (``op.in_shape``), from the encoder's
        output shape (``jax.eval_shape``: no computation)."""
        image_shape = tuple(image_shape)
        if self.is_pixel:
            return image_shape
        leaves, treedef = jax.tree_util.tree_flatten(self.params)
        structs = tuple(jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for v in leaves)
        return _latent_shape(self.encode_fn, treedef, structs, image_shape)


PIXEL = Space()


@functools.lru_cache(maxsize=64)
def _latent_shape(encode_fn, treedef, structs, image_shape):
    """The encoder's output event shape for one image (traced once per encoder, parameter shapes and image shape)."""
    x = jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32)
    params = jax.tree_util.tree_unflatten(treedef, structs)
    return tuple(jax.eval_shape(lambda p, v: encode_fn(p, v), params, x).shape[1:])


def latent_space(params, encode_fn: Callable, decode_fn: Callable, name: str = "latent") -> Space:
    """A latent space from an autoencoder's ``encode_fn(params, x, key=None) -> z`` and ``decode_fn(params, z)``."""
    if not callable(encode_fn) or not callable(decode_fn):
        raise TypeError(f"latent_space: encode_fn and decode_fn must be callables, got {type(encode_fn).__name__} "
                        f"and {type(decode_fn).__name__}")
    return Space(params=params, encode_fn=encode_fn, decode_fn=decode_fn, name=name)


def _sum_event(v, n_event):
    return jnp.sum(v, axis=tuple(range(v.ndim - n_event, v.ndim)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Problem:
    """An inverse problem ``y = A(x) + n`` seen from the state space of ``model`` (a pytree).

    Attributes:
      model: the :class:`~mapreps_jax.model.ScoreModel` (its ``space`` is the state space).
      op: the forward :class:`~mapreps_jax.operators.Operator` (``None`` for unconditional sampling).
      y: measurements ``[B, *op.out_shape]`` (``None`` with ``op``).
      cond: conditioning passed to the network (e.g. a text embedding), or ``None``.
    """

    model: Any
    op: Any = None
    y: Any = None
    cond: Any = None

    @property
    def space(self) -> Space:
        return self.model.space

    def image(self, z, clip: bool = False):
        """``D(z)``, clipped to [-1, 1] when ``clip``."""
        x = self.space.decode(z)
        return jnp.clip(x, -1.0, 1.0) if clip else x

    def state_shape(self) -> tuple:
        """Event shape of the state (``op.in_shape`` in pixel space)."""
        return self.space.state_shape(self.op.in_shape)

    def x_init(self, key=None):
        """``E(A_init(y))``: the operator's starting image (``A_pinv y`` for linear operators) in the state space."""
        return self.space.encode(self.op.x_init(self.y), key)

    def residual(self, z, clip: bool = False):
        """``r(z) = y - A(D(z))`` (``[B, *op.out_shape]``). ``clip``: ``D(z)`` clipped to [-1, 1] first, in a latent
        space only (a pixel state that needs clipping was clipped as a state, e.g. by :meth:`tweedie`)."""
        x = self.space.decode(z)
        if clip and not self.space.is_pixel:
            x = jnp.clip(x, -1.0, 1.0)
        return self.y - self.op.A(x)

    def data_fit(self, z, loss: str = "sq", clip: bool = False):
        """Per-image data fit ``[B]``: ``||r(z)||^2`` (``loss="sq"``) or ``||r(z)||`` (``"norm"``, with a zero
        gradient at ``r = 0``); ``clip`` as in :meth:`residual`."""
        r = self.residual(z, clip)
        sq = _sum_event(r * r, len(self.op.out_shape))
        if loss == "sq":
            return sq
        if loss == "norm":
            return safe_sqrt(sq)
        raise ValueError(f"Problem.data_fit: loss must be 'sq' or 'norm', got {loss!r}")

    def residual_norm(self, z):
        """``||y - A(D(z))||`` per image (``[B]``); zeros without measurements (unconditional sampling)."""
        if self.op is None or self.y is None:
            return jnp.zeros(z.shape[:1], z.dtype)
        return jnp.sqrt(self.data_fit(z, "sq"))

    def tweedie(self, z_t, t, clip: bool):
        """``(x0, eps, v)``: the network's Tweedie estimate of the clean state at ``t``, clipped to [-1, 1] when
        ``clip`` and the state is pixels (a latent is never clipped), ``eps`` and the learned-variance channels
        ``v`` (``None`` without them)."""
        e, v = self.model.eps_and_var(z_t, t, self.cond)
        x0 = tweedie(z_t, e, self.model.alpha_bar(t), clip and self.space.is_pixel)
        return x0, e, v
