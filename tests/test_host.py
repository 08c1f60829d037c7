"""deepseek_jax.host: the malloc tunable the `deepseek-jax` command starts under."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from deepseek_jax.host import OPT_OUT, THP_TUNABLE, malloc_env, without_malloc_thp

GLIBC = os.confstr("CS_GNU_LIBC_VERSION") is not None

pytestmark = pytest.mark.skipif(not GLIBC, reason="the tunable is glibc's")


def test_malloc_env_adds_the_tunable_and_keeps_the_users():
    assert malloc_env({})["GLIBC_TUNABLES"] == THP_TUNABLE
    env = malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=4:{THP_TUNABLE}"
    assert env["PATH"] == "/bin"
    # Added once; a value the user chose for the same tunable wins.
    assert malloc_env(env) == env
    mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert malloc_env(mine) == mine
    # Opted out: unchanged.
    assert malloc_env({OPT_OUT: "0"}) == {OPT_OUT: "0"}
    # And taken out again for a baseline, leaving the user's.
    assert without_malloc_thp(env)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"
    assert "GLIBC_TUNABLES" not in without_malloc_thp(malloc_env({}))


PROBE = textwrap.dedent(
    """
    import os, sys
    from deepseek_jax.host import reexec_with_malloc_env
    print("start", os.getpid(), flush=True)
    reexec_with_malloc_env()
    print("run", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
    """
)


def _probe(tmp_path, env):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.Popen(
        [sys.executable, str(script), "a", "--b"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.split("\n"), proc.pid


def test_reexec_sets_the_tunable_once_in_the_same_process(tmp_path):
    env = without_malloc_thp(os.environ)
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"
    lines, pid = _probe(tmp_path, env)
    # One start line per image: the first without the tunable, the second with it; same pid.
    assert lines[0] == f"start {pid}"
    assert lines[1] == f"start {pid}"
    assert lines[2] == f"run {pid} glibc.malloc.arena_max=4:{THP_TUNABLE} ['a', '--b']"


def test_no_reexec_when_opted_out(tmp_path):
    env = without_malloc_thp(os.environ)
    env[OPT_OUT] = "0"
    lines, pid = _probe(tmp_path, env)
    assert lines[:2] == [f"start {pid}", f"run {pid} None ['a', '--b']"]


THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode: always, madvise or never (None: unknown)."""
    try:
        with open(THP_ENABLED) as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


TOUCH = textwrap.dedent(
    """
    import ctypes, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 64 << 20  # far above glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(libc.malloc(size), 1, size)  # (numpy would advise huge pages by itself)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


@pytest.mark.skipif(
    _thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off in this kernel"
)
def test_the_tunable_maps_large_allocations_with_huge_pages():
    """What the tunable is for: a 64 MiB allocation (an XLA temporary's size class) faults in
    2 MiB pages, not 16,384 pages of 4 KiB."""
    plain = without_malloc_thp(os.environ)
    faults = {}
    for name, env in (("plain", plain), ("tunable", malloc_env(plain))):
        out = subprocess.run(
            [sys.executable, "-c", TOUCH], env=env, capture_output=True, text=True, check=True
        )
        faults[name] = int(out.stdout)
    assert faults["tunable"] < 16384 // 8, faults
    if _thp_mode() == "madvise":  # (under "always" every mapping gets huge pages anyway)
        assert faults["plain"] > 16384 // 2, faults


def test_console_script_starts_through_host_entry():
    """The installed `deepseek-jax` script (pyproject's entry point, deepseek_jax.host:entry)
    re-executes under the tunable and runs the command line."""
    script = pathlib.Path(sys.executable).with_name("deepseek-jax")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (package not pip-installed)")
    env = without_malloc_thp(os.environ)
    out = subprocess.run(
        [str(script), "info", "tiny"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hidden_size: 128" in out.stdout
