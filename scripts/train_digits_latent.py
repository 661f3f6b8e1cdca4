#!/usr/bin/env python
"""Train the bundled latent digits model: a KL autoencoder (32x32x1 <-> 8x8x4) and an epsilon-prediction ADM UNet
on its latents, both the library's own network classes; export them as a converted latent checkpoint.

Phases (each resumable with ``--resume``, deterministic from ``--seed``):

1. ``--phase ae``: :class:`~mapreps_jax.networks.autoencoder.AutoencoderConfig` ``kind="kl"``, widths
   ``(32, 64, 64)`` (f4), 4 latent channels. Loss per batch of digits ``x`` in [-1, 1]:
   ``mean (D(z) - x)^2 + beta * mean KL(q(z|x) || N(0, I))`` with ``z = mu + sigma eps`` a posterior sample (KL
   averaged over latent elements). AdamW with linear warm-up, global-norm clipping. At the end the latent scale
   factor ``1 / std`` of the posterior means over the train split is computed (as Stable Diffusion does), so that
   scaled latents have unit variance.
2. ``--phase unet``: the train split is encoded once (posterior means times the scale factor; cached as
   ``latents.npz`` in the state dir), then an :class:`~mapreps_jax.networks.adm.ADMConfig` UNet on 8x8x4 latents
   is trained with the DDPM epsilon loss on the linear 1000-step schedule (as ``scripts/train_digits_diffusion.py``:
   AdamW + warm-up, clipping, EMA ``min(ema, (1 + step) / (10 + step))``).
3. ``--export``: ``<out>/latent/`` (:func:`~mapreps_jax.networks.latent.save_latent`, EMA UNet weights, the
   autoencoder with its ``scaling_factor``) and ``<out>/latent.json`` (configs, training settings, steps, losses,
   wall times and quality numbers on the TEST split: autoencoder reconstruction PSNR and one-step Tweedie
   denoising PSNR of the latent model). ``mapreps_jax.load_model("<out>/latent")`` returns the latent model.

Determinism: per phase ``(k_step, k_data, k_init) = split(fold_in(PRNGKey(seed), phase_id), 3)``; step ``s`` draws
from ``fold_in(k_step, s)`` and epoch ``e``'s data order from ``fold_in(k_data, e)``: an interrupted and resumed
run follows the uninterrupted trajectory (up to floating-point nondeterminism of the platform).

Outputs: full training states (orbax via ``save_pytree``, atomic) in ``--state-dir``/{ae,unet} (default
``runs/digits_latent``, git-ignored), refreshed every ``--save-minutes``, at the end, at ``--max-minutes`` and on
SIGTERM/SIGINT; the log rows (both phases, column ``phase``) in ``<out>/latent_train_log.csv``.

Examples::

    python scripts/train_digits_latent.py --phase ae --bench 5          # time train steps and exit
    python scripts/train_digits_latent.py --phase unet --bench 5
    python scripts/train_digits_latent.py --phase ae --steps 800        # fresh run (refuses to overwrite a state)
    python scripts/train_digits_latent.py --phase ae --steps 1600 --resume
    python scripts/train_digits_latent.py --phase unet --steps 4000 --max-minutes 35
    python scripts/train_digits_latent.py --phase unet --steps 8000 --resume
    python scripts/train_digits_latent.py --export

Continuing the autoencoder after the UNet was trained invalidates the UNet's latents: the UNet phase records the
autoencoder step and scale it was trained on and refuses to resume against a different one.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import serialization  # noqa: E402

from mapreps_jax.app.datasets import load_digits, to_model_range  # noqa: E402
from mapreps_jax.app.training import ddpm_train_step  # noqa: E402
from mapreps_jax.checkpoint_io import (default_checkpoint_dir, restore_pytree, save_pytree,  # noqa: E402
                                       write_text_atomic)
from mapreps_jax.diffusion import make_schedule  # noqa: E402
from mapreps_jax.networks.adm import ADMConfig, adm_apply, count_params, init_adm_params  # noqa: E402
from mapreps_jax.networks.autoencoder import (AutoencoderConfig, autoencoder_decode,  # noqa: E402
                                              autoencoder_encode_moments, init_autoencoder_params)
from mapreps_jax.networks.latent import save_latent  # noqa: E402
from train_digits_diffusion import stop_on_signals, zero_init_outputs  # noqa: E402  (the pixel prior's helpers)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DIGITS_NPZ = os.path.join(REPO, "mapreps_jax", "app", "data", "digits.npz")
LOG_FIELDS = ["phase", "step", "loss", "rec", "kl", "lr", "grad_norm", "images_per_s", "train_seconds", "time"]
PHASE_ID = {"ae": 1, "unet": 2}
SCHEDULE = {"kind": "linear", "T": 1000, "params": {}}
PHASE_DEFAULTS = {  # per-phase defaults of the shared options
    "ae": dict(steps=800, batch=64, lr=1e-3, warmup=100, weight_decay=0.0, clip=1.0, ema=None),
    "unet": dict(steps=4000, batch=128, lr=1e-3, warmup=200, weight_decay=0.0, clip=1.0, ema=0.998),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("ae", "unet"), help="train this phase")
    p.add_argument("--export", action="store_true", help="write <out>/latent and <out>/latent.json and exit")
    p.add_argument("--steps", type=int, default=None, help="train until this global step (ae 800, unet 4000)")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="also stop (and save) after this many minutes of this run (0: no limit)")
    p.add_argument("--resume", action="store_true", help="continue from the phase's state dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None, help="ae 64, unet 128")
    p.add_argument("--lr", type=float, default=None, help="ae 1e-3, unet 1e-3")
    p.add_argument("--warmup", type=int, default=None, help="ae 100, unet 200")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--clip", type=float, default=None, help="global gradient-norm clip")
    p.add_argument("--beta", type=float, default=1e-5, help="ae: KL weight (per latent element)")
    p.add_argument("--ema", type=float, default=None, help="unet: EMA decay (0.998)")
    p.add_argument("--save-minutes", type=float, default=4.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--state-dir", default=os.path.join(REPO, "runs", "digits_latent"))
    p.add_argument("--out", default=default_checkpoint_dir())
    p.add_argument("--bench", type=int, default=0, help="time this many train steps (after compilation) and exit")
    # autoencoder
    p.add_argument("--ae-channels", default="32,64,64")
    p.add_argument("--ae-groups", type=int, default=16)
    p.add_argument("--ae-attention", action="store_true", help="self-attention in the AE mid blocks")
    # unet (ADMConfig fields)
    p.add_argument("--model-channels", type=int, default=32)
    p.add_argument("--channel-mult", default="1,2")
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument("--attention-resolutions", default="4")
    p.add_argument("--num-head-channels", type=int, default=32)
    p.add_argument("--num-groups", type=int, default=16)
    a = p.parse_args(argv)
    if bool(a.phase) == bool(a.export):
        p.error("give exactly one of --phase ae|unet and --export")
    for k, v in PHASE_DEFAULTS[a.phase or "unet"].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def ae_config(a, scaling_factor: float = 1.0) -> AutoencoderConfig:
    return AutoencoderConfig(kind="kl", in_channels=1, out_channels=1,
                             block_out_channels=tuple(int(c) for c in a.ae_channels.split(",")), layers_per_block=1,
                             latent_channels=4, norm_num_groups=a.ae_groups, sample_size=32,
                             scaling_factor=scaling_factor, mid_block_add_attention=a.ae_attention)


def unet_config(a) -> ADMConfig:
    return ADMConfig(image_size=8, in_channels=4, out_channels=4, model_channels=a.model_channels,
                     channel_mult=tuple(int(m) for m in a.channel_mult.split(",")), num_res_blocks=a.num_res_blocks,
                     attention_resolutions=tuple(int(r) for r in a.attention_resolutions.split(",") if r),
                     num_heads=4, num_head_channels=a.num_head_channels, use_scale_shift_norm=True,
                     resblock_updown=False, learn_sigma=False, conv_resample=True, num_groups=a.num_groups)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def psnr01(x, y):
    """Per-image PSNR (dB) of images in [-1, 1] mapped to [0, 1] (``x`` clipped)."""
    x01 = (np.clip(np.asarray(x), -1, 1) + 1) / 2
    y01 = (np.asarray(y) + 1) / 2
    mse = np.mean(np.square(x01 - y01).reshape(len(x01), -1), axis=1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def batched(fn, x, bs=250):
    return np.concatenate([np.asarray(fn(x[i:i + bs])) for i in range(0, len(x), bs)])


def latent_means(cfg: AutoencoderConfig, params, x):
    """Unscaled posterior means of ``x`` (batched)."""
    f = jax.jit(lambda p, xb: autoencoder_encode_moments(cfg, p, xb)[0])
    return batched(lambda xb: f(params, xb), x)


def load_ae_state(a):
    d = os.path.join(a.state_dir, "ae")
    if not os.path.isdir(os.path.join(d, "tree")):
        raise SystemExit(f"no autoencoder state at {d}: run --phase ae first")
    with open(os.path.join(d, "config.json")) as f:
        saved = json.load(f)
    cfg = AutoencoderConfig.from_dict(saved["net"])
    st = restore_pytree(d)
    params = jax.tree_util.tree_map(jnp.asarray, st["params"])
    return cfg, params, saved, st


# ================================================================================================= training


class Trainer:
    """The shared loop of both phases (resume, log, periodic atomic saves, signals, time limit)."""

    def __init__(self, a, phase, net_config_dict, params, opt, lr_fn, n, extra_state=None):
        self.a, self.phase = a, phase
        self.state_dir = os.path.join(a.state_dir, phase)
        self.settings = {k: getattr(a, k) for k in ("seed", "batch", "lr", "warmup", "weight_decay", "clip")}
        self.settings.update({"beta": a.beta} if phase == "ae" else {"ema": a.ema})
        self.cfg_json = {"phase": phase, "net": net_config_dict, "training": self.settings, **(extra_state or {})}
        self.params, self.ema = params, params
        self.opt_state = opt.init(params)
        self.lr_fn = lr_fn
        self.step, self.prev_seconds = 0, 0.0
        self.n = n
        self.steps_per_epoch = n // a.batch
        self.log_path = os.path.join(a.out, "latent_train_log.csv")
        self.pending: list = []
        self.last = {}

    def maybe_resume(self):
        a = self.a
        exists = os.path.isdir(os.path.join(self.state_dir, "tree"))
        if a.resume and exists:
            with open(os.path.join(self.state_dir, "config.json")) as f:
                saved = json.load(f)
            want = {k: v for k, v in self.cfg_json.items() if k != "step"}
            got = {k: v for k, v in saved.items() if k in want}
            if got != want:
                raise ValueError(f"--resume: the saved {self.phase} state was trained with {got}, the command line "
                                 f"asks for {want}")
            st = restore_pytree(self.state_dir)
            self.params = serialization.from_state_dict(self.params, st["params"])
            self.ema = serialization.from_state_dict(self.ema, st["ema"])
            self.opt_state = serialization.from_state_dict(self.opt_state, st["opt_state"])
            self.params, self.ema, self.opt_state = jax.tree_util.tree_map(
                jnp.asarray, (self.params, self.ema, self.opt_state))
            self.step = int(st["step"])
            self.prev_seconds = float(st.get("train_seconds", 0.0))
            print(f"resumed {self.phase} from {self.state_dir} at step {self.step}", flush=True)
        elif a.resume:
            print(f"--resume: no state at {self.state_dir}, starting from scratch", flush=True)
        elif exists and not a.bench:
            raise SystemExit(f"a training state exists at {self.state_dir}: pass --resume to continue it, or "
                             f"remove it")

    def truncate_log(self):
        """Drop this phase's log rows beyond the restored step (written by a run that died before its next save)."""
        if not os.path.exists(self.log_path):
            return
        with open(self.log_path) as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if r["phase"] != self.phase or int(r["step"]) <= self.step]
        if len(keep) != len(rows):
            text = ",".join(LOG_FIELDS) + "\n" + "".join(",".join(r[k] for k in LOG_FIELDS) + "\n" for r in keep)
            write_text_atomic(self.log_path, text)

    def save(self, extra_files=None):
        t0 = time.time()
        secs = self.prev_seconds + time.time() - self.t_start
        cfg = dict(self.cfg_json, step=self.step, train_seconds=round(secs, 1), last=self.last,
                   saved=time.strftime("%Y-%m-%dT%H:%M:%S"))
        files = {"config.json": json.dumps(cfg, indent=2) + "\n"}
        files.update(extra_files or {})
        save_pytree(self.state_dir, {
            "params": serialization.to_state_dict(self.params), "ema": serialization.to_state_dict(self.ema),
            "opt_state": serialization.to_state_dict(self.opt_state), "step": np.int64(self.step),
            "train_seconds": np.float64(secs)}, extra_files=files)
        new = not os.path.exists(self.log_path)
        with open(self.log_path, "a") as f:
            if new:
                f.write(",".join(LOG_FIELDS) + "\n")
            for r in self.pending:
                f.write(",".join(str(r.get(k, "")) for k in LOG_FIELDS) + "\n")
        self.pending = []
        print(f"saved {self.phase} step {self.step} ({time.time() - t0:.1f} s)", flush=True)

    def run(self, train_step, data_key, finish=None):
        """``train_step(params, ema, opt_state, step, perm) -> (params, ema, opt_state, metrics dict)``."""
        a = self.a
        n_params = count_params(self.params)

        def epoch_perm(e):
            return jax.random.permutation(jax.random.fold_in(data_key, e), self.n)

        if a.bench:
            perm = epoch_perm(0)
            t0 = time.time()
            out = train_step(self.params, self.ema, self.opt_state, jnp.int32(0), perm)
            jax.block_until_ready(out)
            print(f"compile + first step {time.time() - t0:.1f} s", flush=True)
            p_, e_, o_, m = out
            t0 = time.time()
            for s in range(1, a.bench + 1):
                p_, e_, o_, m = train_step(p_, e_, o_, jnp.int32(s), perm)
            jax.block_until_ready(m)
            dt = (time.time() - t0) / a.bench
            print(f"BENCH {self.phase} {n_params / 1e6:.3f}M params: {dt:.3f} s/step, {a.batch / dt:.1f} images/s "
                  f"(batch {a.batch}); 1k steps ~ {dt * 1e3 / 60:.1f} min; loss {float(m['loss']):.4f}", flush=True)
            return 0

        os.makedirs(a.out, exist_ok=True)
        self.truncate_log()
        stop = stop_on_signals()

        self.t_start = time.time()
        last_save = time.time()
        window = []
        t_win = time.time()
        epoch = self.step // self.steps_per_epoch
        perm = epoch_perm(epoch)

        def flush_window(final=False):
            nonlocal window, t_win
            ms = jax.device_get(window)
            avg = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
            dt = time.time() - t_win
            ips = len(window) * a.batch / max(dt, 1e-9)
            self.last = {k: round(v, 6) for k, v in avg.items()}
            row = {"phase": self.phase, "step": self.step, "loss": f"{avg['loss']:.6f}",
                   "rec": f"{avg['rec']:.6f}" if "rec" in avg else "", "kl": f"{avg['kl']:.4f}" if "kl" in avg else "",
                   "lr": f"{float(self.lr_fn(self.step)):.3e}", "grad_norm": f"{avg['gnorm']:.4f}",
                   "images_per_s": "" if final else f"{ips:.1f}",
                   "train_seconds": f"{self.prev_seconds + time.time() - self.t_start:.1f}",
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self.pending.append(row)
            extra = "".join(f"  {k} {avg[k]:.5f}" for k in ("rec", "kl") if k in avg)
            print(f"{self.phase} step {self.step:6d}/{a.steps}  loss {avg['loss']:.5f}{extra}  |g| {avg['gnorm']:.3f}"
                  f"  {dt / len(window):.3f} s/step  {ips:.1f} img/s", flush=True)
            if not np.isfinite(avg["loss"]):
                raise FloatingPointError(f"non-finite loss at step {self.step}; last saved state is kept")
            window, t_win = [], time.time()

        while self.step < a.steps and not stop["flag"]:
            if a.max_minutes and time.time() - self.t_start > 60 * a.max_minutes:
                print(f"--max-minutes {a.max_minutes} reached at step {self.step}", flush=True)
                break
            e = self.step // self.steps_per_epoch
            if e != epoch:
                epoch, perm = e, epoch_perm(e)
            self.params, self.ema, self.opt_state, m = train_step(self.params, self.ema, self.opt_state,
                                                                  jnp.int32(self.step), perm)
            self.step += 1
            window.append(m)
            if self.step % a.log_every == 0 or self.step == a.steps:
                flush_window()
            if time.time() - last_save > 60 * a.save_minutes:
                self.save()
                last_save = time.time()
        if window:
            flush_window(final=True)
        extra_files = finish(self) if finish is not None else None
        self.save(extra_files)
        print(f"{self.phase} done at step {self.step} ({(time.time() - self.t_start) / 60:.1f} min this run)",
              flush=True)
        return 0


def make_opt(a):
    lr_fn = optax.join_schedules([optax.linear_schedule(0.0, a.lr, max(a.warmup, 1)), optax.constant_schedule(a.lr)],
                                 [max(a.warmup, 1)])
    opt = optax.chain(optax.clip_by_global_norm(a.clip),
                      optax.adamw(lr_fn, b1=0.9, b2=0.999, weight_decay=a.weight_decay))
    return opt, lr_fn


def phase_keys(a, phase):
    return jax.random.split(jax.random.fold_in(jax.random.PRNGKey(a.seed), PHASE_ID[phase]), 3)


def train_ae(a) -> int:
    cfg = ae_config(a)
    x_train = jnp.asarray(to_model_range(load_digits("train")[0]))
    n = x_train.shape[0]
    k_step, k_data, k_init = phase_keys(a, "ae")
    opt, lr_fn = make_opt(a)
    tr = Trainer(a, "ae", cfg.to_dict(), init_autoencoder_params(k_init, cfg), opt, lr_fn, n)
    tr.maybe_resume()
    print(f"AE {cfg.to_dict()}\n{count_params(tr.params) / 1e6:.3f}M parameters, backend {jax.default_backend()}, "
          f"{tr.steps_per_epoch} steps/epoch", flush=True)

    def loss_fn(p, x, key):
        mean, logvar = autoencoder_encode_moments(cfg, p, x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        rec = jnp.mean(jnp.square(autoencoder_decode(cfg, p, z) - x))
        kl = jnp.mean(0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar))
        return rec + a.beta * kl, (rec, kl)

    @jax.jit
    def train_step(params, ema, opt_state, step, perm):
        i = step % tr.steps_per_epoch
        x = x_train[jax.lax.dynamic_slice_in_dim(perm, i * a.batch, a.batch)]
        (loss, (rec, kl)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, jax.random.fold_in(k_step, step))
        gnorm = optax.global_norm(g)
        upd, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, upd)
        return params, params, opt_state, {"loss": loss, "rec": rec, "kl": kl, "gnorm": gnorm}

    def finish(t):
        """The latent scale factor (1 / std of the posterior means over the train split)."""
        t0 = time.time()
        mu = latent_means(cfg, t.params, x_train)
        std = float(np.std(mu))
        stats = {"ae_step": t.step, "latent_mean": float(np.mean(mu)), "latent_std": std, "scaling_factor": 1.0 / std,
                 "per_channel_std": [float(s) for s in np.std(mu, axis=(0, 1, 2))]}
        print(f"latent stats {stats} ({time.time() - t0:.1f} s)", flush=True)
        write_latent_cache(a, (mu * stats["scaling_factor"]).astype(np.float32), t.step, stats["scaling_factor"])
        return {"scale.json": json.dumps(stats, indent=2) + "\n"}

    return tr.run(train_step, k_data, finish=None if a.bench else finish)


