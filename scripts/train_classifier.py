#!/usr/bin/env python
"""Train the digit classifier behind digit-FD and save it to ``checkpoints/default/classifier`` (orbax).

    python scripts/train_classifier.py [--epochs 15] [--batch 64] [--lr 1e-3] [--seed 0] [--out checkpoints/default]

Data: the bundled train split (4,500 digits); augmentation: random integer translations of up to +-2 pixels
(the 2-pixel zero border makes this a pure shift) - no flips (digits are not mirror symmetric). Optimiser: AdamW,
cosine learning-rate decay with linear warm-up, softmax cross-entropy. Deterministic from ``--seed`` on a given
platform. At the end it reports the accuracy on the 500 held-out digits and digit-FD numbers, and writes
``classifier/`` and ``classifier.json`` atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mapreps_jax.app.datasets import load_digits, to_model_range  # noqa: E402
from mapreps_jax.app import classifier as C  # noqa: E402
from mapreps_jax.checkpoint_io import default_checkpoint_dir, save_pytree, write_text_atomic  # noqa: E402


def shift_batch(key, x, max_shift=2):
    """Translate each image by an integer offset in [-max_shift, max_shift]^2 (zero border, so roll == shift)."""
    s = jax.random.randint(key, (x.shape[0], 2), -max_shift, max_shift + 1)
    return jax.vmap(lambda im, d: jnp.roll(im, (d[0], d[1]), axis=(0, 1)))(x, s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=default_checkpoint_dir())
    a = p.parse_args(argv)

    xtr_u8, ytr = load_digits("train")
    xte_u8, yte = load_digits("test")
    xtr, xte = jnp.asarray(to_model_range(xtr_u8)), jnp.asarray(to_model_range(xte_u8))
    ytr, yte = jnp.asarray(ytr, jnp.int32), jnp.asarray(yte, jnp.int32)
    n = xtr.shape[0]
    steps_per_epoch = n // a.batch
    total = steps_per_epoch * a.epochs

    key = jax.random.PRNGKey(a.seed)
    key, k_init = jax.random.split(key)
    params = C.init_classifier_params(k_init)
    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, max(1, total // 20), total, a.lr * 0.01)
    opt = optax.adamw(sched, weight_decay=a.weight_decay)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, key, xb, yb):
        xb = shift_batch(key, xb)

        def loss_fn(p):
            lg = C.logits(p, xb)
            return optax.softmax_cross_entropy_with_integer_labels(lg, yb).mean(), lg

        (loss, lg), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss, jnp.mean(jnp.argmax(lg, -1) == yb)

    eval_logits = jax.jit(C.logits)

    def accuracy(params, x, y):
        pred = jnp.concatenate([jnp.argmax(eval_logits(params, x[i:i + 500]), -1) for i in range(0, len(x), 500)])
        return float(jnp.mean(pred == y))

    t0 = time.time()
    for ep in range(a.epochs):
        key, k_perm = jax.random.split(key)
        perm = jax.random.permutation(k_perm, n)
        losses, accs = [], []
        for i in range(steps_per_epoch):
            idx = perm[i * a.batch:(i + 1) * a.batch]
            key, k = jax.random.split(key)
            params, opt_state, loss, acc = train_step(params, opt_state, k, xtr[idx], ytr[idx])
            losses.append(float(loss))
            accs.append(float(acc))
        print(f"epoch {ep + 1:3d}/{a.epochs}  loss {np.mean(losses):.4f}  train-batch acc {np.mean(accs):.4f}  "
              f"held-out acc {accuracy(params, xte, yte):.4f}  ({time.time() - t0:.0f} s)", flush=True)

    acc_test = accuracy(params, xte, yte)
    acc_train = accuracy(params, xtr, ytr)

    # digit-FD reference numbers with the new parameters (perception.py computes the same with the saved ones).
    from mapreps_jax.app import perception as P

    f_tr = P.digit_features(xtr, params=params)
    f_te = P.digit_features(xte, params=params)
    fd_train_test = P.frechet_distance_from_features(f_tr, f_te)
    halves = np.asarray(jax.random.permutation(jax.random.PRNGKey(1), xte.shape[0]))
    fd_halves = P.frechet_distance_from_features(f_te[halves[:250]], f_te[halves[250:]])
    print(f"held-out accuracy {acc_test:.4f}  train accuracy {acc_train:.4f}  "
          f"digit-FD(train, held-out) {fd_train_test:.3f}  digit-FD(held-out halves) {fd_halves:.3f}")

    info = {
        "model": "mapreps_jax.app.classifier.DigitClassifier",
        "widths": list(C.DigitClassifier.widths), "feature_dim": C.FEATURE_DIM,
        "n_params": int(sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(params))),
        "heldout_accuracy": acc_test, "train_accuracy": acc_train, "n_heldout": int(xte.shape[0]),
        "digit_fd_train_vs_heldout": fd_train_test, "digit_fd_heldout_halves": fd_halves,
        "training": {"epochs": a.epochs, "batch": a.batch, "lr": a.lr, "weight_decay": a.weight_decay,
                     "seed": a.seed, "augmentation": "random integer shifts in [-2, 2] px",
                     "optimizer": "adamw, warmup + cosine decay", "seconds": round(time.time() - t0, 1),
                     "jax": jax.__version__, "backend": jax.default_backend()},
    }
    os.makedirs(a.out, exist_ok=True)
    save_pytree(os.path.join(a.out, "classifier"), {"params": params})
    write_text_atomic(os.path.join(a.out, "classifier.json"), json.dumps(info, indent=2) + "\n")
    print(f"saved {os.path.join(a.out, 'classifier')} and classifier.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
