"""Shared pieces of the reliability tests: tiny shapes, and `deepseek-jax train` as a subprocess
whose compilations are cached on disk, so that the many short runs here compile each program once.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np

from deepseek_jax.checkpoint.training import step_arrays
from deepseek_jax.plots import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_soak():
    """bench/soak.py as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("soak", REPO / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The soak's small shapes: the tiny recipe cut down to 2 layers, 4 sequences of 32 tokens, fp32,
# Markov data, quiet.
TINY = list(load_soak().SMALL)

# For `deepseek-jax train` called in the pytest process, which has 8 CPU devices (mesh.fsdp=-1
# takes them all): a batch they divide.
IN_PROCESS = [*TINY, "train.batch_size=8"]


def env(cache_dir: str | os.PathLike | None, devices: int | None = 1) -> dict:
    """Environment of a training subprocess: this checkout, a shared compilation cache (None:
    none), and `devices` CPU devices (None: leave XLA_FLAGS alone).

    Multi-process runs get no cache: with jax.distributed over gloo, a run whose processes
    found cached executables hung in its first step here (jax 0.10.2, CPU)."""
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO)
    if cache_dir is not None:
        out["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        out["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    flags = [f for f in out.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    out["XLA_FLAGS"] = " ".join(flags)
    return out


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "deepseek_jax.cli", "train", "tiny", *TINY, *overrides]


def run_train(cache_dir, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(*overrides),
        cwd=REPO,
        env=env(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metrics(run_dir) -> list[dict]:
    return read_metrics(run_dir)


def checkpoint_steps(run_dir) -> list[int]:
    folder = pathlib.Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def checkpoint_arrays(run_dir, step: int) -> dict[str, np.ndarray]:
    """Every array of the train state saved at `step`."""
    return step_arrays(str(pathlib.Path(run_dir) / "checkpoints" / str(step)))


def assert_all_finite(run_dir) -> None:
    for step in checkpoint_steps(run_dir):
        for name, value in checkpoint_arrays(run_dir, step).items():
            if np.issubdtype(value.dtype, np.inexact):
                assert np.all(np.isfinite(value)), f"checkpoint {step} {name} is not finite"


def failure(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
