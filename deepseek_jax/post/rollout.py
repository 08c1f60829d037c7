"""Rollouts: G sampled completions per prompt from the current policy, with their log-probs.

Sampling runs on `deepseek_jax.generate`'s engine (latent-cache prefill and decode, the same
`sample`), on the training mesh, straight from the trainer's parameters: `batch_inputs` places
weights by the training rules, which they already have, so nothing is copied. The decode loop
is `generate`'s own, asked for one more output the trainer needs: the log-probability of each
sampled token under the temperature-scaled policy (logged beside the trainer's recomputed one;
SPEC §8). With top-k / top-p the token is drawn from the filtered, renormalized distribution, but
its log-prob stays the unfiltered policy's: that is π_old in the ratio π_θ/π_old, which the
trainer recomputes over the full softmax too, so the two are comparable (and the rollouts are
slightly off-policy for that ratio; leave the filters off for exact on-policy GRPO).
With `speculative=True` the MTP module drafts (`deepseek_jax.generate.speculative`: the same
distribution, fewer main-model calls) and each token's log-prob is read from the verify call's
logits at its position, so both paths log the same quantity.

`pack` turns prompts and completions into the fixed-shape training batch: row = prompt +
completion + padding, target t = token t+1, loss mask on completion targets only.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import sharding
from deepseek_jax.generate.loop import batch_inputs, decode_settings, generate_tokens
from deepseek_jax.generate.speculative import speculative_stats, speculative_tokens


@dataclasses.dataclass
class Rollouts:
    """Sampled completions (token ids, EOS included if produced) and what came with them."""

    completions: list[list[int]]
    logps: list[list[float]]  # per completion token
    truncated: list[bool]  # hit max_new_tokens without EOS
    seconds: float
    stats: dict[str, float]  # speculative: drafted, accepted, acceptance_rate, ...


def sample_completions(
    model: nnx.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    mesh_sharding: sharding.Sharding | None = None,
    speculative: bool = False,
) -> Rollouts:
    """One completion per prompt row (repeat a prompt G times for a group), sampled at
    `temperature` (cut to `top_k` / `top_p` when set) from `model` with
    `deepseek_jax.generate`'s engine. The log-probs are over the unfiltered temperature-scaled
    softmax whatever the filter (the distribution the GRPO ratio uses)."""
    start = time.perf_counter()
    graphdef, state, prompts_bt, lengths_b = batch_inputs(model, prompts, mesh_sharding)
    engine = speculative_tokens if speculative else generate_tokens
    # Both engines return (tokens, counts, log-probs); the speculative one adds its counters.
    outputs = engine(
        graphdef,
        state,
        prompts_bt,
        lengths_b,
        key,
        **decode_settings(max_new_tokens, temperature, top_k, top_p, eos_id, jnp.float32),
        with_logps=True,
    )
    out_bn, counts_b, logp_bn = jax.device_get(outputs[:3])
    counts_b = counts_b[: len(prompts)]
    outs = [out_bn[b, : counts_b[b]].tolist() for b in range(len(prompts))]
    logps = [logp_bn[b, : counts_b[b]].tolist() for b in range(len(prompts))]
    stats = speculative_stats(jax.device_get(outputs[3]), counts_b) if speculative else {}
    truncated = [len(o) >= max_new_tokens and (not o or o[-1] != eos_id) for o in outs]
    return Rollouts(outs, logps, truncated, time.perf_counter() - start, stats)


def pack(
    prompts: list[list[int]],
    completions: list[list[int]],
    seq_len: int,
    pad_id: int,
    logps: list[list[float]] | None = None,
) -> dict[str, np.ndarray]:
    """The training rows: tokens, targets, loss_mask [B, seq_len] and, when given, the
    rollout's log-probs at the same (target) positions. Position t predicts token t+1, so
    completion token j of a prompt of length P is the target at position P - 1 + j."""
    b = len(prompts)
    tokens = np.full((b, seq_len + 1), pad_id, np.int32)
    mask = np.zeros((b, seq_len), np.float32)
    rollout_logp = np.zeros((b, seq_len), np.float32)
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if len(p) + len(c) > seq_len + 1:
            raise ValueError(f"prompt + completion of {len(p) + len(c)} tokens > {seq_len + 1}")
        tokens[row, : len(p) + len(c)] = p + c
        mask[row, len(p) - 1 : len(p) - 1 + len(c)] = 1.0
        if logps is not None:
            rollout_logp[row, len(p) - 1 : len(p) - 1 + len(c)] = logps[row]
    out = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}
    if logps is not None:
        out["rollout_logp"] = rollout_logp
    return out
