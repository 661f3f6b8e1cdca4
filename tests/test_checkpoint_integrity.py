"""Checkpoint integrity and metadata (issue 12, part 7).

* The bundled checkpoint (``checkpoints/default``) carries ``checksums.json`` (SHA-256 and size of every weight
  file); a copy with flipped bytes, a truncated, missing or extra file is refused with one ``ValueError`` naming the
  file, before orbax reads anything; a reshaped or missing tensor is named too. Converted ADM checkpoints record the
  same per-file checksums in ``meta.json`` and are checked the same way.
* The diffusion schedule (kind, ``T``, parameters) is recorded when writing and restored when loading, for the
  bundled layout and for converted checkpoints; metadata without it still loads (linear, as before).
* ``$MAPREPS_CHECKPOINTS`` is the checkpoint root (holding ``default/`` and the converted model folders) for both
  the bundled prior and the model registry.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

import mapreps_jax.networks.registry as reg
from mapreps_jax.cli import main
from mapreps_jax.diffusion import linear_betas, make_schedule
from mapreps_jax.networks import ADMConfig, init_adm_params, load_converted, save_converted
from mapreps_jax.app.pretrained import load_classifier, load_default_prior, save_prior
from mapreps_jax.checkpoint_io import (MANIFEST_NAME, default_checkpoint_dir, restore_pytree, save_pytree,
                                       schedule_metadata, verify_checkpoint_files, write_manifest)

BUNDLE = default_checkpoint_dir() if not os.environ.get("MAPREPS_CHECKPOINTS") else None
REPO_BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "default")
TINY = ADMConfig.tiny()


@pytest.fixture(scope="module")
def tiny_params():
    return init_adm_params(jax.random.PRNGKey(0), TINY)


@pytest.fixture
def bundle_copy(tmp_path):
    """``<tmp>/root/default``: a copy of the bundled diffusion prior (config.json, checksums.json, diffusion/)."""
    dst = tmp_path / "root" / "default"
    dst.mkdir(parents=True)
    for f in ("config.json", MANIFEST_NAME):
        shutil.copy2(os.path.join(REPO_BUNDLE, f), dst / f)
    shutil.copytree(os.path.join(REPO_BUNDLE, "diffusion"), dst / "diffusion")
    return dst


def _largest(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def _flip(path, n=64):
    with open(path, "r+b") as f:
        mid = os.path.getsize(path) // 2
        f.seek(mid)
        chunk = f.read(n)
        f.seek(mid)
        f.write(bytes(b ^ 0xFF for b in chunk))


# ------------------------------------------------------------------------------------------------- bundled


def test_bundled_checkpoint_has_a_manifest_that_verifies():
    with open(os.path.join(REPO_BUNDLE, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    recorded = set(manifest["files"])
    for sub in ("classifier", "diffusion", "train_state"):
        files = {os.path.relpath(os.path.join(r, f), REPO_BUNDLE).replace(os.sep, "/")
                 for r, _, fs in os.walk(os.path.join(REPO_BUNDLE, sub)) for f in fs}
        assert files and files <= recorded, sub
        assert verify_checkpoint_files(os.path.join(REPO_BUNDLE, sub)) is True
    assert all(len(v["sha256"]) == 64 for v in manifest["files"].values())


def test_flipped_bytes_in_the_largest_file_are_refused(bundle_copy, capsys, monkeypatch, tmp_path):
    big = _largest(bundle_copy / "diffusion")
    _flip(big)
    with pytest.raises(ValueError, match="SHA-256 mismatch") as ei:
        load_default_prior(str(bundle_copy))
    assert big in str(ei.value) and "checksums.json" in str(ei.value)
    # the command line: one line, exit 2, no output folder (was: exit 0 with a useless image)
    monkeypatch.setenv("MAPREPS_CHECKPOINTS", str(bundle_copy.parent))
    src = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(src)
    rc = main(["restore", "--task", "denoise", "--input", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "SHA-256 mismatch" in lines[0] and os.path.basename(big) in lines[0]
    assert not (tmp_path / "o").exists()


def test_truncated_file_is_one_clear_error_before_orbax(bundle_copy, capfd):
    big = _largest(bundle_copy / "diffusion")
    size = os.path.getsize(big)
    with open(big, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=f"expected {size} bytes .* got {size // 2} bytes"):
        load_default_prior(str(bundle_copy))
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Traceback" not in err


def test_missing_and_extra_files_are_refused(bundle_copy):
    big = _largest(bundle_copy / "diffusion")
    moved = str(bundle_copy / "moved")
    os.rename(big, moved)
    with pytest.raises(ValueError, match="missing file"):
        load_default_prior(str(bundle_copy))
    os.rename(moved, big)
    (bundle_copy / "diffusion" / "tree" / "stray").write_bytes(b"x")
    with pytest.raises(ValueError, match="unexpected file"):
        load_default_prior(str(bundle_copy))


def test_reshaped_or_missing_tensor_is_named(bundle_copy):
    tree = restore_pytree(str(bundle_copy / "diffusion"))
    params = tree["params"]
    k = "kernel"  # the last conv, [3, 3, C, 1]
    params["out_2"][k] = params["out_2"][k].reshape(-1)
    save_pytree(str(bundle_copy / "diffusion"), {"params": params})  # re-records the manifest next to it
    assert verify_checkpoint_files(str(bundle_copy / "diffusion")) is True
    with pytest.raises(ValueError, match=rf"mis-shaped tensors: out_2/{k} \(expected"):
        load_default_prior(str(bundle_copy))
    del params["out_2"]
    save_pytree(str(bundle_copy / "diffusion"), {"params": params})
    with pytest.raises(ValueError, match="missing tensors: out_2/"):
        load_default_prior(str(bundle_copy))


# orbax's abandoned reads finish on other threads against its closed event loop ("Event loop is closed", raised in
# callbacks); outside pytest, restore_pytree silences exactly those; pytest replaces that hook for each test
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_without_a_manifest_a_damaged_file_is_still_a_value_error(bundle_copy):
    import gc
    import time

    os.remove(bundle_copy / MANIFEST_NAME)
    big = _largest(bundle_copy / "diffusion")
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)
    assert verify_checkpoint_files(str(bundle_copy / "diffusion")) is False
    with pytest.raises(ValueError, match="cannot restore the checkpoint"):
        load_default_prior(str(bundle_copy))
    time.sleep(0.5)  # let those callbacks run inside this test
    gc.collect()


def test_classifier_is_verified_too(tmp_path):
    dst = tmp_path / "default"
    dst.mkdir()
    shutil.copy2(os.path.join(REPO_BUNDLE, MANIFEST_NAME), dst / MANIFEST_NAME)
    shutil.copytree(os.path.join(REPO_BUNDLE, "classifier"), dst / "classifier")
    assert set(load_classifier(str(dst / "classifier"))) == set(load_classifier())
    _flip(_largest(dst / "classifier"))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        load_classifier(str(dst / "classifier"))


# ------------------------------------------------------------------------------------------------- schedule


def _edit_config(bundle, **changes):
    p = bundle / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


def test_bundled_schedule_parameters_are_read_from_config(bundle_copy):
    cfg = json.loads((bundle_copy / "config.json").read_text())
    assert cfg["schedule"] == "linear" and cfg["T"] == 1000 and cfg["schedule_params"] == {"beta_start": 1e-4,
                                                                                            "beta_end": 0.02}
    _edit_config(bundle_copy, schedule_params={"beta_start": 1e-4, "beta_end": 0.03})
    m = load_default_prior(str(bundle_copy))
    np.testing.assert_allclose(np.asarray(m.schedule.betas), linear_betas(1000, 1e-4, 0.03), rtol=1e-6)
    # older metadata (no schedule_params, or no schedule at all): linear 1e-4 -> 2e-2, as before
    _edit_config(bundle_copy, schedule_params=None)
    np.testing.assert_array_equal(np.asarray(load_default_prior(str(bundle_copy)).schedule.betas),
                                  np.asarray(make_schedule("linear").betas))
    _edit_config(bundle_copy, schedule=None, T=None)
    assert load_default_prior(str(bundle_copy)).T == 1000
    _edit_config(bundle_copy, schedule={"kind": "scaled_linear", "T": 500, "params": {}})
    m = load_default_prior(str(bundle_copy))
    assert m.T == 500
    np.testing.assert_array_equal(np.asarray(m.schedule.betas),
                                  np.asarray(make_schedule("scaled_linear", T=500).betas))
    _edit_config(bundle_copy, schedule="cosine")
    with pytest.raises(ValueError, match="config.json: invalid diffusion schedule 'cosine'"):
        load_default_prior(str(bundle_copy))


def test_save_prior_records_the_schedule_and_the_manifest(tiny_params, tmp_path):
    root = tmp_path / "bundle"
    rec = schedule_metadata("ldm_linear", 200, beta_end=0.02)
    save_prior(str(root), tiny_params, TINY, schedule=rec, extra_config={"prediction": "epsilon"})
    cfg = json.loads((root / "config.json").read_text())
    assert (cfg["schedule"], cfg["T"], cfg["schedule_params"]) == ("ldm_linear", 200, {"beta_end": 0.02})
    assert verify_checkpoint_files(str(root / "diffusion")) is True
    m = load_default_prior(str(root))
    np.testing.assert_array_equal(np.asarray(m.schedule.betas),
                                  np.asarray(make_schedule("ldm_linear", T=200, beta_end=0.02).betas))


def test_converted_checkpoint_records_and_restores_its_schedule(tiny_params, tmp_path, monkeypatch):
    d = str(tmp_path / "ck")
    save_converted(d, tiny_params, TINY, schedule=schedule_metadata("scaled_linear", 1000))
    meta = json.loads(open(os.path.join(d, "meta.json")).read())
    assert meta["schedule"] == {"kind": "scaled_linear", "T": 1000, "params": {}}
    m = reg.load_model(d)  # was always the linear schedule
    np.testing.assert_array_equal(np.asarray(m.schedule.betas), np.asarray(make_schedule("scaled_linear").betas))
    # a registered model whose checkpoint records another schedule than its entry is refused
    monkeypatch.setitem(reg._REGISTRY, "test-tiny", reg.ModelEntry(config=ADMConfig.tiny, subdir="ck",
                                                                   how_to_obtain="n/a"))
    with pytest.raises(ValueError, match="registered with the 'linear' schedule"):
        reg.load_model("test-tiny", checkpoints_dir=str(tmp_path))
    # older metadata without the field: linear, as before
    del meta["schedule"]
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    for m in (reg.load_model(d), reg.load_model("test-tiny", checkpoints_dir=str(tmp_path))):
        np.testing.assert_array_equal(np.asarray(m.schedule.betas), np.asarray(make_schedule("linear").betas))


def test_converted_checkpoint_files_are_verified_before_orbax(tiny_params, tmp_path, capfd):
    d = str(tmp_path / "ck")
    save_converted(d, tiny_params, TINY)
    meta = json.loads(open(os.path.join(d, "meta.json")).read())
    assert meta["files"] and all(k.startswith("params/") for k in meta["files"])
    big = _largest(os.path.join(d, "params"))
    size = os.path.getsize(big)
    with open(big, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match=f"expected {size} bytes as recorded in meta.json, got {size - 100}"):
        load_converted(d)
    assert "Event loop is closed" not in capfd.readouterr().err
    with open(big, "r+b") as f:
        f.truncate(0)
    save_converted(d, tiny_params, TINY, overwrite=True)
    _flip(_largest(os.path.join(d, "params")))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        load_converted(d)


# ------------------------------------------------------------------------------------------------- MAPREPS_CHECKPOINTS


def test_mapreps_checkpoints_is_the_root_for_the_bundle_and_the_registry(tiny_params, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(REPO_BUNDLE, root / "default")
    save_converted(str(root / "tiny"), tiny_params, TINY)
    monkeypatch.setitem(reg._REGISTRY, "test-tiny", reg.ModelEntry(config=ADMConfig.tiny, subdir="tiny",
                                                                   how_to_obtain="n/a"))
    monkeypatch.setenv("MAPREPS_CHECKPOINTS", str(root))
    assert default_checkpoint_dir() == str(root / "default")
    assert load_default_prior().T == 1000  # <root>/default (was <root> itself)
    assert reg.load_model("test-tiny").name == "test-tiny"  # <root>/tiny
    # a missing root: both say which setting is wrong
    monkeypatch.setenv("MAPREPS_CHECKPOINTS", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="MAPREPS_CHECKPOINTS=.*no such folder"):
        load_default_prior()
    with pytest.raises(reg.ModelNotFoundError, match="MAPREPS_CHECKPOINTS=.*no such folder"):
        reg.load_model("test-tiny")
    # the bundle itself instead of the root: told to name its parent
    monkeypatch.setenv("MAPREPS_CHECKPOINTS", REPO_BUNDLE)
    with pytest.raises(FileNotFoundError, match="names a checkpoint bundle itself"):
        load_default_prior()


def test_write_manifest_records_every_weight_folder(tmp_path):
    (tmp_path / "diffusion" / "tree").mkdir(parents=True)
    (tmp_path / "diffusion" / "tree" / "a").write_bytes(b"abc")
    (tmp_path / "classifier").mkdir()
    (tmp_path / "classifier" / "b").write_bytes(b"")
    m = write_manifest(str(tmp_path))
    assert set(m["files"]) == {"diffusion/tree/a", "classifier/b"}
    assert m["files"]["diffusion/tree/a"]["sha256"] == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert verify_checkpoint_files(str(tmp_path / "diffusion")) is True
