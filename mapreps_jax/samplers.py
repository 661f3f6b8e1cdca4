"""Reverse-diffusion step rules ("samplers") pluggable into the RPS stage and the DPS baselines.

Every sampler is a small frozen dataclass registered as a pytree: numeric hyper-parameters are leaves (so they can
be traced, vmapped, differentiated), flags are static. The step rule follows the ``(state, info)`` pattern:

    state = sampler.init(problem, x_t)                               -> SamplerState(x, extra)
    state, info = sampler.one_step(key, problem, state, t, t_next)   -> info = StepInfo(x0, residual)

``problem`` is a :class:`~mapreps_jax.space.Problem` ``(model, op, y, cond)``; the state lives in the model's space
(pixels, or a latent diffusion model's latents), and every data fit is ``y - A(D(x0))`` (``Problem.residual``).
``SamplerState.extra`` carries what a step rule keeps between steps (``()`` for the rules here except
:class:`ReSampleStep`, which counts its steps there). ``info.x0`` is the
clean estimate the move used (state space) and ``info.residual`` the per-image ``||y - A(D(x0))||``; loops collect
``info`` as scan outputs on request (:func:`~mapreps_jax.rps_stage.rps_trace`) and XLA drops it otherwise.
``sampler.step(key, model, op, y, x_t, t, t_next, cond=None) -> x_{t_next}`` is the one-call form.

``key`` is one key or ``[B]`` keys (one per image; the step's noise for image ``i`` is drawn from its key alone,
:mod:`mapreps_jax.rng`). ``t`` / ``t_next`` are scalar (integer or real) times with ``t_next < t``; ``t_next = -1`` is the clean end
(``alpha_bar(-1) = 1``). All steps share the DDPM/DDIM(eta) move of ``ALGORITHMS.md`` section 0:

    x0 = Tweedie(x_t, eps)          (clipped to [-1, 1] when ``clip``)
    eps_hat = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)        (re-derived from the possibly clipped x0)
    x_next = sqrt(a_n) x0 + sqrt(1 - a_n - s^2) eps_hat + s z,   s = eta sqrt((1-a_n)/(1-a_t)) sqrt(1 - a_t/a_n)

(eta = 1 on adjacent integer steps is exactly the DDPM posterior mean plus ``sqrt(beta_tilde) z``); with
``variance="learned"`` the mean stays the DDPM posterior mean and the noise std is the network's learned-range std
(as guided-diffusion's ``p_sample``; full integer grid only).

The paper's code differs in two details, offered as named options (the defaults stay the clean form above):
``mean="raw"`` uses the raw network ``eps`` with the (clipped) ``x0`` in a DDIM-form mean,
``x_next = sqrt(a_n) x0 + sqrt(1 - a_n - s^2) eps_raw + s z``; ``variance="learned_official"`` takes the learned-range
std with ``exp(v)`` in place of the variance channels ``v`` and adds noise on the last step too
(``ALGORITHMS.md`` section 2). ``DPSStep.official(zeta)`` combines both.

Guidance through the conditional score (PiGDM, DMPS): with an approximation ``p(y | x_t) ~ N(y; m(x_t), C_t)`` the
conditional Tweedie estimate is ``x0_c = x0 + zeta (1 - a_t) / sqrt(a_t) grad_{x_t} log p(y | x_t)`` (Tweedie's
formula with the score ``s(x_t) + grad log p(y | x_t)``), followed by the shared move from ``x0_c``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .diffusion import _bcast, ddim_sigma_log, ddim_step, eps_from_x0, learned_range_std, log_alpha_bar, safe_sqrt
from .config import pytree_config, static
from .linalg import cg_solve
from .rng import fold_keys, image_keys, normal_like
from .space import Problem
from .validation import check_scalar, concrete_value

__all__ = ["DDPMStep", "DPSStep", "DDNMStep", "PiGDMStep", "DMPSStep", "PSLDStep", "ReSampleStep", "SAMPLERS",
           "make_sampler", "SamplerState", "StepInfo"]


class SamplerState(NamedTuple):
    """A sampler's state at the current time: ``x`` (``[B, *state_shape]``) and what the rule carries between steps
    (``extra``; ``()`` for the rules of this module)."""

    x: jax.Array
    extra: Any = ()


class StepInfo(NamedTuple):
    """What a step reports: ``x0`` (the clean estimate the move used, state space) and ``residual`` (``[B]``,
    ``||y - A(D(x0))||``; zeros for unconditional sampling). A rule that does not compute the residual anyway leaves
    it ``None``; the loops fill it in (:meth:`complete`) only when a trace is collected, so an untraced run pays no
    extra operator or decoder call."""

    x0: jax.Array
    residual: Any = None

    def complete(self, problem: Problem) -> "StepInfo":
        return self if self.residual is not None else self._replace(residual=problem.residual_norm(self.x0))


class _StepRule:
    """The methods every step rule shares (``one_step`` is each rule's own). ``latent_calls``: the decoder and
    encoder forward passes one step makes in a latent space (a forward + VJP counts as one), for the reported
    cost (:func:`~mapreps_jax.map_rps.network_calls`; counted in ``tests/test_nfe_counted.py``). A rule whose cost
    varies by step (``calls_vary_by_step``, :class:`ReSampleStep`) overrides :meth:`calls_over`."""

    latent_calls = (0, 0)
    calls_vary_by_step = False

    def init(self, problem: Problem, x) -> SamplerState:
        return SamplerState(x)

    def calls_over(self, times, T: int) -> tuple:
        """``(decoder, encoder)`` forward passes (a forward + VJP counts as one) of one run of this rule in a latent
        space: ``times`` are the times of the steps that execute, in order, from a fresh :meth:`init` (steps skipped
        by a loop do not count), ``T`` the model's number of diffusion steps. Default: ``latent_calls`` per step."""
        n = len(_check_times(times, T, type(self).__name__))
        return self.latent_calls[0] * n, self.latent_calls[1] * n

    def step(self, key, model, op, y, x, t, t_next, cond=None):
        """One step from ``x`` (at ``t``) to ``t_next``; returns ``x_{t_next}`` (the one-call form of
        :meth:`one_step` from a fresh state)."""
        problem = Problem(model, op, y, cond)
        return self.one_step(key, problem, self.init(problem, x), t, t_next)[0].x

_VARIANCES = ("ddim", "learned", "learned_official")
_GRAD_SCALES = ("one", "alpha_bar")
_MEANS = ("rederived", "raw")


def _check_static(obj, field: str, allowed):
    v = getattr(obj, field)
    if v not in allowed:
        raise ValueError(f"{type(obj).__name__}.{field}: expected one of {allowed}, got {v!r}")


def _check_times(times, T, where):
    """``times`` as a 1-D float64 NumPy array of finite step times in ``[0, T - 1]`` (``T`` a positive int)."""
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"{where}.calls_over: T must be a positive int (the model's number of steps), got {T!r}")
    try:
        arr = np.asarray(times, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{where}.calls_over: times must be a sequence of step times, got {type(times).__name__}") \
            from None
    if arr.ndim != 1:
        raise ValueError(f"{where}.calls_over: times must be a 1-D sequence of step times, got shape {arr.shape}")
    if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > T - 1):
        raise ValueError(f"{where}.calls_over: step times must be finite and in [0, {T - 1}], got values in "
                         f"[{np.nanmin(arr)}, {np.nanmax(arr)}]")
    return arr


