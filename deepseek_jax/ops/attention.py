"""Causal self-attention behind one function, `attention`, with the kernel picked by
`runtime.attention`. Every option computes softmax(scale·q·kᵀ + mask)·v per head, the mask
being causal and, with segment ids, block-diagonal over packed documents:

- xla: one fp32 [B, H, T, S] score matrix, masked, softmax in fp32. The reference.
- dpa_xla / dpa_cudnn: `jax.nn.dot_product_attention(implementation="xla" / "cudnn")`. Its
  value must have the key's head dim, so MLA's v (d_v 128) is zero-padded to q/k's 192 and the
  output sliced back: the extra columns are p·0. cudnn needs a CUDA GPU.
- splash: TPU Pallas splash attention (causal mask, segment ids), one kernel per local batch
  row under `shard_map` when a mesh is present. Runs anywhere in Pallas interpret mode (tests).
- causal_blocks: the xla computation run per block of `attention_chunk_size` queries, each
  against only the keys up to its own end (its causal prefix), unrolled, with a hand-written
  backward (FlashAttention's, on the saved blocks). With n blocks it computes (n+1)/2n of the
  [T, S] scores (5/8 at n = 4); the saving is the causal half that xla masks after computing
  it. For short sequences on a CPU: the score blocks together are as large as xla's masked
  matrix, minus the skipped part, and each takes two passes forward and one backward.
- chunked: pure XLA online softmax over blocks of `attention_chunk_size` queries and keys,
  with its own backward (FlashAttention-2's recurrences), so neither pass ever holds more than
  one [B, H, c, c] block of scores; key blocks entirely in a query block's future are skipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.ops import at_pallas_precision
from deepseek_jax.runtime import Runtime

_MASKED = float(jnp.finfo(jnp.float32).min)


def attention_mask(t: int, s: int, segment_ids_bt: jax.Array | None, batch: int) -> jax.Array:
    """[B, 1, T, S] boolean: causal, and within one packed document when segment ids are given."""
    causal_ts = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
    mask_bts = jnp.broadcast_to(causal_ts, (batch, t, s))
    if segment_ids_bt is not None:
        mask_bts = mask_bts & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return mask_bts[:, None]


def attention(
    q_bthk: jax.Array,
    k_bshk: jax.Array,
    v_bshk: jax.Array,
    *,
    segment_ids_bt: jax.Array | None,
    scale: float,
    rt: Runtime,
    interpret: bool | None = None,
) -> jax.Array:
    """softmax(scale·q·kᵀ + causal/segment mask)·v per head: [B, T, H, d_v] in v's dtype.

    q and k share their last dim (MLA: d_n + d_r = 192), v may differ (d_v = 128). `scale`
    already holds YaRN's mscale² (SPEC §1). T == S (the training form; decoding has its own).
    `interpret` runs the splash kernel in Pallas interpret mode (default: off on TPU only).
    """
    kind = rt.cfg.attention
    t, s = q_bthk.shape[1], k_bshk.shape[1]
    if t != s:
        raise ValueError(f"self-attention needs as many queries as keys, got T={t}, S={s}")
    if kind == "xla":
        return _xla(q_bthk, k_bshk, v_bshk, segment_ids_bt, scale)
    if kind in ("dpa_xla", "dpa_cudnn"):
        impl = kind.removeprefix("dpa_")
        if impl == "cudnn" and rt.platform != "gpu":
            raise ValueError(
                "runtime.attention=dpa_cudnn needs a CUDA GPU (cuDNN flash attention); use "
                "runtime.attention=dpa_xla, chunked or splash (TPU) here"
            )
        return _dpa(q_bthk, k_bshk, v_bshk, segment_ids_bt, scale, impl)
    if kind == "causal_blocks":
        return _causal_blocks(
            q_bthk, k_bshk, v_bshk, segment_ids_bt, scale, rt.cfg.attention_chunk_size
        )
    if kind == "chunked":
        return chunked_attention(
            q_bthk, k_bshk, v_bshk, segment_ids_bt, scale=scale, chunk=rt.cfg.attention_chunk_size
        )
    if kind == "splash":
        if interpret is None:
            interpret = rt.platform != "tpu"
        return _splash(q_bthk, k_bshk, v_bshk, segment_ids_bt, scale, rt, interpret)
    raise ValueError(f"runtime.attention={kind!r} is not a known kernel")


# ---------------------------------------------------------------------------------------------
# xla (reference) and jax.nn.dot_product_attention


def _xla(q_bthk, k_bshk, v_bshk, segment_ids_bt, scale):
    b, t = q_bthk.shape[:2]
    # The scale goes on q ([B,T,H,K]) rather than on the [B,H,T,S] scores, and the score matmul
    # writes fp32 directly: one pass less over the largest tensor of the layer.
    q_bthk = q_bthk * jnp.asarray(scale, q_bthk.dtype)
    mask_b1ts = attention_mask(t, k_bshk.shape[1], segment_ids_bt, b)
    scores_bhts = jnp.einsum("bthk,bshk->bhts", q_bthk, k_bshk, preferred_element_type=jnp.float32)
    scores_bhts = jnp.where(mask_b1ts, scores_bhts, _MASKED)
    probs_bhts = jax.nn.softmax(scores_bhts, axis=-1).astype(v_bshk.dtype)
    return jnp.einsum("bhts,bshk->bthk", probs_bhts, v_bshk)


def _block_bounds(t: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) of each query block; queries start..end-1 see keys 0..end-1 at most."""
    return [(a, min(a + chunk, t)) for a in range(0, t, chunk)]


