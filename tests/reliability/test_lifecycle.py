"""Issue 11 item 3, the run lifecycle: a fresh start never mixes with (or deletes) an old run,
train.steps below the checkpoint is refused, a changed schedule is announced, SIGTERM and SIGINT
save and exit 75 / 130, and the end of a run says where everything is."""

from __future__ import annotations

import os
import signal
import subprocess

from deepseek_jax import cli

from .helpers import (
    IN_PROCESS,
    REPO,
    checkpoint_steps,
    env,
    failure,
    metrics,
    run_train,
    train_cmd,
)


def cli_train(capsys, *overrides: str) -> tuple[int, str, str]:
    """`deepseek-jax train` in this process (for the runs that stop before compiling)."""
    rc = cli.main(["train", "tiny", *IN_PROCESS, *overrides])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_fresh_start_resume_and_overwrite(tmp_path, jax_cache, capsys):
    run = tmp_path / "run"
    first = run_train(
        jax_cache, "train.steps=2", "train.checkpoint_every=1", f"train.run_dir={run}"
    )
    assert first.returncode == 0, failure(first)
    # The end of the run says where everything is.
    assert f"checkpoints  {run}/checkpoints (steps [1, 2])" in first.stdout
    assert f"metrics      {run}/metrics.jsonl" in first.stdout
    assert f"plots        deepseek-jax plot {run}" in first.stdout
    old_metrics = (run / "metrics.jsonl").read_text()

    # A fresh start over it is refused, and nothing is touched.
    rc, _, err = cli_train(capsys, "train.resume=false", f"train.run_dir={run}")
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("deepseek-jax: error: train.run_dir=")
    assert "already holds a run (checkpoints up to step 2, metrics.jsonl)" in err
    assert "train.overwrite=true" in err
    assert (run / "metrics.jsonl").read_text() == old_metrics
    # train.steps below the checkpoint is an error, not a silent no-op.
    rc, _, err = cli_train(capsys, "train.steps=1", f"train.run_dir={run}")
    assert rc == 2 and "train.steps=1 is below step 2 of the checkpoint" in err
    # A checkpoint of another model is one line too.
    rc, _, err = cli_train(capsys, "model.num_heads=2", f"train.run_dir={run}")
    assert rc == 2 and err.count("\n") == 1 and "holds a different model" in err
    assert "model.num_heads: 4 there, 2 here" in err

    # Resuming with a longer schedule says so.
    longer = run_train(jax_cache, "train.steps=3", f"train.run_dir={run}")
    assert longer.returncode == 0, failure(longer)
    assert "resumed from the checkpoint at step 2" in longer.stdout
    assert "the learning-rate schedule changed since the checkpoint (train.steps 2 -> 3)" in (
        longer.stdout
    )
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]

    # overwrite=true moves the old run aside whole and starts afresh.
    fresh = run_train(
        jax_cache,
        "train.steps=1",
        "train.resume=false",
        "train.overwrite=true",
        f"train.run_dir={run}",
    )
    assert fresh.returncode == 0, failure(fresh)
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert f"moved the previous run (checkpoints up to step 3, metrics.jsonl) to {aside}" in (
        fresh.stdout
    )
    assert checkpoint_steps(aside) == [1, 2, 3]  # keep_checkpoints=3
    assert [m["step"] for m in metrics(aside)] == [1, 2, 3]
    assert checkpoint_steps(run) == [1] and [m["step"] for m in metrics(run)] == [1]


def _interrupt(run, jax_cache, signum: int, at_step: int) -> tuple[int, str]:
    proc = subprocess.Popen(
        train_cmd("train.steps=1000", "train.checkpoint_every=1000", f"train.run_dir={run}"),
        cwd=REPO,
        env=env(jax_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("step") and int(line.split()[1]) >= at_step:
                proc.send_signal(signum)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_sigterm_and_sigint_save_and_exit_with_their_codes(tmp_path, jax_cache):
    run = tmp_path / "run"
    rc, err = _interrupt(run, jax_cache, signal.SIGTERM, at_step=2)
    assert rc == 75, err[-3000:]
    (saved,) = checkpoint_steps(run)
    assert saved >= 2 and f"SIGTERM: saved a checkpoint at step {saved}" in err
    assert "exit code 75" in err
    rc, err = _interrupt(run, jax_cache, signal.SIGINT, at_step=saved + 1)
    assert rc == 130, err[-3000:]
    steps = checkpoint_steps(run)
    assert steps[0] == saved and steps[-1] > saved
    assert f"SIGINT: saved a checkpoint at step {steps[-1]}" in err
    assert [m["step"] for m in metrics(run)] == list(range(1, steps[-1] + 1))
    assert not any(name.startswith(".write-probe") for name in os.listdir(run))
