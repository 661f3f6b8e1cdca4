"""How many digits does digit-FD need? Split one demo run into disjoint sets and count how often the FD trend holds.

Runs ``mapreps demo`` with the ``--quick`` settings on ``--n-images`` digits per task (default 64), then, for each
task, splits the outputs into disjoint sets of 16, 32, ... images and counts on how many sets digit-FD at the largest
``t0`` is below digit-FD at ``t0 = 0`` (the MAP estimate). Also reports the clean digits' own digit-FD at each set size
(the small-set bias). The same for digit-KID (:func:`~mapreps_jax.app.perception.digit_kid`, unbiased, with a
jackknife standard error): on how many sets it falls, and on how many the fall exceeds twice the combined standard
error (``kid_falls_2se``: the error bars of the two points do not overlap). Writes a JSON file (atomically) and prints
Markdown tables.

    python scripts/digit_fd_power.py --n-images 64 --out docs/digit_fd_power.json

About 4 minutes on 2 CPU cores at 64 digits per task.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mapreps_jax.app.demo import QUICK, run_demo  # noqa: E402
from mapreps_jax.app.perception import digit_fd, digit_kid  # noqa: E402
from mapreps_jax.app.pretrained import load_default_prior  # noqa: E402
from mapreps_jax.checkpoint_io import write_text_atomic  # noqa: E402


def _print_table(tasks, sizes, n_images, cell):
    """A Markdown table: one row per task, one column per set size, ``cell(row_of_that_size)`` in each."""
    print("| task | " + " | ".join(f"{n_images // s} set{'s' if n_images > s else ''} of {s}" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, rows in tasks.items():
        print(f"| {name} | " + " | ".join(cell(rows[s]) for s in sizes) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=64, help="digits per task (a multiple of 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output file")
    a = p.parse_args(argv)
    if a.n_images < 16 or a.n_images % 16:
        p.error(f"--n-images must be a positive multiple of 16, got {a.n_images}")
    cfg = dataclasses.replace(QUICK, n_images=a.n_images, seed=a.seed, space="pixel")
    result = run_demo(load_default_prior(), cfg)
    t0_top = cfg.t0[-1]
    sizes = [s for s in (16, 32, 64, 128, 256) if s <= a.n_images and a.n_images % s == 0]
    out = {"config": result["metrics"]["config"], "largest_t0": t0_top, "sizes": sizes, "tasks": {},
           "clean": {},
           # the whole run's RMSE (the demo test's criteria, on the same settings): MAP-RPS per t0, and DPS
           "rmse": {name: {"map_rps": [pt["rmse"] for pt in r["map_rps"]], "dps": r["dps"]["rmse"]}
                    for name, r in result["metrics"]["tasks"].items()}}
    truth = next(iter(result["images"].values()))["truth"]
    for s in sizes:
        out["clean"][s] = [float(digit_fd(truth[i:i + s])) for i in range(0, a.n_images, s)]
        out.setdefault("clean_kid", {})[s] = [digit_kid(truth[i:i + s]) for i in range(0, a.n_images, s)]
    for name, im in result["images"].items():
        first, last = im["map_rps"][0], im["map_rps"][-1]
        rows = {}
        for s in sizes:
            pairs = [(float(digit_fd(first[i:i + s])), float(digit_fd(last[i:i + s])))
                     for i in range(0, a.n_images, s)]
            kids = [(digit_kid(first[i:i + s]), digit_kid(last[i:i + s])) for i in range(0, a.n_images, s)]
            rows[s] = {"fd_map_and_largest_t0": pairs, "falls": int(sum(b < f for f, b in pairs)), "sets": len(pairs),
                       "kid_map_and_largest_t0": kids,
                       "kid_falls": int(sum(kb[0] < kf[0] for kf, kb in kids)),
                       "kid_falls_2se": int(sum(kf[0] - kb[0] > 2 * (kf[1] ** 2 + kb[1] ** 2) ** 0.5
                                                for kf, kb in kids))}
        out["tasks"][name] = rows
    def fd_cell(r):
        cell = f"{r['falls']} of {r['sets']}"
        if r["sets"] == 1:
            f, b = r["fd_map_and_largest_t0"][0]
            cell += f" ({f:.0f} -> {b:.0f})"
        return cell

    def kid_cell(r):
        cell = f"{r['kid_falls']} ({r['kid_falls_2se']}) of {r['sets']}"
        if r["sets"] == 1:
            (f, fe), (b, be) = r["kid_map_and_largest_t0"][0]
            cell += f" ({f:.0f} +- {fe:.0f} -> {b:.0f} +- {be:.0f})"
        return cell

    _print_table(out["tasks"], sizes, a.n_images, fd_cell)
    print("clean digits, digit-FD per set:", {s: [round(v) for v in vals] for s, vals in out["clean"].items()})
    print("\ndigit-KID: sets on which it falls from t0 = 0 to the largest t0 (by more than 2 combined standard errors)")
    _print_table(out["tasks"], sizes, a.n_images, kid_cell)
    if a.out:
        write_text_atomic(a.out, json.dumps(out, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
