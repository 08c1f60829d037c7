"""Issue 11 item 6, multi-process faults through launch/local.py (2 processes x 2 CPU devices,
jax.distributed over gloo on 127.0.0.1): SIGTERM to the launcher reaches every process, which save
one checkpoint together and exit 75; a process killed with SIGKILL is named, the others are
stopped within the grace period, and no process outlives the launcher. Plus item 2 with two
processes: failed saves stop both, with exit code 2 and one line, keeping the earlier checkpoint.
The SIGTERM run is made once; the other tests resume copies of it."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from .helpers import REPO, TINY, checkpoint_steps, env, metrics

MESH = ["mesh.data=2", "mesh.expert=2", "mesh.fsdp=1", "mesh.dcn_data=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run, grace: float, overrides: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "2"]
    cmd += ["--port", str(free_port()), "--log-dir", str(run / "logs"), "--grace", str(grace)]
    cmd += ["--status-every", "1", "--", "tiny", *TINY, *MESH, "train.steps=1000"]
    cmd += ["train.checkpoint_every=1000", f"train.run_dir={run}", *overrides]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env(None, devices=None),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_step(proc: subprocess.Popen, step: int, seen: list[str]) -> None:
    """Read the launcher's output until process 0 logs `step`."""
    for line in proc.stdout:
        seen.append(line)
        if (m := re.match(r"step\s+(\d+) loss", line)) and int(m.group(1)) >= step:
            return


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """Process index -> pid of the launcher's workers."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True, text=True
    )
    pids = {}
    for pid in map(int, out.stdout.split()):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                args = f.read().split("\0")
        except FileNotFoundError:
            continue
        # A child between fork and exec still shows the launcher's command line: not a worker yet.
        index = next((int(a.split("=")[1]) for a in args if a.startswith("--process-id=")), None)
        if index is not None:
            pids[index] = pid
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (its parent has not reaped it yet).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """A 2-process run stopped by SIGTERM to the launcher (shared by this module's tests, which
    resume copies of it): (run folder, launcher exit code, output, worker pids, saved step)."""
    run = tmp_path_factory.mktemp("launch") / "run"
    seen: list[str] = []
    proc = launch(run, grace=10)
    try:
        wait_for_step(proc, 2, seen)
        workers = worker_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = checkpoint_steps(run) if (run / "checkpoints").is_dir() else []
    return run, proc.returncode, "".join(seen) + rest, workers, steps


def resume_copy(preempted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(preempted[0], run)
    return run, preempted[4][-1]


def test_sigterm_reaches_every_process_which_save_together(preempted):
    run, rc, out, workers, steps = preempted
    assert rc == 75, out[-3000:]
    assert sorted(workers) == [0, 1]
    assert "launcher: SIGTERM: forwarded to all processes" in out
    assert not any(alive(p) for p in workers.values())
    (saved,) = steps
    assert f"SIGTERM: saved a checkpoint at step {saved}" in out
    assert "p0 running step" in out  # the live status line
    assert "[Gloo]" not in out and "[Gloo]" in (run / "logs" / "process_0.log").read_text()


def test_a_killed_process_is_named_and_the_others_stopped(preempted, tmp_path):
    run, saved = resume_copy(preempted, tmp_path)
    seen: list[str] = []
    proc = launch(run, grace=5)
    try:
        wait_for_step(proc, saved + 1, seen)
        workers = worker_pids(proc.pid)
        killed = workers[1]
        t0 = time.monotonic()
        os.kill(killed, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=120)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGKILL, out[-3000:]
    assert f"launcher: process 1 (pid {killed}) failed with exit code -9 (SIGKILL)" in out
    assert seconds < 5 + 15, seconds  # the grace period, then SIGKILL
    assert not any(alive(p) for p in workers.values())
    assert f"resumed from the checkpoint at step {saved}" in out
    assert metrics(run)[-1]["step"] > saved


def test_a_failed_save_stops_every_process_with_one_line(preempted, tmp_path):
    """Issue 11 item 2 with two processes: each worker's writes past 512 KiB fail with EFBIG
    (RLIMIT_FSIZE set on the workers, not the launcher, which writes their logs), so every save
    fails in Orbax's background threads. Both processes report each failure at the same step,
    stop together after train.max_save_failures with exit code 2 and one line, and the
    checkpoint saved before is still the newest, complete and alone."""
    run, saved = resume_copy(preempted, tmp_path)
    proc = launch(run, 30, ("train.checkpoint_every=2", "train.max_save_failures=2"))
    try:
        workers = {}
        while len(workers) < 2 and proc.poll() is None:
            workers = worker_pids(proc.pid)
            time.sleep(0.05)
        for pid in workers.values():  # long before their first save: they have yet to compile
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out[-3000:]
    assert not any(alive(p) for p in workers.values())
    first, second = (saved // 2 + 1) * 2, (saved // 2 + 2) * 2
    for i in (0, 1):
        lines = (run / "logs" / f"process_{i}.log").read_text().splitlines()
        if i == 0:  # the run's messages come from process 0
            reports = [ln for ln in lines if ln.startswith("checkpoint save of step")]
            assert [ln.split()[4] for ln in reports] == [str(first), str(second)], lines[-40:]
        # Each process ends with its one line: nothing of Orbax still running printed after it.
        assert lines[-1].startswith("deepseek-jax: error: 2 checkpoint saves in a row failed")
        assert f"The newest checkpoint is step {saved}: free space" in lines[-1]
    assert f"resumed from the checkpoint at step {saved}" in out
    assert "deepseek-jax: error: 2 checkpoint saves in a row failed" in out
    # Nothing saved before was lost, nothing half-written stays.
    assert os.listdir(run / "checkpoints") == [str(saved)]
