#!/usr/bin/env python
"""Break each algorithm on purpose, in a copy of the repository, and check that the fast test suite notices.

Usage (from the repository root, with the project's interpreter)::

    .venv/bin/python scripts/break_on_purpose.py                      # baseline + every breakage, fail-fast
    .venv/bin/python scripts/break_on_purpose.py --no-fail-fast       # list every test that catches each breakage
    .venv/bin/python scripts/break_on_purpose.py --only dps_guidance_off --tests tests/test_algorithms_reference.py

What it does:

1. copies the working tree (git-tracked files and untracked, not ignored ones, as they are on disk now) to a
   temporary directory; the copy's ``mapreps_jax`` is the one imported there (checked, since the project is
   installed in editable mode);
2. runs the test files once unbroken (the baseline): tests that already fail there are reported and deselected
   from the runs below, so a failure is attributable to the breakage;
3. for each breakage, replaces a string in the copy's source (asserting that the target string occurs exactly as
   many times as expected, so the script fails loudly when the code changes), runs
   ``python -m pytest -q -x <test files>`` in the copy, records whether the suite FAILED (it must) and which test
   caught it, and restores the file;
4. writes a JSON report (default ``docs/break_on_purpose.json``) atomically (temporary file, then rename).

Exit status 0 iff every breakage made the suite fail (and the baseline ran), 1 otherwise. The repository itself is
never modified (only the report is written).

The breakages (issue 12):

* ``dps_guidance_off``: DPS guidance removed (``zeta`` effectively 0 in ``DPSStep.step``): plain unconditional
  sampling;
* ``stage2_identity``: Stage 2 a no-op (``rps`` returns ``x_init``);
* ``stage1_prior_off``: the prior term ``w e`` removed from Stage 1 (both solvers);
* ``red_diff_prior_off``: RED-diff's regulariser weight ``lambda`` term removed;
* ``latent_decoder_off`` (issue 13): the one data fit ``y - A(D(z))`` skips the decoder;
* ``psld_glue_off``: PSLD's gluing term removed;
* ``renoise_off``: Stage 2 starts from ``x_init`` itself at ``t0`` (no re-noising; the sampler still runs);
* ``resample_hard_dc_off``: ReSample's hard data consistency (and resampling) never applied: only its DPS steps.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TESTS = "tests/test_algorithms_reference.py"
DEFAULT_TESTS = [NEW_TESTS, "tests/test_map_rps.py", "tests/test_traceable.py", "tests/test_spaces.py",
                 "tests/test_resample.py"]

# (file, target, replacement, expected number of occurrences)
BREAKAGES = [
    dict(name="dps_guidance_off",
         description="DPS guidance off: DPSStep.step returns the unguided move (zeta effectively 0)",
         edits=[("mapreps_jax/samplers.py", "SamplerState(x_next - self.zeta * g, state.extra), StepInfo(x0, res)",
                 "SamplerState(x_next - 0.0 * self.zeta * g, state.extra), StepInfo(x0, res)", 1)]),
    dict(name="stage2_identity",
         description="Stage 2 as identity: rps returns x_init for every t0",
         edits=[("mapreps_jax/rps_stage.py", "return jnp.where(t0 > 0, out, x_init)", "return x_init", 2)]),
    dict(name="stage1_prior_off",
         description="prior term off in Stage 1: w e removed from the AdamW loss and from the prox forward step",
         edits=[("mapreps_jax/map_stage.py", "jnp.sum(fit) + jnp.sum(w * e * x)",
                 "jnp.sum(fit) + 0.0 * jnp.sum(w * e * x)", 1),
                ("mapreps_jax/map_stage.py", "state.x - eta * w * e", "state.x - 0.0 * eta * w * e", 1)]),
    dict(name="red_diff_prior_off",
         description="RED-diff's prior weight off: the lambda w(t) <e - eps, mu> term removed from its loss",
         edits=[("mapreps_jax/baselines.py", "config.lam * wt * reg", "0.0 * config.lam * wt * reg", 1)]),
    dict(name="latent_decoder_off",
         description="the data fit skips the decoder: Problem.residual returns y - A(z) (latent algorithms break)",
         edits=[("mapreps_jax/space.py", "return self.y - self.op.A(x)", "return self.y - self.op.A(z)", 1)]),
    dict(name="psld_glue_off",
         description="PSLD's gluing term removed (gamma effectively 0)",
         edits=[("mapreps_jax/samplers.py", "jnp.sum(data + _per_image(self.gamma, 1) * glue)",
                 "jnp.sum(data + 0.0 * _per_image(self.gamma, 1) * glue)", 1)]),
    dict(name="renoise_off",
         description="Stage 2 without re-noising: rps starts its reverse loop at t0 from x_init itself",
         edits=[("mapreps_jax/rps_stage.py", "x = renoise(k_noise, x_init, model.alpha_bar(t0 - 1))",
                 "x = x_init", 1)]),
    dict(name="resample_hard_dc_off",
         description="ReSample's hard data consistency off: z_next is the DPS step's on every step",
         edits=[("mapreps_jax/samplers.py", "z_next = jax.lax.cond(dc, hard_dc, lambda zp: zp, z_prime)",
                 "z_next = z_prime", 1)]),
]


def repo_files(root):
    """Git-tracked and untracked-but-not-ignored files that exist on disk (the working tree as it is now)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    files = sorted({f for f in out.split("\0") if f})
    return [f for f in files if os.path.isfile(os.path.join(root, f)) and not os.path.islink(os.path.join(root, f))]


