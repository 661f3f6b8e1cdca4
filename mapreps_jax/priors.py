"""Exact testbed priors: Gaussian and Gaussian-mixture priors with closed-form scores and posteriors.

See ``TESTBED.md``. Vectors have event shape ``(d,)``; batches are ``[B, d]``. With ``a = alpha_bar(t)``:

* Gaussian prior ``x ~ N(mu, S)``: diffused ``x_t ~ N(sqrt(a) mu, M)``, ``M = a S + (1 - a) I``, and the exact
  epsilon ``eps(x_t) = -sqrt(1 - a) grad log p_t(x_t) = sqrt(1 - a) M^{-1} (x_t - sqrt(a) mu)``. ``S = V diag(l) V^T``
  is stored eigendecomposed, so ``M^{-1} = V diag(1 / (a l + 1 - a)) V^T`` costs nothing at any real ``t``.
* Gaussian mixture ``sum_k pi_k N(mu_k, S_k)``: ``eps = sum_k r_k(x_t) sqrt(1 - a) M_k^{-1} (x_t - sqrt(a) mu_k)``
  with responsibilities ``r_k`` of the diffused components (log-sum-exp). This equals
  ``(x_t - sqrt(a) E[x0 | x_t]) / sqrt(1 - a)`` with
  ``E[x0 | x_t] = sum_k r_k (mu_k + sqrt(a) S_k M_k^{-1} (x_t - sqrt(a) mu_k))``, since
  ``I - a S_k M_k^{-1} = (1 - a) M_k^{-1}``; the form used here stays finite at ``a = 1`` (``t = -1``).
* Linear measurements ``y = A x + sigma_y n`` (``A`` a matrix ``[m, d]`` or a linear function ``f(x[d]) -> [m]``,
  turned into its matrix by ``jax.jacfwd``). Posterior of a Gaussian in covariance form (stable as
  ``sigma_y -> 0``): ``G = A S A^T + sigma_y^2 I``, ``K = S A^T G^{-1}``, ``m = mu + K (y - A mu)``,
  ``C = S - K A S``; identical to ``C = (S^{-1} + A^T A / sigma_y^2)^{-1}``, ``m = C (S^{-1} mu + A^T y / sigma_y^2)``.
  Mixture: per component as above and ``pi'_k ∝ pi_k N(y; A mu_k, G_k)``.
* Oracle Stage-2 models (:meth:`GaussianPrior.posterior_model`, :meth:`GMMPrior.posterior_model`): the exact eps of
  the diffused posterior ``sum_k pi'_k N(sqrt(a) m_k, a C_k + (1 - a) I)``, with ``cond = y``.

Isotropic closed forms (``S = s^2 I``, ``A = U diag(l_i) V^T``): :func:`svd_gains`, :func:`oracle_map_rps_dp`,
:func:`ideal_dp_curve`; Stage-1 fixed point: :func:`stage1_fixed_point`, :func:`principled_weight`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from .diffusion import Schedule, alpha_bar
from .map_stage import principled_weight  # noqa: F401  (re-exported)
from .model import ScoreModel
from .validation import check_finite

__all__ = [
    "GaussianPrior",
    "GMMPrior",
    "GaussianPosterior",
    "GMMPosterior",
    "SVDGains",
    "gaussian_w2",
    "gaussian_fit",
    "ideal_dp_curve",
    "svd_gains",
    "oracle_map_rps_dp",
    "stage1_fixed_point",
    "principled_weight",
    "operator_matrix",
]

_LOG_2PI = math.log(2.0 * math.pi)
# Floor on the diffused variances a*l + (1 - a): only active at a = 1 with a singular covariance (sigma_y = 0),
# where every eps is multiplied by sqrt(1 - a) = 0 anyway.
_VAR_FLOOR = 1e-12


# ----------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------

def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_shape(name: str, x, shape) -> None:
    """``shape`` may contain ``None`` wildcards."""
    s = tuple(jnp.shape(x))
    ok = len(s) == len(shape) and all(e is None or e == g for e, g in zip(shape, s))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name} must have shape {want}; got {list(s)}")


def _eigh_psd(cov):
    """``(evals, evecs)`` of a symmetric PSD matrix (batched over leading axes); tiny negative evals clipped to 0."""
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    evals, evecs = jnp.linalg.eigh(cov)
    return jnp.clip(evals, 0.0, None), evecs


def _psd_sqrt(cov):
    evals, evecs = _eigh_psd(cov)
    return (evecs * jnp.sqrt(evals)[..., None, :]) @ jnp.swapaxes(evecs, -1, -2)


def operator_matrix(A, d: int) -> jax.Array:
    """The matrix ``[m, d]`` of a linear operator given as a matrix or as a function ``f(x[d]) -> [m]``.

    A function is differentiated once with ``jax.jacfwd`` at ``x = 0`` (exact for a linear ``f``); an output with
    more than one axis is flattened (row-major), so ``y`` must then be flattened the same way.
    """
    if callable(A):
        J = jax.jacfwd(A)(jnp.zeros((d,), jnp.float32))
        J = jnp.asarray(J)
        if J.shape[-1] != d:
            raise ValueError(f"A: the Jacobian of the linear function must end with the input dimension {d}; "
                             f"got shape {list(J.shape)}")
        return J.reshape(-1, d)
    A = jnp.asarray(A)
    if A.ndim != 2 or A.shape[1] != d:
        raise ValueError(f"A must be a matrix of shape [m, {d}] or a linear function of x [{d}]; "
                         f"got an array of shape {list(A.shape)}")
    check_finite(A, "A", "operator_matrix")
    return A


def _check_sigma(sigma_y):
    if _is_concrete(sigma_y):
        s = np.asarray(sigma_y)
        if s.ndim != 0 or not np.isfinite(s) or s < 0:
            raise ValueError(f"sigma_y must be a finite scalar >= 0; got {sigma_y!r}")
    return jnp.asarray(sigma_y, jnp.float32)


def _check_y(y, m: int, where: str = "posterior"):
    y = jnp.asarray(y)
    if y.ndim != 2 or y.shape[1] != m:
        raise ValueError(f"y must be batched with shape [B, {m}] (use y[None] for a single measurement); "
                         f"got {list(y.shape)}")
    check_finite(y, "y", where)
    return y


def _a_col(a, ndim_extra: int):
    """Per-sample ``a`` (shape ``[]`` or ``[B]``) -> shape ``[B or 1, 1, ...]`` with ``ndim_extra`` trailing ones."""
    a = jnp.asarray(a)
    a = a.reshape((-1,) + (1,) * ndim_extra)
    return a


# ----------------------------------------------------------------------------------------------------------------
# the exact diffused-mixture epsilon (shared by every prior / posterior model)
# ----------------------------------------------------------------------------------------------------------------

def _mixture_eps(x, a, log_w, means, evals, evecs):
    """Exact eps of ``sum_k w_k N(sqrt(a) means_k, a S_k + (1 - a) I)`` at ``x`` (a ``[B, d]`` batch).

    ``log_w``: ``[K]`` or ``[B, K]`` (normalised or not); ``means``: ``[K, d]`` or ``[B, K, d]``;
    ``evals [K, d]``, ``evecs [K, d, d]``: eigendecomposition of ``S_k`` (columns are eigenvectors);
    ``a``: scalar or ``[B]``. Returns ``eps [B, d] = sum_k r_k sqrt(1 - a) M_k^{-1} (x - sqrt(a) mu_k)``.
    """
    a3 = _a_col(a, 2).astype(x.dtype)  # [B|1, 1, 1]
    diff = x[:, None, :] - jnp.sqrt(a3) * means  # [B, K, d]
    proj = jnp.einsum("bkd,kde->bke", diff, evecs)  # coordinates in each component's eigenbasis
    var = jnp.maximum(a3 * evals + (1.0 - a3), _VAR_FLOOR)  # [B|1, K, d]
    z = proj / var
    K = evals.shape[0]
    if K == 1:
        eps_k = jnp.einsum("bke,kde->bkd", z, evecs)
        return jnp.sqrt(1.0 - a3[:, 0]) * eps_k[:, 0]
    d = x.shape[-1]
    log_n = -0.5 * (jnp.sum(proj * z, -1) + jnp.sum(jnp.log(var), -1) + d * _LOG_2PI)  # [B, K]
    r = jax.nn.softmax(log_w + log_n, axis=-1)  # responsibilities [B, K]
    eps_k = jnp.einsum("bke,kde->bkd", z * r[..., None], evecs)
    return jnp.sqrt(1.0 - a3[:, 0]) * jnp.sum(eps_k, axis=1)


def _flat_apply(fn):
    """Wrap ``fn(params, x[B, d], a, cond)`` into the model contract (``x_t [B, *event]``, ``t`` scalar or ``[B]``)."""

    def apply(params, x_t, t, cond=None):
        x_t = jnp.asarray(x_t)
        if x_t.ndim < 2:
            raise ValueError(f"x_t must be batched [B, d]; got shape {list(x_t.shape)}")
        B = x_t.shape[0]
        t = jnp.asarray(t)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != B):
            raise ValueError(f"t must be a scalar or have shape [{B}]; got shape {list(t.shape)}")
        a = alpha_bar(params["schedule"], t)
        x = x_t.reshape(B, -1)
        eps = fn(params, x, a, cond)
        return eps.reshape(x_t.shape).astype(x_t.dtype)

    return apply


def _apply_prior_flat(params, x, a, cond):
    return _mixture_eps(x, a, params["log_w"], params["means"], params["evals"], params["evecs"])


def _apply_posterior_flat(params, x, a, cond):
    if cond is None:
        raise ValueError("posterior_model: cond (the measurement y [B, m]) is required")
    y = jnp.asarray(cond, x.dtype)
    m = params["A"].shape[0]
    if y.ndim == 1:
        y = jnp.broadcast_to(y, (x.shape[0], m))
    if y.shape != (x.shape[0], m):
        raise ValueError(f"cond (y) must have shape [{x.shape[0]}, {m}] or [{m}]; got {list(y.shape)}")
    log_w, means = _mixture_posterior_params(params["A"], params["prior_means"], params["gains"],
                                             params["log_pi"], params["g_evals"], params["g_evecs"], y)
    return _mixture_eps(x, a, log_w, means, params["evals"], params["evecs"])


# Built once: ``ScoreModel.apply`` is a static pytree field, so a fresh closure per model would retrace every
# jitted algorithm for every new prior.
_PRIOR_APPLY = jax.jit(_flat_apply(_apply_prior_flat))
_POSTERIOR_APPLY = jax.jit(_flat_apply(_apply_posterior_flat))


# ----------------------------------------------------------------------------------------------------------------
# mixture posterior algebra
# ----------------------------------------------------------------------------------------------------------------

def _component_posterior(A, sigma_y, means, covs):
    """Per component: gains ``K_k = S_k A^T G_k^{-1}`` ``[K, d, m]``, ``C_k = S_k - K_k A S_k`` ``[K, d, d]``,
    and the eigendecomposition of ``G_k = A S_k A^T + sigma_y^2 I`` (``[K, m]``, ``[K, m, m]``)."""
    m = A.shape[0]
    SAt = covs @ A.T  # [K, d, m]
    G = A @ SAt + (sigma_y**2) * jnp.eye(m, dtype=covs.dtype)  # [K, m, m]
    G = 0.5 * (G + jnp.swapaxes(G, -1, -2))
    g_evals, g_evecs = jnp.linalg.eigh(G)
    Ginv = (g_evecs / g_evals[..., None, :]) @ jnp.swapaxes(g_evecs, -1, -2)
    gains = SAt @ Ginv  # [K, d, m]
    C = covs - gains @ jnp.swapaxes(SAt, -1, -2)
    C = 0.5 * (C + jnp.swapaxes(C, -1, -2))
    return gains, C, g_evals, g_evecs


def _mixture_posterior_params(A, means, gains, log_pi, g_evals, g_evecs, y):
    """Posterior component log-weights (unnormalised, ``[B, K]``) and means ``[B, K, d]`` for ``y [B, m]``."""
    resid = y[:, None, :] - means @ A.T  # [B, K, m]
    post_means = means + jnp.einsum("kdm,bkm->bkd", gains, resid)
    proj = jnp.einsum("bkm,kmn->bkn", resid, g_evecs)
    m = A.shape[0]
    log_lik = -0.5 * (jnp.sum(proj**2 / g_evals, -1) + jnp.sum(jnp.log(g_evals), -1) + m * _LOG_2PI)
    return log_pi + log_lik, post_means


# ----------------------------------------------------------------------------------------------------------------
# posterior objects
# ----------------------------------------------------------------------------------------------------------------

class GaussianPosterior(NamedTuple):
    """Exact posterior ``N(mean_b, cov)`` of a Gaussian prior for a batch of measurements (unpacks as
    ``mean, cov = prior.posterior(...)``).

    Attributes:
      mean: ``[B, d]`` posterior mean (= MMSE estimate = MAP).
      cov: ``[d, d]`` posterior covariance (independent of ``y``); its trace is the MMSE ``D*``.
    """

    mean: jax.Array
    cov: jax.Array

    def sample(self, key, n: int) -> jax.Array:
        """``n`` exact posterior samples per measurement: shape ``[n, B, d]`` (sample axis first)."""
        L = _psd_sqrt(self.cov)
        z = jax.random.normal(key, (n,) + self.mean.shape, self.mean.dtype)
        return self.mean + z @ L.T


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GMMPosterior:
    """Exact posterior ``sum_k weights[b, k] N(means[b, k], covs[k])`` of a GMM prior (one mixture per measurement).

    Attributes:
      weights: ``[B, K]`` posterior component weights ``pi'_k`` (rows sum to 1).
      means: ``[B, K, d]`` component posterior means ``m_k``.
      covs: ``[K, d, d]`` component posterior covariances ``C_k`` (independent of ``y``).
    """

    weights: jax.Array
    means: jax.Array
    covs: jax.Array

    @property
    def mean(self) -> jax.Array:
        """MMSE estimate ``X* = sum_k pi'_k m_k``: ``[B, d]``."""
        return jnp.einsum("bk,bkd->bd", self.weights, self.means)

    @property
    def cov(self) -> jax.Array:
        """Full posterior covariance ``sum_k pi'_k (C_k + m_k m_k^T) - X* X*^T``: ``[B, d, d]``."""
        mean = self.mean
        second = jnp.einsum("bk,kde->bde", self.weights, self.covs) + jnp.einsum(
            "bk,bkd,bke->bde", self.weights, self.means, self.means)
        return second - mean[:, :, None] * mean[:, None, :]

    def sample(self, key, n: int) -> jax.Array:
        """``n`` exact posterior samples per measurement: shape ``[n, B, d]`` (sample axis first)."""
        k_comp, k_noise = jax.random.split(key)
        B, K, d = self.means.shape
        logits = jnp.log(jnp.clip(self.weights, 1e-38, None))
        comp = jax.random.categorical(k_comp, logits, axis=-1, shape=(n, B))  # [n, B]
        L = _psd_sqrt(self.covs)  # [K, d, d]
        z = jax.random.normal(k_noise, (n, B, d), self.means.dtype)
        mu = jnp.take_along_axis(self.means[None], comp[..., None, None], axis=2)[:, :, 0]  # [n, B, d]
        return mu + jnp.einsum("nbde,nbe->nbd", L[comp], z)


