"""One algorithm in two spaces (:mod:`mapreps_jax.space`), checked on exact Gaussian priors.

A latent model whose decoder is an orthogonal linear map ``D(z) = M z`` (encoder ``E(x) = M^T x``) and whose prior on
``z`` is an exact Gaussian is the same inverse problem as the pixel-space problem with prior ``p(z)`` and operator
``A M``: every algorithm run on the latent model must produce the latent outputs of that pixel-space run (and
``dp_sweep``/``map_rps`` their decoded images). This tests that the data fit goes through the decoder in every
algorithm (Stage 1, each step rule, each baseline) and that starts are encoded; the latent step rules of the paper's
code (DPS with ``a_t`` scaling and the decoded image clipped, PSLD) are checked against their definitions written
out with the matrices.
LMAP's fixed point is also checked against the closed form of ``TESTBED.md`` (``stage1_fixed_point`` for ``A M``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr
from mapreps_jax.priors import GaussianPrior, stage1_fixed_point

D, ROWS, B, SIGMA = 6, 3, 5, 0.2
SCHED = mr.make_schedule("linear", T=200)
TOL = dict(rtol=2e-4, atol=2e-5)


def _encode(m, x, key=None):
    return x @ m  # z = M^T x for row vectors


def _decode(m, z):
    return z @ m.T  # x = M z


@pytest.fixture(scope="module")
def setup():
    prior = GaussianPrior.random(jax.random.PRNGKey(3), D)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(D, D)))
    M = jnp.asarray(q, jnp.float32)
    op = mr.make_operator("matrix", (D,), rows=ROWS, seed=2)
    op_eq = mr.make_operator("matrix", (D,), matrix=np.asarray(op.matrix()) @ q)  # A M: the same problem on z
    z_true = prior.sample(jax.random.PRNGKey(4), B)
    y = op.measure(jax.random.PRNGKey(5), _decode(M, z_true), SIGMA)
    pixel = prior.score_model(SCHED)
    latent = dataclasses.replace(pixel, space=mr.latent_space(M, _encode, _decode, name="orthogonal"))
    return prior, M, op, op_eq, y, pixel, latent


def test_space_encode_decode_and_state_shape(setup):
    prior, M, op, op_eq, y, pixel, latent = setup
    x = jax.random.normal(jax.random.PRNGKey(0), (B, D))
    np.testing.assert_allclose(np.asarray(latent.decode(latent.encode(x))), np.asarray(x), atol=1e-5)
    assert pixel.encode(x) is x and pixel.decode(x) is x
    assert latent.space.state_shape(op.in_shape) == (D,)
    problem = mr.Problem(latent, op, y)
    np.testing.assert_allclose(np.asarray(problem.residual(latent.encode(x))), np.asarray(y - op.A(x)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(problem.x_init()), np.asarray(latent.encode(op.x_init(y))), atol=1e-6)
    with pytest.raises(ValueError, match="both encode_fn and decode_fn"):
        mr.Space(encode_fn=_encode)


def test_lmap_equals_stage1_on_the_equivalent_problem_and_its_closed_form(setup):
    prior, M, op, op_eq, y, pixel, latent = setup
    cfg = mr.MAPConfig(t1=10.0, w=0.3, n_iter=1500, lr=0.05, weight_decay=0.0)
    z0 = latent.encode(op.x_init(y))
    z_lat = mr.map_estimate(jax.random.PRNGKey(6), latent, op, y, config=cfg)
    z_pix = mr.map_estimate(jax.random.PRNGKey(6), pixel, op_eq, y, config=cfg, x_init=z0)
    np.testing.assert_allclose(np.asarray(z_lat), np.asarray(z_pix), **TOL)
    a1 = float(pixel.alpha_bar(jnp.float32(10.0)))
    ref = stage1_fixed_point(prior, op_eq.matrix(), y, SIGMA, 0.3, a1)
    np.testing.assert_allclose(np.asarray(z_lat), np.asarray(ref), atol=2e-2)


@pytest.mark.parametrize("name,sampler", [
    ("dps", mr.DPSStep(zeta=0.3, clip=False)),
    ("dps_sq", mr.DPSStep(zeta=0.1, loss="sq", clip=False)),
    ("ddnm", mr.DDNMStep(clip=False)),
    ("pigdm", mr.PiGDMStep(sigma_y=SIGMA, clip=False)),
    ("ddpm", mr.DDPMStep()),
])
def test_every_step_rule_runs_in_the_latent_space(setup, name, sampler):
    prior, M, op, op_eq, y, pixel, latent = setup
    z0 = latent.encode(op.x_init(y))
    got = mr.rps(jax.random.PRNGKey(7), latent, op, y, z0, 40, sampler=sampler)
    want = mr.rps(jax.random.PRNGKey(7), pixel, op_eq, y, z0, 40, sampler=sampler)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def test_baselines_run_in_the_latent_space(setup):
    prior, M, op, op_eq, y, pixel, latent = setup
    s = mr.DPSStep(zeta=0.3, clip=False)
    k = jax.random.PRNGKey(8)
    z0 = latent.encode(op.x_init(y))
    np.testing.assert_allclose(np.asarray(mr.dps(k, latent, op, y, sampler=s, n_steps=30)),
                               np.asarray(mr.dps(k, pixel, op_eq, y, sampler=s, n_steps=30)), **TOL)
    np.testing.assert_allclose(np.asarray(mr.ccdf(k, latent, op, y, 30, sampler=s)),
                               np.asarray(mr.rps(k, pixel, op_eq, y, z0, 30, sampler=s)), **TOL)
    cfg = mr.REDDiffConfig(n_steps=40, lr=0.1)
    np.testing.assert_allclose(np.asarray(mr.red_diff(k, latent, op, y, config=cfg)),
                               np.asarray(mr.red_diff(k, pixel, op_eq, y, config=cfg, x_init=z0)), **TOL)


def test_map_rps_and_sweep_return_decoded_images(setup):
    prior, M, op, op_eq, y, pixel, latent = setup
    cfg = mr.MAPConfig(t1=10.0, w=0.3, n_iter=50, lr=0.05)
    s = mr.DPSStep(zeta=0.3, clip=False)
    k = jax.random.PRNGKey(9)
    k1, k2 = mr.split_keys(mr.image_keys(k, B))
    z_map = mr.map_estimate(k1, pixel, op_eq, y, config=cfg, x_init=latent.encode(op.x_init(y)))
    z_out = mr.rps(k2, pixel, op_eq, y, z_map, 25, sampler=s)
    x = mr.map_rps(k, latent, op, y, 25, map_config=cfg, sampler=s)
    np.testing.assert_allclose(np.asarray(x), np.asarray(_decode(M, z_out)), **TOL)
    res = mr.dp_sweep(k, latent, op, y, [0, 25], map_config=cfg, sampler=s)
    np.testing.assert_allclose(np.asarray(res.x_map), np.asarray(_decode(M, z_map)), **TOL)
    np.testing.assert_allclose(np.asarray(res.outputs[1]), np.asarray(_decode(M, z_out)), **TOL)


def test_pixel_only_methods_refuse_a_latent_space(setup):
    prior, M, op, op_eq, y, pixel, latent = setup
    z0 = latent.encode(op.x_init(y))
    with pytest.raises(ValueError, match="pixel space"):
        mr.rps(jax.random.PRNGKey(0), latent, op, y, z0, 5, sampler=mr.DMPSStep(sigma_y=SIGMA))
    with pytest.raises(ValueError, match="solver='prox'"):
        mr.map_estimate(jax.random.PRNGKey(0), latent, op, y, config=mr.MAPConfig(w=0.3, solver="prox"))


def test_traces_report_each_step(setup):
    """rps_trace / map_estimate_trace: the same output as rps / map_estimate, plus per-step info whose values
    are what they claim (the residual of the reported x0; the data fit of the iterate)."""
    prior, M, op, op_eq, y, pixel, latent = setup
    z0 = latent.encode(op.x_init(y))
    s = mr.DPSStep(zeta=0.3, clip=False)
    k = jax.random.PRNGKey(10)
    x, info = mr.rps_trace(k, latent, op, y, z0, 12, sampler=s)
    np.testing.assert_allclose(np.asarray(x), np.asarray(mr.rps(k, latent, op, y, z0, 12, sampler=s)), atol=1e-6)
    assert info.x0.shape == (12, B, D) and info.residual.shape == (12, B)
    want = jnp.linalg.norm(y[None] - op.A(_decode(M, info.x0)), axis=-1)
    np.testing.assert_allclose(np.asarray(info.residual), np.asarray(want), rtol=1e-4, atol=1e-5)
    # a rule that does not compute the residual itself (DDNM): the loop fills it in from the reported x0
    _, info_d = mr.rps_trace(k, latent, op, y, z0, 6, sampler=mr.DDNMStep(clip=False))
    want_d = jnp.linalg.norm(y[None] - op.A(_decode(M, info_d.x0)), axis=-1)
    np.testing.assert_allclose(np.asarray(info_d.residual), np.asarray(want_d), rtol=1e-4, atol=1e-5)
    # masked full-grid scan (max_steps): the steps past t0 are zeros
    _, info2 = mr.rps_trace(k, latent, op, y, z0, jnp.int32(5), sampler=s, max_steps=9)
    assert info2.residual.shape == (9, B)
    assert np.all(np.asarray(info2.residual[5:]) == 0) and np.all(np.asarray(info2.residual[:5]) > 0)
    cfg = mr.MAPConfig(t1=10.0, w=0.3, n_iter=30, lr=0.05)
    z_map, minfo = mr.map_estimate_trace(k, latent, op, y, config=cfg)
    np.testing.assert_allclose(np.asarray(z_map), np.asarray(mr.map_estimate(k, latent, op, y, config=cfg)),
                               atol=1e-6)
    last = jnp.sum((y - op.A(latent.decode(z_map))) ** 2, -1)
    np.testing.assert_allclose(np.asarray(minfo.data_fit[-1]), np.asarray(last), rtol=1e-4)
    # collect selects what is kept
    _, kept = mr.rps_trace(k, latent, op, y, z0, 12, sampler=s, collect=lambda st, inf: st.x[:, 0])
    assert kept.shape == (12, B)


def test_step_is_one_step_from_a_fresh_state(setup):
    prior, M, op, op_eq, y, pixel, latent = setup
    s = mr.DPSStep(zeta=0.3, clip=False)
    z = latent.encode(op.x_init(y))
    k = jax.random.PRNGKey(11)
    problem = mr.Problem(latent, op, y)
    state, info = s.one_step(k, problem, s.init(problem, z), 30, 29)
    np.testing.assert_allclose(np.asarray(s.step(k, latent, op, y, z, 30, 29)), np.asarray(state.x), atol=0)
    assert isinstance(state, mr.SamplerState) and isinstance(info, mr.StepInfo)


def test_classifier_free_guidance_combines_two_conditionings():
    """guided(cond, s, uncond).eps = eps_u + s (eps_c - eps_u); conditionings of different shapes are allowed."""
    def eps_fn(p, x, t, c):
        return p * x + jnp.sum(c)

    m = mr.from_eps_fn(eps_fn, jnp.float32(0.5), SCHED, name="toy")
    x = jnp.ones((2, 3))
    c, u = jnp.arange(6.0).reshape(3, 2), jnp.ones((1, 2))
    g = m.guided(c, 1.5, u)
    want = m.eps(x, 5, u) + 1.5 * (m.eps(x, 5, c) - m.eps(x, 5, u))
    np.testing.assert_allclose(np.asarray(g.eps(x, 5)), np.asarray(want), rtol=1e-6)
    # the scale is a traced leaf: d eps / d s = eps_c - eps_u
    ds = jax.grad(lambda s: jnp.sum(m.guided(c, s, u).eps(x, 5)))(1.5)
    np.testing.assert_allclose(float(ds), float(jnp.sum(m.eps(x, 5, c) - m.eps(x, 5, u))), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ latent step rules


def _reference_terms(setup, z_t, t, clip):
    """Hand-written (matrix) pieces of a latent step on the orthogonal-decoder problem: eps, z0, the decoded and
    clipped image, and the DDPM(eta = 1) noise-free move from z0 (raw eps and re-derived eps agree here: no clipping
    of latents)."""
    prior, M, op, op_eq, y, pixel, latent = setup
    a_t, a_n = pixel.alpha_bar(t), pixel.alpha_bar(t - 1)
    e = pixel.eps(z_t, t)
    z0 = (z_t - jnp.sqrt(1 - a_t) * e) / jnp.sqrt(a_t)
    s = jnp.sqrt((1 - a_n) / (1 - a_t)) * jnp.sqrt(1 - a_t / a_n)
    move = jnp.sqrt(a_n) * z0 + jnp.sqrt(1 - a_n - s ** 2) * e
    return a_t, move


def _decoded(M, z0, clip):
    x = z0 @ M.T
    return jnp.clip(x, -1.0, 1.0) if clip else x


@pytest.mark.parametrize("clip", [False, True])
def test_psld_step_equals_its_definition(setup, clip):
    """PSLD: z' = move(z_t, z0) - zeta grad_{z_t}(||y - A D(z0) - s n'|| + gamma ||z0 - E(sg(A^T y + (I - A^T A)
    D(z0)))||), written out with the matrices A and M (clip: D(z0) clipped to [-1, 1] first)."""
    prior, M, op, op_eq, y, pixel, latent = setup
    A = op.matrix()
    z_t = jax.random.normal(jax.random.PRNGKey(20), (B, D))
    t, zeta, gamma, s_y = 60, 0.7, 0.3, 0.15
    key = jax.random.PRNGKey(21)
    n_meas = mr.rng.normal_like(mr.fold_keys(mr.image_keys(key, B), 1), y)
    step = mr.PSLDStep(zeta=zeta, gamma=gamma, sigma_y=s_y, noise_scale=0.0, clip=clip)
    got, info = step.one_step(key, mr.Problem(latent, op, y), step.init(None, z_t), t, t - 1)

    def loss(z):
        a = pixel.alpha_bar(t)
        z0 = (z - jnp.sqrt(1 - a) * pixel.eps(z, t)) / jnp.sqrt(a)
        x = _decoded(M, z0, clip)
        data = jnp.linalg.norm(y - x @ A.T - s_y * n_meas, axis=-1)
        proj = jax.lax.stop_gradient(y @ A + x - (x @ A.T) @ A)
        glue = jnp.linalg.norm(z0 - proj @ M, axis=-1)
        return jnp.sum(data + gamma * glue)

    _, move = _reference_terms(setup, z_t, t, clip)
    want = move - zeta * jax.grad(loss)(z_t)
    np.testing.assert_allclose(np.asarray(got.x), np.asarray(want), rtol=1e-4, atol=1e-5)
    # gamma = 0 and no measurement noise: the DPS step
    dps = mr.DPSStep(zeta=zeta, noise_scale=0.0, clip=clip)
    psld0 = mr.PSLDStep(zeta=zeta, gamma=0.0, noise_scale=0.0, clip=clip)
    np.testing.assert_allclose(np.asarray(psld0.step(key, latent, op, y, z_t, t, t - 1)),
                               np.asarray(dps.step(key, latent, op, y, z_t, t, t - 1)), rtol=1e-5, atol=1e-6)


def test_official_latent_steps_equal_their_definition(setup):
    """The paper's latent code (ALGORITHMS.md section 4): DPS g = a_t grad ||y - A clip(D(z0))||^2 with the raw-eps
    move; its PSLD variant adds lambda ||z0 - E(sg(x + A_pinv(y - A x)))||^2 and the sigma_y n' draw."""
    prior, M, op, op_eq, y, pixel, latent = setup
    A = op.matrix()
    A_pinv = jnp.linalg.pinv(A)
    z_t = jax.random.normal(jax.random.PRNGKey(22), (B, D))
    t, zeta, lam, s_y = 60, 0.4, 0.1, 0.2
    key = jax.random.PRNGKey(23)
    n_meas = mr.rng.normal_like(mr.fold_keys(mr.image_keys(key, B), 1), y)
    a_t, move = _reference_terms(setup, z_t, t, True)

    def z0_of(z):
        a = pixel.alpha_bar(t)
        return (z - jnp.sqrt(1 - a) * pixel.eps(z, t)) / jnp.sqrt(a)

    def dps_loss(z):
        return jnp.sum((y - _decoded(M, z0_of(z), True) @ A.T) ** 2)

    got = mr.DPSStep.official_latent(zeta=zeta, noise_scale=0.0).step(key, latent, op, y, z_t, t, t - 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(move - zeta * a_t * jax.grad(dps_loss)(z_t)),
                               rtol=1e-4, atol=1e-5)

    def psld_loss(z):
        z0 = z0_of(z)
        x = _decoded(M, z0, True)
        proj = jax.lax.stop_gradient(x + (y - x @ A.T) @ A_pinv.T)
        return jnp.sum((y - x @ A.T - s_y * n_meas) ** 2) + lam * jnp.sum((z0 - proj @ M) ** 2)

    step = mr.PSLDStep.official_lmap(zeta=zeta, gamma=lam, sigma_y=s_y, noise_scale=0.0)
    got = step.step(key, latent, op, y, z_t, t, t - 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(move - zeta * a_t * jax.grad(psld_loss)(z_t)),
                               rtol=1e-4, atol=1e-5)


