"""ReSampleStep and the ``resample`` baseline, each against an independent reference.

* One step, on and off the hard-data-consistency schedule, equals a float64 NumPy transcription of its definition
  (``ALGORITHMS.md`` section 5; the update equations of the ``ReSampleStep`` docstring) written here from the
  formulas: an exact Gaussian prior's eps in closed form, a nonlinear decoder ``D(z) = M (z + c tanh z)`` with its
  Jacobian by hand, hand-written Adam loops, the resampling law in its textbook form
  ``N((s2 sqrt(a_n) z0(y) + (1 - a_n) z') / (s2 + 1 - a_n), s2 (1 - a_n) / (s2 + 1 - a_n))``; the same noise (drawn
  here from the per-image keys). The hand-written gradients are checked by central finite differences, and the DPS
  part of the implementation (read off as ``(z'(zeta=0) - z'(zeta)) / (zeta a_t)``) against finite differences too.
* Limits: ``gamma -> inf`` is the forward re-noising ``sqrt(a_n) z0(y) + sqrt(1 - a_n) n`` of the data-consistent
  latent; ``gamma = 0`` is the off-schedule output ``z'``.
* On the exact Gaussian testbed prior the hard DC step drives ``||y - A D(z0(y))||`` far below the Tweedie estimate's
  residual; the same check without the DC (off schedule) fails, so the test cannot pass without the DC.
* Cost: UNet, decoder and encoder calls counted by callbacks in the networks (``tests/test_nfe_counted.py``'s
  pattern) equal the hand-derived numbers and what ``network_calls`` / ``dp_sweep`` report.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr
from mapreps_jax.priors import GaussianPrior
from call_counter import counted, counting_latent_model

D, ROWS, B, C_NL = 6, 3, 4, 0.3


# ------------------------------------------------------------------------------------------ the test problem


def _encode(m, x, key=None):
    return x @ m  # E(x) = M^T x (rows)


def _decode(m, z):
    return (z + C_NL * jnp.tanh(z)) @ m.T  # D(z) = M (z + c tanh z)


def _gauss_eps(p, z, t, cond=None):
    """Exact eps of N(mu, S) diffused to alpha_bar(t): sqrt(1 - a) (a S + (1 - a) I)^{-1} (z - sqrt(a) mu)."""
    a = mr.alpha_bar(p["sched"], t)
    cov = a * p["S"] + (1.0 - a) * jnp.eye(p["S"].shape[0], dtype=p["S"].dtype)
    return jnp.sqrt(1.0 - a) * jnp.linalg.solve(cov, (z - jnp.sqrt(a) * p["mu"]).T).T


class Ref:
    """The problem in float64 NumPy (prior N(mu, S), decoder M, operator A, measurements y) and the transcription."""

    def __init__(self, T=1000, seed=0):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(D, D)))
        qs, _ = np.linalg.qr(rng.normal(size=(D, D)))
        self.M = q
        self.mu = 0.5 * rng.normal(size=D)
        self.S = (qs * np.exp(rng.uniform(np.log(0.2), np.log(1.5), D))) @ qs.T
        self.op = mr.make_operator("matrix", (D,), rows=ROWS, seed=seed + 1)
        self.A = np.asarray(self.op.matrix(), np.float64)
        self.sched = mr.make_schedule("linear", T=T, dtype=jnp.float64)
        self.ab = np.asarray(self.sched.alpha_bar_ext, np.float64)  # ab[t + 1] = alpha_bar(t)
        z_true = self.mu + rng.normal(size=(B, D)) @ np.linalg.cholesky(self.S).T
        self.y = self.dec(z_true) @ self.A.T + 0.05 * rng.normal(size=(B, ROWS))
        self.model = mr.from_eps_fn(_gauss_eps, dict(mu=jnp.asarray(self.mu), S=jnp.asarray(self.S),
                                                     sched=self.sched), self.sched, name="gauss64")
        self.model = dataclasses.replace(self.model, space=mr.latent_space(jnp.asarray(self.M), _encode, _decode))

    def a(self, t):
        return self.ab[t + 1]

    def dec(self, z):
        return (z + C_NL * np.tanh(z)) @ self.M.T

    def dec_vjp(self, z, gx):
        """J_D(z)^T gx per row: J_D = M diag(1 + c sech^2 z)."""
        return (1.0 + C_NL * (1.0 - np.tanh(z) ** 2)) * (gx @ self.M)

    def eps(self, z, a):
        cov = a * self.S + (1.0 - a) * np.eye(D)
        return np.sqrt(1.0 - a) * np.linalg.solve(cov, (z - np.sqrt(a) * self.mu).T).T

    def tweedie(self, z, a):
        return (z - np.sqrt(1.0 - a) * self.eps(z, a)) / np.sqrt(a)

    def dps_loss(self, z, a, loss, clip):
        x = self.dec(self.tweedie(z, a))
        r = self.y - (np.clip(x, -1, 1) if clip else x) @ self.A.T
        sq = np.sum(r * r, axis=1)
        return np.sum(sq if loss == "sq" else np.sqrt(sq))

    def dps_grad(self, z, a, loss, clip):
        """grad_z of dps_loss by the chain rule: z0 = P z + const,
        P = (I - (1 - a) (a S + (1 - a) I)^{-1}) / sqrt(a)."""
        z0 = self.tweedie(z, a)
        x = self.dec(z0)
        r = self.y - (np.clip(x, -1, 1) if clip else x) @ self.A.T
        gx = -2.0 * r @ self.A if loss == "sq" else -(r @ self.A) / np.linalg.norm(r, axis=1, keepdims=True)
        if clip:
            gx = gx * (np.abs(x) < 1.0)
        P = (np.eye(D) - (1.0 - a) * np.linalg.inv(a * self.S + (1.0 - a) * np.eye(D))) / np.sqrt(a)
        return self.dec_vjp(z0, gx) @ P.T

    def latent_fit_grad(self, z):
        return self.dec_vjp(z, -2.0 * (self.y - self.dec(z) @ self.A.T) @ self.A)

    def pixel_fit_grad(self, x):
        return -2.0 * (self.y - x @ self.A.T) @ self.A


def _adam(grad, x, lr, n):
    """Adam (b1 0.9, b2 0.999, eps 1e-8, bias-corrected), written out."""
    m, v = np.zeros_like(x), np.zeros_like(x)
    for k in range(1, n + 1):
        g = grad(x)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        x = x - lr * (m / (1 - 0.9 ** k)) / (np.sqrt(v / (1 - 0.999 ** k)) + 1e-8)
    return x


def _noise(key, stream):
    """The step's noise for image i: normal(fold_in(fold_in(key, i), stream)) (stream 0: the move, 1: resampling)."""
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), stream), (D,),
                                                  jnp.float64)) for i in range(B)])


