"""The ``mapreps`` command line: testbed JSON contract, demo outputs, bad input."""
import json
import os

import numpy as np
import pytest

from mapreps_jax.cli import main
from mapreps_jax.priors import oracle_map_rps_dp, svd_gains
import mapreps_jax as mr

KEYS = {"t0", "D", "P", "D_star", "P_star", "D_ideal", "D_closed", "P_closed"}


def _run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_testbed_json_contract_oracle(capsys):
    rc, out, _ = _run(capsys, ["testbed", "--algo", "oracle-rps", "--dim", "6", "--keep", "3", "--sigma-y", "0.4",
                               "--t0", "0,200", "--n-measurements", "600", "--seed", "3", "--quiet"])
    assert rc == 0
    res = json.loads(out)
    cfg = res["config"]
    for k in ("prior", "scale", "dim", "operator", "keep", "sigma_y", "algo", "t0", "n_measurements", "seed", "w",
              "n_iter", "lr", "t1"):
        assert k in cfg
    assert cfg["dim"] == 6 and cfg["keep"] == 3 and cfg["t0"] == [0, 200]
    pts = res["points"]
    assert [p["t0"] for p in pts] == [0, 200] and all(set(p) == KEYS for p in pts)
    # closed forms recomputed independently from the SVD-basis formulas of TESTBED.md
    g = svd_gains(1.0, np.ones(3), 6, 0.4)
    assert pts[0]["D_star"] == pytest.approx(float(g.D_star), rel=1e-4)
    a0 = float(mr.make_schedule("linear").alpha_bars[199])
    Dc, Pc = oracle_map_rps_dp(1.0, np.ones(3), 6, 0.4, a0)
    assert pts[1]["D_closed"] == pytest.approx(float(Dc), rel=1e-4)
    assert pts[1]["P_closed"] == pytest.approx(float(Pc), rel=1e-4)
    # oracle at t0 = 0 is the exact MMSE estimate: D close to D*, on the ideal curve
    assert pts[0]["D"] == pytest.approx(pts[0]["D_star"], rel=0.1)
    for p in pts:
        assert p["D_ideal"] == pytest.approx(p["D_star"] + max(p["P_star"] - p["P"], 0.0) ** 2, rel=1e-6)
        assert p["D"] >= p["D_ideal"] * 0.9


@pytest.mark.parametrize("algo", ["dps", "red-diff"])
def test_testbed_baselines_on_gmm(capsys, algo):
    rc, out, _ = _run(capsys, ["testbed", "--prior", "gmm", "--algo", algo, "--dim", "4", "--operator", "matrix",
                               "--rows", "2", "--n-measurements", "64", "--quiet"])
    assert rc == 0
    pts = json.loads(out)["points"]
    assert len(pts) == 1 and pts[0]["D_closed"] is None
    assert np.isfinite(pts[0]["D"]) and np.isfinite(pts[0]["P"])


def test_testbed_bad_input(capsys):
    with pytest.raises(SystemExit):
        main(["testbed", "--algo", "langevin"])
    with pytest.raises(SystemExit):
        main(["testbed", "--t0", "0,a"])
    rc, _, err = _run(capsys, ["testbed", "--dim", "4", "--keep", "9", "--quiet"])
    assert rc == 2 and "--keep" in err and "9" in err


def test_testbed_demo_writes_plot_and_json(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, _, _ = _run(capsys, ["testbed-demo", "--out", str(out), "--dim", "4", "--t0", "0,300,999", "--n-measurements", "200",
                             "--n-iter", "100", "--quiet"])
    assert rc == 0
    png = out / "dp_curve.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "metrics.json").read_text())
    assert set(res) == {"map-rps", "oracle-rps"}
    assert [p["t0"] for p in res["map-rps"]["points"]] == [0, 300, 999]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_atomic_write_gives_the_umask_mode_and_leaves_no_temporary(tmp_path):
    from mapreps_jax.cli import atomic_write_text

    old = os.umask(0o022)
    try:
        path = tmp_path / "sub" / "out.json"
        atomic_write_text(str(path), "{}\n")
        assert path.read_text() == "{}\n"
        assert (os.stat(path).st_mode & 0o777) == 0o644  # what open() would give, not mkstemp's 0o600
        os.umask(0o077)
        atomic_write_text(str(path), "[]\n")
        assert (os.stat(path).st_mode & 0o777) == 0o600
        assert os.listdir(path.parent) == ["out.json"]
    finally:
        os.umask(old)


def test_compile_cache_dir_resolution(tmp_path):
    from mapreps_jax.cli import compile_cache_dir
    home = os.path.join(os.path.expanduser("~"), ".cache", "mapreps_jax", "xla")
    assert compile_cache_dir(None, {}) == home
    assert compile_cache_dir(None, {"XDG_CACHE_HOME": str(tmp_path)}) == str(tmp_path / "mapreps_jax" / "xla")
    assert compile_cache_dir(None, {"MAPREPS_JAX_COMPILE_CACHE": str(tmp_path / "c")}) == str(tmp_path / "c")
    assert compile_cache_dir(None, {"MAPREPS_JAX_COMPILE_CACHE": "0", "XDG_CACHE_HOME": str(tmp_path)}) is None
    # a directory the caller set for JAX wins over ours (the test suite's own cache, for one)
    assert compile_cache_dir("/set/by/caller", {"MAPREPS_JAX_COMPILE_CACHE": "0"}) == "/set/by/caller"


def _testbed_in_a_fresh_process(tmp_path, **env_extra):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "MAPREPS_JAX_COMPILE_CACHE")}
    env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **env_extra)
    return subprocess.run([sys.executable, "-m", "mapreps_jax.cli", "testbed", "--algo", "oracle-rps", "--dim", "4",
                           "--keep", "2", "--t0", "0,10", "--quiet"], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("off", [False, True])
def test_cli_stores_compiled_programs_in_the_user_cache(tmp_path, off):
    """A `mapreps` command in a fresh process with no cache set for JAX stores its compiled programs under
    $XDG_CACHE_HOME/mapreps_jax/xla (every program here: the size threshold is lowered to 0), and none with
    MAPREPS_JAX_COMPILE_CACHE=0."""
    r = _testbed_in_a_fresh_process(tmp_path, **({"MAPREPS_JAX_COMPILE_CACHE": "0"} if off else {}))
    assert r.returncode == 0, r.stderr
    cache = tmp_path / "mapreps_jax" / "xla"
    stored = [f for f in os.listdir(cache) if f.endswith("-cache")] if cache.exists() else []
    assert (not stored) if off else stored, stored


def test_cli_warns_once_and_runs_when_the_cache_directory_cannot_be_made(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    bad = str(tmp_path / "a_file" / "cache")
    r = _testbed_in_a_fresh_process(tmp_path, MAPREPS_JAX_COMPILE_CACHE=bad)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("mapreps: warning:")]
    assert len(warnings) == 1 and bad in warnings[0] and "MAPREPS_JAX_COMPILE_CACHE" in warnings[0], r.stderr
