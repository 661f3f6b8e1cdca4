"""Benchmark (not a test) of batched restoration: throughput against batch size, scaling over (fake) devices, and
the memory per device of DPS at 256x256 from XLA's compiled memory analysis.

Parts (``--parts``, comma-separated; each writes its own section of ``benchmarks/results/batch_<backend>.json``
atomically, the other sections of an existing file kept):

* ``digits``: throughput (images/s) against batch size on one device for the bundled digits prior (32x32x1) with the
  ``sr4`` task preset: Stage 1 (``map_estimate``, ``N`` steps, one network forward per step: the prox solver does
  not back-propagate through the network) and Stage 2 (``rps`` at ``t0`` on a ``K``-step sub-grid, DPS: one network
  forward + VJP per step) jitted separately, once per batch size; compile time (``lower().compile()``) reported
  apart; timed after one warm-up call (median of ``--reps``).
* ``adm``: the same for the FFHQ-256 ADM configuration (``ADMConfig.ffhq256()``, random weights, 256x256x3) with the
  ``ffhq-sr4`` preset's Stage-1 config (AdamW; one forward per step) and DPS step (forward + VJP per step), very
  few steps; reports seconds per image-step so that it extrapolates to the real step counts.
* ``scaling``: ``run_sharded(sweep_stages, ...)`` on the digits prior at a fixed global batch in subprocesses with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N``: wall time, images/s, per-device batch, and the max abs
  difference of the outputs to the N=1 outputs. Fake CPU devices share the same cores: a correctness-of-scaling
  check, not a speed claim.
* ``memory``: ``compile().memory_analysis()`` (compile only: ``jax.ShapeDtypeStruct`` arguments, nothing 256x256 is
  run) of DPS (``mr.dps``, ``K`` steps) with the FFHQ ADM at batch sizes ``--memory-batches`` for four settings
  (no remat, step remat ``dps(remat=True)``, ADM block remat ``ADMConfig(remat=True)``, both), and of the gradient
  of a ``K``-step DPS loop's distortion with respect to ``zeta`` (``jax.grad`` through the loop) with and without
  step remat; plus the bytes the VJP keeps between forward and backward (``jax.eval_shape``, backend-independent).
  Goal (issue 16): batch 8 at 256x256 within 16 GiB per device.

Usage (``nice -n 19`` on a shared machine)::

    python benchmarks/bench_batch.py --parts digits,adm,scaling,memory
    python benchmarks/bench_batch.py --parts digits --digits-batches 1,4,16,64 --digits-n 100 --digits-k 20
    python benchmarks/bench_batch.py --parts adm --adm-batches 1,2,4 --adm-steps 2
    python benchmarks/bench_batch.py --parts scaling --scaling-devices 1,2,4,8 --scaling-batch 16
    python benchmarks/bench_batch.py --parts memory --memory-batches 1,2,8 --grad-batches 1,8
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS, command_line, finish_result, machine_info, tree_bytes  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mapreps_jax as mr  # noqa: E402

GIB = 2**30
GOAL_BYTES = 16 * GIB
PARTS = ("digits", "adm", "scaling", "memory")


def log(msg):
    print(msg, flush=True)


def ints(s):
    return [int(v) for v in str(s).split(",") if v.strip()]


def block(x):
    return jax.block_until_ready(x)


def measured_call(jitted, args, reps):
    """``jitted`` compiled ahead for ``args`` (seconds recorded), one warm-up call, then ``reps`` timed calls.
    Returns ``(output, {"compile_s", "warmup_s", "times_s", "median_s"})``."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    out = block(compiled(*args))
    warm = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = block(compiled(*args))
        times.append(time.perf_counter() - t)
    return out, {"compile_s": compile_s, "warmup_s": warm, "times_s": times, "median_s": float(np.median(times))}


# --- the problems ---------------------------------------------------------------------------------------------------


def digits_problem(batch, n_iter, k, seed=0):
    """The bundled digits prior with the ``sr4`` task: ``(model, op, y, map_config, sampler, sigma_y)``; ``y`` the
    measurements of ``batch`` smooth random images (the content does not change the cost)."""
    from mapreps_jax.app.digits import dps_zeta, make_task, map_config

    preset, op = make_task("sr4", seed)
    model = mr.load_default_prior()
    x = smooth_images(batch, op.in_shape, seed)
    y = op.measure(jax.random.PRNGKey(seed + 1), x, float(preset.sigma_y))
    return (model, op, y, map_config(preset, n_iter), mr.DPSStep(zeta=dps_zeta(preset, k), clip=True),
            float(preset.sigma_y))


