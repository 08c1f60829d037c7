#!/usr/bin/env python3
"""Soak test of preemption and crash recovery: a run interrupted again and again (SIGTERM and
SIGKILL, some of them while a checkpoint is being written) must end exactly where an
uninterrupted run ends: the same loss at every step and bitwise the same final parameters (CPU).

    python bench/soak.py --steps 2000 --checkpoint-every 50 --restarts 20
    python bench/soak.py --steps 40 --checkpoint-every 5 --restarts 4 --work-dir /tmp/soak

Each start of `deepseek-jax train` (tiny model, small shapes, Markov data) is interrupted at a
random step: by SIGTERM (the run must save and exit 75), by SIGKILL at a random moment, or by
SIGKILL while a checkpoint is being written (once its temporary folder has appeared). The next
start resumes from the newest checkpoint. Printed: steps, restarts survived per kind, kills that
hit a save in progress, steps lost (run again after a SIGKILL), whether every logged loss and the
final parameters equal the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from deepseek_jax.checkpoint.training import step_arrays
from deepseek_jax.plots import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small shapes, shared with tests/reliability: the tiny recipe with 2 layers, 4 sequences of 32
# tokens, fp32, Markov data, one line per step, quiet.
SMALL = [
    "model.num_layers=2",
    "runtime.compute_dtype=float32",
    "train.seq_len=32",
    "train.batch_size=4",
    "data.kind=synthetic",
    "train.eval_every=0",
    "train.tensorboard=false",
    "train.progress_bar=false",
    "train.peak_flops_per_device=1e11",
    "train.log_every=1",
]
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "grad_norm", "balance_loss", "expert_load")
STEP = re.compile(r"^step\s+(\d+) loss")
RESUMED = re.compile(r"resumed from the checkpoint at step (\d+)")


class Run:
    """One `deepseek-jax train` process whose logged steps are followed live."""

    def __init__(self, args: list[str], env: dict, log_path: str):
        self.last_step, self.resumed_from = None, 0
        self.step_seen = threading.Condition()
        self.log = open(log_path, "a", buffering=1)
        cmd = [sys.executable, "-m", "deepseek_jax.cli", "train", "tiny", *args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            if m := RESUMED.search(line):
                self.resumed_from = int(m.group(1))
            if m := STEP.match(line):
                with self.step_seen:
                    self.last_step = int(m.group(1))
                    self.step_seen.notify_all()
        with self.step_seen:
            self.step_seen.notify_all()

    def wait_for_step(self, step: int, timeout: float) -> bool:
        """Block until `step` is logged (True) or the process ends / time runs out (False)."""
        end = time.monotonic() + timeout
        with self.step_seen:
            while (self.last_step or 0) < step:
                if self.proc.poll() is not None or time.monotonic() > end:
                    return False
                self.step_seen.wait(0.05)
        return True

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        self.log.close()
        return rc


def saving_now(run_dir: str) -> bool:
    """Whether a checkpoint is half-written (Orbax's temporary step folder exists)."""
    folder = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(folder) and any("tmp" in name for name in os.listdir(folder))


def final_state(run_dir: str) -> dict[str, np.ndarray]:
    """Every array of the newest checkpoint's train state, by path."""
    folder = os.path.join(run_dir, "checkpoints")
    step = max(int(n) for n in os.listdir(folder) if n.isdigit())
    return step_arrays(os.path.join(folder, str(step)))


def soak(
    work_dir: str,
    steps: int,
    checkpoint_every: int,
    restarts: int,
    seed: int = 0,
    kinds: tuple[str, ...] = ("sigterm", "sigkill", "sigkill_saving"),
    env: dict | None = None,
    step_timeout: float = 600.0,
    log=print,
) -> dict:
    """Run the interrupted and the uninterrupted run; returns the figures (see the module doc)."""
    rng = random.Random(seed)
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONPATH", ROOT)
    shutil.rmtree(work_dir, ignore_errors=True)
    os.makedirs(work_dir)
    common = [*SMALL, f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every}"]
    interrupted = os.path.join(work_dir, "interrupted")
    figures = {
        "steps": steps,
        "checkpoint_every": checkpoint_every,
        "restarts": 0,
        "sigterm": 0,
        "sigkill": 0,
        "killed_while_saving": 0,
        "steps_lost": 0,
        "exit_codes": [],
    }
    log_path = os.path.join(work_dir, "interrupted.log")
    t0 = time.monotonic()
    previous_kill_step = None
    while True:
        run = Run([*common, f"train.run_dir={interrupted}"], env, log_path)
        run.wait_for_step(1, step_timeout)  # its first step: it has said where it resumed
        if previous_kill_step is not None:
            figures["steps_lost"] += max(0, previous_kill_step - run.resumed_from)
            previous_kill_step = None
        left = restarts - figures["restarts"]
        start = run.last_step or 0
        if left > 0 and start < steps - 1:
            kind = kinds[figures["restarts"] % len(kinds)] if seed < 0 else rng.choice(kinds)
            if kind == "sigkill_saving":
                # The next checkpoint step after at least one fresh step.
                target = (start // checkpoint_every + 1) * checkpoint_every
            else:
                # Spread the interruptions over the steps that are left.
                target = start + rng.randint(1, max(1, (steps - 1 - start) // (left + 1)))
            if target < steps and run.wait_for_step(target, step_timeout):
                if kind == "sigkill_saving":
                    # The save starts after the step's line (a finiteness check first): wait
                    # for its temporary folder, up to a few seconds, then kill at a random
                    # moment of the write.
                    end = time.monotonic() + 5.0
                    while not saving_now(interrupted) and time.monotonic() < end:
                        time.sleep(0.002)
                    time.sleep(rng.uniform(0.0, 0.02))
                    figures["killed_while_saving"] += saving_now(interrupted)
                signum = signal.SIGTERM if kind == "sigterm" else signal.SIGKILL
                run.proc.send_signal(signum)
                rc = run.finish(step_timeout)
                figures["exit_codes"].append(rc)
                figures["restarts"] += 1
                figures["sigterm" if signum == signal.SIGTERM else "sigkill"] += 1
                if signum == signal.SIGTERM and rc != 75:
                    raise RuntimeError(f"SIGTERM at step {run.last_step}: exit {rc}, not 75")
                if signum == signal.SIGKILL:
                    previous_kill_step = run.last_step
                log(
                    f"soak: {kind} at step {run.last_step} -> exit {rc} "
                    f"({figures['restarts']}/{restarts} restarts)"
                )
                continue
        rc = run.finish(step_timeout * 4)
        figures["exit_codes"].append(rc)
        if rc != 0:
            raise RuntimeError(f"the interrupted run ended with exit code {rc}; see {log_path}")
        break
    figures["interrupted_seconds"] = round(time.monotonic() - t0, 1)

    reference = os.path.join(work_dir, "reference")
    t0 = time.monotonic()
    run = Run([*common, f"train.run_dir={reference}"], env, os.path.join(work_dir, "ref.log"))
    if run.finish(step_timeout * 4) != 0:
        raise RuntimeError(f"the reference run failed; see {work_dir}/ref.log")
    figures["reference_seconds"] = round(time.monotonic() - t0, 1)

    a, b = read_metrics(interrupted), read_metrics(reference)  # deepseek_jax.plots
    figures["logged_steps_equal"] = [m["step"] for m in a] == [m["step"] for m in b]
    figures["losses_equal"] = figures["logged_steps_equal"] and all(
        x[k] == y[k] for x, y in zip(a, b, strict=True) for k in LOSS_KEYS
    )
    figures["final_loss"] = (a[-1]["loss"], b[-1]["loss"])
    sa, sb = final_state(interrupted), final_state(reference)
    figures["params_equal"] = sa.keys() == sb.keys() and all(
        np.array_equal(sa[k], sb[k]) for k in sa
    )
    figures["all_finite"] = all(
        np.all(np.isfinite(v)) for v in sa.values() if np.issubdtype(v.dtype, np.inexact)
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="-1: cycle the kinds in order")
    parser.add_argument("--work-dir", default="runs/soak")
    args = parser.parse_args(argv)
    figures = soak(args.work_dir, args.steps, args.checkpoint_every, args.restarts, args.seed)
    print(json.dumps(figures, indent=1))
    ok = figures["losses_equal"] and figures["params_equal"] and figures["all_finite"]
    print(
        f"soak: {figures['steps']} steps, {figures['restarts']} restarts survived "
        f"({figures['sigterm']} SIGTERM, {figures['sigkill']} SIGKILL, "
        f"{figures['killed_while_saving']} during a save), {figures['steps_lost']} steps lost; "
        f"final loss {figures['final_loss'][0]} vs {figures['final_loss'][1]} uninterrupted; "
        f"every loss equal: {figures['losses_equal']}, parameters bitwise equal: "
        f"{figures['params_equal']}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
