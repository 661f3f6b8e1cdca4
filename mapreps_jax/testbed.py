"""Run any algorithm on an exact prior and measure its distortion-perception point against the truth.

This is the engine of ``mapreps testbed`` and ``mapreps demo`` (exact-prior mode). For each ``t0``:

* ``D = E |x_hat - x|^2`` (summed over coordinates, averaged over measurements);
* ``P = W2(N(m_hat, S_hat), N(m_X, S_X))`` (not squared): the Gaussian fit of the outputs against the prior's
  (the prior itself for the Gaussian prior; its moment-matched Gaussian for a GMM);
* ``D_star``, ``P_star``: MMSE distortion and the perception of the MMSE estimator (exact for the Gaussian prior;
  for a GMM, ``D_star`` is the exact mean posterior variance over the drawn measurements and ``P_star`` the Gaussian-fit
  W2 of the exact MMSE outputs);
* ``D_ideal = D_star + ((P_star - P)_+)^2``, the ideal D-P curve at the measured ``P`` (Freirich et al. 2021);
* ``D_closed``, ``P_closed``: oracle MAP-RPS in closed form (isotropic Gaussian prior; ``None`` otherwise).

Stage 2 re-noises to ``alpha_bar(t0 - 1)`` as in ``ALGORITHMS.md``.

:func:`orthogonal_latent_space` gives the latent path (LMAP-RPS) the same ground truth: an exact Gaussian prior on
latents ``z`` with the orthogonal linear decoder ``D(z) = Q z`` decodes to the exact Gaussian pixel prior
``N(Q mu, Q S Q^T)``, so every closed form of ``TESTBED.md`` holds in pixel units (``tests/test_latent_testbed.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .baselines import REDDiffConfig, dps, red_diff
from .diffusion import make_schedule
from .map_rps import dp_sweep
from .map_stage import MAPConfig, principled_weight
from .operators import make_operator
from .priors import GMMPrior, GaussianPrior, gaussian_fit, gaussian_w2, ideal_dp_curve, oracle_map_rps_dp
from .samplers import DDPMStep, DMPSStep, DPSStep, PiGDMStep
from .space import Space, latent_space

__all__ = ["TestbedConfig", "run_testbed", "orthogonal_latent_space", "ALGOS", "STAGE2", "PRIORS", "OPERATORS"]

ALGOS = ("map-rps", "oracle-rps", "dps", "pigdm", "dmps", "red-diff", "ccdf")
STAGE2 = ("dps", "pigdm", "dmps")
PRIORS = ("gaussian", "gmm")
OPERATORS = ("mask", "matrix")


@dataclasses.dataclass(frozen=True)
class TestbedConfig:
    """Every option of ``mapreps testbed`` (see ``mapreps testbed --help``)."""

    prior: str = "gaussian"
    scale: float = 1.0
    n_components: int = 3
    dim: int = 8
    operator: str = "mask"
    keep: Optional[int] = None
    rows: Optional[int] = None
    sigma_y: float = 0.5
    algo: str = "map-rps"
    t0: Sequence[int] = (0, 100, 300, 600, 999)
    n_measurements: int = 512
    seed: int = 0
    w: str = "auto"
    n_iter: int = 300
    lr: float = 0.05
    lr_min: float = 1e-5
    t1: float = 10.0
    zeta: float = 0.2
    stage2: str = "dps"
    red_diff_lr: float = 0.1
    red_diff_steps: int = 1000

    def validate(self):
        """Every field checked before any computation: a ``ValueError`` naming the option (its command-line
        spelling), what was expected and what was given. Returns ``self``."""
        import math

        def bad(name, expected, got):
            raise ValueError(f"testbed: --{name.replace('_', '-')} expected {expected}, got {got!r}")

        def integer(name, lo, hi=None, value=None):
            v = getattr(self, name) if value is None else value
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
                bad(name, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""), v)

        def real(name, lo=None, strict=False, hi=None):
            v = getattr(self, name)
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            ok = ok and math.isfinite(float(v))
            if ok and lo is not None:
                ok = float(v) > lo if strict else float(v) >= lo
            if ok and hi is not None:
                ok = float(v) <= hi
            if not ok:
                rng = "" if lo is None else (f" > {lo}" if strict else f" >= {lo}")
                rng += "" if hi is None else f" and <= {hi}"
                bad(name, f"a finite number{rng}", v)

        if self.prior not in PRIORS:
            bad("prior", f"one of {PRIORS}", self.prior)
        if self.algo not in ALGOS:
            bad("algo", f"one of {ALGOS}", self.algo)
        if self.stage2 not in STAGE2:
            bad("stage2", f"one of {STAGE2}", self.stage2)
        if self.operator not in OPERATORS:
            bad("operator", f"one of {OPERATORS}", self.operator)
        integer("dim", 1)
        integer("n_components", 1)
        if self.keep is not None:
            integer("keep", 1, self.dim)
        if self.rows is not None:
            integer("rows", 1)
        real("sigma_y", 0.0)
        real("scale", 0.0, strict=True)
        integer("n_measurements", 2)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            bad("seed", "an integer", self.seed)
        t0 = list(self.t0) if not isinstance(self.t0, (str, bytes)) else None
        if not t0 or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t <= 1000
                         for t in t0):
            bad("t0", "a non-empty list of integers in [0, 1000]", list(self.t0) if t0 is not None else self.t0)
        if self.w != "auto":
            try:
                w = float(self.w)
            except (TypeError, ValueError):
                w = None
            if w is None or not math.isfinite(w) or w < 0:
                bad("w", "'auto' or a finite number >= 0", self.w)
        integer("n_iter", 1)
        real("lr", 0.0, strict=True)
        real("lr_min", 0.0)
        real("t1", 0.0, hi=999.0)
        real("zeta", 0.0)
        real("red_diff_lr", 0.0, strict=True)
        integer("red_diff_steps", 1)
        return self


@dataclasses.dataclass(frozen=True)
class _OrthogonalEncode:
    """``E(x) = Q^T x``: images ``[B, *image_shape]`` to latents ``[B, d]`` (hashable: one trace per image shape)."""

    image_shape: tuple

    def __call__(self, Q, x, key=None):
        x = jnp.asarray(x)
        return x.reshape(x.shape[0], -1) @ Q.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class _OrthogonalDecode:
    """``D(z) = Q z``: latents ``[B, d]`` to images ``[B, *image_shape]``."""

    image_shape: tuple

    def __call__(self, Q, z):
        z = jnp.asarray(z)
        return (z.reshape(z.shape[0], -1) @ Q.T.astype(z.dtype)).reshape((z.shape[0],) + self.image_shape)


def orthogonal_latent_space(Q, image_shape: Optional[Sequence[int]] = None, name: str = "orthogonal") -> Space:
    """A latent :class:`~mapreps_jax.space.Space` whose decoder is the orthogonal linear map ``D(z) = Q z`` and whose
    encoder is its inverse ``E(x) = Q^T x``: the exact testbed of the latent path.

    With an exact Gaussian prior ``N(mu, S)`` on the latents (``dataclasses.replace(prior.score_model(schedule),
    space=orthogonal_latent_space(Q, shape))``), the decoded prior is the Gaussian pixel prior ``N(Q mu, Q S Q^T)``,
    and LMAP-RPS with a pixel operator ``A`` is MAP-RPS on the latent problem with operator ``A Q``: the closed forms
    of ``TESTBED.md`` (Stage-1 fixed point, posterior, oracle D-P curve) hold in pixel units. The exact latent
    posterior and its oracle Stage-2 model are ``prior.posterior(A Q, ...)`` and ``prior.posterior_model(A Q, ...)``
    with ``A = op.matrix()``.

    Args:
      Q: ``[d, d]`` orthogonal matrix (checked to ``1e-4`` when concrete); a pytree leaf (the space's ``params``).
      image_shape: event shape of the images (``op.in_shape``, e.g. ``(4, 4, 1)``) with ``prod(image_shape) = d``;
        default ``(d,)`` (vectors).
      name: the space's name, for messages.

    Latents are vectors ``[B, d]`` (the event shape of :class:`~mapreps_jax.priors.GaussianPrior`); ``E`` ignores its
    key (the encoder is deterministic).
    """
    Q = jnp.asarray(Q)
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
        raise ValueError(f"orthogonal_latent_space: Q must be a square matrix [d, d], got shape {list(Q.shape)}")
    d = int(Q.shape[0])
    if not isinstance(Q, jax.core.Tracer):
        q = np.asarray(Q, np.float64)
        if not np.all(np.isfinite(q)):
            raise ValueError("orthogonal_latent_space: Q has non-finite entries")
        dev = float(np.max(np.abs(q.T @ q - np.eye(d))))
        if dev > 1e-4:
            raise ValueError(f"orthogonal_latent_space: Q must be orthogonal (Q^T Q = I); max |Q^T Q - I| = {dev:.3g}")
    shape = (d,) if image_shape is None else tuple(int(v) for v in image_shape)
    if int(np.prod(shape)) != d:
        raise ValueError(f"orthogonal_latent_space: image_shape {shape} has {int(np.prod(shape))} entries; Q is "
                         f"[{d}, {d}]")
    return latent_space(Q, _OrthogonalEncode(shape), _OrthogonalDecode(shape), name=name)


def _build(cfg: TestbedConfig):
    key = jax.random.PRNGKey(cfg.seed)
    k_prior, k_op, k_x, k_n, k_alg = jax.random.split(key, 5)
    d = cfg.dim
    if cfg.prior == "gaussian":
        prior = GaussianPrior.isotropic(d, cfg.scale)
    else:
        prior = GMMPrior.random(k_prior, d, n_components=cfg.n_components)
    if cfg.operator == "mask":
        op = make_operator("mask", (d,), keep=cfg.keep if cfg.keep is not None else max(d // 2, 1),
                           seed=cfg.seed)
    else:
        op = make_operator("matrix", (d,), rows=cfg.rows if cfg.rows is not None else max(d // 2, 1),
                           seed=cfg.seed)
    x = prior.sample(k_x, cfg.n_measurements)
    y = op.measure(k_n, x, cfg.sigma_y)
    return prior, op, x, y, k_alg


def _prior_moments(prior):
    if isinstance(prior, GaussianPrior):
        return prior.mu, prior.cov
    w = prior.weights
    m = jnp.einsum("k,kd->d", w, prior.means)
    dm = prior.means - m
    cov = jnp.einsum("k,kde->de", w, prior.covs) + jnp.einsum("k,kd,ke->de", w, dm, dm)
    return m, cov


def _w2_to_prior(samples, prior_m, prior_c):
    m, c = gaussian_fit(samples)
    return float(gaussian_w2(m, c, prior_m, prior_c))


def run_testbed(cfg: TestbedConfig, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Run ``cfg.algo`` over ``cfg.t0`` and return ``{"config": ..., "points": [...]}`` (see module doc)."""
    cfg.validate()
    prior, op, x, y, key = _build(cfg)
    schedule = make_schedule("linear")
    model = prior.score_model(schedule)
    A = op.matrix()
    sig = float(cfg.sigma_y)
    prior_m, prior_c = _prior_moments(prior)

    # MMSE reference
    post = prior.posterior(A, sig, y)
    if isinstance(prior, GaussianPrior):
        x_star = post.mean
        d_star = float(jnp.trace(post.cov))
    else:
        x_star = post.mean
        d_star = float(jnp.mean(jnp.trace(post.cov, axis1=-2, axis2=-1)))
    p_star = _w2_to_prior(x_star, prior_m, prior_c)

    # closed form (isotropic Gaussian prior)
    closed = None
    if isinstance(prior, GaussianPrior):
        sv = np.linalg.svd(np.asarray(A, np.float64), compute_uv=False)
        closed = (cfg.scale, sv)

    t1 = float(cfg.t1)
    if cfg.w == "auto":
        a1 = float(model.alpha_bar(jnp.float32(t1)))
        r2 = prior.tweedie_variance(a1) if isinstance(prior, GaussianPrior) else None
        w = float(principled_weight(sig, a1, r2))
    else:
        w = float(cfg.w)
    map_cfg = MAPConfig(t1=t1, w=w, n_iter=int(cfg.n_iter), lr=float(cfg.lr), lr_min=float(cfg.lr_min))
    _, k2 = jax.random.split(key)  # the whole of DPS / PiGDM / DMPS / RED-diff (per image: image_keys(k2, B))

    def guided(name):
        """Stage-2 step by name: DPS with step ``zeta``; PiGDM and DMPS with their exact guidance scale 1 and the true
        ``sigma_y`` (PiGDM's ``r_t^2`` for the prior's variance ``scale^2``: exact on the Gaussian prior)."""
        if name == "dps":
            return DPSStep(zeta=cfg.zeta, clip=False)
        if name == "pigdm":
            return PiGDMStep(sigma_y=sig, data_var=float(cfg.scale) ** 2, clip=False)
        return DMPSStep(sigma_y=sig, clip=False)

    t0s = [int(t) for t in cfg.t0]
    outputs = {}
    if cfg.algo in ("map-rps", "oracle-rps", "ccdf"):
        # Stage 1 once (map-rps: the MAP estimate with split(key)[0]; ccdf: the pseudo-inverse; oracle-rps: the exact
        # posterior mean), then Stage 2 with split(key)[1] for every t0.
        if cfg.algo == "oracle-rps":
            s2_model, sampler, cond, x_init = prior.posterior_model(A, sig, schedule), DDPMStep(), y, x_star
        else:
            s2_model, sampler, cond = model, guided(cfg.stage2), None
            x_init = op.x_init(y) if cfg.algo == "ccdf" else None
        sweep = dp_sweep(key, s2_model, op, y, t0s, map_config=map_cfg, sampler=sampler, sigma_y=sig, cond=cond,
                         x_map=x_init, progress=progress)
        outputs = dict(zip(t0s, sweep.outputs))
    elif cfg.algo in ("dps", "pigdm", "dmps"):  # from pure noise over the full grid
        outputs[schedule.T] = jax.jit(dps)(k2, model, op, y, sampler=guided(cfg.algo))
        t0s = [schedule.T]
    else:  # red-diff
        rcfg = REDDiffConfig(lr=cfg.red_diff_lr, n_steps=int(cfg.red_diff_steps))
        outputs[0] = jax.jit(red_diff)(k2, model, op, y, config=rcfg)
        t0s = [0]
    if progress is not None and cfg.algo in ("dps", "pigdm", "dmps", "red-diff"):
        progress(1, 1)

    points = []
    for t0 in t0s:
        out = outputs[t0]
        D = float(jnp.mean(jnp.sum((out - x) ** 2, axis=-1)))
        P = _w2_to_prior(out, prior_m, prior_c)
        pt = {"t0": t0, "D": D, "P": P, "D_star": d_star, "P_star": p_star,
              "D_ideal": float(ideal_dp_curve(P, d_star, p_star)), "D_closed": None, "P_closed": None}
        if closed is not None and cfg.algo in ("map-rps", "oracle-rps"):
            a0 = float(model.alpha_bar(jnp.int32(t0 - 1)))
            Dc, Pc = oracle_map_rps_dp(closed[0], closed[1], cfg.dim, sig, a0)
            pt["D_closed"], pt["P_closed"] = float(Dc), float(Pc)
        points.append(pt)
    conf = dataclasses.asdict(cfg)
    if cfg.operator == "mask":
        conf["keep"] = int(op.out_shape[0])
    else:
        conf["rows"] = int(op.out_shape[0])
    conf["t0"] = [int(t) for t in cfg.t0]
    conf["w_used"] = w
    return {"config": conf, "points": points}