def encoded_train_set(a):
    """(latents [N, 8, 8, 4] scaled, ae info) of the train split under the saved autoencoder, cached."""
    cfg, params, saved, _ = load_ae_state(a)
    with open(os.path.join(a.state_dir, "ae", "scale.json")) as f:
        scale = json.load(f)
    if scale["ae_step"] != saved["step"]:
        raise SystemExit(f"{a.state_dir}/ae: scale.json is for step {scale['ae_step']}, the state is at step "
                         f"{saved['step']}")
    info = {"ae_step": int(saved["step"]), "scaling_factor": float(scale["scaling_factor"])}
    cache = os.path.join(a.state_dir, "unet_latents.npz")
    if os.path.exists(cache):
        with np.load(cache) as z:
            if int(z["ae_step"]) == info["ae_step"] and float(z["scaling_factor"]) == info["scaling_factor"]:
                print(f"latents from {cache}", flush=True)
                return z["latents"], info
    t0 = time.time()
    mu = latent_means(cfg, params, to_model_range(load_digits("train")[0]))
    lat = (mu * info["scaling_factor"]).astype(np.float32)
    write_latent_cache(a, lat, info["ae_step"], info["scaling_factor"])
    print(f"encoded {lat.shape} train latents in {time.time() - t0:.1f} s (std {lat.std():.3f})", flush=True)
    return lat, info


