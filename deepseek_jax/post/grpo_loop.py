"""`deepseek-jax grpo CONFIG`: the R1-Zero recipe end to end.

1. Starting weights: `train.init_from` if set; else, with `grpo.pretrain_steps` > 0, a brief
   pretraining run (the ordinary `train` loop) on the task's worked solutions, in
   <run_dir>/pretrain (resumed if it is already there); else random weights.
2. Held-out accuracy before GRPO (greedy, and sampled at the rollout temperature).
3. GRPO steps (`GRPOTrainer.step`), metrics to <run_dir>/metrics.jsonl and TensorBoard, held-out
   accuracy every `grpo.eval_every` steps.
4. Held-out accuracy after, a checkpoint in <run_dir>/checkpoints (loadable by `generate`,
   `distill` and `train.init_from`), and <run_dir>/summary.json with the before/after figures.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from deepseek_jax import sharding
from deepseek_jax.checkpoint import Checkpointer
from deepseek_jax.config import Config, replace, to_dict
from deepseek_jax.post.config import PostConfig
from deepseek_jax.post.grpo import GRPOTrainer, copy_params
from deepseek_jax.post.tasks import AdditionTask
from deepseek_jax.train.step import TrainState


def pretrain(post: PostConfig, log: Callable[[str], None]) -> str:
    """Train `post.base`'s model briefly on worked solutions; returns the run folder."""
    from deepseek_jax.train.loop import train

    g, base = post.grpo, post.base
    run_dir = os.path.join(base.train.run_dir, "pretrain")
    os.makedirs(run_dir, exist_ok=True)
    data_path = os.path.join(run_dir, "task.jsonl")
    task = AdditionTask(g.task_digits, g.task_held_out_fraction)
    with open(data_path, "w") as f:
        for text in task.pretraining_text(g.pretrain_documents, g.seed):
            f.write(json.dumps({"text": text}) + "\n")
    changes = {
        "data.kind": "jsonl",
        "data.path": data_path,
        "data.eval_fraction": 0.0,
        "train.run_dir": run_dir,
        "train.steps": g.pretrain_steps,
        "train.eval_every": 0,
        "train.progress_bar": False,
    }
    changes.update({f"train.{k}": v for k, v in post.pretrain.items()})
    cfg: Config = replace(base, **changes)
    log(f"pretraining {cfg.train.steps} steps on {g.pretrain_documents} worked solutions")
    train(cfg, log=lambda msg: None)
    return run_dir


def run_grpo(post: PostConfig, log: Callable[[str], None] = print) -> dict:
    """Run the recipe (see the module docstring); returns the summary it writes."""
    from deepseek_jax.train.loop import state_from_weights

    g, base = post.grpo, post.base
    run_dir = base.train.run_dir
    os.makedirs(run_dir, exist_ok=True)
    mesh = sharding.make_mesh(base.mesh)
    trainer = GRPOTrainer(post, sharding.Sharding(mesh, sharding.rules_for(base.mesh.rules)))
    started = time.perf_counter()
    init_from = base.train.init_from
    if not init_from and g.pretrain_steps:
        init_from = pretrain(post, log)
    if init_from:
        state = state_from_weights(trainer.base, init_from)
        log(f"starting GRPO from {init_from}")
    else:
        state = trainer.base.init()
    pretrain_seconds = time.perf_counter() - started
    ref = copy_params(state.params) if g.beta > 0 else None
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**to_dict(trainer.cfg), "grpo": to_dict(g), "pretrain": dict(post.pretrain)}, f)

    def evaluate(step: int) -> dict:
        greedy = trainer.evaluate(state, g.eval_problems)
        sampled = trainer.evaluate(state, g.eval_problems, temperature=g.temperature, seed=step)
        return {
            "eval_accuracy": greedy["accuracy"],
            "eval_format": greedy["format"],
            "eval_accuracy_sampled": sampled["accuracy"],
        }

    before = evaluate(0)
    log(f"held-out before GRPO: {before}")
    writer = None
    if base.train.tensorboard:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    rng = np.random.default_rng(g.seed)
    key = jax.random.key(g.seed)
    history = []
    grpo_start = time.perf_counter()
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as out:
        for step in range(1, g.steps + 1):
            t0 = time.perf_counter()
            state, m = trainer.step(state, ref, rng, jax.random.fold_in(key, step))
            m["step"], m["seconds"] = step, time.perf_counter() - t0
            if g.reference_refresh_every and step % g.reference_refresh_every == 0 and ref:
                ref = copy_params(state.params)
            if step == g.steps or (g.eval_every and step % g.eval_every == 0):
                m.update(evaluate(step))
            history.append(m)
            out.write(json.dumps(m) + "\n")
            out.flush()
            if writer is not None:
                _tensorboard(writer, m)
            log(_line(m))
    grpo_seconds = time.perf_counter() - grpo_start
    after = {k: history[-1][k] for k in before}
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), every=1, keep=1, async_save=False)
    ckpt.save(g.steps, state, trainer.cfg, force=True)
    ckpt.close()
    if writer is not None:
        writer.close()
    summary = {
        "before": before,
        "after": after,
        "pretrain_seconds": pretrain_seconds,
        "grpo_seconds": grpo_seconds,
        "steps": g.steps,
        "reward_first": history[0]["reward_mean"],
        "reward_last": history[-1]["reward_mean"],
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"held-out after GRPO: {after}; {grpo_seconds:.0f}s of GRPO")
    return summary


def _line(m: dict) -> str:
    text = (
        f"step {m['step']:>4} reward {m['reward_mean']:.3f}±{m['reward_std']:.3f} "
        f"acc {m.get('accuracy', float('nan')):.3f} len {m['completion_len_mean']:.1f} "
        f"zero-std {m['zero_std_frac']:.2f} loss {m['loss']:.4f} "
        f"ent {m['entropy']:.3f} rollout {m['rollout_seconds']:.1f}s "
        f"update {m['update_seconds']:.1f}s"
    )
    if "logp_gap_max" in m:
        text += f" gap {m['logp_gap_max']:.1e}"
    if "mtp_acceptance" in m:
        text += f" mtp-acc {m['mtp_acceptance']:.2f}"
    if "eval_accuracy" in m:
        acc, sampled = m["eval_accuracy"], m["eval_accuracy_sampled"]
        text += f" | held-out acc {acc:.3f} (sampled {sampled:.3f})"
    return text


def _tensorboard(writer, m: dict) -> None:
    for k, v in m.items():
        if isinstance(v, (int, float)) and k != "step":
            writer.add_scalar(k if "/" in k else f"grpo/{k}", v, m["step"])
    for layer, value in enumerate(m.get("load_imbalance", [])):
        writer.add_scalar(f"moe/load_imbalance_layer{layer}", value, m["step"])


__all__ = ["pretrain", "run_grpo", "TrainState"]