def copy_tree(root, dest):
    files = repo_files(root)
    for f in files:
        target = os.path.join(dest, f)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, f), target)
    return len(files)


def apply_edits(copy, edits):
    """Apply the string replacements in ``copy``; return the original contents to restore. Asserts each target
    occurs exactly the expected number of times (a changed source fails loudly, never silently unbroken)."""
    originals = {}
    for rel, old, new, count in edits:
        path = os.path.join(copy, rel)
        with open(path) as fh:
            text = fh.read()
        originals.setdefault(rel, text)
        found = text.count(old)
        if found != count:
            raise AssertionError(f"break_on_purpose: expected {count} occurrence(s) of {old!r} in {rel}, found "
                                 f"{found}: the source changed, update BREAKAGES")
        with open(path, "w") as fh:
            fh.write(text.replace(old, new))
    return originals


def restore(copy, originals):
    for rel, text in originals.items():
        with open(os.path.join(copy, rel), "w") as fh:
            fh.write(text)


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)")


def run_pytest(copy, tests, fail_fast, deselect, timeout):
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--color=no"]
    if fail_fast:
        cmd.append("-x")
    for node in deselect:
        cmd += ["--deselect", node]
    cmd += list(tests)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    failed = []
    for line in out.splitlines():
        m = _FAILED.match(line.strip())
        if m and m.group(2) not in failed:
            failed.append(m.group(2))
    summary = next((ln.strip() for ln in reversed(out.splitlines()) if re.search(r"\b(passed|failed|error)", ln)), "")
    return dict(returncode=rc, failed=failed, summary=summary, seconds=round(time.perf_counter() - t, 1),
                command=" ".join(cmd[1:]), output_tail=out[-3000:])


