"""Speculative decoding with the MTP module as the draft model (SPEC §4).

The main model verifies what MTP module 1 guesses. Greedy output is exactly the main model's
greedy output; sampled output has exactly the main model's (transformed) distribution, by the
speculative sampling rule (Leviathan et al. 2023; Chen et al. 2023): keep draft d ~ q with
probability min(1, p(d)/q(d)), else draw from norm(max(0, p − q)).

Row b has committed tokens x_0..x_{n-1} (prompt, then new tokens). At the top of each loop
iteration, for every running row:
- the main cache holds positions 0..n-2, every committed token but the last: x_{n-1} has not
  been fed yet, so the main model has produced hidden states h_0..h_{n-2};
- MTP module 1's own one-layer cache holds the same positions 0..n-2, position i made from the
  committed pair (h_i, x_{i+1}); nothing speculative is ever kept in it;
- the draft d for x_n was made by MTP at position n-2 from (h_{n-2}, x_{n-1}), with its logits q.

One iteration (one main forward call):
1. Verify: the main model runs the chunk [x_{n-1}, d] at positions n-1, n over its cache. Its
   logits at n-1 (p_0) judge d; those at n (p_1) give a bonus token when d is kept.
2. Accept (`verify_drafts`): keep d if it is argmax p_0 (greedy) or with probability
   min(1, p_0(d)/q(d)) (sampling). New tokens: [d, bonus ~ p_1] if kept, else [r] with
   r ~ norm(max(0, p_0 − q)) (greedy: r = argmax p_0).
3. Roll back: verifying wrote two slots per row; the row's length is set to n − 1 + 1 + a
   (a = accepted drafts), so a rejected draft's slot lies past the length, masked, and is
   overwritten later. Rows advance by different amounts; finished rows feed chunks of length 0.
4. Draft: MTP consumes the newly committed pairs, positions n−1..n−1+a: hidden states from the
   verify call (indices 0..a) with the new tokens as x_{i+1}. Its logits at the last of these
   positions are q for the next draft, which restores the invariants with n' = n + a + 1.
Prefill: the main model runs the prompt (length P) and the first new token comes from its last
logits, as in `generate`; MTP then runs the pairs (h_i, x_{i+1}) for i < P, which drafts.

Only MTP module 1 drafts (one draft token per step). Chaining module k would feed it drafted
tokens, so its cache would hold speculative entries needing a separate rollback per depth; the
acceptance rule (`verify_drafts`) and the verify/rollback bookkeeping already take K drafts.
Everything runs in one jit: prefill, then a `jax.lax.while_loop` with static shapes (caches
sized prompt + max_new_tokens + drafts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import sharding
from deepseek_jax.generate.cache import init_cache
from deepseek_jax.generate.decode import forward_with_cache, mtp_with_cache
from deepseek_jax.generate.loop import batch_inputs, decode_jit, decode_settings, shard_cache
from deepseek_jax.generate.sampling import filter_logits, sample, token_logps
from deepseek_jax.model.mtp import shift_tokens

N_DRAFT = 1  # draft tokens per step: MTP module 1 only


def _probs(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """The distribution `sample` draws from: softmax of the temperature-scaled, filtered logits."""
    return jax.nn.softmax(filter_logits(logits / temperature, top_k=top_k, top_p=top_p), axis=-1)


def verify_drafts(
    p_logits_bkv: jax.Array,
    q_logits_bkv: jax.Array,
    drafts_bk: jax.Array,
    key: jax.Array,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Accept a prefix of K drafts and pick the token after it: (accepted [B] int32, next [B]).

    p_logits_bkv [B, K+1, V]: the main model's logits at the K+1 verified positions (row j
    judges draft j; row K gives the bonus token). q_logits_bkv [B, K, V]: the draft model's
    logits each draft was drawn from. Both get the same temperature / top-k / top-p transform.
    Greedy (temperature 0): drafts are kept while they equal argmax p; next = argmax p after
    them. Sampling: draft j is kept with probability min(1, p_j(d_j)/q_j(d_j)) while all before
    it were kept; next ~ norm(max(0, p_a − q_a)) at the first rejection a, or ~ p_K if none.
    """
    b, k = drafts_bk.shape
    rows_b = jnp.arange(b)
    if temperature == 0:
        target_bk = jnp.argmax(p_logits_bkv, axis=-1).astype(jnp.int32)
        ok_bk = drafts_bk == target_bk[:, :k]
        accepted_b = jnp.cumprod(ok_bk, axis=-1).sum(-1).astype(jnp.int32)
        return accepted_b, target_bk[rows_b, accepted_b]

    key_accept, key_next = jax.random.split(key)
    p_bkv = _probs(p_logits_bkv, temperature, top_k, top_p)
    q_bkv = _probs(q_logits_bkv, temperature, top_k, top_p)
    p_draft_bk = jnp.take_along_axis(p_bkv[:, :k], drafts_bk[..., None], axis=-1)[..., 0]
    q_draft_bk = jnp.take_along_axis(q_bkv, drafts_bk[..., None], axis=-1)[..., 0]
    # u < p/q, written without the division (q(d) > 0 for a draft drawn from q).
    ok_bk = jax.random.uniform(key_accept, (b, k)) * q_draft_bk < p_draft_bk
    accepted_b = jnp.cumprod(ok_bk, axis=-1).sum(-1).astype(jnp.int32)
    # q is zero past the last draft, so the "residual" there is p itself: the bonus token.
    q_ext_bkv = jnp.concatenate([q_bkv, jnp.zeros_like(q_bkv[:, :1])], axis=1)
    resid_bv = jnp.maximum(p_bkv - q_ext_bkv, 0.0)[rows_b, accepted_b]
    # p == q leaves no residual, but then a rejection has probability 0: fall back to p.
    p_bv = p_bkv[rows_b, accepted_b]
    dist_bv = jnp.where(resid_bv.sum(-1, keepdims=True) > 0, resid_bv, p_bv)
    next_b = jax.random.categorical(key_next, jnp.log(dist_bv), axis=-1).astype(jnp.int32)
    return accepted_b, next_b


