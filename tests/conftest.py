import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Before any test computes: the package's XLA:CPU settings (mapreps_jax/xla_cpu.py) take effect only if it is
# imported before JAX creates its CPU client.
import mapreps_jax  # noqa: E402,F401


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Every compiled XLA:CPU program keeps about three memory mappings for its code; JAX caches them for the life of
    the process (eager operations too, one per shape and dtype). Over the whole suite in one process that reached
    the kernel's limit of 65,530 mappings per process (``vm.max_map_count``) and XLA segfaulted while compiling
    (seen twice, at different tests). Modules rarely share compiled programs, so clearing the caches between modules
    costs little."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def x64():
    """float64 arrays for the test (``jax_enable_x64``), restored afterwards."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)
