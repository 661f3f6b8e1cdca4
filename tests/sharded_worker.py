"""Sharded-vs-single-device checks, run by ``tests/test_sharding.py`` in a fresh interpreter with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX starts, so not in the pytest process);
``sharded_worker.py digits`` runs the XLA:CPU regression case, with 2 devices.

Prints one JSON object: per case the largest absolute difference between :func:`mapreps_jax.sharding.run_sharded`
and the same function jitted on one device with the same per-image keys, whether they are bitwise equal, the output's
sharding, and compile-cache facts. The assertions are in the test."""

import json
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import mapreps_jax as mr  # noqa: E402  (first: the package's XLA:CPU settings)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mapreps_jax import sharding as S  # noqa: E402

SIGMA_Y = 0.1


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_eps(params, x_t, t, cond=None):
    """A small two-layer convolutional noise predictor (random weights): the algorithms' sharding does not depend
    on the network, and this one compiles in a fraction of a UNet's time."""
    t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1])
    h = _conv(x_t, params["w1"]) + jnp.sin(t / 300.0)[:, None, None, None] * params["temb"]
    return _conv(jax.nn.silu(h), params["w2"])


def _conv_params(seed, c_in, width=16):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"w1": jax.random.normal(k1, (3, 3, c_in, width)) / np.sqrt(9 * c_in),
            "w2": jax.random.normal(k2, (3, 3, width, c_in)) / np.sqrt(9 * width),
            "temb": jax.random.normal(k3, (width,))}


def conv_encode(params, x, key=None):
    """16x16x1 images -> 8x8x4 latents: 2x2 space-to-depth, then a 1x1 mixing of the four channels."""
    b, h, w, c = x.shape
    z = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)
    return jnp.tanh(z @ params["enc"])


def conv_decode(params, z):
    """8x8x4 latents -> 16x16x1 images (the inverse layout of :func:`conv_encode`, through a 1x1 mixing)."""
    b, h, w, c = z.shape
    x = (z @ params["dec"]).reshape(b, h, w, 2, 2, 1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, 2 * h, 2 * w, 1)


def _pixel():
    model = mr.from_eps_fn(conv_eps, _conv_params(0, 1), mr.make_schedule("linear"), name="conv")
    return model, (16, 16, 1)


def _latent():
    # a small latent model (16x16x1 images <-> 8x8x4 latents): the encoder / score network / decoder composition
    # that LMAP-RPS runs
    import dataclasses

    m = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0].astype(np.float32)
    space = mr.latent_space({"enc": jnp.asarray(m), "dec": jnp.asarray(m.T)}, conv_encode, conv_decode, name="conv")
    model = mr.from_eps_fn(conv_eps, _conv_params(1, 4), mr.make_schedule("scaled_linear"), name="conv-latent")
    return dataclasses.replace(model, space=space), (16, 16, 1)


def _images(shape, b, seed):
    return jnp.tanh(jax.random.normal(jax.random.PRNGKey(seed), (b,) + shape))


def _spec(x):
    s = getattr(x, "sharding", None)
    return str(getattr(s, "spec", s))


def _compare(name, fn, model, op, y, *args, out_axis=0, mesh=None, **kw):
    t_start = time.perf_counter()
    key = jax.random.PRNGKey(7)
    b = y.shape[0]
    static = {k: v for k, v in kw.items() if S._is_static(v)}
    traced = {k: v for k, v in kw.items() if not S._is_static(v)}
    ref_fn = jax.jit(lambda k, m, o, yy, a, t: fn(k, m, o, yy, *a, **static, **t))
    ref = ref_fn(mr.image_keys(key, b), model, op, y, args, traced)
    out = S.run_sharded(fn, key, model, op, y, *args, out_axis=out_axis, mesh=mesh, **kw)
    padded = S.run_sharded(fn, key, model, op, y, *args, out_axis=out_axis, mesh=mesh, trim=False, **kw)
    n_cache = len(S._JIT_CACHE)
    again = S.run_sharded(fn, key, model, op, y, *args, out_axis=out_axis, mesh=mesh, **kw)
    leaves_ref, leaves_out = jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)
    diff = max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(leaves_out, leaves_ref))
    scale = max(float(jnp.max(jnp.abs(r))) for r in leaves_ref)
    p0 = jax.tree_util.tree_leaves(padded)[0]
    axes = [out_axis] * len(leaves_out) if isinstance(out_axis, int) else list(out_axis)
    return name, {
        "batch": b, "max_abs_diff": diff, "ref_scale": scale,
        "bitwise": all(bool(jnp.array_equal(a, r)) for a, r in zip(leaves_out, leaves_ref)),
        "shape_ok": all(a.shape == r.shape for a, r in zip(leaves_out, leaves_ref)),
        "padded_rows": int(p0.shape[0] if p0.ndim and p0.shape[0] >= b else -1),
        "padded_spec": _spec(p0), "out_spec": _spec(leaves_out[0]),
        "trim_equals_padded": all(bool(jnp.array_equal(a, jax.lax.slice_in_dim(p, 0, b, axis=ax)))
                                  for a, p, ax in zip(leaves_out, jax.tree_util.tree_leaves(padded), axes)),
        "rerun_identical": all(bool(jnp.array_equal(a, c))
                               for a, c in zip(leaves_out, jax.tree_util.tree_leaves(again))),
        "no_new_compile": len(S._JIT_CACHE) == n_cache,
        "finite": all(bool(jnp.all(jnp.isfinite(a))) for a in leaves_out),
        "seconds": round(time.perf_counter() - t_start, 2),
    }


