"""Rematerialisation (``remat=True``: ``jax.checkpoint`` on each loop step): the same values (bitwise), the same
gradients (to float32 rounding: the backward pass recomputes each step's forward), and less memory for the gradient
(XLA's compiled memory analysis of ``jax.grad`` through a 200-step Stage 1 of an MLP score network)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr

SCHED = mr.make_schedule("linear")
KEY = jax.random.PRNGKey(0)


def _mlp_model(d=64, hidden=1024):
    """A small MLP eps-network (random weights): its activations per step ([B, hidden]) dwarf its state ([B, d])."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    params = {"W1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d),
              "W2": jax.random.normal(k2, (hidden, d)) / np.sqrt(hidden)}

    def apply(p, x, t, cond=None):
        h = jnp.tanh(x @ p["W1"] + jnp.sin(jnp.asarray(t, x.dtype) / 100.0))
        return jnp.tanh(h) @ p["W2"]

    return mr.ScoreModel(params=params, schedule=SCHED, apply=apply, name="mlp")


def _gaussian_problem(n=8, d=8):
    prior = mr.GaussianPrior.isotropic(d, 1.0)
    op = mr.make_operator("mask", (d,), keep=4, seed=0)
    x = prior.sample(jax.random.PRNGKey(1), n)
    return prior.score_model(SCHED), op, x, op.measure(jax.random.PRNGKey(2), x, 0.3)


def test_stage1_remat_same_result_same_gradient_less_memory():
    model = _mlp_model()
    d = 64
    op = mr.make_operator("mask", (d,), keep=32, seed=0)
    y = op.A(jax.random.normal(jax.random.PRNGKey(1), (8, d)))

    def loss(w, y, remat):
        cfg = mr.MAPConfig(t1=10.0, w=w, n_iter=200, lr=0.05, remat=remat)
        return jnp.sum(mr.map_estimate(KEY, model, op, y, config=cfg) ** 2)

    fwd = jax.jit(lambda w, y, remat: mr.map_estimate(
        KEY, model, op, y, config=mr.MAPConfig(t1=10.0, w=w, n_iter=200, lr=0.05, remat=remat)), static_argnums=2)
    np.testing.assert_array_equal(np.asarray(fwd(0.3, y, False)), np.asarray(fwd(0.3, y, True)))

    grads, temp = {}, {}
    for remat in (False, True):
        compiled = jax.jit(jax.grad(loss), static_argnums=2).lower(0.3, y, remat).compile()
        stats = compiled.memory_analysis()
        assert stats is not None, "XLA's memory analysis is available on CPU"
        temp[remat] = stats.temp_size_in_bytes
        grads[remat] = float(compiled(0.3, y))
    # the backward pass recomputes each step: the same gradient up to float32 rounding of the recomputation
    np.testing.assert_allclose(grads[True], grads[False], rtol=1e-5)
    # measured (XLA:CPU, jax 0.10): 28.8 MB without remat, 1.3 MB with it (the 200 steps' [8, 1024] activations
    # against their [8, 64] iterates and AdamW moments)
    assert temp[True] * 5 < temp[False], temp


def test_stage1_remat_with_masked_scan_and_trace_is_bitwise_identical():
    model, op, x, y = _gaussian_problem()
    for kw in (dict(n_iter=jnp.int32(15), max_iter=20), dict(n_iter=15)):
        outs = [jax.jit(lambda y, r=remat: mr.map_estimate_trace(
            KEY, model, op, y, config=mr.MAPConfig(w=0.2, lr=0.05, remat=r, **kw)))(y) for remat in (False, True)]
        for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="MAPConfig.remat: expected a bool"):
        mr.MAPConfig(remat="yes")


@pytest.mark.parametrize("grid", ["full", "subgrid", "continuous"])
def test_stage2_remat_same_output_same_gradient(grid):
    model, op, x, y = _gaussian_problem()
    x_init = op.x_init(y)
    kw = {"full": dict(), "subgrid": dict(n_steps=6), "continuous": dict(n_steps=6, continuous=True)}[grid]
    t0 = jnp.float32(30.5) if grid == "continuous" else jnp.int32(30)

    def f(zeta, y, x_init, remat):
        out = mr.rps(KEY, model, op, y, x_init, t0, sampler=mr.DPSStep(zeta=zeta, clip=False), max_steps=40,
                     remat=remat, **kw)
        return out, jnp.mean((out - x) ** 2)

    outs = {r: jax.jit(f, static_argnums=3)(0.3, y, x_init, r)[0] for r in (False, True)}
    np.testing.assert_array_equal(np.asarray(outs[False]), np.asarray(outs[True]))
    g = {r: jax.jit(jax.grad(lambda z, y, xi, r=r: f(z, y, xi, r)[1]))(0.3, y, x_init) for r in (False, True)}
    np.testing.assert_allclose(float(g[True]), float(g[False]), rtol=1e-5)
    tr = [jax.jit(lambda y, xi, r=r: mr.rps_trace(KEY, model, op, y, xi, t0, sampler=mr.DPSStep(clip=False),
                                                  max_steps=40, remat=r, **kw))(y, x_init) for r in (False, True)]
    for a, b in zip(jax.tree_util.tree_leaves(tr[0]), jax.tree_util.tree_leaves(tr[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dps_and_map_rps_remat_same_output_less_memory():
    model = _mlp_model(d=64, hidden=512)
    op = mr.make_operator("mask", (64,), keep=32, seed=0)
    y = op.A(jax.random.normal(jax.random.PRNGKey(1), (4, 64)))

    def dps(zeta, y, remat):
        return mr.dps(KEY, model, op, y, zeta=zeta, clip=False, n_steps=100, remat=remat)

    out = {r: jax.jit(dps, static_argnums=2)(0.5, y, r) for r in (False, True)}
    np.testing.assert_array_equal(np.asarray(out[False]), np.asarray(out[True]))
    temp = {r: jax.jit(jax.grad(lambda z, y, r: jnp.sum(dps(z, y, r) ** 2)), static_argnums=2).lower(
        0.5, y, r).compile().memory_analysis().temp_size_in_bytes for r in (False, True)}
    assert temp[True] * 3 < temp[False], temp
    cfg = mr.MAPConfig(w=0.2, n_iter=10)
    mrps = {r: jax.jit(lambda y, r=r: mr.map_rps(KEY, model, op, y, 20, map_config=cfg, n_steps=5,
                                                 sampler=mr.DPSStep(clip=False), remat=r))(y) for r in (False, True)}
    np.testing.assert_array_equal(np.asarray(mrps[False]), np.asarray(mrps[True]))
