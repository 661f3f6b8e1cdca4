"""Algorithm-level value tests: every algorithm against a reference written independently here (issue 12, part 1).

The references are float64 NumPy transcriptions of ``ALGORITHMS.md`` / ``TESTBED.md`` that share nothing with the
library but its inputs (the float32 operator matrix, prior parameters, measurements) and its documented random
streams (``mapreps_jax.rng``; drawn below with ``jax.random`` alone):

* the schedule: ``beta = linspace(1e-4, 2e-2, 1000)``, ``alpha_bar`` by a float64 cumulative product;
* the exact Gaussian-prior epsilon ``eps(x) = sqrt(1-a) (a S + (1-a) I)^{-1} (x - sqrt(a) mu)`` and its Jacobian
  ``sqrt(1-a) (a S + (1-a) I)^{-1}``; the GMM's ``E[x0 | x_t]`` from ``TESTBED.md`` and its Jacobian by hand
  (responsibility derivatives included); the exact posterior in information form (the library uses the covariance
  form);
* a DPS step from the DDPM posterior mean ``sqrt(a_{t-1}) beta_t/(1-a_t) x0 + sqrt(alpha_t)(1-a_{t-1})/(1-a_t) x_t``
  (the library uses the equivalent DDIM form), DDIM(eta) on sub-grids, the chain rule for the guidance gradient;
* Adam / AdamW (bias correction, decoupled decay, cosine learning rate) and the proximal step (a dense solve) by hand.

Tolerances are float32-vs-float64 rounding, stated per test. The statistical tests (last section) check the D-P
traversal against the closed form (``oracle_map_rps_dp``, ``svd_gains``) with margins derived from it, and the GMM
baselines' distances to exact posterior samples against the same distances of the float64 reference implementation
(independent random numbers), within a Monte-Carlo error measured from replicates. ``tests/README.md`` maps each
algorithm to its tests; ``scripts/break_on_purpose.py`` checks that these tests fail when an algorithm is broken.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr
from mapreps_jax.metrics import mmd, sliced_w2
from mapreps_jax.priors import GMMPrior, GaussianPrior, gaussian_fit, gaussian_w2, oracle_map_rps_dp, svd_gains

SCHED = mr.make_schedule("linear")
T = 1000
_BETAS = np.linspace(1e-4, 2e-2, T, dtype=np.float64)
_AB = np.concatenate([[1.0], np.cumprod(1.0 - _BETAS)])  # _AB[t + 1] = alpha_bar(t), alpha_bar(-1) = 1


def ab(t) -> float:
    return float(_AB[int(t) + 1])


def f64(v):
    return np.asarray(v, np.float64)


# ------------------------------------------------------------------------------------------------------------------
# random streams (mapreps_jax.rng), written out with jax.random alone
# ------------------------------------------------------------------------------------------------------------------

def image_keys(key, B):
    """Image ``i``'s key: ``fold_in(key, i)``."""
    return jnp.stack([jax.random.fold_in(key, i) for i in range(B)])


def split2(keys):
    parts = [jax.random.split(k) for k in keys]
    return jnp.stack([p[0] for p in parts]), jnp.stack([p[1] for p in parts])


def fold_each(keys, j):
    return jnp.stack([jax.random.fold_in(k, j) for k in keys])


_MAX_B, _MAX_STEPS = 8, 1000  # one compiled draw per event size: keys padded to 8 images, 1000 steps, then sliced


def _pad(keys):
    keys = jnp.asarray(keys)
    assert keys.shape[0] <= _MAX_B
    return jnp.concatenate([keys, jnp.repeat(keys[:1], _MAX_B - keys.shape[0], axis=0)])


@jax.jit
def _direct_normals(keys, like):
    return jax.vmap(lambda k: jax.random.normal(k, like.shape[1:]))(keys)


def direct_normals(keys, d):
    """``normal(keys[i], (d,))`` for every image: ``[B, d]``."""
    return f64(_direct_normals(_pad(keys), jnp.zeros((_MAX_B, d))))[:len(keys)]


@jax.jit
def _step_normals(keys, like):
    steps = jnp.arange(like.shape[0], dtype=jnp.int32)
    return jax.vmap(lambda k: jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, k), like.shape[2:]))(keys))(
        steps)


def step_normals(keys, n_steps, d):
    """``normal(fold_in(keys[i], k), (d,))`` for ``k < n_steps``: ``[n_steps, B, d]``."""
    assert n_steps <= _MAX_STEPS
    return f64(_step_normals(_pad(keys), jnp.zeros((_MAX_STEPS, _MAX_B, d))))[:n_steps, :len(keys)]


# ------------------------------------------------------------------------------------------------------------------
# float64 references of the exact priors
# ------------------------------------------------------------------------------------------------------------------

class GaussRef:
    """``N(mu, S)`` (``mu`` may be ``[B, d]``: one mean per image, for the exact posterior)."""

    def __init__(self, mu, S):
        self.mu, self.S = f64(mu), f64(S)
        self.d = self.S.shape[0]

    def _minv(self, a):
        return np.linalg.inv(a * self.S + (1.0 - a) * np.eye(self.d))

    def eps(self, x, a):
        return math.sqrt(1.0 - a) * (x - math.sqrt(a) * self.mu) @ self._minv(a)

    def x0(self, x, a):
        return (x - math.sqrt(1.0 - a) * self.eps(x, a)) / math.sqrt(a)

    def dx0(self, x, a):
        """``d x0 / d x = (I - sqrt(1-a) d eps/dx) / sqrt(a)``, ``d eps / dx = sqrt(1-a) M^{-1}``: ``[B, d, d]``."""
        jac_eps = math.sqrt(1.0 - a) * self._minv(a)
        j = (np.eye(self.d) - math.sqrt(1.0 - a) * jac_eps) / math.sqrt(a)
        return np.broadcast_to(j, (x.shape[0], self.d, self.d))


