"""The notebooks (``notebooks/*.ipynb``): stored with their outputs stripped, and each one executes top to bottom
without an error within its time budget.

Each notebook runs in a fresh ``python3`` kernel of the interpreter running the tests (``sys.executable``, so the
test environment's packages), with the working directory ``notebooks/`` and the repository root on ``PYTHONPATH``.
A cell that raises fails the test with the cell's traceback (``nbclient.CellExecutionError``); a notebook that runs
past ``NOTEBOOK_TIMEOUT_S`` in all fails it too (the issue's limit: under 3 minutes each on 2 CPU cores; measured
35-55 s each on the 2-core development machine while it was busy with other work).

Needs ``nbclient``, ``nbformat`` and ``ipykernel`` (the ``test`` extra); without them the execution tests are skipped
with that reason. The stripped-outputs check needs nothing beyond the standard library.
"""

import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("01_quickstart.ipynb", "02_exact_testbed.ipynb", "03_gradient_research.ipynb", "04_latent.ipynb")
NOTEBOOK_TIMEOUT_S = 180      # per notebook, all cells together
KERNEL_STARTUP_TIMEOUT_S = 60


def _load(name):
    with open(os.path.join(NOTEBOOK_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def test_notebooks_are_present_and_stored_stripped():
    """Every notebook exists, is nbformat 4 with the ``python3`` kernel, explains itself in markdown, and holds no
    outputs, execution counts or execution timings (``python scripts/strip_notebooks.py`` strips them)."""
    found = sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
    assert found == sorted(NOTEBOOKS), f"notebooks/ holds {found}, expected {sorted(NOTEBOOKS)}"
    for name in NOTEBOOKS:
        nb = _load(name)
        assert nb["nbformat"] == 4, name
        assert nb["metadata"]["kernelspec"]["name"] == "python3", name
        kinds = [c["cell_type"] for c in nb["cells"]]
        assert kinds.count("markdown") >= 3 and kinds.count("code") >= 3, (name, kinds)
        for i, cell in enumerate(nb["cells"]):
            assert "execution" not in cell.get("metadata", {}), f"{name} cell {i}: execution timings stored"
            if cell["cell_type"] != "code":
                continue
            hint = "run `python scripts/strip_notebooks.py`"
            assert cell["outputs"] == [], f"{name} cell {i} stores outputs; {hint}"
            assert cell["execution_count"] is None, f"{name} cell {i} stores an execution count; {hint}"


def _kernel_manager_class():
    """A kernel manager class whose ``python3`` kernel is ``sys.executable`` (never another interpreter's
    kernelspec). Passed as a class, so that the notebook client owns the manager and shuts the kernel down."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name=f"Python ({sys.executable})", language="python", resource_dir="")

    class ThisInterpretersKernel(AsyncKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("kernel_spec_manager", ThisInterpreter())
            super().__init__(**kwargs)

    return ThisInterpretersKernel


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_without_error(name, record_property):
    reason = "needs nbclient, nbformat and ipykernel (pip install -e '.[test]')"
    nbformat = pytest.importorskip("nbformat", reason=reason)
    nbclient = pytest.importorskip("nbclient", reason=reason)
    pytest.importorskip("ipykernel", reason=reason)
    from nbclient.exceptions import CellTimeoutError

    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S

    def remaining(cell):  # one budget for the whole notebook (nbclient's own timeout is per cell)
        return max(1, int(deadline - time.monotonic()) + 1)

    client = nbclient.NotebookClient(nb, kernel_manager_class=_kernel_manager_class(), timeout_func=remaining,
                                     startup_timeout=KERNEL_STARTUP_TIMEOUT_S, allow_errors=False,
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    start = time.monotonic()
    try:
        client.execute(env=env)
    except CellTimeoutError:
        pytest.fail(f"{name} ran past its budget of {NOTEBOOK_TIMEOUT_S} s (all cells together)")
    elapsed = time.monotonic() - start
    record_property("seconds", round(elapsed, 1))
    print(f"{name}: {elapsed:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