def _check_static_int(obj, field: str, lo: int):
    v = getattr(obj, field)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{type(obj).__name__}.{field}: expected an int >= {lo}, got {v!r}")


def _check_numbers(obj, **bounds):
    """Concrete numeric fields must be finite (and ``>= lo`` for ``field=lo``; ``None``: finite only)."""
    for name, lo in bounds.items():
        check_scalar(getattr(obj, name), name, type(obj).__name__, lo=lo)


def _move(key, model, x, x0, t, t_next, a_t, a_n, eta, v, variance, noise_scale, mean="rederived", e_raw=None):
    """The shared DDPM/DDIM(eta) move from ``x_t`` given ``x0`` (see module doc).

    ``mean="rederived"`` (default): the mean uses ``eps`` re-derived from ``x0`` and the DDIM(eta) std ``s`` (for
    eta = 1: the DDPM posterior mean, independent of the noise std); the noise term is ``noise_scale * s_noise * z``
    with ``s_noise = s``, or the learned-range std for ``variance="learned"`` (as guided-diffusion's ``p_sample``:
    posterior mean + learned std, none on the last step). ``mean="raw"``: ``sqrt(a_n) x0 + sqrt(1 - a_n - s^2) e_raw``
    with ``s`` the noise std of the step. ``variance="learned_official"``: ``learned_range_std(exp(v))``, also on the
    last step.
    """
    sched = model.schedule
    s = ddim_sigma_log(log_alpha_bar(sched, t), log_alpha_bar(sched, t_next), eta)
    if variance in ("learned", "learned_official"):
        if v is None:
            raise ValueError(f"variance={variance!r} needs a model with learned variance; {model.name!r} has none")
        ti = jnp.asarray(t, jnp.int32)
        if variance == "learned":
            s_noise = jnp.where(jnp.asarray(t_next) < 0, 0.0, learned_range_std(sched, ti, v))
        else:
            s_noise = learned_range_std(sched, ti, jnp.exp(v))
    else:
        s_noise = s
    if mean == "raw":
        m = ddim_step(None, x0, e_raw, a_n, s_noise)
    else:
        m = ddim_step(None, x0, eps_from_x0(x, x0, a_t), a_n, s)
    if jnp.ndim(s_noise) < x.ndim:
        s_noise = _bcast(s_noise, x)
    return m + noise_scale * s_noise * normal_like(image_keys(key, x.shape[0]), x)


@pytree_config
class DDPMStep(_StepRule):
    """Unconditional DDPM/DDIM(eta) step. With the testbed's exact diffused-posterior model (``cond = y``) this is the
    exact "oracle" Stage-2 sampler."""

    latent_calls = (0, 0)  # decoder and encoder forwards per step in a latent space (not a field)

    eta: Any = 1.0
    noise_scale: Any = 1.0
    clip: bool = static(False)
    variance: str = static("ddim")

    def __post_init__(self):
        _check_static(self, "variance", _VARIANCES)
        _check_numbers(self, eta=0.0, noise_scale=0.0)

    def one_step(self, key, problem, state, t, t_next):
        model, x = problem.model, state.x
        a_t, a_n = model.alpha_bar(t), model.alpha_bar(t_next)
        x0, _, v = problem.tweedie(x, t, self.clip)
        x_next = _move(key, model, x, x0, t, t_next, a_t, a_n, self.eta, v, self.variance, self.noise_scale)
        return SamplerState(x_next, state.extra), StepInfo(x0)