def test_psld_runs_a_latent_chain_and_refuses_what_it_cannot_do(setup):
    prior, M, op, op_eq, y, pixel, latent = setup
    z0 = latent.encode(op.x_init(y))
    out, info = mr.rps_trace(jax.random.PRNGKey(24), latent, op, y, z0, 30, sampler=mr.PSLDStep(zeta=0.2, clip=False))
    assert out.shape == (B, D) and bool(jnp.all(jnp.isfinite(out)))
    assert info.residual.shape == (30, B)
    square = mr.custom_operator("square", (D,), (D,), lambda data, v: v ** 2)
    with pytest.raises(ValueError, match="linear operator"):
        mr.PSLDStep().step(jax.random.PRNGKey(0), latent, square, square.A(op.x_init(y)), z0, 5, 4)
    with pytest.raises(ValueError, match="projection"):
        mr.PSLDStep(projection="adjoint")


@pytest.mark.parametrize("sampler_fn", [
    lambda g, s: mr.PSLDStep(zeta=0.3, gamma=g, sigma_y=s, clip=False),
    lambda g, s: mr.PSLDStep.official_lmap(zeta=0.3, gamma=g, sigma_y=s, clip=False),
    lambda g, s: mr.PiGDMStep(zeta=0.5, sigma_y=s, clip=False),
])
def test_per_image_hyper_parameters_act_per_image(setup, sampler_fn):
    """Hyper-parameters given per image, shaped for the state (``[B, 1]`` here, ``[B, 1, 1, 1]`` for images), give
    each image the step it gets alone with its own scalar values (a per-image term must not be broadcast across the
    batch: PSLD's gluing weight once multiplied every image's loss by ``B``)."""
    prior, M, op, op_eq, y, pixel, latent = setup
    gam = jnp.linspace(0.05, 0.4, B)
    sig = jnp.linspace(0.1, 0.3, B)
    z = latent.encode(op.x_init(y))
    keys = jax.random.split(jax.random.PRNGKey(31), B)
    batched = sampler_fn(gam[:, None], sig[:, None]).step(keys, latent, op, y, z, 40, 39)
    for i in range(B):
        alone = sampler_fn(float(gam[i]), float(sig[i])).step(keys[i:i + 1], latent, op, y[i:i + 1], z[i:i + 1],
                                                               40, 39)
        np.testing.assert_allclose(np.asarray(batched[i:i + 1]), np.asarray(alone), **TOL)
