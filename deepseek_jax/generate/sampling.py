"""Token sampling from logits: greedy, temperature, top-k and nucleus (top-p) filtering.

Everything keeps static shapes (filtered-out tokens are masked with -inf), so `sample` is safe
to call under `jax.jit`; temperature, top_k and top_p are Python statics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits_bv: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits with everything outside the top-k / nucleus set set to -inf (fp32).

    top_k keeps the k largest logits (0 = off; ties at the k-th value are all kept). top_p keeps
    the smallest set of most-likely tokens whose probability reaches p, computed after top-k
    (renormalized); the most likely token is always kept.
    """
    logits_bv = logits_bv.astype(jnp.float32)
    neg_inf = jnp.float32(-jnp.inf)
    v = logits_bv.shape[-1]
    if 0 < top_k < v:
        kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][..., -1:]
        logits_bv = jnp.where(logits_bv >= kth_b1, logits_bv, neg_inf)
    if top_p < 1.0:
        order_bv = jnp.argsort(-logits_bv, axis=-1)
        sorted_bv = jnp.take_along_axis(logits_bv, order_bv, axis=-1)
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # mass strictly before each token
        keep_sorted_bv = before_bv < top_p
        keep_sorted_bv = keep_sorted_bv.at[..., 0].set(True)
        inverse_bv = jnp.argsort(order_bv, axis=-1)
        keep_bv = jnp.take_along_axis(keep_sorted_bv, inverse_bv, axis=-1)
        logits_bv = jnp.where(keep_bv, logits_bv, neg_inf)
    return logits_bv


def sample(
    logits_bv: jax.Array,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """One token per row (int32 [B]) from logits [B, V].

    temperature 0 is greedy (argmax; top_k/top_p are then irrelevant). Otherwise the logits are
    divided by the temperature, filtered by top_k and top_p (see `filter_logits`) and a token is
    drawn with `jax.random.categorical`.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits_bv = logits_bv.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = filter_logits(logits_bv / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def token_logps(logits_bv: jax.Array, tokens_b: jax.Array, temperature: float) -> jax.Array:
    """log p(token) [B] under the temperature-scaled softmax `sample` draws from (no top-k or
    top-p filtering: the distribution GRPO's ratio is taken over)."""
    scaled_bv = logits_bv.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
    logp_bv = jax.nn.log_softmax(scaled_bv, axis=-1)
    return jnp.take_along_axis(logp_bv, tokens_b[:, None], axis=-1)[:, 0]
