#!/usr/bin/env python3
"""Run N training processes on this machine, joined through jax.distributed on 127.0.0.1.

    python launch/local.py --processes 2 --devices-per-process 4 -- tiny mesh.data=2 mesh.expert=4

Every process runs the same `deepseek-jax train` command with its own --process-id; on a CPU-only
machine each gets `--devices-per-process` fake CPU devices and gloo collectives. The output of
process i goes, complete, to <log-dir>/process_<i>.log; the terminal shows process 0's lines
(without gloo/XLA/libtpu chatter) and every other process's errors, plus a status line per
process every --status-every seconds.

Faults: SIGTERM and SIGINT are forwarded to every process (which save a checkpoint and exit 75 /
130), and the launcher exits with their code. When a process exits with an error, the launcher
names it, gives the others --grace seconds to stop on their own, then terminates them; its exit
code is the failed process's. No process outlives the launcher, even one killed with SIGKILL
(each process gets SIGKILL when the launcher dies, through PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from deepseek_jax.host import malloc_env

# Lines that processes print on every start or collective setup and that bury the training log.
NOISE = re.compile(
    r"\[Gloo\]|gloo|^[IWE]\d{4} \d\d:\d\d|^WARNING: Logging before InitGoogle|TPU_|libtpu|"
    r"^=== Source Location Trace|^learning/|^external/|^Failed to find host bounds|"
    r"absl::InitializeLog|^\s+@\s+0x|^\s*$"
)
STEP = re.compile(r"^step\s+(\d+) loss (\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the launcher dies, however it dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    def __init__(self, index: int, cmd: list[str], env: dict, log_path: str):
        self.index, self.log_path = index, log_path
        self.step, self.loss = None, None
        self.log = open(log_path, "w", buffering=1)
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            # A terminal's Ctrl-C reaches the launcher only, which forwards it once.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            match = STEP.match(line)
            if match:
                self.step, self.loss = int(match.group(1)), match.group(2)
            if NOISE.search(line):
                continue
            if self.index == 0 or re.search(r"error|Error|Traceback|failed|diverged", line):
                prefix = "" if self.index == 0 else f"[process {self.index}] "
                print(prefix + line, end="", flush=True)

    def status(self) -> str:
        rc = self.proc.poll()
        state = "running" if rc is None else ("done" if rc == 0 else f"exit {describe(rc)}")
        where = f" step {self.step} loss {self.loss}" if self.step is not None else ""
        return f"p{self.index} {state}{where}"

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.reader.join(timeout=30)
        self.log.close()


def describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"{rc} ({signal.Signals(-rc).name})"
        except ValueError:
            return str(rc)
    return str(rc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: pick a free one)")
    parser.add_argument("--log-dir", default="runs/local_launch")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--grace",
        type=float,
        default=20.0,
        help="seconds the others get to stop after one process fails, or after a forwarded signal "
        "before they are killed (x6 for a signal: they are saving)",
    )
    parser.add_argument("--status-every", type=float, default=30.0, help="0: no status lines")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- CONFIG key=value ...")
    args = parser.parse_args(argv)
    train_args = [a for a in args.train_args if a != "--"]
    port = args.port or free_port()
    os.makedirs(args.log_dir, exist_ok=True)

    env = malloc_env()  # as the `deepseek-jax` command runs (deepseek_jax/host.py)
    flag = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["PYTHONUNBUFFERED"] = "1"
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    workers = []
    for i in range(args.processes):
        cmd = [sys.executable, "-m", "deepseek_jax.cli", "train", *train_args]
        cmd += [f"--coordinator=127.0.0.1:{port}", f"--num-processes={args.processes}"]
        cmd += [f"--process-id={i}"]
        workers.append(Worker(i, cmd, env, os.path.join(args.log_dir, f"process_{i}.log")))

    status, failed, deadline = 0, None, time.monotonic() + args.timeout
    forwarded, stop_by = None, None
    last_status = time.monotonic()
    try:
        while any(w.proc.poll() is None for w in workers):
            now = time.monotonic()
            if received and forwarded is None:
                forwarded = received[0]
                name = signal.Signals(forwarded).name
                print(f"launcher: {name}: forwarded to all processes (they save, then exit)")
                for w in workers:
                    w.signal(forwarded)
                stop_by = now + 6 * args.grace
            if failed is None:
                for w in workers:
                    rc = w.proc.poll()
                    if rc not in (None, 0) and forwarded is None:
                        failed = w
                        print(
                            f"launcher: process {w.index} (pid {w.proc.pid}) failed with exit "
                            f"code {describe(rc)}; see {w.log_path}. Stopping the others.",
                            file=sys.stderr,
                        )
                        stop_by = now + args.grace
                        break
            if stop_by is not None and now > stop_by:
                for w in workers:
                    w.signal(signal.SIGKILL)
            if now > deadline:
                print(f"launcher: --timeout {args.timeout:.0f} s reached", file=sys.stderr)
                status = 124
                break
            if args.status_every and now - last_status >= args.status_every:
                last_status = now
                print("launcher: " + " | ".join(w.status() for w in workers), flush=True)
            time.sleep(0.2)
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.signal(signal.SIGTERM)
        end = time.monotonic() + 10
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.signal(signal.SIGKILL)
                w.proc.wait()
            w.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if status:
        return status
    codes = [w.proc.returncode for w in workers]
    if failed is not None:
        rc = failed.proc.returncode
        return rc if rc > 0 else 128 - rc  # killed by signal N: 128 + N, as a shell reports it
    status = next((c for c in codes if c != 0), 0)
    if status:
        bad = [f"p{w.index} {describe(w.proc.returncode)}" for w in workers if w.proc.returncode]
        print(f"launcher: exit codes {', '.join(bad)}; logs in {args.log_dir}", file=sys.stderr)
        status = status if status > 0 else 128 - status
    return status


if __name__ == "__main__":
    sys.exit(main())
