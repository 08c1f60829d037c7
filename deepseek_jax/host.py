"""Host-process settings that must be in place before the process starts, and the `deepseek-jax`
command's entry point, which applies them.

XLA:CPU allocates each executable's temporary buffer afresh on every call and frees it after. A
train step's temporaries are hundreds of MiB (432 MiB for the issue-12 shapes), far above glibc's
largest mmap threshold (32 MiB), so every step maps new memory and takes a page fault for each
4 KiB page of it: 105,000 faults and 0.155 s of kernel CPU time per 0.31 s step on the 2-core
CPU (bf16). The glibc tunable `glibc.malloc.hugetlb=1` makes malloc advise transparent huge pages
on the memory it maps, which cuts the faults ~200-fold (0.31 -> 0.26 s per step there). glibc
reads tunables once, when the process starts, so the command re-executes itself with the
tunable set when its environment lacks it; the pid, arguments and the rest of the environment
stay as they were. Set DEEPSEEK_JAX_MALLOC_THP=0 to opt out. Elsewhere than Linux with glibc
nothing changes. This module imports only the standard library: it runs before JAX is loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

THP_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DEEPSEEK_JAX_MALLOC_THP"


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):
        return False


def malloc_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: this process's) with glibc's transparent-huge-page malloc tunable
    added to GLIBC_TUNABLES, unless opted out, already set by the user, or not on glibc. The
    user's other tunables are kept."""
    env = dict(os.environ if env is None else env)
    if env.get(OPT_OUT, "1") == "0" or not _glibc():
        return env
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if any(t.split("=", 1)[0] == "glibc.malloc.hugetlb" for t in tunables):
        return env
    env["GLIBC_TUNABLES"] = ":".join([*tunables, THP_TUNABLE])
    return env


def without_malloc_thp(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` without the tunable `malloc_env` adds (for a baseline measured as is)."""
    env = dict(env)
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != THP_TUNABLE]
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def reexec_with_malloc_env(argv: list[str] | None = None) -> None:
    """Replace this process with the same program under `malloc_env()`, if that differs from the
    current environment. `argv` (default sys.argv) must start with a script Python can run;
    otherwise (an interactive session, `python -c`) nothing happens."""
    argv = list(sys.argv if argv is None else argv)
    env = malloc_env()
    if env == dict(os.environ) or not argv or not os.path.isfile(argv[0]):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


def entry() -> None:
    """The `deepseek-jax` command."""
    reexec_with_malloc_env()
    from deepseek_jax.cli import entry as cli_entry

    cli_entry()
