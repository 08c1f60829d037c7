"""Post-training configs: a `grpo:` section (and `pretrain:` / `distill:`) beside the usual ones.

A post-training YAML is an ordinary config (model, mesh, train, data) plus:
- `grpo:` the GRPO settings (`GRPOConfig`); `grpo.rewards` maps reward names to weights;
- `pretrain:` optional `train.*` overrides for a brief pretraining stage on the task's worked
  solutions before GRPO (the R1-Zero recipe on a CPU, `grpo.pretrain_steps` > 0);
- `distill:` the distillation settings (`DistillConfig`).
Dotted overrides address all of them (`grpo.beta=0.04`, `train.learning_rate=1e-5`).
The optimizer is `train`'s (learning rate, warmup, clipping, weight decay); its schedule runs
over grpo.steps × grpo.inner_updates updates.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import yaml

from deepseek_jax.config import (
    Config,
    ConfigError,
    _build,
    _merge,
    _require,
    _resolve_config_path,
    config_from_dict,
    parse_overrides,
)
from deepseek_jax.post.grpo_loss import AdvantageNorm, Aggregation, KLEstimator


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO (SPEC §8) on the shipped addition task (`deepseek_jax.post.tasks`)."""

    steps: int = 50
    prompts_per_step: int = 8
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 48
    max_prompt_len: int = 16  # rows are max_prompt_len + max_new_tokens long (static shapes)
    temperature: float = 1.0
    # Rollouts sample from the temperature-scaled policy cut to its top-k tokens / top-p nucleus
    # (0 / 1.0: off). The GRPO ratio and the logged rollout log-probs stay over the full
    # temperature-scaled softmax π_θ (see rollout.py), so filtering makes the samples slightly
    # off-policy for that ratio.
    top_k: int = 0
    top_p: float = 1.0
    inner_updates: int = 1  # μ: optimizer updates per batch of rollouts
    advantage_norm: AdvantageNorm = "group"
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO's clip-higher: 0.28
    beta: float = 0.0  # KL weight; 0 loads no reference model
    kl_estimator: KLEstimator = "k3"
    aggregation: Aggregation = "seq_mean_token_mean"
    # Dr. GRPO's constant normalizer for seq_mean_token_sum; null: max_new_tokens.
    loss_normalizer: float | None = None
    reference_refresh_every: int = 0  # copy the policy into the reference every N steps; 0: never
    # DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts,
    # up to this many extra rounds; groups still missing are padded with masked-out rows.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong_buffer: int = 0  # DAPO overlong penalty over the last N tokens; 0: off
    router_bias: Literal["frozen", "update"] = "frozen"  # aux-loss-free bias during RL (SPEC §3)
    mtp_weight: float = 0.1  # on-policy MTP loss weight (SPEC §4); 0: MTP only measured
    speculative_rollouts: bool = False  # sample rollouts with MTP drafting
    seed: int = 0
    task_digits: int = 2
    task_held_out_fraction: float = 0.1
    # Save the GRPO state (step counter, weights, optimizer, reference) every N steps to
    # <run_dir>/checkpoints; a run directory holding one is resumed. 0: only at the end.
    checkpoint_every: int = 10
    eval_every: int = 10  # held-out accuracy every N steps (and at start and end); 0: ends only
    eval_problems: int = 256
    pretrain_steps: int = 0  # brief pretraining on worked solutions first (see `pretrain:`)
    pretrain_documents: int = 20000
    rewards: tuple[tuple[str, float], ...] = (("accuracy", 1.0), ("format", 0.1))

    def __post_init__(self):
        p = "grpo"
        for name in (
            "steps",
            "prompts_per_step",
            "group_size",
            "max_new_tokens",
            "max_prompt_len",
            "inner_updates",
            "eval_problems",
        ):
            _require(getattr(self, name) >= 1, f"{p}.{name}={getattr(self, name)} must be >= 1")
        _require(self.group_size >= 2, f"{p}.group_size={self.group_size} must be >= 2")
        _require(self.temperature > 0, f"{p}.temperature must be > 0 (GRPO samples)")
        _require(self.top_k >= 0, f"{p}.top_k={self.top_k} must be >= 0 (0: off)")
        _require(0 < self.top_p <= 1, f"{p}.top_p={self.top_p} must be in (0, 1] (1: off)")
        _require(
            self.checkpoint_every >= 0, f"{p}.checkpoint_every={self.checkpoint_every} must be >= 0"
        )
        _require(0 <= self.eps_low < 1, f"{p}.eps_low={self.eps_low} must be in [0, 1)")
        _require(self.eps_high >= 0, f"{p}.eps_high={self.eps_high} must be >= 0")
        for name in ("beta", "mtp_weight", "reference_refresh_every", "overlong_buffer"):
            _require(getattr(self, name) >= 0, f"{p}.{name}={getattr(self, name)} must be >= 0")
        _require(
            self.loss_normalizer is None or self.loss_normalizer > 0,
            f"{p}.loss_normalizer={self.loss_normalizer} must be positive or null",
        )
        _require(
            self.overlong_buffer <= self.max_new_tokens,
            f"{p}.overlong_buffer={self.overlong_buffer} exceeds {p}.max_new_tokens",
        )
        _require(bool(self.rewards), f"{p}.rewards must name at least one reward function")

    @property
    def normalizer(self) -> float:
        return float(self.loss_normalizer or self.max_new_tokens)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """`deepseek-jax distill`: traces from a teacher, optional rejection sampling, SFT."""

    run_dir: str = "runs/distill"
    teacher: str = ""  # checkpoint the traces come from (or "" with `traces`)
    traces: str = ""  # a JSONL of {"prompt", "completion"} instead of generating
    prompts: int = 512  # problems of the task's train split to generate traces for
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 48
    # Keep only traces whose accuracy reward is 1 (R1's rejection sampling).
    reject_incorrect: bool = True
    steps: int = 200
    batch_size: int = 32
    seq_len: int = 64
    # The SFT learning rate (constant after train.warmup_steps); null: train.learning_rate and
    # train.min_learning_rate (which a shared config sets for GRPO, far lower than SFT wants).
    learning_rate: float | None = None
    # Logit distillation (teacher and student share the tokenizer): weight of
    # KL(teacher_T ‖ student_T)·T² on the completion tokens; 0: plain SFT.
    logit_weight: float = 0.0
    logit_temperature: float = 1.0
    logit_top_k: int = 0  # renormalize the teacher over its top-k tokens; 0: full distribution
    seed: int = 0

    def __post_init__(self):
        p = "distill"
        for name in ("prompts", "samples_per_prompt", "max_new_tokens", "steps", "batch_size"):
            _require(getattr(self, name) >= 1, f"{p}.{name}={getattr(self, name)} must be >= 1")
        _require(self.temperature >= 0, f"{p}.temperature must be >= 0")
        _require(self.logit_weight >= 0, f"{p}.logit_weight must be >= 0")
        _require(self.logit_temperature > 0, f"{p}.logit_temperature must be > 0")
        _require(self.logit_top_k >= 0, f"{p}.logit_top_k must be >= 0")
        _require(
            self.learning_rate is None or self.learning_rate > 0,
            f"{p}.learning_rate={self.learning_rate} must be positive or null",
        )


