"""Checkpoints and resume: exact continuation, resharding, SIGKILL during a save (SIGTERM and
SIGINT: tests/reliability/test_lifecycle.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import sharding
from deepseek_jax.checkpoint import Checkpointer, CheckpointError, abstract_like
from deepseek_jax.checkpoint.training import NonFiniteState
from deepseek_jax.config import load_config
from deepseek_jax.errors import Diverged
from deepseek_jax.train import loop
from deepseek_jax.train.loop import train
from deepseek_jax.train.step import Trainer

SMALL = [
    "data.kind=stdlib",
    "train.batch_size=8",
    "train.seq_len=32",
    "train.peak_flops_per_device=1e11",
    "train.progress_bar=false",
    "train.tensorboard=false",
    "train.eval_every=0",
    "runtime.compute_dtype=float32",
    # These tests stop a run at step k by giving it train.steps=k and resume it with more steps.
    # Schedules of train.steps (tiny's cosine of the router-bias step γ) would then differ from
    # the uninterrupted run's from step 1; the learning rate is still in warmup. Keep γ constant
    # so that what is compared is the restored state, not two schedules.
    "train.bias_gamma_final=null",
]


def _run(run_dir, steps, *extra):
    cfg = load_config("tiny", [*SMALL, f"train.run_dir={run_dir}", f"train.steps={steps}", *extra])
    return train(cfg, log=lambda _: None)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(m["step"], m["loss"], m["grad_norm"]) for m in map(json.loads, f)]


MESH_A = ["mesh.data=2", "mesh.expert=4", "mesh.fsdp=1", "train.checkpoint_every=4"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """On (data=2, expert=4), ep rules: 8 steps straight, and a run stopped at its step-4
    checkpoint (the tests below resume copies of it)."""
    root = tmp_path_factory.mktemp("resume")
    _run(root / "straight", 8, *MESH_A)
    _run(root / "split", 4, *MESH_A)
    assert Checkpointer(str(root / "split" / "checkpoints"), 4, 3).latest_step() == 4
    return root


def test_exact_resume_is_bitwise(stopped_run, tmp_path):
    """8 steps in one run == 4 steps, restart, 4 more: identical losses at every step (the
    restored state, optimizer moments and data position all matter from the first step on)."""
    split = tmp_path / "split"
    shutil.copytree(stopped_run / "split", split)
    resumed = _run(split, 8, *MESH_A)
    assert [m["step"] for m in resumed] == list(range(5, 9))
    straight = _losses(stopped_run / "straight")
    assert len(straight) == len(_losses(split)) == 8
    assert straight == _losses(split)  # bitwise: the same floats, not just close


def test_restore_onto_a_different_mesh(stopped_run, tmp_path):
    """Saved on (data=2, expert=4) with the ep rules; resumed on (fsdp=8) with the fsdp rules."""
    b = tmp_path / "b"
    shutil.copytree(stopped_run / "split", b)
    mesh_b = ["mesh.data=1", "mesh.fsdp=8", "mesh.rules=fsdp", "train.checkpoint_every=4"]
    resumed = _run(b, 5, *mesh_b)
    assert resumed[0]["step"] == 5
    step, loss, grad_norm = _losses(stopped_run / "straight")[4]
    assert step == 5
    # Different meshes sum in different orders: equal within fp32 rounding, not bitwise.
    assert resumed[0]["loss"] == pytest.approx(loss, abs=1e-5)
    assert resumed[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


def test_restore_refuses_another_model(tmp_path):
    cfg = load_config("tiny", [*SMALL, "mesh.fsdp=8"])
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer.create(cfg, sharding.Sharding(mesh, sharding.rules_for(cfg.mesh.rules)))
    ckpt = Checkpointer(str(tmp_path), every=1, keep=1)
    ckpt.save(0, trainer.init(), cfg, force=True)
    ckpt.wait()
    other = load_config("tiny", [*SMALL, "mesh.fsdp=8", "model.moe.n_routed_experts=8"])
    other_trainer = Trainer.create(other, trainer.mesh_sharding)
    abstract = abstract_like(other_trainer.state_shardings, jax.eval_shape(other_trainer.init))
    with pytest.raises(CheckpointError, match="n_routed_experts"):
        ckpt.restore(abstract, other)
    # The refused restore left the checkpoint as it was.
    assert ckpt.all_steps() == [0]
    restored = ckpt.restore(abstract_like(trainer.state_shardings, abstract_shapes(trainer)), cfg)
    assert int(restored.step) == 0


@dataclasses.dataclass
class _State:
    step: jax.Array
    params: dict


def test_a_non_finite_state_is_never_saved_and_ends_the_run(tmp_path):
    """The Checkpointer's finiteness check (the only one) refuses the save before anything is
    written; the training loop turns the refusal into Diverged (exit code 3)."""
    cfg = load_config("tiny", SMALL)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), every=1, keep=5)
    assert ckpt.save(1, _State(jnp.int32(1), {"w_D": jnp.ones(4)}), cfg, force=True)
    bad = _State(jnp.int32(2), {"w_D": jnp.array([1.0, jnp.inf, 0.0, 1.0])})
    with pytest.raises(NonFiniteState, match="not saving step 2 to .* hold NaN or Inf"):
        ckpt.save(2, bad, cfg, force=True)
    with pytest.raises(Diverged, match="the state at step 3 holds non-finite values"):
        loop._save(ckpt, 3, dataclasses.replace(bad, step=jnp.int32(3)), cfg, None)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def abstract_shapes(trainer):
    return jax.eval_shape(trainer.init)


# --- Processes killed or stopped --------------------------------------------------------------


def _spawn(run_dir, steps, *extra):
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "deepseek_jax.cli", "train", "tiny", *SMALL]
    cmd += [f"train.run_dir={run_dir}", f"train.steps={steps}", "mesh.fsdp=8", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout=240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _logged_steps(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


@pytest.mark.slow
def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"
    proc = _spawn(run, 1000, "train.checkpoint_every=1", "train.keep_checkpoints=1000")

    def saving():
        # Orbax writes a step into a temporary directory and renames it when complete.
        if not ckpt_dir.exists():
            return False
        names = os.listdir(ckpt_dir)
        in_progress = any(not n.isdigit() and "tmp" in n for n in names)
        return in_progress and any(n.isdigit() for n in names)

    try:
        assert _wait_for(saving), "never saw a save in progress"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    partial = [n for n in os.listdir(ckpt_dir) if not n.isdigit()]
    complete = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    assert partial, "the kill did not land during a save"
    assert complete

    ckpt = Checkpointer(str(ckpt_dir), 1, 1000)
    last = ckpt.latest_step()
    assert last == max(complete)
    # Every complete checkpoint is intact and restorable.
    cfg = load_config("tiny", [*SMALL, "mesh.fsdp=8"])
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer.create(cfg, sharding.Sharding(mesh, sharding.rules_for(cfg.mesh.rules)))
    abstract = abstract_like(trainer.state_shardings, jax.eval_shape(trainer.init))
    state = ckpt.restore(abstract, cfg)
    assert int(state.step) == last
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    ckpt.close()

    # A new run in the same directory resumes from that step and goes on.
    resumed = _run(run, last + 2, "mesh.fsdp=8", "train.checkpoint_every=1")
    assert [m["step"] for m in resumed] == [last + 1, last + 2]
    assert not [n for n in os.listdir(ckpt_dir) if not n.isdigit()], "partial save left behind"