def write_latent_cache(a, latents, ae_step, scaling_factor):
    """``<state-dir>/unet_latents.npz``: the scaled train latents of autoencoder step ``ae_step`` (atomic)."""
    cache = os.path.join(a.state_dir, "unet_latents.npz")
    tmp = cache + ".tmp.npz"
    np.savez(tmp, latents=latents, ae_step=int(ae_step), scaling_factor=float(scaling_factor))
    os.replace(tmp, cache)


def train_unet(a) -> int:
    config = unet_config(a)
    lat, ae_info = encoded_train_set(a)
    z_train = jnp.asarray(lat)
    n = z_train.shape[0]
    schedule = make_schedule("linear", T=1000)
    k_step, k_data, k_init = phase_keys(a, "unet")
    opt, lr_fn = make_opt(a)
    tr = Trainer(a, "unet", config.to_dict(), zero_init_outputs(init_adm_params(k_init, config)), opt, lr_fn, n,
                 extra_state={"autoencoder": ae_info})
    tr.maybe_resume()
    print(f"ADM {config.to_dict()}\n{count_params(tr.params) / 1e6:.3f}M parameters, backend "
          f"{jax.default_backend()}, {tr.steps_per_epoch} steps/epoch", flush=True)

    step = ddpm_train_step(lambda p, zt, t: adm_apply(config, p, zt, t), opt, z_train, batch=a.batch,
                           steps_per_epoch=tr.steps_per_epoch, alpha_bar=schedule.alpha_bar_ext[1:], ema=a.ema,
                           key=k_step)

    def train_step(params, ema, opt_state, step_i, perm):
        params, ema, opt_state, loss, gnorm = step(params, ema, opt_state, step_i, perm)
        return params, ema, opt_state, {"loss": loss, "gnorm": gnorm}

    return tr.run(train_step, k_data)


