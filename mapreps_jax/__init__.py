"""mapreps-jax: zero-shot imaging inverse problems with diffusion priors, and distortion-perception traversal
(MAP-RPS / LMAP-RPS) in JAX. See README.md for the API tour.

Where things live:
  diffusion.py   schedules, alpha_bar (integer and real t), Tweedie, DDPM/DDIM steps
  model.py       the score-model contract ``eps_fn(params, x_t, t, cond)`` (:class:`ScoreModel`)
  space.py       where the state lives (pixels or a latent space: encode/decode) and the one data fit y - A(D(z))
  operators.py   forward operators (pure functions + pytree of fixed data)
  priors.py      exact Gaussian / GMM priors with closed-form posteriors (the testbed)
  map_stage.py   Stage 1: MAP estimate (optax AdamW, or proximal gradient for linear A)
  rps_stage.py   Stage 2: re-noised posterior sampling
  continuous.py  Stage 2 in continuous time (diffrax reverse SDE), differentiable in t0
  samplers.py    step rules: DPS, DDPM (oracle with an exact posterior model), DDNM
  map_rps.py     MAP-RPS and the D-P sweep
  baselines.py   DPS (-A, -S, VS), CCDF, RED-diff
  metrics.py     RMSE, PSNR, SSIM, Frechet distance, sliced W2, MMD
  testbed.py     run any algorithm on an exact prior and measure its D-P point
  sharding.py    data-parallel restoration over a device mesh and several hosts (run_sharded, sweep_stages)
  tune.py        gradient-based fitting of Stage-1 w, lr, t1 and the re-noising t0 (optax; remat through the loops)
  batch_restore.py  ``mapreps restore-batch``: a folder of measurements on all devices, resumable, atomic outputs
  xla_cpu.py     XLA:CPU flags applied at import (YNNPACK off, classic loop emitters: 1.6x faster UNets on CPU)
  config.py      the one config convention (frozen dataclasses that are pytrees; ``static`` fields)
  checkpoint_io.py  checkpoint root, checksums, atomic orbax I/O, schedule records, output sets
  presets.py     the paper's settings for the pixel FFHQ ADM (``mapreps restore --preset``)
  networks/      Flax networks and conversion: adm.py (ADM UNet, also the LDM-FFHQ latent UNet), sd_unet.py
                 (Stable Diffusion UNet), autoencoder.py (SD AutoencoderKL, LDM VQ-f4), latent.py (latent models:
                 network + autoencoder), convert.py / torch_pickle.py (strict torch-free conversion), registry.py
  app/           the digits application: datasets.py (bundled digits), classifier.py + perception.py (digit-FD),
                 pretrained.py (bundled digits prior and classifier), digits.py (tasks, ``mapreps restore``),
                 demo.py (``mapreps demo``)
"""

# First, before any JAX computation can create the CPU client: XLA:CPU's fast path for this library's UNets
# (YNNPACK off, XLA's classic loop emitters; see xla_cpu.py). Opt out with MAPREPS_JAX_XLA_DEFAULTS=0.
from .xla_cpu import apply_cpu_defaults as _apply_cpu_defaults, cpu_defaults_status
_apply_cpu_defaults()

from .diffusion import (Schedule, make_schedule, t_for_noise_std, alpha_bar, log_alpha_bar, tweedie, eps_from_x0, renoise, ddim_sigma,
                        ddim_sigma_log, ddim_step, posterior_variance, learned_range_std, linear_betas,
                        scaled_linear_betas, ldm_linear_betas)
from .model import ScoreModel, from_eps_fn
from .space import Space, PIXEL, latent_space, Problem
from .rng import image_keys, fold_keys, split_keys
from .operators import Operator, make_operator, custom_operator, stack_operators, TASKS
from .priors import (GaussianPrior, GMMPrior, GaussianPosterior, GMMPosterior, SVDGains, operator_matrix, gaussian_w2, gaussian_fit, ideal_dp_curve, oracle_map_rps_dp,
                     stage1_fixed_point, svd_gains)
from .map_stage import MAPConfig, MAPInfo, map_estimate, map_estimate_trace, principled_weight, prox_data_fit
from .samplers import (DPSStep, DDPMStep, DDNMStep, PiGDMStep, DMPSStep, PSLDStep, ReSampleStep, SAMPLERS, make_sampler,
                       SamplerState, StepInfo)
from .rps_stage import rps, rps_trace, reverse_loop, subgrid_times, stage2_nfe
from .continuous import rps_sde
from .map_rps import map_rps, dp_sweep, SweepResult, network_calls
from .baselines import prior_sample, dps, dps_average, resample, ccdf, red_diff, REDDiffConfig, RED_DIFF_WEIGHTINGS
from .metrics import rmse, psnr, ssim, frechet_distance, sliced_w2, mmd
from .testbed import orthogonal_latent_space
from .app.pretrained import load_default_prior, load_default_latent
from .sharding import (batch_mesh, run_sharded, sweep_stages, shard_rows, replicate, local_rows,
                       initialize_distributed, memory_per_device)
from .batch_restore import restore_batch
# gradient-based fitting of w, lr, t1, t0 (mr.tune.tune(...), mr.tune.tune_t0_for_distortion(...)): the module
from . import tune
from .tune import TuneResult, tune_t0_for_distortion, tuning_loss
from .app.demo import DemoConfig, run_demo

from .networks import (ADMConfig, adm_score_model, init_adm_params, load_model, register_model, registered_models,
                       convert_adm_state_dict, load_state_dict)

__version__ = "0.1.0"

# The paper's settings for the pixel FFHQ ADM (mapreps_jax.presets).
from .presets import Preset, PRESETS, get_preset, preset_help, load_preset_model, restore_with_preset  # noqa: E402
