"""grey-W1, the demo's perception index at a few digits (``mapreps_jax.app.perception.grey_w1``)."""

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from mapreps_jax.app.datasets import load_digits, to_model_range
from mapreps_jax.app.perception import grey_levels, grey_w1, heldout_grey_levels, wasserstein1_1d


def test_grey_levels_by_hand():
    x = np.stack([np.ones((4, 4, 1)), -np.ones((4, 4, 1)), np.zeros((4, 4, 1)), np.full((4, 4, 1), 0.5),
                  np.full((4, 4, 1), 3.0)])  # 3.0 is clipped to 1
    np.testing.assert_allclose(grey_levels(x), [0.0, 0.0, 1.0, 0.75, 0.0])
    with pytest.raises(ValueError, match="finite"):
        grey_levels(np.full((1, 2, 2, 1), np.nan))
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        grey_levels(np.zeros((2, 2)))


@pytest.mark.parametrize("n,m,seed", [(1, 1, 0), (16, 500, 1), (7, 9, 2)])
def test_wasserstein1_matches_scipy(n, m, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.gamma(2.0, size=m)
    assert wasserstein1_1d(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-12, abs=1e-15)
    assert wasserstein1_1d(a, a) == 0.0
    assert wasserstein1_1d(a, a + 0.25) == pytest.approx(0.25, rel=1e-12)  # a shift moves it by the shift


def test_grey_w1_value_and_jackknife():
    rng = np.random.default_rng(3)
    x = np.tanh(2 * rng.normal(size=(9, 32, 32, 1)))
    v, se = grey_w1(x)
    g, r = grey_levels(x), heldout_grey_levels()
    assert v == pytest.approx(wasserstein_distance(g, r), rel=1e-12)
    loo = [wasserstein_distance(np.delete(g, i), r) for i in range(9)]  # the literal leave-one-out
    assert se == pytest.approx(np.sqrt(8 / 9 * np.sum((np.array(loo) - np.mean(loo)) ** 2)), rel=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        grey_w1(x[:1])


def test_blur_raises_grey_w1_and_held_out_digits_score_near_zero():
    """16 held-out digits score near 0 (their small-set bias); the same digits blurred score far above, by many
    standard errors: the index resolves blur at 16 images."""
    x = to_model_range(load_digits("test")[0][:16]).astype(np.float64)
    clean, clean_se = grey_w1(x)
    k = np.array([1, 4, 6, 4, 1], np.float64)
    k /= k.sum()
    pad = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    blur = sum(k[i] * pad[:, i:i + 32, 2:34] for i in range(5))
    blur = sum(k[j] * np.pad(blur, ((0, 0), (0, 0), (2, 2), (0, 0)), mode="edge")[:, :, j:j + 32] for j in range(5))
    b, b_se = grey_w1(blur)
    assert clean < 0.01
    assert b - clean > 4 * np.hypot(b_se, clean_se)