# ================================================================================================= export


def export(a) -> int:
    import mapreps_jax as mr

    t_all = time.time()
    cfg0, ae_params, ae_saved, _ = load_ae_state(a)
    with open(os.path.join(a.state_dir, "ae", "scale.json")) as f:
        scale = json.load(f)
    ud = os.path.join(a.state_dir, "unet")
    with open(os.path.join(ud, "config.json")) as f:
        unet_saved = json.load(f)
    if unet_saved["autoencoder"] != {"ae_step": ae_saved["step"], "scaling_factor": scale["scaling_factor"]}:
        raise SystemExit(f"the UNet was trained on the latents of {unet_saved['autoencoder']}, the autoencoder "
                         f"state is at step {ae_saved['step']} (scale {scale['scaling_factor']}): retrain the UNet")
    ae_cfg = AutoencoderConfig.from_dict(dict(cfg0.to_dict(), scaling_factor=scale["scaling_factor"]))
    u_cfg = ADMConfig.from_dict(unet_saved["net"])
    ema = restore_pytree(ud)["ema"]
    dst = os.path.join(a.out, "latent")
    save_latent(dst, kind="digits-latent", unet_config=u_cfg, unet_params=ema, ae_config=ae_cfg,
                ae_params=jax.tree_util.tree_map(np.asarray, ae_params), schedule=SCHEDULE,
                sources={"digits.npz": sha256_of(DIGITS_NPZ)}, ema=True, overwrite=True)
    print(f"wrote {dst}", flush=True)

    # ---- quick quality numbers on the TEST split, through the exported checkpoint
    t0 = time.time()
    m = mr.load_model(dst)
    x_test = to_model_range(load_digits("test")[0])
    enc = jax.jit(lambda x: m.encode(x))
    dec = jax.jit(lambda z: m.decode(z))
    z_test = batched(enc, x_test)
    x_rec = batched(dec, z_test)
    rec_psnr = psnr01(x_rec, x_test)
    quality = {"split": "test", "n_images": int(len(x_test)),
               "ae_recon_psnr_db": {"mean": float(rec_psnr.mean()), "median": float(np.median(rec_psnr)),
                                    "min": float(rec_psnr.min())},
               "ae_recon_mse_model_range": float(np.mean(np.square(np.clip(x_rec, -1, 1) - x_test))),
               "test_latent_std": float(z_test.std()), "test_latent_mean": float(z_test.mean())}
    ab = np.asarray(m.schedule.alpha_bar_ext[1:])
    eps_fn = jax.jit(lambda z, t: m.eps(z, t))
    key = jax.random.PRNGKey(1234)
    tweedie = []
    for t in (100, 400):
        noise = np.asarray(jax.random.normal(jax.random.fold_in(key, t), z_test.shape, jnp.float32))
        a_t = float(ab[t])
        zt = math.sqrt(a_t) * z_test + math.sqrt(1 - a_t) * noise
        tt = np.full((len(zt),), t, np.int32)
        e_hat = np.concatenate([np.asarray(eps_fn(zt[i:i + 250], tt[i:i + 250])) for i in range(0, len(zt), 250)])
        z0_hat = (zt - math.sqrt(1 - a_t) * e_hat) / math.sqrt(a_t)
        z_naive = zt / math.sqrt(a_t)  # the noisy latent, rescaled (no denoising)
        x_hat = batched(dec, z0_hat.astype(np.float32))
        x_naive = batched(dec, z_naive.astype(np.float32))
        tweedie.append({"t": t, "latent_noise_std": math.sqrt((1 - a_t) / a_t),
                        "eps_mse": float(np.mean(np.square(e_hat - noise))),
                        "latent_mse_denoised": float(np.mean(np.square(z0_hat - z_test))),
                        "latent_mse_noisy": float(np.mean(np.square(z_naive - z_test))),
                        "psnr_db_tweedie_decoded": float(psnr01(x_hat, x_test).mean()),
                        "psnr_db_noisy_decoded": float(psnr01(x_naive, x_test).mean())})
        print(f"t={t}: {tweedie[-1]}", flush=True)
    quality["tweedie_one_step"] = tweedie
    try:  # unconditional DDIM samples (eta 0, 50 steps) scored by the bundled digit classifier's features
        from mapreps_jax.app.perception import digit_accuracy, digit_fd

        quality["classifier_accuracy_ae_recon"] = float(digit_accuracy(jnp.asarray(np.clip(x_rec, -1, 1)),
                                                                       load_digits("test")[1]))
        n_s, K = 64, 50
        ts = np.linspace(999, 0, K).round().astype(int)
        z = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (n_s, 8, 8, 4), jnp.float32))
        for i, t in enumerate(ts):
            a_t = float(ab[t])
            a_p = float(ab[ts[i + 1]]) if i + 1 < K else 1.0
            e = np.asarray(eps_fn(z, np.full((n_s,), t, np.int32)))
            z0 = (z - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
            z = (math.sqrt(a_p) * z0 + math.sqrt(1 - a_p) * e).astype(np.float32)
        xs = np.clip(batched(dec, z), -1, 1)
        train = to_model_range(load_digits("train")[0])
        idx = np.random.default_rng(0).choice(len(train), n_s, replace=False)
        quality["ddim_samples"] = {"n": n_s, "steps": K, "eta": 0.0,
                                   "digit_fd_samples": float(digit_fd(jnp.asarray(xs))),
                                   "digit_fd_train_same_n": float(digit_fd(jnp.asarray(train[idx]))),
                                   "digit_fd_ae_recon_test_same_n": float(digit_fd(jnp.asarray(
                                       np.clip(x_rec[:n_s], -1, 1)))),
                                   "note": "digit-FD to the held-out digits (features of the bundled classifier)"}
        np.save("/tmp/latent_samples.npy", xs)
    except Exception as e:  # noqa: BLE001 (quality extras must not block the export)
        quality["ddim_samples_error"] = f"{type(e).__name__}: {e}"
    quality["eval_seconds"] = round(time.time() - t0, 1)
    print(f"quality {json.dumps(quality)}", flush=True)

    with open(os.path.join(a.state_dir, "ae", "config.json")) as f:
        ae_state_cfg = json.load(f)

    def size(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)

    info = {
        "checkpoint": "checkpoints/default/latent", "kind": "digits-latent", "format": "mapreps-latent",
        "load": "mapreps_jax.load_model('checkpoints/default/latent')",
        "data": "mapreps_jax/app/data/digits.npz train split (4500 MNIST digits, 32x32x1, [-1, 1])",
        "sources": {"digits.npz": sha256_of(DIGITS_NPZ)},
        "autoencoder": {"config": ae_cfg.to_dict(), "n_params": count_params(ae_params),
                        "objective": "mean (D(z) - x)^2 + beta * mean KL(q(z|x) || N(0, I)), z a posterior sample",
                        "training": ae_state_cfg["training"], "steps": ae_state_cfg["step"],
                        "train_seconds": ae_state_cfg["train_seconds"], "final_window": ae_state_cfg["last"],
                        "latent_stats": scale},
        "unet": {"arch": "adm", "config": u_cfg.to_dict(), "n_params": count_params(ema),
                 "objective": "DDPM epsilon MSE, linear 1000-step schedule, EMA weights exported",
                 "training": unet_saved["training"], "steps": unet_saved["step"],
                 "train_seconds": unet_saved["train_seconds"], "final_window": unet_saved["last"]},
        "schedule": SCHEDULE, "prediction_type": "epsilon",
        "quality": quality, "checkpoint_bytes": size(dst),
        "script": "scripts/train_digits_latent.py", "state_dir": "runs/digits_latent (git-ignored)",
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_text_atomic(os.path.join(a.out, "latent.json"), json.dumps(info, indent=2) + "\n")
    print(f"wrote {os.path.join(a.out, 'latent.json')} ({time.time() - t_all:.1f} s)", flush=True)
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.export:
        return export(a)
    return train_ae(a) if a.phase == "ae" else train_unet(a)


if __name__ == "__main__":
    sys.exit(main())
