"""2-D convolution whose input gradient is an explicit forward convolution (fast VJPs inside ``lax.scan`` on CPU).

``conv_general_dilated(x, w, ...)`` is ``lax.conv_general_dilated`` (NHWC input, HWIO kernel) with a
``jax.custom_vjp``. The cotangent with respect to the input is computed as the forward convolution

    dx = conv(dilate(g, strides), swap_io(flip_hw(w)), stride 1, padding (k - 1 - lo, n - 1 - (o - 1) s + lo))

with the kernel flipped and its in/out axes swapped *explicitly*, so that the convolution XLA sees is in the
canonical ``NHWC x HWIO`` form. This is the same number as JAX's own transpose rule (tested to float tolerance),
but JAX's rule expresses the swap through the dimension numbers (``HWOI``); XLA:CPU (jaxlib 0.10) canonicalises
that layout only in the entry computation, so inside a ``while`` loop (every ``lax.scan`` of sampler steps) the
input-gradient convolution fell back to a naive kernel: a DPS step on the digits ADM took 1.5 s inside the scan
against 0.29 s outside it (batch 16). With this rule the two agree. The kernel cotangent keeps JAX's rule.

Anything other than a 2-D NHWC/HWIO convolution without dilation or feature groups is passed to
``lax.conv_general_dilated`` unchanged. ``jax.jvp`` (forward mode) is not available through a ``custom_vjp``;
reverse mode, including reverse-over-reverse, is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated", "transpose_padding"]

_DN = ("NHWC", "HWIO", "NHWC")


def transpose_padding(padding, kernel, strides, in_hw, out_hw):
    """Padding of the input-gradient convolution for each spatial axis: ``lo' = k - 1 - lo`` and
    ``hi' = n - 1 - (o - 1) s + lo`` (so that the output has the input's size ``n``)."""
    return tuple((k - 1 - lo, n - 1 - (o - 1) * s + lo)
                 for (lo, _), k, s, n, o in zip(padding, kernel, strides, in_hw, out_hw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN, precision=precision)


def _conv_fwd(x, w, strides, padding, precision):
    return _conv(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, res, g):
    x, w = res
    pads = transpose_padding(padding, w.shape[:2], strides, x.shape[1:3], g.shape[1:3])
    w_t = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)
    dx = lax.conv_general_dilated(g, w_t, (1, 1), pads, lhs_dilation=tuple(strides), dimension_numbers=_DN,
                                  precision=precision)
    _, vjp_w = jax.vjp(lambda ww: lax.conv_general_dilated(x, ww, strides, padding, dimension_numbers=_DN,
                                                           precision=precision), w)
    return dx.astype(x.dtype), vjp_w(g)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)


def _is_nhwc_hwio(dimension_numbers, ndim):
    if ndim != 4:
        return False
    if dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, dimension_numbers) \
        if not isinstance(dimension_numbers, lax.ConvDimensionNumbers) else dimension_numbers
    return tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1) \
        and tuple(dn.out_spec) == (0, 3, 1, 2)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """Drop-in for ``lax.conv_general_dilated`` (the signature ``flax.linen.Conv`` calls) with the fast input VJP
    described in the module docstring for plain 2-D NHWC/HWIO convolutions with explicit padding."""
    plain = (_is_nhwc_hwio(dimension_numbers, lhs.ndim) and not isinstance(padding, str)
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None)
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, tuple(int(s) for s in window_strides), padding, precision)
