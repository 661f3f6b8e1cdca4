"""Pixel-space results are unchanged by the state-space abstraction (:mod:`mapreps_jax.space`).

``tests/data/pixel_regression*.npz`` hold every pixel algorithm's output on small fixed problems, written by
``scripts/make_pixel_regression.py`` with the code before latent spaces existed (commit df1e0c9). Today's code must
give the same numbers: Stage 1 (AdamW, stable, proximal with averaging), every Stage-2 step rule (DPS in both loss
forms and the paper-code mean, DDPM, DDNM, PiGDM, DMPS, learned and official variance), the sub-grid loop, DPS, CCDF,
RED-diff, MAP-RPS, the D-P sweep and prior sampling, on an exact GMM prior and on a tiny random ADM network with
clipping. The bound is float32 round-off (the computations are the same; XLA may fuse them differently).

The recording is made under the XLA:CPU settings the package applies at import (``mapreps_jax/xla_cpu.py``: LLVM -O1,
no YNNPACK fusions, classic loop emitters), by the old commit's code run with the same ``XLA_FLAGS``. Other kernels round differently and
the iterations amplify it: the old code under jaxlib's default settings differs from the same old code under the
package's settings by up to 2.8e-5 on the GMM cases, 1.4e-4 on ``adm_map`` and 0.97 on ``gmm_map_stable`` (AdamW on
the residual's norm, sensitive to round-off), while today's code under the same settings as the recording passes
at the bound below.

Both the recording and the check compute on one CPU (``make_pixel_regression.pin_to_one_cpu``, in a child process
here): XLA:CPU's float32 rounding depends on its thread count (``adm_map`` moves by 4.1e-5 between one and two
threads), so on two threads the check would pass only on a machine with the recording's core count.

The rounding also depends on the kind of CPU (XLA:CPU generates code for the host's instruction set, e.g. AVX-512 or
AVX2): on an AMD EPYC of family 23 (AVX2, no AVX-512) the old commit's code and today's agree bit for bit on every
case, and both differ from the recording made on the Zen 4 (AVX-512) machines by 1.5e-5 to 1.9e-5 on the GMM cases,
1.1e-4 on ``adm_map`` and 0.45 on ``gmm_map_stable`` (the round-off-sensitive case above). So there is one recording
per kind of CPU (:data:`RECORDINGS`, each made through commit df1e0c9 on that kind, as above), chosen by the host's
(vendor, CPU family, AVX-512); on a kind with none the check is skipped with that reason (record one as the script's
docstring says).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "scripts", "make_pixel_regression.py")

#: the recordings by the kind of CPU they were made on: (vendor, CPU family, AVX-512) -> file in tests/data
RECORDINGS = {("AuthenticAMD", 25, True): "pixel_regression.npz",  # AMD EPYC, Zen 4 (AVX-512)
              ("AuthenticAMD", 23, False): "pixel_regression_amd_family23.npz"}  # AMD EPYC, family 23 (AVX2)
CASES = sorted(np.load(os.path.join(HERE, "data", RECORDINGS[("AuthenticAMD", 25, True)])).files)


def cpu_kind():
    """``(vendor, CPU family, AVX-512)`` of this host (``None`` where ``/proc/cpuinfo`` does not say)."""
    from mapreps_jax.app.demo import cpu_info

    info = cpu_info()
    try:
        return info["vendor_id"], int(info["cpu family"]), "avx512f" in info["flags"].split()
    except (KeyError, ValueError):
        return None


@pytest.fixture(scope="module")
def recorded():
    """The recording made on this kind of CPU (skips where there is none)."""
    kind = cpu_kind()
    if kind not in RECORDINGS:
        pytest.skip(f"no pixel recording for this kind of CPU {kind} (recorded: {sorted(RECORDINGS)}); float32 "
                    f"rounding differs between kinds: record one through commit df1e0c9 "
                    f"(scripts/make_pixel_regression.py's docstring)")
    return np.load(os.path.join(HERE, "data", RECORDINGS[kind]))


def test_every_recording_has_the_same_cases():
    for name in RECORDINGS.values():
        assert sorted(np.load(os.path.join(HERE, "data", name)).files) == CASES, name


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Every case's output from today's code, computed by the recording script in a child process on one CPU."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs os.sched_setaffinity (Linux) to compute on one CPU, as the recording did")
    path = tmp_path_factory.mktemp("pixel_regression") / "today.npz"
    # the child imports this checkout's package (the one under test), whatever the environment has installed
    root = os.path.dirname(HERE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([sys.executable, SCRIPT, str(path)], capture_output=True, text=True, env=env)
    if run.returncode:
        pytest.fail(f"make_pixel_regression.py exited with {run.returncode}:\n{run.stderr[-3000:]}")
    return np.load(path)


def test_every_case_was_recorded(recorded, outputs):
    """The script writes every case it defines; the recording has each of them, and no other."""
    assert sorted(outputs.files) == sorted(recorded.files)


@pytest.mark.parametrize("name", CASES)
def test_pixel_output_unchanged(recorded, outputs, name):
    got = outputs[name]
    want = recorded[name]
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
