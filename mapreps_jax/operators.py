"""Forward operators ("tasks") of imaging inverse problems: ``y = A(x) + sigma_y * n``.

An :class:`Operator` is a pure function of the image plus a pytree of fixed data (mask, kernel spectrum,
permutation, matrix, ...). The fixed data are pytree *leaves* (traced by ``jit``, batchable by ``vmap``: a stack of
operators that differ only in their seed is a valid batched operator); everything else (name, shapes, the functions
themselves and their static configuration) is static. Two operators built with the same task and configuration but
different seeds therefore share one compiled program.

Conventions (``CONVENTIONS.md``):

* images are single-image event shapes ``(H, W, C)`` (NHWC without the batch axis) in [-1, 1] units; every method
  accepts any number of leading batch dimensions ``(*batch, *in_shape)`` and maps over them with ``vmap``;
* measurement noise ``y = A(x) + sigma_y * n``, ``n ~ N(0, I)``, ``sigma_y`` in [-1, 1] units (:meth:`Operator.measure`);
* fixed data (masks, kernels, permutations, random matrices) are drawn ONCE from ``seed`` when the operator is built
  (NumPy ``default_rng(seed)``, PCG64: platform independent), never per call;
* dtypes follow the input: the fixed data are cast to the input's (real or complex) precision inside each call, so a
  float32 image gives a float32 measurement and a float64 one (under ``jax.experimental.enable_x64``) a float64 one;
* linear operators carry an explicit adjoint where it is natural (masks, block average, convolutions, Walsh-Hadamard,
  matrices) and otherwise one derived with ``jax.linear_transpose``; every adjoint is tested against
  ``jax.linear_transpose`` and the identity ``<A u, v> = <u, A^T v>``;
* pseudo-inverses: closed form / SVD where they exist (computed at build time), truncated inverse filter for
  convolutions, optional conjugate gradients on ``A A^T`` for bicubic SR.

Tasks (:data:`TASKS`, built by :func:`make_operator`):

==================  ==========================================================================================
``denoise``         identity.
``inpaint_box``     ``y = m * x``, ``m = 0`` on a centred ``box x box`` square (default ``min(H, W) // 2``).
``inpaint_random``  ``y = m * x``, a fraction ``ratio`` (default 0.7) of the pixels removed (exactly
                    ``round(ratio * H * W)`` pixels, chosen by a seeded permutation; same mask for every channel).
``inpaint_random_official``
                    the paper's code's random mask: ``randperm(H W)[:H W // 2]`` indexes the channel-interleaved
                    ``(H, W, C)`` vector directly (1/6 of all entries missing for ``C = 3``, all in the top rows).
``inpaint_mask``    ``y = m * x`` with a user 0/1 ``mask`` of shape ``(H, W)``, ``(H, W, 1)`` or ``(H, W, C)``.
``sr``              super-resolution by ``factor`` (2, 4 or 8): ``kind="avg"`` (block average) or ``"bicubic"``
                    (antialiased Keys cubic, ``a = -0.5``, PIL ``Image.resize(BICUBIC)`` semantics).
``gaussian_blur``   circular convolution with a ``kernel_size``-square Gaussian (61, std 3.0).
``aniso_blur``      circular convolution with a separable Gaussian, std ``(std_h, std_w) = (1, 20)``, size 61.
``aniso_blur_svd``  the paper's code's anisotropic blur: separable 9-tap Gaussians (std 1 vertical, 20 horizontal),
                    zero boundary, forward and pseudo-inverse through 1-D SVDs truncated below 0.03.
``motion_blur``     circular convolution with a seeded 61 x 61 random camera-shake kernel, ``intensity`` 0.5.
``cs``              compressed sensing: seeded pixel permutation, orthonormal Walsh-Hadamard transform, keep
                    ``H * W / ratio`` seeded rows, per channel; ``y`` has shape ``(H * W / ratio, C)``;
                    ``construction="official"``: a seeded subset of the Walsh-Hadamard coefficients (no pixel
                    permutation), as the paper's code.
``hdr``             ``clip(2 x, -1, 1)`` (nonlinear); ``pinv="identity"``: the paper's code's ``A^+ y = y``.
``phase_retrieval`` ``|FFT2|`` of the image zero-padded to ``(2H, 2W)`` (nonlinear).
``matrix``          vectors ``(d,)``: ``y = M x`` with a user ``matrix`` or a seeded Gaussian one with ``rows`` rows.
``mask``            vectors ``(d,)``: keeps ``keep`` seeded coordinates, ``y`` has shape ``(keep,)``.
==================  ==========================================================================================

Official task definitions. The paper's pixel-space code builds its operators with the SVD classes of DDRM / DDNM
(``svd_operators.py``), which differ from the clean definitions above in places. They are available beside them
(the defaults do not change) and are what :mod:`mapreps_jax.presets` uses: ``inpaint_random_official``,
``aniso_blur_svd``, ``cs`` with ``construction="official"``, ``hdr`` with ``pinv="identity"``; the official SR x4
(block average, pixel replication as pseudo-inverse) is ``sr`` with ``kind="avg"``. Each is tested against a
float64 NumPy transcription of the official construction (``tests/test_operators_official.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "Operator",
    "make_operator",
    "custom_operator",
    "stack_operators",
    "TASKS",
    "fwht",
    "gaussian_kernel",
    "motion_kernel",
    "bicubic_matrix",
    "official_blur_matrix",
    "DEFAULT_PINV_RCOND",
]

#: Relative threshold of the truncated inverse filter used as the pseudo-inverse of the blur operators: Fourier
#: coefficients with ``|K| <= rcond * max |K|`` are treated as zero (the ``rcond`` of ``numpy.linalg.pinv``).
DEFAULT_PINV_RCOND = 1e-3

_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------------------
# Static function wrapper: value-equal (hashable) so that operators with the same configuration share jit caches.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Fn:
    """``fn(data, v) = func(data, v, **dict(kw))``; compared and hashed by value (``func`` identity, ``kw`` values)."""

    func: Callable
    kw: tuple = ()

    def __call__(self, data, v):
        return self.func(data, v, **dict(self.kw))


def _fn(func, **kw):
    return _Fn(func, tuple(sorted(kw.items())))


def _default_float():
    return jax.dtypes.canonicalize_dtype(np.float64)


def _default_complex():
    return jax.dtypes.canonicalize_dtype(np.complex128)


def _as_float_array(v):
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.inexact):
        v = v.astype(_default_float())
    return v


def _complex_of(dtype):
    return jnp.result_type(dtype, jnp.complex64)


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _apply_batched(fn, nb, data, v, per_image: bool = False):
    """``fn(data, .)`` mapped (``vmap``) over the ``nb`` leading axes of ``v``. Jitted with ``fn`` static (value-equal
    :class:`_Fn` wrappers), so eager calls compile once per configuration and shape instead of dispatching every
    primitive; inside an outer ``jit`` it is simply inlined.

    ``per_image``: ``data = (per_image_tree, shared_tree)``; the leaves of ``per_image_tree`` carry a leading axis
    mapped together with the innermost batch axis of ``v`` (the image axis); ``shared_tree`` is broadcast."""

    def single(d, t):
        return fn(d, t)

    if per_image:
        f = jax.vmap(single, in_axes=((0, None), 0))
        for _ in range(nb - 1):
            f = jax.vmap(f, in_axes=(None, 0))
        return f(data, v)
    f = lambda t: single(data, t)  # noqa: E731
    for _ in range(nb):
        f = jax.vmap(f)
    return f(v)


# ----------------------------------------------------------------------------------------------------------------
# The operator pytree
# ----------------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Operator:
    """A forward operator ``A: R^{in_shape} -> R^{out_shape}`` (a pytree: only ``data`` is a leaf).

    Attributes:
      data: pytree of arrays (the fixed data drawn at build time).
      name: static; the task name, used in messages.
      in_shape: static event shape of ``x`` (``(H, W, C)`` for images, ``(d,)`` for vectors).
      out_shape: static event shape of ``y``.
      linear: static; whether ``A`` is linear (then ``AT``, ``matrix`` exist).
      forward_fn: static ``(data, x_single) -> y_single``.
      adjoint_fn: static ``(data, y_single) -> x_single`` (linear operators only), ``A^T``.
      pinv_fn: static ``(data, y_single) -> x_single``, a pseudo-inverse ``A^+`` (``None`` when there is none).
      init_fn: static ``(data, y_single) -> x_single``, a starting point for algorithms (``A^+ y`` for linear
        operators, a documented heuristic for nonlinear ones).
      per_image_data: static; ``data = (per_image, shared)`` with one entry of ``per_image`` per image of a fixed
        batch (:func:`stack_operators`); ``False`` (default): the same data for every image.
      valid_fn: static ``(data, y_single) -> 0/1`` mask of the measurement entries that are real (the others are
        padding and get no noise in :meth:`measure`); ``None``: all entries are real.
    """

    data: Any
    name: str = dataclasses.field(metadata=dict(static=True))
    in_shape: tuple = dataclasses.field(metadata=dict(static=True))
    out_shape: tuple = dataclasses.field(metadata=dict(static=True))
    linear: bool = dataclasses.field(metadata=dict(static=True))
    forward_fn: Callable = dataclasses.field(metadata=dict(static=True))
    adjoint_fn: Optional[Callable] = dataclasses.field(default=None, metadata=dict(static=True))
    pinv_fn: Optional[Callable] = dataclasses.field(default=None, metadata=dict(static=True))
    init_fn: Optional[Callable] = dataclasses.field(default=None, metadata=dict(static=True))
    per_image_data: bool = dataclasses.field(default=False, metadata=dict(static=True))
    valid_fn: Optional[Callable] = dataclasses.field(default=None, metadata=dict(static=True))

    # -- batching -------------------------------------------------------------------------------------------------

    def _map(self, fn, v, event_shape, arg, method):
        v = _as_float_array(v)
        event_shape = tuple(event_shape)
        nb = v.ndim - len(event_shape)
        if nb < 0 or tuple(v.shape[nb:]) != event_shape:
            raise ValueError(
                f"Operator {self.name!r}.{method}: {arg} must have shape (*batch, {', '.join(map(str, event_shape))})"
                f" i.e. trailing shape {event_shape}; got shape {tuple(v.shape)}")
        if self.per_image_data:
            n_img = jax.tree_util.tree_leaves(self.data[0])[0].shape[0]
            if nb < 1 or v.shape[nb - 1] != n_img:
                raise ValueError(
                    f"Operator {self.name!r}.{method}: this operator holds one task per image for a batch of {n_img} "
                    f"images, so {arg} must have shape (..., {n_img}, {', '.join(map(str, event_shape))}); "
                    f"got shape {tuple(v.shape)}")
        return _apply_batched(fn, nb, self.data, v, self.per_image_data)

    # -- methods --------------------------------------------------------------------------------------------------

    def A(self, x):
        """``A(x)`` for ``x`` of shape ``(*batch, *in_shape)``; returns ``(*batch, *out_shape)``."""
        return self._map(self.forward_fn, x, self.in_shape, "x", "A")

    __call__ = A

    def AT(self, y):
        """The adjoint ``A^T y`` (linear operators only), ``y`` of shape ``(*batch, *out_shape)``."""
        if not self.linear or self.adjoint_fn is None:
            raise TypeError(f"Operator {self.name!r} is nonlinear: it has no adjoint (use Operator.vjp(x, v), "
                            f"the transposed Jacobian at x)")
        return self._map(self.adjoint_fn, y, self.out_shape, "y", "AT")

    def pinv(self, y):
        """A pseudo-inverse ``A^+ y`` (see :func:`make_operator` for each task's definition)."""
        if self.pinv_fn is None:
            raise TypeError(f"Operator {self.name!r} has no pseudo-inverse; use Operator.x_init(y) for a starting "
                            f"point")
        return self._map(self.pinv_fn, y, self.out_shape, "y", "pinv")

    def x_init(self, y):
        """Starting point for algorithms: ``A^+ y`` for linear operators, a documented heuristic otherwise."""
        fn = self.init_fn if self.init_fn is not None else self.pinv_fn
        if fn is None:
            raise TypeError(f"Operator {self.name!r} has neither an init_fn nor a pinv_fn")
        return self._map(fn, y, self.out_shape, "y", "x_init")

    def vjp(self, x, v):
        """``J_A(x)^T v``: the transposed Jacobian of ``A`` at ``x`` applied to ``v`` (batched like :meth:`A`)."""
        _, pullback = jax.vjp(self.A, _as_float_array(x))
        return pullback(jnp.asarray(v))[0]

    def measure(self, key, x, sigma_y):
        """``y = A(x) + sigma_y * n``, ``n ~ N(0, I)`` of ``A(x)``'s shape; ``sigma_y`` in [-1, 1] units (a scalar or
        an array broadcastable against ``A(x)``). Deterministic in ``key``: one key or ``[B]`` keys, image ``i``'s
        noise drawn from ``image_keys(key, B)[i]`` alone (:mod:`mapreps_jax.rng`)."""
        from .rng import image_keys, normal_like
        from .validation import check_scalar

        check_scalar(sigma_y, "sigma_y (measurement noise std, [-1, 1] units)", "measure", lo=0.0)
        y = self.A(x)
        n = normal_like(image_keys(key, y.shape[0], "measure"), y)
        if self.valid_fn is not None:  # padded entries (see stack_operators) stay exactly zero
            n = n * self._map(self.valid_fn, y, self.out_shape, "y", "measure")
        return y + jnp.asarray(sigma_y, y.dtype) * n

    def matrix(self, dtype=None):
        """Dense ``[prod(out_shape), prod(in_shape)]`` matrix of a linear operator (row-major flattening of the
        event shapes), for small problems such as the exact testbed."""
        if not self.linear:
            raise TypeError(f"Operator {self.name!r} is nonlinear: no matrix (use jax.jacfwd at a point)")
        dtype = _default_float() if dtype is None else dtype
        n = math.prod(self.in_shape)
        cols = self.A(jnp.eye(n, dtype=dtype).reshape((n,) + tuple(self.in_shape)))
        return cols.reshape(n, -1).T

    @property
    def in_size(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)


def custom_operator(name: str, in_shape: tuple, out_shape: tuple, forward_fn: Callable, data: Any = None, *,
                    linear: bool = False, adjoint_fn: Optional[Callable] = None, pinv_fn: Optional[Callable] = None,
                    init_fn: Optional[Callable] = None) -> Operator:
    """An :class:`Operator` from user functions ``(data, x_single) -> y_single`` (e.g. a learned network whose
    parameters are ``data``). For a linear operator without an explicit ``adjoint_fn``, the adjoint is derived with
    ``jax.linear_transpose``."""
    in_shape = _check_shape(in_shape, "in_shape")
    out_shape = _check_shape(out_shape, "out_shape")
    if linear and adjoint_fn is None:
        adjoint_fn = _fn(_lt_adjoint, fwd=forward_fn, in_shape=in_shape)
    return Operator(data={} if data is None else data, name=name, in_shape=in_shape, out_shape=out_shape,
                    linear=bool(linear), forward_fn=forward_fn, adjoint_fn=adjoint_fn, pinv_fn=pinv_fn,
                    init_fn=init_fn)


def stack_operators(ops, counts) -> Operator:
    """One operator for a batch that mixes several tasks: image ``i`` of the batch is measured by
    ``ops[task(i)]``, with ``task = repeat(arange(len(ops)), counts)`` (contiguous blocks).

    All ``ops`` must share ``in_shape``. Measurements are flattened and zero-padded to the longest one:
    ``out_shape = (max_j prod(ops[j].out_shape),)``; the padded entries are exactly zero in ``A(x)`` and in
    :meth:`Operator.measure` (no noise there), so every per-image norm and sum (DPS, MAP) equals that of the image's
    own task. Per-image means over ``y`` (RED-diff's data term) are over the padded length ``M``: multiply by
    ``M / prod(out_shape_j)`` to recover the task's own mean. The operator is bound to batches of exactly
    ``sum(counts)`` images (on the innermost batch axis).

    Why: one compiled sampler (one ``jit`` of MAP, RPS, DPS, ...) serves every task of the batch, and the network
    runs on the whole batch at once. Each image evaluates every task's forward map (a ``lax.switch`` under ``vmap``
    is a select), which is cheap next to a network evaluation. Methods that some ``op`` lacks (``AT`` of a nonlinear
    operator, ``pinv``) are absent from the stack.
    """
    ops = tuple(ops)
    counts = tuple(int(c) for c in counts)
    if not ops or len(ops) != len(counts):
        raise ValueError(f"stack_operators: expected one count per operator, got {len(ops)} operators and counts "
                         f"{counts}")
    if any(c < 1 for c in counts):
        raise ValueError(f"stack_operators: every count must be >= 1, got {counts}")
    for op in ops:
        if not isinstance(op, Operator):
            raise TypeError(f"stack_operators: expected Operator instances, got {type(op).__name__}")
        if op.per_image_data:
            raise ValueError(f"stack_operators: operator {op.name!r} is already a stack")
    in_shape = ops[0].in_shape
    for op in ops[1:]:
        if op.in_shape != in_shape:
            raise ValueError(f"stack_operators: every operator must have in_shape {in_shape}; {op.name!r} has "
                             f"{op.in_shape}")
    out_shapes = tuple(op.out_shape for op in ops)
    sizes = tuple(math.prod(o) for o in out_shapes)
    M = max(sizes)
    task = jnp.asarray(np.repeat(np.arange(len(ops)), counts), jnp.int32)
    data = ({"task": task}, tuple(op.data for op in ops))

    def stacked(fns, kind):
        if any(f is None for f in fns):
            return None
        return _fn(_stack_to_x if kind == "to_x" else _stack_to_y, fns=tuple(fns), sizes=sizes,
                   out_shapes=out_shapes, M=M)

    linear = all(op.linear for op in ops)
    inits = [op.init_fn if op.init_fn is not None else op.pinv_fn for op in ops]
    return Operator(data=data, name="stack(" + ",".join(op.name for op in ops) + ")", in_shape=in_shape,
                    out_shape=(M,), linear=linear, forward_fn=stacked([op.forward_fn for op in ops], "to_y"),
                    adjoint_fn=stacked([op.adjoint_fn for op in ops], "to_x") if linear else None,
                    pinv_fn=stacked([op.pinv_fn for op in ops], "to_x"), init_fn=stacked(inits, "to_x"),
                    per_image_data=True, valid_fn=_fn(_stack_valid, sizes=sizes))


def _stack_to_y(data, x, *, fns, sizes, out_shapes, M):
    per, shared = data
    branches = [functools.partial(lambda j, v: jnp.pad(fns[j](shared[j], v).reshape(-1), (0, M - sizes[j])), j)
                for j in range(len(fns))]
    return lax.switch(per["task"], branches, x)


def _stack_to_x(data, y, *, fns, sizes, out_shapes, M):
    per, shared = data
    branches = [functools.partial(lambda j, v: fns[j](shared[j], v[:sizes[j]].reshape(out_shapes[j])), j)
                for j in range(len(fns))]
    return lax.switch(per["task"], branches, y)


def _stack_valid(data, y, *, sizes):
    per, _ = data
    n = jnp.asarray(sizes, jnp.int32)[per["task"]]
    return (jnp.arange(y.shape[0]) < n).astype(y.dtype)


def _lt_adjoint(data, y, *, fwd, in_shape):
    """Adjoint by ``jax.linear_transpose`` of ``x -> fwd(data, x)`` at the dtype of ``y``."""
    f = lambda x: fwd(data, x)  # noqa: E731
    return jax.linear_transpose(f, jax.ShapeDtypeStruct(in_shape, y.dtype))(y)[0]


# ----------------------------------------------------------------------------------------------------------------
# Element-wise and masking operators
# ----------------------------------------------------------------------------------------------------------------


def _identity(data, x):
    return x


def _mask_mul(data, x):
    return x * data["mask"].astype(x.dtype)


def _hdr_fwd(data, x):
    return jnp.clip(2 * x, -1, 1)


def _half(data, y):
    return y / 2


def _take(data, x):
    return x[data["idx"]]


def _scatter(data, y, *, d):
    return jnp.zeros((d,) + y.shape[1:], y.dtype).at[data["idx"]].set(y)


# ----------------------------------------------------------------------------------------------------------------
# Super-resolution
# ----------------------------------------------------------------------------------------------------------------


def _avg_down(data, x, *, f):
    H, W, C = x.shape
    return x.reshape(H // f, f, W // f, f, C).mean(axis=(1, 3))


def _replicate(y, f):
    return jnp.repeat(jnp.repeat(y, f, axis=0), f, axis=1)


def _avg_adjoint(data, y, *, f):
    return _replicate(y, f) / (f * f)


def _avg_pinv(data, y, *, f):
    return _replicate(y, f)


def _keys_cubic(t, a=-0.5):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((t - 5) * t + 8) * t * a - 4 * a, 0.0))


