"""Flax ADM UNet, torch-free checkpoint reader, strict converter, orbax checkpoints and registry (no torch needed).

Equality with the PyTorch reference is in ``test_adm_torchref.py``; here every check is against an independent
reference (the committed manifests of the real checkpoints, numpy implementations of the building blocks written
from guided-diffusion's NCHW/NCT definitions, hand-built torch-layout archives) or a property (round trip,
determinism, tracing once).
"""

import collections
import dataclasses
import json
import math
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapreps_jax.diffusion import learned_range_std, make_schedule
from mapreps_jax.model import ScoreModel
from mapreps_jax.networks import registry as reg
from mapreps_jax.networks.adm import (ADMConfig, AttentionBlock, GroupNorm32, adm_apply, adm_score_model,
                                      count_params, init_adm_params, param_shapes, timestep_embedding)
from mapreps_jax.networks.layouts import to_flax as _to_flax  # noqa: E402
from mapreps_jax.networks.convert import (convert_adm_state_dict, convert_command, expected_torch_shapes,
                                          flax_to_torch_state_dict, load_converted, read_manifest, save_converted,
                                          sha256_file)
from mapreps_jax.networks.torch_pickle import load_state_dict, load_torch_state_dict

TINY = ADMConfig.tiny()
# one level, attention at the input resolution: the cheapest network to compile (for the option tests)
SMALL = ADMConfig.tiny(image_size=8, channel_mult=(1,), attention_resolutions=(8,))
_fwd = jax.jit(adm_apply, static_argnums=0)  # compiled once per (config, shapes)


@pytest.fixture(scope="module")
def tiny_params():
    return init_adm_params(jax.random.PRNGKey(0), TINY)


def _x(key=1, b=2, size=16, c=3):
    return jax.random.normal(jax.random.PRNGKey(key), (b, size, size, c), jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# a writer of torch.save's zip layout (no torch): data.pkl with persistent storage ids + raw storages


class _Global:
    """Pickled as the GLOBAL opcode ``module\\nname`` (so no torch module is needed to write the file)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *a):  # save_reduce requires a callable; never called
        raise AssertionError


class _StorageRef:
    def __init__(self, key, stype, array):
        self.key, self.stype, self.array = key, stype, array


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _TorchLikePickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global_marker(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[_Global] = _save_global_marker

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", _Global("torch", obj.stype), obj.key, "cpu", int(obj.array.size))
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _TensorRef):
            return (_Global("torch._utils", "_rebuild_tensor_v2"),
                    (obj.storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict()))
        return NotImplemented


_STYPE = {"float32": "FloatStorage", "float16": "HalfStorage", "int64": "LongStorage", "bfloat16": "BFloat16Storage",
          "float64": "DoubleStorage"}


def _tensor_ref(arr, key):
    arr = np.array(arr, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    st = _StorageRef(key, _STYPE[str(arr.dtype)], arr.reshape(-1))
    strides = tuple(s // arr.itemsize for s in arr.strides)
    return _TensorRef(st, 0, arr.shape, strides)


def write_torch_zip(path, obj, byteorder="little", prefix="archive"):
    """Write ``obj`` (containers of :class:`_TensorRef`) in torch.save's zip layout, protocol 2."""
    import io

    buf = io.BytesIO()
    _TorchLikePickler(buf, protocol=2).dump(obj)
    storages = {}

    def collect(o):
        if isinstance(o, _TensorRef):
            storages[o.storage.key] = o.storage
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)

    collect(obj)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", buf.getvalue())
        zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, st in storages.items():
            a = st.array
            if byteorder == "big" and a.dtype.itemsize > 1:
                a = a.view(f"u{a.dtype.itemsize}").astype(f">u{a.dtype.itemsize}")
            zf.writestr(f"{prefix}/data/{key}", a.tobytes())
        zf.writestr(f"{prefix}/version", "3\n")


def _state_dict_zip(path, sd):
    od = collections.OrderedDict((k, _tensor_ref(v, str(i))) for i, (k, v) in enumerate(sd.items()))
    od._metadata = collections.OrderedDict([("", {"version": 1})])  # like torch's state_dict (pickle BUILD)
    write_torch_zip(path, od)


