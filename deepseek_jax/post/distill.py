"""`deepseek-jax distill CONFIG`: distill a teacher's reasoning traces into a student (SPEC §8).

1. Traces: `distill.traces` (a JSONL of {"prompt", "completion"[, "reference"]}), or sampled
   from the `distill.teacher` checkpoint on `distill.prompts` problems of the task's train split,
   `samples_per_prompt` each; with `reject_incorrect`, only traces the accuracy reward accepts
   are kept (R1's rejection sampling). They are written to <distill.run_dir>/traces.jsonl.
2. Student: `train.init_from` if set; else, with `grpo.pretrain_steps` > 0, the same brief
   pretraining as the GRPO recipe (in <train.run_dir>/pretrain, reused if present); else random.
3. SFT on completion tokens (`sft.py`), plus logit distillation when `distill.logit_weight` > 0
   (the teacher must share the student's tokenizer and vocabulary).
4. Held-out accuracy before and after, a checkpoint in <distill.run_dir>/checkpoints, and
   <distill.run_dir>/summary.json.
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
from deepseek_jax.config import ConfigError, replace
from deepseek_jax.data.tokenizer import Tokenizer, make_tokenizer
from deepseek_jax.generate.text import encode_prompt
from deepseek_jax.post.config import PostConfig
from deepseek_jax.post.grpo import evaluate_model
from deepseek_jax.post.rewards import accuracy_reward
from deepseek_jax.post.rollout import sample_completions
from deepseek_jax.post.sft import make_distill_step, sft_batches
from deepseek_jax.post.tasks import AdditionTask
from deepseek_jax.train.step import Trainer


def read_traces(path: str) -> list[dict]:
    """Rows of a prompt/completion JSONL; a bad line raises naming the file and line."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not valid JSON ({e.msg})") from None
            if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
                raise ValueError(f'{path}:{number} needs string "prompt" and "completion" fields')
            rows.append(row)
    return rows


def teacher_traces(
    post: PostConfig, tokenizer: Tokenizer, log: Callable[[str], None], mesh_sharding=None
) -> tuple[list[dict], dict]:
    """Sample traces from the teacher on train-split problems; keep the accepted ones."""
    from deepseek_jax.checkpoint import load

    d, g = post.distill, post.grpo
    teacher = load(d.teacher, mesh_sharding=mesh_sharding)
    task = AdditionTask(g.task_digits, g.task_held_out_fraction)
    problems = task.sample("train", d.prompts, np.random.default_rng(d.seed))
    rows = [p for p in problems for _ in range(d.samples_per_prompt)]
    prompts = [encode_prompt(tokenizer, p.prompt) for p in rows]
    roll = sample_completions(
        teacher,
        prompts,
        d.max_new_tokens,
        key=jax.random.key(d.seed),
        temperature=d.temperature,
        eos_id=tokenizer.eos_id,
        mesh_sharding=mesh_sharding,
    )
    traces, correct = [], 0
    for p, c in zip(rows, roll.completions, strict=True):
        text = tokenizer.decode(c)
        ok = accuracy_reward(p.prompt, text, p.answer) == 1.0
        correct += ok
        if ok or not d.reject_incorrect:
            traces.append({"prompt": p.prompt, "completion": text, "reference": p.answer})
    stats = {
        "traces_sampled": len(rows),
        "teacher_accuracy": correct / len(rows),
        "traces_kept": len(traces),
        "trace_seconds": roll.seconds,
    }
    log(f"teacher traces: {stats}")
    return traces, stats


