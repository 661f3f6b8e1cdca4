"""Continuous-time Stage 2: the reverse VP SDE solved with diffrax, differentiable in ``t0``.

With real diffusion time ``s`` (``alpha_bar(s)`` log-linearly interpolated, :mod:`mapreps_jax.diffusion`) and a
continuous rate ``beta(s) ~ -d log alpha_bar / ds`` (see :func:`_beta`), the forward process is ``dx = -beta/2 x ds + sqrt(beta) dW``. Its time reversal,
started from the re-noised estimate at ``s = t0 - 1``, is

    dx = [beta/2 x + beta score(x, s)] (-ds) + sqrt(beta) dW_bar,    score = -eps(x, s) / sqrt(1 - alpha_bar(s)).

We integrate it on a fixed ``n_steps`` grid of the normalised time ``tau in [0, 1]`` with ``s(tau) = (t0 - 1)(1 - tau)``
(so ``ds = -(t0 - 1) dtau`` and the Brownian path lives on the fixed interval ``[0, 1]``; the output is a smooth
function of ``t0`` for a fixed key), stop at ``s = 0`` and finish with the Tweedie estimate at ``s = 0`` (the last
DDPM step, which adds no noise). With the exact diffused-posterior model of the testbed this samples the oracle
MAP-RPS output whose distortion and perception are given in closed form in ``TESTBED.md``.

The score-only form covers unconditional models and the exact oracle; the DPS guidance is a discrete-grid heuristic
and lives in :mod:`mapreps_jax.rps_stage`.

Gradients (``adjoint``): by default diffrax's :class:`diffrax.RecursiveCheckpointAdjoint` ("discretise then
optimise": the exact derivative of the computed Euler-Maruyama solution, with binomial checkpointing over the
``n_steps + 1`` solver steps, memory about ``log(n_steps)`` copies of the state); it is what
:mod:`mapreps_jax.tune` uses. Alternatives and why they are not the default are in :mod:`mapreps_jax.tune`.
What the vector fields depend on (the interval length ``L = t0 - 1``, the conditioning, the model) enters through
diffrax's ``args``, not a closure, so :class:`diffrax.BacksolveAdjoint` can differentiate w.r.t. ``t0`` too, also
under ``jit`` with traced conditioning.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

from .diffusion import renoise, safe_sqrt, tweedie
from .model import ScoreModel
from .rng import image_keys, split_keys

__all__ = ["rps_sde"]


class _PerImageBrownian(diffrax.AbstractBrownianPath):
    """A Brownian path on ``[0, 1]`` of shape ``[B, ...]`` whose row ``i`` is a :class:`diffrax.VirtualBrownianTree`
    driven by image ``i``'s key alone (so an image's path does not depend on the rest of the batch)."""

    trees: diffrax.VirtualBrownianTree
    levy_area: type = eqx.field(static=True, default=diffrax.BrownianIncrement)

    @property
    def t0(self):
        return 0.0

    @property
    def t1(self):
        return 1.0

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        return jax.vmap(lambda tree: tree.evaluate(t0, t1, left, use_levy))(self.trees)


def _beta(schedule, s):
    """Continuous ``beta(s)``: the per-cell rates ``b_k = log alpha_bar(k-1) - log alpha_bar(k)`` (so that
    ``int beta ds = -log alpha_bar`` over each integer cell) linearly interpolated between cell midpoints ``k - 1/2``.
    Continuity in ``s`` makes the solution a smooth function of ``t0`` (a piecewise-constant rate would add jumps)."""
    la = schedule.log_alpha_bar_ext
    b = la[:-1] - la[1:]
    mids = jnp.arange(b.shape[0], dtype=jnp.float32) - 0.5
    return jnp.interp(jnp.asarray(s, jnp.float32), mids, b)


def rps_sde(key, model: ScoreModel, x_init, t0, *, n_steps: int = 100, cond=None, clip: bool = False,
            solver=None, adjoint=None):
    """Re-noise ``x_init`` to ``alpha_bar(t0 - 1)`` and solve the reverse VP SDE to ``s = 0`` (see module doc).

    Args:
      key: one PRNG key or ``[B]`` keys (re-noising and the Brownian path of image ``i`` from ``split(keys[i])``).
      model: :class:`ScoreModel` (an exact diffused-posterior model with ``cond = y`` gives the oracle).
      x_init: ``[B, ...]`` starting estimate.
      t0: real re-noising time in ``[1, T]`` (differentiable); ``t0 <= 1`` returns the Tweedie-denoised re-noise.
      n_steps: fixed number of solver steps on ``[0, t0 - 1]`` (Euler-Maruyama by default).
      solver: a diffrax SDE solver (default :class:`diffrax.Euler`).
      adjoint: how reverse mode differentiates the solve (default ``None``: diffrax's default,
        :class:`diffrax.RecursiveCheckpointAdjoint`, the exact gradient of the discrete solution with checkpointing;
        see the module doc and :mod:`mapreps_jax.tune`). :class:`diffrax.BacksolveAdjoint` needs a Stratonovich
        solver (e.g. ``solver=diffrax.Heun()``; the noise here is additive, so Ito and Stratonovich agree) and gives
        an approximate gradient.
    """
    x_init = jnp.asarray(x_init, jnp.float32)
    t0 = jnp.asarray(t0, jnp.float32)
    k_noise, k_bm = split_keys(image_keys(key, x_init.shape[0], "rps_sde"))
    L = jnp.maximum(t0 - 1.0, 0.0)
    x = renoise(k_noise, x_init, model.alpha_bar(t0 - 1.0))

    # everything traced that the vector fields use (``L``, which carries t0, the conditioning, the model) is passed
    # as ``args``, not closed over, so that every adjoint, BacksolveAdjoint included, can differentiate through it
    def drift(tau, xx, args):
        L, c, m = args
        s = L * (1.0 - tau)
        beta = _beta(m.schedule, s)
        a = m.alpha_bar(s)
        eps = m.eps(xx, s, c)
        score_term = -eps / safe_sqrt(1.0 - a)
        return L * (0.5 * beta * xx + beta * score_term)

    def diffusion(tau, xx, args):
        L, _, m = args
        s = L * (1.0 - tau)
        g = jnp.sqrt(_beta(m.schedule, s) * L)
        return lx.DiagonalLinearOperator(jnp.full(xx.shape, g, xx.dtype))

    event = jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    bm = _PerImageBrownian(jax.vmap(lambda k: diffrax.VirtualBrownianTree(0.0, 1.0, tol=1.0 / (4 * int(n_steps)),
                                                                           shape=event, key=k))(k_bm))
    terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, bm))
    kw = {} if adjoint is None else dict(adjoint=adjoint)
    sol = diffrax.diffeqsolve(terms, solver or diffrax.Euler(), 0.0, 1.0, dt0=1.0 / int(n_steps), y0=x, args=(L, cond, model),
                              saveat=diffrax.SaveAt(t1=True), max_steps=int(n_steps) + 1, **kw)
    x_end = sol.ys[0]
    s_end = jnp.float32(0.0)
    x0 = tweedie(x_end, model.eps(x_end, s_end, cond), model.alpha_bar(s_end), clip)
    return jnp.where(t0 > 0, x0, x_init)
