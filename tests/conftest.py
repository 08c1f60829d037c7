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
