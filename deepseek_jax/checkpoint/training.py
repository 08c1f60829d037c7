"""Orbax checkpoints of a training run: train state, data-iterator state, resolved config.

Each checkpoint is one step directory holding three items:
- `state`: the TrainState pytree (params, router biases, optimizer state, step), saved
  asynchronously with array shardings, restorable onto any mesh or process count;
- `data`: each process's data-iterator position (Grain's handler, one file per process);
- `config`: the resolved Config as JSON.
Orbax writes a step into a temporary directory and renames it only once complete, so a save
killed midway never shows up as a checkpoint and never touches the previous ones.

What this adds to Orbax, so that a run never loses its last good state:
- resume takes the newest step that is complete and restores without error; every newer step
  is named with the reason it was skipped and moved aside to `rejected_checkpoints/` (never
  deleted, never mixed with the run's new checkpoints);
- a save is refused, before anything is written, into a directory that is not writable or with
  less free space than the state's size; from non-finite parameters or optimizer state it is
  refused with `NonFiniteState` (the caller decides whether the run goes on);
- a save that fails while writing (disk full, permission) is reported with the path and its
  temporary directory removed. An asynchronous save is written by Orbax's background thread, so
  its failure is known only once that thread has ended: `poll()`, called by the training loop
  once per step, reports it at the first step boundary after the write has ended (on every
  process: they agree, so that all count and stop at the same step), and at the latest the next
  `save()` or `close()` waits for it. Training goes on with its state in memory and the next save
  retries; `max_failures` failed saves in a row stop the run (CheckpointError);
- a failed save's Orbax objects are closed and their writer threads joined before training goes
  on, so that nothing of it is still running (or printing) when the process exits;
- old checkpoints are rotated away only after a newer save has completed, so the newest good
  checkpoint is never the one deleted.
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from deepseek_jax.checkpoint.compare import check_same_model
from deepseek_jax.checkpoint.errors import CheckpointError
from deepseek_jax.config import Config, ConfigError, config_from_saved, to_dict

logger = logging.getLogger(__name__)

REJECTED_DIR = "rejected_checkpoints"  # beside the checkpoints directory
_REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "config/metadata")

__all__ = [
    "Checkpointer",
    "NonFiniteState",
    "abstract_like",
    "check_directory",
    "newest_good_step",
    "read_step_config",
    "state_is_finite",
    "step_arrays",
    "step_problem",
]


class NonFiniteState(CheckpointError):
    """A save refused because the state holds NaN or Inf (nothing was written)."""


def _as_tree(state) -> dict:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def state_is_finite(state) -> bool:
    """Whether every float array of `state` (parameters, router biases, optimizer moments) is
    finite. The same answer on every process; a checkpoint is never written when it is False."""
    tree = _as_tree(state) if dataclasses.is_dataclass(state) else state
    return bool(_all_finite(tree))


def state_nbytes(state) -> int:
    """Bytes of all arrays of `state` (arrays or ShapeDtypeStructs), summed over the mesh."""
    tree = _as_tree(state) if dataclasses.is_dataclass(state) else state
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def check_directory(
    directory: str,
    need_bytes: int = 0,
    label: str | None = None,
    error: type[Exception] = CheckpointError,
) -> None:
    """Create `directory` if needed; raise `error` unless it is a writable directory with
    `need_bytes` free. `label` names it in the message (default: "checkpoint directory <path>").

    Writability is tested by creating a file, which also catches read-only filesystems for root
    (who passes every permission check)."""
    what = label or f"checkpoint directory {directory}"
    fix = "choose another train.run_dir"
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise error(f"{what} is a file, not a folder: {fix}")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise error(f"{what} cannot be created ({e.strerror}): {fix}") from None
    probe = os.path.join(directory, f".write-probe-{uuid.uuid4().hex}")
    try:
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as e:
        reason = f"is not writable ({e.strerror})"
        raise error(f"{what} {reason}: fix its permissions or {fix}") from None
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if free < need_bytes:
        raise error(
            f"no room for a checkpoint in {directory}: it needs about {_mib(need_bytes)} (the "
            f"train state's size) but {_mib(free)} is free; free space or {fix}"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def step_problem(step_dir: str) -> str | None:
    """Why `step_dir` is not a complete checkpoint (one short phrase), or None."""
    if not os.path.isdir(step_dir):
        return "not a directory"
    if not os.listdir(step_dir):
        return "empty directory"
    for item in _REQUIRED_FILES:
        path = os.path.join(step_dir, item)
        if not os.path.isfile(path):
            return f"half-written (no {item})"
        if os.path.getsize(path) == 0:
            return f"truncated ({item} is empty)"
    return None


def _step_dirs(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def newest_good_step(directory: str) -> int | None:
    """The newest step directory in `directory` that looks complete (see `step_problem`)."""
    steps = reversed(_step_dirs(directory))
    return next((s for s in steps if step_problem(os.path.join(directory, str(s))) is None), None)


def read_step_config(step_dir: str) -> Config:
    """The Config a training step was saved with."""
    path = os.path.join(step_dir, "config", "metadata")
    try:
        with open(path) as f:
            return config_from_saved(json.load(f))
    except (OSError, ValueError, ConfigError) as e:
        raise CheckpointError(f"cannot read the run config {path}: {e}") from None


def step_arrays(step_dir: str) -> dict[str, np.ndarray]:
    """Every array of the train state saved in `step_dir`, by its path in the state (on host,
    as saved; for comparing runs and checking checkpoints, not for resuming)."""
    with ocp.StandardCheckpointer() as reader:
        tree = reader.restore(os.path.join(step_dir, "state"))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all processes (the flags as given with one process). Every process
    must call this at the same point: it is a collective."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.array(flags, np.int32))
    return tuple(bool(x) for x in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0))


# Set when a run stops on failed saves: TensorStore writes of the last failed save may still be
# pending (Orbax exposes no handle on them), and at interpreter exit their callbacks meet a
# closed event loop and print tracebacks after the run's last line (`cli.entry` exits without
# that teardown). Every completed checkpoint is committed by then; only failed writes are left.
_writes_abandoned = False


def writes_abandoned() -> bool:
    """Whether this process stopped on failed saves whose last writes may still be pending."""
    return _writes_abandoned


def _join_orbax_writers(timeout_s: float = 120.0) -> None:
    """Wait for the writer threads of Orbax saves that are still running.

    A failed save ends Orbax's background thread at its first error while the writers of the
    other items (one thread each) go on. Left alone they finish later, and their reports then
    land after the run's last line, or at interpreter exit as "cannot schedule new futures after
    shutdown" once the executors they use are closed. Orbax exposes no handle on them: they are
    found by their class (orbax 0.12.8), and if that moves, nothing is waited for."""
    try:
        from orbax.checkpoint._src.futures.future import _SignalingThread
    except ImportError:
        return
    for thread in threading.enumerate():
        if isinstance(thread, _SignalingThread) and thread is not threading.current_thread():
            try:
                thread.join(timeout_s)
            except Exception:  # its own error (already part of the failure reported)
                pass


def _short(error: BaseException) -> str:
    """The gist of an Orbax/TensorStore error: its last line, bounded."""
    text = str(error).strip().splitlines()
    text = text[-1] if text else type(error).__name__
    # The OS reason (disk full, permission) ends TensorStore's messages: keep both ends.
    return text if len(text) <= 400 else f"{text[:150]} ... {text[-250:]}"


class Checkpointer:
    """The checkpoints of one run directory (see the module docstring for the guarantees).

    `log` receives one line per event the user should see (skipped steps, failed saves)."""

    def __init__(
        self,
        directory: str,
        every: int,
        keep: int,
        async_save: bool = True,
        max_failures: int = 3,
        log: Callable[[str], None] | None = None,
    ):
        self.directory = os.path.abspath(directory)
        check_directory(self.directory)
        self.every, self.keep, self.async_save = every, keep, async_save
        self.max_failures = max_failures
        self.log = log or (lambda msg: logger.warning("%s", msg))
        self.failures = 0  # failed saves in a row
        self._pending: int | None = None  # step of the save in flight
        self._closed = False
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=self.every,
            max_to_keep=None,  # rotation is ours: only after a newer save has completed
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=self.async_save,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def _is_main(self) -> bool:
        return jax.process_index() == 0

    # -- reading ---------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest step that looks complete (restore() also checks that it reads)."""
        return newest_good_step(self.directory)

    def all_steps(self) -> list[int]:
        """Every step that looks complete, oldest first."""
        return [
            s
            for s in _step_dirs(self.directory)
            if step_problem(os.path.join(self.directory, str(s))) is None
        ]

    def saved_config(self, step: int | None = None) -> Config:
        step = self.latest_step() if step is None else step
        return read_step_config(os.path.join(self.directory, str(step)))

    def restore(self, abstract_state, config: Config, data_iterator=None, step: int | None = None):
        """Restore into `abstract_state` (ShapeDtypeStructs whose shardings pick the layout).

        Without `step`, the newest step that is complete and restores without error is used;
        each newer step is logged with the reason it was skipped and moved aside. Raises
        CheckpointError if the checkpoint's model differs from `config.model` or no step is
        restorable. Returns the restored state; the data iterator, when given, is repositioned
        in place."""
        if step is not None:
            return self._restore_step(step, abstract_state, config, data_iterator)
        skipped: list[tuple[int, str]] = []
        state = None
        for s in reversed(_step_dirs(self.directory)):
            problem = step_problem(os.path.join(self.directory, str(s)))
            if problem is None:
                try:
                    state = self._restore_step(s, abstract_state, config, data_iterator)
                except CheckpointError as e:
                    if "holds a different model" in str(e):
                        raise
                    problem = _short(e)
                except Exception as e:  # TensorStore, JSON, Grain: all unreadable
                    problem = f"unreadable ({type(e).__name__}: {_short(e)})"
            if state is not None:
                break
            skipped.append((s, problem))
        for s, problem in skipped:
            self.log(f"skipped checkpoint step {s} in {self.directory}: {problem}")
        if state is None:
            raise CheckpointError(
                f"no restorable checkpoint in {self.directory} ({len(skipped)} step(s) skipped, "
                "see above); move the directory aside to start afresh"
            )
        self._set_aside([s for s, _ in skipped])
        return state

    def _restore_step(self, step: int, abstract_state, config: Config, data_iterator):
        saved = self.saved_config(step)
        check_same_model(saved.model, config.model, f"checkpoint step {step} in {self.directory}")
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(_as_tree(abstract_state))}
        if data_iterator is not None:
            if self.has_data_state(step):
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                logger.warning(
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

    def _set_aside(self, steps: list[int]) -> None:
        """Move step directories to rejected_checkpoints/ (kept for inspection, out of the way
        of the steps this run will save)."""
        if not steps:
            return
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("deepseek_jax.checkpoint.set_aside")
        if self._is_main():
            rejected = os.path.join(os.path.dirname(self.directory), REJECTED_DIR)
            os.makedirs(rejected, exist_ok=True)
            for s in steps:
                dst, n = os.path.join(rejected, str(s)), 1
                while os.path.exists(dst):
                    dst, n = os.path.join(rejected, f"{s}.{n}"), n + 1
                os.rename(os.path.join(self.directory, str(s)), dst)
                self.log(f"moved checkpoint step {s} aside to {dst}")
        self.manager.reload()

    # -- writing ---------------------------------------------------------------------------

    def check_room(self, state) -> None:
        """Before compiling: the checkpoint directory is writable with room for one checkpoint
        of `state` (arrays or ShapeDtypeStructs); CheckpointError otherwise."""
        check_directory(self.directory, state_nbytes(state))

    def save(
        self, step: int, state, config: Config, data_iterator=None, force: bool = False
    ) -> bool:
        """Start saving `step` (returns at once when async). False when the save was refused or
        failed (already logged; training can go on), or `step` is not a save step. Raises
        NonFiniteState, writing nothing, if the state holds NaN or Inf, and CheckpointError after
        `max_failures` failed saves in a row. With several processes every one calls this at the
        same step, and they agree on each outcome."""
        self.poll(wait=True)  # one save at a time: settle the previous one first
        if not force and not self.manager.should_save(step):
            return False
        # The one finiteness check of a save (a reduction over the state, the same answer on
        # every process); the training loop turns a refusal into Diverged.
        if not state_is_finite(state):
            raise NonFiniteState(
                f"not saving step {step} to {self.directory}: the parameters or optimizer state "
                "hold NaN or Inf; the newest checkpoint stays the last finite one"
            )
        why = None
        try:
            check_directory(self.directory, state_nbytes(state))
        except CheckpointError as e:
            why = str(e)
        if _any_process(why is not None)[0]:
            self._failed(step, why or "another process found no room (see its log)")
            return False
        step_dir = os.path.join(self.directory, str(step))
        if os.path.exists(step_dir):  # a leftover of an earlier run that did not restore
            self._set_aside([step])
        items: dict[str, Any] = {
            "state": ocp.args.StandardSave(_as_tree(state)),
            "config": ocp.args.JsonSave(to_dict(config)),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # any failure to write is reported the same way
            why = f"{type(e).__name__}: {_short(e)}"
        if _any_process(why is not None)[0]:
            self._failed(step, why or "the write failed on another process (see its log)")
            return False
        self._pending = step
        if not self.async_save:
            self.poll(wait=True)
        return True

    def poll(self, wait: bool = False) -> None:
        """Settle the save in flight once it has ended (or wait for it): a failure is reported
        now, a success rotates old checkpoints.

        Cheap: a flag read, plus with several processes one small all-gather while a save is in
        flight (the save is settled only once it has ended on every process, so that all
        report, count and stop at the same step). The loop calls it once per step: a failed
        asynchronous save is reported at the first step boundary after Orbax's background write
        has ended, and at the latest when the next save() or close() waits for it."""
        if self._pending is None:
            return
        if not wait and _any_process(self.manager.is_saving_in_progress())[0]:
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()  # at once: the write has ended
            problem = step_problem(os.path.join(self.directory, str(step)))
        except Exception as e:
            problem = f"{type(e).__name__}: {_short(e)}"
        if _any_process(problem is not None)[0]:
            self._failed(step, problem or "the write failed on another process (see its log)")
            return
        self.failures = 0
        self._rotate()

    def _failed(self, step: int, why: str) -> None:
        """Report a failed save, remove what it left, and count it."""
        self.failures += 1
        # Orbax keeps a failed async save's error and step list: close this manager (after its
        # writers have stopped) and start a new one from the directory.
        self._close_manager()
        if self._is_main():
            for tmp in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
                shutil.rmtree(tmp, ignore_errors=True)
            partial = os.path.join(self.directory, str(step))
            if os.path.isdir(partial) and step_problem(partial) is not None:
                shutil.rmtree(partial, ignore_errors=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("deepseek_jax.checkpoint.failed_save_removed")
        self.manager = self._open()
        newest = self.latest_step()
        newest = "none yet" if newest is None else f"step {newest}"
        self.log(
            f"checkpoint save of step {step} to {self.directory} failed: {why} "
            f"(failure {self.failures} of at most {self.max_failures} in a row; training goes on, "
            f"the next save retries; newest checkpoint: {newest})"
        )
        if self.failures >= self.max_failures:
            global _writes_abandoned
            _writes_abandoned = True
            raise CheckpointError(
                f"{self.failures} checkpoint saves in a row failed in {self.directory} (last: "
                f"{why}); stopping. The newest checkpoint is {newest}: free space or fix "
                "permissions, then run again to resume (train.max_save_failures sets the limit)"
            )

    def _close_manager(self) -> None:
        """Close the manager, also after a failed save, with nothing of Orbax left running."""
        try:
            self.manager.close()
        except Exception:
            # Orbax raises a failed save's error once per waiting thread, from the first step of
            # close(); called again, it closes the rest.
            try:
                self.manager.close()
            except Exception:
                pass
        _join_orbax_writers()
        # The failed save's futures hold its error; asyncio reports those never awaited when
        # they are collected. Collect them now, with the failure, rather than at exit.
        gc.collect()

    def _rotate(self) -> None:
        """Keep the newest `keep` complete steps; called only after a save has completed."""
        steps = self.all_steps()
        old = steps[: max(0, len(steps) - self.keep)]
        if old and self._is_main():
            for s in old:
                try:
                    shutil.rmtree(os.path.join(self.directory, str(s)))
                except OSError as e:  # a step we cannot delete is only kept
                    self.log(f"could not delete old checkpoint step {s} in {self.directory}: {e}")
        if old:
            self.manager.reload()

    def wait(self) -> None:
        self.poll(wait=True)

    def close(self) -> None:
        """Wait for the save in flight; CheckpointError if the run's last save failed (the run
        must not look complete when its final state was not written)."""
        if self._closed:
            return
        self.poll(wait=True)
        self._closed = True
        self._close_manager()
        if self.failures:
            raise CheckpointError(
                f"the last checkpoint save in {self.directory} failed (see above); the newest "
                f"checkpoint is step {self.latest_step()}"
            )

    def abandon(self) -> None:
        """On the way out after an error: let this process's save in flight end (kept if it
        completed), then close, reporting nothing and without waiting for other processes
        (which may be gone). Does nothing after close()."""
        if self._closed:
            return
        self._closed, self._pending = True, None
        self._close_manager()


def abstract_like(state_shardings, state_shapes):
    """ShapeDtypeStructs with the target shardings, to restore onto a (possibly new) mesh."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        state_shapes,
        state_shardings,
    )
