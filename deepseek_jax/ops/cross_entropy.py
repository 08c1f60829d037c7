"""Cross-entropy from hidden states and the output head, with the kernel picked by
`runtime.cross_entropy`:

- full: logits = h·W for every token at once ([N, V] fp32), then logsumexp and the target logit.
- chunked: tiles of `cross_entropy_chunk_size` tokens per device by
  `cross_entropy_vocab_chunk_size` vocabulary entries. The outer loop walks the vocabulary in
  chunks, the inner one the tokens; the forward keeps an online logsumexp and the target logit
  per token, and a hand-written backward recomputes each tile's logits from the saved logsumexp.
  Neither pass holds [N, V] logits. On a mesh the kernel runs under `shard_map` on each
  device's own rows: a vocabulary chunk of the head (stored split along D) is all-gathered in
  the compute dtype when it is used, and its fp32 gradient, summed over the device's tokens, is
  reduce-scattered back to the D slices before the next chunk. So no device holds a whole copy
  of the head or of its gradient at once: for DeepSeek-V3 those are 1.7 GiB (bf16) and 3.5 GiB
  (fp32) each.

Both return per-token (cross-entropy, logsumexp) [B, T] in fp32; `train/loss.py` masks and sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.runtime import Runtime

# The head's logical axes (as model/transformer.py names them): D, then the vocabulary.
HEAD_AXES = ("embed", "vocab")


def token_ce(logits_btv: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and logsumexp of given logits, in fp32."""
    logits_btv = logits_btv.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return lse_bt - target_logit_bt, lse_bt


def head_logits(normed_btd: jax.Array, head_DV: jax.Array, rt: Runtime) -> jax.Array:
    """fp32 logits of the shared head: compute-dtype operands, fp32 accumulation."""
    return jnp.einsum(
        "btd,dv->btv",
        normed_btd.astype(rt.compute_dtype),
        head_DV.astype(rt.compute_dtype),
        preferred_element_type=jnp.float32,
    )


def head_ce(
    normed_btd: jax.Array, head_DV: jax.Array, targets_bt: jax.Array, rt: Runtime
) -> tuple[jax.Array, jax.Array]:
    """Per-token (cross-entropy, logsumexp) [B, T] fp32 of the head over normed hidden states.

    `head_DV` is the stored (master) weight; the kernel is `rt.cfg.cross_entropy`.
    """
    if rt.cfg.cross_entropy == "full":
        return token_ce(head_logits(normed_btd, head_DV, rt), targets_bt)
    return _chunked(normed_btd, head_DV, targets_bt, rt)


def _chunked(normed_btd, head_DV, targets_bt, rt):
    """Run the tiled kernel on each device's own rows, under `shard_map` where the layout
    allows; otherwise on the whole arrays (one device, or left to XLA's partitioner)."""
    sh = rt.sharding
    b = normed_btd.shape[0]
    local = functools.partial(_tiles, rt=rt, gather_axes=())
    if sh is None or sh.mesh.size == 1:
        return local(normed_btd, head_DV, targets_bt)
    batch_axes = sh.mesh_axes("batch")
    d_entry, v_entry = tuple(sh.spec(HEAD_AXES)) + (None,) * (2 - len(sh.spec(HEAD_AXES)))
    embed_axes = () if d_entry is None else (d_entry,) if isinstance(d_entry, str) else d_entry
    if (
        v_entry is not None  # vocabulary split (tensor parallelism): the partitioner's job
        or not set(embed_axes) <= set(batch_axes)
        or b % sh.axis_size("batch")
    ):
        return local(normed_btd, head_DV, targets_bt)
    rows = P(batch_axes or None)
    return jax.shard_map(
        functools.partial(_tiles, rt=rt, gather_axes=embed_axes),
        mesh=sh.mesh,
        in_specs=(rows, P(embed_axes or None, None), rows),
        out_specs=(rows, rows),
        check_vma=False,
    )(normed_btd, head_DV, targets_bt)


