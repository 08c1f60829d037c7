"""Rollouts: G sampled completions per prompt from the current policy, with their log-probs.

Sampling runs on `deepseek_jax.generate`'s engine (latent-cache prefill and decode, the same
`sample`), on the training mesh, straight from the trainer's parameters: `batch_inputs` places
weights by the training rules, which they already have, so nothing is copied. The decode loop
is `generate`'s, plus one thing the trainer needs: the log-probability of each sampled token
under the distribution it was drawn from (logged beside the trainer's recomputed one; SPEC §8).
With `speculative=True` the MTP module drafts (`speculative_generate`: the same distribution,
fewer main-model calls); that path records no log-probs.

`pack` turns prompts and completions into the fixed-shape training batch: row = prompt +
completion + padding, target t = token t+1, loss mask on completion targets only.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import sharding
from deepseek_jax.generate import speculative_generate
from deepseek_jax.generate.cache import init_cache
from deepseek_jax.generate.decode import forward_with_cache
from deepseek_jax.generate.loop import batch_inputs, decode_jit, shard_cache
from deepseek_jax.generate.sampling import sample


def sampling_logps(logits_bv: jax.Array, tokens_b: jax.Array, temperature: float) -> jax.Array:
    """log p(token) under the distribution `sample` draws from with this temperature (no top-k
    or top-p: the GRPO trainer's log-probs are of the temperature-scaled softmax)."""
    scaled_bv = logits_bv.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
    logp_bv = jax.nn.log_softmax(scaled_bv, axis=-1)
    return jnp.take_along_axis(logp_bv, tokens_b[:, None], axis=-1)[:, 0]


def _decode_with_logps(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts_bt: jax.Array,
    prompt_lengths_b: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_id: int | None,
    cache_dtype,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`generate`'s decode loop, also returning each new token's log-prob [B, N] float32."""
    model = nnx.merge(graphdef, state)
    b, p = prompts_bt.shape
    cache = shard_cache(init_cache(model.cfg, b, p + max_new_tokens, cache_dtype), model.rt)
    pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

    def is_eos(tokens_b):
        return jnp.zeros(tokens_b.shape, bool) if eos_id is None else tokens_b == eos_id

    logits_btv, cache = forward_with_cache(model, prompts_bt, cache, prompt_lengths_b)
    first_logits_bv = logits_btv[jnp.arange(b), jnp.clip(prompt_lengths_b - 1, 0, p - 1)]
    first_b = pick(first_logits_bv, jax.random.fold_in(key, 0))
    out_bn = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first_b)
    logp_bn = jnp.zeros((b, max_new_tokens), jnp.float32)
    logp_bn = logp_bn.at[:, 0].set(sampling_logps(first_logits_bv, first_b, temperature))
    done_b = is_eos(first_b) | (prompt_lengths_b == 0)
    carry = (jnp.int32(1), cache, first_b, out_bn, logp_bn, done_b, jnp.ones((b,), jnp.int32))

    def cond(carry):
        i, _, _, _, _, done_b, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_b)

    def body(carry):
        i, cache, tokens_b, out_bn, logp_bn, done_b, counts_b = carry
        running_b = ~done_b
        m = nnx.merge(graphdef, state)
        logits_btv, cache = forward_with_cache(
            m, tokens_b[:, None], cache, running_b.astype(jnp.int32)
        )
        cache = shard_cache(cache, m.rt)
        new_b = pick(logits_btv[:, 0], jax.random.fold_in(key, i))
        new_b = jnp.where(running_b, new_b, tokens_b)
        logp_b = jnp.where(
            running_b, sampling_logps(logits_btv[:, 0], new_b, temperature), logp_bn[:, i]
        )
        out_bn = out_bn.at[:, i].set(jnp.where(running_b, new_b, out_bn[:, i]))
        logp_bn = logp_bn.at[:, i].set(logp_b)
        counts_b = counts_b + running_b.astype(jnp.int32)
        done_b = done_b | (running_b & is_eos(new_b))
        return i + 1, cache, new_b, out_bn, logp_bn, done_b, counts_b

    _, _, _, out_bn, logp_bn, _, counts_b = jax.lax.while_loop(cond, body, carry)
    return out_bn, counts_b, logp_bn


_decode_jit = decode_jit(_decode_with_logps)


@dataclasses.dataclass
class Rollouts:
    """Sampled completions (token ids, EOS included if produced) and what came with them."""

    completions: list[list[int]]
    logps: list[list[float]] | None  # per completion token; None for speculative rollouts
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
    eos_id: int | None = None,
    mesh_sharding: sharding.Sharding | None = None,
    speculative: bool = False,
) -> Rollouts:
    """One completion per prompt row (repeat a prompt G times for a group), sampled at
    `temperature` from `model` with `deepseek_jax.generate`'s engine."""
    start = time.perf_counter()
    stats: dict[str, float] = {}
    if speculative:
        outs, stats = speculative_generate(
            model,
            prompts,
            max_new_tokens,
            key=key,
            temperature=temperature,
            eos_id=eos_id,
            mesh_sharding=mesh_sharding,
        )
        logps = None
    else:
        graphdef, state, prompts_bt, lengths_b = batch_inputs(model, prompts, mesh_sharding)
        out_bn, counts_b, logp_bn = _decode_jit(
            graphdef,
            state,
            prompts_bt,
            lengths_b,
            key,
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_k=0,
            top_p=1.0,
            eos_id=None if eos_id is None else int(eos_id),
            cache_dtype=jnp.dtype(jnp.float32),
        )
        out_bn, counts_b, logp_bn = jax.device_get((out_bn, counts_b, logp_bn))
        outs = [out_bn[b, : counts_b[b]].tolist() for b in range(len(prompts))]
        logps = [logp_bn[b, : counts_b[b]].tolist() for b in range(len(prompts))]
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
