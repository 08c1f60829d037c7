"""Give the tests 8 CPU devices so that meshes and sharded computations can run on any machine.

XLA reads XLA_FLAGS once, when the first backend is created, so the flag has to be set before
anything imports and uses jax. pytest imports this conftest before collecting any test module,
which makes it the one place where that is guaranteed. Existing XLA_FLAGS are kept (appended to).
The flag affects only the host (CPU) platform; a GPU or TPU backend is unchanged.
"""

import os

# libtpu is installed for the plan tests, which ask it for compile-only TPU devices directly.
# Every other backend start would also load it (and print its warnings on stderr, which tests
# of one-line errors read): the tests and the runs they start use the CPU only. Processes that
# load it take libtpu's lockfile, which a second one (a plan run beside the tests) may not get.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

# The suite runs on pytest-xdist workers, one file per worker at a time (`-n auto --dist loadfile`
# in pyproject.toml). Most heavy tests compile with one thread or wait on a training subprocess,
# so a second worker uses the second core of a 2-core machine. "auto" is capped here: by physical
# cores (two hyperthreads of one core gain little), by the CPUs this process may run on, and by
# memory (a worker with its 8 CPU devices and a training subprocess can take about 6 GiB).
# PYTEST_XDIST_AUTO_NUM_WORKERS, or an explicit -n N, overrides it; -n 0 runs in this process.
_GIB_PER_WORKER = 6


def pytest_xdist_auto_num_workers(config):
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil
    except ImportError:
        cores, gib = cpus, None
    else:
        cores = psutil.cpu_count(logical=False) or cpus
        gib = psutil.virtual_memory().total / 2**30
    workers = min(cpus or 1, cores or 1)
    if gib is not None:
        workers = min(workers, int(gib // _GIB_PER_WORKER))
    return max(1, workers)
