"""Autoregressive generation over the latent KV cache: one prefill, then a jitted decode loop.

Prompts are right-padded into one batch and prefilled together (each row's chunk length is its
prompt length); the first new token of each row is sampled from the logits at its last real
prompt token. The decode loop (`jax.lax.while_loop`, static shapes) then feeds one token per row
and step; a row that has produced `eos_id` is done and feeds chunk length 0 from then on, so its
cache and output stay as they are. The loop ends when every row is done or `max_new_tokens`
tokens have been produced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import sharding
from deepseek_jax.generate.cache import LatentCache, init_cache
from deepseek_jax.generate.decode import forward_with_cache
from deepseek_jax.generate.sampling import sample, token_logps
from deepseek_jax.runtime import Runtime, with_runtime

# Keyword settings of the decode functions: static under jit (one compilation per value).
SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "cache_dtype")


def decode_jit(fn, extra_settings: tuple[str, ...] = ()):
    """`jax.jit` of `fn(graphdef, state, *arrays, **settings)` with graphdef and the settings
    (SETTINGS plus `extra_settings`) static. The graphdef carries the model's `Runtime`, mesh
    included, so one compilation serves one (model, mesh) pair."""
    return jax.jit(fn, static_argnums=0, static_argnames=(*SETTINGS, *extra_settings))


def decode_settings(max_new_tokens, temperature, top_k, top_p, eos_id, cache_dtype) -> dict:
    """SETTINGS as the plain Python values the jitted decode functions are keyed on (a NumPy
    integer, or a dtype spelled another way, would otherwise be one more compilation)."""
    return dict(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        eos_id=None if eos_id is None else int(eos_id),
        cache_dtype=jnp.dtype(cache_dtype),
    )


def shard_cache(cache: LatentCache, rt: Runtime) -> LatentCache:
    """Split the cache's batch rows like the activations (identity without a mesh)."""
    return LatentCache(
        c_lbsr=rt.constrain(cache.c_lbsr, (None, "batch", None, None)),
        k_pe_lbsk=rt.constrain(cache.k_pe_lbsk, (None, "batch", None, None)),
        lengths_b=rt.constrain(cache.lengths_b, ("batch",)),
    )


