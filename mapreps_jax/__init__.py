"""mapreps-jax: zero-shot imaging inverse problems with diffusion priors, and distortion-perception traversal
(MAP-RPS / LMAP-RPS) in JAX. See README.md for the API tour."""

from .diffusion import (Schedule, make_schedule, alpha_bar, log_alpha_bar, ddim_sigma_log, tweedie, eps_from_x0, renoise, ddim_sigma, ddim_step,
                        posterior_variance, learned_range_std, linear_betas, scaled_linear_betas, ldm_linear_betas)
from .model import ScoreModel, from_eps_fn

__version__ = "0.1.0"
