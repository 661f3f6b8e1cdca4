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


def test_remat_gives_the_same_values_and_gradients():
    """``remat=True`` (``jax.checkpoint`` on the scan step) changes what the backward pass stores, not the values."""
    from mapreps_jax._loops import bounded_scan

    for kw in (dict(n=jnp.int32(5), max_n=9), dict(n=7)):
        for remat in (False, True):
            f = jax.jit(lambda c, r=remat: bounded_loop(_body, c, remat=r, **kw))
            g = jax.jit(jax.grad(lambda c, r=remat: bounded_loop(_body, c, remat=r, **kw)))
            if not remat:
                ref_f, ref_g = f(jnp.float32(0.2)), g(jnp.float32(0.2))
        np.testing.assert_array_equal(np.asarray(f(jnp.float32(0.2))), np.asarray(ref_f))
        np.testing.assert_allclose(np.asarray(g(jnp.float32(0.2))), np.asarray(ref_g), rtol=1e-6)
        outs = [jax.jit(lambda c, r=r: bounded_scan(lambda k, cc: (_body(k, cc), cc * 2), c, remat=r, **kw))(
            jnp.float32(0.2)) for r in (False, True)]
        for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda c: bounded_loop(_body, c, 7, remat=True)))(jnp.float32(0.2)))
    assert "checkpoint" in jaxpr or "remat" in jaxpr