def smooth_images(batch, shape, seed):
    """``batch`` images in [-1, 1]: random noise blurred by upsampling a coarse grid (deterministic in ``seed``)."""
    h, w, c = shape
    coarse = jax.random.uniform(jax.random.PRNGKey(seed), (batch, max(h // 4, 1), max(w // 4, 1), c), minval=-1.0,
                                maxval=1.0)
    return jax.image.resize(coarse, (batch, h, w, c), "linear")


def adm_config(remat=False):
    return mr.ADMConfig.ffhq256(remat=remat)


def ffhq_preset():
    from mapreps_jax.presets import get_preset

    return get_preset("ffhq-sr4")


# --- part 1: throughput ---------------------------------------------------------------------------------------------


def throughput(model, op, make_y, batches, n_iter, map_cfg, sampler, sigma_y, t0, k, reps, label, on_entry):
    """Stage 1 and Stage 2 timed per batch size; ``on_entry(rows)`` after each batch size (partial results saved)."""
    rows = []
    stage1 = jax.jit(lambda m, key, y: mr.map_estimate(key, m, op, y, config=map_cfg, sigma_y=sigma_y))
    stage2 = jax.jit(lambda m, key, y, x: mr.rps(key, m, op, y, x, t0, sampler=sampler, n_steps=k))
    k2 = int(min(k, t0))
    for b in batches:
        y = make_y(b)
        key = jax.random.PRNGKey(b)
        x_map, s1 = measured_call(stage1, (model, key, y), reps)
        log(f"[{label}] B={b} stage 1: compile {s1['compile_s']:.1f}s, {s1['median_s']:.3f}s/call "
            f"({b / s1['median_s']:.2f} img/s)")
        out, s2 = measured_call(stage2, (model, jax.random.fold_in(key, 1), y, x_map), reps)
        log(f"[{label}] B={b} stage 2: compile {s2['compile_s']:.1f}s, {s2['median_s']:.3f}s/call "
            f"({b / s2['median_s']:.2f} img/s)")
        if not bool(jnp.all(jnp.isfinite(out))):
            log(f"[{label}] WARNING: non-finite Stage-2 output at B={b}")
        row = {"key": f"B={b}", "batch": b,
               "stage1": dict(s1, steps=n_iter, images_per_s=b / s1["median_s"],
                              s_per_image_step=s1["median_s"] / (b * n_iter), network_per_step="forward"),
               "stage2": dict(s2, steps=k2, t0=t0, images_per_s=b / s2["median_s"],
                              s_per_image_step=s2["median_s"] / (b * k2), network_per_step="forward+VJP"),
               "finite": bool(jnp.all(jnp.isfinite(out)))}
        rows.append(row)
        on_entry(rows)
    return rows


def part_digits(a, save):
    res = {"prior": "bundled digits prior (mr.load_default_prior(), 32x32x1)", "task": "sr4",
           "N": a.digits_n, "K": a.digits_k, "t0": a.digits_t0, "reps": a.reps, **machine_info(),
           "command": command_line()}
    model, op, _, cfg, sampler, sigma_y = digits_problem(1, a.digits_n, a.digits_k)
    res["param_bytes"] = tree_bytes(model.params)

    def make_y(b):
        return digits_problem(b, a.digits_n, a.digits_k)[2]

    def on_entry(rows):
        res["rows"] = rows
        save("throughput_digits", res)

    throughput(model, op, make_y, ints(a.digits_batches), a.digits_n, cfg, sampler, sigma_y, a.digits_t0,
               a.digits_k, a.reps, "digits", on_entry)


def part_adm(a, save):
    cfg = adm_config()
    p = ffhq_preset()
    params = mr.init_adm_params(jax.random.PRNGKey(0), cfg)
    model = mr.adm_score_model(cfg, params, name="adm-ffhq256-random")
    op = p.operator(tuple(p.image_shape), seed=0)
    map_cfg = dataclasses.replace(p.map_config(), n_iter=a.adm_steps)
    sampler = p.sampler()
    res = {"network": "ADMConfig.ffhq256() with random weights (256x256x3)", "preset": p.name,
           "stage1_config": repr(map_cfg), "stage2_sampler": repr(sampler), "N": a.adm_steps, "K": a.adm_steps,
           "t0": a.adm_t0, "reps": a.reps, "param_bytes": tree_bytes(params), **machine_info(),
           "command": command_line(),
           "note": "s_per_image_step = median call time / (batch x steps): Stage 1 is one network forward per "
                   "image-step (AdamW on the data term, the network output enters without back-propagation), "
                   "Stage 2 (DPS) one forward + VJP; multiply by N (e.g. 300 for ffhq-sr4) or K to extrapolate."}

    def make_y(b):
        x = smooth_images(b, tuple(p.image_shape), 0)
        return op.measure(jax.random.PRNGKey(1), x, float(p.sigma_y))

    def on_entry(rows):
        res["rows"] = rows
        save("throughput_adm", res)

    throughput(model, op, make_y, ints(a.adm_batches), a.adm_steps, map_cfg, sampler, float(p.sigma_y), a.adm_t0,
               a.adm_steps, a.reps, "adm", on_entry)


# --- part 2: scaling over fake devices ------------------------------------------------------------------------------


def scaling_child(a):
    """Run in a subprocess with ``--xla_force_host_platform_device_count``: prints one JSON line, saves outputs."""
    from mapreps_jax.sharding import padded_size

    model, op, y, cfg, sampler, sigma_y = digits_problem(a.scaling_batch, a.scaling_n, a.scaling_k)
    mesh = mr.batch_mesh()
    n_dev = mesh.devices.size
    t0s = jnp.asarray(ints(a.scaling_t0s), jnp.int32)
    key = jax.random.PRNGKey(0)

    def call():
        return block(mr.run_sharded(mr.sweep_stages, key, model, op, y, t0s, mesh=mesh, out_axis=(0, 1),
                                    map_config=cfg, sampler=sampler, sigma_y=sigma_y, n_steps=a.scaling_k,
                                    clip=True))

    t = time.perf_counter()
    x_map, outs = call()
    first = time.perf_counter() - t
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        x_map, outs = call()
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    np.save(os.path.join(a.scaling_child_dir, f"x_map_{n_dev}.npy"), np.asarray(x_map))
    np.save(os.path.join(a.scaling_child_dir, f"outs_{n_dev}.npy"), np.asarray(outs))
    row = {"devices": n_dev, "global_batch": a.scaling_batch,
           "per_device_batch": padded_size(a.scaling_batch, n_dev) // n_dev,
           "padded_batch": padded_size(a.scaling_batch, n_dev), "first_call_s": first, "times_s": times,
           "median_s": med, "images_per_s": a.scaling_batch / med,
           "output_sharding": str(outs.sharding), "output_devices": len(outs.sharding.device_set),
           "xla_cpu_flag_effective": mr.cpu_defaults_status()["effective"]}
    print("SCALING_JSON " + json.dumps(row), flush=True)


def part_scaling(a, save):
    section = "scaling_fake_devices_ynnpack" if a.scaling_ynnpack else "scaling_fake_devices"
    res = {"xla_cpu_defaults_in_children": "off (MAPREPS_JAX_XLA_DEFAULTS=0: jaxlib's YNNPACK fusions)"
           if a.scaling_ynnpack else "the package decides per child (mapreps_jax/xla_cpu.py): its flag (YNNPACK off) "
                                     "for N = 1, left out for N > 1 (several CPU devices miscompute with it)",
           "what": "run_sharded(sweep_stages, ...) on the bundled digits prior, sr4, fixed global batch, one "
                   "subprocess per device count with XLA_FLAGS=--xla_force_host_platform_device_count=N",
           "note": f"fake CPU devices share the same {os.cpu_count()} cores of one process: the wall times are NOT a "
                   "scaling claim; this part checks that sharding over N devices gives the N=1 outputs "
                   "(max_abs_diff_vs_1) and records the per-device batch. Times include placing the inputs on the "
                   "mesh (run_sharded's device_put) every call; first_call_s includes compilation.",
           "global_batch": a.scaling_batch, "N": a.scaling_n, "K": a.scaling_k, "t0s": ints(a.scaling_t0s),
           "reps": a.reps, **machine_info(), "command": command_line(), "rows": []}
    # without the package's flag, which this process's XLA_FLAGS carry since its import: each child decides again
    from mapreps_jax.xla_cpu import without_flag

    base_flags = without_flag(os.environ.get("XLA_FLAGS", ""))
    with tempfile.TemporaryDirectory() as d:
        ref = None
        for n in ints(a.scaling_devices):
            env = dict(os.environ, XLA_FLAGS=f"{base_flags} --xla_force_host_platform_device_count={n}".strip(),
                       JAX_PLATFORMS="cpu")
            if a.scaling_ynnpack:
                env["MAPREPS_JAX_XLA_DEFAULTS"] = "0"
                env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split()
                                            if not f.startswith("--xla_cpu_experimental_ynn_fusion_type"))
            cmd = [sys.executable, os.path.abspath(__file__), "--scaling-child-dir", d,
                   "--scaling-batch", str(a.scaling_batch), "--scaling-n", str(a.scaling_n),
                   "--scaling-k", str(a.scaling_k), "--scaling-t0s", a.scaling_t0s, "--reps", str(a.reps)]
            log(f"[scaling] N={n}: {' '.join(cmd[1:])}")
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("SCALING_JSON ")]
            if p.returncode or not lines:
                raise RuntimeError(f"scaling child N={n} failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}")
            row = json.loads(lines[-1][len("SCALING_JSON "):])
            if row["devices"] != n:
                raise RuntimeError(f"scaling child asked for {n} devices saw {row['devices']}")
            x_map, outs = (np.load(os.path.join(d, f"{w}_{n}.npy")) for w in ("x_map", "outs"))
            if ref is None:
                ref = (x_map, outs)
            row["max_abs_diff_vs_1_x_map"] = float(np.max(np.abs(x_map - ref[0])))
            row["max_abs_diff_vs_1_outputs"] = float(np.max(np.abs(outs - ref[1])))
            row["bitwise_equal_vs_1"] = bool(np.array_equal(x_map, ref[0]) and np.array_equal(outs, ref[1]))
            log(f"[scaling] N={n}: {row['median_s']:.2f}s ({row['images_per_s']:.2f} img/s), per-device batch "
                f"{row['per_device_batch']}, max|diff| vs N=1 {row['max_abs_diff_vs_1_outputs']:.3g}")
            res["rows"].append(row)
            res["all_match_N1_within_1e-3"] = all(r["max_abs_diff_vs_1_outputs"] <= 1e-3 and
                                                  r["max_abs_diff_vs_1_x_map"] <= 1e-3 for r in res["rows"])
            save(section, res)


