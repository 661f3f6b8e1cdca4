"""`mapreps demo --quick` end to end with the bundled digits prior (issue 4's acceptance checks).

The run uses the quick settings (N 40, K 10, RED-diff 10 steps) on 64 held-out digits per task instead of the
default 12: digit-FD of so few images is dominated by its small-sample noise and bias (the 16 clean digits score
about 370; four disjoint sets of 16 outputs order t0 = 0 and t0 = 400 differently from one another), while at 64 per
task the clean digits score about 74 and the D-P trends are larger than the noise (README, "Statistical power").
It runs only the two ends of the quick sweep, t0 {0, 400}, which the criteria compare: each t0's Stage 2 uses the
same key, so these outputs equal those of the full sweep {0, 200, 400}.
"""

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
    rc = main(["demo", "--quick", "--space", "pixel", "--n-images", "64", "--t0", "0,400", "--out", str(out),
               "--quiet"])
    return rc, out, rps_jit._cache_size() - n_compiled


@pytest.fixture(scope="module")
def user_demo(tmp_path_factory):
    """Exactly `mapreps demo --quick --out DIR` (12 digits per task, both spaces): one run for the user-facing test
    and the latent path's checks."""
    out = tmp_path_factory.mktemp("user_demo") / "out"
    return main(["demo", "--quick", "--out", str(out), "--quiet"]), out


