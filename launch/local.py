#!/usr/bin/env python3
"""Run N training processes on this machine, joined through jax.distributed on 127.0.0.1.

    python launch/local.py --processes 2 --devices-per-process 4 -- tiny mesh.data=2 mesh.expert=4

Every process runs the same `deepseek-jax train` command with its own --process-id; on a CPU-only
machine each gets `--devices-per-process` fake CPU devices and gloo collectives. Exits with the
first non-zero status. Process 0 writes metrics.jsonl; the output of process i goes to
<log-dir>/process_<i>.log.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: pick a free one)")
    parser.add_argument("--log-dir", default="runs/local_launch")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- CONFIG key=value ...")
    args = parser.parse_args(argv)
    train_args = [a for a in args.train_args if a != "--"]
    port = args.port or free_port()
    os.makedirs(args.log_dir, exist_ok=True)

    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    procs, logs = [], []
    for i in range(args.processes):
        log = open(os.path.join(args.log_dir, f"process_{i}.log"), "w")
        cmd = [sys.executable, "-m", "deepseek_jax.cli", "train", *train_args]
        cmd += [f"--coordinator=127.0.0.1:{port}", f"--num-processes={args.processes}"]
        cmd += [f"--process-id={i}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    status = 0
    try:
        for p in procs:
            rc = p.wait(timeout=args.timeout)
            status = status or rc
    except subprocess.TimeoutExpired:
        status = 124
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    if status:
        print(f"a process failed (status {status}); logs in {args.log_dir}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