# ----------------------------------------------------------------------------------------------------------------
# architecture vs the committed manifests of the real checkpoints


@pytest.mark.parametrize("name,config,n_tensors,n_params", [
    ("ffhq256", ADMConfig.ffhq256(), 362, 93_563_910),
    ("imagenet256", ADMConfig.imagenet256(), 566, 552_814_086),
])
def test_architecture_matches_manifest(name, config, n_tensors, n_params):
    manifest = read_manifest(name)
    assert len(manifest) == n_tensors
    expected = expected_torch_shapes(config)  # from jax.eval_shape of the Flax init
    missing = sorted(set(manifest) - set(expected))
    unexpected = sorted(set(expected) - set(manifest))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    bad = {k: (manifest[k], expected[k]) for k in manifest if manifest[k] != expected[k]}
    assert not bad, list(bad.items())[:5]
    assert count_params(param_shapes(config)) == n_params == sum(math.prod(s) for s in manifest.values())


def test_ffhq_manifest_state_dict_converts_strictly():
    """A state dict with exactly the manifest's keys/shapes converts (every key mapped); one key off -> error."""
    cfg = ADMConfig.ffhq256()
    sd = {k: np.zeros(s, np.float16) for k, s in read_manifest("ffhq256").items()}
    params = convert_adm_state_dict(sd, cfg)
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(lambda a: a.shape, param_shapes(cfg))
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------------------------------------------
# building blocks vs numpy references written from the PyTorch (NCHW / NCT) definitions


def test_timestep_embedding_closed_form():
    t = np.array([0.0, 1.0, 17.5, 999.0])
    for dim in (32, 33):
        half = dim // 2
        f = np.exp(-np.log(10000.0) * np.arange(half) / half)
        ref = np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], 1)
        if dim % 2:
            ref = np.concatenate([ref, np.zeros((len(t), 1))], 1)
        np.testing.assert_allclose(np.asarray(timestep_embedding(t, dim)), ref, atol=2e-4)


def test_groupnorm_matches_numpy():
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 64)).astype(np.float32) * 3 + 1
    gn = GroupNorm32(32)
    p = {"scale": np.linspace(0.5, 1.5, 64, dtype=np.float32), "bias": np.linspace(-1, 1, 64, dtype=np.float32)}
    out = np.asarray(gn.apply({"params": p}, x))
    xg = x.astype(np.float64).reshape(2, 16, 32, 2)  # NHWC: channel c -> group c // 2
    xg = xg.transpose(0, 2, 1, 3).reshape(2, 32, -1)
    mu, var = xg.mean(-1, keepdims=True), xg.var(-1, keepdims=True)
    ref = ((xg - mu) / np.sqrt(var + 1e-5)).reshape(2, 32, 16, 2).transpose(0, 2, 1, 3).reshape(x.shape)
    np.testing.assert_allclose(out, ref * p["scale"] + p["bias"], atol=1e-5)


def test_conv_layout_conversion_matches_nchw_cross_correlation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 5, 6))
    w = rng.standard_normal((4, 3, 3, 3))  # OIHW
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros((1, 4, 5, 6))
    for i in range(5):
        for j in range(6):
            ref[0, :, i, j] = np.einsum("oikl,ikl->o", w, xp[0, :, i:i + 3, j:j + 3])
    with jax.default_matmul_precision("highest"):
        y = jax.lax.conv_general_dilated(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32),
                                         jnp.asarray(_to_flax("conv", w), jnp.float32), (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(y).transpose(0, 3, 1, 2), ref, atol=1e-4)