@pytree_config
class DPSStep(_StepRule):
    """Diffusion posterior sampling step (Chung et al. 2023):

    ``g = grad_{x_t} ||y - A(D(x0(x_t)))||`` (the norm; ``loss="sq"`` uses its square; ``D`` the decoder of a
    latent model, the identity in pixel space), then
    ``x_next = move(x_t, x0) - zeta c g``. ``noise_scale`` (lambda in [0, 1]) scales the stochastic term
    (VSDPS); ``clip`` clips the clean estimate to [-1, 1] in pixel space (on for image priors, off on the exact
    testbed): the Tweedie estimate itself in pixel space, the decoded ``D(x0)`` inside the data fit in a latent space
    (the paper's SD code; its LDM code does not clip). ``grad_scale``: ``c = 1`` (``"one"``) or ``c = alpha_bar(t)``
    (``"alpha_bar"``, the paper's latent code: ``g = a_i grad ||y - A D(z0)||^2``).
    ``mean`` / ``variance``: the clean move (default) or the paper code's details (module doc;
    :meth:`official`, :meth:`official_latent`). Costs one network forward + VJP per step.
    """

    latent_calls = (1, 0)  # decoder and encoder forwards per step in a latent space (not a field)

    zeta: Any = 1.0
    eta: Any = 1.0
    noise_scale: Any = 1.0
    clip: bool = static(True)
    loss: str = static("norm")
    variance: str = static("ddim")
    mean: str = static("rederived")
    grad_scale: str = static("one")

    def __post_init__(self):
        _check_static(self, "variance", _VARIANCES)
        _check_static(self, "loss", ("norm", "sq"))
        _check_static(self, "mean", _MEANS)
        _check_static(self, "grad_scale", _GRAD_SCALES)
        _check_numbers(self, zeta=None, eta=0.0, noise_scale=0.0)

    @classmethod
    def official(cls, zeta=1.0, variance: str = "learned_official", **kwargs) -> "DPSStep":
        """The update of the paper's released code: raw-``eps`` mean and (for learned-variance networks) the
        official learned-range noise, which is added on the last step too. ``variance="ddim"`` for networks without
        learned variance."""
        return cls(zeta=zeta, mean="raw", variance=variance, **kwargs)

    @classmethod
    def official_latent(cls, zeta=1.0, clip: bool = True, stable: bool = False, **kwargs) -> "DPSStep":
        """The latent Stage-2 step of the paper's code (``ALGORITHMS.md`` section 4): raw-``eps`` DDPM move,
        ``g = alpha_bar(t) grad ||y - A(x)||^2`` (the norm when ``stable``), ``x = D(z0)`` clipped for SD
        (``clip=True``) and not for LDM (``clip=False``)."""
        return cls(zeta=zeta, mean="raw", loss="norm" if stable else "sq", grad_scale="alpha_bar", clip=clip,
                   **kwargs)

    def one_step(self, key, problem, state, t, t_next):
        model, x = problem.model, state.x
        a_t, a_n = model.alpha_bar(t), model.alpha_bar(t_next)

        def fit(xx):
            x0, e, v = problem.tweedie(xx, t, self.clip)
            per = problem.data_fit(x0, self.loss, clip=self.clip)
            return jnp.sum(per), (x0, e, v, per)

        # x0 and e stay differentiable functions of x_t (no stop-gradient): the step's output is then exactly
        # differentiable in x_t and the hyper-parameters (grad over zeta, t0, ... through a whole Stage 2)
        g, (x0, e, v, per) = jax.grad(fit, has_aux=True)(x)
        x_next = _move(key, model, x, x0, t, t_next, a_t, a_n, self.eta, v, self.variance, self.noise_scale,
                       self.mean, e)
        res = jax.lax.stop_gradient(per if self.loss == "norm" else jnp.sqrt(per))
        if self.grad_scale == "alpha_bar":
            g = a_t * g
        return SamplerState(x_next - self.zeta * g, state.extra), StepInfo(x0, res)


@pytree_config
class DDNMStep(_StepRule):
    """Denoising diffusion null-space step (noise-free DDNM, Wang et al. 2023) for a linear operator with a
    pseudo-inverse: ``x0 <- x0 - A_pinv(A x0 - y)`` (range-space replacement), then the shared move. In a latent
    space the replacement acts on the decoded image: ``x0 <- E(D(x0) - A_pinv(A D(x0) - y))``."""

    latent_calls = (1, 1)  # decoder and encoder forwards per step in a latent space (not a field)

    eta: Any = 1.0
    clip: bool = static(True)

    def __post_init__(self):
        _check_numbers(self, eta=0.0)

    def one_step(self, key, problem, state, t, t_next):
        model, op, y, x = problem.model, problem.op, problem.y, state.x
        if not op.linear or op.pinv_fn is None:
            raise ValueError(f"DDNMStep needs a linear operator with a pseudo-inverse; got {op.name!r}")
        a_t, a_n = model.alpha_bar(t), model.alpha_bar(t_next)
        x0, _, v = problem.tweedie(x, t, self.clip)
        img = problem.image(x0)
        x0 = problem.space.encode(img - op.pinv(op.A(img) - y))
        x_next = _move(key, model, x, x0, t, t_next, a_t, a_n, self.eta, v, "ddim", 1.0)
        return SamplerState(x_next, state.extra), StepInfo(x0)


