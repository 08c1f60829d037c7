"""Run the model over a chunk of new tokens against a latent KV cache (prefill and decode).

Attention uses MLA's absorbed form (SPEC §1): with q̃_h = W_UK,hᵀ q_nope_h the score is
scale·(q̃_h·ĉ_t + q_pe_h·k_pe_t), the context is z_h = Σ_t p_t ĉ_t and the head output is
o_h = W_UV,h z_h. It is the training form's algebra regrouped, so per-head keys and values are
never built and the cache holds only ĉ and k_pe. Everything else (norms, dense and MoE FFNs,
embedding, head) is the model's own modules.

Right padding: chunk row b carries `chunk_lengths_b[b]` real tokens first, then padding. Real
token t of row b sits at position lengths_b[b] + t (its own length, so rows of different lengths
advance independently); padding is never written to the cache and its logits are meaningless.
A prefill is a chunk of the prompt, a decode step a chunk of one token (chunk length 0 for rows
that are done).

MTP modules (SPEC §4) run the same way, each against its own one-layer cache (`mtp_with_cache`),
fed the main model's hidden states, which `forward_with_cache(..., return_hidden=True)` returns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from deepseek_jax.config import ModelConfig
from deepseek_jax.generate.cache import LatentCache
from deepseek_jax.model.block import Block
from deepseek_jax.model.layers import cast
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.rope import apply_rope, rope_tables
from deepseek_jax.model.transformer import DeepSeek, layer_runs


def absorbed_attention(
    attn: MLA,
    x_btd: jax.Array,
    cos_btk: jax.Array,
    sin_btk: jax.Array,
    c_bsr: jax.Array,
    k_pe_bsk: jax.Array,
    write_bt: jax.Array,
    mask_bts: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's MLA over cached latents. Returns (output [B,T,D], updated ĉ, updated k_pe).

    The chunk's own ĉ and k_pe are scattered into the cache at slots `write_bt` first (slots
    >= S_max are dropped: that is how padding is skipped), so the chunk attends to itself too.
    `mask_bts` says which cache slots each query may see. Its products go through
    `Runtime.einsum` (values as `jnp.einsum`'s; bf16 on a CPU takes the fast library kernel).
    """
    cfg, rt, d_n = attn.cfg, attn.rt, attn.cfg.mla.qk_nope_head_dim
    dtype = rt.compute_dtype
    b, _, _ = x_btd.shape
    q_bthk = attn.queries(x_btd)
    q_nope_bthk, q_pe_bthk = q_bthk[..., :d_n], apply_rope(q_bthk[..., d_n:], cos_btk, sin_btk)
    c_btr, k_pe_btk = attn.latents(x_btd, cos_btk, sin_btk)

    rows_bt = jnp.broadcast_to(jnp.arange(b)[:, None], write_bt.shape)
    c_bsr = c_bsr.at[rows_bt, write_bt].set(c_btr.astype(c_bsr.dtype), mode="drop")
    k_pe_bsk = k_pe_bsk.at[rows_bt, write_bt].set(k_pe_btk.astype(k_pe_bsk.dtype), mode="drop")
    c_read_bsr, k_pe_read_bsk = c_bsr.astype(dtype), k_pe_bsk.astype(dtype)

    q_lat_bthr = rt.einsum("bthk,rhk->bthr", q_nope_bthk, cast(attn.wk_b_RHK, rt))
    scores_bhts = rt.einsum("bthr,bsr->bhts", q_lat_bthr, c_read_bsr) + rt.einsum(
        "bthk,bsk->bhts", q_pe_bthk, k_pe_read_bsk
    )
    scores_bhts = scores_bhts.astype(jnp.float32) * cfg.softmax_scale
    # finfo.min, not -inf: a query with nothing visible (an empty row's padding) stays finite.
    scores_bhts = jnp.where(mask_bts[:, None], scores_bhts, jnp.finfo(jnp.float32).min)
    probs_bhts = jax.nn.softmax(scores_bhts, axis=-1).astype(dtype)
    z_bthr = rt.einsum("bhts,bsr->bthr", probs_bhts, c_read_bsr)
    out_bthk = rt.einsum("bthr,rhk->bthk", z_bthr, cast(attn.wv_b_RHK, rt))
    return rt.einsum("bthk,hkd->btd", out_bthk, cast(attn.wo_HKD, rt)), c_bsr, k_pe_bsk


@struct.dataclass
class ChunkLayout:
    """Where a right-padded chunk of new tokens goes in a cache, and what each query may see."""

    cos_btk: jax.Array
    sin_btk: jax.Array
    write_bt: jax.Array  # cache slot of each chunk token; S_max (dropped) for padding
    mask_bts: jax.Array  # query t of row b may attend to slot s
    lengths_b: jax.Array  # the row lengths after the chunk is written