def _attention_numpy(x_nct, wqkv, bqkv, wout, bout, gamma, beta, heads, legacy):
    """guided-diffusion's AttentionBlock on [B, C, T] with conv1d weights [O, I] (float64)."""
    b, c, t = x_nct.shape
    xg = x_nct.reshape(b, 32, -1)
    xn = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-5)).reshape(b, c, t)
    xn = xn * gamma[None, :, None] + beta[None, :, None]
    qkv = np.einsum("oi,bit->bot", wqkv, xn) + bqkv[None, :, None]
    ch = c // heads
    if legacy:  # reshape (B*heads, 3*ch, T), then split
        r = qkv.reshape(b * heads, 3 * ch, t)
        q, k, v = r[:, :ch], r[:, ch:2 * ch], r[:, 2 * ch:]
    else:  # chunk into q, k, v, then heads
        q, k, v = (a.reshape(b * heads, ch, t) for a in np.split(qkv, 3, axis=1))
    s = 1 / math.sqrt(math.sqrt(ch))
    w = np.einsum("bct,bcs->bts", q * s, k * s)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    a = np.einsum("bts,bcs->bct", w, v).reshape(b, c, t)
    return x_nct + np.einsum("oi,bit->bot", wout, a) + bout[None, :, None]


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_head_order_matches_numpy(legacy):
    rng = np.random.default_rng(2)
    c, heads = 64, 4
    x = rng.standard_normal((2, 4, 4, c))
    wqkv, bqkv = rng.standard_normal((3 * c, c, 1)) / 8, rng.standard_normal(3 * c) / 4
    wout, bout = rng.standard_normal((c, c, 1)) / 8, rng.standard_normal(c) / 4
    gamma, beta = 1 + 0.1 * rng.standard_normal(c), 0.1 * rng.standard_normal(c)
    params = {"norm": {"scale": gamma, "bias": beta},
              "qkv": {"kernel": _to_flax("conv1d", wqkv), "bias": bqkv},
              "proj_out": {"kernel": _to_flax("conv1d", wout), "bias": bout}}
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    blk = AttentionBlock(num_heads=heads, num_head_channels=-1, legacy_order=legacy)
    with jax.default_matmul_precision("highest"):
        out = np.asarray(blk.apply({"params": params}, jnp.asarray(x, jnp.float32)))
    x_nct = x.reshape(2, 16, c).transpose(0, 2, 1)
    ref = _attention_numpy(x_nct, wqkv[:, :, 0], bqkv, wout[:, :, 0], bout, gamma, beta, heads, legacy)
    np.testing.assert_allclose(out, ref.transpose(0, 2, 1).reshape(x.shape), atol=1e-4)
    # the two orders really differ (so the test can tell them apart)
    other = _attention_numpy(x_nct, wqkv[:, :, 0], bqkv, wout[:, :, 0], bout, gamma, beta, heads, not legacy)
    assert np.max(np.abs(other - ref)) > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# the network and its ScoreModel


def test_forward_shapes_and_score_model(tiny_params):
    x = _x()
    out = _fwd(TINY, tiny_params, x, jnp.array([3.0, 500.0]))
    assert out.shape == (2, 16, 16, 6) and out.dtype == jnp.float32
    model = adm_score_model(TINY, tiny_params)
    assert isinstance(model, ScoreModel) and model.learned_variance and model.T == 1000
    ev = jax.jit(lambda m, x, t: m.eps_and_var(x, t))
    eps, v = ev(model, x, jnp.array([3.0, 500.0]))
    np.testing.assert_allclose(np.asarray(eps), np.asarray(out[..., :3]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v), np.asarray(out[..., 3:]), rtol=1e-6, atol=1e-6)
    # scalar t == broadcast t; real t is accepted and differs from its integer neighbours
    e7 = np.asarray(_fwd(TINY, tiny_params, x, 7.0))
    np.testing.assert_allclose(e7, np.asarray(_fwd(TINY, tiny_params, x, jnp.array([7.0, 7.0]))), atol=1e-6)
    e_real = np.asarray(_fwd(TINY, tiny_params, x, 7.5))
    assert np.all(np.isfinite(e_real)) and not np.allclose(e_real, e7)
    std = learned_range_std(model.schedule, 500, jnp.clip(v[1:], -1, 1))
    sched = make_schedule("linear")
    assert np.all(np.isfinite(np.asarray(std)))
    assert float(std.max()) <= math.sqrt(float(sched.betas[500])) * (1 + 1e-6)


