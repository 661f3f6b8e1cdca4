"""The XLA:CPU settings applied at import (mapreps_jax/xla_cpu.py): the rules for when the flag is added, that it
changes the compiled program (convolutions leave YNNPACK) and that the network's numbers do not change beyond
float32 rounding. The compiled-program checks run in fresh interpreters: XLA reads its flags once per process."""

import json
import os
import subprocess
import sys

import pytest

from mapreps_jax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFIED = xla_cpu._jaxlib_version() in xla_cpu.VERIFIED_JAXLIB


def test_flag_added_once_when_unset():
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    if not VERIFIED:
        pytest.skip(f"jaxlib {xla_cpu._jaxlib_version()} is not a verified version: nothing is added there")
    rec = xla_cpu.apply_cpu_defaults(env)
    assert rec["applied"] and env["XLA_FLAGS"] == " ".join(["--xla_cpu_enable_fast_math=false", xla_cpu.FLAG,
                                                             xla_cpu.EMITTER_FLAG, xla_cpu.OPT_FLAG])
    xla_cpu.apply_cpu_defaults(env)  # idempotent: the second call sees the flag and leaves it
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1 and env["XLA_FLAGS"].count("fusion_emitters") == 1
    assert env["XLA_FLAGS"].count("optimization_level") == 1
    # a user's own emitter choice and optimisation level are kept (the package's other flags are added)
    env = {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=true --xla_backend_optimization_level=3"}
    xla_cpu.apply_cpu_defaults(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_use_fusion_emitters=true --xla_backend_optimization_level=3 " + xla_cpu.FLAG
    # and a child process is handed XLA_FLAGS without the package's flags, to decide again
    assert xla_cpu.without_flag(" ".join(["--a=1", *xla_cpu.PACKAGE_FLAGS])) == "--a=1"


def test_optimisation_level_left_alone_where_a_gpu_or_tpu_plugin_is_installed(monkeypatch):
    """``xla_backend_optimization_level`` also sets LLVM's effort for GPU kernels: with an accelerator plugin
    installed only the CPU-specific flags are added."""
    if not VERIFIED:
        pytest.skip("nothing is added on an unverified jaxlib")
    monkeypatch.setattr(xla_cpu, "_accelerator_plugin", lambda: "xla_cuda12")
    env = {}
    assert xla_cpu.apply_cpu_defaults(env)["applied"]
    assert env["XLA_FLAGS"] == f"{xla_cpu.FLAG} {xla_cpu.EMITTER_FLAG}"


def test_user_choice_and_opt_out_respected(monkeypatch):
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"}
    rec = xla_cpu.apply_cpu_defaults(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise" and not rec["applied"]
    env = {xla_cpu.OPT_OUT_ENV: "0"}
    rec = xla_cpu.apply_cpu_defaults(env)
    assert "XLA_FLAGS" not in env and not rec["applied"] and xla_cpu.OPT_OUT_ENV in rec["reason"]


def test_unverified_jaxlib_left_alone(monkeypatch):
    # an unknown flag makes XLA abort the process: on an unmeasured jaxlib nothing may be added
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 99))
    env = {}
    rec = xla_cpu.apply_cpu_defaults(env)
    assert "XLA_FLAGS" not in env and not rec["applied"] and "(0, 99)" in rec["reason"]


def test_several_cpu_devices_keep_ynnpack():
    """XLA:CPU's classic convolutions miscompute programs partitioned over several CPU devices of one process
    (``tests/sharded_worker.py`` holds the regression case): with more than one CPU device asked for, the flag is not
    added."""
    if not VERIFIED:
        pytest.skip("nothing is added on an unverified jaxlib")
    for env in ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, {"JAX_NUM_CPU_DEVICES": "2"}):
        before = dict(env)
        rec = xla_cpu.apply_cpu_defaults(env)
        assert env == before and not rec["applied"] and "CPU devices in one process" in rec["reason"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    assert xla_cpu.apply_cpu_defaults(env)["applied"]


def test_run_sharded_refuses_several_cpu_devices_with_the_flag():
    """The user forced the flag and two CPU devices: ``run_sharded`` refuses instead of computing wrong numbers."""
    code = ("import mapreps_jax as mr, jax, jax.numpy as jnp\n"
            "m = mr.GaussianPrior.isotropic(4, 1.0).score_model(mr.make_schedule('linear'))\n"
            "op = mr.make_operator('mask', (4,), keep=2, seed=0)\n"
            "try:\n"
            "    mr.run_sharded(mr.dps, jax.random.PRNGKey(0), m, op, jnp.zeros((4, 2)), n_steps=2)\n"
            "except RuntimeError as e:\n"
            "    print('REFUSED', e)\n")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {xla_cpu.FLAG}")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert "REFUSED" in proc.stdout and "2 CPU devices" in proc.stdout, proc.stdout + proc.stderr[-2000:]


_PROBE = r"""
import json, sys
import numpy as np
import mapreps_jax as mr
import jax, jax.numpy as jnp
x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 32, 32, 32)).astype(np.float32))
w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32))
conv = jax.jit(lambda x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo = conv.lower(x).compile().as_text()
m = mr.load_default_prior()
xs = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (4, 32, 32, 1)).astype(np.float32))
t = jnp.asarray([10, 200, 500, 900])
def fwd_vjp(z):
    out, vjp = jax.vjp(lambda z: m.eps(z, t), z)
    return out, vjp(out)[0]
net_hlo = jax.jit(fwd_vjp).lower(xs).compile().as_text()
out, g = jax.jit(fwd_vjp)(xs)
np.savez(sys.argv[1], eps=np.asarray(out), grad=np.asarray(g))
print(json.dumps({"ynn_conv": "ynn" in hlo, "ynn_in_net": net_hlo.count("__ynn_fusion"),
                  "status": mr.cpu_defaults_status(), "xla_flags": __import__("os").environ.get("XLA_FLAGS", "")}))
"""


def _probe(tmp_path, name, opt_out):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env[xla_cpu.OPT_OUT_ENV] = "0" if opt_out else "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / f"{name}.npz"
    res = subprocess.run([sys.executable, "-c", _PROBE, str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import numpy as np
    return json.loads(res.stdout.strip().splitlines()[-1]), np.load(out)


@pytest.mark.skipif(not VERIFIED, reason="the flag is added only on verified jaxlib versions")
def test_flag_takes_effect_and_keeps_the_numbers(tmp_path):
    fast, a = _probe(tmp_path, "fast", opt_out=False)
    plain, b = _probe(tmp_path, "plain", opt_out=True)
    assert fast["status"]["applied"] and fast["status"]["effective"]
    assert not plain["status"]["applied"]
    assert xla_cpu.EMITTER_FLAG in fast["xla_flags"].split() and "fusion_emitters" not in plain["xla_flags"]
    assert xla_cpu.OPT_FLAG in fast["xla_flags"].split() and "optimization_level" not in plain["xla_flags"]
    # the flag is what moves convolutions out of YNNPACK in this jaxlib (the opt-out run keeps them there), and
    # with it the network's compiled forward + VJP holds no YNNPACK fusion at all
    assert plain["ynn_conv"] and not fast["ynn_conv"]
    assert plain["ynn_in_net"] > 0 and fast["ynn_in_net"] == 0
    # same network output and input gradient up to float32 rounding of a different summation order
    for k in ("eps", "grad"):
        scale = float(abs(b[k]).max())
        err = float(abs(a[k] - b[k]).max())
        assert err <= 2e-5 * scale, (k, err, scale)
