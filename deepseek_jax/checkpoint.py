"""Orbax checkpoints of a training run: train state, data-iterator state, resolved config.

Each checkpoint is one step directory holding three items:
- `state`: the TrainState pytree (params, router biases, optimizer state, step), saved
  asynchronously with array shardings, restorable onto any mesh or process count;
- `data`: each process's data-iterator position (Grain's handler, one file per process);
- `config`: the resolved Config as JSON.
Orbax writes a step into a temporary directory and renames it only once complete, so a save
killed midway never shows up as a checkpoint and never touches the previous ones.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from deepseek_jax.config import Config, config_from_saved, to_dict

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot be restored into the requested run (different model)."""


def _as_tree(state) -> dict:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


class Checkpointer:
    def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, step: int, state, config: Config, data_iterator=None, force: bool = False
    ) -> bool:
        """Start saving (returns at once when async); False when `step` is not a save step."""
        items: dict[str, Any] = {
            "state": ocp.args.StandardSave(_as_tree(state)),
            "config": ocp.args.JsonSave(to_dict(config)),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def saved_config(self, step: int | None = None) -> Config:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return config_from_saved(restored["config"])

    def restore(self, abstract_state, config: Config, data_iterator=None, step: int | None = None):
        """Restore into `abstract_state` (ShapeDtypeStructs whose shardings pick the layout).

        Raises CheckpointMismatch if the checkpoint's model config differs from `config.model`.
        Returns the restored state; the data iterator, when given, is repositioned in place.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        saved = self.saved_config(step)
        if saved.model != config.model:
            diff = {
                k: (v, getattr(config.model, k))
                for k, v in dataclasses.asdict(saved.model).items()
                if dataclasses.asdict(config.model)[k] != v
            }
            raise CheckpointMismatch(
                f"checkpoint step {step} in {self.directory} has a different model config "
                f"(saved, requested): {diff}"
            )
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(_as_tree(abstract_state))}
        if data_iterator is not None:
            if self.has_data_state(step):
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                log.warning(
                    "checkpoint step %d has no data position for process %d of %d (saved with "
                    "another process count): the data stream restarts from its beginning",
                    step,
                    jax.process_index(),
                    jax.process_count(),
                )
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return type(abstract_state)(**restored["state"])

    def has_data_state(self, step: int) -> bool:
        """Whether `step` holds this process's data position (same process count as saved)."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return os.path.exists(os.path.join(self.directory, str(step), "data", name))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state_shardings, state_shapes):
    """ShapeDtypeStructs with the target shardings, to restore onto a (possibly new) mesh."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        state_shapes,
        state_shardings,
    )