def test_no_learn_sigma_returns_eps_only():
    cfg = dataclasses.replace(SMALL, learn_sigma=False, in_channels=1, out_channels=1)
    p = init_adm_params(jax.random.PRNGKey(3), cfg)
    model = adm_score_model(cfg, p)
    assert not model.learned_variance
    eps, v = jax.jit(lambda m, x: m.eps_and_var(x, 10))(model, _x(c=1, size=8))
    assert eps.shape == (2, 8, 8, 1) and v is None


def test_bad_inputs_raise():
    p = {}  # input checks come before any parameter is read
    with pytest.raises(ValueError, match="NHWC"):
        adm_apply(TINY, p, jnp.zeros((2, 3, 16, 16)), 1)
    with pytest.raises(ValueError, match="multiples of 2"):
        adm_apply(TINY, p, jnp.zeros((1, 15, 15, 3)), 1)
    with pytest.raises(ValueError, match="t must be"):
        adm_apply(TINY, p, jnp.zeros((2, 16, 16, 3)), jnp.zeros(3))
    with pytest.raises(ValueError, match="num_groups"):
        ADMConfig.tiny(model_channels=48)
    with pytest.raises(ValueError, match="dtype"):
        ADMConfig.tiny(dtype="float8")
    with pytest.raises(TypeError, match="ADMConfig"):
        adm_score_model({"model_channels": 32}, {})


def test_deterministic_and_jit_traces_once(tiny_params):
    traces = []

    @jax.jit
    def f(model, x, t):
        traces.append(1)
        return model.eps(x, t)

    x = _x()
    m1 = adm_score_model(TINY, tiny_params)
    a = f(m1, x, jnp.array([1.0, 2.0]))
    # a second model object with an equal config and new params/inputs: same trace
    p2 = jax.tree_util.tree_map(lambda q: q * 1.01, tiny_params)
    b = f(adm_score_model(TINY, p2), x + 0.1, jnp.array([5.0, 9.0]))
    c = f(m1, x, jnp.array([1.0, 2.0]))
    assert len(traces) == 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_remat_and_bfloat16():
    params = init_adm_params(jax.random.PRNGKey(5), SMALL)
    x, t = _x(size=8), jnp.array([10.0, 600.0])

    def grads(cfg):
        loss = lambda p, x: jnp.sum(adm_apply(cfg, p, x, t) ** 2)  # noqa: E731
        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    g0, g1 = grads(SMALL), grads(dataclasses.replace(SMALL, remat=True))
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(g0))
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
    out32 = _fwd(SMALL, params, x, t)
    out16 = _fwd(dataclasses.replace(SMALL, dtype="bfloat16"), params, x, t)
    assert out16.dtype == jnp.float32
    rel = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
    assert 0 < rel < 0.1, rel


# ----------------------------------------------------------------------------------------------------------------
# torch-free reader


def test_reader_reads_handmade_torch_zip(tmp_path):
    rng = np.random.default_rng(4)
    base = rng.standard_normal((5, 7)).astype(np.float32)
    st = _StorageRef("0", "FloatStorage", base.reshape(-1))
    half = rng.standard_normal((3, 2)).astype(np.float16)
    bf = np.asarray(jnp.asarray(rng.standard_normal(4), jnp.bfloat16))
    obj = {"state_dict": collections.OrderedDict([
        ("w", _TensorRef(st, 0, (5, 7), (7, 1))),
        ("wT", _TensorRef(st, 0, (7, 5), (1, 7))),         # a transposed view of the same storage
        ("row2", _TensorRef(st, 14, (7,), (1,))),          # offset into the storage
        ("h", _tensor_ref(half, "1")),
        ("bf", _tensor_ref(bf, "2")),
        ("step", _tensor_ref(np.array(12345, np.int64), "3")),
        ("empty", _TensorRef(_StorageRef("4", "FloatStorage", np.zeros(0, np.float32)), 0, (0, 3), (3, 1))),
    ]), "epoch": 3}
    for order in ("little", "big"):
        path = str(tmp_path / f"ck_{order}.pt")
        write_torch_zip(path, obj, byteorder=order)
        sd = load_torch_state_dict(path)
        np.testing.assert_array_equal(sd["w"], base)
        np.testing.assert_array_equal(sd["wT"], base.T)
        np.testing.assert_array_equal(sd["row2"], base[2])
        assert sd["h"].dtype == np.float16 and np.array_equal(sd["h"], half)
        assert str(sd["bf"].dtype) == "bfloat16" and np.array_equal(sd["bf"].astype(np.float32), bf.astype(np.float32))
        assert sd["step"].shape == () and int(sd["step"]) == 12345
        assert sd["empty"].shape == (0, 3)