def _need_linear(name, op):
    if op is None or not op.linear:
        raise ValueError(f"{name} needs a linear operator (it uses A^T); got {getattr(op, 'name', op)!r}")


def _per_image(v, ndim: int):
    """A hyper-parameter given as a scalar or one value per image (``[B]`` or ``[B, 1, ..., 1]``, e.g. shaped for
    the state) laid out for a per-image quantity of rank ``ndim`` (``[B]`` for ``ndim = 1``; ``[B, 1, ...]``
    otherwise), so that a measurement-space or per-image term never broadcasts one image's value across the batch."""
    v = jnp.asarray(v)
    if v.ndim == 0:
        return v
    if any(d != 1 for d in v.shape[1:]):
        raise ValueError(f"a per-image hyper-parameter must be a scalar, [B] or [B, 1, ..., 1]; got shape "
                         f"{tuple(v.shape)}")
    return v.reshape((v.shape[0],) + (1,) * (ndim - 1))


def _solve_meas(op, y, resid, c_aat, sigma_y, n_iter):
    """``u = (c A A^T + sigma_y^2 I)^{-1} resid`` per image by conjugate gradients in measurement space."""
    axes = tuple(range(1, y.ndim))
    s2 = _per_image(jnp.asarray(sigma_y, resid.dtype), resid.ndim) ** 2

    def mv(q):
        return c_aat * op.A(op.AT(q)) + s2 * q

    return cg_solve(mv, resid, jnp.zeros_like(resid), axes, n_iter)


def _check_guided(obj):
    """Option checks shared by the conditional-score steps (PiGDM, DMPS)."""
    _check_static(obj, "variance", _VARIANCES)
    _check_numbers(obj, zeta=None, sigma_y=0.0, eta=0.0, noise_scale=0.0)
    check_scalar(obj.cg_iters, "cg_iters", type(obj).__name__, lo=1, integer=True)


def _guided_x0(x0, a_t, g, zeta):
    """Tweedie with the conditional score ``s + grad log p(y | x_t)``: ``x0 + zeta (1 - a) / sqrt(a) g``."""
    a = _bcast(a_t, x0)
    return x0 + zeta * (1.0 - a) / jnp.sqrt(a) * g


@pytree_config
class PiGDMStep(_StepRule):
    """Pseudo-inverse-guided diffusion step (PiGDM, Song et al. 2023) for a linear operator with Gaussian noise.

    ``p(x0 | x_t) ~ N(x0_hat(x_t), r_t^2 I)`` gives ``p(y | x_t) ~ N(A x0_hat, r_t^2 A A^T + sigma_y^2 I)``, whose
    score is the vector-Jacobian product

        ``g = (d x0_hat / d x_t)^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat)``

    (the inverse by ``cg_iters`` conjugate-gradient steps per image), then ``x0_c = x0_hat + zeta (1 - a_t)/sqrt(a_t) g``
    and the shared move from ``x0_c``. ``r_t^2 = v (1 - a_t) / (a_t v + 1 - a_t)``, ``v = data_var`` (1: the
    paper's ``r_t^2 = sigma_t^2 / (1 + sigma_t^2)``): the exact ``p(x0 | x_t)`` variance of an isotropic Gaussian prior
    with variance ``v``, for which this step samples the exact posterior. ``sigma_y`` in [-1, 1] units (traced).
    In a latent space ``x0_hat`` is replaced by the decoded estimate ``D(x0_hat(z_t))`` in ``p(y | z_t)`` and the VJP
    runs through the decoder. Costs one network forward + VJP per step.
    """

    latent_calls = (1, 0)  # decoder and encoder forwards per step in a latent space (not a field)

    zeta: Any = 1.0
    sigma_y: Any = 0.0
    data_var: Any = 1.0
    eta: Any = 1.0
    noise_scale: Any = 1.0
    clip: bool = static(True)
    cg_iters: int = static(20)
    variance: str = static("ddim")

    def __post_init__(self):
        _check_guided(self)
        check_scalar(self.data_var, "data_var", "PiGDMStep", lo=0.0, lo_inclusive=False)

    def one_step(self, key, problem, state, t, t_next):
        model, op, y, x = problem.model, problem.op, problem.y, state.x
        _need_linear("PiGDMStep", op)
        a_t, a_n = model.alpha_bar(t), model.alpha_bar(t_next)

        def x0_fn(xx):
            x0, _, v = problem.tweedie(xx, t, self.clip)
            return problem.image(x0), (x0, v)

        img, pullback, (x0, v) = jax.vjp(x0_fn, x, has_aux=True)
        vd = jnp.asarray(self.data_var, x.dtype)
        r2 = vd * (1.0 - a_t) / (a_t * vd + 1.0 - a_t)
        u = _solve_meas(op, y, y - op.A(img), r2, self.sigma_y, self.cg_iters)
        g = pullback(op.AT(u))[0]
        x0c = _guided_x0(x0, a_t, g, self.zeta)
        x_next = _move(key, model, x, x0c, t, t_next, a_t, a_n, self.eta, v, self.variance, self.noise_scale)
        return SamplerState(x_next, state.extra), StepInfo(x0c)


