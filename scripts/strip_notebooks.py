"""Strip the outputs of Jupyter notebooks in place: every code cell gets ``outputs = []`` and
``execution_count = null``; the per-cell execution timings (``metadata.execution``) and what a kernel records about
itself (``metadata.language_info`` beyond its ``name``, e.g. the Python version) are dropped.

The repository stores ``notebooks/*.ipynb`` stripped (``tests/test_notebooks.py`` checks it; CI executes them).

    python scripts/strip_notebooks.py                 # every notebooks/*.ipynb
    python scripts/strip_notebooks.py a.ipynb b.ipynb
    python scripts/strip_notebooks.py --check         # exit 1 (and list them) if any notebook holds outputs

Plain JSON, no Jupyter package needed; written as nbformat writes it (sorted keys, indent 1, UTF-8, trailing
newline), so stripping an already stripped notebook changes nothing.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strip(nb: dict) -> bool:
    """Strip ``nb`` (a parsed notebook) in place; returns whether anything changed."""
    changed = False
    info = nb.get("metadata", {}).get("language_info")
    if isinstance(info, dict) and set(info) - {"name"}:
        nb["metadata"]["language_info"] = {"name": info.get("name", "python")}
        changed = True
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {})
        if "execution" in meta:
            del meta["execution"]
            changed = True
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs") != []:
            cell["outputs"] = []
            changed = True
        if cell.get("execution_count") is not None:
            cell["execution_count"] = None
            changed = True
    return changed


def dumps(nb: dict) -> str:
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", help="notebooks (default: notebooks/*.ipynb of the repository)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if any notebook holds outputs")
    args = ap.parse_args(argv)
    paths = args.paths or sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
    if not paths:
        print("no notebooks found", file=sys.stderr)
        return 2
    dirty = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        nb = json.loads(text)
        changed = strip(nb)
        if changed or (not args.check and dumps(nb) != text):
            dirty.append(path)
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(dumps(nb))
    for path in dirty:
        print(("has outputs: " if args.check else "stripped: ") + os.path.relpath(path))
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