class GMMRef:
    """``sum_k pi_k N(mu_k, S_k)``: ``E[x0 | x_t]`` and its Jacobian by hand (``TESTBED.md``)."""

    def __init__(self, weights, means, covs):
        self.w, self.mu, self.S = f64(weights), f64(means), f64(covs)
        self.K, self.d = self.mu.shape

    def _parts(self, x, a):
        I = np.eye(self.d)
        minv = np.linalg.inv(a * self.S + (1.0 - a) * I)  # [K, d, d]
        diff = x[:, None, :] - math.sqrt(a) * self.mu[None]  # [B, K, d]
        md = np.einsum("kde,bke->bkd", minv, diff)
        _, logdet = np.linalg.slogdet(a * self.S + (1.0 - a) * I)
        logp = np.log(self.w)[None] - 0.5 * (np.sum(diff * md, -1) + logdet[None])
        logp -= logp.max(1, keepdims=True)
        r = np.exp(logp)
        r /= r.sum(1, keepdims=True)  # responsibilities [B, K]
        means = self.mu[None] + math.sqrt(a) * np.einsum("kde,bke->bkd", self.S, md)  # E[x0 | x_t, k]
        return r, means, md, minv

    def x0(self, x, a):
        r, means, _, _ = self._parts(x, a)
        return np.einsum("bk,bkd->bd", r, means)

    def eps(self, x, a):
        return (x - math.sqrt(a) * self.x0(x, a)) / math.sqrt(1.0 - a)

    def dx0(self, x, a):
        r, means, md, minv = self._parts(x, a)
        # d means_k / dx = sqrt(a) S_k M_k^{-1};  d r_k / dx = r_k (g_k - sum_j r_j g_j),  g_k = -M_k^{-1} diff_k
        jm = math.sqrt(a) * np.einsum("kde,kef->kdf", self.S, minv)
        g = -md
        dr = r[..., None] * (g - np.einsum("bj,bjd->bd", r, g)[:, None])
        return np.einsum("bk,kdf->bdf", r, jm) + np.einsum("bkd,bkf->bdf", means, dr)


def posterior_info_form(prior_mu, prior_S, A, sigma, y):
    """Exact Gaussian posterior ``C = (S^{-1} + A^T A / s^2)^{-1}``, ``m = C (S^{-1} mu + A^T y / s^2)``."""
    Sinv = np.linalg.inv(f64(prior_S))
    C = np.linalg.inv(Sinv + A.T @ A / sigma**2)
    m = (f64(prior_mu) @ Sinv + f64(y) @ A / sigma**2) @ C
    return m, C


# ------------------------------------------------------------------------------------------------------------------
# float64 references of the algorithms
# ------------------------------------------------------------------------------------------------------------------

MOVE_ROUNDING = [0.0]  # float32 rounding bound of the last reference move's eps coefficient (see ref_move)


def ref_move(x, x0, t, tn, z, eta=1.0, noise_scale=1.0):
    """DDPM posterior (adjacent steps, eta = 1) or DDIM(eta) move from ``x_t`` given ``x0``.

    Also records in ``MOVE_ROUNDING`` how much a float32 implementation of the DDIM form may differ: its coefficient
    ``c = sqrt(1 - a_n - s^2)`` of ``eps_hat`` is a difference of O(1) numbers (rounding ~2.5e-7), so ``c`` is off by
    up to ``2.5e-7 / c`` (at most ~7e-4), which matters on big jumps to ``t_n ~ 0`` (``c ~ 1e-3``) where the clip
    makes ``eps_hat`` large."""
    a, an = ab(t), ab(tn)
    s_ddim = eta * math.sqrt((1.0 - an) / (1.0 - a)) * math.sqrt(1.0 - a / an)
    c = math.sqrt(max(1.0 - an - s_ddim**2, 0.0))
    eps_hat = (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)
    MOVE_ROUNDING[0] = min(7e-4, 2.5e-7 / max(c, 1e-12)) * float(np.max(np.abs(eps_hat)))
    if eta == 1.0 and tn == t - 1:
        beta = 1.0 - a / an
        mean = math.sqrt(an) * beta / (1.0 - a) * x0 + math.sqrt(1.0 - beta) * (1.0 - an) / (1.0 - a) * x
        s = math.sqrt(beta * (1.0 - an) / (1.0 - a))
    else:
        s = eta * math.sqrt((1.0 - an) / (1.0 - a)) * math.sqrt(1.0 - a / an)
        eps_hat = (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)
        mean = math.sqrt(an) * x0 + math.sqrt(max(1.0 - an - s * s, 0.0)) * eps_hat
    return mean + noise_scale * s * z


def ref_dps_step(P, A, y, x, t, tn, z, zeta, eta=1.0, noise_scale=1.0, clip=False, loss="norm"):
    """``move(x, x0) - zeta grad_x L``, ``L = ||y - A x0(x)||`` (or squared), chain rule through Tweedie (and the
    clip, whose derivative is 0 outside [-1, 1])."""
    a = ab(t)
    x0u = P.x0(x, a)
    x0 = np.clip(x0u, -1.0, 1.0) if clip else x0u
    live = (np.abs(x0u) < 1.0).astype(np.float64) if clip else 1.0
    r = y - x0 @ A.T
    dl = -(r @ A) / np.linalg.norm(r, axis=1, keepdims=True) if loss == "norm" else -2.0 * (r @ A)  # dL / dx0
    g = np.einsum("bi,bij->bj", dl * live, P.dx0(x, a))
    return ref_move(x, x0, t, tn, z, eta, noise_scale) - zeta * g


def ref_ddpm_step(P, A, y, x, t, tn, z, eta=1.0, clip=False):
    x0 = P.x0(x, ab(t))
    x0 = np.clip(x0, -1.0, 1.0) if clip else x0
    return ref_move(x, x0, t, tn, z, eta)


def ref_ddnm_step(P, A, y, x, t, tn, z, eta=1.0, clip=True):
    x0 = P.x0(x, ab(t))
    x0 = np.clip(x0, -1.0, 1.0) if clip else x0
    x0 = x0 - (x0 @ A.T - y) @ np.linalg.pinv(A).T
    return ref_move(x, x0, t, tn, z, eta)