@dataclasses.dataclass(frozen=True)
class PostConfig:
    base: Config  # model, mesh, train (the optimizer), data, distributed
    grpo: GRPOConfig
    distill: DistillConfig
    pretrain: Mapping[str, Any]  # train.* overrides for the pretraining stage


def _rewards(value: Any) -> tuple[tuple[str, float], ...]:
    _require(
        isinstance(value, Mapping) and bool(value),
        f"grpo.rewards must map reward names to weights, e.g. {{accuracy: 1.0}}, got {value!r}",
    )
    out = []
    for name, w in value.items():
        _require(
            isinstance(w, (int, float)) and not isinstance(w, bool),
            f"grpo.rewards.{name}={w!r} must be a number",
        )
        out.append((str(name), float(w)))
    return tuple(out)


def post_config_from_dict(values: Mapping[str, Any], overrides: Sequence[str] = ()) -> PostConfig:
    """Split off the post-training sections, build each, and check them."""
    values = _merge(dict(values), parse_overrides(overrides))
    grpo = dict(values.pop("grpo", None) or {})
    distill = dict(values.pop("distill", None) or {})
    pretrain = dict(values.pop("pretrain", None) or {})
    rewards = _rewards(grpo.pop("rewards")) if "rewards" in grpo else None
    g = _build(GRPOConfig, grpo, "grpo")
    if rewards is not None:
        g = dataclasses.replace(g, rewards=rewards)
    return PostConfig(
        base=config_from_dict(values),
        grpo=g,
        distill=_build(DistillConfig, distill, "distill"),
        pretrain=pretrain,
    )


def load_post_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> PostConfig:
    """A post-training YAML (path or name in configs/) with dotted overrides."""
    resolved = _resolve_config_path(path)
    with open(resolved) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{resolved}: top level must be a mapping of sections")
    return post_config_from_dict(loaded, overrides)
