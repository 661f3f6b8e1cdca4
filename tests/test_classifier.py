"""The bundled digit classifier (checkpoints/default/classifier) and digit-FD (mapreps_jax.app.perception)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapreps_jax.app import perception as P
from mapreps_jax.app.datasets import load_digits, to_model_range
from mapreps_jax.app import classifier as C
from mapreps_jax.app.pretrained import load_classifier, load_default_prior
from mapreps_jax.checkpoint_io import default_checkpoint_dir, replace_dir_atomic, restore_pytree, save_pytree


@pytest.fixture(scope="module")
def heldout():
    x, y = load_digits("test")
    return jnp.asarray(to_model_range(x)), np.asarray(y)


@pytest.fixture(scope="module")
def heldout_feats(heldout):
    return P.digit_features(heldout[0])


def _blur(x, sigma=1.5):
    r = np.arange(-4, 5)
    k = np.exp(-0.5 * (r / sigma) ** 2)
    k = jnp.asarray(k / k.sum(), jnp.float32)
    # separable Gaussian blur of [-1, 1] images with the background value -1 as padding
    y = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), constant_values=-1.0)
    y = sum(k[i] * y[:, i:i + 32, :, :] for i in range(9))
    return sum(k[i] * y[:, :, i:i + 32, :] for i in range(9))


def test_heldout_accuracy_at_least_97_percent(heldout):
    x, y = heldout
    acc = P.digit_accuracy(x, y)
    assert acc >= 0.97, acc
    # the number recorded next to the checkpoint is the one the checkpoint gives
    with open(os.path.join(default_checkpoint_dir(), "classifier.json")) as f:
        info = json.load(f)
    assert abs(info["heldout_accuracy"] - acc) <= 1.0 / len(y) + 1e-9


def test_checkpoint_loads_without_training_code_and_matches_module():
    params = load_classifier()
    ref = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), C.init_classifier_params(jax.random.PRNGKey(0)))
    got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
    assert got == ref


def test_features_deterministic_jitted_once_and_batch_independent(heldout):
    x = heldout[0]
    P.digit_features(x[:3])  # warm up
    size = P._features_and_logits_jit._cache_size()
    f300 = P.digit_features(x[:300])  # padded to 2 fixed-size batches: no new compilation
    f7 = P.digit_features(x[:7])
    assert P._features_and_logits_jit._cache_size() == size
    np.testing.assert_array_equal(np.asarray(P.digit_features(x[:300])), np.asarray(f300))  # deterministic
    # per-image features do not depend on the batch they were computed in (padding, chunking)
    np.testing.assert_allclose(np.asarray(f7), np.asarray(f300[:7]), rtol=1e-5, atol=1e-5)
    # against the un-jitted module applied directly
    direct = C.features(jax.tree_util.tree_map(jnp.asarray, load_classifier()), x[:7])
    np.testing.assert_allclose(np.asarray(f7), np.asarray(direct), rtol=1e-4, atol=1e-4)
    assert f300.shape == (300, C.FEATURE_DIM) and f300.dtype == jnp.float32


def test_frechet_matches_closed_form_and_independent_route():
    rng = np.random.default_rng(0)
    # commuting (diagonal) covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(P._frechet(mu1, np.diag(a), mu2, np.diag(b)), want, rtol=1e-10)
    # general covariances: Tr (S1 S2)^{1/2} from the (real, non-negative) eigenvalues of the non-symmetric S1 S2
    A, B = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = A @ A.T + 0.1 * np.eye(6), B @ B.T + 0.1 * np.eye(6)
    tr = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    np.testing.assert_allclose(P._frechet(mu1, s1, mu2, s2), want, rtol=1e-8)
    assert P._frechet(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # from features: invariant under a common rotation of feature space
    f1, f2 = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) * 1.5 + 0.3
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    np.testing.assert_allclose(P.frechet_distance_from_features(f1 @ q, f2 @ q),
                               P.frechet_distance_from_features(f1, f2), rtol=1e-8)
    # the statistics route used by digit_fd agrees with the generic metrics.frechet_distance on feature sets
    np.testing.assert_allclose(P._frechet(*P.feature_statistics(f1), *P.feature_statistics(f2)),
                               P.frechet_distance_from_features(f1, f2), rtol=1e-8)


def test_digit_fd_separates_real_digits_from_noise_and_blur(heldout, heldout_feats):
    x = heldout[0]
    perm = np.asarray(jax.random.permutation(jax.random.PRNGKey(0), x.shape[0]))
    h1, h2 = perm[:250], perm[250:]
    fd_halves = P.digit_fd(x[h1], heldout_feats[h2])
    noise = jnp.clip(jax.random.normal(jax.random.PRNGKey(1), (250, 32, 32, 1)) * 0.5, -1, 1)
    fd_noise = P.digit_fd(noise, heldout_feats[h2])
    fd_blur = P.digit_fd(_blur(x[h1]), heldout_feats[h2])
    # same set sizes everywhere (digit-FD is biased upwards for small sets)
    assert fd_halves < fd_blur / 3, (fd_halves, fd_blur)
    assert fd_blur < fd_noise, (fd_blur, fd_noise)
    # a noisy copy of real digits is further than the clean other half, but closer than pure noise
    noisy = x[h1] + 0.3 * jax.random.normal(jax.random.PRNGKey(2), x[h1].shape)
    fd_noisy = P.digit_fd(noisy, heldout_feats[h2])
    assert fd_halves < fd_noisy < fd_noise, (fd_halves, fd_noisy, fd_noise)


def test_digit_fd_reference_forms_agree(heldout, heldout_feats):
    x = heldout[0][:250]
    d_default = P.digit_fd(x)  # cached held-out statistic
    d_images = P.digit_fd(x, heldout[0])
    d_feats = P.digit_fd(x, heldout_feats)
    d_stats = P.digit_fd(x, P.heldout_statistics())
    np.testing.assert_allclose([d_images, d_feats, d_stats], d_default, rtol=1e-6)
    assert d_default >= 0.0


def test_bad_inputs(heldout):
    x = heldout[0]
    with pytest.raises(ValueError, match="images"):
        P.digit_features(x[:, :28, :28])
    with pytest.raises(TypeError, match="images"):
        P.digit_features(np.zeros((2, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match="finite"):
        P.digit_features(x[:2].at[0, 0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="ref"):
        P.digit_fd(x[:10], np.zeros((10, 7)))
    with pytest.raises(ValueError, match="feats"):
        P.digit_fd(x[:1])
    with pytest.raises(ValueError, match="labels"):
        P.digit_accuracy(x[:10], np.zeros(9))


def test_checkpoint_io_round_trip_and_atomic_replace(tmp_path):
    tree = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "n": np.int64(7)}
    d = str(tmp_path / "ck")
    save_pytree(d, tree, extra_files={"info.json": "{}"})
    save_pytree(d, jax.tree_util.tree_map(lambda v: v + 1, tree))  # replaces the old one
    got = restore_pytree(d)
    np.testing.assert_array_equal(got["a"]["w"], tree["a"]["w"] + 1)
    assert int(got["n"]) == 8 and not os.path.exists(os.path.join(d, "info.json"))
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directories left behind
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_text("new")
    replace_dir_atomic(str(src), d)
    assert (tmp_path / "ck" / "x").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["ck"]
    with pytest.raises(ValueError, match="src"):
        replace_dir_atomic(str(tmp_path / "missing"), d)


def test_default_prior_checkpoint_loads():
    """The bundled diffusion prior (written by scripts/train_digits_diffusion.py) loads into a ScoreModel."""
    root = default_checkpoint_dir()
    if not os.path.isdir(os.path.join(root, "diffusion")):
        pytest.skip("no diffusion checkpoint yet")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(root, "diffusion"))
               for f in fs)
    assert size < 20e6
    with open(os.path.join(root, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["schedule"] == "linear" and cfg["T"] == 1000 and cfg["prediction"] == "epsilon"
    model = load_default_prior()
    assert model.T == 1000 and not model.learned_variance
    eps = model.eps(jnp.zeros((2, 32, 32, 1)), jnp.array([10, 900]))
    assert eps.shape == (2, 32, 32, 1) and bool(jnp.all(jnp.isfinite(eps)))
