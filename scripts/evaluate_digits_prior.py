"""Quality numbers of the bundled digits prior (README "Bundled digits prior"), written to
``checkpoints/default/quality.json`` (atomically).

* one-step Tweedie denoiser on the first 64 held-out digits: PSNR of the (clipped) noisy input and of
  ``x0 = Tweedie(sqrt(a) y)``, ``a = alpha_bar(t)`` with ``(1 - a)/a = sigma^2``, at sigma in {0.1, 0.2, 0.4};
* unconditional 1000-step DDPM samples: digit-FD to the held-out digits, against the digit-FD of the same number of
  random training digits (the small-set bias is the same for both);
* classifier accuracy on the held-out digits.

Usage: ``python scripts/evaluate_digits_prior.py [--samples 64] [--out checkpoints/default/quality.json]``.
"""

import argparse
import io
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mapreps_jax.baselines import prior_sample  # noqa: E402
from PIL import Image  # noqa: E402

from mapreps_jax.app.datasets import from_model_range, load_digits, to_model_range  # noqa: E402
from mapreps_jax.diffusion import t_for_noise_std  # noqa: E402
from mapreps_jax.metrics import psnr  # noqa: E402
from mapreps_jax.app.perception import digit_accuracy, digit_fd  # noqa: E402
from mapreps_jax.app.pretrained import load_default_prior  # noqa: E402
from mapreps_jax.checkpoint_io import (default_checkpoint_dir, read_json, write_bytes_atomic,  # noqa: E402
                                       write_text_atomic)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=64, help="DDPM samples (1000 steps each)")
    p.add_argument("--out", default=os.path.join(default_checkpoint_dir(), "quality.json"))
    p.add_argument("--samples-png", default=None, help="also write the samples as a PNG grid here")
    a = p.parse_args(argv)
    model = load_default_prior()
    x_test, y_test = load_digits("test")
    x = jnp.asarray(to_model_range(x_test))
    res = {"checkpoint_step": read_json(os.path.join(default_checkpoint_dir(), "diffusion", "info.json")).get("step"),
           "tweedie": [], "classifier_accuracy_heldout": digit_accuracy(x, y_test)}
    for sigma in (0.1, 0.2, 0.4):
        xs = x[:64]
        y = xs + sigma * jax.random.normal(jax.random.PRNGKey(int(sigma * 100)), xs.shape)
        t = float(t_for_noise_std(model.schedule, sigma))
        x0 = model.denoise(y, sigma)
        res["tweedie"].append({"sigma": sigma, "t": t, "psnr_noisy": float(jnp.mean(psnr(jnp.clip(y, -1, 1), xs))),
                               "psnr_denoised": float(jnp.mean(psnr(x0, xs)))})
        print(res["tweedie"][-1], flush=True)
    t0 = time.perf_counter()
    samples = jax.jit(prior_sample, static_argnames=("shape",))(jax.random.PRNGKey(0), model,
                                                                  shape=(a.samples, 32, 32, 1))
    samples.block_until_ready()
    train = jnp.asarray(to_model_range(load_digits("train")[0]))
    idx = np.random.default_rng(0).choice(len(train), a.samples, replace=False)
    res["ddpm_samples"] = {"n": a.samples, "steps": model.T, "seconds": time.perf_counter() - t0,
                           "digit_fd_samples": digit_fd(samples), "digit_fd_train_same_n": digit_fd(train[idx]),
                           "digit_fd_heldout_same_n": digit_fd(x[:a.samples])}
    print(res["ddpm_samples"], flush=True)
    write_text_atomic(a.out, json.dumps(res, indent=2) + "\n")
    if a.samples_png:
        u8 = np.asarray(from_model_range(np.asarray(samples)))[..., 0]
        n_col = 8
        n_row = -(-len(u8) // n_col)
        grid = np.zeros((n_row * 34, n_col * 34), np.uint8)
        for i, im in enumerate(u8):
            r, c = divmod(i, n_col)
            grid[r * 34 + 1:r * 34 + 33, c * 34 + 1:c * 34 + 33] = im
        buf = io.BytesIO()
        Image.fromarray(grid, mode="L").resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(buf, "PNG")
        write_bytes_atomic(a.samples_png, buf.getvalue())
    print("wrote", a.out)


if __name__ == "__main__":
    main()