def _tiles(normed_btd, head_DV, targets_bt, *, rt, gather_axes):
    """Per-token (CE, logsumexp) of one device's rows in [token chunk x vocabulary chunk] tiles.

    `head_DV` is this device's slice of the head along D (the whole head when `gather_axes` is
    empty); each vocabulary chunk is all-gathered over `gather_axes` in the compute dtype when
    it is used, and its gradient reduce-scattered back to the slice before the next chunk.
    """
    b, t, d_full = normed_btd.shape
    d, v = head_DV.shape
    c = max(1, min(t, rt.cfg.cross_entropy_chunk_size // b))
    pad = -t % c
    if pad:  # padded positions get target 0 and are sliced off below
        normed_btd = jnp.pad(normed_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    n = (t + pad) // c
    h_nbcd = normed_btd.reshape(b, n, c, d_full).swapaxes(0, 1)
    tgt_nbc = targets_bt.reshape(b, n, c).swapaxes(0, 1)
    nv = -(-v // min(v, rt.cfg.cross_entropy_vocab_chunk_size))
    vc = -(-v // nv)  # chunks of equal width; the last one's padded columns are masked
    w_jDv = jnp.pad(head_DV, ((0, 0), (0, nv * vc - v))).reshape(d, nv, vc).swapaxes(0, 1)
    # On a CPU the tile's logit gradient is written out once: left to itself XLA:CPU fuses its
    # computation into both of the backward's products, i.e. into two matmul kernels (issue-shape
    # step 0.489 -> 0.474 s, in-process A/B). Other backends decide for themselves.
    write_dl = rt.platform == "cpu"
    ce_nbc, lse_nbc = _tiled_ce(h_nbcd, w_jDv, tgt_nbc, v, rt.compute_dtype, gather_axes, write_dl)
    ce_bt = ce_nbc.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    lse_bt = lse_nbc.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    return ce_bt, lse_bt


def _tile_logits(h_bcd, w_Dv, j, v, cdt):
    """fp32 logits of vocabulary chunk j; columns past the vocabulary are -inf."""
    logits = jnp.einsum("bcd,dv->bcv", h_bcd.astype(cdt), w_Dv, preferred_element_type=jnp.float32)
    vc = w_Dv.shape[1]
    return jnp.where(j * vc + jnp.arange(vc) < v, logits, -jnp.inf)


def _gathered(w_Dv, cdt, gather_axes):
    """The whole chunk [D, vc] from each device's [D/P, vc], in the compute dtype.

    One all-gather per mesh axis, the last axis first, each along a new leading axis: the TPU
    compiler lowers a single gather over several mesh axes (V3: fsdp x expert, 256 chips) as an
    all-reduce of a zero-padded buffer, twice the bytes."""
    w_Dv = w_Dv.astype(cdt)
    if not gather_axes:
        return w_Dv
    for axis in reversed(gather_axes):
        w_Dv = jax.lax.all_gather(w_Dv, axis, axis=0)
    return w_Dv.reshape(-1, w_Dv.shape[-1])


def _scattered(dw_Dv, cdt, gather_axes):
    """Sum [D, vc] over the devices of `gather_axes` and keep this device's D slice, fp32.

    The sum travels in the compute dtype, as XLA's partitioner reduces every other gathered
    weight's gradient; the result is fp32 like the head."""
    if not gather_axes:
        return dw_Dv
    dw_Dv = jax.lax.psum_scatter(dw_Dv.astype(cdt), gather_axes, scatter_dimension=0, tiled=True)
    return dw_Dv.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _tiled_ce(h_nbcd, w_jDv, tgt_nbc, v, cdt, gather_axes, write_dl):
    return _tiled_ce_fwd(h_nbcd, w_jDv, tgt_nbc, v, cdt, gather_axes, write_dl)[0]


def _tiled_ce_fwd(h_nbcd, w_jDv, tgt_nbc, v, cdt, gather_axes, write_dl):
    vc = w_jDv.shape[2]

    def vocab_chunk(stats, xs):
        w_Dv, j = xs
        w_Dv = _gathered(w_Dv, cdt, gather_axes)

        def token_chunk(_, xs):  # online logsumexp over vocabulary chunks
            h_bcd, tgt_bc, m_bc, s_bc, tl_bc = xs
            logits = _tile_logits(h_bcd, w_Dv, j, v, cdt)
            m_new = jnp.maximum(m_bc, logits.max(-1))
            s_bc = s_bc * jnp.exp(m_bc - m_new) + jnp.exp(logits - m_new[..., None]).sum(-1)
            idx = tgt_bc - j * vc
            hit = (idx >= 0) & (idx < vc)
            picked = jnp.take_along_axis(logits, jnp.clip(idx, 0, vc - 1)[..., None], -1)
            return None, (m_new, s_bc, tl_bc + jnp.where(hit, picked[..., 0], 0.0))

        _, stats = jax.lax.scan(token_chunk, None, (h_nbcd, tgt_nbc, *stats))
        return stats, None

    zeros = jnp.zeros(tgt_nbc.shape, jnp.float32)
    init = (jnp.full(tgt_nbc.shape, -jnp.inf, jnp.float32), zeros, zeros)
    (m, s, tl), _ = jax.lax.scan(vocab_chunk, init, (w_jDv, jnp.arange(w_jDv.shape[0])))
    lse = m + jnp.log(s)
    return (lse - tl, lse), (h_nbcd, w_jDv, tgt_nbc, lse)


def _tiled_ce_bwd(v, cdt, gather_axes, write_dl, residuals, cts):
    h_nbcd, w_jDv, tgt_nbc, lse_nbc = residuals
    g_ce, g_lse = cts
    g_sum = g_ce + g_lse  # d(ce)/d(logits) = softmax - onehot, d(lse)/d(logits) = softmax
    d_full, vc = h_nbcd.shape[-1], w_jDv.shape[2]

    def vocab_chunk(dh_nbcd, xs):
        w_Dv, j = xs
        w_Dv = _gathered(w_Dv, cdt, gather_axes)

        def token_chunk(dw_Dv, xs):
            h_bcd, tgt_bc, lse_bc, gs_bc, gce_bc = xs
            p = jnp.exp(_tile_logits(h_bcd, w_Dv, j, v, cdt) - lse_bc[..., None])
            onehot = jnp.arange(vc) == (tgt_bc - j * vc)[..., None]
            dl = (gs_bc[..., None] * p - jnp.where(onehot, gce_bc[..., None], 0.0)).astype(cdt)
            if write_dl:  # see `_tiles`
                dl = jax.lax.optimization_barrier(dl)
            dh_bcd = jnp.einsum("bcv,dv->bcd", dl, w_Dv, preferred_element_type=jnp.float32)
            dw_Dv += jnp.einsum(
                "bcd,bcv->dv", h_bcd.astype(cdt), dl, preferred_element_type=jnp.float32
            )
            return dw_Dv, dh_bcd

        dw_Dv, dh = jax.lax.scan(
            token_chunk,
            jnp.zeros((d_full, vc), jnp.float32),
            (h_nbcd, tgt_nbc, lse_nbc, g_sum, g_ce),
        )
        # This chunk's gradient goes back to the D slices now, not at the end.
        return dh_nbcd + dh, _scattered(dw_Dv, cdt, gather_axes)

    dh, dw_jDv = jax.lax.scan(
        vocab_chunk,
        jnp.zeros(h_nbcd.shape, jnp.float32),
        (w_jDv, jnp.arange(w_jDv.shape[0])),
    )
    return dh.astype(h_nbcd.dtype), dw_jDv.astype(w_jDv.dtype), None


_tiled_ce.defvjp(_tiled_ce_fwd, _tiled_ce_bwd)
