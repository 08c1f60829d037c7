"""Saving and restoring an input iterator's position (its Grain `DatasetIterator` state).

The state is a small JSON-able dict (document index, epoch, packing remainder); restoring it
continues with bitwise the same batches. Two ways to store it:

- with Orbax, beside the train state, through Grain's handler (one JSON file per process):
      mngr.save(step, args=ocp.args.Composite(state=..., data=orbax_save_args(it)))
      mngr.restore(step, args=ocp.args.Composite(state=..., data=orbax_restore_args(it)))
- without Orbax: `save_state(it, path)` / `restore_state(it, path)`.
"""

from __future__ import annotations

import json
import os

import grain


def orbax_save_args(it: grain.DatasetIterator) -> grain.checkpoint.CheckpointSave:
    """Orbax `CheckpointArgs` that save `it`'s state with `grain.checkpoint.CheckpointHandler`."""
    return grain.checkpoint.CheckpointSave(item=it)


def orbax_restore_args(it: grain.DatasetIterator) -> grain.checkpoint.CheckpointRestore:
    """Orbax `CheckpointArgs` that restore a saved state into `it` (a fresh, equal pipeline)."""
    return grain.checkpoint.CheckpointRestore(item=it)


def save_state(it: grain.DatasetIterator, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(it.get_state(), f)


def restore_state(it: grain.DatasetIterator, path: str | os.PathLike) -> None:
    with open(path) as f:
        it.set_state(json.load(f))