def digits_regression():
    """Regression case of an XLA:CPU miscompile (mapreps_jax/xla_cpu.py), run in a process with exactly 2 CPU
    devices: with YNNPACK's convolutions off, the first image of each device's rows of 20 Stage-1 steps on the
    digits ADM (4 images per device) came out wrong by up to 0.6 (with 8 devices in the process it did not show)."""
    from mapreps_jax.app.digits import make_task, map_config

    digits = mr.load_default_prior()
    p, dop = make_task("sr4")
    dx = _images((32, 32, 1), 8, 8)
    dy = dop.measure(jax.random.PRNGKey(9), dx, p.sigma_y)
    name, r = _compare("map_estimate/digits/B8", mr.map_estimate, digits, dop, dy, config=map_config(p, 20),
                       sigma_y=p.sigma_y)
    print("RESULTS " + json.dumps({"devices": jax.device_count(), name: r, "xla_cpu": mr.cpu_defaults_status()}))


def main():
    if sys.argv[1:] == ["digits"]:
        return digits_regression()
    # every algorithm at 13 images on 8 devices (padded to 16), at 8 (one per device) and at 1
    batches = [int(b) for b in sys.argv[1].split(",")] if len(sys.argv) > 1 else [13, 8, 1]
    results = {"devices": jax.device_count()}
    pix, shape = _pixel()
    op = mr.make_operator("sr", shape, factor=2, kind="avg")
    map_cfg = mr.MAPConfig(t1=20.0, w=0.5, n_iter=8, lr=0.05)
    dps_step = mr.DPSStep(zeta=0.5)
    red_cfg = mr.REDDiffConfig(n_steps=8)
    lat, lshape = _latent()
    lop = mr.make_operator("sr", lshape, factor=2, kind="avg")
    lcfg = mr.MAPConfig(t1=50.0, w=0.5, n_iter=6, lr=0.1)
    for b in batches:
        x = _images(shape, b, 1)
        y = op.measure(jax.random.PRNGKey(2), x, SIGMA_Y)
        for name, r in (
            _compare(f"map_rps/pixel/B{b}", mr.map_rps, pix, op, y, 300, map_config=map_cfg, sampler=dps_step,
                     sigma_y=SIGMA_Y, n_steps=4),
            _compare(f"dps/B{b}", mr.dps, pix, op, y, n_steps=6, zeta=0.5),
        ):
            results[name] = r
        name, r = _compare(f"red_diff/B{b}", mr.red_diff, pix, op, y, config=red_cfg)
        results[name] = r
        lx = _images(lshape, b, 3)
        ly = lop.measure(jax.random.PRNGKey(4), lx, SIGMA_Y)
        name, r = _compare(f"map_rps/latent/B{b}", mr.map_rps, lat, lop, ly, 200, map_config=lcfg,
                           sampler=mr.DPSStep.official_latent(0.2), sigma_y=SIGMA_Y, n_steps=3)
        results[name] = r
    # a batch that mixes tasks (stack_operators: per-image operator data), 13 images on 8 devices, through the
    # whole sweep (Stage 1 once, Stage 2 per t0)
    ops = [mr.make_operator("sr", shape, factor=2, kind="avg"), mr.make_operator("inpaint_box", shape, box=6),
           mr.make_operator("denoise", shape)]
    mixed = mr.stack_operators(ops, (5, 4, 4))
    x = _images(shape, 13, 5)
    y = mixed.measure(jax.random.PRNGKey(6), x, SIGMA_Y)
    name, r = _compare("sweep_stages/stacked/B13", S.sweep_stages, pix, mixed, y, jnp.asarray([0, 100, 300]),
                       map_config=map_cfg, sampler=dps_step, sigma_y=SIGMA_Y, n_steps=3, out_axis=(0, 1))
    results[name] = r
    results["xla_cpu"] = mr.cpu_defaults_status()
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