@pytree_config
class DMPSStep(_StepRule):
    """Diffusion-model posterior sampling step (DMPS, Meng & Kabashima 2022) for a linear operator.

    With an uninformative prior, ``p(x0 | x_t) ~ N(x_t / sqrt(a_t), (1 - a_t)/a_t I)`` and
    ``p(y | x_t) ~ N(A x_t / sqrt(a_t), sigma_y^2 I + (1 - a_t)/a_t A A^T)``, whose score needs no network Jacobian:

        ``g = A^T (sigma_y^2 I + (1 - a_t)/a_t A A^T)^{-1} (y - A x_t / sqrt(a_t)) / sqrt(a_t)``

    then ``x0_c = x0_hat + zeta (1 - a_t)/sqrt(a_t) g`` and the shared move (``zeta`` is DMPS's guidance scale, 1 in
    the paper's derivation). Exact only for a flat prior. Pixel space only (the approximation is in ``x_t`` itself).
    Costs one network forward per step (no VJP).
    """

    latent_calls = (0, 0)  # decoder and encoder forwards per step in a latent space (not a field)

    zeta: Any = 1.0
    sigma_y: Any = 0.0
    eta: Any = 1.0
    noise_scale: Any = 1.0
    clip: bool = static(True)
    cg_iters: int = static(20)
    variance: str = static("ddim")

    def __post_init__(self):
        _check_guided(self)

    def one_step(self, key, problem, state, t, t_next):
        model, op, y, x = problem.model, problem.op, problem.y, state.x
        _need_linear("DMPSStep", op)
        if not problem.space.is_pixel:
            raise ValueError(f"DMPSStep: its likelihood approximation is in pixel space; {model.name!r} runs in the "
                             f"{problem.space.name!r} space (use DPSStep or PiGDMStep)")
        a_t, a_n = model.alpha_bar(t), model.alpha_bar(t_next)
        x0, _, v = problem.tweedie(x, t, self.clip)
        sa = jnp.sqrt(a_t)
        u = _solve_meas(op, y, y - op.A(x / sa), (1.0 - a_t) / a_t, self.sigma_y, self.cg_iters)
        g = op.AT(u) / sa
        x0c = _guided_x0(x0, a_t, g, self.zeta)
        x_next = _move(key, model, x, x0c, t, t_next, a_t, a_n, self.eta, v, self.variance, self.noise_scale)
        return SamplerState(x_next, state.extra), StepInfo(x0c)


_PROJECTIONS = ("transpose", "pinv")