def reference_step(ref, key, z, t, tn, s, dc):
    """The step of the ReSampleStep docstring in float64 NumPy; ``dc``: whether this is a hard-DC step."""
    a_t, a_n = ref.a(t), ref.a(tn)
    z0 = ref.tweedie(z, a_t)
    beta_tilde = (1 - a_n) / (1 - a_t) * (1 - a_t / a_n)  # DDPM posterior variance of t -> tn (eta = 1 std^2)
    sd = s.eta * np.sqrt(beta_tilde)
    eps_hat = (z - np.sqrt(a_t) * z0) / np.sqrt(1 - a_t)
    move = np.sqrt(a_n) * z0 + np.sqrt(1 - a_n - sd ** 2) * eps_hat + s.noise_scale * sd * _noise(key, 0)
    zp = move - s.zeta * a_t * ref.dps_grad(z, a_t, s.loss, s.clip)
    if not dc:
        return zp, z0, None
    x_star = _adam(ref.pixel_fit_grad, ref.dec(z0), s.pixel_lr, s.pixel_iters)
    z_y = _adam(ref.latent_fit_grad, x_star @ ref.M, s.lr, s.latent_iters)
    if tn == -1:  # a_n = 1, s2 = 0: the law's limit a_n -> 1 (s2 / (1 - a_n) -> gamma): a point mass
        return (s.gamma * z_y + zp) / (s.gamma + 1), z0, z_y
    s2 = s.gamma * beta_tilde
    mean = (s2 * np.sqrt(a_n) * z_y + (1 - a_n) * zp) / (s2 + 1 - a_n)
    var = s2 * (1 - a_n) / (s2 + 1 - a_n)
    return mean + np.sqrt(var) * _noise(key, 1), z0, z_y


