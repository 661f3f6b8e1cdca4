"""NFE counted, not computed (issue 12, part 2).

The exact Gaussian prior's score model is wrapped so that every network evaluation that really executes calls
``jax.debug.callback`` with the batch it was given; the callback adds the batch size to a Python counter. Counted
per-image calls = counted batch rows / B. What this counts, and why it is the right thing:

* a step skipped by ``lax.cond`` (steps past ``t0`` in the full-grid scan, coinciding sub-grid times, ``n_iter``
  below ``max_iter``) does not execute its branch, so it is not counted;
* under ``vmap`` (``dp_sweep(vectorize=True)`` maps over ``t0``) a ``lax.cond`` with a batched predicate runs both
  branches, and the callback's batching rule calls it once per lane: every lane's masked steps are counted, which
  is the cost ``nfe["total_vectorized"]`` reports;
* a forward + VJP (DPS) is one call: the callback sits on the primal computation only.

Each counted number is compared with what the library reports (``SweepResult.nfe``, ``stage2_nfe``) or documents
(``dps``: ``T`` or ``K``; ``dps_average``: ``M`` times that; ``red_diff``: ``n_steps``; Stage 1: ``n_iter``).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr
from mapreps_jax.priors import GaussianPrior
from call_counter import counting_latent_model, counting_model as _counting_model

SCHED = mr.make_schedule("linear")
B, D = 3, 6


def counting_model(model):
    """``model`` whose ``apply`` reports every executed evaluation (with its batch) to the returned counter."""
    return _counting_model(model, B)


@pytest.fixture(scope="module")
def problem():
    prior = GaussianPrior.random(jax.random.PRNGKey(0), D)
    op = mr.make_operator("matrix", (D,), rows=3, seed=1)
    x = prior.sample(jax.random.PRNGKey(1), B)
    y = op.measure(jax.random.PRNGKey(2), x, 0.3)
    model, counter = counting_model(prior.score_model(SCHED))
    return prior, op, y, model, counter


def test_counter_sees_one_call_per_evaluation(problem):
    """The wrapper itself: one eager call, one jitted call, a vmapped call over 4 lanes, a skipped lax.cond."""
    prior, op, y, model, counter = problem
    x = op.x_init(y)
    counter.reset()
    model.eps(x, 5)
    assert counter.per_image() == 1
    counter.reset()
    jax.jit(lambda xx: model.eps(xx, 5))(x).block_until_ready()
    assert counter.per_image() == 1
    counter.reset()
    jax.vmap(lambda s: model.eps(x * s, 5))(jnp.arange(4.0)).block_until_ready()
    assert counter.per_image() == 4
    counter.reset()
    jax.jit(lambda xx, p: jax.lax.cond(p, lambda v: model.eps(v, 5), lambda v: v, xx))(x, False).block_until_ready()
    assert counter.per_image() == 0
    counter.reset()
    jax.grad(lambda xx: jnp.sum(model.eps(xx, 5) ** 2))(x).block_until_ready()
    assert counter.per_image() == 1


@pytest.mark.parametrize("solver,max_iter", [("adamw", None), ("prox", None), ("adamw", 30)])
def test_stage1_counts_n_iter(problem, solver, max_iter):
    """map_estimate: N network evaluations (one per step; with max_iter, the masked steps cost none)."""
    prior, op, y, model, counter = problem
    n_iter = 17
    cfg = mr.MAPConfig(t1=10.0, w=0.2, n_iter=n_iter if max_iter is None else jnp.int32(n_iter), lr=0.05,
                       solver=solver, max_iter=max_iter)
    counter.reset()
    mr.map_estimate(jax.random.PRNGKey(3), model, op, y, config=cfg).block_until_ready()
    assert counter.per_image() == n_iter
    counter.reset()
    mr.map_estimate_trace(jax.random.PRNGKey(3), model, op, y,
                          config=dataclasses.replace(cfg, max_iter=40))[0].block_until_ready()
    assert counter.per_image() == n_iter


@pytest.mark.parametrize("n_steps,t0s", [(None, [0, 1, 7, 40]), (5, [0, 1, 3, 7, 41, 200]), (12, [2, 5, 6, 13])])
def test_dp_sweep_counted_equals_reported(problem, n_steps, t0s):
    """dp_sweep: Stage 1 counted = nfe["stage1"], each t0's Stage 2 counted (read in the progress callback) =
    nfe["stage2"][i] (= t0 on the full grid, min(K, t0) on a sub-grid), the sum = nfe["total"]."""
    prior, op, y, model, counter = problem
    cfg = mr.MAPConfig(t1=10.0, w=0.2, n_iter=9, lr=0.05)
    marks = []

    def progress(i, n):
        marks.append(counter.per_image())

    counter.reset()
    res = mr.dp_sweep(jax.random.PRNGKey(4), model, op, y, t0s, map_config=cfg,
                      sampler=mr.DPSStep(zeta=0.3, clip=False), n_steps=n_steps, progress=progress)
    total = counter.per_image()
    stage2 = list(np.diff(marks))
    assert marks[0] == res.nfe["stage1"] == 9
    assert stage2 == list(res.nfe["stage2"]), (stage2, res.nfe)
    assert stage2 == [mr.stage2_nfe(t, n_steps) for t in t0s]
    assert total == res.nfe["total"], (total, res.nfe)


@pytest.mark.parametrize("n_steps", [None, 6])
def test_dp_sweep_vectorized_counted_equals_reported(problem, n_steps):
    """vectorize=True: every t0 lane runs max(t0) (or K) steps: counted = nfe["total_vectorized"]."""
    prior, op, y, model, counter = problem
    cfg = mr.MAPConfig(t1=10.0, w=0.2, n_iter=9, lr=0.05)
    t0s = [0, 4, 11, 25]
    counter.reset()
    res = mr.dp_sweep(jax.random.PRNGKey(5), model, op, y, t0s, map_config=cfg,
                      sampler=mr.DPSStep(zeta=0.3, clip=False), n_steps=n_steps, vectorize=True)
    counted = counter.per_image()
    assert counted == res.nfe["total_vectorized"], (counted, res.nfe)
    assert counted == 9 + len(t0s) * (n_steps or max(t0s))


@pytest.mark.parametrize("n_steps", [None, 20])
def test_dps_counts_T_or_K(problem, n_steps):
    prior, op, y, model, counter = problem
    counter.reset()
    mr.dps(jax.random.PRNGKey(6), model, op, y, zeta=0.3, clip=False, n_steps=n_steps).block_until_ready()
    assert counter.per_image() == (SCHED.T if n_steps is None else n_steps)


def test_dps_average_counts_M_runs(problem):
    prior, op, y, model, counter = problem
    counter.reset()
    mr.dps_average(jax.random.PRNGKey(7), model, op, y, 3, zeta=0.3, clip=False, n_steps=15).block_until_ready()
    assert counter.per_image() == 3 * 15


@pytest.mark.parametrize("t0,n_steps", [(0, None), (1, None), (37, None), (37, 8), (5, 8), (300, 25)])
def test_ccdf_counts_stage2_nfe(problem, t0, n_steps):
    """ccdf (= rps from A^+ y): counted = stage2_nfe(t0, n_steps), with a concrete and with a traced t0."""
    prior, op, y, model, counter = problem
    sampler = mr.DPSStep(zeta=0.3, clip=False)
    counter.reset()
    mr.ccdf(jax.random.PRNGKey(8), model, op, y, t0, sampler=sampler, n_steps=n_steps).block_until_ready()
    assert counter.per_image() == mr.stage2_nfe(t0, n_steps)
    f = jax.jit(lambda tt: mr.ccdf(jax.random.PRNGKey(8), model, op, y, tt, sampler=sampler, n_steps=n_steps))
    counter.reset()
    f(jnp.int32(t0)).block_until_ready()
    assert counter.per_image() == mr.stage2_nfe(t0, n_steps)


@pytest.mark.parametrize("n_steps", [1, 13])
def test_red_diff_counts_n_steps(problem, n_steps):
    prior, op, y, model, counter = problem
    counter.reset()
    mr.red_diff(jax.random.PRNGKey(9), model, op, y, config=mr.REDDiffConfig(n_steps=n_steps)).block_until_ready()
    assert counter.per_image() == n_steps


@pytest.mark.parametrize("name", ["ddpm", "ddnm", "pigdm", "dmps"])
def test_stage2_samplers_cost_one_call_per_step(problem, name):
    """Every Stage-2 sampler costs one evaluation per step (DPS and PiGDM: forward + VJP; DDPM, DDNM, DMPS: forward)."""
    prior, op, y, model, counter = problem
    if name not in mr.samplers.SAMPLERS:
        pytest.skip(f"sampler {name!r} not in this version")
    sampler = mr.make_sampler(name, clip=False) if name != "ddpm" else mr.DDPMStep()
    counter.reset()
    mr.rps(jax.random.PRNGKey(10), model, op, y, op.x_init(y), 23, sampler=sampler).block_until_ready()
    assert counter.per_image() == 23


def _counting_latent(model, M):
    """The exact prior as a latent model with an orthogonal linear autoencoder; UNet, decoder and encoder calls
    counted separately."""
    return counting_latent_model(model, B, lambda m, x, key=None: x @ m, lambda m, z: z @ m.T, M)


@pytest.mark.parametrize("sampler", [mr.DPSStep(zeta=0.3, clip=False), mr.PSLDStep(zeta=0.3, clip=False),
                                     mr.DDNMStep(clip=False), mr.DDPMStep()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("guided", [False, True])
def test_latent_sweep_calls_counted_equal_reported(problem, sampler, guided):
    """Latent dp_sweep: UNet calls (two per eps with classifier-free guidance), decoder and encoder forwards
    counted by callbacks in the networks equal SweepResult.nfe["calls"] (network_calls)."""
    prior, op, y, model, _ = problem
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(D, D)))
    m, (unet, dec, enc) = _counting_latent(prior.score_model(SCHED), jnp.asarray(q, jnp.float32))
    if guided:
        m = m.guided(None, 1.5, None)
    cfg = mr.MAPConfig(t1=10.0, w=0.2, n_iter=7, lr=0.05)
    for c in (unet, dec, enc):
        c.reset()
    res = mr.dp_sweep(jax.random.PRNGKey(0), m, op, y, [0, 3, 9], map_config=cfg, sampler=sampler)
    assert res.nfe["calls"] == {"unet": unet.per_image(), "decoder": dec.per_image(), "encoder": enc.per_image()}
    assert res.nfe["calls"]["unet"] == (2 if guided else 1) * res.nfe["total"]
