"""`deepseek-jax grpo CONFIG`: the R1-Zero recipe end to end.

1. Starting weights: `train.init_from` if set; else, with `grpo.pretrain_steps` > 0, a brief
   pretraining run (the ordinary `train` loop) on the task's worked solutions, in
   <run_dir>/pretrain (resumed if it is already there); else random weights.
2. Held-out accuracy before GRPO (greedy, and sampled at the rollout temperature).
3. GRPO steps (`GRPOTrainer.step`), metrics to <run_dir>/metrics.jsonl and TensorBoard, held-out
   accuracy every `grpo.eval_every` steps.
4. Held-out accuracy after, a checkpoint in <run_dir>/checkpoints (loadable by `generate`,
   `distill` and `train.init_from`; also saved every `grpo.checkpoint_every` steps, and a killed
   run resumes from the newest), and <run_dir>/summary.json with the before/after figures.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from deepseek_jax import sharding
from deepseek_jax.checkpoint import Checkpointer, CheckpointError, abstract_like
from deepseek_jax.config import Config, ConfigError, replace, to_dict
from deepseek_jax.post.config import PostConfig
from deepseek_jax.post.grpo import GRPOTrainer, copy_params
from deepseek_jax.post.tasks import AdditionTask
from deepseek_jax.train import preflight
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


def make_trainer(post: PostConfig) -> GRPOTrainer:
    """The GRPO trainer on `post`'s mesh (what `run_grpo` builds when given none)."""
    mesh = sharding.make_mesh(post.base.mesh)
    return GRPOTrainer(post, sharding.Sharding(mesh, sharding.rules_for(post.base.mesh.rules)))


def run_grpo(
    post: PostConfig, log: Callable[[str], None] = print, trainer: GRPOTrainer | None = None
) -> dict:
    """Run the recipe (see the module docstring); returns the summary it writes.

    A run directory that already holds GRPO checkpoints (`train.resume`, the default) continues
    from the newest: same step counter, weights, optimizer state and reference, and the rollout
    streams of the steps still to run are those of an uninterrupted run (each step's randomness
    is a function of (grpo.seed, step)). `trainer`: one built for `post` already (its compiled
    functions are reused), else a new one on `post`'s mesh."""
    from deepseek_jax.train.loop import state_from_weights

    g, base = post.grpo, post.base
    run_dir = base.train.run_dir
    os.makedirs(run_dir, exist_ok=True)
    trainer = trainer or make_trainer(post)
    every = g.checkpoint_every or g.steps
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), every=every, keep=2, async_save=False)
    ref_ckpt = Checkpointer(os.path.join(run_dir, "reference"), every=1, keep=1, async_save=False)
    started = time.perf_counter()
    resumed = base.train.resume and ckpt.latest_step() is not None
    if resumed:
        state, ref = _restore(trainer, ckpt, ref_ckpt, g.beta > 0)
        log(f"resuming GRPO from {ckpt.directory} at update {int(state.step)}")
    else:
        if ckpt.latest_step() is not None:
            raise ConfigError(
                f"train.resume=false but {ckpt.directory} holds GRPO checkpoints: give another "
                "train.run_dir or move that one aside"
            )
        init_from = base.train.init_from
        if not init_from and g.pretrain_steps:
            init_from = pretrain(post, log)
        if init_from:
            state = state_from_weights(trainer.base, init_from)
            log(f"starting GRPO from {init_from}")
        else:
            state = trainer.base.init()
        ref = copy_params(state.params) if g.beta > 0 else None
    done = int(jax.device_get(state.step)) // g.inner_updates  # GRPO steps already taken
    pretrain_seconds = time.perf_counter() - started
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

    before_path = os.path.join(run_dir, "before.json")
    if resumed and os.path.exists(before_path):
        with open(before_path) as f:
            before = json.load(f)
    else:
        before = evaluate(0)
        with open(before_path, "w") as f:
            json.dump(before, f)
        if g.beta > 0:
            ref_ckpt.save(0, _as_state(state, ref), trainer.cfg, force=True)
    log(f"held-out before GRPO: {before}")
    writer = None
    if base.train.tensorboard:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    key = jax.random.key(g.seed)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    history = _read_history(metrics_path, done) if resumed else []
    grpo_start = time.perf_counter()
    with open(metrics_path, "w") as out:
        for m in history:  # the steps up to the checkpoint resumed from (later ones are redone)
            out.write(json.dumps(m) + "\n")
        for step in range(done + 1, g.steps + 1):
            t0 = time.perf_counter()
            rng = np.random.default_rng([g.seed, step])
            state, m = trainer.step(state, ref, rng, jax.random.fold_in(key, step))
            m["step"], m["seconds"] = step, time.perf_counter() - t0
            if g.reference_refresh_every and step % g.reference_refresh_every == 0 and ref:
                ref = copy_params(state.params)
                ref_ckpt.save(step, _as_state(state, ref), trainer.cfg, force=True)
            if step == g.steps or (g.eval_every and step % g.eval_every == 0):
                m.update(evaluate(step))
            history.append(m)
            out.write(json.dumps(m) + "\n")
            out.flush()
            if writer is not None:
                _tensorboard(writer, m)
            log(_line(m))
            ckpt.save(step, state, trainer.cfg, force=step == g.steps)
    grpo_seconds = time.perf_counter() - grpo_start
    if not history or "eval_accuracy" not in history[-1]:  # resumed a finished run
        history.append({**(history[-1] if history else {}), **evaluate(g.steps)})
    after = {k: history[-1][k] for k in before}
    ckpt.close()
    ref_ckpt.close()
    if writer is not None:
        writer.close()
    summary = {
        "before": before,
        "after": after,
        "pretrain_seconds": pretrain_seconds,
        "grpo_seconds": grpo_seconds,
        "steps": g.steps,
        "resumed_at_step": done if resumed else None,
        "reward_first": history[0].get("reward_mean"),
        "reward_last": history[-1].get("reward_mean"),
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"held-out after GRPO: {after}; {grpo_seconds:.0f}s of GRPO")
    return summary