# ------------------------------------------------------------------------------------------ the step


@jax.jit
def _one_step(s, key, problem, state, t, tn):
    """The rule's one_step, jitted with the rule, problem and times as arguments (one compilation per static
    configuration serves every case)."""
    return s.one_step(key, problem, state, t, tn)


CASES = [  # (t, t_next, counter before the step, hard DC expected by the schedule rules)
    (500, 499, 9, True),     # 10th step, t < 2/3 T
    (500, 499, 3, False),    # not a 10th step
    (800, 799, 19, False),   # a 10th step but t >= 2/3 T (first third)
    (400, 350, 29, True),    # a sub-grid jump
    (300, -1, 9, True),      # to the clean end: the noise-free (gamma z0(y) + z')/(gamma + 1)
]


@pytest.mark.parametrize("t,tn,k,dc", CASES)
@pytest.mark.parametrize("loss,clip", [("sq", False), ("norm", True)])
def test_step_equals_its_float64_transcription(x64, t, tn, k, dc, loss, clip):
    ref = Ref()
    s = mr.ReSampleStep(zeta=0.7, gamma=40.0, lr=0.02, pixel_lr=0.05, pixel_iters=25, latent_iters=15,
                        loss=loss, clip=clip)
    z = np.random.default_rng(7).normal(size=(B, D)) * 1.2
    key = jax.random.PRNGKey(11)
    problem = mr.Problem(ref.model, ref.op, jnp.asarray(ref.y))
    state, info = _one_step(s, key, problem, mr.SamplerState(jnp.asarray(z), jnp.int32(k)), jnp.int32(t),
                            jnp.int32(tn))
    want, z0, _ = reference_step(ref, key, z, t, tn, s, dc)
    np.testing.assert_allclose(np.asarray(state.x), want, rtol=1e-9, atol=1e-11)
    assert int(state.extra) == k + 1
    np.testing.assert_allclose(np.asarray(info.x0), z0, rtol=1e-11, atol=1e-12)
    x = ref.dec(z0)
    r = ref.y - (np.clip(x, -1, 1) if clip else x) @ ref.A.T
    np.testing.assert_allclose(np.asarray(info.residual), np.linalg.norm(r, axis=1), rtol=1e-10)
    # the other branch gives a different output (the case really exercises the schedule)
    other, _, _ = reference_step(ref, key, z, t, tn, s, not dc)
    assert np.max(np.abs(other - want)) > 1e-3


