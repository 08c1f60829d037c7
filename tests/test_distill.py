"""Distillation: the logit-distillation KL against NumPy, SFT batches mask everything but the
completion, and `run_distill` end to end from a teacher checkpoint (traces, SFT with logit
distillation, a loadable student checkpoint) and from a prompt/completion JSONL."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from test_grpo import SMALL

from deepseek_jax.checkpoint import Checkpointer, load
from deepseek_jax.config import ConfigError
from deepseek_jax.post.config import post_config_from_dict
from deepseek_jax.post.distill import read_traces, run_distill
from deepseek_jax.post.sft import distill_kl, sft_batches
from deepseek_jax.train.step import Trainer


@pytest.mark.parametrize("top_k", [0, 3])
def test_distill_kl_matches_numpy(top_k):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 4, 7)), rng.normal(size=(2, 4, 7)) * 2
    mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    temp = 2.0
    expected, n = 0.0, 0
    for b in range(2):
        for i in range(4):
            if not mask[b, i]:
                continue
            z = t[b, i] / temp
            keep = z >= np.sort(z)[-top_k] if top_k else np.ones(7, bool)
            p = np.where(keep, np.exp(z - z.max()), 0.0)
            p /= p.sum()
            q = np.exp(s[b, i] / temp - (s[b, i] / temp).max())
            q /= q.sum()
            expected += temp**2 * sum(p[v] * np.log(p[v] / q[v]) for v in range(7) if p[v] > 0)
            n += 1
    got = distill_kl(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), temp, top_k)
    np.testing.assert_allclose(float(got), expected / n, rtol=1e-5)


def test_sft_batches_mask_the_prompt():
    batches = sft_batches([[5, 6], [7]], [[8, 1], [9, 10, 1]], 2, 6, pad_id=2, seed=0)
    for _ in range(3):
        b = next(batches)
        for row_tokens, row_mask in zip(b["tokens"], b["loss_mask"], strict=True):
            targets = list(row_tokens[1:]) + [2]
            kept = [t for t, m in zip(targets, row_mask, strict=True) if m]
            assert kept in ([8, 1], [9, 10, 1])


def test_read_traces_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "x"}\n\n{"prompt": "2+2="}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:3 needs string"):
        read_traces(str(path))


@pytest.mark.slow
def test_distill_from_teacher_with_logits(tmp_path):
    teacher_cfg = post_config_from_dict(SMALL)
    trainer = Trainer.create(teacher_cfg.base, None)
    ckpt = Checkpointer(str(tmp_path / "teacher" / "checkpoints"), 1, 1, async_save=False)
    ckpt.save(1, trainer.init(seed=3), teacher_cfg.base, force=True)
    ckpt.close()
    values = json.loads(json.dumps(SMALL))
    values["train"]["learning_rate"] = values["train"]["min_learning_rate"] = 3e-3
    values["distill"] = {
        "run_dir": str(tmp_path / "student"),
        "teacher": str(tmp_path / "teacher"),
        "prompts": 16,
        "samples_per_prompt": 2,
        "max_new_tokens": 10,
        "reject_incorrect": False,  # a random teacher is never right
        "steps": 30,
        "batch_size": 8,
        "seq_len": 40,
        "logit_weight": 0.5,
        "logit_top_k": 5,
    }
    values["grpo"]["eval_problems"] = 8
    summary = run_distill(post_config_from_dict(values), log=lambda m: None)
    assert summary["traces_kept"] == 32 and summary["teacher_accuracy"] == 0.0
    lines = [json.loads(x) for x in open(tmp_path / "student" / "metrics.jsonl")]
    assert lines[-1]["lm_loss"] < 0.7 * lines[0]["lm_loss"]
    assert lines[-1]["distill_kl"] < lines[0]["distill_kl"]
    student = load(str(tmp_path / "student"))
    assert student.cfg == teacher_cfg.base.model
    assert student(jnp.ones((1, 4), jnp.int32)).shape == (1, 4, 260)
    assert os.path.exists(tmp_path / "student" / "traces.jsonl")


def test_distill_needs_a_source(tmp_path):
    values = json.loads(json.dumps(SMALL))
    values["distill"] = {"run_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="distill.teacher"):
        run_distill(post_config_from_dict(values), log=lambda m: None)
