"""The README's run command, shortened: trains the embedded default end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from deepseek_jax.checkpoint import Checkpointer


def test_default_run_trains_checkpoints_and_logs(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepseek_jax.cli", "train"]  # the README command, no config
    cmd += ["train.steps=30", "train.eval_every=15", f"train.run_dir={run}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with open(run / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    first, last = metrics[0], metrics[-1]
    # The embedded default: tiny config, byte-level tokens of the Python standard library.
    assert abs(first["lm_loss"] - 6.24) < 0.2  # ~ln(512) at initialization
    assert last["lm_loss"] < first["lm_loss"] - 2.0
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0]
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "tokens_per_sec", "mfu"):
        assert key in last
    assert Checkpointer(str(run / "checkpoints"), 50, 3).all_steps() == [30]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tensorboard"))
    with open(run / "config.json") as f:
        assert json.load(f)["data"]["kind"] == "stdlib"
