"""The paper's FFHQ presets (mapreps_jax.presets): every number as issue 12 states it, the objects they build, and
an end-to-end D-P sweep of each preset on a tiny random ADM at 16x16 (compared with dp_sweep called with the
settings written out here)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mapreps_jax as mr
from mapreps_jax.networks.registry import ModelNotFoundError
from mapreps_jax.presets import PRESETS, get_preset, load_preset_model, preset_help, restore_with_preset

# name: (task, operator kwargs, sigma_y after the code's doubling, N, lr, w, zeta, t0 list), from the text
EXPECTED = {
    "ffhq-denoise": ("denoise", {}, 0.3, 60, 0.5, 2.0, 1.0, [0, 25, 50, 75, 100]),
    "ffhq-inpaint-random": ("inpaint_random_official", {}, 0.2, 400, 0.5, 0.7, 1.0, [0, 25, 50, 75, 100]),
    "ffhq-sr4": ("sr", {"factor": 4, "kind": "avg"}, 0.2, 300, 0.5, 0.25, 1.0, [0, 100, 200, 300, 400]),
    "ffhq-deblur-aniso": ("aniso_blur_svd", {}, 0.0, 200, 0.5, 0.01, 2.0, [0, 25, 50, 75, 100]),
}


def test_preset_numbers_are_the_papers():
    assert set(PRESETS) == set(EXPECTED)
    for name, (task, kw, sigma_y, n, lr, w, zeta, t0s) in EXPECTED.items():
        p = PRESETS[name]
        assert p.name == name and p.task == task and dict(p.operator_kwargs) == kw
        assert (p.sigma_y, p.n_iter, p.lr, p.w, p.zeta, list(p.t0s)) == (sigma_y, n, lr, w, zeta, t0s)
        assert (p.t1, p.lr_min, p.solver, p.variance) == (10, 1e-5, "adamw", "learned")
        assert p.dps_official is True and p.model == "adm-ffhq256" and p.image_shape == (256, 256, 3)
        assert not isinstance(p.w, str)
    # the paper's stated noise: half the code's for inpainting and SR x4, the same for denoising / deblurring
    assert [PRESETS[k].sigma_y_paper for k in EXPECTED] == [0.3, 0.1, 0.1, 0.0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["ffhq-sr4"].w = 1.0
    with pytest.raises(ValueError, match="w must be a number"):
        dataclasses.replace(PRESETS["ffhq-sr4"], w="auto")


def test_preset_builds_operator_config_and_sampler():
    for name, (task, kw, sigma_y, n, lr, w, zeta, _) in EXPECTED.items():
        p = get_preset(name)
        op = p.operator()
        assert op.name == task and op.in_shape == (256, 256, 3)
        small = p.operator(shape=(16, 16, 3))  # other image shapes
        assert small.in_shape == (16, 16, 3)
        cfg = p.map_config()
        assert isinstance(cfg, mr.MAPConfig)
        assert (cfg.t1, cfg.w, cfg.n_iter, cfg.lr, cfg.lr_min, cfg.solver) == (10, w, n, lr, 1e-5, "adamw")
        s = p.sampler()
        # the paper code's DPS form (raw-eps mean, official learned-range noise); the clean step on request
        assert isinstance(s, mr.DPSStep) and (s.zeta, s.mean, s.variance) == (zeta, "raw", "learned_official")
        assert s == mr.DPSStep.official(zeta)
        clean = dataclasses.replace(p, dps_official=False).sampler()
        assert (clean.zeta, clean.mean, clean.variance) == (zeta, "rederived", "learned")
    assert get_preset("ffhq-sr4").operator().out_shape == (64, 64, 3)
    # the official tasks: block average with replication pinv; the 1/6 mask; the SVD deblur
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (16, 16, 3)), jnp.float32)
    sr = get_preset("ffhq-sr4").operator((16, 16, 3))
    np.testing.assert_allclose(sr.A(x), np.asarray(x).reshape(4, 4, 4, 4, 3).mean((1, 3)), atol=1e-6)
    np.testing.assert_allclose(sr.pinv(sr.A(x)), np.repeat(np.repeat(sr.A(x), 4, 0), 4, 1), atol=1e-6)
    m = np.asarray(get_preset("ffhq-inpaint-random").operator().data["mask"])
    assert (m == 0).mean() == pytest.approx(1 / 6, abs=0)
    assert get_preset(PRESETS["ffhq-denoise"]) is PRESETS["ffhq-denoise"]


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError) as e:
        get_preset("ffhq-sr8")
    for name in EXPECTED:
        assert name in str(e.value)


def test_preset_help_and_missing_weights(tmp_path):
    text = preset_help("ffhq-sr4")
    for part in ("ffhq_10m.pt", "mapreps convert adm --config ffhq256", "adm-ffhq256", "checkpoints/README.md"):
        assert part in text
    with pytest.raises(ModelNotFoundError) as e:
        load_preset_model("ffhq-deblur-aniso", checkpoints_dir=str(tmp_path))
    assert "ffhq_10m.pt" in str(e.value) and "mapreps convert adm" in str(e.value)


@pytest.fixture(scope="module")
def tiny_model():
    # 16x16x3, learned variance, one resolution level with attention (compiles in a few seconds)
    cfg = mr.ADMConfig.tiny(channel_mult=(1,), attention_resolutions=(16,))
    return mr.adm_score_model(cfg, mr.init_adm_params(jax.random.PRNGKey(0), cfg))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_restore_with_preset_end_to_end_on_tiny_adm(name, tiny_model):
    task, kw, sigma_y, _, lr, w, zeta, _ = EXPECTED[name]
    p = dataclasses.replace(get_preset(name), n_iter=3)  # a tiny N; everything else as the paper's
    shape = (16, 16, 3)
    x = jnp.asarray(np.random.default_rng(1).uniform(-0.9, 0.9, (1,) + shape), jnp.float32)
    op = mr.make_operator(task, shape, seed=0, **kw)
    y = op.measure(jax.random.PRNGKey(2), x, sigma_y)
    key = jax.random.PRNGKey(3)
    t0s = [0, 2]
    res = restore_with_preset(key, tiny_model, p, y, t0s=t0s, x_true=x)  # operator inferred from y's shape
    assert isinstance(res, mr.SweepResult)
    assert res.outputs.shape == (2, 1) + shape and np.all(np.isfinite(np.asarray(res.outputs)))
    assert res.nfe["stage1"] == 3 and res.nfe["total"] == 3 + 2
    np.testing.assert_array_equal(res.outputs[0], res.x_map)
    assert res.psnr.shape == (2, 1)
    # the same sweep with the settings written out here (and the operator passed explicitly)
    ref = mr.dp_sweep(key, tiny_model, op, y, t0s, x_true=x, sigma_y=sigma_y,
                      map_config=mr.MAPConfig(t1=10.0, w=w, n_iter=3, lr=lr, lr_min=1e-5),
                      sampler=mr.DPSStep(zeta=zeta, mean="raw", variance="learned_official"))
    np.testing.assert_array_equal(res.outputs, ref.outputs)
    np.testing.assert_array_equal(restore_with_preset(key, tiny_model, p, y, t0s=t0s, op=op).outputs, ref.outputs)
    # and the settings matter: another w gives another Stage-1 estimate
    other = restore_with_preset(key, tiny_model, dataclasses.replace(p, w=10 * w + 1.0), y, t0s=[0])
    assert not np.allclose(np.asarray(other.x_map), np.asarray(res.x_map))


def test_restore_with_preset_rejects_bad_measurement(tiny_model):
    with pytest.raises(ValueError, match="y"):
        restore_with_preset(jax.random.PRNGKey(0), tiny_model, "ffhq-sr4", jnp.zeros((4, 4, 3)))


@pytest.mark.slow
def test_restore_cli_with_a_preset_on_a_converted_network(tmp_path, capsys):
    """`mapreps restore --preset ffhq-sr4 --model DIR --input x.png --t0 0,2 --out OUT` on a converted tiny ADM (the
    preset's operator at the network's 16x16 size through restore_preset_files' image_shape; the CLI uses the
    preset's 256x256, so here the library call is compared with the written files); without weights, a clear error
    that says how to obtain and convert them."""
    from PIL import Image

    from mapreps_jax.cli import main
    from mapreps_jax.networks import save_converted
    from mapreps_jax.app.digits import png_bytes
    from mapreps_jax.presets import read_image_png, restore_preset_files

    cfg = mr.ADMConfig.tiny(channel_mult=(1,), attention_resolutions=(16,))
    params = mr.init_adm_params(jax.random.PRNGKey(0), cfg)
    model_dir = str(tmp_path / "adm-tiny")
    save_converted(model_dir, params, cfg)
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    np.testing.assert_allclose(read_image_png(str(tmp_path / "x.png"), (16, 16, 3)), img / 127.5 - 1.0, atol=1e-6)
    p = dataclasses.replace(get_preset("ffhq-sr4"), n_iter=2)
    model = mr.load_model(model_dir)
    files = restore_preset_files(model, p, str(tmp_path / "x.png"), [0, 2], image_shape=(16, 16, 3))
    assert sorted(files) == ["measurement.png", "restored_t0_0.png", "restored_t0_2.png"]
    # the same restoration through restore_with_preset, encoded the same way, from the same float32 input (the image
    # as read_image_png returns it: an input one float32 ulp away can move an output pixel across a PNG level)
    op = p.operator((16, 16, 3), seed=0)
    k_meas, k_run = jax.random.split(jax.random.PRNGKey(0))
    y = op.measure(k_meas, jnp.asarray(read_image_png(str(tmp_path / "x.png"), (16, 16, 3)))[None], p.sigma_y)
    ref = restore_with_preset(k_run, model, p, y, [0, 2], op=op)
    assert files["restored_t0_2.png"] == png_bytes(jnp.clip(ref.outputs[1, 0], -1, 1))
    # the CLI: a missing model folder is one clear error naming how to get the weights; no output written
    out = tmp_path / "out"
    rc = main(["restore", "--preset", "ffhq-sr4", "--model", str(tmp_path / "nope"), "--input",
               str(tmp_path / "x.png"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "no converted checkpoint folder" in err and "mapreps convert adm" in err
    assert not out.exists()
    # and a wrong input size for the preset's 256x256 network is refused before computing
    rc = main(["restore", "--preset", "ffhq-sr4", "--model", model_dir, "--input", str(tmp_path / "x.png"),
               "--t0", "0", "--out", str(out)])
    assert rc == 2 and "expected a 256x256 image with 3 channel(s), got 16x16" in capsys.readouterr().err
    assert not out.exists()
    # and a t0 outside the network's [0, 1000] is refused before the model is read
    rc = main(["restore", "--preset", "ffhq-sr4", "--model", str(tmp_path / "nope"), "--input",
               str(tmp_path / "x.png"), "--t0", "0,1200", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--t0: every t0 must be a whole number of steps in [0, 1000]" in err and "checkpoint" not in err
    assert not out.exists()