def run_distill(post: PostConfig, log: Callable[[str], None] = print) -> dict:
    """Run the distillation recipe (see the module docstring); returns its summary."""
    from deepseek_jax.post.grpo_loop import pretrain
    from deepseek_jax.train.loop import state_from_weights

    d, g = post.distill, post.grpo
    if not d.traces and not d.teacher:
        raise ConfigError("give distill.teacher (a checkpoint) or distill.traces (a JSONL)")
    run_dir = d.run_dir
    os.makedirs(run_dir, exist_ok=True)
    changes = {"train.steps": d.steps, "train.batch_size": d.batch_size}
    if d.learning_rate is not None:
        changes.update(
            {"train.learning_rate": d.learning_rate, "train.min_learning_rate": d.learning_rate}
        )
    cfg = replace(post.base, **changes)
    tokenizer = make_tokenizer(cfg.data, cfg.model)
    mesh = sharding.make_mesh(cfg.mesh)
    mesh_sharding = sharding.Sharding(mesh, sharding.rules_for(cfg.mesh.rules))
    if d.traces:
        traces, stats = read_traces(d.traces), {"traces_kept": 0}
        stats["traces_kept"] = len(traces)
    else:
        traces, stats = teacher_traces(post, tokenizer, log, mesh_sharding)
    with open(os.path.join(run_dir, "traces.jsonl"), "w") as f:
        for row in traces:
            f.write(json.dumps(row) + "\n")

    trainer = Trainer.create(cfg, mesh_sharding)
    init_from = cfg.train.init_from
    if not init_from and g.pretrain_steps:
        init_from = pretrain(post, log)
    state = state_from_weights(trainer, init_from) if init_from else trainer.init()
    task = AdditionTask(g.task_digits, g.task_held_out_fraction)

    def evaluate(state) -> dict:
        return evaluate_model(
            trainer.model(state),
            task,
            tokenizer,
            g.eval_problems,
            g.max_new_tokens,
            mesh_sharding=trainer.mesh_sharding,
        )

    before = evaluate(state)
    log(f"student held-out before SFT: {before}")
    prompts, completions = [], []
    for r in traces:
        p = encode_prompt(tokenizer, r["prompt"])
        c = tokenizer.encode(r["completion"]) + [tokenizer.eos_id]
        if len(p) + len(c) <= d.seq_len + 1:
            prompts.append(p)
            completions.append(c)
    if len(prompts) < len(traces):
        log(f"{len(traces) - len(prompts)} traces longer than distill.seq_len={d.seq_len} skipped")
    stats["traces_trained"] = len(prompts)
    batches = sft_batches(prompts, completions, d.batch_size, d.seq_len, tokenizer.pad_id, d.seed)
    if d.logit_weight > 0:
        step_fn = make_distill_step(trainer, d.logit_weight, d.logit_temperature, d.logit_top_k)
        teacher_logits = _teacher_logits_fn(d.teacher, cfg.model.vocab_size, mesh_sharding)
    else:
        step_fn = trainer.jitted_step()
    start = time.perf_counter()
    history = []
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as out:
        for step in range(1, d.steps + 1):
            host = next(batches)
            batch = jax.device_put(
                {k: np.asarray(v) for k, v in host.items()}, trainer.batch_sharding
            )
            if d.logit_weight > 0:
                batch["teacher_logits"] = teacher_logits(batch["tokens"])
            state, metrics = step_fn(state, batch)
            if step % 10 == 0 or step == d.steps:
                m = {
                    k: float(v)
                    for k, v in jax.device_get(metrics).items()
                    if np.ndim(v) == 0 and k in ("loss", "lm_loss", "distill_kl", "grad_norm")
                }
                m["step"] = step
                history.append(m)
                out.write(json.dumps(m) + "\n")
                log(f"sft step {step} " + " ".join(f"{k} {v:.4f}" for k, v in m.items()))
    sft_seconds = time.perf_counter() - start
    after = evaluate(state)
    log(f"student held-out after SFT: {after} ({sft_seconds:.0f}s of SFT)")
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), every=1, keep=1, async_save=False)
    ckpt.save(d.steps, state, cfg, force=True)
    ckpt.close()
    summary = {"before": before, "after": after, "sft_seconds": sft_seconds, **stats}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _teacher_logits_fn(path: str, vocab_size: int, mesh_sharding):
    from flax import nnx

    from deepseek_jax.checkpoint import load

    if not path:
        raise ConfigError("distill.logit_weight > 0 needs distill.teacher (its logits)")
    teacher = load(path, mesh_sharding=mesh_sharding)
    if teacher.cfg.vocab_size != vocab_size:
        raise ConfigError(
            f"distill.logit_weight > 0: the teacher's vocabulary ({teacher.cfg.vocab_size}) "
            f"differs from the student's ({vocab_size}); use plain SFT (logit_weight: 0)"
        )
    graphdef, state = nnx.split(teacher)

    def logits(state, tokens_bt):
        return nnx.merge(graphdef, state).forward(tokens_bt, with_mtp=False).logits

    fn = jax.jit(logits)
    return lambda tokens_bt: fn(state, tokens_bt)