def test_reader_refuses_malicious_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for payload in (Evil(), {"state_dict": {"w": Evil()}}):
        path = str(tmp_path / "evil.pt")
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
            zf.writestr("archive/version", "3\n")
        with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (os|posix)\.system"):
            load_torch_state_dict(path)
        assert not marker.exists()
    # builtins.eval via the GLOBAL opcode
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00print('hi')\x85R.")
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        load_torch_state_dict(path)


def test_reader_rejects_out_of_bounds_tensor_and_legacy_format(tmp_path):
    st = _StorageRef("0", "FloatStorage", np.zeros(6, np.float32))
    path = str(tmp_path / "oob.pt")
    write_torch_zip(path, {"w": _TensorRef(st, 2, (2, 3), (3, 1))})
    with pytest.raises(pickle.UnpicklingError, match="past the end"):
        load_torch_state_dict(path)
    legacy = str(tmp_path / "legacy.pt")
    with open(legacy, "wb") as f:
        pickle.dump({"w": [1.0]}, f, protocol=2)
    with pytest.raises(ValueError, match="legacy"):
        load_state_dict(legacy)
    with pytest.raises(FileNotFoundError):
        load_state_dict(str(tmp_path / "nope.pt"))


# ----------------------------------------------------------------------------------------------------------------
# converter, checkpoints, command line, registry


