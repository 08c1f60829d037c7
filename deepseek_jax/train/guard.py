"""Numerical guard of the training loop: counts skipped steps, stops a diverged run, logs spikes.

The jitted step (`step.py`) already refuses to apply a step whose loss or gradient norm is not
finite and reports it as `bad_step`. This watcher reads that flag one step late (after the next
step is dispatched, so the host never waits for the device just to check it), counts bad steps,
and raises `Diverged` after `train.max_bad_steps` in a row. A finite loss above
`train.loss_spike_factor` times the median of the last `train.loss_spike_window` finite losses is
logged as a spike (the step is applied: spikes are often recovered from).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import jax
import numpy as np

from deepseek_jax.config import TrainConfig
from deepseek_jax.errors import Diverged


class Guard:
    def __init__(self, tc: TrainConfig, log: Callable[[str], None]):
        self.tc, self.log = tc, log
        self.bad_total = 0
        self.bad_run = 0  # bad steps in a row, ending at the newest settled step
        self.spikes = 0
        self._recent: collections.deque[float] = collections.deque(maxlen=tc.loss_spike_window)
        self._pending: list[tuple[int, dict]] = []

    def watch(self, step: int, metrics: dict) -> None:
        """Remember step `step`'s flags (device arrays); read when `settle` is next called."""
        keys = ("bad_step", "loss", "grad_norm")
        self._pending.append((step, {k: metrics[k] for k in keys}))

    def settle(self, newest_too: bool = True) -> None:
        """Read the pending steps' flags (all, or all but the newest) and act on them.

        Raises Diverged once train.max_bad_steps steps in a row were bad."""
        keep = [] if newest_too or not self._pending else [self._pending[-1]]
        todo = self._pending if newest_too else self._pending[:-1]
        self._pending = keep
        for step, small in todo:
            flags = jax.device_get(small)
            loss, grad_norm = float(flags["loss"]), float(flags["grad_norm"])
            if int(flags["bad_step"]):
                self.bad_total += 1
                self.bad_run += 1
                self.log(
                    f"step {step}: loss {loss} / gradient norm {grad_norm} is not finite: update "
                    f"skipped ({self.bad_run} in a row, {self.bad_total} in this run; stopping at "
                    f"train.max_bad_steps={self.tc.max_bad_steps})"
                )
                if self.bad_run >= self.tc.max_bad_steps:
                    first = step - self.bad_run + 1
                    raise Diverged(
                        f"training diverged: steps {first}..{step} ({self.bad_run} in a row, "
                        f"train.max_bad_steps={self.tc.max_bad_steps}) had a non-finite loss or "
                        "gradient norm and were skipped",
                        step,
                    )
                continue
            self.bad_run = 0
            if self.tc.loss_spike_factor and len(self._recent) >= min(5, self._recent.maxlen):
                median = float(np.median(self._recent))
                if loss > self.tc.loss_spike_factor * median:
                    self.spikes += 1
                    self.log(
                        f"step {step}: loss spike {loss:.4f} > {self.tc.loss_spike_factor} x "
                        f"median {median:.4f} of the last {len(self._recent)} steps "
                        f"(grad norm {grad_norm:.3f})"
                    )
            self._recent.append(loss)
