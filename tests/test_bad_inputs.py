"""Hostile and faulty inputs of the command line and the file-writing side (issue 12, part 7): each gives one clear
error line (``mapreps <command>: error: ...``, exit status 2, or 1 for resource failures), before any long
computation where it can be known then, with no traceback and no partial or mixed output.

The expensive parts (loading the network, restoring, the demo, the testbed run) are replaced by stand-ins where a
test is about what happens around them, and by a stand-in that fails the test where they must not run at all.
"""
import collections
import errno
import io
import json
import math
import os
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

import mapreps_jax.app.demo as demo_mod
import mapreps_jax.app.digits as digits_mod
import mapreps_jax.app.pretrained as pretrained
import mapreps_jax.checkpoint_io as checkpoint_io
import mapreps_jax.testbed as testbed_mod
from mapreps_jax.cli import main
from mapreps_jax.networks import torch_pickle


def _run(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_clear_line(err, prog):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mapreps {prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_compute(monkeypatch):
    """Loading the network and every long computation fail the test if reached."""
    def forbidden(*a, **k):
        raise AssertionError("reached a long computation; the error should have come first")

    monkeypatch.setattr(pretrained, "load_default_prior", forbidden)
    monkeypatch.setattr(demo_mod, "run_demo", forbidden)
    monkeypatch.setattr(testbed_mod, "run_testbed", forbidden)
    monkeypatch.setattr(digits_mod, "restore_files", forbidden)


class _FakeModel:
    T = 1000


@pytest.fixture
def fake_restore(monkeypatch):
    """``mapreps restore`` with a stand-in network and restoration: one tiny PNG per file name."""
    png = digits_mod.png_bytes(np.zeros((32, 32, 1), np.float32))

    def restore_files(model, task, input_path, t0s, **kw):
        digits_mod.check_restore_args(task, t0s, T=model.T, **{k: kw[k] for k in ("mask_path", "observed",
                                                                                   "sigma_y", "stage2_steps")})
        return {"measurement.png": png, **{f"restored_t0_{t}.png": png for t in t0s}}

    monkeypatch.setattr(pretrained, "load_default_prior", lambda *a, **k: _FakeModel())
    monkeypatch.setattr(digits_mod, "restore_files", restore_files)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    from mapreps_jax.app.datasets import load_digits

    x, _ = load_digits("test")
    Image.fromarray(x[3, ..., 0]).save(d / "digit.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / "black.png")
    (d / "a_file").write_text("not a folder")
    return d


# ------------------------------------------------------------------------------------------------- restore


@pytest.mark.parametrize("extra,msg", [
    (["--steps", "0"], "--steps (Stage-2 steps K) must be a positive integer, got 0"),
    (["--steps", "-3"], "--steps (Stage-2 steps K) must be a positive integer, got -3"),
    (["--observed", "--sigma-y", "0.1"], "--sigma-y"),
    (["--sigma-y", "nan"], "--sigma-y must be a finite number >= 0"),
    (["--sigma-y", "-0.5"], "--sigma-y must be a finite number >= 0"),
])
def test_restore_bad_options_fail_before_loading_anything(pngs, tmp_path, capsys, no_compute, extra, msg):
    out = tmp_path / "out"
    rc, _, err = _run(capsys, ["restore", "--task", "sr4", "--input", str(pngs / "digit.png"), *extra,
                               "--out", str(out)])
    assert rc == 2 and msg in _one_clear_line(err, "restore")
    assert not out.exists()


def test_dps_zeta_refuses_zero_steps():
    p = digits_mod.DEMO_TASKS["sr4"]
    with pytest.raises(ValueError, match="n_steps"):
        digits_mod.dps_zeta(p, 0)  # was ZeroDivisionError
    assert digits_mod.dps_zeta(p, None) == p.zeta and digits_mod.dps_zeta(p, 10) == pytest.approx(10 * p.zeta)


def test_restore_all_black_mask_is_refused(pngs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pretrained, "load_default_prior", lambda *a, **k: _FakeModel())
    monkeypatch.setattr(digits_mod, "restore", lambda *a, **k: (_ for _ in ()).throw(AssertionError("computed")))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, ["restore", "--task", "inpaint_mask", "--input", str(pngs / "digit.png"), "--mask",
                               str(pngs / "black.png"), "--out", str(out)])
    assert rc == 2 and "no observed pixel" in _one_clear_line(err, "restore")
    assert not out.exists()


@pytest.mark.parametrize("cmd", [
    ["restore", "--task", "sr4", "--input", "DIGIT"],
    ["demo", "--quiet"],
    ["testbed-demo", "--quiet"],
])
@pytest.mark.parametrize("where", ["a_file", "a_file/sub"])
def test_out_that_is_a_file_or_below_one_fails_before_computing(pngs, capsys, no_compute, cmd, where):
    cmd = [str(pngs / "digit.png") if a == "DIGIT" else a for a in cmd]
    rc, _, err = _run(capsys, [*cmd, "--out", str(pngs / where)])
    line = _one_clear_line(err, cmd[0])
    assert rc == 2 and "--out" in line and "a_file" in line
    assert (pngs / "a_file").read_text() == "not a folder"


def test_unwritable_out_folder_fails_before_computing(pngs, tmp_path, capsys, no_compute, monkeypatch):
    """A folder without write permission (simulated: the tests may run as root, who may write anyway)."""
    ro = str(tmp_path / "ro")
    os.mkdir(ro)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if os.fspath(p) == ro else real_access(p, mode))
    for cmd in (["restore", "--task", "sr4", "--input", str(pngs / "digit.png")], ["demo", "--quick", "--quiet"],
                ["testbed-demo", "--quiet"]):
        rc, _, err = _run(capsys, [*cmd, "--out", os.path.join(ro, "out")])
        assert rc == 2 and "not writable" in _one_clear_line(err, cmd[0])
    rc, _, err = _run(capsys, ["testbed", "--quiet", "--out", os.path.join(ro, "r.json")])
    assert rc == 2 and "not writable" in _one_clear_line(err, "testbed")
    assert os.listdir(ro) == []


def test_testbed_out_not_writable_fails_before_computing(pngs, capsys, no_compute, tmp_path):
    rc, _, err = _run(capsys, ["testbed", "--quiet", "--out", str(pngs / "a_file" / "r.json")])
    assert rc == 2 and "--out" in _one_clear_line(err, "testbed")
    rc, _, err = _run(capsys, ["testbed", "--quiet", "--out", str(tmp_path)])  # a folder, not a file
    assert rc == 2 and "--out" in _one_clear_line(err, "testbed")


def test_second_restore_into_the_same_folder_is_refused_then_replaced_as_a_unit(pngs, tmp_path, capsys,
                                                                                 fake_restore):
    out = tmp_path / "out"
    base = ["restore", "--task", "sr4", "--input", str(pngs / "digit.png"), "--out", str(out)]
    assert _run(capsys, [*base, "--t0", "0,200,600"])[0] == 0
    first = sorted(os.listdir(out))
    assert first == ["measurement.png", "restored_t0_0.png", "restored_t0_200.png", "restored_t0_600.png"]
    rc, _, err = _run(capsys, [*base, "--t0", "0,50"])  # refused, before computing; nothing changed
    assert rc == 2 and "--overwrite" in _one_clear_line(err, "restore")
    assert sorted(os.listdir(out)) == first
    rc, out_text, _ = _run(capsys, [*base, "--t0", "0,50", "--overwrite"])
    assert rc == 0 and json.loads(out_text)["files"] == ["measurement.png", "restored_t0_0.png",
                                                         "restored_t0_50.png"]
    assert sorted(os.listdir(out)) == ["measurement.png", "restored_t0_0.png", "restored_t0_50.png"]  # not mixed
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left
    (out / "notes.txt").write_text("mine")  # --overwrite never deletes what mapreps did not write
    rc, _, err = _run(capsys, [*base, "--t0", "0", "--overwrite"])
    assert rc == 2 and "notes.txt" in _one_clear_line(err, "restore")
    assert (out / "notes.txt").read_text() == "mine"


def test_a_write_failing_part_way_leaves_the_previous_output_untouched(pngs, tmp_path, capsys, fake_restore,
                                                                        monkeypatch):
    out = tmp_path / "out"
    base = ["restore", "--task", "sr4", "--input", str(pngs / "digit.png"), "--out", str(out)]
    assert _run(capsys, [*base, "--t0", "0,600"])[0] == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    real_write, calls = checkpoint_io._write_file, []

    def disk_full_on_second(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_write(path, data)

    monkeypatch.setattr(checkpoint_io, "_write_file", disk_full_on_second)
    rc, _, err = _run(capsys, [*base, "--t0", "0,100,200", "--overwrite"])
    assert rc == 1 and "No space left on device" in _one_clear_line(err, "restore")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # no new file beside the old ones
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_write_output_set_into_new_and_empty_folders_with_umask_modes(tmp_path):
    old = os.umask(0o022)
    try:
        (tmp_path / "empty").mkdir()
        for name in ("new/deeper", "empty"):
            path = checkpoint_io.write_output_set(str(tmp_path / name), {"a.json": b"{}", "b.png": b"x"})
            assert sorted(os.listdir(path)) == ["a.json", "b.png"]
            assert os.stat(path).st_mode & 0o777 == 0o755
            assert os.stat(os.path.join(path, "a.json")).st_mode & 0o777 == 0o644
        assert sorted(os.listdir(tmp_path)) == ["empty", "new"]
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------- demo


@pytest.mark.parametrize("extra,msg", [
    (["--n-images", "1"], "n_images must be at least 2"),
    (["--n-images", "0"], "n_images must be >= 1"),
    (["--n-images", "501"], "at most 500"),
    (["--steps", "0"], "stage2_steps must be >= 1"),
    (["--t0", "0,1001"], "every t0 must be a whole number of steps in [0, 1000], got [0, 1001] (not allowed: [1001])"),
    (["--tasks", "sr4,sr4"], "distinct"),
])
def test_demo_impossible_values_fail_before_computing(tmp_path, capsys, no_compute, extra, msg):
    out = tmp_path / "d"
    rc, _, err = _run(capsys, ["demo", "--quick", "--quiet", *extra, "--out", str(out)])
    assert rc == 2 and msg in _one_clear_line(err, "demo")
    assert not out.exists()


def test_demo_and_testbed_demo_refuse_a_non_empty_folder_before_computing(tmp_path, capsys, no_compute):
    out = tmp_path / "d"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    for cmd in (["demo", "--quick"], ["testbed-demo"]):
        rc, _, err = _run(capsys, [*cmd, "--quiet", "--out", str(out)])
        assert rc == 2 and "--overwrite" in _one_clear_line(err, cmd[0])
    assert os.listdir(out) == ["metrics.json"]


def test_write_demo_refuses_nan_metrics_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_mod, "demo_figures", lambda result: {"dp_curve.png": b"p", "grid.png": b"g"})
    with pytest.raises(ValueError, match="NaN"):
        demo_mod.write_demo({"metrics": {"rmse": float("nan")}}, str(tmp_path / "d"))
    assert os.listdir(tmp_path) == []


def _boxes_overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _squeeze_grey(metrics, lo=0.0101, hi=0.0109):
    """The same metrics with every panel's grey-W1 mapped into [lo, hi] (long tick labels on a narrow range)."""
    metrics = json.loads(json.dumps(metrics))
    for r in metrics["tasks"].values():
        pts = [p for k in ("map_rps", "lmap_rps") for p in r.get(k, [])] + [
            r[k] for k in ("dps", "red_diff", "latent_dps", "psld") if k in r]
        a, b = min(p["grey_w1"] for p in pts), max(p["grey_w1"] for p in pts)
        for p in pts:
            p["grey_w1"] = lo + (p["grey_w1"] - a) / (b - a) * (hi - lo)
            p["grey_w1_se"] = 0.0
    metrics["grey_w1_clean"] = lo
    return metrics


@pytest.mark.parametrize("squeeze", [False, True])
def test_dp_curve_axis_tick_labels_do_not_overlap(squeeze):
    """The default run's metrics (docs/digits_demo_default_metrics.json: grey-W1 from 0.003 to 0.27, both spaces),
    and the same squeezed into [0.0101, 0.0109]: every drawn x tick label is a plain number, at least two are drawn,
    and no two overlap (the former log axis's default minor labels, e.g. ``3 x 10^1`` next to ``4 x 10^1``, did)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "digits_demo_default_metrics.json")) as f:
        metrics = json.load(f)
    if squeeze:
        metrics = _squeeze_grey(metrics)
    fig = demo_mod.dp_curve_figure(metrics)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:len(metrics["tasks"])]:
        lo, hi = ax.get_xlim()
        labels = []
        for tick in ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks():
            lab = tick.label1
            if lab.get_visible() and lab.get_text().strip() and lo <= tick.get_loc() <= hi:
                labels.append(lab)
        assert 2 <= len(labels) <= 12, [t.get_text() for t in labels]
        for lab in labels:
            float(lab.get_text().replace("\u2212", "-"))  # plain numbers, no mathtext
        boxes = [lab.get_window_extent(renderer) for lab in labels]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not _boxes_overlap(boxes[i], boxes[j]), (labels[i].get_text(), labels[j].get_text())
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_dp_curve_of_an_old_metrics_file_says_what_is_missing():
    """A metrics.json from before grey-W1 (docs/digits_demo_metrics.json) cannot be plotted: a clear error."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "digits_demo_metrics.json")) as f:
        metrics = json.load(f)
    with pytest.raises(ValueError, match="grey_w1"):
        demo_mod.dp_curve_figure(metrics)


# ------------------------------------------------------------------------------------------------- testbed


@pytest.mark.parametrize("opt,val", [
    ("--w", "nan"), ("--w", "-1"), ("--zeta", "nan"), ("--zeta", "-0.1"), ("--t1", "-5"), ("--t1", "1000"),
    ("--t1", "nan"), ("--lr", "-1"), ("--lr", "0"), ("--n-iter", "0"), ("--sigma-y", "nan"), ("--sigma-y", "-1"),
    ("--scale", "nan"), ("--lr-min", "-1"), ("--n-measurements", "1"), ("--dim", "0"),
])
def test_testbed_garbage_options_are_refused_before_computing(capsys, no_compute, opt, val):
    rc, out, err = _run(capsys, ["testbed", "--quiet", opt, val])
    line = _one_clear_line(err, "testbed")
    assert rc == 2 and opt in line and out == ""


def test_testbed_config_validate_api():
    from mapreps_jax.testbed import TestbedConfig

    assert TestbedConfig().validate() is not None
    for bad in (dict(w=float("nan")), dict(zeta=float("nan")), dict(t1=-5.0), dict(lr=-1.0), dict(n_iter=0),
                dict(sigma_y=float("nan")), dict(sigma_y=-1.0), dict(t0=(0, 2.5)), dict(t0=()), dict(scale=math.inf),
                dict(red_diff_steps=0), dict(n_iter=1.5)):
        with pytest.raises(ValueError, match="testbed: --"):
            TestbedConfig(**bad).validate()


def test_testbed_json_never_holds_bare_nan(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(testbed_mod, "run_testbed", lambda cfg, progress=None: {"points": [{"D": float("nan")}]})
    out = tmp_path / "r.json"
    rc, stdout, err = _run(capsys, ["testbed", "--quiet", "--out", str(out)])
    assert rc == 2 and "NaN" in _one_clear_line(err, "testbed")
    assert stdout == "" and not out.exists()


# ------------------------------------------------------------------------------------------------- checkpoints


def test_missing_checkpoints_are_one_line_not_a_traceback(pngs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAPREPS_CHECKPOINTS", str(tmp_path / "nowhere"))
    rc, _, err = _run(capsys, ["restore", "--task", "sr4", "--input", str(pngs / "digit.png"),
                               "--out", str(tmp_path / "o")])
    line = _one_clear_line(err, "restore")
    assert rc == 2 and "MAPREPS_CHECKPOINTS" in line and "no such folder" in line
    monkeypatch.setenv("MAPREPS_CHECKPOINTS", str(tmp_path))  # exists, but holds no default/
    rc, _, err = _run(capsys, ["demo", "--quick", "--quiet", "--out", str(tmp_path / "o")])
    assert rc == 2 and "bundled checkpoint not found" in _one_clear_line(err, "demo")
    assert not (tmp_path / "o").exists()


def test_real_bugs_keep_their_traceback_and_debug_shows_it(capsys, monkeypatch):
    def bug(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(testbed_mod, "run_testbed", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["testbed", "--quiet"])
    rc = main(["--debug", "testbed", "--quiet", "--w", "nan"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("mapreps testbed: error:")


# ------------------------------------------------------------------------------------------------- convert


def _zip_with_pickle(path, data, members=()):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        for name, raw in members:
            zf.writestr(name, raw)
        zf.writestr("archive/version", "3\n")


def _convert(capsys, tmp_path, src, *extra):
    rc = main(["convert", "adm", "--config", "ffhq256", "--src", str(src), "--dst", str(tmp_path / "dst"),
               *extra])
    return rc, capsys.readouterr().err


def test_convert_deeply_nested_pickle_is_a_clear_error(tmp_path, capsys):
    depth = 100_000
    src = tmp_path / "deep.pt"
    _zip_with_pickle(src, b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")  # [[[...]]]
    rc, err = _convert(capsys, tmp_path, src)
    line = _one_clear_line(err, "convert adm")
    assert rc == 2 and "nested more than" in line
    with pytest.raises(pickle.UnpicklingError, match="nested more than"):
        torch_pickle.load_torch_pickle(str(src))
    # a list that contains itself is refused the same way (no infinite recursion)
    src2 = tmp_path / "cycle.pt"
    buf = io.BytesIO()
    lst = []
    lst.append(lst)
    pickle.dump(lst, buf, protocol=2)
    _zip_with_pickle(src2, buf.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="nested more than"):
        torch_pickle.load_torch_pickle(str(src2))
    assert not (tmp_path / "dst").exists()


def _tensor_pickle(size, stride, numel):
    """Protocol-2 pickle of ``{"w": _rebuild_tensor_v2(storage('0', FloatStorage, numel), 0, size, stride)}``."""
    g = lambda mod, name: pickle.GLOBAL + f"{mod}\n{name}\n".encode()  # noqa: E731

    def tup(vals):
        return pickle.MARK + b"".join(pickle.BININT + int(v).to_bytes(4, "little", signed=True)
                                      if v < 2**31 else b"\x8a\x08" + int(v).to_bytes(8, "little", signed=True)
                                      for v in vals) + pickle.TUPLE

    pid = (pickle.MARK + pickle.BINUNICODE + (7).to_bytes(4, "little") + b"storage" + g("torch", "FloatStorage")
           + pickle.BINUNICODE + (1).to_bytes(4, "little") + b"0" + pickle.BINUNICODE + (3).to_bytes(4, "little")
           + b"cpu" + b"\x8a\x08" + int(numel).to_bytes(8, "little") + pickle.TUPLE + pickle.BINPERSID)
    call = (g("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + pid + pickle.BININT + (0).to_bytes(4, "little")
            + tup(size) + tup(stride) + pickle.NEWFALSE + g("collections", "OrderedDict") + pickle.EMPTY_TUPLE
            + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE)
    return (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.BINUNICODE + (1).to_bytes(4, "little") + b"w"
            + call + pickle.SETITEM + pickle.STOP)


def test_convert_huge_declared_tensor_is_a_clear_error_not_memory_error(tmp_path, capsys):
    # 4 bytes of storage, a tensor of 10^12 floats through stride 0: 4 TB would be allocated
    src = tmp_path / "huge.pt"
    _zip_with_pickle(src, _tensor_pickle((10**12,), (0,), 1), [("archive/data/0", np.zeros(1, np.float32).tobytes())])
    with pytest.raises(pickle.UnpicklingError, match="more than this file"):
        torch_pickle.load_torch_pickle(str(src))
    rc, err = _convert(capsys, tmp_path, src)
    assert rc == 2 and "more than this file" in _one_clear_line(err, "convert adm")
    # a tensor within the file's size still reads (the same pickle writer)
    ok = tmp_path / "ok.pt"
    _zip_with_pickle(ok, _tensor_pickle((2, 3), (3, 1), 6),
                     [("archive/data/0", np.arange(6, dtype=np.float32).tobytes())])
    np.testing.assert_array_equal(torch_pickle.load_torch_pickle(str(ok))["w"],
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


def test_convert_truncated_or_damaged_pt_is_not_called_legacy(tmp_path, capsys):
    good = tmp_path / "good.pt"
    _zip_with_pickle(good, pickle.dumps(collections.OrderedDict(), protocol=2),
                     [("archive/data/0", bytes(range(256)) * 64)])
    raw = good.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated") as ei:
        torch_pickle.load_state_dict(str(trunc))
    assert "legacy" not in str(ei.value)
    rc, err = _convert(capsys, tmp_path, trunc)
    line = _one_clear_line(err, "convert adm")
    assert rc == 2 and "truncated" in line and "legacy" not in line
    # a flipped byte inside a stored member: the zip CRC check, reported as a damaged archive
    st = tmp_path / "st.pt"
    _zip_with_pickle(st, _tensor_pickle((4,), (1,), 4), [("archive/data/0", np.ones(4, np.float32).tobytes())])
    raw = bytearray(st.read_bytes())
    with zipfile.ZipFile(st) as zf:
        off = zf.getinfo("archive/data/0").header_offset + 30 + len("archive/data/0")
    raw[off] ^= 0xFF
    st.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged zip archive"):
        torch_pickle.load_torch_pickle(str(st))


def test_convert_overwrite_refuses_a_folder_that_is_not_a_converted_checkpoint(tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "thesis.tex").write_text("precious")
    src = tmp_path / "x.pt"
    src.write_bytes(b"whatever")
    rc, err = _convert(capsys, tmp_path, src, "--overwrite")
    line = _one_clear_line(err, "convert adm")
    assert rc == 2 and "not a converted checkpoint" in line and "refuses" in line
    assert (dst / "thesis.tex").read_text() == "precious"
    from mapreps_jax.networks.convert import check_replaceable

    (dst / "thesis.tex").unlink()
    assert check_replaceable(str(dst), True) == str(dst)  # an empty folder may be replaced
    (dst / "meta.json").write_text(json.dumps({"format": "mapreps-adm"}))
    assert check_replaceable(str(dst), True) == str(dst)  # and so may a converted checkpoint
    with pytest.raises(FileExistsError):
        check_replaceable(str(dst), False)


def test_converted_folder_modes_follow_the_umask(tmp_path):
    import jax

    from mapreps_jax.networks import ADMConfig, init_adm_params, save_converted

    cfg = ADMConfig.tiny()
    params = init_adm_params(jax.random.PRNGKey(0), cfg)
    old = os.umask(0o022)
    try:
        dst = save_converted(str(tmp_path / "ck"), params, cfg)
    finally:
        os.umask(old)
    assert os.stat(dst).st_mode & 0o777 == 0o755  # was 0700 (mkdtemp)
    for r, dirs, files in os.walk(dst):
        for d in dirs:
            assert os.stat(os.path.join(r, d)).st_mode & 0o777 == 0o755
        for f in files:
            assert os.stat(os.path.join(r, f)).st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------------- finite checks


def test_metrics_and_priors_use_the_shared_finite_check():
    import mapreps_jax.metrics as metrics
    import mapreps_jax.priors as priors

    assert not hasattr(metrics, "_check_finite") and not hasattr(priors, "_check_finite")
    x = np.zeros((2, 4), np.float32)
    bad = x.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match=r"rmse: x must be finite; got 1 NaN/inf value\(s\) of 8"):
        metrics.rmse(bad, x)
    with pytest.raises(ValueError, match=r"mmd: Y must be finite"):
        metrics.mmd(x, bad)
    with pytest.raises(ValueError, match=r"GaussianPrior: mu must be finite"):
        priors.GaussianPrior(mu=np.array([0.0, np.inf]), cov=np.eye(2))
