"""``mapreps restore`` on a bundled digit and on bad inputs (clear errors, no partial output)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from mapreps_jax.cli import main
from mapreps_jax.app.datasets import load_digits


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    x, _ = load_digits("test")
    Image.fromarray(x[3, ..., 0]).save(d / "digit.png")
    Image.fromarray(x[3, ..., 0]).convert("RGB").save(d / "rgb.png")
    Image.fromarray(x[3, :16, :16, 0]).save(d / "small.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    mask = np.full((32, 32), 255, np.uint8)
    mask[10:20, 10:20] = 0
    Image.fromarray(mask).save(d / "mask.png")
    lo = x[3, ::4, ::4, 0]
    Image.fromarray(lo).save(d / "observed8.png")
    return d


def test_restore_simulated_and_observed(digit_png, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["restore", "--task", "inpaint_mask", "--input", str(digit_png / "digit.png"), "--mask",
               str(digit_png / "mask.png"), "--t0", "0,50", "--steps", "5", "--out", str(out)])
    assert rc == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert sorted(os.listdir(out)) == sorted(files) == ["measurement.png", "restored_t0_0.png", "restored_t0_50.png"]
    for f in files:
        im = Image.open(out / f)
        assert im.mode == "L" and im.size == (32, 32)
    # the measurement keeps the observed pixels and zeroes (mid-grey 0 -> 127/128) the masked box
    meas = np.asarray(Image.open(out / "measurement.png")).astype(int)
    src = np.asarray(Image.open(digit_png / "digit.png")).astype(int)
    assert np.all(np.abs(meas[10:20, 10:20] - 127.5) <= 1)
    assert np.mean(np.abs(meas[:10] - src[:10])) < 20  # noise sigma_y = 0.05 -> about 6 grey levels
    out2 = tmp_path / "out2"
    rc = main(["restore", "--task", "sr4", "--observed", "--input", str(digit_png / "observed8.png"), "--t0", "0",
               "--steps", "5", "--out", str(out2)])
    assert rc == 0 and Image.open(out2 / "restored_t0_0.png").size == (32, 32)


@pytest.mark.parametrize("args,msg", [
    (["--task", "sr9", "--input", "digit.png"], "unknown task"),
    (["--task", "sr4", "--input", "rgb.png"], "single-channel"),
    (["--task", "sr4", "--input", "small.png"], "expected a 32x32 image, got 16x16"),
    (["--task", "sr4", "--input", "broken.png"], "could not read"),
    (["--task", "sr4", "--input", "missing.png"], "not found"),
    (["--task", "sr4", "--observed", "--input", "digit.png"], "expected a 8x8 image"),
    (["--task", "inpaint_mask", "--input", "digit.png"], "needs --mask"),
    (["--task", "deblur", "--input", "digit.png", "--t0", "0,5000"],
     "--t0: every t0 must be a whole number of steps in [0, 1000], got [0, 5000]"),
])
def test_restore_bad_input_clear_error_no_output(digit_png, tmp_path, capsys, args, msg):
    out = tmp_path / "out"
    args = [a if not a.endswith(".png") else str(digit_png / a) for a in args]
    rc = main(["restore", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err
    assert not out.exists() or os.listdir(out) == []