# --- part 3: memory per device --------------------------------------------------------------------------------------

SETTINGS = {"none": (False, False), "step_remat": (True, False), "adm_remat": (False, True), "both": (True, True)}


def _abstract_params(cfg):
    return jax.eval_shape(lambda k: mr.init_adm_params(k, cfg), jax.random.PRNGKey(0))


def part_memory(a, save):
    p = ffhq_preset()
    op = p.operator(tuple(p.image_shape), seed=0)
    sampler_base = p.sampler()
    key_s = jax.ShapeDtypeStruct((2,), jnp.uint32)
    k = a.memory_k
    params_s = _abstract_params(adm_config())
    res = {"network": "ADMConfig.ffhq256() (256x256x3), abstract weights: compile only", "preset": p.name,
           "sampler": repr(sampler_base), "K": k, "grad_K": a.grad_k, "goal_bytes": GOAL_BYTES,
           "param_bytes": int(sum(np.prod(v.shape) * v.dtype.itemsize for v in jax.tree_util.tree_leaves(params_s))),
           "settings": {n: {"step_remat": s, "adm_block_remat": r} for n, (s, r) in SETTINGS.items()},
           "note": "memory_per_device = XLA compile().memory_analysis() of the jitted program (bytes per device): "
                   "total = argument + output + temp + generated_code - alias. dps_forward: mr.dps with K steps "
                   "(Stage 2 / DPS without outer differentiation: each step one network forward + VJP). "
                   "grad_zeta: jax.grad of sum ||A x_K - y||^2 w.r.t. zeta through a grad_K-step DPS loop (the "
                   "tuning pattern; needs second-order derivatives of the network). residual_bytes: what the VJP "
                   "keeps between its forward and backward pass (jax.eval_shape, backend-independent). On XLA:CPU "
                   "the temp size of a single forward+VJP was seen not to reflect jax.checkpoint "
                   "(benchmarks/results/adm_cpu.json), so the CPU numbers are an upper bound for the remat settings; "
                   "rerun on a GPU/TPU for that backend's numbers.",
           **machine_info(), "command": command_line(), "dps_forward": [], "grad_zeta": [], "network_vjp": []}

    def fwd_fn(step_remat, cfg):
        def f(params, key, y):
            model = mr.adm_score_model(cfg, params)
            return mr.dps(key, model, op, y, sampler=sampler_base, n_steps=k, remat=step_remat)
        return f

    def grad_fn(step_remat, cfg):
        def loss(zeta, params, key, y):
            model = mr.adm_score_model(cfg, params)
            x = mr.dps(key, model, op, y, sampler=dataclasses.replace(sampler_base, zeta=zeta), n_steps=a.grad_k,
                       remat=step_remat)
            r = jax.vmap(op.A)(x) - y
            return jnp.sum(r * r)

        return jax.grad(loss), loss

    def goal(entry, b):
        return b == 8 and entry["memory_per_device"] is not None and entry["memory_per_device"]["total"] <= GOAL_BYTES

    # the network's own VJP residuals per batch (what one DPS step keeps between forward and backward)
    for b in sorted(set(ints(a.memory_batches)) | set(ints(a.grad_batches))):
        for r in (False, True):
            cfg = adm_config(r)
            x_s = jax.ShapeDtypeStruct((b, *p.image_shape), jnp.float32)
            t_s = jax.ShapeDtypeStruct((b,), jnp.float32)

            def f(params, x, t, cfg=cfg):
                m = mr.adm_score_model(cfg, params)
                return jax.tree_util.tree_leaves(jax.vjp(lambda v: m.apply(params, v, t, None), x)[1])

            leaves = jax.eval_shape(f, params_s, x_s, t_s)
            rb = int(sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in leaves))
            res["network_vjp"].append({"key": f"B={b}/adm_remat={r}", "batch": b, "adm_block_remat": r,
                                       "residual_bytes": rb, "residual_gib": rb / GIB})
            log(f"[memory] network VJP residuals B={b} adm_remat={r}: {rb / GIB:.2f} GiB")
    save("memory_dps_256", res)

    for b in ints(a.memory_batches):
        y_s = jax.ShapeDtypeStruct((b, *op.out_shape), jnp.float32)
        for name in a.memory_settings.split(","):
            step_remat, adm_remat = SETTINGS[name]
            t = time.perf_counter()
            mem = mr.memory_per_device(fwd_fn(step_remat, adm_config(adm_remat)), params_s, key_s, y_s)
            entry = {"key": f"B={b}/{name}", "batch": b, "setting": name, "compile_s": time.perf_counter() - t,
                     "memory_per_device": mem, "total_gib": None if mem is None else mem["total"] / GIB}
            entry["batch8_goal_met"] = goal(entry, b) if b == 8 else None
            res["dps_forward"].append(entry)
            log(f"[memory] dps_forward B={b} {name}: {entry['total_gib']} GiB (compile {entry['compile_s']:.1f}s)")
            save("memory_dps_256", res)

    for b in ints(a.grad_batches):
        y_s = jax.ShapeDtypeStruct((b, *op.out_shape), jnp.float32)
        z_s = jax.ShapeDtypeStruct((), jnp.float32)
        for name in a.grad_settings.split(","):
            step_remat, adm_remat = SETTINGS[name]
            g, loss = grad_fn(step_remat, adm_config(adm_remat))
            t = time.perf_counter()
            leaves = jax.eval_shape(lambda z, pr, kk, yy: jax.tree_util.tree_leaves(
                jax.vjp(lambda zz: loss(zz, pr, kk, yy), z)[1]), z_s, params_s, key_s, y_s)
            rb = int(sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in leaves))
            trace_s = time.perf_counter() - t
            t = time.perf_counter()
            mem = None if a.grad_no_compile else mr.memory_per_device(g, z_s, params_s, key_s, y_s)
            compile_s = None if a.grad_no_compile else time.perf_counter() - t
            entry = {"key": f"B={b}/{name}", "batch": b, "setting": name, "grad_K": a.grad_k, "residual_bytes": rb,
                     "residual_gib": rb / GIB, "trace_s": trace_s, "compile_s": compile_s,
                     "memory_per_device": mem, "total_gib": None if mem is None else mem["total"] / GIB}
            entry["batch8_goal_met"] = goal(entry, b) if (b == 8 and mem is not None) else None
            res["grad_zeta"].append(entry)
            log(f"[memory] grad_zeta B={b} {name}: residuals {rb / GIB:.2f} GiB, XLA total {entry['total_gib']} GiB "
                f"(compile {entry['compile_s']})")
            save("memory_dps_256", res)