def _speculative(
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
) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
    """(new tokens [B, max_new_tokens], number produced per row [B], log-probs, counters).

    With `with_logps` the log-probs [B, max_new_tokens] are each new token's under the main
    model's unfiltered temperature-scaled softmax at its position (`token_logps`), the
    distribution the tokens follow whether a draft was kept or a token was drawn after a
    rejection: the same quantity plain decoding logs. Otherwise they are empty [B, 0].
    """
    model = nnx.merge(graphdef, state)
    b, p = prompts_bt.shape
    n, k = max_new_tokens, N_DRAFT
    rows_b, slots_k1 = jnp.arange(b), jnp.arange(k + 1)
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    cache = shard_cache(init_cache(model.cfg, b, p + n + k, cache_dtype), model.rt)
    mtp_cache = shard_cache(init_cache(model.cfg, b, p + n + k, cache_dtype, layers=1), model.rt)

    def draft(m, h_btd, next_bt, chunk_lengths_b, mtp_cache, key):
        """Run MTP over committed pairs; draft from the last one. ([B,K], [B,K,V], cache)."""
        _, logits_btv, mtp_cache = mtp_with_cache(m, h_btd, next_bt, mtp_cache, chunk_lengths_b)
        last_b = jnp.clip(chunk_lengths_b - 1, 0, next_bt.shape[1] - 1)
        q_bv = logits_btv[rows_b, last_b]
        return sample(q_bv, key, **settings)[:, None], q_bv[:, None], shard_cache(mtp_cache, m.rt)

    # Prefill: main over the prompt, first token, then MTP over (h_i, x_{i+1}) for i < P.
    logits_btv, cache, h_btd = forward_with_cache(
        model, prompts_bt, cache, prompt_lengths_b, return_hidden=True
    )
    last_b = jnp.clip(prompt_lengths_b - 1, 0, p - 1)
    key_first, key_draft = jax.random.split(jax.random.fold_in(key, 0))
    first_b = sample(logits_btv[rows_b, last_b], key_first, **settings)
    logp_bn = jnp.zeros((b, n if with_logps else 0), jnp.float32)
    if with_logps:
        logp_bn = logp_bn.at[:, 0].set(
            token_logps(logits_btv[rows_b, last_b], first_b, temperature)
        )
    next_bt = jnp.where(
        jnp.arange(p)[None] == last_b[:, None], first_b[:, None], shift_tokens(prompts_bt, 1)
    )
    drafts_bk, q_bkv, mtp_cache = draft(
        model, h_btd, next_bt, prompt_lengths_b, mtp_cache, key_draft
    )

    def stops(tokens_bt, emitted_bt):
        """(any EOS among the emitted tokens [B], tokens up to and including the first EOS [B])."""
        if eos_id is None:
            return jnp.zeros(emitted_bt.shape[:1], bool), emitted_bt.sum(-1)
        eos_bt = emitted_bt & (tokens_bt == eos_id)
        hit_b = eos_bt.any(-1)
        return hit_b, jnp.where(hit_b, jnp.argmax(eos_bt, -1) + 1, emitted_bt.sum(-1))

    carry = dict(
        step=jnp.int32(1),  # main forward calls so far (the prefill is the first)
        cache=cache,
        mtp_cache=mtp_cache,
        last_b=first_b,  # x_{n-1}: committed, not yet fed to the main model
        drafts_bk=drafts_bk,
        q_bkv=q_bkv,
        out_bn=jnp.zeros((b, n), jnp.int32).at[:, 0].set(first_b),
        logp_bn=logp_bn,
        counts_b=jnp.ones((b,), jnp.int32),
        # Empty rows (padding the batch for a mesh) are done from the start.
        done_b=stops(first_b[:, None], jnp.ones((b, 1), bool))[0]
        | (n <= 1)
        | (prompt_lengths_b == 0),
        drafted=jnp.int32(0),
        accepted=jnp.int32(0),
    )

    def cond(c):
        return ~jnp.all(c["done_b"]) & (c["step"] <= n)

    def body(c):
        m = nnx.merge(graphdef, state)
        running_b = ~c["done_b"]
        key_verify, key_draft = jax.random.split(jax.random.fold_in(key, c["step"]))

        # 1. Verify [x_{n-1}, drafts] in one call; 2. accept a prefix, pick the next token.
        chunk_bk1 = jnp.concatenate([c["last_b"][:, None], c["drafts_bk"]], axis=1)
        before_b = c["cache"].lengths_b
        p_bk1v, cache, h_bk1d = forward_with_cache(
            m, chunk_bk1, c["cache"], (k + 1) * running_b.astype(jnp.int32), return_hidden=True
        )
        accepted_b, next_b = verify_drafts(
            p_bk1v, c["q_bkv"], c["drafts_bk"], key_verify, **settings
        )
        new_b = jnp.where(running_b, accepted_b + 1, 0)  # committed this step
        drafts_then_next_bk1 = jnp.concatenate([c["drafts_bk"], next_b[:, None]], axis=1)
        new_bk1 = jnp.where(
            slots_k1[None] < accepted_b[:, None], drafts_then_next_bk1, next_b[:, None]
        )
        # 3. Roll back: keep x_{n-1} and the accepted drafts in the main cache.
        cache = shard_cache(cache.replace(lengths_b=before_b + new_b), m.rt)

        # Output: new tokens up to EOS (inclusive) and the token budget.
        emitted_bk1 = slots_k1[None] < new_b[:, None]
        eos_b, keep_b = stops(new_bk1, emitted_bk1)
        keep_b = jnp.minimum(keep_b, n - c["counts_b"])
        cols_bk1 = jnp.where(slots_k1[None] < keep_b[:, None], c["counts_b"][:, None] + slots_k1, n)
        out_bn = c["out_bn"].at[rows_b[:, None], cols_bk1].set(new_bk1, mode="drop")
        logp_bn = c["logp_bn"]
        if with_logps:  # token j of the chunk was drawn from the main model's logits at slot j
            logp_bk1 = jax.vmap(token_logps, (1, 1, None), 1)(p_bk1v, new_bk1, temperature)
            logp_bn = logp_bn.at[rows_b[:, None], cols_bk1].set(logp_bk1, mode="drop")
        counts_b = c["counts_b"] + keep_b

        # 4. Draft from the newly committed pairs (h at n-1+j, x_{n+j}) for j <= accepted.
        drafts_bk, q_bkv, mtp_cache = draft(m, h_bk1d, new_bk1, new_b, c["mtp_cache"], key_draft)
        return dict(
            step=c["step"] + 1,
            cache=cache,
            mtp_cache=mtp_cache,
            last_b=jnp.where(running_b, next_b, c["last_b"]),
            drafts_bk=drafts_bk,
            q_bkv=q_bkv,
            out_bn=out_bn,
            logp_bn=logp_bn,
            counts_b=counts_b,
            done_b=c["done_b"] | eos_b | (counts_b >= n),
            drafted=c["drafted"] + k * running_b.sum(dtype=jnp.int32),
            accepted=c["accepted"] + jnp.where(running_b, accepted_b, 0).sum(dtype=jnp.int32),
        )

    c = jax.lax.while_loop(cond, body, carry)
    stats = dict(drafted=c["drafted"], accepted=c["accepted"], main_forward_calls=c["step"])
    return c["out_bn"], c["counts_b"], c["logp_bn"], stats