def _bhtk(x_bthk):
    return jnp.transpose(x_bthk, (0, 2, 1, 3))


def _over_queries(a_bhqs: jax.Array, b_bhqk: jax.Array) -> jax.Array:
    """a_bhqsᵀ · b_bhqk per (batch, head), fp32: the products of dK and dV.

    The contraction runs over the query axis, which leads in both operands. Written over two
    axes (q = 2 × q/2) when q is even: XLA:CPU runs a bf16 dot contracting one leading axis as
    an fp32 dot on converted operands, and two such axes on its bf16 kernel (ops/matmul.py,
    ops/gmm_blocked.py). One layer's forward + backward on the issue-12 shapes, bf16: 15.4 ->
    12.2 ms. Same products in any case; fp32 operands keep one axis (there the split only adds
    a transposing copy: whole fp32 step 0.553 -> 0.561 s).
    """
    b, h, q, s = a_bhqs.shape
    if q % 2 or a_bhqs.dtype == jnp.float32:
        return jnp.einsum("bhqs,bhqk->bhsk", a_bhqs, b_bhqk, preferred_element_type=jnp.float32)
    a = a_bhqs.reshape(b, h, 2, q // 2, s)
    bb = b_bhqk.reshape(b, h, 2, q // 2, b_bhqk.shape[-1])
    return jnp.einsum("bhaqs,bhaqk->bhsk", a, bb, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _causal_blocks(q_bthk, k_bshk, v_bshk, segment_ids_bt, scale, chunk):
    """softmax(q·kᵀ)·v per block of `chunk` queries over its causal key prefix; own backward."""
    return _blocks_fwd(q_bthk, k_bshk, v_bshk, segment_ids_bt, scale, chunk)[0]


def _blocks_fwd(q_bthk, k_bshk, v_bshk, segment_ids_bt, scale, chunk):
    """Per block: fp32 scores, unnormalized p = exp(s - rowmax), o = (p·v) / rowsum(p).

    Heads move ahead of time once ([B, H, T, K]) instead of around every block's matmuls.
    Saved for the backward: the blocks' p (5/8 of a [T, S] matrix at 4 blocks) in the compute
    dtype, as the p·v product takes it, their fp32 row sums and the fp32 output. Keeping p in
    bf16 rather than fp32 under bf16 compute took a layer's forward + backward from 22.4 to
    15.4 ms on the issue-12 shapes (2-core CPU); dS = p ⊙ (dP - δ) is rounded to bf16 right
    after, and the gradients' error against an fp32 computation moved from 5.47e-3 to 5.54e-3
    (relative norm, dq).
    """
    b, t = q_bthk.shape[:2]
    cdt = v_bshk.dtype
    q_bhtk = _bhtk(q_bthk * jnp.asarray(scale, q_bthk.dtype))
    mask_b1ts = attention_mask(t, t, segment_ids_bt, b)
    k_bhsk, v_bhsk = _bhtk(k_bshk), _bhtk(v_bshk)
    outs, probs, sums = [], [], []
    for a, e in _block_bounds(t, chunk):
        s_bhqs = jnp.einsum(
            "bhqk,bhsk->bhqs",
            q_bhtk[:, :, a:e],
            k_bhsk[:, :, :e],
            preferred_element_type=jnp.float32,
        )
        s_bhqs = jnp.where(mask_b1ts[:, :, a:e, :e], s_bhqs, _MASKED)
        # Every row holds its own diagonal, so the row max is finite and masked p are exactly 0.
        p_bhqs = jnp.exp(s_bhqs - s_bhqs.max(-1, keepdims=True))
        l_bhq1 = p_bhqs.sum(-1, keepdims=True)
        pv_bhqk = jnp.einsum(
            "bhqs,bhsk->bhqk",
            p_bhqs.astype(cdt),
            v_bhsk[:, :, :e],
            preferred_element_type=jnp.float32,
        )
        outs.append(pv_bhqk / l_bhq1)
        probs.append(p_bhqs.astype(cdt))
        sums.append(l_bhq1)
    o_bhtk = jnp.concatenate(outs, axis=2)
    out_bthk = _bhtk(o_bhtk).astype(cdt)
    return out_bthk, (q_bhtk, k_bhsk, v_bhsk, o_bhtk, probs, sums, segment_ids_bt)


def _blocks_bwd(scale, chunk, residuals, dout_bthk):
    """FlashAttention's backward on the saved blocks, with P = p / l folded into dO / l:

    dV += pᵀ·(dO/l);  dS = p ⊙ ((dO/l)·vᵀ - rowsum((dO/l) ⊙ O));  dQ = dS·k·scale;  dK += dSᵀ·q.
    """
    q_bhtk, k_bhsk, v_bhsk, o_bhtk, probs, sums, segment_ids_bt = residuals
    t, cdt = q_bhtk.shape[2], v_bhsk.dtype
    do_bhtk = _bhtk(dout_bthk).astype(jnp.float32)
    dq_blocks = []
    dk_bhsk = jnp.zeros(k_bhsk.shape, jnp.float32)
    dv_bhsk = jnp.zeros(v_bhsk.shape, jnp.float32)
    for (a, e), p_bhqs, l_bhq1 in zip(_block_bounds(t, chunk), probs, sums, strict=True):
        dol_bhqk = do_bhtk[:, :, a:e] / l_bhq1
        delta_bhq1 = jnp.sum(dol_bhqk * o_bhtk[:, :, a:e], axis=-1, keepdims=True)
        dv_bhsk = dv_bhsk.at[:, :, :e].add(_over_queries(p_bhqs, dol_bhqk.astype(cdt)))
        dp_bhqs = jnp.einsum(
            "bhqk,bhsk->bhqs",
            dol_bhqk.astype(cdt),
            v_bhsk[:, :, :e],
            preferred_element_type=jnp.float32,
        )
        ds_bhqs = (p_bhqs.astype(jnp.float32) * (dp_bhqs - delta_bhq1)).astype(cdt)
        dq_blocks.append(
            jnp.einsum(
                "bhqs,bhsk->bhqk", ds_bhqs, k_bhsk[:, :, :e], preferred_element_type=jnp.float32
            )
        )
        dk_bhsk = dk_bhsk.at[:, :, :e].add(_over_queries(ds_bhqs, q_bhtk[:, :, a:e]))
    # q was scaled before the scores, so dK already carries the scale; dQ takes it here.
    dq_bhtk = jnp.concatenate(dq_blocks, axis=2) * jnp.float32(scale)
    ids_ct = None
    if segment_ids_bt is not None:
        ids_ct = np.zeros(segment_ids_bt.shape, jax.dtypes.float0)
    return (
        _bhtk(dq_bhtk).astype(q_bhtk.dtype),
        _bhtk(dk_bhsk).astype(k_bhsk.dtype),
        _bhtk(dv_bhsk).astype(cdt),
        ids_ct,
    )


_causal_blocks.defvjp(_blocks_fwd, _blocks_bwd)


def _dpa(q_bthk, k_bshk, v_bshk, segment_ids_bt, scale, implementation):
    d_qk, d_v = q_bthk.shape[-1], v_bshk.shape[-1]
    if d_v > d_qk:
        raise ValueError(f"value head dim {d_v} exceeds the query/key head dim {d_qk}")
    # The API wants v shaped like k: pad with zero columns, whose outputs p·0 are sliced away.
    v_pad = jnp.pad(v_bshk, ((0, 0), (0, 0), (0, 0), (0, d_qk - d_v)))
    mask = None
    if segment_ids_bt is not None:
        mask = (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]
    out = jax.nn.dot_product_attention(
        q_bthk,
        k_bshk,
        v_pad,
        mask=mask,
        scale=scale,
        is_causal=True,
        implementation=implementation,
    )
    return out[..., :d_v]


# ---------------------------------------------------------------------------------------------
# splash (TPU Pallas)


def _splash(q_bthk, k_bshk, v_bshk, segment_ids_bt, scale, rt, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    b, t, h, _ = q_bthk.shape
    if t % 128:
        raise ValueError(
            f"runtime.attention=splash needs a sequence length that is a multiple of 128, got "
            f"{t}; use runtime.attention=chunked or xla"
        )
    block = min(512, t)
    while t % block:
        block //= 2
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    sh = rt.sharding
    batch_axes = sh.mesh_axes("batch") if sh is not None else ()
    head_axes = sh.mesh_axes("heads") if sh is not None else ()
    local_h = h // int(np.prod([sh.mesh.shape[a] for a in head_axes] or [1])) if sh else h
    mask = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(local_h)])
    kernel = splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )

    def run(q_bthk, k_bshk, v_bshk, segment_ids_bt):
        # The kernel takes one batch row as [H, T, K] and no scale: fold the scale into q
        # (the kernel accumulates q·k in fp32).
        q_bhtk = (q_bthk.astype(jnp.float32) * scale).astype(q_bthk.dtype).transpose(0, 2, 1, 3)
        k_bhsk, v_bhsk = k_bshk.transpose(0, 2, 1, 3), v_bshk.transpose(0, 2, 1, 3)
        if segment_ids_bt is None:
            call = jax.vmap(kernel)
            args = (q_bhtk, k_bhsk, v_bhsk)
        else:
            call = jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=i))
            args = (q_bhtk, k_bhsk, v_bhsk, splash.SegmentIds(q=segment_ids_bt, kv=segment_ids_bt))
        out_bhtk = at_pallas_precision(call, q_bhtk.dtype)(*args)
        return out_bhtk.transpose(0, 2, 1, 3).astype(v_bshk.dtype)

    if sh is None or not (batch_axes or head_axes):
        return run(q_bthk, k_bshk, v_bshk, segment_ids_bt)
    # A Pallas call is not partitioned by XLA: run it per device on its rows and heads.
    P = jax.sharding.PartitionSpec
    qkv = P(batch_axes or None, None, head_axes or None, None)
    ids = P(batch_axes or None, None)
    body = jax.shard_map(
        run,
        mesh=sh.mesh,
        in_specs=(qkv, qkv, qkv, None if segment_ids_bt is None else ids),
        out_specs=qkv,
        check_vma=False,
    )
    return body(q_bthk, k_bshk, v_bshk, segment_ids_bt)