def test_convert_round_trip_and_strict_errors(tiny_params):
    sd = flax_to_torch_state_dict(tiny_params, TINY)
    assert set(sd) == set(expected_torch_shapes(TINY))
    back = convert_adm_state_dict(sd, TINY)
    for a, b in zip(jax.tree_util.tree_leaves(tiny_params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)
    k0 = "input_blocks.1.0.in_layers.2.weight"
    assert sd[k0].shape == (32, 32, 3, 3)  # torch OIHW
    with pytest.raises(ValueError, match=r"missing keys: input_blocks\.1\.0\.in_layers\.2\.weight"):
        convert_adm_state_dict({k: v for k, v in sd.items() if k != k0}, TINY)
    with pytest.raises(ValueError, match=r"unexpected keys: label_emb\.weight"):
        convert_adm_state_dict({**sd, "label_emb.weight": np.zeros((10, 128), np.float32)}, TINY)
    with pytest.raises(ValueError, match=r"mis-shaped keys: out\.2\.bias \(expected \(6,\), got \(3,\)\)"):
        convert_adm_state_dict({**sd, "out.2.bias": np.zeros(3, np.float32)}, TINY)
    with pytest.raises(ValueError, match="non-floating"):
        convert_adm_state_dict({**sd, "out.2.bias": np.zeros(6, np.int64)}, TINY)
    with pytest.raises(ValueError, match="missing keys"):
        convert_adm_state_dict(sd, ADMConfig.tiny(num_res_blocks=2))


def test_orbax_round_trip_and_clear_errors(tiny_params, tmp_path):
    dst = str(tmp_path / "adm-tiny")
    save_converted(dst, tiny_params, TINY, source_sha256="ab" * 32, source_name="tiny.pt")
    assert sorted(os.listdir(tmp_path)) == ["adm-tiny"]  # no temporary left behind
    params, cfg, meta = load_converted(dst, expected_config=TINY, expected_source_sha256="ab" * 32)
    assert cfg == TINY and meta["source_sha256"] == "ab" * 32 and meta["num_tensors"] == len(expected_torch_shapes(TINY))
    x, t = _x(), jnp.array([4.0, 900.0])
    np.testing.assert_array_equal(np.asarray(_fwd(TINY, tiny_params, x, t)), np.asarray(_fwd(cfg, params, x, t)))
    with pytest.raises(FileExistsError):
        save_converted(dst, tiny_params, TINY)
    with pytest.raises(ValueError, match="num_res_blocks: checkpoint 1 != expected 2"):
        load_converted(dst, expected_config=ADMConfig.tiny(num_res_blocks=2))
    with pytest.raises(ValueError, match="SHA-256"):
        load_converted(dst, expected_source_sha256="cd" * 32)
    # dtype/remat of the expected config are applied, not compared
    _, cfg16, _ = load_converted(dst, expected_config=dataclasses.replace(TINY, dtype="bfloat16"), verify=False)
    assert cfg16.dtype == "bfloat16"

    # corrupt the largest params file: a clear ValueError (orbax error or checksum mismatch)
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(dst, "params")) for f in fs]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        f.seek(os.path.getsize(big) // 2)
        chunk = f.read(64)
        f.seek(os.path.getsize(big) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(ValueError, match="corrupt"):
        load_converted(dst)
    with open(os.path.join(dst, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="corrupt meta.json"):
        load_converted(dst)
    with pytest.raises(ValueError, match="no meta.json"):
        load_converted(str(tmp_path))


def test_convert_command_end_to_end(tiny_params, tmp_path, capsys):
    sd = flax_to_torch_state_dict(tiny_params, TINY)
    src = str(tmp_path / "tiny.pt")
    _state_dict_zip(src, sd)
    cfg_json = str(tmp_path / "tiny.json")
    with open(cfg_json, "w") as f:
        json.dump(TINY.to_dict(), f)
    dst = str(tmp_path / "ck")
    assert convert_command(["adm", "--config", cfg_json, "--src", src, "--dst", dst]) == 0
    assert "done" in capsys.readouterr().out
    params, cfg, meta = load_converted(dst, expected_config=TINY, expected_source_sha256=sha256_file(src))
    for a, b in zip(jax.tree_util.tree_leaves(tiny_params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # errors: exit status 2 with a message, no output directory
    assert convert_command(["adm", "--config", "ffhq256", "--src", src, "--dst", str(tmp_path / "bad")]) == 2
    assert "missing keys" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad")
    assert convert_command(["adm", "--config", "ffhq256", "--src", src, "--dst", dst]) == 2  # exists
    assert convert_command(["adm", "--config", cfg_json, "--src", src, "--dst", str(tmp_path / "x"),
                            "--expected-sha256", "0" * 64]) == 2


def test_safetensors_source(tiny_params, tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    sd = flax_to_torch_state_dict(tiny_params, TINY)
    path = str(tmp_path / "tiny.safetensors")
    st.save_file(sd, path)
    back = load_state_dict(path)
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_registry(tiny_params, tmp_path, monkeypatch):
    with pytest.raises(reg.ModelNotFoundError) as ei:
        reg.load_model("adm-ffhq256", checkpoints_dir=str(tmp_path))
    msg = str(ei.value)
    assert "ffhq_10m.pt" in msg and "mapreps convert adm --config ffhq256 --src ffhq_10m.pt" in msg
    with pytest.raises(reg.ModelNotFoundError, match="256x256_diffusion_uncond.pt"):
        reg.load_model("adm-imagenet256", checkpoints_dir=str(tmp_path))
    with pytest.raises(ValueError, match="neither a registered model"):
        reg.load_model("no-such-model")

    save_converted(str(tmp_path / "tiny"), tiny_params, TINY)
    monkeypatch.setitem(reg._REGISTRY, "test-tiny",
                        reg.ModelEntry(config=ADMConfig.tiny, subdir="tiny", how_to_obtain="n/a"))
    monkeypatch.setenv("MAPREPS_CHECKPOINTS", str(tmp_path))
    m = reg.load_model("test-tiny")
    m2 = reg.load_model(str(tmp_path / "tiny"), remat=True)
    assert m.name == "test-tiny" and m.learned_variance and m2.apply.config.remat
    eps = jax.jit(lambda m, x: m.eps(x, 3.0))
    x = _x()
    np.testing.assert_array_equal(np.asarray(eps(m, x)), np.asarray(eps(adm_score_model(TINY, tiny_params), x)))
    with pytest.raises(ValueError, match="already registered"):
        reg.register_model("adm-ffhq256", ADMConfig.ffhq256, "x", "y")