def write_json_atomic(path, obj):
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".break_on_purpose.", suffix=".json.tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def git_head(root):
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None, None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="test files to run (default: %(default)s)")
    ap.add_argument("--only", nargs="+", choices=[b["name"] for b in BREAKAGES], help="run only these breakages")
    ap.add_argument("--no-fail-fast", action="store_true", help="run without -x: list every test that catches")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unbroken run (nothing is deselected)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per pytest run (default %(default)s)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "break_on_purpose.json"), help="JSON report path")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = ap.parse_args(argv)

    for t in args.tests:
        if not os.path.isfile(os.path.join(ROOT, t)):
            ap.error(f"no test file {t!r} under {ROOT}")
    breakages = [b for b in BREAKAGES if not args.only or b["name"] in args.only]
    tmp = tempfile.mkdtemp(prefix="mapreps_break_")
    copy = os.path.join(tmp, "repo")
    head, dirty = git_head(ROOT)
    report = dict(created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  git_head=head, working_tree_dirty=dirty, python=sys.executable, tests=list(args.tests),
                  fail_fast=not args.no_fail_fast, new_tests=NEW_TESTS)
    ok = True
    try:
        report["files_copied"] = copy_tree(ROOT, copy)
        # Each target must be present in the pristine copy before anything runs (fail loudly, early).
        for b in breakages:
            restore(copy, apply_edits(copy, b["edits"]))
        probe = subprocess.run([sys.executable, "-c", "import mapreps_jax; print(mapreps_jax.__file__)"], cwd=copy,
                               capture_output=True, text=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        imported = probe.stdout.strip()
        if probe.returncode != 0 or not os.path.realpath(imported).startswith(os.path.realpath(copy)):
            raise RuntimeError(f"break_on_purpose: the copy imports mapreps_jax from {imported!r}, not from the copy "
                               f"{copy}: {probe.stderr[-2000:]}")
        report["imports_from_copy"] = True
        print(f"copy: {copy} ({report['files_copied']} files)", flush=True)

        deselect = []
        if not args.no_baseline:
            print("baseline (unbroken) ...", flush=True)
            base = run_pytest(copy, args.tests, fail_fast=False, deselect=[], timeout=args.timeout)
            deselect = list(base["failed"])
            report["baseline"] = {k: v for k, v in base.items() if k != "output_tail" or base["failed"]}
            print(f"  {base['summary']} ({base['seconds']} s); pre-existing failures deselected: {deselect}",
                  flush=True)
            if base["returncode"] not in (0, 1) or (base["returncode"] == 1 and not deselect):
                ok = False
                print("  baseline did not run cleanly", flush=True)
        report["deselected_preexisting_failures"] = deselect

        results = []
        for b in breakages:
            print(f"{b['name']}: {b['description']} ...", flush=True)
            originals = apply_edits(copy, b["edits"])
            try:
                res = run_pytest(copy, args.tests, fail_fast=not args.no_fail_fast, deselect=deselect,
                                 timeout=args.timeout)
            finally:
                restore(copy, originals)
            suite_failed = res["returncode"] == 1 and bool(res["failed"])
            caught_new = [n for n in res["failed"] if n.startswith(NEW_TESTS)]
            entry = dict(name=b["name"], description=b["description"],
                         edits=[dict(file=f, target=o, replacement=n) for f, o, n, _ in b["edits"]],
                         suite_failed=suite_failed, caught_by=res["failed"], caught_by_new_tests=caught_new,
                         returncode=res["returncode"], summary=res["summary"], seconds=res["seconds"],
                         command=res["command"])
            if not suite_failed:
                entry["output_tail"] = res["output_tail"]
                ok = False
            results.append(entry)
            verdict = "FAILED (caught)" if suite_failed else "PASSED (NOT caught)"
            print(f"  suite {verdict}: {res['failed'][:3]}{' ...' if len(res['failed']) > 3 else ''} "
                  f"({res['seconds']} s)", flush=True)
        report["breakages"] = results
        report["all_caught"] = ok and all(r["suite_failed"] for r in results)
        report["all_caught_by_new_tests"] = all(r["caught_by_new_tests"] for r in results)
    except BaseException as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["all_caught"] = False
        write_json_atomic(args.out, report)
        raise
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(args.out, report)
    print(f"report: {args.out}; all caught: {report['all_caught']}", flush=True)
    return 0 if report["all_caught"] else 1


if __name__ == "__main__":
    sys.exit(main())