# ----------------------------------------------------------------------------------------------------------------
# priors
# ----------------------------------------------------------------------------------------------------------------

def _check_schedule(schedule):
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a mapreps_jax.diffusion.Schedule; got {type(schedule).__name__}")


def _check_x(name: str, x, d: int):
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{name} must have shape [B, {d}]; got {list(x.shape)}")
    return x


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianPrior:
    """Gaussian prior ``N(mu, cov)`` on vectors ``[d]`` (a pytree).

    Build with ``GaussianPrior(mu, cov)``, :meth:`isotropic` or :meth:`random`; ``evals``/``evecs`` (the
    eigendecomposition ``cov = evecs diag(evals) evecs^T``) are computed on construction when not given.

    Attributes:
      mu: ``[d]`` mean.  cov: ``[d, d]`` covariance (symmetric PSD).
      evals: ``[d]`` eigenvalues (clipped at 0).  evecs: ``[d, d]`` eigenvectors (columns).
    """

    mu: jax.Array
    cov: jax.Array
    evals: Optional[jax.Array] = None
    evecs: Optional[jax.Array] = None

    def __post_init__(self):
        if self.evals is None or self.evecs is None:
            if not hasattr(self.cov, "shape") or not hasattr(self.mu, "shape"):
                return  # pytree plumbing (e.g. tree_map to placeholders): nothing to compute
            mu = jnp.asarray(self.mu, jnp.float32)
            cov = jnp.asarray(self.cov, jnp.float32)
            _check_shape("mu", mu, (None,))
            d = mu.shape[0]
            _check_shape("cov", cov, (d, d))
            check_finite(mu, "mu", "GaussianPrior")
            check_finite(cov, "cov", "GaussianPrior")
            cov = 0.5 * (cov + cov.T)
            evals, evecs = jnp.linalg.eigh(cov)
            if _is_concrete(evals) and float(evals[0]) < -1e-5 * max(1.0, float(evals[-1])):
                raise ValueError(f"cov must be positive semi-definite; got smallest eigenvalue {float(evals[0]):.3g}")
            object.__setattr__(self, "mu", mu)
            object.__setattr__(self, "cov", cov)
            object.__setattr__(self, "evals", jnp.clip(evals, 0.0, None))
            object.__setattr__(self, "evecs", evecs)

    @property
    def d(self) -> int:
        return int(self.mu.shape[-1])

    # -- constructors --------------------------------------------------------------------------------------------
    @classmethod
    def isotropic(cls, d: int, scale: float = 1.0, mu=None) -> "GaussianPrior":
        """``N(mu, scale^2 I)`` (``scale`` is the per-coordinate std ``s``; ``mu`` defaults to 0)."""
        if not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"d must be a positive integer; got {d!r}")
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite positive std; got {scale!r}")
        mu = jnp.zeros((d,), jnp.float32) if mu is None else jnp.asarray(mu, jnp.float32)
        return cls(mu=mu, cov=(float(scale) ** 2) * jnp.eye(d, dtype=jnp.float32))

    @classmethod
    def random(cls, key, d: int, mean_scale: float = 1.0, eig_range=(0.1, 2.0)) -> "GaussianPrior":
        """A seeded random Gaussian: ``mu ~ mean_scale * N(0, I)``, ``cov = Q diag(l) Q^T`` with ``Q`` a random
        rotation (QR of a Gaussian matrix) and eigenvalues ``l`` log-uniform in ``eig_range``."""
        if not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"d must be a positive integer; got {d!r}")
        lo, hi = eig_range
        if not (0 < lo <= hi):
            raise ValueError(f"eig_range must satisfy 0 < low <= high; got {eig_range!r}")
        k_mu, k_q, k_l = jax.random.split(key, 3)
        mu = mean_scale * jax.random.normal(k_mu, (d,), jnp.float32)
        Q = _random_rotation(k_q, d)
        lam = jnp.exp(jax.random.uniform(k_l, (d,), jnp.float32, math.log(lo), math.log(hi)))
        return cls(mu=mu, cov=(Q * lam) @ Q.T)

    # -- sampling and the score -----------------------------------------------------------------------------------
    def sample(self, key, n: int) -> jax.Array:
        """``n`` prior samples ``mu + V diag(sqrt(l)) z``: ``[n, d]``."""
        z = jax.random.normal(key, (n, self.d), jnp.float32)
        return self.mu + (z * jnp.sqrt(self.evals)) @ self.evecs.T

    def _as_mixture_params(self):
        return dict(log_w=jnp.zeros((1,), jnp.float32), means=self.mu[None], evals=self.evals[None],
                    evecs=self.evecs[None])

    def score_model(self, schedule: Schedule) -> ScoreModel:
        """Exact eps of the diffused prior: ``eps = sqrt(1 - a) (a S + (1 - a) I)^{-1} (x_t - sqrt(a) mu)``,
        ``a = alpha_bar(t)`` at integer or real ``t`` (scalar or ``[B]``). ``x_t``: ``[B, d]``."""
        _check_schedule(schedule)
        params = dict(self._as_mixture_params(), schedule=schedule)
        return ScoreModel(params=params, schedule=schedule, apply=_PRIOR_APPLY,
                          name="gaussian_prior_exact")

    def tweedie_covariance(self, a) -> jax.Array:
        """``Cov[x0 | x_t] = (1 - a) S (a S + (1 - a) I)^{-1}`` ``[d, d]`` at ``a = alpha_bar(t)`` (scalar)."""
        a = jnp.asarray(a, jnp.float32)
        lam = self.evals * (1.0 - a) / (a * self.evals + 1.0 - a)
        return (self.evecs * lam) @ self.evecs.T

    def tweedie_variance(self, a) -> jax.Array:
        """Per-coordinate ``r^2 = tr Cov[x0 | x_t] / d``; for ``S = s^2 I`` exactly ``s^2 (1-a) / (a s^2 + 1 - a)``."""
        a = jnp.asarray(a, jnp.float32)
        return jnp.mean(self.evals * (1.0 - a) / (a * self.evals + 1.0 - a))

    # -- posterior ----------------------------------------------------------------------------------------------
    def _posterior_pieces(self, A, sigma_y):
        A = operator_matrix(A, self.d)
        sigma_y = _check_sigma(sigma_y)
        gains, C, g_evals, g_evecs = _component_posterior(A, sigma_y, self.mu[None], self.cov[None])
        return A, gains, C, g_evals, g_evecs

    def posterior(self, A, sigma_y, y) -> GaussianPosterior:
        """Exact posterior for ``y = A x + sigma_y n`` (``y [B, m]``): ``mean [B, d]``, ``cov [d, d]``
        (covariance form, valid for ``sigma_y = 0`` when ``A S A^T`` is invertible)."""
        A, gains, C, _, _ = self._posterior_pieces(A, sigma_y)
        y = _check_y(y, A.shape[0], "GaussianPrior.posterior")
        mean = self.mu + (y - self.mu @ A.T) @ gains[0].T
        return GaussianPosterior(mean=mean, cov=C[0])

    def posterior_model(self, A, sigma_y, schedule: Schedule) -> ScoreModel:
        """Oracle Stage-2 model: exact eps of the diffused posterior ``N(sqrt(a) m(y), a C + (1 - a) I)``;
        ``apply(params, x_t, t, cond=y)`` with ``y [B, m]`` (or ``[m]``, broadcast over the batch)."""
        _check_schedule(schedule)
        A, gains, C, g_evals, g_evecs = self._posterior_pieces(A, sigma_y)
        evals, evecs = _eigh_psd(C)
        params = dict(schedule=schedule, A=A, prior_means=self.mu[None], gains=gains,
                      log_pi=jnp.zeros((1,), jnp.float32), g_evals=g_evals, g_evecs=g_evecs,
                      evals=evals, evecs=evecs)
        return ScoreModel(params=params, schedule=schedule, apply=_POSTERIOR_APPLY,
                          name="gaussian_posterior_exact")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GMMPrior:
    """Gaussian-mixture prior ``sum_k weights_k N(means_k, covs_k)`` on vectors ``[d]`` (a pytree).

    Attributes:
      weights: ``[K]`` mixture weights (normalised on construction).  means: ``[K, d]``.  covs: ``[K, d, d]``.
      evals: ``[K, d]``, evecs: ``[K, d, d]``: per-component eigendecompositions (computed when not given).
    """

    weights: jax.Array
    means: jax.Array
    covs: jax.Array
    evals: Optional[jax.Array] = None
    evecs: Optional[jax.Array] = None

    def __post_init__(self):
        if self.evals is None or self.evecs is None:
            if not all(hasattr(v, "shape") for v in (self.weights, self.means, self.covs)):
                return
            w = jnp.asarray(self.weights, jnp.float32)
            means = jnp.asarray(self.means, jnp.float32)
            covs = jnp.asarray(self.covs, jnp.float32)
            _check_shape("weights", w, (None,))
            K = w.shape[0]
            _check_shape("means", means, (K, None))
            d = means.shape[1]
            _check_shape("covs", covs, (K, d, d))
            for name, v in (("weights", w), ("means", means), ("covs", covs)):
                check_finite(v, name, "GMMPrior")
            if _is_concrete(w) and (np.any(np.asarray(w) < 0) or float(jnp.sum(w)) <= 0):
                raise ValueError("weights must be non-negative with a positive sum")
            covs = 0.5 * (covs + jnp.swapaxes(covs, -1, -2))
            evals, evecs = _eigh_psd(covs)
            object.__setattr__(self, "weights", w / jnp.sum(w))
            object.__setattr__(self, "means", means)
            object.__setattr__(self, "covs", covs)
            object.__setattr__(self, "evals", evals)
            object.__setattr__(self, "evecs", evecs)

    @property
    def d(self) -> int:
        return int(self.means.shape[-1])

    @property
    def K(self) -> int:
        return int(self.means.shape[0])

    @classmethod
    def random(cls, key, d: int, n_components: int = 4, radius: float = 2.0, var_range=(0.1, 0.5),
               weight_spread: float = 0.5) -> "GMMPrior":
        """A seeded mixture whose components are well separated but overlap.

        Recipe: draw a random rotation ``Q``; component means are ``radius * (+/- Q e_j)``, ``j = 0, 1, ...``
        (vertices of a rotated cross-polytope, so any two means are at least ``radius * sqrt(2)`` apart); when
        ``n_components > 2 d`` the extra means are ``radius`` times random unit vectors. Each covariance is
        ``Q_k diag(l_k) Q_k^T`` with its own random rotation and eigenvalues uniform in ``var_range`` (defaults:
        stds 0.32..0.71 against a mean spacing >= 2.83: distinct modes whose tails overlap). Weights
        ``∝ exp(weight_spread * g_k)``, ``g_k ~ N(0, 1)``.
        """
        if not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"d must be a positive integer; got {d!r}")
        if not isinstance(n_components, (int, np.integer)) or n_components < 1:
            raise ValueError(f"n_components must be a positive integer; got {n_components!r}")
        lo, hi = var_range
        if not (0 < lo <= hi):
            raise ValueError(f"var_range must satisfy 0 < low <= high; got {var_range!r}")
        K = int(n_components)
        k_q, k_extra, k_rot, k_lam, k_w = jax.random.split(key, 5)
        Q = _random_rotation(k_q, d)
        idx = np.arange(min(K, 2 * d))
        signs = jnp.asarray(np.where(idx % 2 == 0, 1.0, -1.0), jnp.float32)
        means = radius * signs[:, None] * Q.T[idx // 2]
        if K > 2 * d:
            u = jax.random.normal(k_extra, (K - 2 * d, d), jnp.float32)
            means = jnp.concatenate([means, radius * u / jnp.linalg.norm(u, axis=1, keepdims=True)], axis=0)
        rots = jax.vmap(lambda k: _random_rotation(k, d))(jax.random.split(k_rot, K))
        lam = jax.random.uniform(k_lam, (K, d), jnp.float32, lo, hi)
        covs = jnp.einsum("kde,ke,kfe->kdf", rots, lam, rots)
        w = jnp.exp(weight_spread * jax.random.normal(k_w, (K,), jnp.float32))
        return cls(weights=w, means=means, covs=covs)

    def sample(self, key, n: int) -> jax.Array:
        """``n`` prior samples: ``[n, d]``."""
        k_c, k_z = jax.random.split(key)
        comp = jax.random.categorical(k_c, jnp.log(self.weights), shape=(n,))
        L = self.evecs * jnp.sqrt(self.evals)[:, None, :]  # [K, d, d]
        z = jax.random.normal(k_z, (n, self.d), jnp.float32)
        return self.means[comp] + jnp.einsum("nde,ne->nd", L[comp], z)

    def score_model(self, schedule: Schedule) -> ScoreModel:
        """Exact eps of the diffused mixture ``sum_k pi_k N(sqrt(a) mu_k, a S_k + (1 - a) I)`` (module doc)."""
        _check_schedule(schedule)
        params = dict(schedule=schedule, log_w=jnp.log(self.weights), means=self.means, evals=self.evals,
                      evecs=self.evecs)
        return ScoreModel(params=params, schedule=schedule, apply=_PRIOR_APPLY, name="gmm_prior_exact")

    def _posterior_pieces(self, A, sigma_y):
        A = operator_matrix(A, self.d)
        sigma_y = _check_sigma(sigma_y)
        gains, C, g_evals, g_evecs = _component_posterior(A, sigma_y, self.means, self.covs)
        return A, gains, C, g_evals, g_evecs

    def posterior(self, A, sigma_y, y) -> GMMPosterior:
        """Exact posterior ``sum_k pi'_k N(m_k, C_k)`` for ``y = A x + sigma_y n`` with ``y [B, m]``;
        ``pi'_k ∝ pi_k N(y; A mu_k, A S_k A^T + sigma_y^2 I)``."""
        A, gains, C, g_evals, g_evecs = self._posterior_pieces(A, sigma_y)
        y = _check_y(y, A.shape[0], "GMMPrior.posterior")
        log_w, means = _mixture_posterior_params(A, self.means, gains, jnp.log(self.weights), g_evals, g_evecs, y)
        return GMMPosterior(weights=jax.nn.softmax(log_w, axis=-1), means=means, covs=C)

    def posterior_model(self, A, sigma_y, schedule: Schedule) -> ScoreModel:
        """Oracle Stage-2 model: exact eps of ``sum_k pi'_k(y) N(sqrt(a) m_k(y), a C_k + (1 - a) I)``;
        ``apply(params, x_t, t, cond=y)`` with ``y [B, m]`` (or ``[m]``, broadcast over the batch).

        With ``sigma_y = 0`` each ``C_k`` is singular: eps is exact and finite for ``a < 1`` (0 at ``a = 1``), but at
        very small ``t`` the components' log-densities scale like ``1 / (1 - a)`` and float32 responsibilities of
        points far from the posterior support become ill-conditioned."""
        _check_schedule(schedule)
        A, gains, C, g_evals, g_evecs = self._posterior_pieces(A, sigma_y)
        evals, evecs = _eigh_psd(C)
        params = dict(schedule=schedule, A=A, prior_means=self.means, gains=gains, log_pi=jnp.log(self.weights),
                      g_evals=g_evals, g_evecs=g_evecs, evals=evals, evecs=evecs)
        return ScoreModel(params=params, schedule=schedule, apply=_POSTERIOR_APPLY,
                          name="gmm_posterior_exact")


def _random_rotation(key, d: int) -> jax.Array:
    """Haar-random orthogonal matrix (QR of a Gaussian matrix with the sign of diag(R) fixed)."""
    g = jax.random.normal(key, (d, d), jnp.float32)
    q, r = jnp.linalg.qr(g)
    return q * jnp.sign(jnp.diag(r))[None, :]


# ----------------------------------------------------------------------------------------------------------------
# closed forms
# ----------------------------------------------------------------------------------------------------------------

def gaussian_w2(m1, S1, m2, S2) -> jax.Array:
    """2-Wasserstein distance (not squared) between ``N(m1, S1)`` and ``N(m2, S2)``:
    ``W2^2 = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})`` (PSD square roots via ``eigh``)."""
    m1, m2, S1, S2 = (jnp.asarray(v) for v in (m1, m2, S1, S2))
    _check_shape("m1", m1, (None,))
    d = m1.shape[0]
    _check_shape("m2", m2, (d,))
    _check_shape("S1", S1, (d, d))
    _check_shape("S2", S2, (d, d))
    r1 = _psd_sqrt(S1)
    cross_evals, _ = _eigh_psd(r1 @ S2 @ r1)
    w2sq = jnp.sum((m1 - m2) ** 2) + jnp.trace(S1) + jnp.trace(S2) - 2.0 * jnp.sum(jnp.sqrt(cross_evals))
    return jnp.sqrt(jnp.clip(w2sq, 0.0, None))


def gaussian_fit(samples):
    """``(mean [d], cov [d, d])`` of ``samples [n, d]`` (unbiased covariance, ``n - 1``)."""
    x = jnp.asarray(samples)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"samples must have shape [n >= 2, d]; got {list(x.shape)}")
    mean = jnp.mean(x, axis=0)
    xc = x - mean
    return mean, xc.T @ xc / (x.shape[0] - 1)