def test_reference_gradients_equal_finite_differences(x64):
    """The transcription's hand-written gradients (DPS term through Tweedie and the decoder; latent data fit)."""
    ref = Ref()
    z = np.random.default_rng(3).normal(size=(B, D))
    a = ref.a(450)
    h = 1e-6

    def fd(f):
        g = np.zeros((B, D))
        for i in range(B):
            for j in range(D):
                e = np.zeros((B, D))
                e[i, j] = h
                g[i, j] = (f(z + e) - f(z - e)) / (2 * h)
        return g

    for loss in ("sq", "norm"):
        np.testing.assert_allclose(ref.dps_grad(z, a, loss, False), fd(lambda v: ref.dps_loss(v, a, loss, False)),
                                   rtol=1e-6, atol=1e-7)
    fit = lambda v: np.sum((ref.y - ref.dec(v) @ ref.A.T) ** 2)  # noqa: E731
    np.testing.assert_allclose(ref.latent_fit_grad(z), fd(fit), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss", ["sq", "norm"])
def test_dps_part_of_the_step_is_the_finite_difference_gradient(x64, loss):
    """Off the schedule and without noise, z'(zeta = 0) - z'(zeta) = zeta a_t grad_z L(z): the implementation's
    gradient equals central finite differences of L(z) = sum_i ||y_i - A D(z0(z_i))||^(2 or 1) (NumPy float64)."""
    ref = Ref()
    t, zeta = 450, 0.8
    z = np.random.default_rng(5).normal(size=(B, D))
    key = jax.random.PRNGKey(2)
    out = {}
    problem = mr.Problem(ref.model, ref.op, jnp.asarray(ref.y))
    for zt in (0.0, zeta):
        s = mr.ReSampleStep(zeta=zt, noise_scale=0.0, loss=loss, clip=False, every=1000, pixel_iters=2,
                            latent_iters=2)
        out[zt] = np.asarray(_one_step(s, key, problem, s.init(problem, jnp.asarray(z)), t, t - 1)[0].x)
    g = (out[0.0] - out[zeta]) / (zeta * ref.a(t))
    h = 1e-6
    fd = np.zeros((B, D))
    for i in range(B):
        for j in range(D):
            e = np.zeros((B, D))
            e[i, j] = h
            fd[i, j] = (ref.dps_loss(z + e, ref.a(t), loss, False)
                        - ref.dps_loss(z - e, ref.a(t), loss, False)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)


def test_gamma_limits(x64):
    """gamma -> inf: sqrt(a_n) z0(y) + sqrt(1 - a_n) n (z0(y) re-noised to t_next); gamma = 0: z' (off schedule)."""
    ref = Ref()
    t, tn = 500, 480
    z = np.random.default_rng(9).normal(size=(B, D))
    key = jax.random.PRNGKey(4)
    kw = dict(lr=0.02, pixel_lr=0.05, pixel_iters=20, latent_iters=10, clip=False)
    problem = mr.Problem(ref.model, ref.op, jnp.asarray(ref.y))
    state0 = mr.SamplerState(jnp.asarray(z), jnp.int32(9))
    big = mr.ReSampleStep(gamma=1e12, **kw)
    got = np.asarray(_one_step(big, key, problem, state0, t, tn)[0].x)
    _, _, z_y = reference_step(ref, key, z, t, tn, big, True)
    a_n = ref.a(tn)
    np.testing.assert_allclose(got, np.sqrt(a_n) * z_y + np.sqrt(1 - a_n) * _noise(key, 1), rtol=1e-8, atol=1e-9)
    zero = np.asarray(_one_step(mr.ReSampleStep(gamma=0.0, **kw), key, problem, state0, t, tn)[0].x)
    off = np.asarray(_one_step(mr.ReSampleStep(gamma=40.0, **kw), key, problem, state0._replace(extra=jnp.int32(0)),
                               t, tn)[0].x)
    np.testing.assert_allclose(zero, off, rtol=0, atol=1e-13)


def test_hard_dc_shrinks_the_residual_on_the_gaussian_testbed():
    """Exact Gaussian prior (the testbed's GaussianPrior) with the nonlinear latent space: one step from t = 400 to the
    clean end with gamma huge returns z0(y) (the resampling is noise-free there); its residual ||y - A D(z0(y))|| is
    under 5 % of the Tweedie estimate's, for every image. Without the DC (off schedule: the latent DPS step alone)
    the same check fails."""
    sched = mr.make_schedule("linear")
    prior = GaussianPrior.random(jax.random.PRNGKey(0), D)
    rng = np.random.default_rng(1)
    M = jnp.asarray(np.linalg.qr(rng.normal(size=(D, D)))[0], jnp.float32)
    model = dataclasses.replace(prior.score_model(sched), space=mr.latent_space(M, _encode, _decode))
    op = mr.make_operator("matrix", (D,), rows=ROWS, seed=2)
    y = op.measure(jax.random.PRNGKey(3), _decode(M, prior.sample(jax.random.PRNGKey(4), B)), 0.05)
    z_t = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    kw = dict(gamma=1e9, lr=0.02, pixel_lr=0.05, pixel_iters=100, latent_iters=100, clip=False)
    problem = mr.Problem(model, op, y)
    state = mr.SamplerState(z_t, jnp.int32(0))
    on, info = _one_step(mr.ReSampleStep(every=1, **kw), jax.random.PRNGKey(5), problem, state, 400, -1)
    off = _one_step(mr.ReSampleStep(every=1000, **kw), jax.random.PRNGKey(5), problem, state, 400, -1)[0].x

    def resid(z):
        return np.linalg.norm(np.asarray(y - op.A(_decode(M, z))), axis=1)

    before = resid(info.x0)
    np.testing.assert_allclose(np.asarray(info.residual), before, rtol=1e-5)
    assert np.all(before > 0.1), before
    assert np.all(resid(on.x) < 0.05 * before), (resid(on.x), before)
    assert not np.all(resid(off) < 0.05 * before), (resid(off), before)


def test_hyper_parameters_are_traced_leaves():
    """A jitted step takes the rule as an argument: new gamma / zeta / lr values reuse the compiled function (one
    trace) and change the output; d out / d zeta exists and equals (out(zeta) - out(0)) / zeta off the schedule
    (the step is affine in zeta)."""
    sched = mr.make_schedule("linear")
    prior = GaussianPrior.random(jax.random.PRNGKey(0), D)
    op = mr.make_operator("matrix", (D,), rows=ROWS, seed=2)
    y = op.measure(jax.random.PRNGKey(3), prior.sample(jax.random.PRNGKey(4), B), 0.1)
    model = prior.score_model(sched)  # pixel space: E, D the identity
    problem = mr.Problem(model, op, y)
    z = jax.random.normal(jax.random.PRNGKey(6), (B, D))
    traces = []

    @jax.jit
    def f(s, zz):
        traces.append(1)
        return s.one_step(jax.random.PRNGKey(1), problem, mr.SamplerState(zz, jnp.int32(9)), 300, 299)[0].x

    base = dict(pixel_iters=5, latent_iters=5, clip=False)
    outs = [np.asarray(f(mr.ReSampleStep(gamma=g, zeta=zeta, lr=lr, **base), z))
            for g, zeta, lr in ((40.0, 0.5, 5e-3), (3.0, 0.2, 1e-2))]
    assert len(traces) == 1
    assert np.max(np.abs(outs[0] - outs[1])) > 1e-3 and np.all(np.isfinite(outs))
    off = mr.ReSampleStep(every=1000, **base)

    @jax.jit
    def g(zeta):
        return jnp.sum(f(dataclasses.replace(off, zeta=zeta), z))

    dz = jax.grad(g)(0.5)
    np.testing.assert_allclose(float(dz), float(g(0.5) - g(0.0)) / 0.5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ cost, counted


def _counting_latent_model(T):
    sched = mr.make_schedule("linear", T=T)
    prior = GaussianPrior.random(jax.random.PRNGKey(0), D)
    M = jnp.asarray(np.linalg.qr(np.random.default_rng(1).normal(size=(D, D)))[0], jnp.float32)
    model, (unet, dec, enc) = counting_latent_model(prior.score_model(sched), B, _encode, _decode, M)
    op = mr.make_operator("matrix", (D,), rows=ROWS, seed=2)
    y = op.measure(jax.random.PRNGKey(3), _decode(M, prior.sample(jax.random.PRNGKey(4), B)), 0.1)
    return model, op, y, (unet, dec, enc)


_counted = counted


def test_resample_baseline_counted_calls_equal_reported():
    """Full grid, T = 60, every = 10, window t < 40: hard DC at steps 30, 40, 50, 60 (t = 30, 20, 10, 0), so
    60 UNet calls, 60 + 4 latent_iters decoder and 4 encoder calls per image; a sub-grid run's counts equal
    calls_over of its executed times and network_calls."""
    model, op, y, counters = _counting_latent_model(60)
    s = mr.ReSampleStep(pixel_iters=4, latent_iters=3, lr=0.01, clip=False)
    for c in counters:
        c.reset()
    out = jax.jit(lambda k: mr.resample(k, model, op, y, sampler=s))(jax.random.PRNGKey(0))
    assert out.shape == (B, D) and bool(jnp.all(jnp.isfinite(out)))
    want = {"unet": 60, "decoder": 60 + 4 * 3, "encoder": 4}
    assert _counted(counters) == want
    assert mr.network_calls(model, s, stage2_times=[list(range(59, -1, -1))]) == want
    assert s.calls_over(list(range(59, -1, -1)), 60) == (72, 4)
    # sub-grid: K = 25 steps on round(59 (1 - k/24)); the counter counts the executed steps
    K = 25
    times = [int(round(59 * (1 - k / (K - 1)))) for k in range(K)]
    executed = [t for t, tn in zip(times, times[1:] + [-1]) if tn < t]
    for c in counters:
        c.reset()
    jax.jit(lambda k: mr.resample(k, model, op, y, sampler=s, n_steps=K))(jax.random.PRNGKey(1)).block_until_ready()
    n_dc = sum(1 for k, t in enumerate(executed) if (k + 1) % 10 == 0 and t < 40)
    want = {"unet": len(executed), "decoder": len(executed) + 3 * n_dc, "encoder": n_dc}
    assert n_dc >= 1
    assert _counted(counters) == want
    assert mr.network_calls(model, s, stage2_steps=len(executed), stage2_times=[executed]) == want


@pytest.mark.parametrize("n_steps", [None, 6])
def test_dp_sweep_with_resample_counted_equals_reported(n_steps):
    """dp_sweep (LMAP-RPS with the ReSample step): counted UNet, decoder, encoder calls = nfe["calls"]."""
    model, op, y, counters = _counting_latent_model(60)
    s = mr.ReSampleStep(every=3, pixel_iters=4, latent_iters=5, lr=0.01, clip=False)
    cfg = mr.MAPConfig(t1=5.0, w=0.2, n_iter=4, lr=0.05)
    for c in counters:
        c.reset()
    res = mr.dp_sweep(jax.random.PRNGKey(2), model, op, y, [0, 7, 25], map_config=cfg, sampler=s, n_steps=n_steps)
    got = _counted(counters)
    assert got == res.nfe["calls"], (got, res.nfe)
    assert got["encoder"] > 1  # hard-DC steps happened (beyond Stage 1's start E(A_pinv y))
    assert bool(jnp.all(jnp.isfinite(res.outputs)))
    # vectorize=True (vmap over t0: the schedule's lax.cond has a batched predicate, both branches run and one is
    # selected per lane) gives the sequential sweep's outputs. Without the Adam loops here: Adam's first steps have
    # size lr whatever the gradient's size, so round-off in a near-zero gradient component moves an output by up to
    # lr; the resampling still makes the hard-DC branch change the output.
    s0 = dataclasses.replace(s, pixel_iters=0, latent_iters=0)
    kw = dict(sampler=s0, n_steps=n_steps)
    seq = mr.dp_sweep(jax.random.PRNGKey(2), model, op, y, [0, 7, 25], map_config=cfg, **kw)
    vec = mr.dp_sweep(jax.random.PRNGKey(2), model, op, y, [0, 7, 25], map_config=cfg, vectorize=True, **kw)
    assert np.max(np.abs(np.asarray(seq.outputs) - np.asarray(res.outputs))) > 1e-3  # the DC branch matters
    # float32 round-off of the vmapped program (the tolerance of the DPS comparison in tests/test_traceable.py)
    np.testing.assert_allclose(np.asarray(vec.outputs), np.asarray(seq.outputs), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_with_clear_errors():
    with pytest.raises(ValueError, match=r"every: expected an int >= 1, got 0"):
        mr.ReSampleStep(every=0)
    with pytest.raises(ValueError, match=r"pixel_iters: expected an int >= 0, got -1"):
        mr.ReSampleStep(pixel_iters=-1)
    with pytest.raises(ValueError, match=r"latent_iters: expected an int >= 0, got 2.5"):
        mr.ReSampleStep(latent_iters=2.5)
    with pytest.raises(ValueError, match=r"gamma must be >= 0.0, got -1.0"):
        mr.ReSampleStep(gamma=-1.0)
    with pytest.raises(ValueError, match=r"lr must be > 0.0, got 0.0"):
        mr.ReSampleStep(lr=0.0)
    with pytest.raises(ValueError, match=r"zeta must be finite"):
        mr.ReSampleStep(zeta=float("nan"))
    with pytest.raises(ValueError, match=r"loss: expected one of \('norm', 'sq'\), got 'l1'"):
        mr.ReSampleStep(loss="l1")
    with pytest.raises(ValueError, match=r"ReSampleStep.zeta: expected a scalar .*got shape \(4,\)"):
        mr.ReSampleStep(zeta=jnp.full((4,), 0.5))
    assert isinstance(mr.make_sampler("resample", gamma=10.0), mr.ReSampleStep)
    s = mr.ReSampleStep()
    with pytest.raises(ValueError, match=r"times must be a 1-D sequence"):
        s.calls_over([[1, 2]], 10)
    with pytest.raises(ValueError, match=r"step times must be finite and in \[0, 9\]"):
        s.calls_over([12, 3], 10)
    with pytest.raises(ValueError, match=r"T must be a positive int"):
        s.calls_over([1], 0)

    model, op, y, _ = _counting_latent_model(60)
    with pytest.raises(ValueError, match=r"varies by step; pass stage2_times"):
        mr.network_calls(model, s, stage2_steps=10)
    with pytest.raises(ValueError, match=r"stage2_steps \(5\) must equal the number of step times in stage2_times "
                                         r"\(3\)"):
        mr.network_calls(model, s, stage2_steps=5, stage2_times=[[2, 1, 0]])
    with pytest.raises(ValueError, match=r"stage1_steps must be an int >= 0, got -1"):
        mr.network_calls(model, s, stage1_steps=-1)
    # the default (constant-cost) rules: calls_over is latent_calls per step; stage2_times changes nothing
    assert mr.PSLDStep().calls_over([5, 4, 3], 60) == (3, 3)
    assert (mr.network_calls(model, mr.PSLDStep(), stage2_steps=3, stage2_times=[[2, 1, 0]])
            == mr.network_calls(model, mr.PSLDStep(), stage2_steps=3) == {"unet": 3, "decoder": 3, "encoder": 3})

    z = jnp.zeros((B, D))
    with pytest.raises(TypeError, match=r"resample: sampler must be a ReSampleStep, got DPSStep"):
        mr.resample(jax.random.PRNGKey(0), model, op, y, sampler=mr.DPSStep())
    with pytest.raises(ValueError, match=r"resample: op is required"):
        mr.resample(jax.random.PRNGKey(0), model, None, y)
    with pytest.raises(ValueError, match=r"n_steps must be >= 1, got 0"):
        mr.resample(jax.random.PRNGKey(0), model, op, y, n_steps=0)
    with pytest.raises(ValueError, match=r"y \(measurement\) must have shape \[batch, 3\]"):
        mr.resample(jax.random.PRNGKey(0), model, op, jnp.zeros((B, 4)))
    with pytest.raises(ValueError, match=r"needs a forward operator and measurements"):
        s.step(jax.random.PRNGKey(0), model, None, None, z, 5, 4)
    with pytest.raises(ValueError, match=r"state.extra must be the step counter"):
        s.one_step(jax.random.PRNGKey(0), mr.Problem(model, op, y), mr.SamplerState(z), 5, 4)
