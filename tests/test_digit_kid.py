"""digit-KID (mapreps_jax.app.perception.digit_kid / unbiased_mmd2): the unbiased MMD^2 equals a direct double loop
over pairs in float64, its jackknife standard error equals a literal leave-one-out recomputation, and on the bundled
classifier it is about 0 for held-out-like digits and clearly positive for noise."""

import numpy as np
import pytest

from mapreps_jax.app.perception import digit_kid, unbiased_mmd2


def _mmd2_loops(x, y):
    d = x.shape[1]
    k = lambda u, v: (u @ v / d + 1.0) ** 3  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_unbiased_mmd2_equals_pair_loops_and_its_jackknife():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 5)) + 0.3
    y = rng.standard_normal((14, 5))
    val, se = unbiased_mmd2(x, y)
    assert val == pytest.approx(_mmd2_loops(x, y), rel=1e-12)
    loo = np.array([_mmd2_loops(np.delete(x, i, axis=0), y) for i in range(len(x))])
    n = len(x)
    assert se == pytest.approx(np.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2)), rel=1e-10)


def test_unbiased_mmd2_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n >= 3"):
        unbiased_mmd2(np.zeros((2, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="expected feature sets"):
        unbiased_mmd2(np.zeros((5, 4)), np.zeros((5, 3)))


def test_digit_kid_near_zero_for_real_digits_and_large_for_noise():
    from mapreps_jax.app.datasets import load_digits, to_model_range

    x, _ = load_digits("train")
    real = to_model_range(x[:32])                      # training digits: same distribution as the held-out set
    noise = np.random.default_rng(1).uniform(-1, 1, real.shape).astype(np.float32)
    v_real, se_real = digit_kid(real)
    v_noise, se_noise = digit_kid(noise)
    assert se_real > 0 and se_noise > 0
    assert abs(v_real) < 3 * se_real   # unbiased: 0 within its error for same-distribution digits
    assert v_noise > v_real + 5 * (se_noise + se_real)


def test_digit_kid_with_the_cached_reference_term_equals_the_full_formula():
    # digit_kid reuses the held-out set's pair term across calls; the value must be unbiased_mmd2's from scratch
    from mapreps_jax.app.datasets import load_digits, to_model_range
    from mapreps_jax.app.perception import digit_features, heldout_features

    x, _ = load_digits("train")
    imgs = to_model_range(x[40:52])
    for _ in range(2):  # the second call takes the cached term
        assert digit_kid(imgs) == pytest.approx(unbiased_mmd2(np.asarray(digit_features(imgs)), heldout_features()),
                                                rel=1e-12, abs=1e-12)


def test_scores_from_one_batch_pass_equal_scores_of_each_set_alone():
    """The demo scores each method's outputs of all tasks with one classifier pass (``digit_features`` of the whole
    batch, sliced per task): digit-FD and digit-KID from those features equal, to the last bit, the scores of each
    task's images passed alone (each image's features do not depend on the other images of its padded batch)."""
    from mapreps_jax.app.datasets import load_digits, to_model_range
    from mapreps_jax.app.perception import digit_fd, digit_fd_from_features, digit_features, digit_kid_from_features

    x = to_model_range(load_digits("test")[0][:36])
    x = np.concatenate([x[:12], -x[12:24], np.clip(x[24:] * 3.0, -1, 1)])  # three different "methods' outputs"
    feats = np.asarray(digit_features(x))
    for sl in (slice(0, 12), slice(12, 24), slice(24, 36)):
        alone = x[sl]
        np.testing.assert_array_equal(feats[sl], np.asarray(digit_features(alone)))
        assert digit_fd_from_features(feats[sl]) == digit_fd(alone)
        assert digit_kid_from_features(feats[sl]) == digit_kid(alone)