def _decode(
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
    with_logps: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(new tokens [B, max_new_tokens] int32, number produced per row [B] int32, log-probs).

    With `with_logps` the third output holds each new token's log-probability [B,
    max_new_tokens] under the distribution it was drawn from (`token_logps`: what GRPO's
    rollouts log beside the trainer's recomputation); otherwise it is empty [B, 0].
    """
    model = nnx.merge(graphdef, state)
    b, p = prompts_bt.shape
    cache = shard_cache(init_cache(model.cfg, b, p + max_new_tokens, cache_dtype), model.rt)
    pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

    def is_eos(tokens_b):
        if eos_id is None:
            return jnp.zeros(tokens_b.shape, bool)
        return tokens_b == eos_id

    logits_btv, cache = forward_with_cache(model, prompts_bt, cache, prompt_lengths_b)
    last_b = jnp.clip(prompt_lengths_b - 1, 0, p - 1)
    first_logits_bv = logits_btv[jnp.arange(b), last_b]
    first_b = pick(first_logits_bv, jax.random.fold_in(key, 0))
    out_bn = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first_b)
    logp_bn = jnp.zeros((b, max_new_tokens if with_logps else 0), jnp.float32)
    if with_logps:
        logp_bn = logp_bn.at[:, 0].set(token_logps(first_logits_bv, first_b, temperature))
    carry = (
        jnp.int32(1),  # tokens produced so far by rows still running (= next output column)
        cache,
        first_b,
        out_bn,
        logp_bn,
        is_eos(first_b) | (prompt_lengths_b == 0),  # empty rows pad the batch for a mesh
        jnp.ones((b,), jnp.int32),
    )

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
        column_b = jnp.where(running_b, new_b, out_bn[:, i])
        out_bn = jax.lax.dynamic_update_slice_in_dim(out_bn, column_b[:, None], i, axis=1)
        if with_logps:
            logp_b = token_logps(logits_btv[:, 0], new_b, temperature)
            logp_b = jnp.where(running_b, logp_b, logp_bn[:, i])
            logp_bn = jax.lax.dynamic_update_slice_in_dim(logp_bn, logp_b[:, None], i, axis=1)
        counts_b = counts_b + running_b.astype(jnp.int32)
        done_b = done_b | (running_b & is_eos(new_b))
        return i + 1, cache, new_b, out_bn, logp_bn, done_b, counts_b

    _, _, _, out_bn, logp_bn, _, counts_b = jax.lax.while_loop(cond, body, carry)
    return out_bn, counts_b, logp_bn


# The jitted decode loop behind `generate`, arrays in and out (GRPO rollouts call it with
# with_logps=True).
generate_tokens = decode_jit(_decode, extra_settings=("with_logps",))


def generate(
    model: nnx.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    key: jax.Array,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    cache_dtype=jnp.float32,
    mesh_sharding: sharding.Sharding | None = None,
) -> list[list[int]]:
    """Each prompt's new tokens (at most `max_new_tokens`, up to and including `eos_id`).

    temperature 0 is greedy decoding; otherwise tokens are drawn by `sample` with the given
    temperature, top_k and top_p. Prompts may differ in length but must not be empty. One
    compilation per (batch, longest prompt, max_new_tokens, sampling settings).

    With `mesh_sharding` (default: the mesh of the model's own runtime, if any), the model runs
    with that mesh (`with_runtime`), the weights are placed by its rules (as in training:
    experts over the expert axis, the rest per the preset), prompt rows and the cache are split
    over the batch axes (rows padded to a multiple of their size), and MoE layers run
    expert-parallel.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompts")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    graphdef, state, prompts_bt, lengths_b = batch_inputs(model, prompts, mesh_sharding)
    out_bn, counts_b, _ = generate_tokens(
        graphdef,
        state,
        prompts_bt,
        lengths_b,
        key,
        **decode_settings(max_new_tokens, temperature, top_k, top_p, eos_id, cache_dtype),
    )
    out_bn, counts_b = np.asarray(out_bn), np.asarray(counts_b)
    return [out_bn[b, : counts_b[b]].tolist() for b in range(len(prompts))]


def batch_inputs(
    model: nnx.Module, prompts: list[list[int]], mesh_sharding: sharding.Sharding | None = None
) -> tuple[nnx.GraphDef, nnx.State, jax.Array, jax.Array]:
    """(graphdef, state, right-padded prompts [B, P], prompt lengths [B]) for a decode jit.

    With a mesh (`mesh_sharding`, else the model runtime's), the graphdef carries it, the
    weights are placed by its rules and rows over the batch axes; B is rounded up to a multiple
    of the batch axes' size with empty rows (length 0: done from the start, output dropped).
    """
    if mesh_sharding is None:
        mesh_sharding = model.rt.sharding
    elif mesh_sharding != model.rt.sharding:
        model = with_runtime(model, model.rt.replace(sharding=mesh_sharding))
    rows = len(prompts)
    if mesh_sharding is not None:
        split = mesh_sharding.axis_size("batch")
        rows = -(-rows // split) * split
    lengths = np.zeros((rows,), np.int32)
    lengths[: len(prompts)] = [len(p) for p in prompts]
    padded = np.zeros((rows, int(lengths.max())), np.int32)
    for row, p in zip(padded, prompts, strict=False):
        row[: len(p)] = p
    graphdef, state = nnx.split(model)
    prompts_bt, lengths_b = jnp.asarray(padded), jnp.asarray(lengths)
    if mesh_sharding is not None:
        state = jax.device_put(state, sharding.state_shardings(state, mesh_sharding))
        prompts_bt = jax.device_put(prompts_bt, mesh_sharding.named(("batch", None)))
        lengths_b = jax.device_put(lengths_b, mesh_sharding.named(("batch",)))
    return graphdef, state, prompts_bt, lengths_b