def chunk_layout(
    cfg: ModelConfig, cache: LatentCache, t: int, chunk_lengths_b: jax.Array
) -> ChunkLayout:
    """Real token t of row b sits at position lengths_b[b] + t; it sees slots up to itself."""
    s = cache.max_len
    positions_bt = cache.lengths_b[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    valid_bt = jnp.arange(t)[None] < chunk_lengths_b[:, None]
    lengths_b = cache.lengths_b + chunk_lengths_b.astype(jnp.int32)
    slots_s = jnp.arange(s)
    mask_bts = (slots_s[None, None] <= positions_bt[:, :, None]) & (
        slots_s[None, None] < lengths_b[:, None, None]
    )
    cos_btk, sin_btk = rope_tables(cfg, positions_bt)
    return ChunkLayout(
        cos_btk=cos_btk,
        sin_btk=sin_btk,
        write_bt=jnp.where(valid_bt, positions_bt, s),
        mask_bts=mask_bts,
        lengths_b=lengths_b,
    )


def cached_block(
    block: Block, x_btd: jax.Array, layout: ChunkLayout, c_bsr: jax.Array, k_pe_bsk: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder block over a chunk with absorbed attention: (new x, updated ĉ, updated k_pe)."""
    out_btd, c_bsr, k_pe_bsk = absorbed_attention(
        block.attn,
        block.attn_norm(x_btd),
        layout.cos_btk,
        layout.sin_btk,
        c_bsr,
        k_pe_bsk,
        layout.write_bt,
        layout.mask_bts,
    )
    x_btd = x_btd + out_btd
    h_btd = block.ffn_norm(x_btd)
    y_btd = block.ffn(h_btd)[0] if block.kind == "moe" else block.ffn(h_btd)
    return x_btd + y_btd, c_bsr, k_pe_bsk


def forward_with_cache(
    model: DeepSeek,
    tokens_bt: jax.Array,
    cache: LatentCache,
    chunk_lengths_b: jax.Array | None = None,
    *,
    return_hidden: bool = False,
):
    """Logits [B, T, V] (fp32) for a right-padded chunk of new tokens, and the updated cache.

    `chunk_lengths_b` counts the real tokens of each row (default: all T). Main layers only; MTP
    modules run separately (`mtp_with_cache`). With `return_hidden`, returns (logits, cache,
    hidden [B, T, D]), the last hidden state before the final norm that MTP module 1 consumes.
    """
    cfg = model.cfg
    b, t = tokens_bt.shape
    if chunk_lengths_b is None:
        chunk_lengths_b = jnp.full((b,), t, jnp.int32)
    layout = chunk_layout(cfg, cache, t, chunk_lengths_b)

    def layer(graphdef, x_btd, xs):
        layer_state, c_bsr, k_pe_bsk = xs
        x_btd, c_bsr, k_pe_bsk = cached_block(
            nnx.merge(graphdef, layer_state), x_btd, layout, c_bsr, k_pe_bsk
        )
        return x_btd, (c_bsr, k_pe_bsk)

    x_btd = model.embed(tokens_bt)
    c_lbsr, k_pe_lbsk = cache.c_lbsr, cache.k_pe_lbsk
    first = 0  # index of the run's first layer in the whole model (the cache's layer axis)
    for kind, start, count in layer_runs(cfg.layer_kinds[: cfg.num_layers]):
        graphdef, state = nnx.split(model.moe_layers if kind == "moe" else model.dense_layers)
        state = jax.tree.map(lambda a, start=start, count=count: a[start : start + count], state)
        with jax.named_scope(f"{kind}_layers_{start}"):
            x_btd, (c_run, k_pe_run) = jax.lax.scan(
                functools.partial(layer, graphdef),
                x_btd,
                (state, c_lbsr[first : first + count], k_pe_lbsk[first : first + count]),
            )
        c_lbsr = jax.lax.dynamic_update_slice_in_dim(c_lbsr, c_run, first, axis=0)
        k_pe_lbsk = jax.lax.dynamic_update_slice_in_dim(k_pe_lbsk, k_pe_run, first, axis=0)
        first += count
    cache = LatentCache(c_lbsr=c_lbsr, k_pe_lbsk=k_pe_lbsk, lengths_b=layout.lengths_b)
    if return_hidden:
        return model.head(x_btd), cache, x_btd
    return model.head(x_btd), cache


def mtp_with_cache(
    model: DeepSeek,
    h_btd: jax.Array,
    next_tokens_bt: jax.Array,
    cache: LatentCache,
    chunk_lengths_b: jax.Array | None = None,
    depth: int = 1,
) -> tuple[jax.Array, jax.Array, LatentCache]:
    """MTP module `depth` (SPEC §4) over a right-padded chunk against its own one-layer cache.

    At chunk position i (cache position lengths_b + i) it combines h_btd, the previous hidden
    state there (the main model's pre-norm hidden for depth 1), with the embedding of
    next_tokens_bt, which must be t_{i+depth}; its logits predict t_{i+depth+1}. Returns
    (h^depth [B,T,D] before the head norm, logits [B,T,V] fp32, updated cache).
    """
    b, t = next_tokens_bt.shape
    if chunk_lengths_b is None:
        chunk_lengths_b = jnp.full((b,), t, jnp.int32)
    layout = chunk_layout(model.cfg, cache, t, chunk_lengths_b)
    graphdef, state = nnx.split(model.mtp)
    module = nnx.merge(graphdef, jax.tree.map(lambda a: a[depth - 1], state))
    x_btd = module.block_input(h_btd, model.embed(next_tokens_bt))
    h_btd, c_bsr, k_pe_bsk = cached_block(
        module.block, x_btd, layout, cache.c_lbsr[0], cache.k_pe_lbsk[0]
    )
    cache = LatentCache(c_lbsr=c_bsr[None], k_pe_lbsk=k_pe_bsk[None], lengths_b=layout.lengths_b)
    return h_btd, model.head(module.head_norm(h_btd), normed=True), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def cached_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_bt: jax.Array,
    cache: LatentCache,
    chunk_lengths_b: jax.Array | None = None,
) -> tuple[jax.Array, LatentCache]:
    """Jitted `forward_with_cache` over (graphdef, state); the cache is donated and updated
    in place. One compilation per chunk shape: typically one for prefill, one for decode."""
    return forward_with_cache(nnx.merge(graphdef, state), tokens_bt, cache, chunk_lengths_b)