@pytree_config
class PSLDStep(_StepRule):
    """Posterior sampling with latent diffusion (PSLD, Rout et al. 2023): the DPS step plus a "gluing" term that
    pulls the clean latent towards the encoding of its own measurement-consistent projection:

        x = D(z0)  (clipped to [-1, 1] when ``clip``),   n' ~ N(0, I) fresh each step
        data = ||y - A x - sigma_y n'||                  (``loss="sq"``: squared)
        glue = ||z0 - E(sg(P(x)))||                      (``glue_loss="sq"``: squared)
        P(x) = A^T y + (I - A^T A) x    (``projection="transpose"``, PSLD's)
             = x + A_pinv (y - A x)     (``projection="pinv"``, the MAP-RPS code's variant)
        z_next = move(z_t, z0) - zeta c grad_{z_t} (data + gamma glue)

    with the shared move of the module doc and ``c`` as in :class:`DPSStep` (``grad_scale``). Defaults are PSLD's
    (norms, ``A^T``, ``gamma = 0.1``, ``zeta = 1``); :meth:`official_lmap` is the variant of the paper's LMAP-RPS code
    (``ALGORITHMS.md`` section 4). ``gamma = 0`` is :class:`DPSStep` (plus the ``sigma_y n'`` draw). Linear
    operators only (``A^T`` / ``A_pinv``); it runs in pixel space too (``E``, ``D`` the identity). ``sigma_y`` in
    [-1, 1] units. Costs one network forward + VJP, one decoder forward + VJP and one encoder forward per step.
    """

    latent_calls = (1, 1)  # decoder and encoder forwards per step in a latent space (not a field)

    zeta: Any = 1.0
    gamma: Any = 0.1
    sigma_y: Any = 0.0
    eta: Any = 1.0
    noise_scale: Any = 1.0
    clip: bool = static(True)
    loss: str = static("norm")
    glue_loss: str = static("norm")
    projection: str = static("transpose")
    mean: str = static("rederived")
    grad_scale: str = static("one")

    def __post_init__(self):
        _check_static(self, "loss", ("norm", "sq"))
        _check_static(self, "glue_loss", ("norm", "sq"))
        _check_static(self, "projection", _PROJECTIONS)
        _check_static(self, "mean", _MEANS)
        _check_static(self, "grad_scale", _GRAD_SCALES)
        _check_numbers(self, zeta=None, gamma=0.0, sigma_y=0.0, eta=0.0, noise_scale=0.0)

    @classmethod
    def official_lmap(cls, zeta=1.0, gamma=0.1, sigma_y=0.0, clip: bool = True, stable: bool = False,
                      **kwargs) -> "PSLDStep":
        """The PSLD variant of the paper's LMAP-RPS code: squared data term (the norm when ``stable``) with the
        ``sigma_y n'`` draw, squared gluing term with ``A_pinv``, ``g = alpha_bar(t) grad(...)``, raw-``eps`` move."""
        return cls(zeta=zeta, gamma=gamma, sigma_y=sigma_y, clip=clip, loss="norm" if stable else "sq",
                   glue_loss="sq", projection="pinv", mean="raw", grad_scale="alpha_bar", **kwargs)

    def one_step(self, key, problem, state, t, t_next):
        model, op, y, x = problem.model, problem.op, problem.y, state.x
        _need_linear("PSLDStep", op)
        if self.projection == "pinv" and op.pinv_fn is None:
            raise ValueError(f"PSLDStep(projection='pinv') needs an operator with a pseudo-inverse; {op.name!r} has "
                             f"none (use projection='transpose')")
        a_t, a_n = model.alpha_bar(t), model.alpha_bar(t_next)
        keys = image_keys(key, x.shape[0])
        k_move, k_meas = fold_keys(keys, 0), fold_keys(keys, 1)
        n_meas = normal_like(k_meas, y)
        axes = tuple(range(y.ndim - len(op.out_shape), y.ndim))
        z_axes = tuple(range(1, x.ndim))

        def norm_or_sq(v, kind, ax):
            sq = jnp.sum(v * v, axis=ax)
            return safe_sqrt(sq) if kind == "norm" else sq

        def forward(zz):
            z0, e, v = problem.tweedie(zz, t, self.clip)
            return (z0, problem.image(z0, clip=self.clip and not problem.space.is_pixel)), (e, v)

        # The gluing target E(P(x)) is a constant of the inner gradient (PSLD's stop-gradient) but stays a
        # differentiable function of z_t for outer derivatives: the loss is differentiated with respect to (z0, D(z0))
        # with the target as an argument, then pulled back through the network and decoder once.
        (z0, img), pullback, (e, v) = jax.vjp(forward, x, has_aux=True)
        if self.projection == "transpose":
            proj = op.AT(y) + img - op.AT(op.A(img))
        else:
            proj = img + op.pinv(y - op.A(img))
        target = problem.space.encode(proj)

        def loss(z0_, img_):
            r = y - op.A(img_)
            data = norm_or_sq(r - _per_image(self.sigma_y, r.ndim) * n_meas, self.loss, axes)
            glue = norm_or_sq(z0_ - target, self.glue_loss, z_axes)
            return jnp.sum(data + _per_image(self.gamma, 1) * glue), r

        (g_z0, g_img), r = jax.grad(loss, argnums=(0, 1), has_aux=True)(z0, img)
        g = pullback((g_z0, g_img))[0]
        res = safe_sqrt(jnp.sum(r * r, axis=axes))
        x_next = _move(k_move, model, x, z0, t, t_next, a_t, a_n, self.eta, v, "ddim", self.noise_scale, self.mean,
                       e)
        if self.grad_scale == "alpha_bar":
            g = a_t * g
        return SamplerState(x_next - self.zeta * g, state.extra), StepInfo(z0, jax.lax.stop_gradient(res))


def _adam_minimise(loss, x, lr, n_iter: int):
    """``n_iter`` Adam steps (optax defaults: b1 0.9, b2 0.999, eps 1e-8; learning rate ``lr``) on ``loss(x)`` from
    ``x``, in a ``lax.fori_loop`` of static length (``n_iter = 0`` returns ``x``)."""
    opt = optax.adam(lr)

    def body(_, carry):
        v, st = carry
        upd, st = opt.update(jax.grad(loss)(v), st, v)
        return optax.apply_updates(v, upd), st

    return jax.lax.fori_loop(0, n_iter, body, (x, opt.init(x)))[0]