def ref_times(t_start, n_steps):
    """Full grid (``n_steps=None``) or the K-step sub-grid ``round(t_start (1 - k/(K-1)))``, then -1."""
    if n_steps is None:
        times = np.arange(t_start, -1, -1)
    else:
        times = np.round(t_start * (1.0 - np.arange(n_steps) / max(n_steps - 1, 1))).astype(int)
    return list(zip(times, list(times[1:]) + [-1]))


def ref_reverse(step, x, t_start, loop_keys, n_steps=None):
    pairs = ref_times(t_start, n_steps)
    Z = step_normals(loop_keys, len(pairs), x.shape[1])
    for k, (t, tn) in enumerate(pairs):
        if tn < t:
            x = step(x, t, tn, Z[k])
    return x


def ref_rps(step, x_init, t0, keys, n_steps=None):
    """Re-noise to ``alpha_bar(t0 - 1)`` with ``split(keys[i])[0]``, then the loop with ``split(keys[i])[1]``."""
    x_init = f64(x_init)
    if t0 == 0:
        return x_init
    k_noise, k_loop = split2(keys)
    a = ab(t0 - 1)
    x = math.sqrt(a) * x_init + math.sqrt(1.0 - a) * direct_normals(k_noise, x_init.shape[1])
    return ref_reverse(step, x, t0 - 1, k_loop, n_steps)


def ref_dps(step, keys, d, n_steps=None):
    """DPS from ``x_{T-1} = normal(split(keys[i])[0])`` over the full grid or a sub-grid."""
    k0, k1 = split2(keys)
    return ref_reverse(step, direct_normals(k0, d), T - 1, k1, n_steps)


def cosine(k, n, lr, lr_min):
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * min(k, n) / n))


def ref_map(P, A, y, keys, a1, w, n_iter, lr=0.5, lr_min=1e-5, wd=0.01, stable=False, solver="adamw", eta=1.0,
            average=0):
    """Stage 1 by hand: ``x = A^+ y``; per step ``e = eps(sqrt(a) x + sqrt(1-a) n)``; AdamW on
    ``||y - A x||^2 + w <e, x>`` (gradient ``2 A^T (A x - y) + w e``; the norm when stable), or the prox step
    ``x <- (I + 2 eta A^T A)^{-1} (x - eta w e + 2 eta A^T y)``; optional tail average of the last iterates."""
    y = f64(y)
    d = A.shape[1]
    x = y @ np.linalg.pinv(A).T
    Z = step_normals(keys, n_iter, d)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    tail = []
    lhs = np.eye(d) + 2.0 * eta * A.T @ A
    for k in range(n_iter):
        e = P.eps(math.sqrt(a1) * x + math.sqrt(1.0 - a1) * Z[k], a1)
        if solver == "prox":
            x = np.linalg.solve(lhs, (x - eta * w * e + 2.0 * eta * y @ A).T).T
        else:
            r = y - x @ A.T
            gfit = -(r @ A) / np.linalg.norm(r, axis=1, keepdims=True) if stable else -2.0 * (r @ A)
            g = gfit + w * e
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            mh, vh = m / (1.0 - 0.9 ** (k + 1)), v / (1.0 - 0.999 ** (k + 1))
            x = x - cosine(k, n_iter, lr, lr_min) * (mh / (np.sqrt(vh) + 1e-8) + wd * x)
        if k >= n_iter - average:
            tail.append(x)
    return np.mean(tail, 0) if average > 0 else x


RED_DIFF_REF_WEIGHTS = {
    "linear": lambda r: r, "sqrt": np.sqrt, "square": lambda r: r * r, "log": np.log1p,
    "clip": lambda r: min(r, 1.0), "power2over3": lambda r: r ** (2.0 / 3.0), "const": lambda r: 1.0,
}


def ref_red_diff(P, A, y, keys, lam=0.25, lr=0.25, obs_weight=1.0, n_steps=20, weighting="linear", z=None):
    """RED-diff by hand: ``mu = A^+ y``; for t on the descending grid, ``x_t = sqrt(a) mu + sqrt(1-a) eps``,
    ``e = eps_fn(x_t)``, gradient of ``obs mean((y - A mu)^2)/2 + lam w(t) mean((e - eps) mu)``, one Adam step
    (b = 0.9, 0.99, eps 1e-8, constant lr). ``z`` overrides the noise (``[n_steps, B, d]``)."""
    y = f64(y)
    m_dim, d = A.shape
    mu = y @ np.linalg.pinv(A).T
    Z = step_normals(keys, n_steps, d) if z is None else z
    m = np.zeros_like(mu)
    v = np.zeros_like(mu)
    for k, (t, _) in enumerate(ref_times(T - 1, n_steps)):
        a = ab(t)
        e = P.eps(math.sqrt(a) * mu + math.sqrt(1.0 - a) * Z[k], a)
        wt = RED_DIFF_REF_WEIGHTS[weighting](math.sqrt(1.0 - a) / math.sqrt(a))
        g = obs_weight * (-(y - mu @ A.T) @ A) / m_dim + lam * wt * (e - Z[k]) / d
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        mh, vh = m / (1.0 - 0.9 ** (k + 1)), v / (1.0 - 0.99 ** (k + 1))
        mu = mu - lr * mh / (np.sqrt(vh) + 1e-8)
    return mu


# ------------------------------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------------------------------

