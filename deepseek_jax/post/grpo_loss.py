"""The GRPO objective (SPEC §8): group-normalized advantages, clipped ratio, KL to a reference.

Per completion token t of completion i (mask m_it = 1), with ρ = exp(log π_θ − log π_old):
    ℓ_it = −[min(ρ·Â_i, clip(ρ, 1 − ε_low, 1 + ε_high)·Â_i) − β·KL_it]
and the loss aggregates ℓ over tokens one of three ways:
    seq_mean_token_mean (DeepSeekMath / R1): mean over completions of Σ_t ℓ·m / Σ_t m
    token_mean (DAPO):                       Σ_it ℓ·m / Σ_it m
    seq_mean_token_sum (Dr. GRPO):           Σ_it ℓ·m / (completions · constant_normalizer)
Completions without any loss token (padding groups) are left out of the sequence means.
KL estimators of KL(π_θ‖π_ref) from samples of π_θ, with x = log π_ref − log π_θ per token:
    k1 = −x,  k2 = x²/2,  k3 = eˣ − x − 1  (k3 is the paper's choice: unbiased and ≥ 0).
Everything is fp32 and a pure function of arrays, so the tests can compare it with NumPy.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AdvantageNorm = Literal["group", "none", "batch"]
Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum"]
KLEstimator = Literal["k1", "k2", "k3"]


def group_advantages(
    rewards_b: jax.Array, group_size: int, norm: AdvantageNorm = "group", eps: float = 1e-4
) -> jax.Array:
    """Â_i = r_i − mean of its group, divided by the group's std ("group"), by nothing ("none",
    Dr. GRPO) or by the std of all rewards in the batch ("batch"). Rows are grouped in
    consecutive runs of `group_size`; stds are population stds (ddof 0)."""
    r_gn = rewards_b.astype(jnp.float32).reshape(-1, group_size)
    centered_gn = r_gn - r_gn.mean(axis=1, keepdims=True)
    if norm == "group":
        centered_gn = centered_gn / (r_gn.std(axis=1, keepdims=True) + eps)
    elif norm == "batch":
        centered_gn = centered_gn / (r_gn.std() + eps)
    elif norm != "none":
        raise ValueError(f"advantage norm {norm!r} is not one of group, none, batch")
    return centered_gn.reshape(-1)


def kl_estimate(logp_bt: jax.Array, ref_logp_bt: jax.Array, estimator: KLEstimator) -> jax.Array:
    """Per-token estimate of KL(π_θ‖π_ref) (k1, k2 or k3, see the module docstring)."""
    x_bt = ref_logp_bt - logp_bt
    if estimator == "k1":
        return -x_bt
    if estimator == "k2":
        return 0.5 * jnp.square(x_bt)
    if estimator == "k3":
        return jnp.exp(x_bt) - x_bt - 1.0
    raise ValueError(f"KL estimator {estimator!r} is not one of k1, k2, k3")


def aggregate(
    loss_bt: jax.Array, mask_bt: jax.Array, mode: Aggregation, normalizer: float
) -> jax.Array:
    """Masked reduction of per-token values to a scalar by one of the aggregation modes."""
    mask_bt = mask_bt.astype(jnp.float32)
    tokens_b = mask_bt.sum(-1)
    sums_b = (loss_bt * mask_bt).sum(-1)
    if mode == "token_mean":
        return sums_b.sum() / jnp.maximum(tokens_b.sum(), 1.0)
    n_seqs = jnp.maximum((tokens_b > 0).sum(), 1)
    if mode == "seq_mean_token_mean":
        return (sums_b / jnp.maximum(tokens_b, 1.0)).sum() / n_seqs
    if mode == "seq_mean_token_sum":
        return sums_b.sum() / (n_seqs * normalizer)
    raise ValueError(f"aggregation {mode!r} is not one of {Aggregation.__args__}")


def grpo_loss(
    logp_bt: jax.Array,
    old_logp_bt: jax.Array,
    advantages_b: jax.Array,
    mask_bt: jax.Array,
    ref_logp_bt: jax.Array | None = None,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    aggregation: Aggregation = "seq_mean_token_mean",
    normalizer: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss to minimize, metrics) from per-token log-probs of the completion tokens.

    `logp_bt` carries the gradient; `old_logp_bt` (the sampling policy) and `ref_logp_bt` are
    treated as constants. β = 0 needs no reference. Metrics: token-mean KL, the fractions of
    tokens whose ratio is clipped from below (Â < 0, ρ < 1 − ε_low) and above (Â > 0,
    ρ > 1 + ε_high), and the mean ratio.
    """
    mask_bt = mask_bt.astype(jnp.float32)
    old_logp_bt = jax.lax.stop_gradient(old_logp_bt)
    adv_b1 = advantages_b.astype(jnp.float32)[:, None]
    ratio_bt = jnp.exp(logp_bt - old_logp_bt)
    unclipped_bt = ratio_bt * adv_b1
    clipped_bt = jnp.clip(ratio_bt, 1.0 - eps_low, 1.0 + eps_high) * adv_b1
    per_token_bt = -jnp.minimum(unclipped_bt, clipped_bt)
    n_tokens = jnp.maximum(mask_bt.sum(), 1.0)
    metrics = {
        "clip_frac_low": (((ratio_bt < 1.0 - eps_low) & (adv_b1 < 0)) * mask_bt).sum() / n_tokens,
        "clip_frac_high": (((ratio_bt > 1.0 + eps_high) & (adv_b1 > 0)) * mask_bt).sum() / n_tokens,
        "ratio_mean": (ratio_bt * mask_bt).sum() / n_tokens,
    }
    if beta > 0:
        if ref_logp_bt is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl_bt = kl_estimate(logp_bt, jax.lax.stop_gradient(ref_logp_bt), kl_estimator)
        per_token_bt = per_token_bt + beta * kl_bt
        metrics["kl"] = (kl_bt * mask_bt).sum() / n_tokens
    loss = aggregate(per_token_bt, mask_bt, aggregation, normalizer)
    return loss, metrics
