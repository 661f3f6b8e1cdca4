"""`mapreps demo --quick` end to end with the bundled digits prior (issue 4's acceptance checks)."""

import json
import math
import os

import pytest

from mapreps_jax.cli import main
from mapreps_jax.map_rps import rps_jit

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    n_compiled = rps_jit._cache_size()
    rc = main(["demo", "--quick", "--out", str(out), "--quiet"])
    return rc, out, rps_jit._cache_size() - n_compiled


def test_quick_demo_files_and_numbers(quick_demo):
    rc, out, _ = quick_demo
    assert rc == 0
    for name in ("dp_curve.png", "grid.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["tasks"]) == ["sr4", "inpaint", "deblur", "denoise"]
    t0s = m["config"]["t0"]
    assert t0s[0] == 0 and len(t0s) >= 2

    def numbers(v):
        if isinstance(v, dict):
            for x in v.values():
                yield from numbers(x)
        elif isinstance(v, list):
            for x in v:
                yield from numbers(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield v
    assert all(math.isfinite(v) for v in numbers(m))
    for name, r in m["tasks"].items():
        pts = r["map_rps"]
        assert [p["t0"] for p in pts] == t0s
        # the low-distortion end: RMSE at t0 = 0 (the MAP estimate) below RMSE at the largest t0
        assert pts[0]["rmse"] < pts[-1]["rmse"], (name, pts)
    # the perception end where Stage 1 is visibly blurry (deblurring): digit-FD falls from t0 = 0 to the largest t0.
    # (For 16 images per task digit-FD is dominated by its small-sample bias, which rewards low-variance outputs:
    # the 16 clean digits themselves score about 370, against 6.65 for 4500 training digits. So the other tasks'
    # MAP estimates can score below real digits, and their FD trend is not asserted at this size; see README.)
    deblur = m["tasks"]["deblur"]["map_rps"]
    assert deblur[-1]["digit_fd"] < deblur[0]["digit_fd"], deblur
    # NFE accounting: N + sum(min(K, t0)) for the sweep (Stage 1 once)
    c, nfe = m["config"], m["nfe"]
    assert nfe["map_rps_sweep"] == c["n_iter"] + sum(min(c["stage2_steps"], t) for t in t0s)


def test_one_stage2_program_serves_every_task_and_t0(quick_demo):
    """All four tasks run as one batch (stack_operators) and t0 is traced: the MAP-RPS sweep and DPS share ONE
    compiled Stage-2 program."""
    assert quick_demo[2] == 1


@pytest.mark.parametrize("args,msg", [(["--tasks", "sr4,colorize"], "unknown task 'colorize'"),
                                      (["--t0", "0,2000"], "t0 must be in [0, 1000]"),
                                      (["--n-images", "0"], "n_images must be >= 1")])
def test_demo_bad_input(tmp_path, capsys, args, msg):
    out = tmp_path / "o"
    rc = main(["demo", "--quick", "--out", str(out), "--quiet"] + args)
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()
