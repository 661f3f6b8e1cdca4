"""The custom-VJP convolution (networks/conv.py) against JAX's own convolution and its transpose rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mapreps_jax.networks.conv import conv_general_dilated

DN = ("NHWC", "HWIO", "NHWC")


def _ref(x, w, s, p):
    return lax.conv_general_dilated(x, w, s, p, dimension_numbers=DN, precision=lax.Precision.HIGHEST)


def _ours(x, w, s, p):
    return conv_general_dilated(x, w, s, p, dimension_numbers=DN, precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("k,s,pad,hw", [(3, 1, (1, 1), (8, 8)), (3, 2, (1, 1), (8, 8)), (1, 1, (0, 0), (6, 5)),
                                        (3, 2, (1, 1), (7, 9)), (3, 1, (0, 2), (6, 6)), (5, 3, (2, 1), (11, 10))])
def test_value_and_vjp_match_lax(k, s, pad, hw):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(k * 10 + s), 3)
    x = jax.random.normal(kx, (2,) + hw + (3,))
    w = jax.random.normal(kw, (k, k, 3, 4))
    p = (pad, pad)
    y_ref, vjp_ref = jax.vjp(lambda a, b: _ref(a, b, (s, s), p), x, w)
    y, vjp = jax.vjp(lambda a, b: _ours(a, b, (s, s), p), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, y.shape)
    for a, b in zip(vjp(g), vjp_ref(g)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_second_order_matches_lax():
    """Reverse over reverse (e.g. a gradient through a DPS step) equals JAX's own rule."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, 2))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 2))

    def outer(conv):
        def f(w):
            gx = jax.grad(lambda v: jnp.sum(jnp.tanh(conv(v, w, (1, 1), ((1, 1), (1, 1))))))(x)
            return jnp.sum(gx ** 2)
        return jax.grad(f)(w)

    np.testing.assert_allclose(outer(_ours), outer(_ref), rtol=1e-4, atol=1e-5)


def _conv_specs(conv):
    """rhs (kernel) specs of every convolution in the jaxpr of the input VJP of ``conv`` (stride 2)."""
    w = jnp.ones((3, 3, 3, 4))
    f = lambda v: jax.vjp(lambda a: conv(a, w, (2, 2), ((1, 1), (1, 1))), v)[1](jnp.ones((1, 4, 4, 4)))[0]
    jaxpr = jax.make_jaxpr(f)(jnp.ones((1, 8, 8, 3)))

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                yield tuple(eqn.params["dimension_numbers"].rhs_spec)
            for v in eqn.params.values():
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)
    return list(walk(jaxpr.jaxpr))


def test_input_gradient_uses_canonical_kernel_layout():
    """The reason for the module: the input-gradient convolution has an HWIO kernel (spec (3, 2, 0, 1)); JAX's own
    rule swaps the kernel's in/out axes through the dimension numbers (spec (2, 3, 0, 1), "HWOI"), which XLA:CPU
    runs on a slow path inside loops."""
    swapped, hwio = (2, 3, 0, 1), (3, 2, 0, 1)
    assert swapped in _conv_specs(_ref)  # the layout this module avoids (so this test can tell them apart)
    ours = _conv_specs(_ours)
    assert swapped not in ours and hwio in ours, ours


def test_other_forms_pass_through():
    """Grouped / dilated / string-padded convolutions go to lax unchanged (same values)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))
    a = conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2)
    b = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2)
    np.testing.assert_array_equal(a, b)
