"""Issue 11 item 6, multi-process faults through launch/local.py (2 processes x 2 CPU devices,
jax.distributed over gloo on 127.0.0.1): SIGTERM to the launcher reaches every process, which save
one checkpoint together and exit 75; a process killed with SIGKILL is named, the others are
stopped within the grace period, and no process outlives the launcher."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

from .helpers import REPO, TINY, checkpoint_steps, env, metrics

MESH = ["mesh.data=2", "mesh.expert=2", "mesh.fsdp=1", "mesh.dcn_data=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run, grace: float) -> subprocess.Popen:
    cmd = [sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "2"]
    cmd += ["--port", str(free_port()), "--log-dir", str(run / "logs"), "--grace", str(grace)]
    cmd += ["--status-every", "1", "--", "tiny", *TINY, *MESH, "train.steps=1000"]
    cmd += ["train.checkpoint_every=1000", f"train.run_dir={run}"]
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
        with open(f"/proc/{pid}/cmdline") as f:
            args = f.read().split("\0")
        index = next(int(a.split("=")[1]) for a in args if a.startswith("--process-id="))
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


def test_sigterm_reaches_every_process_then_a_killed_one_is_named(tmp_path):
    run = tmp_path / "run"
    seen: list[str] = []
    proc = launch(run, grace=10)
    try:
        wait_for_step(proc, 2, seen)
        workers = worker_pids(proc.pid)
        assert sorted(workers) == [0, 1]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 75, out[-3000:]
    assert "launcher: SIGTERM: forwarded to all processes" in out
    assert not any(alive(p) for p in workers.values())
    (saved,) = checkpoint_steps(run)
    assert f"SIGTERM: saved a checkpoint at step {saved}" in out
    assert "p0 running step" in out  # the live status line
    assert "[Gloo]" not in out and "[Gloo]" in (run / "logs" / "process_0.log").read_text()

    # Resume, then SIGKILL process 1: the launcher names it and stops process 0 in bounded time.
    seen = []
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
    assert "resumed from the checkpoint at step" in out
    assert metrics(run)[-1]["step"] > saved