def ideal_dp_curve(P, D_star, P_star):
    """Ideal distortion-perception curve (MSE / W2): ``D(P) = D* + max(P* - P, 0)^2``."""
    P = jnp.asarray(P)
    return D_star + jnp.clip(P_star - P, 0.0, None) ** 2


class SVDGains(NamedTuple):
    """Per-direction quantities of the isotropic Gaussian testbed (``d`` directions, null ones included)."""

    g: jax.Array  # [d] g_i = s^2 l_i^2 / (s^2 l_i^2 + sigma^2)
    v: jax.Array  # [d] posterior variances v_i = s^2 (1 - g_i)
    D_star: jax.Array  # MMSE: sum v_i
    P_star: jax.Array  # W2(p_X, p_{X*}) = sqrt(sum s^2 (1 - sqrt(g_i))^2)


def svd_gains(s, singular_values, d: int, sigma) -> SVDGains:
    """:class:`SVDGains` for ``S = s^2 I`` (``s`` the prior std), ``A = U diag(l) V^T`` with the given singular
    values (at most ``d``; missing directions have ``l_i = 0``), noise std ``sigma`` (0 allowed)."""
    l = jnp.asarray(singular_values, jnp.float32).reshape(-1)
    if l.shape[0] > d:
        raise ValueError(f"singular_values must have at most d = {d} entries; got {l.shape[0]}")
    l = jnp.concatenate([l, jnp.zeros((d - l.shape[0],), l.dtype)])
    s2 = jnp.asarray(s, jnp.float32) ** 2
    num = s2 * l**2
    den = num + jnp.asarray(sigma, jnp.float32) ** 2
    g = jnp.where(num > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    v = s2 * (1.0 - g)
    return SVDGains(g=g, v=v, D_star=jnp.sum(v), P_star=jnp.sqrt(jnp.sum(s2 * (1.0 - jnp.sqrt(g)) ** 2)))


def oracle_map_rps_dp(s, singular_values, d: int, sigma, a0):
    """Closed-form ``(D, P)`` of oracle MAP-RPS (exact Stage 1 and exact continuous-time posterior Stage 2 from the
    MMSE estimate re-noised to ``a0 = alpha_bar(t0)``), isotropic case:
    ``rho_i = a0 v_i / (a0 v_i + 1 - a0)``, ``D = sum v_i (2 - rho_i^2)``, ``P^2 = sum (s - sqrt(s^2 - v_i rho_i^2))^2``.
    ``a0`` may be an array (any shape); ``D``, ``P`` have its shape. ``a0 = 1`` gives ``(D*, P*)``, ``a0 = 0``
    gives ``(2 D*, 0)``."""
    gains = svd_gains(s, singular_values, d, sigma)
    v = gains.v
    a0 = jnp.asarray(a0, jnp.float32)[..., None]
    den = a0 * v + 1.0 - a0
    rho = jnp.where(den > 0, a0 * v / jnp.where(den > 0, den, 1.0), 0.0)
    s = jnp.asarray(s, jnp.float32)
    D = jnp.sum(v * (2.0 - rho**2), axis=-1)
    P = jnp.sqrt(jnp.sum((s - jnp.sqrt(jnp.clip(s**2 - v * rho**2, 0.0, None))) ** 2, axis=-1))
    return D, P


def stage1_fixed_point(prior: GaussianPrior, A_matrix, y, sigma_y, w: Union[float, str, jax.Array], a_t1):
    """Fixed point of Stage 1 (MAP) with the exact eps of a Gaussian prior:
    ``x = (2 A^T A + w B)^{-1} (2 A^T y + w B mu)``, ``B = sqrt(a (1 - a)) (a S + (1 - a) I)^{-1}``, ``a = a_t1``
    (the value ``alpha_bar(t1)``, not ``t1``). ``y [B, m]`` -> ``[B, d]``. ``w = "auto"`` uses
    :func:`principled_weight` with ``r2 = prior.tweedie_variance(a)`` (then ``x`` is the exact posterior mean
    when ``S = s^2 I``). ``A_matrix`` may also be a linear function."""
    if not isinstance(prior, GaussianPrior):
        raise TypeError(f"prior must be a GaussianPrior; got {type(prior).__name__}")
    A = operator_matrix(A_matrix, prior.d)
    y = _check_y(y, A.shape[0], "stage1_fixed_point")
    a = jnp.asarray(a_t1, jnp.float32)
    if isinstance(w, str):
        if w != "auto":
            raise ValueError(f"w must be a number or 'auto'; got {w!r}")
        w = principled_weight(sigma_y, a, prior.tweedie_variance(a))
    Bmat = jnp.sqrt(a * (1.0 - a)) * (prior.evecs / (a * prior.evals + 1.0 - a)) @ prior.evecs.T
    lhs = 2.0 * A.T @ A + w * Bmat
    rhs = 2.0 * y @ A + w * (Bmat @ prior.mu)
    return jnp.linalg.solve(lhs, rhs.T).T
