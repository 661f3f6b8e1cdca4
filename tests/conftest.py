import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _pin_xdist_worker():
    """Under pytest-xdist (the README's ``-n 2``), each worker process keeps to its own share of the CPUs: worker ``i``
    of ``n`` gets every ``n``-th CPU from the ``i``-th. XLA:CPU sizes its thread pool by the CPUs a process may use,
    so on a 2-core machine each worker computes on one thread instead of both workers contending with two threads
    each. Measured on the 2-core development machine, the same tests: 17 min 6 s unpinned, 16 min 31 s pinned (while
    another job took about 1.5 core-minutes), CPU time 31.1 -> 29.1 min (less time lost to threads waiting on each
    other); four compile- and run-heavy modules alone, idle: 110 s -> 97 s. Before JAX creates its CPU client; not
    where the OS has no ``sched_setaffinity``, with fewer CPUs than workers, or with ``MAPREPS_TEST_PIN_WORKERS=0``.
    Child processes the tests start inherit the share. Results that depend on the thread count are computed on one
    CPU by the test itself (``tests/test_pixel_regression.py``)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if (not worker.startswith("gw") or not count.isdigit() or os.environ.get("MAPREPS_TEST_PIN_WORKERS") == "0"
            or not hasattr(os, "sched_setaffinity")):
        return
    cpus, n = sorted(os.sched_getaffinity(0)), int(count)
    if 2 <= n <= len(cpus):
        os.sched_setaffinity(0, set(cpus[int(worker[2:]) % n::n]))


_pin_xdist_worker()

import gc  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Before any test computes: the package's XLA:CPU settings (mapreps_jax/xla_cpu.py) take effect only if it is
# imported before JAX creates its CPU client.
import mapreps_jax  # noqa: E402,F401

# One persistent XLA compilation cache for the whole run, shared with the subprocesses the tests start (CLI runs,
# notebooks, workers inherit JAX_COMPILATION_CACHE_DIR): a program that another test or process already compiled
# with the same XLA flags and devices (JAX's cache key) is loaded instead of compiled again. Programs compiling in
# under a second are not stored (JAX's default threshold; storing the quicker ones measured no gain). A directory
# set by the caller is kept; ours is removed at the end of the session.
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="mapreps-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

_CACHE_EVENTS = {}


def _count_cache_event(event, *args, **kwargs):
    if event.startswith("/jax/compilation_cache/"):
        _CACHE_EVENTS[event] = _CACHE_EVENTS.get(event, 0) + 1


def _count_cache_duration(event, duration, **kwargs):
    if event.startswith("/jax/compilation_cache/"):
        _CACHE_EVENTS[event] = _CACHE_EVENTS.get(event, 0.0) + float(duration)


jax.monitoring.register_event_listener(_count_cache_event)
jax.monitoring.register_event_duration_secs_listener(_count_cache_duration)


# Under xdist the tests run in worker processes: each sends its counts back (``workeroutput``) and the controller adds
# them up, so the summary covers the whole run, not only the controller (which runs no test).
_WORKER_EVENTS = {}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for k, v in getattr(node, "workeroutput", {}).get("xla_cache_events", {}).items():
        _WORKER_EVENTS[k] = _WORKER_EVENTS.get(k, 0) + v


def pytest_terminal_summary(terminalreporter):
    """The persistent cache's use (hits, misses, compile seconds saved) in this process and its xdist workers, for
    the suite-time budget."""
    total = dict(_WORKER_EVENTS)
    for k, v in _CACHE_EVENTS.items():
        total[k] = total.get(k, 0) + v
    if total:
        where = "this process and its workers" if _WORKER_EVENTS else "this process"
        terminalreporter.write_line(f"XLA compilation cache ({where}): " + ", ".join(
            f"{k.rsplit('/', 1)[-1]} {v:.1f}" if isinstance(v, float) else f"{k.rsplit('/', 1)[-1]} {v}"
            for k, v in sorted(total.items())))


def pytest_sessionfinish(session, exitstatus):
    out = getattr(session.config, "workeroutput", None)
    if out is not None:  # an xdist worker: hand the counts to the controller
        out["xla_cache_events"] = dict(_CACHE_EVENTS)
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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


# Modules that are compile-bound: tiny networks (ADM, SD UNet, VAE) run a few steps, and XLA:CPU spends most of
# such a test in LLVM. They compile with JAX's ``jax_disable_most_optimizations`` (XLA backend optimisation level 0,
# no expensive LLVM passes): the same program semantics (no fast-math), about half the compile time, about 2.3x the
# run time of the digits ADM. Measured under two workers, against the previous full run: all algorithms on a tiny
# ADM 68 -> 47 s, every algorithm on a loaded latent model 71 -> 26 s, LMAP-RPS on a tiny SD 38 -> 16 s, per-image
# independence on a tiny ADM 34 -> 19 s. Every other module compiles as users do: the exact-prior testbeds run
# hundreds of cheap steps (execution-bound: 2-4x slower at level 0), some assert bitwise or 1e-5 equalities of
# optimised programs (remat against no remat, a vmapped against a sequential sweep, a scan against its reference
# loop; at level 0 their round-off differs), and the demo, the recorded outputs, the networks' equivalence tests
# against their PyTorch references (``*_torchref.py``) and the miscompile guards must test the programs users run.
COMPILE_BOUND_MODULES = ("test_algorithms_adm.py", "test_latent_models.py", "test_per_image.py",
                         "test_latent_methods.py", "test_adm.py", "test_sd_unet.py", "test_restore.py",
                         "test_traceable.py", "test_presets.py", "test_presets_latent.py", "test_spaces.py",
                         "test_nfe_counted.py", "test_bad_inputs.py", "test_operators.py")


@pytest.fixture(autouse=True, scope="module")
def _xla_optimisation_for_the_module(request):
    prev = bool(jax.config.values.get("jax_disable_most_optimizations", False))
    jax.config.update("jax_disable_most_optimizations", request.path.name in COMPILE_BOUND_MODULES)
    yield
    jax.config.update("jax_disable_most_optimizations", prev)


@pytest.fixture
def x64():
    """float64 arrays for the test (``jax_enable_x64``), restored afterwards."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


# The slowest modules (CI's --durations), started first: under ``-n 2 --dist loadfile`` (README) a worker takes whole
# modules in collection order, and a long module picked up last would leave the other worker idle at the end.
SLOWEST_FIRST = ("test_demo.py", "test_notebooks.py", "test_sharding.py", "test_restore_batch.py",
                 "test_adm_torchref.py", "test_tune.py", "test_sd_unet_torchref.py", "test_algorithms_adm.py",
                 "test_continuous.py", "test_latent_models.py", "test_digits_prior.py", "test_latent_methods.py",
                 "test_per_image.py")


_unknown = [m for m in COMPILE_BOUND_MODULES + SLOWEST_FIRST if not os.path.exists(os.path.join(ROOT, "tests", m))]
if _unknown:
    raise RuntimeError(f"tests/conftest.py names test modules that do not exist: {_unknown}")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module is kept
