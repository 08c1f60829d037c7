"""Issue 11 item 1, the numerical guard: a non-finite step applies nothing and is counted; a run
of train.max_bad_steps of them stops the run with exit code 3, leaving the last good checkpoint
the newest; no checkpoint ever holds a non-finite value."""

from __future__ import annotations

import jax
import numpy as np

from deepseek_jax.config import load_config
from deepseek_jax.train.step import Trainer
from deepseek_jax.train.synthetic import MarkovTokens

from .helpers import TINY, assert_all_finite, checkpoint_steps, failure, metrics, run_train

# A learning rate that turns the parameters into garbage in one step: step 2's loss is NaN.
EXPLODE = ["train.learning_rate=1e9", "train.min_learning_rate=0", "train.warmup_steps=0"]


def test_a_non_finite_step_leaves_the_state_as_it_was():
    cfg = load_config("tiny", [*TINY, *EXPLODE])
    trainer = Trainer.create(cfg, None)
    step_fn = trainer.jitted_step()
    batches = [MarkovTokens(512, 32, seed=0).rows(i, 0, 4) for i in range(2)]
    state, m1 = step_fn(trainer.init(), batches[0])
    assert int(m1["bad_step"]) == 0 and np.isfinite(float(m1["loss"]))
    before = jax.device_get(state)  # the step donates its input: keep a host copy
    after, m2 = jax.device_get(step_fn(state, batches[1]))
    assert int(m2["bad_step"]) == 1 and not np.isfinite(float(m2["loss"]))
    assert int(after.step) == int(before.step) + 1  # the batch was consumed
    for name in ("params", "router_bias", "opt_state"):
        same = jax.tree.map(
            lambda a, b: np.array_equal(a, b, equal_nan=True),
            getattr(after, name),
            getattr(before, name),
        )
        assert all(jax.tree.leaves(same)), f"{name} changed on a skipped step"


def test_diverging_run_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, jax_cache):
    run = tmp_path / "run"
    result = run_train(
        jax_cache,
        *EXPLODE,
        "train.steps=20",
        "train.checkpoint_every=1",
        "train.max_bad_steps=3",
        f"train.run_dir={run}",
    )
    assert result.returncode == 3, failure(result)
    assert "training diverged: steps 2..4 (3 in a row, train.max_bad_steps=3)" in result.stderr
    assert f"the newest checkpoint is step 1 in {run}/checkpoints" in result.stderr
    assert "step 2: loss nan" in result.stdout and "update skipped (1 in a row" in result.stdout
    assert checkpoint_steps(run) == [1]
    assert_all_finite(run)
    rows = metrics(run)
    assert [(r["step"], r["bad_step"], r["bad_steps_total"]) for r in rows] == [
        (1, 0, 0),
        (2, 1, 1),
        (3, 1, 2),
    ]
