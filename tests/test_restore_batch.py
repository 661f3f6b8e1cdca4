"""``mapreps restore-batch``: resumable after SIGKILL with byte-identical PNGs, two processes (``jax.distributed`` on
localhost, gloo CPU collectives) byte-identical to one, bad files reported and skipped.

Every run is a ``mapreps`` subprocess on 2 CPU devices (``--xla_force_host_platform_device_count=2`` for one process;
one device each for two processes), so the compiled program partitions the batch the same way in all of them (the
comparison is then exact). Workload: 5 observed sr4 measurements of held-out digits and one corrupt file, batch
size 2 (3 batches), Stage 1 of 10 steps, Stage 2 of 4 steps, t0 in {0, 300}."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ARGS = ["--task", "sr4", "--batch-size", "2", "--steps", "4", "--n-iter", "10", "--t0", "0,300", "--quiet"]
N_GOOD = 5


def _env(devices):
    """The child's environment: ``devices`` CPU devices, without the package's CPU flag (this process's XLA_FLAGS
    carry it since its import)."""
    from mapreps_jax import xla_cpu

    env = dict(os.environ)
    flags = xla_cpu.without_flag(env.get("XLA_FLAGS", ""))
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = flags.strip()
    # the same XLA:CPU kernels in every run (one process with two devices keeps YNNPACK, mapreps_jax/xla_cpu.py;
    # a process with one device would not): byte identity is between runs of the same kernels
    env["MAPREPS_JAX_XLA_DEFAULTS"] = "0"
    return env


def _cmd(inputs, out, *extra):
    return [sys.executable, "-m", "mapreps_jax.cli", "restore-batch", "--inputs", inputs, "--out", out, *ARGS, *extra]


def _run(inputs, out, devices=2, *extra, timeout=600):
    return subprocess.run(_cmd(inputs, out, *extra), env=_env(devices), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _pngs(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if f.endswith(".png")}


def _lines(d):
    with open(os.path.join(d, "results.jsonl")) as f:
        return [json.loads(s) for s in f]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mapreps_jax.app.datasets import load_digits, to_model_range
    from mapreps_jax.app.digits import make_task, png_bytes

    d = tmp_path_factory.mktemp("observed")
    p, op = make_task("sr4")
    x, _ = load_digits("test")
    y = np.clip(np.asarray(op.measure(jax.random.PRNGKey(3), to_model_range(x[:N_GOOD]), p.sigma_y)), -1, 1)
    for i in range(N_GOOD):
        (d / f"digit{i}.png").write_bytes(png_bytes(y[i]))
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG body")
    return str(d)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    proc = _run(inputs, out)
    assert proc.returncode == 1, proc.stderr  # 1: some input could not be used (the corrupt file)
    return out, proc


def test_uninterrupted_run_outputs_and_bad_file(inputs, reference):
    out, proc = reference
    pngs = _pngs(out)
    assert sorted(pngs) == sorted(f"digit{i}_t0_{t}.png" for i in range(N_GOOD) for t in (0, 300))
    lines = _lines(out)
    ok = [ln for ln in lines if "error" not in ln]
    assert sorted((ln["file"], ln["t0"]) for ln in ok) == sorted((f"digit{i}.png", t) for i in range(N_GOOD)
                                                                  for t in (0, 300))
    for ln in ok:
        assert ln["residual"] > 0 and np.isfinite(ln["residual"]) and ln["batch_seconds"] > 0
        assert ln["output"] == ln["file"][:-4] + f"_t0_{ln['t0']}.png"
    # the residual ||y - A(x_hat)|| against a recomputation from the input and the written 8-bit PNG: the output's
    # rounding (at most 1/255 per pixel in [-1, 1] units, averaged by the 4x4 blocks) moves it by at most
    # sqrt(64) / 255 over the 8x8 measurement
    from mapreps_jax.app.digits import make_task, read_gray_png

    _, op = make_task("sr4")
    for ln in ok:
        x = read_gray_png(os.path.join(out, ln["output"]), (32, 32))
        y = read_gray_png(os.path.join(inputs, ln["file"]), (8, 8))
        r = float(np.linalg.norm(np.asarray(op.A(x[None]))[0] - y))
        assert abs(r - ln["residual"]) <= 8 / 255 + 1e-6, (ln, r)
    bad = [ln for ln in lines if "error" in ln]
    assert [ln["file"] for ln in bad] == ["corrupt.png"] and "could not read" in bad[0]["error"]
    assert "corrupt.png" in proc.stderr and "1 input file(s) could not be used" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["restored"] == N_GOOD and summary["batches"] == 3 and summary["devices"] == 2
    assert list(summary["failed"]) == ["corrupt.png"]


def test_sigkill_then_resume_is_byte_identical(inputs, reference, tmp_path):
    ref_out, _ = reference
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(_cmd(inputs, out), env=_env(2), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    results = os.path.join(out, "results.jsonl")
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:  # kill once the first batch is on disk
            if os.path.exists(results) and sum(1 for ln in open(results) if '"t0"' in ln) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _pngs(out)
    assert 0 < len(before) < 2 * N_GOOD
    # and the state a kill in the middle of a write leaves: a partial line, one batch's PNG missing
    with open(results, "a") as f:
        f.write('{"file": "digit4.png", "t0": 3')
    os.remove(os.path.join(out, sorted(before)[0]))
    resumed = _run(inputs, out)
    assert resumed.returncode == 1, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["skipped"] >= 0 and summary["computed_batches"] < 3 + 1
    assert _pngs(out) == _pngs(ref_out)  # byte for byte
    lines = [ln for ln in _lines(out) if "error" not in ln]
    assert sorted((ln["file"], ln["t0"]) for ln in lines) == sorted((f"digit{i}.png", t) for i in range(N_GOOD)
                                                                     for t in (0, 300))  # each exactly once
    again = _run(inputs, out)  # a finished folder: nothing is recomputed
    assert json.loads(again.stdout.strip().splitlines()[-1])["computed_batches"] == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_byte_for_byte(inputs, reference, tmp_path):
    ref_out, _ = reference
    out = str(tmp_path / "two")
    port = _free_port()
    procs = [subprocess.Popen(_cmd(inputs, out, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                                   "--process-id", str(i)), env=_env(1), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, outs):  # both report the corrupt file, which only process 0 read
        assert p.returncode == 1 and "corrupt.png" in se, se[-3000:]
    assert _pngs(out) == _pngs(ref_out)
    lines = [ln for ln in _lines(out) if "error" not in ln]
    assert sorted((ln["file"], ln["t0"]) for ln in lines) == sorted((f"digit{i}.png", t) for i in range(N_GOOD)
                                                                     for t in (0, 300))
    # each process wrote only its own images' lines (batch of 2 over 2 devices: slot 0 on process 0, 1 on 1)
    assert {ln["process"] for ln in lines} == {0, 1}
    summary = json.loads(outs[0][0].strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["devices"] == 2 and list(summary["failed"]) == ["corrupt.png"]


def test_bad_arguments_fail_before_loading(tmp_path, inputs):
    proc = subprocess.run([sys.executable, "-m", "mapreps_jax.cli", "restore-batch", "--inputs", inputs, "--out",
                           str(tmp_path / "o"), "--task", "colorize"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown task 'colorize'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mapreps_jax.cli", "restore-batch", "--inputs",
                           str(tmp_path / "none*.png"), "--out", str(tmp_path / "o"), "--task", "sr4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "neither a folder nor a pattern" in proc.stderr


def test_t0_out_of_range_fails_before_the_model_is_loaded(tmp_path, inputs, monkeypatch, capsys):
    """A ``--t0`` outside ``[0, T]`` is refused before the prior is read (it used to be checked after loading it)."""
    from mapreps_jax.app import pretrained
    from mapreps_jax.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --t0 was checked")

    monkeypatch.setattr(pretrained, "load_default_prior", no_load)
    rc = main(["restore-batch", "--inputs", inputs, "--out", str(tmp_path / "o"), "--task", "sr4", "--t0", "0,1001",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "restore-batch: --t0: every t0 must be a whole number of steps in [0, 1000], got [0, 1001] (not allowed: [1001])" in err, err
    assert not (tmp_path / "o").exists()
