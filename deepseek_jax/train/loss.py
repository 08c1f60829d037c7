"""Loss terms: next-token CE, MTP CE per depth, z-loss (SPEC §4, §7).

All terms come back as sums over tokens so that gradient accumulation over micro-batches can
divide by the token count of the whole batch and reproduce the full-batch step exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_ce(logits_btv: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and logsumexp, in fp32."""
    logits_btv = logits_btv.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return lse_bt - target_logit_bt, lse_bt


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


def loss_sums(out, batch: dict, mtp_depth: int) -> dict[str, jax.Array]:
    """Masked sums: lm, mtp [depth], z (logsumexp²), and the token count."""
    mask = batch["loss_mask"].astype(jnp.float32)
    ce, lse = token_ce(out.logits, batch["targets"])
    sums = {
        "lm": jnp.sum(ce * mask),
        "z": jnp.sum(jnp.square(lse) * mask),
        "tokens": jnp.sum(mask),
    }
    mtp = []
    for k in range(1, mtp_depth + 1):
        tgt, m = mtp_targets(batch["targets"], mask, batch.get("segment_ids"), k)
        ce_k, _ = token_ce(out.mtp_logits[k - 1], tgt)
        mtp.append(jnp.sum(ce_k * m))
    sums["mtp"] = jnp.stack(mtp) if mtp else jnp.zeros((0,), jnp.float32)
    return sums
