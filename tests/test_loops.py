"""bounded_loop: all three modes equal a Python loop; the masked scan is differentiable; no retracing."""
import jax
import jax.numpy as jnp
import numpy as np

from mapreps_jax._loops import bounded_loop


def _body(k, c):
    return c * 1.1 + jnp.sin(k.astype(jnp.float32) + c)


def _python(n, c):
    for k in range(n):
        c = _body(jnp.int32(k), c)
    return c


def test_modes_agree_with_python_loop():
    c0 = jnp.float32(0.3)
    for n in (0, 1, 7):
        ref = _python(n, c0)
        np.testing.assert_allclose(bounded_loop(_body, c0, n), ref, rtol=1e-6)
        np.testing.assert_allclose(jax.jit(lambda m: bounded_loop(_body, c0, m))(n), ref, rtol=1e-6)
        np.testing.assert_allclose(jax.jit(lambda m: bounded_loop(_body, c0, m, max_n=10))(n), ref, rtol=1e-6)
    # vmap over the step count
    out = jax.vmap(lambda m: bounded_loop(_body, c0, m, max_n=10))(jnp.arange(5))
    np.testing.assert_allclose(out, [_python(n, c0) for n in range(5)], rtol=1e-6)


def test_masked_scan_gradient_matches_finite_difference():
    f = lambda c: bounded_loop(_body, c, jnp.int32(4), max_n=9)
    g = jax.grad(f)(jnp.float32(0.2))
    h = 1e-3
    fd = (f(jnp.float32(0.2 + h)) - f(jnp.float32(0.2 - h))) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=2e-3)


def test_traced_count_compiles_once():
    traces = []

    def f(n):
        traces.append(1)
        return bounded_loop(_body, jnp.float32(0.1), n)

    jf = jax.jit(f)
    jf(3)
    jf(50)
    assert len(traces) == 1
