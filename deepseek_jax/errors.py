"""Errors a user can fix, and how a training run ends.

Every mistake in a config, a run folder or the data is raised before compilation as one of the
`UserError`s (with `ConfigError` from `config.py` and the checkpoint errors), and the CLI prints
it as one line, `deepseek-jax: error: <message>`, exit code 2 (`--debug` shows the traceback).

A run that stops early raises a `RunStopped` after saving what it could; its `exit_code` tells a
scheduler what happened:

    0    finished (train.steps reached)
    1    a bug: unexpected exception, traceback printed
    2    a config, run-folder, data or checkpoint error, found before training; or
         train.max_save_failures checkpoint saves in a row failed (CheckpointError)
    3    diverged: train.max_bad_steps steps in a row had a non-finite loss or gradient norm;
         nothing was saved from them, the newest checkpoint is the last good one
    75   SIGTERM (preemption): a checkpoint was saved; run the same command to resume
         (EX_TEMPFAIL, "try again")
    130  SIGINT (Ctrl-C): a checkpoint was saved; run the same command to resume
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake the user can fix, reported as one line naming the key or path and the fix."""


class DataError(UserError, ValueError):
    """A data source that is missing, empty or holds records that cannot be read."""


class RunDirError(UserError):
    """A run folder that cannot be used as asked (not writable, a file, holds another run)."""


class RunStopped(Exception):
    """A run that stopped before train.steps; whatever could be saved has been."""

    exit_code = 1

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Diverged(RunStopped):
    exit_code = EXIT_DIVERGED


class Preempted(RunStopped):
    exit_code = EXIT_PREEMPTED


class Interrupted(RunStopped):
    exit_code = EXIT_INTERRUPTED
