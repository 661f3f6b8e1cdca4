"""The bundled latent digits model (``checkpoints/default/latent``: a KL autoencoder 32x32x1 <-> 8x8x4 and a latent
epsilon-UNet, trained by ``scripts/train_digits_latent.py``; numbers in ``checkpoints/default/latent.json``).

It loads offline as a latent :class:`~mapreps_jax.ScoreModel` (checksums verified), reconstructs held-out digits
(PSNR on [0, 1] images; measured mean 27.9 dB on all 500 held-out digits), and its network has learned the latent
prior: a one-step Tweedie denoise of noised latents is closer to the clean latents than the noisy ones are, by a
margin (measured at t = 100: latent MSE 0.116 -> 0.0094 over the 500 digits).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

import mapreps_jax as mr
from mapreps_jax.app.datasets import load_digits, to_model_range
from mapreps_jax.checkpoint_io import default_checkpoint_dir

N = 64


def _model_and_digits():
    m = mr.load_model(os.path.join(default_checkpoint_dir(), "latent"))
    x = jnp.asarray(to_model_range(load_digits("test")[0][:N]))
    return m, x


def test_loads_as_a_latent_model_and_reconstructs_held_out_digits():
    m, x = _model_and_digits()
    assert not m.space.is_pixel and m.space.state_shape((32, 32, 1)) == (8, 8, 4)
    rec = m.decode(m.encode(x))
    mse = jnp.mean(((rec - x) / 2.0) ** 2, axis=(1, 2, 3))
    psnr = float(jnp.mean(-10.0 * jnp.log10(mse)))
    assert psnr > 25.0, psnr


def test_latent_prior_denoises():
    m, x = _model_and_digits()
    z = m.encode(x)
    t = 100
    a = m.alpha_bar(t)
    n = jax.random.normal(jax.random.PRNGKey(0), z.shape)
    z_t = jnp.sqrt(a) * z + jnp.sqrt(1 - a) * n
    z0 = (z_t - jnp.sqrt(1 - a) * m.eps(z_t, t)) / jnp.sqrt(a)
    noisy = float(jnp.mean((z_t / jnp.sqrt(a) - z) ** 2))
    denoised = float(jnp.mean((z0 - z) ** 2))
    assert denoised < 0.25 * noisy, (denoised, noisy)
    assert np.isfinite(denoised)


N_SAMPLES = 64        # DDIM(eta = 0) samples on a 50-step sub-grid; digit-FD compared at the same set size
MAX_FD_FACTOR = 1.5   # sample digit-FD <= factor x digit-FD of 64 real training digits (measured: 96.0 vs 89.3)


def test_latent_prior_samples_digit_fd_close_to_real_digits():
    """Decoded latent-prior samples score a digit-FD (to the held-out digits) within ``MAX_FD_FACTOR`` of real
    training digits at the same set size, and blank images score far worse (so the check can fail)."""
    from mapreps_jax.app.perception import digit_fd

    m = mr.load_model(os.path.join(default_checkpoint_dir(), "latent"))
    z = jax.jit(mr.prior_sample, static_argnames=("shape", "n_steps"))(
        jax.random.PRNGKey(0), m, shape=(N_SAMPLES, 8, 8, 4), n_steps=50, sampler=mr.DDPMStep(eta=0.0))
    samples = jnp.clip(m.decode(z), -1.0, 1.0)
    assert samples.shape == (N_SAMPLES, 32, 32, 1) and bool(jnp.all(jnp.isfinite(samples)))
    train = jnp.asarray(to_model_range(load_digits("train")[0]))
    idx = np.random.default_rng(0).choice(len(train), N_SAMPLES, replace=False)
    fd_real = digit_fd(train[idx])
    fd_samples = digit_fd(samples)
    assert fd_samples <= MAX_FD_FACTOR * fd_real, (fd_samples, fd_real)
    assert digit_fd(jnp.full((N_SAMPLES, 32, 32, 1), -1.0)) > 3 * fd_real