# --- main -----------------------------------------------------------------------------------------------------------


# a part may be completed by several shorter runs: entries (rows) measured by an earlier run with the same
# configuration are kept unless measured again (matched on "key")
MERGE = {"throughput_digits": (("rows",), ("N", "K", "t0", "backend")),
         "throughput_adm": (("rows",), ("N", "K", "t0", "backend")),
         "memory_dps_256": (("dps_forward", "grad_zeta", "network_vjp"), ("K", "grad_K", "backend"))}


def merged(path, section, res):
    """``res`` with the entries of ``path``'s earlier ``section`` kept where not measured again (:data:`MERGE`)."""
    from _common import read_json

    if section not in MERGE:
        return res
    if section == "memory_dps_256":
        res = dict(res, batch8_goal=batch8_goal(res))
    lists, same = MERGE[section]
    old = read_json(path).get(section)
    if not old or any(old.get(f) != res.get(f) for f in same):
        return res
    out = dict(res)
    for name in lists:
        new = list(res.get(name, []))
        keys = {e.get("key") for e in new}
        out[name] = [e for e in old.get(name, []) if e.get("key") not in keys] + new
        out[name].sort(key=lambda e: (e.get("batch", 0), str(e.get("key"))))
    if section == "memory_dps_256":
        out["batch8_goal"] = batch8_goal(out)
    return out


