"""Cross-entropy from hidden states and the output head, with the kernel picked by
`runtime.cross_entropy`:

- full: logits = h·W for every token at once ([N, V] fp32), then logsumexp and the target logit.
- chunked: the same per chunk of tokens under `jax.checkpoint` inside a `lax.scan`, so the
  forward keeps one chunk's [c, V] logits at a time and the backward recomputes them chunk by
  chunk: [N, V] fp32 logits never exist, in either pass. The head weight enters the scan in its
  stored (fp32) dtype and is cast per chunk, so its gradient accumulates across chunks in fp32.

Both return per-token (cross-entropy, logsumexp) [B, T] in fp32; `train/loss.py` masks and sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.runtime import Runtime


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


def chunk_length(b: int, t: int, rt: Runtime) -> int:
    """Positions per chunk: about `cross_entropy_chunk_size` tokens on each device (its rows of
    the batch times the positions), which is what bounds the [tokens, V] fp32 block."""
    rows = b
    if rt.sharding is not None:
        rows = max(1, b // rt.sharding.axis_size("batch"))
    return max(1, min(t, rt.cfg.cross_entropy_chunk_size // rows))


def _chunked(normed_btd, head_DV, targets_bt, rt):
    b, t, d = normed_btd.shape
    c = chunk_length(b, t, rt)
    pad = -t % c
    if pad:  # padded positions get target 0 and are sliced off below
        normed_btd = jnp.pad(normed_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    n = (t + pad) // c
    # Chunks along time, batch kept as is: the batch axis stays split over the mesh.
    h_nbcd = normed_btd.reshape(b, n, c, d).swapaxes(0, 1)
    tgt_nbc = targets_bt.reshape(b, n, c).swapaxes(0, 1)

    @jax.checkpoint  # the backward recomputes the chunk's logits instead of saving them
    def chunk(h_bcd, tgt_bc):
        return token_ce(head_logits(h_bcd, head_DV, rt), tgt_bc)

    _, (ce_nbc, lse_nbc) = jax.lax.scan(lambda _, x: (None, chunk(*x)), None, (h_nbcd, tgt_nbc))
    ce_bt = ce_nbc.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    lse_bt = lse_nbc.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    return ce_bt, lse_bt
