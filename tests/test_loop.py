"""The README's run command, shortened: trains the embedded default end to end; every metric
field on every step, the logged learning rate is the schedule's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np

from deepseek_jax.checkpoint import Checkpointer
from deepseek_jax.config import load_config
from deepseek_jax.train.flops import train_flops_per_token
from deepseek_jax.train.optim import learning_rate


def test_default_run_trains_checkpoints_and_logs(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepseek_jax.cli", "train"]  # the README command, no config
    cmd += ["train.steps=30", "train.eval_every=15", f"train.run_dir={run}"]
    cmd += ["train.peak_flops_per_device=1e11"]  # a known peak, for the MFU check below
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with open(run / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    first = metrics[0]
    # The embedded default: tiny config, the Python standard library in the shipped BPE's tokens.
    assert abs(first["lm_loss"] - 6.24) < 0.2  # ~ln(512) at initialization
    late = [m["lm_loss"] for m in metrics[-5:]]
    print("lm loss at step 1 and over the last 5 steps:", first["lm_loss"], late)
    assert np.mean(late) < first["lm_loss"] - 1.3
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0]
    keys = {"step", "loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "tokens_per_sec"}
    keys |= {"learning_rate", "load_imbalance", "mfu"}
    cfg = load_config("tiny", ["train.steps=30"])
    tc = cfg.train
    devices = int(re.search(r"on (\d+) device\(s\)", result.stdout).group(1))
    flops_per_token = train_flops_per_token(cfg.model, tc.seq_len)
    for step, m in enumerate(metrics):
        assert keys <= m.keys(), keys - m.keys()
        assert m["tokens_per_sec"] > 0
        want_mfu = m["tokens_per_sec"] * flops_per_token / (1e11 * devices)
        np.testing.assert_allclose(m["mfu"], want_mfu, rtol=1e-9)
        assert len(m["load_imbalance"]) == 4 and all(x >= 1 for x in m["load_imbalance"])
        assert len(m["mtp_loss"]) == 1
        np.testing.assert_allclose(m["learning_rate"], learning_rate(tc, step), rtol=1e-6)
    assert Checkpointer(str(run / "checkpoints"), 50, 3).all_steps() == [30]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tensorboard"))
    with open(run / "config.json") as f:
        data = json.load(f)["data"]
    assert (data["kind"], data["tokenizer"]) == ("stdlib", "stdlib-bpe512.json")