# ---------------------------------------------------------------------------------------------
# chunked: online softmax in blocks, custom backward


def chunked_attention(
    q_bthk: jax.Array,
    k_bshk: jax.Array,
    v_bshk: jax.Array,
    segment_ids_bt: jax.Array | None,
    *,
    scale: float,
    chunk: int,
) -> jax.Array:
    """Causal attention in blocks of `chunk` queries × `chunk` keys, memory O(T·c) not O(T²).

    T is padded up to a multiple of the block with keys no real query can see (they lie in
    every real query's future) and queries whose outputs are dropped.
    """
    b, t, h, _ = q_bthk.shape
    c = min(chunk, t)
    pad = -t % c
    if segment_ids_bt is None:
        segment_ids_bt = jnp.zeros((b, t), jnp.int32)
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q_bthk, k_bshk, v_bshk = (jnp.pad(x, widths) for x in (q_bthk, k_bshk, v_bshk))
        segment_ids_bt = jnp.pad(segment_ids_bt, ((0, 0), (0, pad)), constant_values=-1)
    out = _flash(q_bthk, k_bshk, v_bshk, segment_ids_bt.astype(jnp.int32), scale, c)
    return out[:, :t]


def _block(x, i, c):
    return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)


def _block_scores(q_bchk, k_bchk, ids_q_bc, ids_k_bc, i, j, c, scale):
    """Scaled fp32 scores [B, H, c, c] of query block i against key block j, and their mask."""
    s_bhqs = jnp.einsum(
        "bqhk,bshk->bhqs", q_bchk, k_bchk, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    pos_q, pos_k = i * c + jnp.arange(c), j * c + jnp.arange(c)
    causal_qs = pos_q[:, None] >= pos_k[None, :]
    same_bqs = ids_q_bc[:, :, None] == ids_k_bc[:, None, :]
    return s_bhqs, (causal_qs[None] & same_bqs)[:, None]


def _forward(q_bthk, k_bshk, v_bshk, ids_bt, scale, c):
    """(output [B,T,H,d_v] in v's dtype, logsumexp [B,H,T] fp32)."""
    b, t, h, _ = q_bthk.shape
    d_v = v_bshk.shape[-1]
    n = t // c

    def query_block(_, i):
        q_bchk, ids_q = _block(q_bthk, i, c), _block(ids_bt, i, c)

        def key_block(j, carry):
            m_bhq, l_bhq, acc_bhqk = carry
            k_bchk, v_bchk, ids_k = _block(k_bshk, j, c), _block(v_bshk, j, c), _block(ids_bt, j, c)
            s_bhqs, mask = _block_scores(q_bchk, k_bchk, ids_q, ids_k, i, j, c, scale)
            s_bhqs = jnp.where(mask, s_bhqs, _MASKED)
            m_new = jnp.maximum(m_bhq, s_bhqs.max(-1))
            p_bhqs = jnp.where(mask, jnp.exp(s_bhqs - m_new[..., None]), 0.0)
            alpha = jnp.exp(m_bhq - m_new)
            l_new = alpha * l_bhq + p_bhqs.sum(-1)
            pv = jnp.einsum(
                "bhqs,bshk->bhqk",
                p_bhqs.astype(v_bchk.dtype),
                v_bchk,
                preferred_element_type=jnp.float32,
            )
            return m_new, l_new, alpha[..., None] * acc_bhqk + pv

        init = (
            jnp.full((b, h, c), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, c), jnp.float32),
            jnp.zeros((b, h, c, d_v), jnp.float32),
        )
        # Key blocks after the query block are all in the future: never visited.
        m_bhq, l_bhq, acc_bhqk = jax.lax.fori_loop(0, i + 1, key_block, init)
        out_bqhk = (acc_bhqk / l_bhq[..., None]).transpose(0, 2, 1, 3)
        return None, (out_bqhk.astype(v_bshk.dtype), m_bhq + jnp.log(l_bhq))

    _, (out_nbqhk, lse_nbhq) = jax.lax.scan(query_block, None, jnp.arange(n))
    out_bthk = out_nbqhk.transpose(1, 0, 2, 3, 4).reshape(b, t, h, d_v)
    lse_bht = lse_nbhq.transpose(1, 2, 0, 3).reshape(b, h, t)
    return out_bthk, lse_bht


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_bthk, k_bshk, v_bshk, ids_bt, scale, c):
    return _forward(q_bthk, k_bshk, v_bshk, ids_bt, scale, c)[0]


