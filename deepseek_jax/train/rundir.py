"""The run folder: checked before anything compiles, and never mixed between two runs.

    <run_dir>/checkpoints/<step>/   Orbax checkpoints (see checkpoint/training.py)
    <run_dir>/metrics.jsonl         one JSON line per logged step
    <run_dir>/tensorboard/          TensorBoard events
    <run_dir>/config.json           the resolved config of the latest start

`train.resume=true` (default) continues the run found there. `train.resume=false` on a folder
that holds a run (checkpoints or metrics) is refused unless `train.overwrite=true`, which moves
the old run aside to `<run_dir>.old-<UTC time>` (never deleted, never mixed with the new one).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from deepseek_jax.checkpoint.training import check_directory
from deepseek_jax.config import TrainConfig
from deepseek_jax.errors import RunDirError


def checkpoint_steps(run_dir: str) -> list[int]:
    """Step folders under <run_dir>/checkpoints (complete or not), sorted."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _has_metrics(run_dir: str) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    return os.path.isfile(path) and os.path.getsize(path) > 0


def check_writable(run_dir: str) -> None:
    """Raise RunDirError unless `run_dir` is (or can be made) a writable folder (the checkpoint
    package's check, which the checkpoint directory gets too, with its room)."""
    check_directory(run_dir, label=f"train.run_dir={run_dir}", error=RunDirError)


def prepare(tc: TrainConfig, log) -> None:
    """Check the run folder and, for a fresh start over an old run, refuse or move it aside.

    Every process inspects the folder before process 0 changes it (barriers between)."""
    run_dir = tc.run_dir
    check_writable(run_dir)
    steps, metrics = checkpoint_steps(run_dir), _has_metrics(run_dir)
    old_run = bool(steps) or metrics
    if tc.resume or not old_run:
        return
    held = []
    if steps:
        held.append(f"checkpoints up to step {steps[-1]}")
    if metrics:
        held.append("metrics.jsonl")
    if not tc.overwrite:
        raise RunDirError(
            f"train.run_dir={run_dir} already holds a run ({', '.join(held)}) and "
            "train.resume=false: resume it (train.resume=true), pick a new train.run_dir, or "
            "set train.overwrite=true to move the old run aside and start afresh"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = f"{os.path.normpath(run_dir)}.old-{stamp}"
    if jax.process_count() > 1:
        # Process 0's clock names the folder, so that every process logs the same one.
        ours = np.frombuffer(stamp.encode(), np.uint8)
        stamp = bytes(multihost_utils.broadcast_one_to_all(ours)).decode()
        aside = f"{os.path.normpath(run_dir)}.old-{stamp}"
        multihost_utils.sync_global_devices("run_dir inspected")
    if jax.process_index() == 0:
        os.rename(run_dir, aside)
        os.makedirs(run_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("run_dir moved aside")
    log(f"train.overwrite=true: moved the previous run ({', '.join(held)}) to {aside}")