def gauss_problem(B=6, d=6, m=3, sigma=0.3, seed=0):
    """A random (anisotropic, non-zero mean) Gaussian prior, a dense Gaussian A, measurements of prior samples."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    S = (Q * np.exp(rng.uniform(np.log(0.2), np.log(2.0), d))) @ Q.T
    mu = rng.normal(size=d) * 0.8
    prior = GaussianPrior(mu=jnp.asarray(mu, jnp.float32), cov=jnp.asarray(S, jnp.float32))
    op = mr.make_operator("matrix", (d,), matrix=rng.normal(size=(m, d)) / np.sqrt(m))
    x = prior.sample(jax.random.PRNGKey(seed + 1), B)
    y = op.measure(jax.random.PRNGKey(seed + 2), x, sigma)
    ref = GaussRef(prior.mu, prior.cov)  # the float32-rounded parameters the library uses, in float64
    return prior, op, f64(op.data["M"]), x, y, ref


def close(out, ref, atol, rtol=0.0, what=""):
    out = f64(out)
    err = np.max(np.abs(out - ref) - rtol * np.abs(ref))
    assert err <= atol, f"{what}: max |out - ref| exceeds the tolerance by {err - atol:.3g} (atol {atol})"


# ------------------------------------------------------------------------------------------------------------------
# DPS (norm / squared loss, clip on / off), DPS-S, VSDPS, DPS-A
# ------------------------------------------------------------------------------------------------------------------

STEP_PAIRS = [(999, 998), (700, 699), (120, 119), (3, 2), (0, -1), (650, 400), (260, 30), (40, 0)]


@jax.jit
def _step(sampler, keys, model, op, y, x, t, tn, cond=None):
    """``sampler.step`` compiled once per sampler configuration (t, tn traced)."""
    return sampler.step(keys, model, op, y, x, t, tn, cond)


def step(sampler, keys, model, op, y, x, t, tn, cond=None):
    return _step(sampler, keys, model, op, y, x, jnp.int32(t), jnp.int32(tn), cond)


@pytest.mark.parametrize("loss", ["norm", "sq"])
@pytest.mark.parametrize("clip", [False, True])
def test_dps_step_equals_hand_derivation(loss, clip):
    """One ``DPSStep.step`` = DDPM posterior mean (DDIM(eta) on sub-grid pairs) + noise - zeta * (d x0/dx)^T
    dL/dx0, with the analytic Gaussian eps and its Jacobian; on adjacent and sub-grid pairs, eta 1 and 0.4."""
    prior, op, A, x_true, y, P = gauss_problem()
    model = prior.score_model(SCHED)
    keys = image_keys(jax.random.PRNGKey(3), y.shape[0])
    x = jax.random.normal(jax.random.PRNGKey(4), x_true.shape) * 1.5
    zeta = 0.7 if loss == "norm" else 0.2
    z = direct_normals(keys, 6)
    n_clipped = 0
    for eta in (1.0, 0.4):
        sampler = mr.DPSStep(zeta=zeta, eta=eta, clip=clip, loss=loss)
        for t, tn in STEP_PAIRS:
            out = step(sampler, keys, model, op, y, x, t, tn)
            ref = ref_dps_step(P, A, f64(y), f64(x), t, tn, z, zeta, eta=eta, clip=clip, loss=loss)
            close(out, ref, atol=2e-4 + MOVE_ROUNDING[0], rtol=2e-5, what=f"DPS step {t}->{tn} eta={eta}")
            n_clipped += int(np.sum(np.abs(P.x0(f64(x), ab(t))) > 1.0))
    if clip:
        assert n_clipped > 20  # the clip (and its zero derivative) is exercised


def test_dps_guidance_term_is_the_hand_gradient():
    """Isolate the guidance: noise_scale = 0, the step minus the same step with zeta = 0 is -zeta g exactly."""
    prior, op, A, x_true, y, P = gauss_problem(seed=1)
    model = prior.score_model(SCHED)
    keys = image_keys(jax.random.PRNGKey(5), y.shape[0])
    x = jax.random.normal(jax.random.PRNGKey(6), x_true.shape)
    for t in (900, 50):
        a = ab(t)
        g_out = (step(mr.DPSStep(zeta=1.0, noise_scale=0.0, clip=False), keys, model, op, y, x, t, t - 1)
                 - step(mr.DPSStep(zeta=0.0, noise_scale=0.0, clip=False), keys, model, op, y, x, t, t - 1))
        r = f64(y) - P.x0(f64(x), a) @ A.T
        g = np.einsum("bi,bij->bj", -(r @ A) / np.linalg.norm(r, axis=1, keepdims=True), P.dx0(f64(x), a))
        close(-f64(g_out), g, atol=5e-5, rtol=1e-4, what=f"guidance at t={t}")
        assert np.min(np.linalg.norm(g, axis=1)) > 1e-2


_dps_jit = jax.jit(mr.dps, static_argnames=("clip", "n_steps"))


@pytest.mark.parametrize("loss,clip,n_steps,noise_scale", [
    ("norm", False, None, 1.0),   # DPS, 1000 steps
    ("sq", False, None, 1.0),     # DPS with the squared loss
    ("norm", True, 25, 1.0),      # clipped DPS-S
    ("norm", False, 10, 1.0),     # DPS-S (grid 999, 888, ..., 0)
    ("norm", False, None, 0.5),   # VSDPS
    ("norm", False, 40, 0.0),     # VSDPS, lambda = 0 (deterministic)
])
def test_dps_run_matches_reference_loop(loss, clip, n_steps, noise_scale):
    """``dps`` (DPS, DPS-S, VSDPS) = x_{T-1} ~ normal(split(keys[i])[0]), then the hand-derived step on the full
    grid or ``round(999 (1 - k/(K-1)))``, noise from ``fold_in(split(keys[i])[1], k)``."""
    prior, op, A, x_true, y, P = gauss_problem(B=5, m=4, seed=2)
    model = prior.score_model(SCHED)
    zeta = 0.5 if loss == "norm" else 0.1
    key = jax.random.PRNGKey(7)
    sampler = mr.DPSStep(zeta=zeta, noise_scale=noise_scale, clip=clip, loss=loss)
    out = _dps_jit(key, model, op, y, sampler=sampler, n_steps=n_steps)
    ref = ref_dps(lambda x, t, tn, z: ref_dps_step(P, A, f64(y), x, t, tn, z, zeta, noise_scale=noise_scale,
                                                   clip=clip, loss=loss),
                  image_keys(key, 5), 6, n_steps)
    close(out, ref, atol=2e-3, rtol=1e-3, what="dps")
    assert np.max(np.abs(ref - f64(x_true))) < 10  # sane


def test_dps_average_is_the_mean_of_reference_runs():
    """DPS-A: mean over j of DPS with keys fold_in(keys[i], j) (here DPS-S with K = 15, 3 samples)."""
    prior, op, A, x_true, y, P = gauss_problem(B=4, d=6, m=3, seed=3)
    model = prior.score_model(SCHED)
    key = jax.random.PRNGKey(8)
    out = mr.dps_average(key, model, op, y, 3, zeta=0.5, clip=False, n_steps=15)
    step = lambda x, t, tn, z: ref_dps_step(P, A, f64(y), x, t, tn, z, 0.5)  # noqa: E731
    keys = image_keys(key, 4)
    refs = [ref_dps(step, fold_each(keys, j), 6, 15) for j in range(3)]
    close(out, np.mean(refs, 0), atol=1e-3, rtol=1e-3, what="dps_average")
    assert np.min(np.abs(refs[0] - refs[1])) > 0  # the samples differ: it is an average


# ------------------------------------------------------------------------------------------------------------------
# Stage 2 samplers through rps: CCDF (DPS from A^+ y), DDNM, DDPM-oracle
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_steps", [None, 8])
def test_ccdf_matches_reference(n_steps):
    """CCDF = RPS from A^+ y: re-noise to alpha_bar(t0 - 1) with split(keys[i])[0], then DPS steps."""
    prior, op, A, x_true, y, P = gauss_problem(B=5, seed=4)
    model = prior.score_model(SCHED)
    key, t0 = jax.random.PRNGKey(9), 60
    sampler = mr.DPSStep(zeta=0.4, clip=False)
    out = mr.ccdf(key, model, op, y, t0, sampler=sampler, n_steps=n_steps)
    x_init = f64(y) @ np.linalg.pinv(A).T
    ref = ref_rps(lambda x, t, tn, z: ref_dps_step(P, A, f64(y), x, t, tn, z, 0.4), x_init, t0, image_keys(key, 5),
                  n_steps)
    close(out, ref, atol=5e-4, rtol=1e-4, what="ccdf")
    assert np.min(np.max(np.abs(ref - x_init), axis=1)) > 0.05  # it moved


@pytest.mark.parametrize("clip", [True, False])
def test_ddnm_matches_reference(clip):
    """DDNM: x0 <- x0 - A^+ (A x0 - y) (after the optional clip), then the DDPM move; one step and rps(t0 = 40)."""
    prior, op, A, x_true, y, P = gauss_problem(B=5, seed=5, sigma=0.0)
    model = prior.score_model(SCHED)
    keys = image_keys(jax.random.PRNGKey(10), 5)
    x = jax.random.normal(jax.random.PRNGKey(11), x_true.shape)
    sampler = mr.DDNMStep(clip=clip)
    z = direct_normals(keys, 6)
    for t, tn in STEP_PAIRS:
        ref = ref_ddnm_step(P, A, f64(y), f64(x), t, tn, z, clip=clip)
        close(step(sampler, keys, model, op, y, x, t, tn), ref, atol=2e-4 + MOVE_ROUNDING[0], rtol=2e-5,
              what=f"DDNM step {t}->{tn}")
    out = mr.rps(jax.random.PRNGKey(12), model, op, y, op.x_init(y), 40, sampler=sampler)
    ref = ref_rps(lambda xx, t, tn, zz: ref_ddnm_step(P, A, f64(y), xx, t, tn, zz, clip=clip),
                  f64(y) @ np.linalg.pinv(A).T, 40, image_keys(jax.random.PRNGKey(12), 5))
    close(out, ref, atol=5e-4, rtol=1e-4, what="DDNM rps")


def test_ddpm_oracle_matches_reference():
    """DDPMStep with the exact posterior model (cond = y): the step with the posterior eps built here in information
    form, one step and rps(t0 = 150) from the exact posterior mean."""
    prior, op, A, x_true, y, P = gauss_problem(B=5, seed=6, sigma=0.4)
    post_model = prior.posterior_model(op.matrix(), 0.4, SCHED)
    m, C = posterior_info_form(prior.mu, prior.cov, A, 0.4, y)
    post = GaussRef(m, C)
    keys = image_keys(jax.random.PRNGKey(13), 5)
    x = jax.random.normal(jax.random.PRNGKey(14), x_true.shape)
    z = direct_normals(keys, 6)
    for eta in (1.0, 0.0):
        for t, tn in STEP_PAIRS:
            out = step(mr.DDPMStep(eta=eta), keys, post_model, op, y, x, t, tn, cond=y)
            ref = ref_ddpm_step(post, A, f64(y), f64(x), t, tn, z, eta=eta)
            close(out, ref, atol=2e-4 + MOVE_ROUNDING[0], rtol=2e-5,
                  what=f"DDPM-oracle step {t}->{tn} eta={eta}")
    key = jax.random.PRNGKey(15)
    out = mr.rps(key, post_model, op, y, jnp.asarray(m, jnp.float32), 150, sampler=mr.DDPMStep(), cond=y)
    ref = ref_rps(lambda xx, t, tn, zz: ref_ddpm_step(post, A, f64(y), xx, t, tn, zz), m, 150, image_keys(key, 5))
    close(out, ref, atol=5e-4, rtol=1e-4, what="DDPM-oracle rps")


# ------------------------------------------------------------------------------------------------------------------
# Stage 1 (MAP): AdamW plain / stable, prox
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stable,w,wd,m", [(False, 0.3, 0.01, 3), (True, 0.3, 0.01, 9), (False, "auto", 0.0, 3)])
def test_map_adamw_matches_hand_adamw(stable, w, wd, m):
    """AdamW (b 0.9/0.999, eps 1e-8, decoupled decay, cosine lr from lr to lr_min over N) on
    ||y - A x||^2 + w <e, x> (stable: the norm), e the exact eps at sqrt(a) x + sqrt(1-a) n, n from fold_in(keys[i], k);
    w = "auto" is 2 sigma^2 sqrt(a / (1 - a)). The stable case uses an overdetermined A (9 x 6): its gradient
    A^T r / |r| is a rounding-noise direction wherever r = y - A x vanishes (as at x = A^+ y when A is wide)."""
    sigma = 0.3
    prior, op, A, x_true, y, P = gauss_problem(B=6, m=m, seed=7, sigma=sigma)
    model = prior.score_model(SCHED)
    key = jax.random.PRNGKey(16)
    cfg = mr.MAPConfig(t1=10.0, w=w, n_iter=25, lr=0.05, lr_min=1e-3, weight_decay=wd, stable=stable)
    out = mr.map_estimate(key, model, op, y, config=cfg, sigma_y=sigma)
    a1 = ab(10)
    w_num = 2 * sigma**2 * math.sqrt(a1 / (1 - a1)) if w == "auto" else w
    ref = ref_map(P, A, y, image_keys(key, 6), a1, w_num, 25, lr=0.05, lr_min=1e-3, wd=wd, stable=stable)
    close(out, ref, atol=1e-4, rtol=1e-4, what="map adamw")
    x_pinv = f64(y) @ np.linalg.pinv(A).T
    assert np.max(np.abs(ref - x_pinv)) > 0.05  # the iteration moved


@pytest.mark.parametrize("average", [0, 6])
def test_map_prox_matches_dense_solve(average):
    """prox: x <- (I + 2 eta A^T A)^{-1} (x - eta w e + 2 eta A^T y) by a dense solve; tail average of the last M."""
    prior, op, A, x_true, y, P = gauss_problem(B=6, seed=8)
    model = prior.score_model(SCHED)
    key = jax.random.PRNGKey(17)
    cfg = mr.MAPConfig(t1=10.0, w=0.4, n_iter=20, solver="prox", prox_step=2.0, average=average)
    out = mr.map_estimate(key, model, op, y, config=cfg)
    ref = ref_map(P, A, y, image_keys(key, 6), ab(10), 0.4, 20, solver="prox", eta=2.0, average=average)
    close(out, ref, atol=1e-4, rtol=1e-4, what="map prox")


def test_map_prior_term_moves_the_estimate_as_the_closed_form_says():
    """Long run (prox, averaged): the estimate is the closed-form fixed point (2 A^T A + w B)^{-1} (2 A^T y + w B mu),
    B = sqrt(a(1-a)) (a S + (1-a) I)^{-1}, written here, which differs from the prior-free least-squares point."""
    prior, op, A, x_true, y, P = gauss_problem(B=6, seed=9)
    model = prior.score_model(SCHED)
    a1, w = ab(10), 0.3
    Bm = math.sqrt(a1 * (1 - a1)) * np.linalg.inv(a1 * P.S + (1 - a1) * np.eye(6))
    fixed = np.linalg.solve(2 * A.T @ A + w * Bm, (2 * f64(y) @ A + w * P.mu @ Bm).T).T
    lam_max = np.max(np.linalg.eigvalsh(Bm))
    cfg = mr.MAPConfig(t1=10.0, w=w, n_iter=300, solver="prox", prox_step=1.0 / (w * lam_max), average=150)
    out = mr.map_estimate(jax.random.PRNGKey(18), model, op, y, config=cfg)
    close(out, fixed, atol=1e-2, what="prox fixed point")
    assert np.min(np.linalg.norm(fixed - f64(y) @ np.linalg.pinv(A).T, axis=1)) > 0.1


# ------------------------------------------------------------------------------------------------------------------
# RED-diff (every weighting)
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting", mr.RED_DIFF_WEIGHTINGS)
def test_red_diff_matches_hand_adam(weighting):
    """RED-diff: Adam (0.9, 0.99) on obs mean((y - A mu)^2)/2 + lam w(t) mean((e - eps) mu), grid 999 .. 0 in 20 steps,
    eps from fold_in(keys[i], k); the weighting w(t) from r = sqrt(1-a)/sqrt(a) written here."""
    if weighting not in RED_DIFF_REF_WEIGHTS:
        pytest.fail(f"no independent reference for the RED-diff weighting {weighting!r}: "
                    f"add it to RED_DIFF_REF_WEIGHTS")
    prior, op, A, x_true, y, P = gauss_problem(B=5, seed=10)
    model = prior.score_model(SCHED)
    key = jax.random.PRNGKey(19)
    cfg = mr.REDDiffConfig(lam=0.6, lr=0.1, n_steps=20, weighting=weighting)
    out = mr.red_diff(key, model, op, y, config=cfg)
    ref = ref_red_diff(P, A, y, image_keys(key, 5), lam=0.6, lr=0.1, n_steps=20, weighting=weighting)
    close(out, ref, atol=2e-4, rtol=1e-4, what=f"red_diff {weighting}")


def test_red_diff_prior_term_matters():
    """The regulariser is not a no-op: with lam = 0 the reference lands elsewhere (so the test above can tell)."""
    prior, op, A, x_true, y, P = gauss_problem(B=5, seed=10)
    keys = image_keys(jax.random.PRNGKey(19), 5)
    with_prior = ref_red_diff(P, A, y, keys, lam=0.6, lr=0.1, n_steps=20)
    without = ref_red_diff(P, A, y, keys, lam=0.0, lr=0.1, n_steps=20)
    assert np.max(np.abs(with_prior - without)) > 0.05


# ------------------------------------------------------------------------------------------------------------------
# D-P sweep (values)
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_steps,vectorize,t0s", [(None, False, [0, 4, 25]), (5, False, [0, 41, 9]),
                                                   (None, True, [0, 4, 25])])
def test_dp_sweep_matches_reference(n_steps, vectorize, t0s):
    """dp_sweep = reference MAP with split(keys[i])[0], then reference RPS (DPS) with split(keys[i])[1] per t0."""
    prior, op, A, x_true, y, P = gauss_problem(B=4, seed=11)
    model = prior.score_model(SCHED)
    key = jax.random.PRNGKey(20)
    cfg = mr.MAPConfig(t1=10.0, w=0.3, n_iter=15, lr=0.05)
    sampler = mr.DPSStep(zeta=0.4, clip=False)
    res = mr.dp_sweep(key, model, op, y, t0s, map_config=cfg, sampler=sampler, n_steps=n_steps, vectorize=vectorize)
    k1, k2 = split2(image_keys(key, 4))
    x_map = ref_map(P, A, y, k1, ab(10), 0.3, 15, lr=0.05)
    close(res.x_map, x_map, atol=1e-4, rtol=1e-4, what="dp_sweep stage 1")
    step = lambda x, t, tn, z: ref_dps_step(P, A, f64(y), x, t, tn, z, 0.4)  # noqa: E731
    for i, t0 in enumerate(t0s):
        close(res.outputs[i], ref_rps(step, x_map, t0, k2, n_steps), atol=5e-4, rtol=1e-4, what=f"dp_sweep t0={t0}")


# ------------------------------------------------------------------------------------------------------------------
# statistical: the D-P traversal against the closed form
# ------------------------------------------------------------------------------------------------------------------

def _iso_problem(n, d=8, keep=4, s=1.0, sigma=0.5, seed=0):
    prior = GaussianPrior.isotropic(d, s)
    op = mr.make_operator("mask", (d,), keep=keep, seed=seed)
    x = prior.sample(jax.random.PRNGKey(seed + 100), n)
    y = op.measure(jax.random.PRNGKey(seed + 200), x, sigma)
    return prior, op, x, y


def _D_P(out, x, prior):
    err = np.sum((f64(out) - f64(x)) ** 2, axis=1)
    m, c = gaussian_fit(out)
    return float(err.mean()), float(err.std() / np.sqrt(len(err))), float(gaussian_w2(m, c, prior.mu, prior.cov))


def _closed_form_P(prior, x_star, v_coord, a0, n_rep=4, seed=0):
    """Mean and sd over ``n_rep`` replicates of the Gaussian-fit W2 to the prior of exact oracle outputs
    ``X* + sqrt(v (1 - rho^2)) xi`` (``TESTBED.md``), at the same sample size as the algorithm's: the reference for a
    measured P, bias of the finite-sample estimator included (about 0.1 here when P is near 0)."""
    rho = a0 * v_coord / (a0 * v_coord + 1.0 - a0)
    vals = []
    for r in range(n_rep):
        xi = np.random.default_rng(seed + r).standard_normal(x_star.shape)
        m, c = gaussian_fit(jnp.asarray(x_star + np.sqrt(v_coord * (1.0 - rho**2)) * xi, jnp.float32))
        vals.append(float(gaussian_w2(m, c, prior.mu, prior.cov)))
    return float(np.mean(vals)), float(np.std(vals, ddof=1))


def test_oracle_dp_sweep_follows_closed_form():
    """dp_sweep with the exact Stage 1 (x_map = exact posterior mean) and the DDPM-oracle Stage 2: every D(t0)
    within 5 % (+ 3 standard errors) of oracle_map_rps_dp, every P(t0) within 5 % (+ 4 sd + 0.01) of the same
    Gaussian-fit W2 computed on exact closed-form outputs of the same size, and the traversal D(T) - D(0) and
    P(0) - P(T) at least 90 % of the closed-form gaps (D(T) - D(0) -> D*, P(0) - P(T) -> P*)."""
    s, sigma, d, keep, n = 1.0, 0.5, 8, 4, 3000
    prior, op, x, y = _iso_problem(n, d, keep, s, sigma, seed=1)
    post = prior.posterior(op.matrix(), sigma, y)
    g = svd_gains(s, np.ones(keep), d, sigma)
    v_coord = np.full(d, s**2)
    v_coord[np.asarray(op.data["idx"])] = float(g.v[0])  # observed coordinates: posterior variance v_obs
    assert abs(v_coord.sum() - float(g.D_star)) < 1e-5
    t0s = [0, 150, 400, 1000]
    res = mr.dp_sweep(jax.random.PRNGKey(21), prior.posterior_model(op.matrix(), sigma, SCHED), op, y, t0s,
                      sampler=mr.DDPMStep(), cond=y, x_map=post.mean, x_true=x)
    pts, refs = [], []
    for t0, out in zip(t0s, res.outputs):
        D, se, P = _D_P(out, x, prior)
        Dc = float(oracle_map_rps_dp(s, np.ones(keep), d, sigma, ab(t0 - 1))[0])
        Pr, Psd = _closed_form_P(prior, f64(post.mean), v_coord, ab(t0 - 1), seed=10 * t0)
        assert abs(D - Dc) <= 0.05 * Dc + 3 * se, (t0, D, Dc)
        assert abs(P - Pr) <= 0.05 * Pr + 4 * Psd + 0.01, (t0, P, Pr, Psd)
        pts.append((D, se, P))
        refs.append((Dc, Pr, Psd))
    (D0, se0, P0), (DT, seT, PT) = pts[0], pts[-1]
    assert DT - D0 >= 0.9 * (refs[-1][0] - refs[0][0]) - 3 * (se0 + seT), (D0, DT, refs)
    assert P0 - PT >= 0.9 * (refs[0][1] - refs[-1][1]) - 4 * (refs[0][2] + refs[-1][2]), (P0, PT, refs)


def test_map_rps_dps_sweep_traverses_by_closed_form_margins():
    """MAP-RPS as shipped (AdamW Stage 1 with w*, DPS Stage 2) on the isotropic Gaussian testbed: D(0) is within
    2 % of D* (+ 3 SE) (Stage 1 is the MMSE estimate, TESTBED criterion 2); the traversal gaps are at least half
    of the closed-form ones (D(T) - D(0) >= D*/2, P(0) - P(T) >= P*/2); D increases between consecutive t0 by more
    than 3 standard errors of the paired difference; and the t0 = T end (plain DPS) is within 15 % of the
    posterior-sampling distortion 2 D* (DPS is not exact; ~0.93 x 2 D* here, while unguided sampling would give
    2 tr S = 16 = 1.7 x 2 D*)."""
    s, sigma, d, keep, n = 1.0, 0.5, 8, 4, 2000
    prior, op, x, y = _iso_problem(n, d, keep, s, sigma, seed=3)
    model = prior.score_model(SCHED)
    g = svd_gains(s, np.ones(keep), d, sigma)
    D_star, P_star = float(g.D_star), float(g.P_star)
    a1 = float(model.alpha_bar(jnp.float32(10.0)))
    cfg = mr.MAPConfig(t1=10.0, w=mr.principled_weight(sigma, a1, prior.tweedie_variance(a1)), n_iter=300, lr=0.05)
    t0s = [0, 100, 300, 1000]
    res = mr.dp_sweep(jax.random.PRNGKey(22), model, op, y, t0s, map_config=cfg,
                      sampler=mr.DPSStep(zeta=0.2, clip=False), x_true=x)
    pts = [_D_P(o, x, prior) for o in res.outputs]
    Ds, ses, Ps = (np.array(v) for v in zip(*pts))
    err = np.sum((f64(res.outputs) - f64(x)[None]) ** 2, axis=-1)  # [t0, n]
    se_diff = np.std(np.diff(err, axis=0), axis=1) / np.sqrt(n)
    assert abs(Ds[0] - D_star) <= 0.02 * D_star + 3 * ses[0], (Ds[0], D_star)
    assert Ds[-1] - Ds[0] >= 0.5 * D_star, (Ds, D_star)
    assert Ps[0] - Ps[-1] >= 0.5 * P_star, (Ps, P_star)
    assert np.all(np.diff(Ds) > 3 * se_diff), (Ds, se_diff)
    assert abs(Ds[-1] - 2 * D_star) <= 0.15 * 2 * D_star, (Ds[-1], 2 * D_star)


# ------------------------------------------------------------------------------------------------------------------
# statistical: GMM baselines against exact posterior samples
# ------------------------------------------------------------------------------------------------------------------

def _gmm_problem():
    """Three components in d = 2, the first coordinate observed (A = [1, 0]), y = 0.1: two components explain it, so
    the posterior of the second coordinate is bimodal (modes near -1.5 and +1.5), the third (at x1 = 2.5) is
    unlikely but not negligible."""
    rot = lambda th: np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])  # noqa: E731
    covs = np.stack([rot(th) @ np.diag(l) @ rot(th).T for th, l in
                     [(0.3, (0.3, 0.1)), (-0.6, (0.2, 0.15)), (1.0, (0.4, 0.2))]])
    prior = GMMPrior(weights=jnp.asarray([0.4, 0.35, 0.25]), means=jnp.asarray([[0.0, -1.5], [0.3, 1.5], [2.5, 0.0]]),
                     covs=jnp.asarray(covs, jnp.float32))
    op = mr.make_operator("matrix", (2,), matrix=np.array([[1.0, 0.0]]))
    return prior, op, 0.3, jnp.asarray([[0.1]], jnp.float32)


def _distances(samples, exact, x_star):
    k = jax.random.PRNGKey(99)
    s = jnp.asarray(samples, jnp.float32)
    return np.array([float(sliced_w2(k, s, exact)), float(mmd(s, exact, bandwidth=0.5)),
                     float(np.mean(np.sum((f64(samples) - x_star) ** 2, axis=1)))])


GMM_N, GMM_R = 600, 6


@pytest.mark.parametrize("algo", ["oracle", "dps", "ccdf", "red_diff"])
def test_gmm_baseline_distances_within_mc_error_of_reference(algo):
    """One measurement y of a 3-component GMM (d = 2, one coordinate observed, bimodal posterior), n = 600 runs.
    Distances to 600 exact posterior samples (sliced W2, MMD at bandwidth 0.5, MMSE gap E|x - X*|^2) of the library
    equal those of the float64 reference implementation of the same algorithm run with independent random numbers
    (numpy), within 4 standard deviations of the reference's 6 replicates (+ a small floor). The oracle's reference
    value is exact posterior samples themselves: the MC baseline, which it must match."""
    prior, op, sigma, y1 = _gmm_problem()
    n, R = GMM_N, GMM_R
    y = jnp.repeat(y1, n, axis=0)
    post = prior.posterior(op.matrix(), sigma, y1)
    exact = post.sample(jax.random.PRNGKey(3), n)[:, 0]
    x_star = f64(post.mean)[0]
    A = f64(op.matrix())
    P = GMMRef(prior.weights, prior.means, prior.covs)
    yr = np.repeat(f64(y1), n * R, axis=0)
    rng = np.random.default_rng(4)
    key = jax.random.PRNGKey(5)
    model = prior.score_model(SCHED)
    zeta, t0 = 0.5, 300

    def ref_loop(step, x, t_start):
        for t in range(t_start, -1, -1):
            x = step(x, t, t - 1, rng.standard_normal(x.shape))
        return x

    dps_step = lambda x, t, tn, z: ref_dps_step(P, A, yr, x, t, tn, z, zeta)  # noqa: E731
    if algo == "oracle":
        out = mr.rps(key, prior.posterior_model(op.matrix(), sigma, SCHED), op, y, jnp.zeros((n, 2)), T,
                     sampler=mr.DDPMStep(), cond=y)
        ref = np.concatenate([f64(post.sample(jax.random.PRNGKey(100 + r), n)[:, 0]) for r in range(R)])
    elif algo == "dps":
        out = _dps_jit(key, model, op, y, zeta=zeta, clip=False)
        ref = ref_loop(dps_step, rng.standard_normal((n * R, 2)), T - 1)
    elif algo == "ccdf":
        out = mr.ccdf(key, model, op, y, t0, sampler=mr.DPSStep(zeta=zeta, clip=False))
        x_init = yr @ np.linalg.pinv(A).T
        a = ab(t0 - 1)
        ref = ref_loop(dps_step, math.sqrt(a) * x_init + math.sqrt(1 - a) * rng.standard_normal(x_init.shape), t0 - 1)
    else:
        cfg = mr.REDDiffConfig(lam=0.25, lr=0.1, n_steps=100)
        out = mr.red_diff(key, model, op, y, config=cfg)
        ref = ref_red_diff(P, A, yr, None, lam=0.25, lr=0.1, n_steps=100, z=rng.standard_normal((100, n * R, 2)))
    got = _distances(out, exact, x_star)
    reps = np.array([_distances(ref[r * n:(r + 1) * n], exact, x_star) for r in range(R)])
    mean, sd = reps.mean(0), reps.std(0, ddof=1)
    tol = 4 * sd * np.sqrt(1 + 1 / R) + np.array([0.01, 2e-4, 0.01])
    assert np.all(np.abs(got - mean) <= tol), dict(algo=algo, got=got, ref_mean=mean, ref_sd=sd, tol=tol)
