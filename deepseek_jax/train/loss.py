"""Loss terms: next-token CE, MTP CE per depth, z-loss (SPEC §4, §7).

The cross-entropy itself comes from `deepseek_jax.ops.cross_entropy`: from the model's logits
when it returned them, or from its normed hidden states and the head weight, chunk by chunk
(`runtime.cross_entropy=chunked`), when it ran with `forward(..., logits=False)`.

All terms come back as sums over tokens so that gradient accumulation over micro-batches can
divide by the token count of the whole batch and reproduce the full-batch step exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.ops.cross_entropy import head_ce, token_ce

__all__ = ["loss_sums", "mtp_targets", "shift_left", "token_ce"]


def shift_left(x_bt: jax.Array, k: int, fill) -> jax.Array:
    if k == 0:
        return x_bt
    pad = jnp.full((x_bt.shape[0], k), fill, x_bt.dtype)
    return jnp.concatenate([x_bt[:, k:], pad], axis=1)


def mtp_targets(
    targets_bt: jax.Array, mask_bt: jax.Array, segment_ids_bt: jax.Array | None, k: int
) -> tuple[jax.Array, jax.Array]:
    """Targets and mask for MTP depth k: position i predicts token i+k+1 = targets[i+k].

    Positions whose target lies past the sequence end or in another packed document are masked.
    """
    tgt = shift_left(targets_bt, k, 0)
    mask = shift_left(mask_bt, k, 0)
    if segment_ids_bt is not None:
        mask = mask * (shift_left(segment_ids_bt, k, -1) == segment_ids_bt)
    return tgt, mask


def loss_sums(out, batch: dict, mtp_depth: int, model=None) -> dict[str, jax.Array]:
    """Masked sums: lm, mtp [depth], z (logsumexp²), and the token count.

    `out` is a ModelOutput; without logits (`forward(..., logits=False)`) the head runs here
    from `out.normed` / `out.mtp_normed` with `model`'s head weight and runtime.
    """
    if out.logits is None:
        if model is None:
            raise ValueError("loss_sums needs the model when the output carries no logits")

        def ce_of(normed_btd, targets_bt):
            return head_ce(normed_btd, model.lm_head_DV[...], targets_bt, model.rt)

        main, per_depth = out.normed, out.mtp_normed
    else:
        ce_of = token_ce
        main, per_depth = out.logits, out.mtp_logits
    mask = batch["loss_mask"].astype(jnp.float32)
    ce, lse = ce_of(main, batch["targets"])
    sums = {
        "lm": jnp.sum(ce * mask),
        "z": jnp.sum(jnp.square(lse) * mask),
        "tokens": jnp.sum(mask),
    }
    mtp = []
    for k in range(1, mtp_depth + 1):
        tgt, m = mtp_targets(batch["targets"], mask, batch.get("segment_ids"), k)
        ce_k, _ = ce_of(per_depth[k - 1], tgt)
        mtp.append(jnp.sum(ce_k * m))
    sums["mtp"] = jnp.stack(mtp) if mtp else jnp.zeros((0,), jnp.float32)
    return sums