def _flash_fwd(q_bthk, k_bshk, v_bshk, ids_bt, scale, c):
    out_bthk, lse_bht = _forward(q_bthk, k_bshk, v_bshk, ids_bt, scale, c)
    return out_bthk, (q_bthk, k_bshk, v_bshk, ids_bt, out_bthk, lse_bht)


def _flash_bwd(scale, c, residuals, dout_bthk):
    """FlashAttention-2's backward: p is rebuilt per block from the saved logsumexp, and
    dS = p ∘ (dP − rowsum(dO ∘ O)). Outer loop over key blocks (their dK, dV finish there),
    inner over the query blocks that can see them; dQ accumulates in one fp32 [B,T,H,K]."""
    q_bthk, k_bshk, v_bshk, ids_bt, out_bthk, lse_bht = residuals
    b, t, h, d_qk = q_bthk.shape
    d_v = v_bshk.shape[-1]
    n = t // c
    dout32 = dout_bthk.astype(jnp.float32)
    delta_bht = jnp.einsum("bthk,bthk->bht", dout32, out_bthk.astype(jnp.float32))
    sf = jnp.float32(scale)

    def key_block(dq_bthk, j):
        k_bchk, v_bchk, ids_k = _block(k_bshk, j, c), _block(v_bshk, j, c), _block(ids_bt, j, c)

        def query_block(i, carry):
            dq_bthk, dk_bchk, dv_bchk = carry
            q_bchk, ids_q = _block(q_bthk, i, c), _block(ids_bt, i, c)
            do_bchk = _block(dout32, i, c)
            lse_bhq = jax.lax.dynamic_slice_in_dim(lse_bht, i * c, c, axis=2)
            delta_bhq = jax.lax.dynamic_slice_in_dim(delta_bht, i * c, c, axis=2)
            s_bhqs, mask = _block_scores(q_bchk, k_bchk, ids_q, ids_k, i, j, c, scale)
            p_bhqs = jnp.where(mask, jnp.exp(s_bhqs - lse_bhq[..., None]), 0.0)
            dv_bchk = dv_bchk + jnp.einsum("bhqs,bqhk->bshk", p_bhqs, do_bchk)
            dp_bhqs = jnp.einsum(
                "bqhk,bshk->bhqs", do_bchk, v_bchk, preferred_element_type=jnp.float32
            )
            ds_bhqs = p_bhqs * (dp_bhqs - delta_bhq[..., None]) * sf
            dq_blk = jnp.einsum(
                "bhqs,bshk->bqhk", ds_bhqs, k_bchk, preferred_element_type=jnp.float32
            )
            dq_bthk = jax.lax.dynamic_update_slice_in_dim(
                dq_bthk, _block(dq_bthk, i, c) + dq_blk, i * c, axis=1
            )
            dk_bchk = dk_bchk + jnp.einsum(
                "bhqs,bqhk->bshk", ds_bhqs, q_bchk, preferred_element_type=jnp.float32
            )
            return dq_bthk, dk_bchk, dv_bchk

        init = (
            dq_bthk,
            jnp.zeros((b, c, h, d_qk), jnp.float32),
            jnp.zeros((b, c, h, d_v), jnp.float32),
        )
        # Only query blocks at or after the key block see it (causal).
        dq_bthk, dk_bchk, dv_bchk = jax.lax.fori_loop(j, n, query_block, init)
        return dq_bthk, (dk_bchk, dv_bchk)

    dq_bthk, (dk_nbchk, dv_nbchk) = jax.lax.scan(
        key_block, jnp.zeros((b, t, h, d_qk), jnp.float32), jnp.arange(n)
    )
    dk_bshk = dk_nbchk.transpose(1, 0, 2, 3, 4).reshape(b, t, h, d_qk)
    dv_bshk = dv_nbchk.transpose(1, 0, 2, 3, 4).reshape(b, t, h, d_v)
    return (
        dq_bthk.astype(q_bthk.dtype),
        dk_bshk.astype(k_bshk.dtype),
        dv_bshk.astype(v_bshk.dtype),
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)