def bicubic_matrix(n: int, factor: int, a: float = -0.5) -> np.ndarray:
    """The ``[n // factor, n]`` matrix of antialiased bicubic downsampling along one axis (float64).

    Output sample ``i`` sits at input coordinate ``c_i = (i + 1/2) factor - 1/2``; its weights are the Keys cubic
    ``w(t)`` (``a = -0.5``) stretched by the factor, ``w((j - c_i) / factor)`` for input pixels ``j`` (support
    ``|j - c_i| < 2 factor``), truncated at the image border and normalised to sum 1 (PIL's ``Image.resize`` with
    ``BICUBIC``; ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` computes the same weights).
    """
    if n % factor:
        raise ValueError(f"bicubic_matrix: n={n} must be divisible by factor={factor}")
    c = (np.arange(n // factor) + 0.5) * factor - 0.5
    w = _keys_cubic((np.arange(n)[None, :] - c[:, None]) / factor, a)
    return w / w.sum(axis=1, keepdims=True)


def _sep_fwd(data, x):
    return jnp.einsum("ih,hwc,jw->ijc", data["Dh"].astype(x.dtype), x, data["Dw"].astype(x.dtype),
                      precision=_HIGHEST)


def _sep_adjoint(data, y):
    return jnp.einsum("ih,ijc,jw->hwc", data["Dh"].astype(y.dtype), y, data["Dw"].astype(y.dtype),
                      precision=_HIGHEST)


def _sep_pinv(data, y):
    return jnp.einsum("hi,ijc,wj->hwc", data["Ph"].astype(y.dtype), y, data["Pw"].astype(y.dtype),
                      precision=_HIGHEST)


def _cg_pinv(data, y, *, fwd, in_shape, tol, maxiter):
    """``A^+ y = A^T z`` with ``(A A^T) z = y`` solved by conjugate gradients (``||r|| <= tol ||y||``)."""
    adj = lambda v: _lt_adjoint(data, v, fwd=fwd, in_shape=in_shape)  # noqa: E731
    normal = lambda v: fwd(data, adj(v))  # noqa: E731
    z, _ = jax.scipy.sparse.linalg.cg(normal, y, tol=tol, atol=0.0, maxiter=maxiter)
    return adj(z)


# ----------------------------------------------------------------------------------------------------------------
# Circular convolutions (blur)
# ----------------------------------------------------------------------------------------------------------------


def _rfft_apply(spec, x):
    H, W = x.shape[0], x.shape[1]
    X = jnp.fft.rfft2(x, axes=(0, 1))
    return jnp.fft.irfft2(X * spec.astype(X.dtype)[:, :, None], s=(H, W), axes=(0, 1)).astype(x.dtype)


def _conv_fwd(data, x):
    return _rfft_apply(data["K"], x)


def _conv_adjoint(data, y):
    return _rfft_apply(jnp.conj(data["K"]), y)


def _conv_pinv(data, y):
    return _rfft_apply(data["Kpinv"], y)


def gaussian_kernel(kernel_size: int = 61, std=3.0) -> np.ndarray:
    """``[kernel_size, kernel_size]`` Gaussian ``k[i, j] ∝ exp(-u_i^2 / (2 s_h^2) - v_j^2 / (2 s_w^2))`` with
    ``u, v`` the offsets from the centre pixel ``kernel_size // 2``; ``std`` is a scalar or ``(s_h, s_w)`` (pixels).
    Normalised to sum 1 (float64)."""
    kernel_size = int(kernel_size)
    if kernel_size < 1:
        raise ValueError(f"gaussian_kernel: kernel_size must be a positive int, got {kernel_size}")
    s = np.broadcast_to(np.asarray(std, dtype=np.float64), (2,))
    if not np.all(s > 0):
        raise ValueError(f"gaussian_kernel: std must be > 0, got {std!r}")
    u = np.arange(kernel_size) - kernel_size // 2
    gh = np.exp(-0.5 * (u / s[0]) ** 2)
    gw = np.exp(-0.5 * (u / s[1]) ** 2)
    k = np.outer(gh, gw)
    return k / k.sum()


def motion_kernel(seed: int = 0, kernel_size: int = 61, intensity: float = 0.5) -> np.ndarray:
    """A random camera-shake blur kernel ``[kernel_size, kernel_size]`` (float64, non-negative, sum 1).

    Trajectory (a random walk with momentum, drawn from ``numpy.random.default_rng(seed)``):

    * 100 unit-length steps ``p_{t+1} = p_t + (sin theta_t, cos theta_t)`` (row, column), initial heading
      ``theta_0 ~ U[0, 2 pi)``;
    * the heading turns with an angular velocity that has momentum,
      ``omega_t = 0.95 omega_{t-1} + 0.05 intensity g_t``, ``g_t ~ N(0, 1)``, and with probability
      ``0.05 intensity`` per step takes an abrupt kick ``intensity * N(0, 1)`` (a jerk of the hand):
      ``theta_t = theta_{t-1} + omega_t (+ kick)``; ``intensity = 0`` is a straight line, larger values curve
      and jerk more;
    * the path is centred on its bounding box and scaled so that the longer side of the box spans
      ``kernel_size - 3`` pixels, resampled uniformly in arc length every 0.05 pixel (constant speed during
      the exposure), and rasterised with bilinear (sub-pixel) splatting around the centre pixel
      ``kernel_size // 2``; the result is normalised to sum 1.
    """
    kernel_size = int(kernel_size)
    if kernel_size < 5:
        raise ValueError(f"motion_kernel: kernel_size must be >= 5, got {kernel_size}")
    intensity = float(intensity)
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"motion_kernel: intensity must be in [0, 1], got {intensity}")
    rng = np.random.default_rng(seed)
    n = 100
    theta = np.empty(n)
    theta[0] = rng.uniform(0.0, 2 * np.pi)
    g = rng.normal(size=n)
    jerk = rng.uniform(size=n) < 0.05 * intensity
    kick = intensity * rng.normal(size=n)
    omega = 0.0
    for t in range(1, n):
        omega = 0.95 * omega + 0.05 * intensity * g[t]
        theta[t] = theta[t - 1] + omega + (kick[t] if jerk[t] else 0.0)
    pts = np.concatenate([np.zeros((1, 2)), np.cumsum(np.stack([np.sin(theta), np.cos(theta)], 1), 0)], 0)
    lo, hi = pts.min(0), pts.max(0)
    pts = pts - (lo + hi) / 2
    span = float((hi - lo).max())
    pts = pts * ((kernel_size - 3) / span)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    ss = np.linspace(0.0, s[-1], max(int(np.ceil(s[-1] / 0.05)), 2) + 1)
    r = np.interp(ss, s, pts[:, 0]) + kernel_size // 2
    c = np.interp(ss, s, pts[:, 1]) + kernel_size // 2
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    fr, fc = r - r0, c - c0
    k = np.zeros((kernel_size, kernel_size))
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
        np.add.at(k, (r0 + dr, c0 + dc), w)
    return k / k.sum()


def _fold_kernel(k: np.ndarray, H: int, W: int) -> np.ndarray:
    """Place ``k`` (centre pixel ``(kh // 2, kw // 2)``) on the periodic ``H x W`` grid with its centre at ``(0, 0)``,
    summing the entries that wrap onto the same pixel (so a kernel larger than the image is folded)."""
    kh, kw = k.shape
    grid = np.zeros((H, W))
    rows = (np.arange(kh) - kh // 2) % H
    cols = (np.arange(kw) - kw // 2) % W
    np.add.at(grid, (rows[:, None], cols[None, :]), k)
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Compressed sensing: permuted, subsampled, orthonormal Walsh-Hadamard
# ----------------------------------------------------------------------------------------------------------------


def fwht(x, axis: int = 0):
    """Orthonormal fast Walsh-Hadamard transform along ``axis`` (length ``n = 2^k``), in natural (Sylvester /
    ``scipy.linalg.hadamard``) order: ``fwht(x) = H_n x / sqrt(n)``, ``H_{2m} = [[H_m, H_m], [H_m, -H_m]]``.
    ``O(n log n)`` butterflies; its own inverse and its own transpose."""
    x = jnp.moveaxis(jnp.asarray(x), axis, 0)
    n = x.shape[0]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht: the transformed axis must have a power-of-2 length, got {n}")
    rest = x.shape[1:]
    h = 1
    while h < n:
        v = x.reshape((n // (2 * h), 2, h) + rest)
        a, b = v[:, 0], v[:, 1]
        x = jnp.stack([a + b, a - b], axis=1).reshape((n,) + rest)
        h *= 2
    x = x / jnp.sqrt(jnp.asarray(n, x.dtype))
    return jnp.moveaxis(x, 0, axis)


def _cs_fwd(data, x):
    H, W, C = x.shape
    v = x.reshape(H * W, C)[data["perm"]]
    return fwht(v)[data["rows"]]


def _cs_adjoint(data, y, *, in_shape):
    H, W, C = in_shape
    z = jnp.zeros((H * W, C), y.dtype).at[data["rows"]].set(y)
    return fwht(z)[data["inv_perm"]].reshape(H, W, C)


def _cs_coef_fwd(data, x):
    H, W, C = x.shape
    return fwht(x.reshape(H * W, C))[data["rows"]]


def _cs_coef_adjoint(data, y, *, in_shape):
    H, W, C = in_shape
    return fwht(jnp.zeros((H * W, C), y.dtype).at[data["rows"]].set(y)).reshape(H, W, C)


# ----------------------------------------------------------------------------------------------------------------
# Phase retrieval and dense matrices
# ----------------------------------------------------------------------------------------------------------------


def _pr_pads(H, W):
    return (H // 2, H - H // 2), (W // 2, W - W // 2)


def _pr_fwd(data, x, *, norm, unit_range):
    H, W, _ = x.shape
    if unit_range:
        x = (x + 1) / 2
    ph, pw = _pr_pads(H, W)
    F = jnp.fft.fft2(jnp.pad(x, (ph, pw, (0, 0))), axes=(0, 1), norm=norm)
    m2 = F.real ** 2 + F.imag ** 2
    pos = m2 > 0
    # |F| with a zero (sub)gradient where F = 0 (jnp.abs would give NaN gradients there, e.g. at x = 0).
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, m2, 1)), 0).astype(x.dtype)


def _pr_init(data, y, *, norm, unit_range):
    H2, W2, _ = y.shape
    H, W = H2 // 2, W2 // 2
    g = jnp.fft.fftshift(jnp.fft.ifft2(y, axes=(0, 1), norm=norm).real, axes=(0, 1))
    (h0, _), (w0, _) = _pr_pads(H, W)
    x = g[h0:h0 + H, w0:w0 + W]
    if unit_range:
        x = 2 * x - 1
    return jnp.clip(x, -1, 1).astype(y.dtype)


def _mat_fwd(data, x):
    return jnp.matmul(data["M"].astype(x.dtype), x, precision=_HIGHEST)


def _mat_adjoint(data, y):
    return jnp.matmul(data["M"].astype(y.dtype).T, y, precision=_HIGHEST)


def _mat_pinv(data, y):
    return jnp.matmul(data["Mpinv"].astype(y.dtype), y, precision=_HIGHEST)


# ----------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------


def _check_shape(shape, arg="in_shape"):
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{arg} must be a tuple of ints, got {shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{arg} must be a non-empty tuple of positive ints, got {shape}")
    return shape


def _image_shape(task, in_shape):
    if len(in_shape) != 3:
        raise ValueError(f"make_operator({task!r}): in_shape must be an image event shape (H, W, C), got {in_shape}")
    return in_shape


def _vector_shape(task, in_shape):
    if len(in_shape) != 1:
        raise ValueError(f"make_operator({task!r}): in_shape must be a vector event shape (d,), got {in_shape}")
    return in_shape


def _farr(a):
    return jnp.asarray(np.asarray(a, dtype=np.float64), dtype=_default_float())


def _iarr(a):
    return jnp.asarray(np.asarray(a), dtype=jnp.int32)


def _linear(name, in_shape, out_shape, data, fwd, adj, pinv):
    return Operator(data=data, name=name, in_shape=in_shape, out_shape=out_shape, linear=True, forward_fn=fwd,
                    adjoint_fn=adj, pinv_fn=pinv, init_fn=pinv)


def _mask_operator(name, in_shape, mask):
    fn = _fn(_mask_mul)
    return _linear(name, in_shape, in_shape, {"mask": _farr(mask)}, fn, fn, fn)


def _build_denoise(in_shape, seed):
    fn = _fn(_identity)
    return _linear("denoise", in_shape, in_shape, {}, fn, fn, fn)


def _build_inpaint_box(in_shape, seed, box=None):
    H, W, _ = _image_shape("inpaint_box", in_shape)
    bh, bw = (min(H, W) // 2,) * 2 if box is None else np.broadcast_to(np.asarray(box, dtype=int), (2,))
    if not (0 <= bh <= H and 0 <= bw <= W):
        raise ValueError(f"make_operator('inpaint_box'): box must fit the {H}x{W} image, got {box!r}")
    m = np.ones((H, W, 1))
    r0, c0 = (H - bh) // 2, (W - bw) // 2
    m[r0:r0 + bh, c0:c0 + bw] = 0
    return _mask_operator("inpaint_box", in_shape, m)


def _build_inpaint_random(in_shape, seed, ratio=0.7):
    H, W, _ = _image_shape("inpaint_random", in_shape)
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"make_operator('inpaint_random'): ratio (fraction of pixels removed) must be in [0, 1], "
                         f"got {ratio!r}")
    removed = int(round(float(ratio) * H * W))
    m = np.ones(H * W)
    m[np.random.default_rng(seed).permutation(H * W)[:removed]] = 0
    return _mask_operator("inpaint_random", in_shape, m.reshape(H, W, 1))


def _build_inpaint_random_official(in_shape, seed):
    H, W, C = _image_shape("inpaint_random_official", in_shape)
    n = H * W
    flat = np.ones(n * C)  # the (H, W, C) image flattened row-major: channel-interleaved
    flat[np.random.default_rng(seed).permutation(n)[:n // 2]] = 0
    return _mask_operator("inpaint_random_official", in_shape, flat.reshape(H, W, C))


def _build_inpaint_mask(in_shape, seed, mask=None):
    H, W, C = _image_shape("inpaint_mask", in_shape)
    if mask is None:
        raise ValueError("make_operator('inpaint_mask'): the `mask` keyword (0/1 array of shape (H, W) or (H, W, C)) "
                         "is required")
    m = np.asarray(mask, dtype=np.float64)
    if m.shape == (H, W):
        m = m[:, :, None]
    if m.shape not in ((H, W, 1), (H, W, C)):
        raise ValueError(f"make_operator('inpaint_mask'): mask must have shape {(H, W)}, {(H, W, 1)} or {(H, W, C)}, "
                         f"got {np.shape(mask)}")
    if not np.all((m == 0) | (m == 1)):
        raise ValueError("make_operator('inpaint_mask'): mask values must be 0 or 1")
    return _mask_operator("inpaint_mask", in_shape, m)


def _build_sr(in_shape, seed, factor=4, kind="bicubic", pinv_method="svd", cg_tol=1e-6, cg_maxiter=200):
    H, W, C = _image_shape("sr", in_shape)
    if factor not in (2, 4, 8):
        raise ValueError(f"make_operator('sr'): factor must be 2, 4 or 8, got {factor!r}")
    if H % factor or W % factor:
        raise ValueError(f"make_operator('sr'): image size {H}x{W} must be divisible by factor={factor}")
    out_shape = (H // factor, W // factor, C)
    if kind == "avg":
        return _linear("sr", in_shape, out_shape, {}, _fn(_avg_down, f=factor), _fn(_avg_adjoint, f=factor),
                       _fn(_avg_pinv, f=factor))
    if kind != "bicubic":
        raise ValueError(f"make_operator('sr'): kind must be 'avg' or 'bicubic', got {kind!r}")
    Dh, Dw = bicubic_matrix(H, factor), bicubic_matrix(W, factor)
    data = {"Dh": _farr(Dh), "Dw": _farr(Dw)}
    fwd = _fn(_sep_fwd)
    adj = _fn(_lt_adjoint, fwd=fwd, in_shape=in_shape)
    if pinv_method == "svd":
        data.update(Ph=_farr(np.linalg.pinv(Dh)), Pw=_farr(np.linalg.pinv(Dw)))
        pinv = _fn(_sep_pinv)
    elif pinv_method == "cg":
        pinv = _fn(_cg_pinv, fwd=fwd, in_shape=in_shape, tol=float(cg_tol), maxiter=int(cg_maxiter))
    else:
        raise ValueError(f"make_operator('sr'): pinv_method must be 'svd' or 'cg', got {pinv_method!r}")
    return _linear("sr", in_shape, out_shape, data, fwd, adj, pinv)


def _conv_operator(name, in_shape, k, rcond):
    H, W, _ = _image_shape(name, in_shape)
    rcond = float(rcond)
    if not rcond >= 0:
        raise ValueError(f"make_operator({name!r}): pinv_rcond must be >= 0, got {rcond}")
    K = np.fft.rfft2(_fold_kernel(np.asarray(k, dtype=np.float64), H, W))
    mag = np.abs(K)
    keep = mag > rcond * mag.max()
    Kp = np.where(keep, 1.0 / np.where(keep, K, 1.0), 0.0)
    cdt = _default_complex()
    data = {"K": jnp.asarray(K, dtype=cdt), "Kpinv": jnp.asarray(Kp, dtype=cdt), "kernel": _farr(k)}
    return _linear(name, in_shape, in_shape, data, _fn(_conv_fwd), _fn(_conv_adjoint), _fn(_conv_pinv))


def _build_gaussian_blur(in_shape, seed, kernel_size=61, std=3.0, pinv_rcond=DEFAULT_PINV_RCOND):
    return _conv_operator("gaussian_blur", in_shape, gaussian_kernel(kernel_size, std), pinv_rcond)


def _build_aniso_blur(in_shape, seed, kernel_size=61, std=(1.0, 20.0), pinv_rcond=DEFAULT_PINV_RCOND):
    return _conv_operator("aniso_blur", in_shape, gaussian_kernel(kernel_size, std), pinv_rcond)


def official_blur_matrix(n: int, kernel, drop_last_tap: bool = True) -> np.ndarray:
    """The ``[n, n]`` 1-D zero-boundary convolution matrix of the paper's code (DDRM / DDNM ``Deblurring2D``).

    ``kernel`` has odd length ``K`` (centre ``K // 2``). Row ``i`` holds ``kernel[j - i + K // 2]`` at the columns
    ``j`` inside ``[0, n)``, for ``j`` from ``i - K // 2`` to ``i + K // 2`` (zero boundary: taps that fall outside
    are dropped, not folded or reflected). ``drop_last_tap=True`` is the official loop
    ``for j in range(i - K // 2, i + K // 2)``, whose exclusive upper bound leaves out the last tap
    ``kernel[K - 1]`` (the kernel stays normalised over all ``K`` taps); ``False`` uses every tap (float64)."""
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 1 or k.size % 2 != 1:
        raise ValueError(f"official_blur_matrix: kernel must be 1-D with an odd length, got shape {k.shape}")
    h = k.size // 2
    M = np.zeros((n, n))
    for d in range(-h, h if drop_last_tap else h + 1):  # column offset j - i
        M += k[d + h] * np.eye(n, k=d)
    return M


def _truncated_svd(M, cutoff):
    """``(M_t, M_t^+)``: ``M = U diag(s) V^T`` with the singular values ``s < cutoff`` set to zero (float64)."""
    U, s, Vt = np.linalg.svd(M)
    st = np.where(s < cutoff, 0.0, s)
    inv = np.where(st > 0, 1.0 / np.where(st > 0, st, 1.0), 0.0)
    return (U * st) @ Vt, (Vt.T * inv) @ U.T


def _build_aniso_blur_svd(in_shape, seed, kernel_size=9, std=(1.0, 20.0), sv_cutoff=0.03, drop_last_tap=True):
    H, W, _ = _image_shape("aniso_blur_svd", in_shape)
    kernel_size = int(kernel_size)
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f"make_operator('aniso_blur_svd'): kernel_size must be a positive odd int, got "
                         f"{kernel_size}")
    s = np.broadcast_to(np.asarray(std, dtype=np.float64), (2,))
    if not np.all(s > 0):
        raise ValueError(f"make_operator('aniso_blur_svd'): std must be > 0, got {std!r}")
    sv_cutoff = float(sv_cutoff)
    if not sv_cutoff >= 0:
        raise ValueError(f"make_operator('aniso_blur_svd'): sv_cutoff must be >= 0, got {sv_cutoff}")
    u = np.arange(kernel_size) - kernel_size // 2
    data = {}
    for axis, n, sd in (("h", H, s[0]), ("w", W, s[1])):
        taps = np.exp(-0.5 * (u / sd) ** 2)
        D, P = _truncated_svd(official_blur_matrix(n, taps / taps.sum(), bool(drop_last_tap)), sv_cutoff)
        data["D" + axis], data["P" + axis] = _farr(D), _farr(P)
    return _linear("aniso_blur_svd", in_shape, in_shape, data, _fn(_sep_fwd), _fn(_sep_adjoint), _fn(_sep_pinv))


def _build_motion_blur(in_shape, seed, kernel_size=61, intensity=0.5, pinv_rcond=DEFAULT_PINV_RCOND):
    return _conv_operator("motion_blur", in_shape, motion_kernel(seed, kernel_size, intensity), pinv_rcond)


def _build_cs(in_shape, seed, ratio=2, construction="permuted"):
    H, W, C = _image_shape("cs", in_shape)
    if construction not in ("permuted", "official"):
        raise ValueError(f"make_operator('cs'): construction must be 'permuted' or 'official', got {construction!r}")
    n = H * W
    if n & (n - 1):
        raise ValueError(f"make_operator('cs'): H * W must be a power of 2 for the Walsh-Hadamard transform, got "
                         f"{H} * {W} = {n}")
    if int(ratio) != ratio or ratio < 1 or n % int(ratio):
        raise ValueError(f"make_operator('cs'): ratio must be a positive integer dividing H * W = {n} (the paper "
                         f"uses 2 and 4), got {ratio!r}")
    m = n // int(ratio)
    rng = np.random.default_rng(seed)
    if construction == "official":
        adj = _fn(_cs_coef_adjoint, in_shape=in_shape)
        return _linear("cs", in_shape, (m, C), {"rows": _iarr(rng.permutation(n)[:m])}, _fn(_cs_coef_fwd), adj, adj)
    perm = rng.permutation(n)
    rows = np.sort(rng.permutation(n)[:m])
    data = {"perm": _iarr(perm), "inv_perm": _iarr(np.argsort(perm)), "rows": _iarr(rows)}
    adj = _fn(_cs_adjoint, in_shape=in_shape)
    return _linear("cs", in_shape, (m, C), data, _fn(_cs_fwd), adj, adj)


def _build_hdr(in_shape, seed, pinv="half"):
    if pinv not in ("half", "identity"):
        raise ValueError(f"make_operator('hdr'): pinv must be 'half' (y / 2) or 'identity' (y, the paper's code), "
                         f"got {pinv!r}")
    fn = _fn(_half) if pinv == "half" else _fn(_identity)
    return Operator(data={}, name="hdr", in_shape=in_shape, out_shape=in_shape, linear=False,
                    forward_fn=_fn(_hdr_fwd), adjoint_fn=None, pinv_fn=fn, init_fn=fn)


def _build_phase_retrieval(in_shape, seed, norm="ortho", unit_range=False):
    H, W, C = _image_shape("phase_retrieval", in_shape)
    if norm not in ("ortho", "backward", "forward"):
        raise ValueError(f"make_operator('phase_retrieval'): norm must be 'ortho', 'backward' or 'forward', "
                         f"got {norm!r}")
    kw = dict(norm=norm, unit_range=bool(unit_range))
    return Operator(data={}, name="phase_retrieval", in_shape=in_shape, out_shape=(2 * H, 2 * W, C), linear=False,
                    forward_fn=_fn(_pr_fwd, **kw), adjoint_fn=None, pinv_fn=None, init_fn=_fn(_pr_init, **kw))


def _build_matrix(in_shape, seed, matrix=None, rows=None, pinv_rcond=1e-10):
    (d,) = _vector_shape("matrix", in_shape)
    if (matrix is None) == (rows is None):
        raise ValueError("make_operator('matrix'): give exactly one of `matrix` (an [m, d] array) or `rows` (m, for a "
                         "seeded Gaussian matrix)")
    if matrix is None:
        rows = int(rows)
        if rows < 1:
            raise ValueError(f"make_operator('matrix'): rows must be a positive int, got {rows}")
        M = np.random.default_rng(seed).normal(size=(rows, d)) / np.sqrt(rows)
    else:
        M = np.asarray(matrix, dtype=np.float64)
        if M.ndim != 2 or M.shape[1] != d:
            raise ValueError(f"make_operator('matrix'): matrix must have shape (m, {d}), got {M.shape}")
        if not np.all(np.isfinite(M)):
            raise ValueError("make_operator('matrix'): matrix has non-finite entries")
    data = {"M": _farr(M), "Mpinv": _farr(np.linalg.pinv(M, rcond=pinv_rcond))}
    return _linear("matrix", in_shape, (M.shape[0],), data, _fn(_mat_fwd), _fn(_mat_adjoint), _fn(_mat_pinv))


def _build_mask(in_shape, seed, keep=None):
    (d,) = _vector_shape("mask", in_shape)
    if keep is None or int(keep) != keep or not 1 <= keep <= d:
        raise ValueError(f"make_operator('mask'): keep must be an int in [1, {d}], got {keep!r}")
    idx = np.sort(np.random.default_rng(seed).permutation(d)[:int(keep)])
    adj = _fn(_scatter, d=d)
    return _linear("mask", in_shape, (int(keep),), {"idx": _iarr(idx)}, _fn(_take), adj, adj)


_BUILDERS = {
    "denoise": _build_denoise,
    "inpaint_box": _build_inpaint_box,
    "inpaint_random": _build_inpaint_random,
    "inpaint_random_official": _build_inpaint_random_official,
    "inpaint_mask": _build_inpaint_mask,
    "sr": _build_sr,
    "gaussian_blur": _build_gaussian_blur,
    "aniso_blur": _build_aniso_blur,
    "aniso_blur_svd": _build_aniso_blur_svd,
    "motion_blur": _build_motion_blur,
    "cs": _build_cs,
    "hdr": _build_hdr,
    "phase_retrieval": _build_phase_retrieval,
    "matrix": _build_matrix,
    "mask": _build_mask,
}

#: The valid task names of :func:`make_operator`.
TASKS = tuple(_BUILDERS)


def make_operator(task: str, in_shape: tuple, *, seed: int = 0, **kwargs) -> Operator:
    """Build the forward operator of ``task`` for single-image (or vector) event shape ``in_shape``.

    Fixed data are drawn once from ``numpy.random.default_rng(seed)`` (tasks ``inpaint_random``,
    ``inpaint_random_official``, ``motion_blur``, ``cs``, ``matrix`` with ``rows``, ``mask``; the other tasks ignore
    ``seed``). Keywords per task:

    * ``denoise``: none. ``A = I``.
    * ``inpaint_box``: ``box`` (int side or ``(h, w)``, default ``min(H, W) // 2``), centred at
      ``((H - h) // 2, (W - w) // 2)``. ``A = A^T = A^+ = diag(m)``.
    * ``inpaint_random``: ``ratio`` = fraction of pixels removed (default 0.7); exactly ``round(ratio H W)``
      pixels, shared by all channels.
    * ``inpaint_random_official`` (no keywords): the paper's code's random mask. Its
      ``randperm(H W)[:H W // 2]`` (here ``default_rng(seed).permutation(H W)[:H W // 2]``) indexes the image
      flattened channel-interleaved (the ``(H, W, C)`` array in row-major order, length ``H W C``) directly, so
      ``H W // 2`` of the ``H W C`` entries are missing (1/6 for ``C = 3``), all at flat indices below ``H W``, i.e.
      in the top ``ceil(H / C)`` rows, each channel drawn independently. ``A = A^T = A^+ = diag(m)``.
    * ``inpaint_mask``: ``mask`` (0/1, ``(H, W)``, ``(H, W, 1)`` or ``(H, W, C)``; 1 = observed).
    * ``sr``: ``factor`` in {2, 4, 8} (default 4), ``kind`` ``"avg"`` or ``"bicubic"`` (default). ``avg``
      (the paper's code's SR, DDRM / DDNM ``SuperResolution``): ``A x = mean over factor x factor blocks``,
      ``A^T y = replicate(y) / factor^2``, ``A^+ y = replicate(y)``.
      ``bicubic``: ``A x = D_h x D_w^T`` per channel with :func:`bicubic_matrix` (antialiased Keys cubic,
      ``a = -0.5``, PIL ``BICUBIC`` resize semantics, border weights renormalised); adjoint by
      ``jax.linear_transpose``; ``pinv_method="svd"`` (default): the exact Moore-Penrose inverse
      ``A^+ y = D_h^+ y (D_w^+)^T`` (Kronecker structure, computed at build time); ``pinv_method="cg"``:
      ``A^+ y = A^T z``, ``(A A^T) z = y`` by conjugate gradients (``jax.scipy.sparse.linalg.cg``, a
      ``lax.while_loop``) to relative residual ``cg_tol`` (default 1e-6), at most ``cg_maxiter`` (200) iterations,
      so ``|A A^+ y - y| <= cg_tol |y|`` for ``y`` in the range.
    * ``gaussian_blur``: ``kernel_size`` (61), ``std`` (3.0; scalar or ``(std_h, std_w)``) in pixels.
      ``aniso_blur``: the same with ``std=(1.0, 20.0)`` (sharp vertically, blurred horizontally).
      ``motion_blur``: ``kernel_size`` (61), ``intensity`` (0.5), see :func:`motion_kernel`.
      All three: ``A x = k (*) x``, CIRCULAR convolution per channel via the FFT (the kernel centre pixel
      ``kernel_size // 2`` is the origin; a kernel larger than the image is folded onto the periodic grid);
      ``A^T`` = circular correlation (``conj(K)``); ``A^+`` = truncated inverse filter ``1/K`` where
      ``|K| > pinv_rcond * max|K|`` (default :data:`DEFAULT_PINV_RCOND` = 1e-3), 0 elsewhere, i.e. exactly
      ``numpy.linalg.pinv(matrix, rcond=pinv_rcond)`` since the singular values of a circulant are ``|K|``.
      Hence ``A^+ A A^+ = A^+`` exactly and ``|A A^+ A x - A x| <= pinv_rcond * max|K| * |x|`` (equality up to
      float precision only for ``pinv_rcond`` below the float resolution). ``data["kernel"]`` holds the kernel.
    * ``aniso_blur_svd``: the paper's code's anisotropic blur (DDRM / DDNM ``Deblurring2D``): ``kernel_size`` (9),
      ``std`` (``(1.0, 20.0)`` = (vertical, horizontal)), ``sv_cutoff`` (0.03), ``drop_last_tap`` (True). Taps
      ``exp(-u^2 / (2 std^2))``, ``u = -K//2 .. K//2``, normalised to sum 1; the 1-D zero-boundary matrices
      ``B_h`` (``H x H``) and ``B_w`` (``W x W``) of :func:`official_blur_matrix` (``drop_last_tap=True``: as the
      official loop, the last tap is left out); their SVDs with the singular values below ``sv_cutoff`` set to zero
      give ``D_h``, ``D_w``; ``A x = D_h x D_w^T`` per channel (this truncated operator is the forward map, as in
      the official code), ``A^T y = D_h^T y D_w``, ``A^+ y = D_h^+ y (D_w^+)^T`` (the exact Moore-Penrose inverse
      of ``A``: the singular values of the 2-D operator are the products of the 1-D ones).
    * ``cs``: ``ratio`` (2; the paper uses 2 and 4), ``H * W`` a power of 2. ``A x = S fwht(P x)`` per channel with
      a seeded permutation ``P`` of the ``H W`` pixels and ``S`` keeping ``H W / ratio`` seeded rows (sorted),
      the same ``P`` and ``S`` for every channel; ``y`` has shape ``(H W / ratio, C)``. ``A A^T = I``, so
      ``A^+ = A^T``. ``construction="official"`` (the paper's code, DDRM / DDNM ``WalshHadamardCS``): no pixel
      permutation, ``y[k, c] = fwht(x_c)[perm[k]]`` for ``k < H W / ratio`` with ``perm`` a seeded permutation of
      the ``H W`` coefficients (kept in ``perm`` order), ``x_c`` channel ``c`` flattened row-major.
    * ``hdr``: ``A x = clip(2 x, -1, 1)`` (nonlinear). ``pinv`` and ``x_init``: ``pinv="half"`` (default)
      ``y / 2`` (a right inverse: ``A(y / 2) = y`` for ``y`` in [-1, 1]); ``pinv="identity"``: ``y`` (the paper's
      code; not a right inverse).
    * ``phase_retrieval``: ``norm`` (``"ortho"`` default: Parseval, ``|y| = |x|``; or ``"backward"`` =
      ``np.fft.fft2``), ``unit_range`` (False; True maps ``x -> (x + 1) / 2`` first, as DPS/DAPS do).
      ``A x = |fft2(pad(x))|`` per channel, the image zero-padded to ``(2H, 2W)`` and placed at offset
      ``(H // 2, W // 2)`` (centred); ``y`` has shape ``(2H, 2W, C)``; the gradient of ``|.|`` at a zero
      coefficient is taken as 0. No pseudo-inverse. ``x_init`` heuristic: ``fftshift(real(ifft2(y)))`` (the
      zero-phase reconstruction, whose zero lag is moved to the centre), centre ``H x W`` crop (mapped back from
      [0, 1] when ``unit_range``), clipped to [-1, 1].
    * ``matrix`` (vectors ``(d,)``): ``matrix`` (an ``[m, d]`` array) or ``rows=m`` (seeded, entries
      ``N(0, 1/m)`` so that ``E|M x|^2 = |x|^2``); ``A^+ = numpy.linalg.pinv(M, rcond=pinv_rcond)`` (1e-10),
      computed at build time in float64.
    * ``mask`` (vectors ``(d,)``): ``keep`` = number of coordinates kept (seeded, sorted indices); ``y = x[idx]``,
      ``A^T`` scatters into zeros, ``A^+ = A^T``.

    Raises ``ValueError`` for an unknown task (listing :data:`TASKS`), a bad shape or value, and ``TypeError`` for an
    unknown keyword.
    """
    if task not in _BUILDERS:
        raise ValueError(f"make_operator: unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    in_shape = _check_shape(in_shape, "in_shape")
    builder = _BUILDERS[task]
    allowed = [p for p in inspect.signature(builder).parameters if p not in ("in_shape", "seed")]
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise TypeError(f"make_operator({task!r}): unknown keyword(s) {bad}; accepted: {allowed or 'none'}")
    return builder(in_shape, int(seed), **kwargs)
