"""Merge a pixel-space and a latent-space ``mapreps demo`` run (same digits, tasks and seed) into one ``metrics.json``
and one ``dp_curve.png`` with both curves per panel: how the README's latent figure was made from two runs of 128
digits per task (``mapreps demo --space pixel --n-images 128`` and ``--space latent --n-images 128``; one
``--space both`` run gives the same files directly).

    python scripts/merge_demo_metrics.py --pixel docs/digits_demo_metrics.json \
        --latent LATENT_OUT/metrics.json --out docs/latent_demo_metrics.json --curve docs/latent_dp_curve.png
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mapreps_jax.app.demo import dp_curve_figure, dumps_json, figure_png  # noqa: E402
from mapreps_jax.checkpoint_io import write_bytes_atomic  # noqa: E402


def merge(pixel: dict, latent: dict) -> dict:
    """The latent run's per-task entries added to the pixel run's (``ValueError`` if the runs differ in digits,
    tasks, ``t0`` or seed)."""
    for key in ("tasks", "t0", "n_images", "seed"):
        if pixel["config"][key] != latent["config"][key]:
            raise ValueError(f"the runs differ in {key}: {pixel['config'][key]} vs {latent['config'][key]}")
    out = json.loads(json.dumps(pixel))
    for name, r in latent["tasks"].items():
        out["tasks"][name].update({k: v for k, v in r.items() if k not in out["tasks"][name]})
    out["config"].update({k: v for k, v in latent["config"].items() if k.startswith("latent_")}, space="both")
    out["nfe"]["latent"] = latent["nfe"]["latent"]
    out["seconds_latent"] = latent["seconds"]
    out["latent_model"] = latent.get("latent_model")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pixel", required=True)
    p.add_argument("--latent", required=True)
    p.add_argument("--out", required=True, help="merged metrics.json")
    p.add_argument("--curve", required=True, help="dp_curve.png of the merged metrics")
    a = p.parse_args(argv)
    with open(a.pixel) as f:
        pixel = json.load(f)
    with open(a.latent) as f:
        latent = json.load(f)
    m = merge(pixel, latent)
    write_bytes_atomic(a.out, (dumps_json(m, a.out) + "\n").encode("utf-8"))
    write_bytes_atomic(a.curve, figure_png(dp_curve_figure(m)))
    print(f"wrote {a.out}, {a.curve}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
