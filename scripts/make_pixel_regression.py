"""Record every pixel-space algorithm's output on small fixed problems (tests/data/pixel_regression.npz).

The file was written once by the code before latent spaces existed (commit df1e0c9, where the state was assumed to be
the operator's input); ``tests/test_pixel_regression.py`` checks that today's code still produces those numbers, so
the pixel results (and every published number built on them) are unchanged by the space abstraction.

Usage (from a checkout of the commit to record, under the XLA:CPU settings the package applies today, which that
commit predates)::

    XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=-dot,-individual_dot,-individual_convolution,-eltwise,-reduce \
        --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1" \
        PYTHONPATH=CHECKOUT_OF_df1e0c9 python scripts/make_pixel_regression.py OUT.npz

(re-recorded that way when the package added ``--xla_cpu_use_fusion_emitters=false``: the old code's own outputs
moved by up to 8.7e-5 on ``adm_map``, 2.3e-6 on ``adm_red_diff`` and below 1.5e-6 elsewhere; and again when it added
``--xla_backend_optimization_level=1``: up to 2.4e-5 on ``adm_map``, 4.4e-6 on ``adm_red_diff``, below 4e-7 on the
other ADM cases, the GMM cases bitwise unchanged).

The script computes on ONE CPU (:func:`pin_to_one_cpu`, before JAX creates its CPU client). XLA:CPU splits work by
its thread count, and the split changes float32 rounding: ``adm_map`` moves by 4.1e-5 between one and two threads,
``adm_red_diff`` by 4.7e-6, the other ADM cases by up to 2e-7, the GMM cases not at all. One thread makes the
recording and the check independent of the machine's core count. (Re-recorded that way, old commit, the flags above:
the file before was made on two threads, and its check failed ``adm_map`` on one. Today's code on one CPU gives the
old commit's numbers bit for bit.)

The rounding also differs between kinds of CPU (instruction set, e.g. AVX-512 or AVX2): each kind has its own
recording, made this way on that kind, listed in ``tests/test_pixel_regression.py`` (``RECORDINGS``, by vendor, CPU
family and AVX-512): ``pixel_regression.npz`` on the AMD EPYC Zen 4 machines, ``pixel_regression_amd_family23.npz`` on
an AMD EPYC of family 23 (AVX2, 2026-12-01).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import mapreps_jax as mr
from mapreps_jax.networks.adm import ADMConfig, adm_score_model, init_adm_params
from mapreps_jax.priors import GMMPrior


def cases():
    """``{name: thunk}``: each returns the output array of one algorithm (the same calls in every version)."""
    jax.config.update("jax_default_matmul_precision", "highest")
    k = jax.random.PRNGKey
    out = {}
    # exact GMM prior on 8-vectors, a random 4x8 matrix
    gmm = GMMPrior.random(k(0), 8, 3)
    sched = mr.make_schedule("linear", T=60)
    m = gmm.score_model(sched)
    op = mr.make_operator("matrix", (8,), rows=4, seed=1)
    x = gmm.sample(k(1), 3)
    y = op.measure(k(2), x, 0.1)
    cfg = mr.MAPConfig(t1=3.0, w=0.3, n_iter=12, lr=0.05)
    out["gmm_map_adamw"] = lambda: mr.map_estimate(k(3), m, op, y, config=cfg)
    out["gmm_map_prox"] = lambda: mr.map_estimate(k(3), m, op, y, config=mr.MAPConfig(t1=3.0, w=0.3, n_iter=12,
                                                                                          solver="prox", average=4))
    out["gmm_map_stable"] = lambda: mr.map_estimate(k(3), m, op, y, config=mr.MAPConfig(t1=3.0, w=0.3, n_iter=12,
                                                                                            stable=True))
    x0 = op.x_init(y)
    for name, s in {"dps": mr.DPSStep(zeta=0.3, clip=False), "dps_sq": mr.DPSStep(zeta=0.1, loss="sq", clip=False),
                    "ddpm": mr.DDPMStep(), "ddnm": mr.DDNMStep(clip=False),
                    "pigdm": mr.PiGDMStep(sigma_y=0.1, clip=False), "dmps": mr.DMPSStep(sigma_y=0.1, clip=False),
                    "dps_raw": mr.DPSStep(zeta=0.3, mean="raw", clip=False)}.items():
        out[f"gmm_rps_{name}"] = (lambda s=s: mr.rps(k(4), m, op, y, x0, 20, sampler=s))
    out["gmm_rps_subgrid"] = lambda: mr.rps(k(4), m, op, y, x0, 30, sampler=mr.DPSStep(zeta=0.3, clip=False),
                                            n_steps=7)
    out["gmm_dps"] = lambda: mr.dps(k(5), m, op, y, zeta=0.3, clip=False)
    out["gmm_ccdf"] = lambda: mr.ccdf(k(6), m, op, y, 25, sampler=mr.DPSStep(zeta=0.3, clip=False))
    out["gmm_red_diff"] = lambda: mr.red_diff(k(7), m, op, y, config=mr.REDDiffConfig(n_steps=15, lr=0.1))
    out["gmm_map_rps"] = lambda: mr.map_rps(k(8), m, op, y, 15, map_config=cfg,
                                            sampler=mr.DPSStep(zeta=0.3, clip=False))
    out["gmm_dp_sweep"] = lambda: mr.dp_sweep(k(9), m, op, y, [0, 4, 11], map_config=cfg,
                                              sampler=mr.DPSStep(zeta=0.3, clip=False)).outputs
    out["gmm_prior_sample"] = lambda: mr.prior_sample(k(10), m, (2, 8), n_steps=9)
    # a tiny random ADM (learned variance) on 16x16 images, clipping on
    acfg = ADMConfig.tiny(image_size=16, model_channels=32, channel_mult=(1, 2))
    am = adm_score_model(acfg, init_adm_params(k(11), acfg), schedule=mr.make_schedule("linear", T=40))
    iop = mr.make_operator("inpaint_random", (16, 16, 3), seed=2, ratio=0.5)
    xi = jnp.tanh(jax.random.normal(k(12), (2, 16, 16, 3)))
    yi = iop.measure(k(13), xi, 0.05)
    icfg = mr.MAPConfig(t1=2.0, w=0.2, n_iter=4, lr=0.05)
    out["adm_map"] = lambda: mr.map_estimate(k(14), am, iop, yi, config=icfg)
    out["adm_rps_dps"] = lambda: mr.rps(k(15), am, iop, yi, iop.x_init(yi), 4, sampler=mr.DPSStep(zeta=0.5))
    out["adm_rps_dps_learned"] = lambda: mr.rps(k(15), am, iop, yi, iop.x_init(yi), 4,
                                                sampler=mr.DPSStep(zeta=0.5, variance="learned"))
    out["adm_rps_official"] = lambda: mr.rps(k(15), am, iop, yi, iop.x_init(yi), 4, sampler=mr.DPSStep.official(0.5))
    out["adm_rps_pigdm"] = lambda: mr.rps(k(15), am, iop, yi, iop.x_init(yi), 3, sampler=mr.PiGDMStep(sigma_y=0.05))
    out["adm_rps_ddnm"] = lambda: mr.rps(k(15), am, iop, yi, iop.x_init(yi), 3, sampler=mr.DDNMStep())
    out["adm_red_diff"] = lambda: mr.red_diff(k(16), am, iop, yi, config=mr.REDDiffConfig(n_steps=3))
    return out


def pin_to_one_cpu():
    """Restrict this process to one of its CPUs, so XLA:CPU runs single-threaded (its thread pool is sized by the
    process's CPU affinity). Must run before JAX's first computation. ``RuntimeError`` where the OS has no
    ``sched_setaffinity`` (the numbers would then depend on the core count)."""
    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError("make_pixel_regression: needs os.sched_setaffinity (Linux) to compute on one CPU")
    from jax._src import xla_bridge

    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        raise RuntimeError("make_pixel_regression: JAX's CPU client exists already; pin before computing")
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def main(path):
    pin_to_one_cpu()
    arrays = {name: np.asarray(f()) for name, f in cases().items()}
    np.savez_compressed(path, **arrays)
    print(f"wrote {len(arrays)} arrays to {path}")


if __name__ == "__main__":
    main(sys.argv[1])