# The jitted engine, on `batch_inputs`' arrays (what GRPO rollouts call, with log-probs).
speculative_tokens = decode_jit(_speculative, ("with_logps",))


def speculative_stats(counters: dict[str, jax.Array], counts_b: np.ndarray) -> dict[str, float]:
    """The engine's counters as numbers, with the acceptance rate and the new-token count."""
    stats = {name: int(v) for name, v in counters.items()}
    stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
    stats["new_tokens"] = int(counts_b.sum())
    return stats


def speculative_generate(
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
) -> tuple[list[list[int]], dict[str, float]]:
    """Like `generate` (same arguments, same output distribution; greedy gives the same tokens),
    with MTP module 1 drafting one token per main forward call.

    Returns (each prompt's new tokens, stats): drafted and accepted draft tokens,
    acceptance_rate = accepted / drafted, main_forward_calls (prefill included; plain
    `generate` needs one per new token of the longest row) and new_tokens. `mesh_sharding`
    places weights, rows and caches as in `generate`.
    """
    if getattr(model, "mtp", None) is None:
        raise ValueError("speculative_generate needs a model with MTP modules (mtp.depth >= 1)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("speculative_generate needs at least one prompt and no empty prompts")
    if max_new_tokens <= 0:
        stats = dict(drafted=0, accepted=0, acceptance_rate=0.0, main_forward_calls=0)
        return [[] for _ in prompts], {**stats, "new_tokens": 0}
    graphdef, state, prompts_bt, lengths_b = batch_inputs(model, prompts, mesh_sharding)
    out_bn, counts_b, _, counters = speculative_tokens(
        graphdef,
        state,
        prompts_bt,
        lengths_b,
        key,
        **decode_settings(max_new_tokens, temperature, top_k, top_p, eos_id, cache_dtype),
    )
    out_bn, counts_b = np.asarray(out_bn), np.asarray(counts_b)[: len(prompts)]
    return [out_bn[b, : counts_b[b]].tolist() for b in range(len(prompts))], speculative_stats(
        counters, counts_b
    )
