"""How many digits does a perception index need? Split one demo run into sets and count how often each trend holds.

Runs ``mapreps demo`` (``--config quick``: the ``--quick`` settings, default; ``--config default``: the default
settings) on ``--n-images`` digits per task (default 64), pixel space, then, for each task, splits the outputs into
disjoint sets of 16, 32, ... images and, for each of three indices, counts on how many sets the index at ``t0 = 0``
(the MAP estimate) is above its value at a later ``t0``: the largest ``t0`` of the sweep, and the knee ``--knee``
(chosen before the run, default 200: where the D-P curve of the digits flattens). The indices:

* digit-FD (no standard error; biased upwards for small sets: the clean digits' own values are reported);
* digit-KID (:func:`~mapreps_jax.app.perception.digit_kid`, unbiased, jackknife standard error);
* grey-W1 (:func:`~mapreps_jax.app.perception.grey_w1`, jackknife standard error).

For the two with a standard error it also counts the sets on which the fall exceeds twice the combined standard error
(``*_2se``: the error bars of the two points do not overlap). Writes a JSON file (atomically) and prints Markdown
tables.

    python scripts/digit_fd_power.py --n-images 64 --out docs/digit_index_power.json
    python scripts/digit_fd_power.py --config default --tasks sr4,deblur --n-images 64 \
        --out docs/digit_index_power_default.json

About 4 minutes on 2 CPU cores at 64 digits per task with the quick settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mapreps_jax.app.demo import QUICK, DemoConfig, run_demo  # noqa: E402
from mapreps_jax.app.perception import digit_fd, digit_kid, grey_w1  # noqa: E402
from mapreps_jax.app.pretrained import load_default_prior  # noqa: E402
from mapreps_jax.checkpoint_io import write_text_atomic  # noqa: E402

#: name -> (value, standard error or None) of a set of images
INDICES = {"fd": lambda x: (float(digit_fd(x)), None), "kid": digit_kid, "grey_w1": lambda x: grey_w1(x)}


def _print_table(tasks, sizes, n_images, cell):
    """A Markdown table: one row per task, one column per set size, ``cell(row_of_that_size)`` in each."""
    print("| task | " + " | ".join(f"{n_images // s} set{'s' if n_images > s else ''} of {s}" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, rows in tasks.items():
        print(f"| {name} | " + " | ".join(cell(rows[s]) for s in sizes) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=64, help="digits per task (a multiple of 16)")
    p.add_argument("--config", choices=("quick", "default"), default="quick", help="the demo settings")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all four)")
    p.add_argument("--knee", type=int, default=200, help="the t0 compared with t0 = 0 besides the largest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output file")
    a = p.parse_args(argv)
    if a.n_images < 16 or a.n_images % 16:
        p.error(f"--n-images must be a positive multiple of 16, got {a.n_images}")
    base = QUICK if a.config == "quick" else DemoConfig()
    over = {"tasks": tuple(a.tasks.split(","))} if a.tasks else {}
    cfg = dataclasses.replace(base, n_images=a.n_images, seed=a.seed, space="pixel", **over)
    if a.knee not in cfg.t0:
        p.error(f"--knee must be one of the sweep's t0 {list(cfg.t0)}, got {a.knee}")
    result = run_demo(load_default_prior(), cfg)
    t0s = list(result["metrics"]["config"]["t0"])
    compare = {"largest_t0": t0s.index(t0s[-1]), "knee": t0s.index(a.knee)}
    sizes = [s for s in (16, 32, 64, 128, 256) if s <= a.n_images and a.n_images % s == 0]
    out = {"config": result["metrics"]["config"], "largest_t0": t0s[-1], "knee_t0": a.knee, "sizes": sizes,
           "tasks": {}, "clean": {},
           # the whole run's RMSE (the demo test's criteria, on the same settings): MAP-RPS per t0, and DPS
           "rmse": {name: {"map_rps": [pt["rmse"] for pt in r["map_rps"]], "dps": r["dps"]["rmse"]}
                    for name, r in result["metrics"]["tasks"].items()}}
    truth = next(iter(result["images"].values()))["truth"]
    for s in sizes:
        out["clean"][s] = {k: [f(truth[i:i + s]) for i in range(0, a.n_images, s)] for k, f in INDICES.items()}
    for name, im in result["images"].items():
        sweep = im["map_rps"]
        rows = {}
        for s in sizes:
            row = {"sets": a.n_images // s}
            for k, f in INDICES.items():
                vals = [[f(o[i:i + s]) for i in range(0, a.n_images, s)] for o in sweep]  # [t0][set] (v, se)
                row[k] = {"per_t0": vals}
                for label, j in compare.items():
                    pairs = list(zip(vals[0], vals[j]))
                    row[k][f"falls_to_{label}"] = int(sum(b[0] < f0[0] for f0, b in pairs))
                    if k != "fd":
                        row[k][f"falls_2se_to_{label}"] = int(sum(
                            f0[0] - b[0] > 2 * (f0[1] ** 2 + b[1] ** 2) ** 0.5 for f0, b in pairs))
            rows[s] = row
        out["tasks"][name] = rows

    for k in INDICES:
        for label in compare:
            what = f"{k}: sets on which it falls from t0 = 0 to the {label.replace('_', ' ')}"
            if k != "fd":
                what += " (by more than 2 combined standard errors)"
            print(f"\n{what}")

            def cell(r, k=k, label=label):
                c = f"{r[k][f'falls_to_{label}']}"
                if k != "fd":
                    c += f" ({r[k][f'falls_2se_to_{label}']})"
                return c + f" of {r['sets']}"

            _print_table(out["tasks"], sizes, a.n_images, cell)
    if a.out:
        write_text_atomic(a.out, json.dumps(out, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