@pytree_config
class ReSampleStep(_StepRule):
    """ReSample (Song et al. 2024, "Solving inverse problems with latent diffusion models via hard data
    consistency"): a latent DPS step every step and, on a schedule, hard data consistency on the clean estimate
    followed by stochastic resampling (``ALGORITHMS.md`` section 5). One step from ``z_t`` (time ``t``) to
    ``t_next``, ``a_t = alpha_bar(t)``, ``a_n = alpha_bar(t_next)``, ``D``/``E`` the decoder/encoder (identities in
    pixel space), all norms per image:

        z0 = Tweedie(z_t)                     (clipped to [-1, 1] in pixel space when ``clip``)
        z' = move(z_t, z0) - zeta a_t grad_{z_t} ||y - A(D(z0(z_t)))||        (``loss="sq"``: its square)
             (``D(z0)`` clipped to [-1, 1] inside this fit in a latent space when ``clip``, as :class:`DPSStep`)
        off the schedule:  z_next = z'
        on the schedule (hard data consistency, then stochastic resampling):
          x*    = argmin_x ||y - A x||^2         ``pixel_iters`` Adam steps (lr ``pixel_lr``) from D(z0) (unclipped)
          z0(y) = argmin_z ||y - A(D(z))||^2     ``latent_iters`` Adam steps (lr ``lr``) from E(x*) (E: posterior
                                                  mean / pre-quantisation latent, no key)
          s2    = gamma beta_tilde,   beta_tilde = (1 - a_n)/(1 - a_t) (1 - a_t/a_n)   (the DDPM posterior
                  variance of the step t -> t_next; ``posterior_var[t]`` on adjacent integer steps)
          z_next ~ N((s2 sqrt(a_n) z0(y) + (1 - a_n) z') / (s2 + 1 - a_n),  s2 (1 - a_n) / (s2 + 1 - a_n) I)

    ``move`` is the shared DDPM/DDIM(eta) move of the module doc (``noise_scale`` scales its noise). The resampling
    is evaluated as ``r = s2 / (1 - a_n) = gamma (1 - a_t/a_n)/(1 - a_t)``, mean ``(r sqrt(a_n) z0(y) + z')/(r + 1)``,
    variance ``s2 / (r + 1)`` (the same numbers, finite at ``t_next = -1``, where it is the noise-free
    ``(gamma z0(y) + z')/(gamma + 1)``). ``gamma -> inf`` gives ``sqrt(a_n) z0(y) + sqrt(1 - a_n) n`` (the forward
    re-noising of ``z0(y)`` to ``t_next``), ``gamma -> 0`` gives ``z'``.

    Schedule: the rule counts its steps in ``SamplerState.extra`` (``init`` sets 0, each step adds 1), so the same
    schedule holds on the full grid and on a ``K``-step sub-grid: step ``k`` (0-based, from ``init``) is a hard-DC
    step when ``(k + 1) % every == 0`` and ``t < dc_fraction T`` (compared in float32; default: every 10th step,
    in the last two thirds of the reverse process). A ``lax.cond`` selects the branch (``t`` is traced); outside
    ``vmap`` only the taken branch runs.

    Units and defaults: states in the model's space, images in [-1, 1], ``y`` in the operator's output units.
    ``zeta = 0.5`` (the "scale ``0.5 a_t``" of the DPS step), ``gamma = 40``, ``every = 10``, ``dc_fraction = 2/3``,
    ``pixel_lr = 1e-2``, ``lr = 5e-3`` (the learning rates of the authors' code), ``pixel_iters = 200``,
    ``latent_iters = 100``, ``eta = 1`` (DDPM), ``loss = "norm"``. Numbers are traced leaves; ``every``, the
    iteration counts, ``clip`` and ``loss`` are static. The data fits of the two optimisations are sums of squares
    over each image's measurement (Adam acts elementwise, so images do not interact).

    Why the norm by default: it is the DPS data term (``ALGORITHMS.md`` section 2) and what the authors' code
    differentiates; its gradient has a scale-free size, while the gradient of the square grows with the residual
    and the operator's gain, so ``zeta = 0.5`` on the square can make the chain unstable (seen on a small
    Gaussian test problem: round-off differences doubling every few steps).

    Which detail is whose: the DPS step with scale ``0.5 a_t``, hard DC every 10 steps in the last two thirds,
    pixel-then-latent optimisation and the resampling law with ``s2 = 40 beta_tilde`` are the spec's summary of the
    method (``ALGORITHMS.md``). The authors' released code differs in details not reproduced here: its DPS term is
    the gradient of the norm of the whole batch's residual (here: the sum of the per-image norms, so images do not
    interact); its schedule is on the DDIM index (multiples of 10, never the last step); in the middle third it runs
    only the pixel optimisation (AdamW, up to 2000 steps, early stopping) and encodes ``x*``, in the last third only
    the latent optimisation from ``z0`` (AdamW, up to 500 steps, early stopping); it takes ``z0`` after a few
    unconditional DDIM steps ("time travel"); its losses are means; and it ends with one more latent optimisation.
    Here both optimisations run on every hard-DC step with fixed iteration counts (so the cost is known in
    advance).

    Cost per step: ``model.eps_calls`` UNet calls (forward + VJP) and one decoder forward + VJP (whose forward
    also gives the pixel optimisation's start ``D(z0)``); a hard-DC step adds ``latent_iters`` decoder forward +
    VJPs and one encoder forward (the pixel optimisation calls only the operator, ``pixel_iters`` forward + VJPs).
    :meth:`calls_over` gives a run's decoder and encoder forwards from its step times (used by
    :func:`~mapreps_jax.map_rps.network_calls`). ``info.x0`` is ``z0`` and ``info.residual`` its (clipped, as in
    the fit) ``||y - A(D(z0))||``.
    """

    latent_calls = (1, 0)  # decoder and encoder forwards of an off-schedule step (hard-DC steps: calls_over)
    calls_vary_by_step = True

    zeta: Any = 0.5
    gamma: Any = 40.0
    lr: Any = 5e-3
    pixel_lr: Any = 1e-2
    dc_fraction: Any = 2.0 / 3.0
    eta: Any = 1.0
    noise_scale: Any = 1.0
    every: int = static(10)
    pixel_iters: int = static(200)
    latent_iters: int = static(100)
    clip: bool = static(True)
    loss: str = static("norm")

    def __post_init__(self):
        _check_static(self, "loss", ("norm", "sq"))
        _check_static(self, "clip", (True, False))
        _check_static_int(self, "every", 1)
        _check_static_int(self, "pixel_iters", 0)
        _check_static_int(self, "latent_iters", 0)
        _check_numbers(self, zeta=None, gamma=0.0, eta=0.0, noise_scale=0.0, dc_fraction=0.0)
        check_scalar(self.lr, "lr", "ReSampleStep", lo=0.0, lo_inclusive=False)
        check_scalar(self.pixel_lr, "pixel_lr", "ReSampleStep", lo=0.0, lo_inclusive=False)
        for name in ("zeta", "gamma", "lr", "pixel_lr", "dc_fraction", "eta", "noise_scale"):
            v = concrete_value(getattr(self, name))
            if v is not None and v.ndim != 0:
                raise ValueError(f"ReSampleStep.{name}: expected a scalar (one value for the batch; vmap over a "
                                 f"rule for several values), got shape {v.shape}")

    def init(self, problem: Problem, x) -> SamplerState:
        """The state at the first step: ``x`` and the step counter 0 (int32)."""
        return SamplerState(x, jnp.zeros((), jnp.int32))

    def on_schedule(self, k, t, T: int):
        """Whether step ``k`` (0-based count from :meth:`init`) at time ``t`` is a hard-DC step (traceable)."""
        return ((k + 1) % self.every == 0) & (t < jnp.asarray(self.dc_fraction, jnp.float32) * jnp.float32(T))

    def calls_over(self, times, T: int) -> tuple:
        """``(decoder, encoder)`` forwards of one run over the executed step times ``times`` (see
        :meth:`_StepRule.calls_over`): ``1`` decoder per step, plus ``latent_iters`` decoders and one encoder per
        hard-DC step (:meth:`on_schedule`, evaluated in float32 as in the step)."""
        arr = _check_times(times, T, "ReSampleStep")
        frac = concrete_value(self.dc_fraction)
        if frac is None:
            raise ValueError("ReSampleStep.calls_over: dc_fraction must be a concrete number to count calls")
        thr = float(np.float32(frac) * np.float32(T))  # the step's float32 threshold (exact in float64)
        n_dc = sum(1 for k, t in enumerate(arr) if (k + 1) % self.every == 0 and float(t) < thr)
        return len(arr) + self.latent_iters * n_dc, n_dc

    def one_step(self, key, problem, state, t, t_next):
        model, op, y, z = problem.model, problem.op, problem.y, state.x
        if op is None or y is None:
            raise ValueError("ReSampleStep needs a forward operator and measurements: got op=None or y=None "
                             "(unconditional sampling has no data consistency to enforce)")
        if not hasattr(state.extra, "dtype") or jnp.ndim(state.extra) != 0:
            raise ValueError(f"ReSampleStep: state.extra must be the step counter (a scalar int) that "
                             f"ReSampleStep.init returns, got {state.extra!r}")
        sched = model.schedule
        la_t, la_n = log_alpha_bar(sched, t), log_alpha_bar(sched, t_next)
        a_t, a_n = model.alpha_bar(t), model.alpha_bar(t_next)
        keys = image_keys(key, z.shape[0])
        k_move, k_res = fold_keys(keys, 0), fold_keys(keys, 1)
        latent = not problem.space.is_pixel
        axes = tuple(range(y.ndim - len(op.out_shape), y.ndim))

        def fit(zz):
            z0, _, _ = problem.tweedie(zz, t, self.clip)
            img = problem.image(z0)
            r = y - op.A(jnp.clip(img, -1.0, 1.0) if (self.clip and latent) else img)
            sq = jnp.sum(r * r, axis=axes)
            per = sq if self.loss == "sq" else safe_sqrt(sq)
            return jnp.sum(per), (z0, img, sq)

        # z0 and D(z0) stay differentiable functions of z_t (exact outer derivatives, as in DPSStep)
        g, (z0, img, sq) = jax.grad(fit, has_aux=True)(z)
        z_move = _move(k_move, model, z, z0, t, t_next, a_t, a_n, self.eta, None, "ddim", self.noise_scale)
        z_prime = z_move - self.zeta * _bcast(a_t, z) * g

        def hard_dc(zp):
            x_star = _adam_minimise(lambda x: jnp.sum((y - op.A(x)) ** 2), img, self.pixel_lr, self.pixel_iters)
            z_y = _adam_minimise(lambda v: jnp.sum(problem.data_fit(v, "sq")), problem.space.encode(x_star),
                                 self.lr, self.latent_iters)
            gamma = jnp.asarray(self.gamma, zp.dtype)
            bt = ddim_sigma_log(la_t, la_n, 1.0) ** 2  # beta_tilde of the step t -> t_next
            ratio = -jnp.expm1(la_t - la_n) / -jnp.expm1(la_t)  # beta_tilde / (1 - a_n)
            r = _bcast(gamma * ratio, zp)
            mean = (r * jnp.sqrt(_bcast(a_n, zp)) * z_y + zp) / (r + 1.0)
            std = jnp.sqrt(_bcast(gamma * bt, zp) / (r + 1.0))
            return mean + std * normal_like(k_res, zp)

        dc = self.on_schedule(state.extra, t, model.T)
        z_next = jax.lax.cond(dc, hard_dc, lambda zp: zp, z_prime)
        return SamplerState(z_next, state.extra + 1), StepInfo(z0, jax.lax.stop_gradient(jnp.sqrt(sq)))


SAMPLERS = {"dps": DPSStep, "ddpm": DDPMStep, "ddnm": DDNMStep, "pigdm": PiGDMStep, "dmps": DMPSStep,
            "psld": PSLDStep, "resample": ReSampleStep}


def make_sampler(name: str, **kwargs):
    """Build a sampler step by name (``"dps"``, ``"ddpm"``, ``"ddnm"``, ``"pigdm"``, ``"dmps"``, ``"psld"``,
    ``"resample"``)."""
    if name not in SAMPLERS:
        raise ValueError(f"make_sampler: unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](**kwargs)