def batch8_goal(res):
    """Which measured settings fit batch 8 at 256x256 within 16 GiB per device (XLA's total), per program."""
    goal = {}
    for prog in ("dps_forward", "grad_zeta"):
        rows = [e for e in res.get(prog, []) if e["batch"] == 8 and e.get("memory_per_device")]
        goal[prog] = {"measured": [e["setting"] for e in rows],
                      "within_16GiB": [e["setting"] for e in rows if e["memory_per_device"]["total"] <= GOAL_BYTES]}
    return goal


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="digits,scaling,memory,adm", help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--reps", type=int, default=1, help="timed calls after the warm-up call (median reported)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--digits-batches", default="1,4,16,64")
    ap.add_argument("--digits-n", type=int, default=100, help="Stage-1 steps N")
    ap.add_argument("--digits-k", type=int, default=20, help="Stage-2 sub-grid steps K")
    ap.add_argument("--digits-t0", type=int, default=400)
    ap.add_argument("--adm-batches", default="1,2")
    ap.add_argument("--adm-steps", type=int, default=2, help="Stage-1 and Stage-2 steps for the FFHQ ADM")
    ap.add_argument("--adm-t0", type=int, default=400)
    ap.add_argument("--scaling-devices", default="1,2,4,8")
    ap.add_argument("--scaling-batch", type=int, default=16)
    ap.add_argument("--scaling-n", type=int, default=20)
    ap.add_argument("--scaling-k", type=int, default=10)
    ap.add_argument("--scaling-t0s", default="200,400")
    ap.add_argument("--scaling-ynnpack", action="store_true",
                    help="children without the library's XLA:CPU default flag (jaxlib's YNNPACK fusions on); "
                         "writes section scaling_fake_devices_ynnpack")
    ap.add_argument("--scaling-child-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-batches", default="1,2,8")
    ap.add_argument("--memory-settings", default="none,step_remat,adm_remat,both")
    ap.add_argument("--memory-k", type=int, default=4, help="DPS steps of the forward-only program")
    ap.add_argument("--grad-batches", default="1")
    ap.add_argument("--grad-settings", default="none,step_remat")
    ap.add_argument("--grad-k", type=int, default=4, help="DPS steps of the differentiated loop")
    ap.add_argument("--grad-no-compile", action="store_true", help="only the eval_shape residual bytes")
    a = ap.parse_args(argv)

    if a.scaling_child_dir is not None:
        scaling_child(a)
        return 0
    parts = [s for s in a.parts.split(",") if s]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        ap.error(f"unknown parts {bad}; expected a subset of {PARTS}")
    path = os.path.join(a.out, f"batch_{jax.default_backend()}.json")

    def save(section, res):
        res["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        finish_result(merged(path, section, res), path, section)

    funcs = {"digits": part_digits, "adm": part_adm, "scaling": part_scaling, "memory": part_memory}
    for part in parts:
        t = time.perf_counter()
        funcs[part](a, save)
        log(f"part {part} done in {time.perf_counter() - t:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