def _as_state(state: TrainState, ref: dict) -> TrainState:
    """The reference weights in a train state's shape (no optimizer state) for a Checkpointer."""
    return TrainState(step=state.step, params=ref, router_bias=state.router_bias, opt_state={})


def _restore(
    trainer: GRPOTrainer, ckpt: Checkpointer, ref_ckpt: Checkpointer, with_ref: bool
) -> tuple[TrainState, dict | None]:
    """The newest GRPO state (and the reference, when β > 0) on the trainer's mesh."""
    shapes = preflight.state_shapes(trainer.base)
    state = ckpt.restore(abstract_like(trainer.base.state_shardings, shapes), trainer.cfg)
    if not with_ref:
        return state, None
    if ref_ckpt.latest_step() is None:
        raise CheckpointError(
            f"grpo.beta > 0 but {ref_ckpt.directory} holds no reference to resume with"
        )
    abstract = abstract_like(
        _as_state(trainer.base.state_shardings, trainer.base.state_shardings.params),
        _as_state(shapes, shapes.params),
    )
    return state, ref_ckpt.restore(abstract, trainer.cfg).params


def _read_history(path: str, done: int) -> list[dict]:
    """The logged metrics of steps 1..done (a killed run may have logged past its checkpoint)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [m for m in rows if m.get("step", 0) <= done]


def _line(m: dict) -> str:
    text = (
        f"step {m['step']:>4} reward {m['reward_mean']:.3f}±{m['reward_std']:.3f} "
        f"acc {m.get('accuracy', float('nan')):.3f} len {m['completion_len_mean']:.1f} "
        f"zero-std {m['zero_std_frac']:.2f} loss {m['loss']:.4f} "
        f"ent {m['entropy']:.3f} rollout {m['rollout_seconds']:.1f}s "
        f"update {m['update_seconds']:.1f}s gap {m['logp_gap_max']:.1e}"
    )
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
