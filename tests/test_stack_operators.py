"""stack_operators: one operator for a batch mixing tasks, checked against each task's own operator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapreps_jax.operators import make_operator, stack_operators

SHAPE = (16, 16, 1)


def _ops():
    return [make_operator("sr", SHAPE, factor=4), make_operator("inpaint_box", SHAPE, box=6),
            make_operator("gaussian_blur", SHAPE, kernel_size=9, std=1.5), make_operator("denoise", SHAPE)]


COUNTS = (2, 1, 3, 2)


def _split(v, counts=COUNTS):
    return np.split(np.asarray(v), np.cumsum(counts)[:-1])


def test_forward_adjoint_pinv_match_each_task():
    ops = _ops()
    st = stack_operators(ops, COUNTS)
    B, M = sum(COUNTS), max(op.out_size for op in ops)
    assert st.out_shape == (M,)
    x = jax.random.normal(jax.random.PRNGKey(0), (B,) + SHAPE)
    y = st.A(x)
    for op, xs, ys in zip(ops, _split(x), _split(y)):
        np.testing.assert_allclose(ys[:, :op.out_size], np.asarray(op.A(xs)).reshape(len(xs), -1), atol=1e-6)
        np.testing.assert_array_equal(ys[:, op.out_size:], 0.0)
    # adjoint identity <A u, v> = <u, A^T v> on valid entries, and A^T equal to each task's A^T
    v = jax.random.normal(jax.random.PRNGKey(1), y.shape) * jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(M) < op.out_size, (c, M)) for op, c in zip(ops, COUNTS)])
    np.testing.assert_allclose(jnp.vdot(st.A(x), v), jnp.vdot(x, st.AT(v)), rtol=1e-4)
    for op, vs, xt, xp in zip(ops, _split(v), _split(st.AT(v)), _split(st.pinv(v))):
        vv = jnp.asarray(vs[:, :op.out_size]).reshape((len(vs),) + op.out_shape)
        np.testing.assert_allclose(xt, op.AT(vv), atol=1e-5)
        np.testing.assert_allclose(xp, op.pinv(vv), atol=1e-5)


def test_measure_keeps_padding_zero_and_dps_gradient_matches():
    ops = _ops()
    st = stack_operators(ops, COUNTS)
    B = sum(COUNTS)
    x = jax.random.normal(jax.random.PRNGKey(0), (B,) + SHAPE)
    sig = jnp.repeat(jnp.asarray([0.1, 0.2, 0.3, 0.4]), np.asarray(COUNTS))[:, None]
    y = st.measure(jax.random.PRNGKey(2), x, sig)
    for op, ys, s in zip(ops, _split(y), [0.1, 0.2, 0.3, 0.4]):
        np.testing.assert_array_equal(ys[:, op.out_size:], 0.0)
    # per-image residual norms (the DPS loss) equal each task's own
    z = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    g = jax.grad(lambda u: jnp.sum(jnp.linalg.norm(y - st.A(u), axis=1)))(z)
    for op, ys, zs, gs in zip(ops, _split(y), _split(z), _split(g)):
        yy = jnp.asarray(ys[:, :op.out_size]).reshape((len(ys),) + op.out_shape)
        g_ref = jax.grad(lambda u: jnp.sum(jnp.sqrt(jnp.sum((yy - op.A(u)) ** 2, axis=tuple(range(1, yy.ndim))))))(
            jnp.asarray(zs))
        np.testing.assert_allclose(gs, g_ref, rtol=1e-4, atol=1e-5)


def test_batch_bound_and_bad_input():
    ops = _ops()
    st = stack_operators(ops, COUNTS)
    with pytest.raises(ValueError, match="batch of 8 images"):
        st.A(jnp.zeros((3,) + SHAPE))
    with pytest.raises(ValueError, match="in_shape"):
        stack_operators([ops[0], make_operator("denoise", (8, 8, 1))], (1, 1))
    with pytest.raises(ValueError, match="one count per operator"):
        stack_operators(ops, (1, 2))
    with pytest.raises(TypeError, match="nonlinear"):
        stack_operators([make_operator("hdr", SHAPE), ops[3]], (1, 1)).AT(jnp.zeros((2, 256)))


def test_leading_axes_and_jit_reuse():
    """Extra leading axes (e.g. a t0 sweep [n_t0, B, ...]) map over the per-image data on the image axis."""
    ops = _ops()
    st = stack_operators(ops, COUNTS)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, sum(COUNTS)) + SHAPE)
    np.testing.assert_allclose(st.A(x)[1], st.A(x[1]), atol=1e-6)
    f = jax.jit(lambda o, u: o.A(u))
    f(st, x[0])
    n0 = f._cache_size()
    f(stack_operators(ops, COUNTS), x[1])
    assert f._cache_size() == n0