def _numbers(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from _numbers(x)
    elif isinstance(v, list):
        for x in v:
            yield from _numbers(x)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield v


def _check_run(rc, out):
    """Files exist (no temporary left), JSON numbers finite, and RMSE at t0 = 0 below that at the largest t0 and
    below DPS's for every task. Returns the metrics."""
    assert rc == 0
    for name in ("dp_curve.png", "grid.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["tasks"]) == ["sr4", "inpaint", "deblur", "denoise"]
    t0s = m["config"]["t0"]
    assert t0s[0] == 0 and len(t0s) >= 2
    assert all(math.isfinite(v) for v in _numbers(m))
    # digit-KID and its standard error beside every digit-FD (app/perception.digit_kid; tests/test_digit_kid.py)
    entries = [e for r in m["tasks"].values() for v in r.values()
               for e in (v if isinstance(v, list) else [v]) if isinstance(e, dict) and "digit_fd" in e]
    assert entries and all(e["digit_kid_se"] > 0 and isinstance(e["digit_kid"], float) for e in entries)
    assert m["digit_kid_clean_se"] > 0
    # grey-W1 (the plot's perception index) with its standard error, and RMSE's standard error, in every entry
    assert all(e["grey_w1"] >= 0 and e["grey_w1_se"] > 0 and e["rmse_se"] > 0 for e in entries)
    assert 0 <= m["grey_w1_clean"] < 0.01  # the clean digits: only the small-set bias
    for r in m["tasks"].values():
        for sweep in ("map_rps", "lmap_rps"):
            if sweep in r:  # the trade-off summary recomputes from the sweep's own points
                t, pts = r[f"{sweep}_tradeoff"], {p["t0"]: p for p in r[sweep]}
                assert t["knee_t0"] == min((p for p in r[sweep] if p["t0"]), key=lambda p: p["grey_w1"])["t0"]
                assert t["perception_fall"] == pytest.approx(pts[0]["grey_w1"] - pts[t["knee_t0"]]["grey_w1"])
                assert t["resolved"] == (pts[0]["grey_w1"] - 2 * pts[0]["grey_w1_se"]
                                         > pts[t["knee_t0"]]["grey_w1"] + 2 * pts[t["knee_t0"]]["grey_w1_se"])
    for name, r in m["tasks"].items():
        pts = r["map_rps"]
        assert [p["t0"] for p in pts] == t0s
        # the low-distortion end: RMSE at t0 = 0 (the MAP estimate) below that at the largest t0, for every task
        assert pts[0]["rmse"] < pts[-1]["rmse"], (name, pts)
        # ... and below that of DPS (t0 = T)
        assert pts[0]["rmse"] < r["dps"]["rmse"], (name, pts[0], r["dps"])
    return m


def test_quick_demo_as_a_user_runs_it(user_demo):
    """Exactly `mapreps demo --quick --out DIR` (12 digits per task, both spaces). Its digit-FD is not asserted: at
    12 images the clean digits themselves score about 500 and the direction of a digit-FD difference is noise
    (README); its grey-W1, the plot's index, is (measured: the fall from t0 = 0 to the knee is 10 to 14 standard
    errors for sr4 and deblur)."""
    m = _check_run(*user_demo)
    assert m["config"]["n_images"] == 12 and m["config"]["space"] == "both"
    # what the plot is for: at the run's own 12 digits, the perception gain of MAP-RPS from t0 = 0 to the knee is
    # resolved (grey-W1's 2-standard-error bars disjoint) for super-resolution and deblurring
    for name in ("sr4", "deblur"):
        t = m["tasks"][name]["map_rps_tradeoff"]
        assert t["resolved"] and t["knee_t0"] > 0, (name, t)
    for r in m["tasks"].values():
        assert [p["t0"] for p in r["lmap_rps"]] == m["config"]["t0"]
        assert {"latent_dps", "psld"} <= set(r)


# Stage-1 measurement consistency of LMAP on the bundled latent model: mean ||A(D(z_map)) - y|| over the task's
# digits, in units of sigma_y sqrt(m) (the norm of the noise itself). An exact MAP estimate sits near 1 (below 1:
# it fits some noise); a Stage 1 that ignored the data would sit at the pseudo-inverse's distance to the truth.
MAX_CONSISTENCY = 2.0


def test_quick_latent_demo_bundled_latent_model(user_demo):
    """The latent half of `mapreps demo --quick` (12 digits per task, the bundled latent digits model): RMSE at
    t0 = 0 below that at the largest t0 in at least three of the four tasks, LMAP-RPS at t0 = 0 below Latent-DPS in
    RMSE on every task, Stage 1 consistent with the measurement, and the latent NFE as configured. (Measured margins
    at these 12 digits: all four tasks fall; LMAP t0 = 0 at 0.54-0.65x Latent-DPS's RMSE; consistency 0.87-1.10.)"""
    rc, out = user_demo
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in _numbers(m))
    # digit-KID and its standard error beside every digit-FD (app/perception.digit_kid; tests/test_digit_kid.py)
    entries = [e for r in m["tasks"].values() for v in r.values()
               for e in (v if isinstance(v, list) else [v]) if isinstance(e, dict) and "digit_fd" in e]
    assert entries and all(e["digit_kid_se"] > 0 and isinstance(e["digit_kid"], float) for e in entries)
    assert m["digit_kid_clean_se"] > 0
    t0s = m["config"]["t0"]
    falls = [name for name, r in m["tasks"].items() if r["lmap_rps"][0]["rmse"] < r["lmap_rps"][-1]["rmse"]]
    assert len(falls) >= 3, {name: [p["rmse"] for p in r["lmap_rps"]] for name, r in m["tasks"].items()}
    for name, r in m["tasks"].items():
        assert [p["t0"] for p in r["lmap_rps"]] == t0s
        assert r["lmap_rps"][0]["rmse"] < r["latent_dps"]["rmse"], (name, r["lmap_rps"][0], r["latent_dps"])
        assert r["lmap_stage1_consistency"] < MAX_CONSISTENCY, (name, r["lmap_stage1_consistency"])
        # and Stage 1 moved towards the data from its start E(A_pinv y): below the pseudo-inverse's RMSE
        assert r["lmap_rps"][0]["rmse"] < r["measurement_pinv"]["rmse"], (name, r["lmap_rps"][0])
    c, lat = m["config"], m["nfe"]["latent"]
    assert lat["lmap_rps_sweep"] == c["latent_n_iter"] + sum(min(c["latent_stage2_steps"], t) for t in t0s)
    assert lat["calls"]["lmap_rps_sweep"]["unet"] == lat["lmap_rps_sweep"]


def test_latent_space_only_equals_the_latent_half_of_the_run_of_both(user_demo, tmp_path):
    """`--quick --space latent` runs the latent methods alone (no pixel prior loaded, no pixel entries, latent NFE
    only): the same programs on the same measurements as the latent half of `--quick` with both spaces, so every
    latent number is equal (the pixel half draws no randomness the latent half uses). The same shapes as the
    fixture's run: the compiled programs are reused."""
    out = tmp_path / "out"
    rc = main(["demo", "--quick", "--space", "latent", "--out", str(out), "--quiet"])
    assert rc == 0 and (out / "grid.png").read_bytes()[:8] == PNG
    m = json.loads((out / "metrics.json").read_text())
    both = json.loads((user_demo[1] / "metrics.json").read_text())
    assert m["config"]["space"] == "latent" and list(m["tasks"]) == list(both["tasks"])
    latent_keys = {"measurement_pinv", "latent", "lmap_rps", "latent_dps", "psld", "lmap_stage1_consistency",
                   "lmap_rps_tradeoff"}
    for name, r in m["tasks"].items():
        assert "map_rps" not in r and "dps" not in r and "red_diff" not in r
        assert latent_keys <= set(r)
        for key in latent_keys:
            assert r[key] == both["tasks"][name][key], (name, key)
    assert "map_rps_sweep" not in m["nfe"] and m["nfe"]["latent"] == both["nfe"]["latent"]


def test_quick_demo_files_and_numbers(quick_demo):
    rc, out, _ = quick_demo
    m = _check_run(rc, out)
    t0s = m["config"]["t0"]
    # the perception end: digit-FD at the largest t0 below that at t0 = 0 for at least three of the four tasks
    fd_falls = [name for name, r in m["tasks"].items() if r["map_rps"][-1]["digit_fd"] < r["map_rps"][0]["digit_fd"]]
    assert len(fd_falls) >= 3, {name: [p["digit_fd"] for p in r["map_rps"]] for name, r in m["tasks"].items()}
    # NFE accounting: N + sum(min(K, t0)) for the sweep (Stage 1 once)
    c, nfe = m["config"], m["nfe"]
    assert nfe["map_rps_sweep"] == c["n_iter"] + sum(min(c["stage2_steps"], t) for t in t0s)


def test_one_stage2_program_serves_every_task_and_t0(quick_demo):
    """All four tasks run as one batch (stack_operators) and t0 is traced: the MAP-RPS sweep (t0 = 400) and DPS
    (t0 = T) share ONE compiled Stage-2 program."""
    assert quick_demo[2] == 1


@pytest.mark.parametrize("args,msg", [(["--tasks", "sr4,colorize"], "unknown task 'colorize'"),
                                      (["--t0", "0,2000"], "demo: every t0 must be a whole number of steps in [0, 1000]"),
                                      (["--n-images", "0"], "n_images must be >= 1"),
                                      (["--latent-steps", "0"], "latent_stage2_steps must be >= 1")])
def test_demo_bad_input(tmp_path, capsys, args, msg):
    out = tmp_path / "o"
    rc = main(["demo", "--quick", "--out", str(out), "--quiet"] + args)
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_cpu_model_names_the_generation():
    """metrics.json's ``machine.cpu`` (and the benchmarks' ``cpu_model``) names the CPU family, model number and
    vector instruction set beside the model name, which on a virtual machine ("AMD EPYC") does not tell apart CPUs of
    different speed and float32 rounding."""
    from mapreps_jax.app.demo import cpu_model

    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    with open("/proc/cpuinfo") as f:
        first = f.read().split("\n\n")[0]
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    got = cpu_model()
    assert got.startswith(fields["model name"])
    assert f"family {fields['cpu family']}, model {fields['model']}" in got
    flags = fields["flags"].split()
    assert ("AVX-512" in got) == ("avx512f" in flags)
    assert ("AVX2" in got) == ("avx2" in flags and "avx512f" not in flags)
