"""SIGTERM and SIGINT become a request the loop honours between steps: save, then exit.

SIGTERM (a scheduler preempting the job) ends with exit code 75, SIGINT (Ctrl-C) with 130, both
after a checkpoint (see `deepseek_jax.errors`). A second Ctrl-C stops at once, without saving.
With several processes, the request is agreed on (any process's request stops all of them at
the same step, so that they save the same checkpoint together).
"""

from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class StopSignals:
    def __init__(self):
        self.received = 0  # the first signal number received, 0 for none
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for signum in NAMES:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not in the main thread: no handler, no graceful stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.received = self.received or signum

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def agreed(self) -> int:
        """The signal that stops the run at this step (0: none), the same on every process."""
        if jax.process_count() == 1:
            return self.received
        flags = multihost_utils.process_allgather(np.array(self.received, np.int32))
        return int(np.max(flags))
