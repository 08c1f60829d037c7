"""Multi-head Latent Attention (SPEC §1), naive (training) form.

Keys and values are rebuilt from a normalized latent c of width R = kv_lora_rank; a separate
d_r-wide RoPE key k_pe is shared by all heads. The absorbed decode form lives with generation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.layers import RMSNorm, cast, param
from deepseek_jax.model.rope import apply_rope


def attention_mask(t: int, s: int, segment_ids_bt: jax.Array | None, batch: int) -> jax.Array:
    """[B, 1, T, S] boolean: causal, and within one packed document when segment ids are given."""
    causal_ts = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
    mask_bts = jnp.broadcast_to(causal_ts, (batch, t, s))
    if segment_ids_bt is not None:
        mask_bts = mask_bts & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return mask_bts[:, None]


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, m = cfg.hidden_size, cfg.num_heads, cfg.mla
        qk = m.qk_head_dim
        if m.q_lora_rank is None:
            self.wq_DHK = param(rngs, (d, h, qk), ("embed", "heads", "head_dim"), cfg)
        else:
            # The down-projections shard along D; their low-rank side stays whole (None), so the
            # up-projections can shard along the rank without two axes meeting on one mesh axis.
            self.wq_a_DQ = param(rngs, (d, m.q_lora_rank), ("embed", None), cfg)
            self.q_norm = RMSNorm(m.q_lora_rank, cfg, axis="q_lora")
            self.wq_b_QHK = param(
                rngs, (m.q_lora_rank, h, qk), ("q_lora", "heads", "head_dim"), cfg
            )
        # kv_a_proj_with_mqa split in two: the latent rows and the shared RoPE-key rows.
        self.wkv_a_DR = param(rngs, (d, m.kv_lora_rank), ("embed", None), cfg)
        self.wk_rope_DK = param(rngs, (d, m.qk_rope_head_dim), ("embed", "head_dim"), cfg)
        self.kv_norm = RMSNorm(m.kv_lora_rank, cfg, axis="kv_lora")
        # kv_b_proj split per head into W_UK (keys) and W_UV (values).
        self.wk_b_RHK = param(
            rngs, (m.kv_lora_rank, h, m.qk_nope_head_dim), ("kv_lora", "heads", "head_dim"), cfg
        )
        self.wv_b_RHK = param(
            rngs, (m.kv_lora_rank, h, m.v_head_dim), ("kv_lora", "heads", "head_dim"), cfg
        )
        self.wo_HKD = param(rngs, (h, m.v_head_dim, d), ("heads", "head_dim", "embed"), cfg)

    def queries(self, x_btd: jax.Array) -> jax.Array:
        """q [B, T, H, d_n + d_r], before RoPE."""
        if self.cfg.mla.q_lora_rank is None:
            return jnp.einsum("btd,dhk->bthk", x_btd, cast(self.wq_DHK, self.cfg))
        cq_btq = self.q_norm(jnp.einsum("btd,dq->btq", x_btd, cast(self.wq_a_DQ, self.cfg)))
        return jnp.einsum("btq,qhk->bthk", cq_btq, cast(self.wq_b_QHK, self.cfg))

    def latents(self, x_btd: jax.Array, cos_btk, sin_btk) -> tuple[jax.Array, jax.Array]:
        """Per-token state a cache holds: normed latent [B,T,R] and RoPE'd key [B,T,d_r]."""
        c_btr = self.kv_norm(jnp.einsum("btd,dr->btr", x_btd, cast(self.wkv_a_DR, self.cfg)))
        k_pe_btk = jnp.einsum("btd,dk->btk", x_btd, cast(self.wk_rope_DK, self.cfg))
        return c_btr, apply_rope(k_pe_btk, cos_btk, sin_btk)

    def __call__(
        self,
        x_btd: jax.Array,
        cos_btk: jax.Array,
        sin_btk: jax.Array,
        segment_ids_bt: jax.Array | None = None,
    ) -> jax.Array:
        cfg, d_n = self.cfg, self.cfg.mla.qk_nope_head_dim
        b, t, _ = x_btd.shape
        q_bthk = self.queries(x_btd)
        q_nope_bthk, q_pe_bthk = q_bthk[..., :d_n], apply_rope(q_bthk[..., d_n:], cos_btk, sin_btk)
        c_bsr, k_pe_bsk = self.latents(x_btd, cos_btk, sin_btk)
        k_nope_bshk = jnp.einsum("bsr,rhk->bshk", c_bsr, cast(self.wk_b_RHK, cfg))
        v_bshk = jnp.einsum("bsr,rhk->bshk", c_bsr, cast(self.wv_b_RHK, cfg))

        scores_bhts = jnp.einsum("bthk,bshk->bhts", q_nope_bthk, k_nope_bshk) + jnp.einsum(
            "bthk,bsk->bhts", q_pe_bthk, k_pe_bsk
        )
        scores_bhts = scores_bhts.astype(jnp.float32) * cfg.softmax_scale
        mask = attention_mask(t, t, segment_ids_bt, b)
        scores_bhts = jnp.where(mask, scores_bhts, jnp.finfo(jnp.float32).min)
        probs_bhts = jax.nn.softmax(scores_bhts, axis=-1).astype(v_bshk.dtype)
        out_bthk = jnp.einsum("bhts,bshk->bthk", probs_bhts, v_bshk)
        return jnp.einsum("bthk,hkd->btd", out_bthk, cast(self.wo_HKD, cfg))
