#!/usr/bin/env python
"""Train the bundled digits diffusion prior (the library's ADM UNet, small configuration) on the train split.

Objective (DDPM, epsilon prediction): for a batch of digits ``x0`` in [-1, 1], ``t ~ U{0, ..., T-1}``,
``eps ~ N(0, I)``, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``a_t = alpha_bar(t)`` of the linear 1000-step
schedule (``mapreps_jax.diffusion.make_schedule("linear")``), minimise ``mean ||eps_theta(x_t, t) - eps||^2``.
AdamW with linear warm-up then a constant rate, global-norm gradient clipping, EMA of the weights (decay
``min(ema, (1 + step) / (10 + step))``). No flips or other augmentation (digits are not mirror symmetric).

Determinism: ``(k_step, k_data, k_init) = split(PRNGKey(seed), 3)``; every random draw of step ``s`` comes from
``fold_in(k_step, s)`` and the data order of epoch ``e`` from ``fold_in(k_data, e)``, so a run interrupted and resumed follows the same trajectory as an
uninterrupted one (up to floating-point nondeterminism of the platform).

Outputs (all written atomically: temporary directory + rename):

* ``--state-dir`` (default ``runs/digits_diffusion/state``, git-ignored): full training state for ``--resume``
  (params, EMA params, optimiser state, step, seed, config);
* ``--out`` (default ``checkpoints/default``): ``diffusion/`` (EMA params only + ``info.json``), ``config.json``
  (ADM config, schedule, training settings) and ``train_log.csv`` (step, loss, lr, ...; appended).

Both are refreshed every ``--save-minutes`` minutes, at the end, and on SIGTERM/SIGINT.

Examples::

    python scripts/train_digits_diffusion.py --steps 10000                # fresh run (refuses to overwrite a state)
    python scripts/train_digits_diffusion.py --steps 20000 --resume       # continue up to step 20000
    python scripts/train_digits_diffusion.py --bench 5                    # time 5 train steps and exit

A snapshot of the full state is committed at ``checkpoints/default/train_state`` (a fresh clone has no ``runs/``):
continue from it with ``--state-dir checkpoints/default/train_state --resume`` (or copy it to the default
``--state-dir`` first).

The same command runs on CPU or GPU (JAX picks the device).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import serialization  # noqa: E402

from mapreps_jax.app.datasets import load_digits, to_model_range  # noqa: E402
from mapreps_jax.app.training import ddpm_train_step  # noqa: E402
from mapreps_jax.diffusion import make_schedule  # noqa: E402
from mapreps_jax.networks.adm import ADMConfig, adm_apply, count_params, init_adm_params  # noqa: E402
from mapreps_jax.checkpoint_io import (default_checkpoint_dir, restore_pytree, save_pytree,  # noqa: E402
                                       write_text_atomic)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "images_per_s", "train_seconds", "time"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10000, help="train until this global step")
    p.add_argument("--resume", action="store_true", help="continue from --state-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-minutes", type=float, default=5.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--state-dir", default=os.path.join(REPO, "runs", "digits_diffusion", "state"))
    p.add_argument("--out", default=default_checkpoint_dir())
    # network (ADMConfig fields)
    p.add_argument("--model-channels", type=int, default=32)
    p.add_argument("--channel-mult", default="1,2,2")
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--attention-resolutions", default="8")
    p.add_argument("--num-head-channels", type=int, default=32)
    p.add_argument("--num-groups", type=int, default=16)
    p.add_argument("--bench", type=int, default=0, help="time this many train steps (after compilation) and exit")
    return p.parse_args(argv)


def make_config(a) -> ADMConfig:
    return ADMConfig(image_size=32, in_channels=1, out_channels=1, model_channels=a.model_channels,
                     num_res_blocks=a.num_res_blocks,
                     attention_resolutions=tuple(int(r) for r in a.attention_resolutions.split(",") if r),
                     channel_mult=tuple(int(m) for m in a.channel_mult.split(",")), num_heads=4,
                     num_head_channels=a.num_head_channels, use_scale_shift_norm=True, resblock_updown=True,
                     learn_sigma=False, num_groups=a.num_groups)


def zero_init_outputs(params):
    """Zero the last conv of every residual branch and the output conv (guided-diffusion's ``zero_module``), so the
    network starts as a near-identity stack with zero output."""

    def f(path, x):
        names = [getattr(k, "key", str(k)) for k in path]
        if ("out_layers_3" in names or "out_2" in names or "proj_out" in names) and names[-1] in ("kernel", "bias"):
            return jnp.zeros_like(x)
        return x

    return jax.tree_util.tree_map_with_path(f, params)



def stop_on_signals() -> dict:
    """``{"flag": False}``, set to True by SIGTERM / SIGINT: the training loop saves and stops at the next step."""
    stop = {"flag": False}

    def on_signal(signum, frame):
        print(f"signal {signum}: saving and stopping", flush=True)
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def main(argv=None) -> int:
    a = parse_args(argv)
    config = make_config(a)
    schedule = make_schedule("linear", T=1000)
    T = schedule.T

    x_train = jnp.asarray(to_model_range(load_digits("train")[0]))
    n = x_train.shape[0]
    steps_per_epoch = n // a.batch

    lr_fn = optax.join_schedules([optax.linear_schedule(0.0, a.lr, max(a.warmup, 1)), optax.constant_schedule(a.lr)],
                                 [max(a.warmup, 1)])
    opt = optax.chain(optax.clip_by_global_norm(a.clip), optax.adamw(lr_fn, b1=0.9, b2=0.999,
                                                                     weight_decay=a.weight_decay))
    train_settings = {k: getattr(a, k) for k in ("seed", "batch", "lr", "warmup", "weight_decay", "clip", "ema")}

    base_key, data_key, init_key = jax.random.split(jax.random.PRNGKey(a.seed), 3)

    params = zero_init_outputs(init_adm_params(init_key, config))
    ema = params
    opt_state = opt.init(params)
    step = 0
    prev_seconds = 0.0  # training wall time of earlier runs (cumulative "train_seconds" in the log)

    # ---------------------------------------------------------------- resume
    state_exists = os.path.isdir(os.path.join(a.state_dir, "tree"))
    if a.resume and state_exists:
        st = restore_pytree(a.state_dir)
        with open(os.path.join(a.state_dir, "config.json")) as f:
            saved_cfg = json.load(f)
        if saved_cfg["adm"] != config.to_dict() or saved_cfg["training"] != train_settings:
            raise ValueError(f"--resume: the saved state was trained with {saved_cfg}, the command line asks for "
                             f"adm={config.to_dict()}, training={train_settings}")
        params = serialization.from_state_dict(params, st["params"])
        ema = serialization.from_state_dict(ema, st["ema"])
        opt_state = serialization.from_state_dict(opt_state, st["opt_state"])
        params, ema, opt_state = jax.tree_util.tree_map(jnp.asarray, (params, ema, opt_state))
        step = int(st["step"])
        prev_seconds = float(st.get("train_seconds", 0.0))
        print(f"resumed from {a.state_dir} at step {step}", flush=True)
    elif a.resume:
        print(f"--resume: no state at {a.state_dir}, starting from scratch", flush=True)
    elif state_exists and not a.bench:
        raise SystemExit(f"a training state exists at {a.state_dir}: pass --resume to continue it, or remove it")

    n_params = count_params(params)
    print(f"ADM {config.to_dict()}\n{n_params / 1e6:.3f}M parameters, backend {jax.default_backend()}, "
          f"{steps_per_epoch} steps/epoch", flush=True)

    # ---------------------------------------------------------------- step
    train_step = ddpm_train_step(lambda p, xt, t: adm_apply(config, p, xt, t), opt, x_train, batch=a.batch,
                                 steps_per_epoch=steps_per_epoch, alpha_bar=schedule.alpha_bar_ext[1:], ema=a.ema,
                                 key=base_key)  # alpha_bar[t], t = 0..T-1

    def epoch_perm(e):
        return jax.random.permutation(jax.random.fold_in(data_key, e), n)

    # ---------------------------------------------------------------- bench
    if a.bench:
        perm = epoch_perm(0)
        t0 = time.time()
        out = train_step(params, ema, opt_state, jnp.int32(0), perm)
        jax.block_until_ready(out)
        print(f"compile + first step {time.time() - t0:.1f} s", flush=True)
        p_, e_, o_ = out[:3]
        t0 = time.time()
        for s in range(1, a.bench + 1):
            p_, e_, o_, loss, _ = train_step(p_, e_, o_, jnp.int32(s), perm)
        jax.block_until_ready(loss)
        dt = (time.time() - t0) / a.bench
        print(f"BENCH {n_params / 1e6:.3f}M params: {dt:.3f} s/step, {a.batch / dt:.1f} images/s "
              f"(batch {a.batch}); 10k steps ~ {dt * 1e4 / 3600:.2f} h", flush=True)
        return 0

    # ---------------------------------------------------------------- save / log
    cfg_json = {
        "adm": config.to_dict(), "schedule": "linear", "T": T, "prediction": "epsilon",
        "data": "mapreps_jax/app/data/digits.npz train split (4500 MNIST digits, 32x32x1, [-1, 1])",
        "n_params": n_params, "training": train_settings,
        "script": "scripts/train_digits_diffusion.py",
    }
    log_path = os.path.join(a.out, "train_log.csv")
    pending_log: list = []

    def truncate_log(upto_step):
        """Drop log rows beyond the restored step (written by a run that died before its next save)."""
        if not os.path.exists(log_path):
            return
        with open(log_path) as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["step"]) <= upto_step]
        if len(keep) != len(rows):
            text = ",".join(LOG_FIELDS) + "\n" + "".join(",".join(r[k] for k in LOG_FIELDS) + "\n" for r in keep)
            write_text_atomic(log_path, text)

    def save(step, last_loss):
        nonlocal pending_log
        t0 = time.time()
        cfg = dict(cfg_json, step=step)
        save_pytree(a.state_dir, {
            "params": serialization.to_state_dict(params), "ema": serialization.to_state_dict(ema),
            "opt_state": serialization.to_state_dict(opt_state), "step": np.int64(step),
            "train_seconds": np.float64(prev_seconds + time.time() - t_start),
        }, extra_files={"config.json": json.dumps({"adm": config.to_dict(), "training": train_settings})})
        info = {"step": step, "ema_decay": a.ema, "loss_ema": last_loss, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
        save_pytree(os.path.join(a.out, "diffusion"), {"params": ema},
                    extra_files={"info.json": json.dumps(info, indent=2) + "\n"})
        write_text_atomic(os.path.join(a.out, "config.json"), json.dumps(cfg, indent=2) + "\n")
        new = not os.path.exists(log_path)
        with open(log_path, "a") as f:
            if new:
                f.write(",".join(LOG_FIELDS) + "\n")
            for r in pending_log:
                f.write(",".join(str(r[k]) for k in LOG_FIELDS) + "\n")
        pending_log = []
        print(f"saved step {step} ({time.time() - t0:.1f} s)", flush=True)

    os.makedirs(a.out, exist_ok=True)
    truncate_log(step)

    stop = stop_on_signals()

    # ---------------------------------------------------------------- loop
    t_start = time.time()
    last_save = time.time()
    window, gwin = [], []
    loss_ema = float("nan")
    t_win = time.time()
    epoch = step // steps_per_epoch
    perm = epoch_perm(epoch)
    while step < a.steps and not stop["flag"]:
        e = step // steps_per_epoch
        if e != epoch:
            epoch, perm = e, epoch_perm(e)
        params, ema, opt_state, loss, gnorm = train_step(params, ema, opt_state, jnp.int32(step), perm)
        step += 1
        window.append(loss)
        gwin.append(gnorm)
        if step % a.log_every == 0 or step == a.steps:
            lw = float(np.mean(jax.device_get(window)))
            gw = float(np.mean(jax.device_get(gwin)))
            loss_ema = lw if np.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * lw
            dt = time.time() - t_win
            ips = len(window) * a.batch / max(dt, 1e-9)
            pending_log.append({"step": step, "loss": f"{lw:.6f}", "lr": f"{float(lr_fn(step)):.3e}",
                                "grad_norm": f"{gw:.4f}", "images_per_s": f"{ips:.1f}",
                                "train_seconds": f"{prev_seconds + time.time() - t_start:.1f}",
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            print(f"step {step:6d}/{a.steps}  loss {lw:.4f} (ema {loss_ema:.4f})  |g| {gw:.3f}  "
                  f"{dt / len(window):.3f} s/step  {ips:.1f} img/s", flush=True)
            if not np.isfinite(lw):
                raise FloatingPointError(f"non-finite loss at step {step}; last saved state is kept")
            window, gwin, t_win = [], [], time.time()
        if time.time() - last_save > 60 * a.save_minutes:
            save(step, loss_ema)
            last_save = time.time()
    if window:  # partial window since the last log line
        pending_log.append({"step": step, "loss": f"{float(np.mean(jax.device_get(window))):.6f}",
                            "lr": f"{float(lr_fn(step)):.3e}", "grad_norm": f"{float(np.mean(jax.device_get(gwin))):.4f}",
                            "images_per_s": "", "train_seconds": f"{prev_seconds + time.time() - t_start:.1f}",
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    save(step, loss_ema)
    print(f"done at step {step} ({(time.time() - t_start) / 60:.1f} min this run)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
