"""Multi-head Latent Attention (SPEC §1), naive (training) form.

Keys and values are rebuilt from a normalized latent c of width R = kv_lora_rank; a separate
d_r-wide RoPE key k_pe is shared by all heads. The absorbed decode form lives with generation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.layers import RMSNorm, cast, param
from deepseek_jax.model.rope import apply_rope
from deepseek_jax.ops.attention import attention
from deepseek_jax.runtime import Runtime


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def shared_by_heads(k_bsk: jax.Array, heads: int) -> jax.Array:
    """[B, S, K] -> [B, S, heads, K], the same key for every head.

    Its gradient sums the heads' cotangents in fp32 and rounds once. The plain broadcast's
    transpose sums them in the compute dtype: for V3's 128 heads in bf16 that is a 128-term bf16
    sum (XLA:CPU, random data: 0.6% of the mean magnitude off at the median and 6% at worst,
    against 0.09% and 1.3% here, the final rounding to bf16).
    """
    b, s, k = k_bsk.shape
    return jnp.broadcast_to(k_bsk[:, :, None], (b, s, heads, k))


shared_by_heads.defvjp(
    lambda k_bsk, heads: (shared_by_heads(k_bsk, heads), None),
    lambda heads, _, g_bshk: (g_bshk.sum(axis=2, dtype=jnp.float32).astype(g_bshk.dtype),),
)


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        d, h, m = cfg.hidden_size, cfg.num_heads, cfg.mla
        qk = m.qk_head_dim
        if m.q_lora_rank is None:
            self.wq_DHK = param(rngs, (d, h, qk), ("embed", "heads", "head_dim"), cfg, rt)
        else:
            # The down-projections shard along D; their low-rank side stays whole (None), so the
            # up-projections can shard along the rank without two axes meeting on one mesh axis.
            self.wq_a_DQ = param(rngs, (d, m.q_lora_rank), ("embed", None), cfg, rt)
            self.q_norm = RMSNorm(m.q_lora_rank, cfg, rt, axis="q_lora")
            self.wq_b_QHK = param(
                rngs, (m.q_lora_rank, h, qk), ("q_lora", "heads", "head_dim"), cfg, rt
            )
        # kv_a_proj_with_mqa split in two: the latent rows and the shared RoPE-key rows.
        self.wkv_a_DR = param(rngs, (d, m.kv_lora_rank), ("embed", None), cfg, rt)
        self.wk_rope_DK = param(rngs, (d, m.qk_rope_head_dim), ("embed", "head_dim"), cfg, rt)
        self.kv_norm = RMSNorm(m.kv_lora_rank, cfg, rt, axis="kv_lora")
        # kv_b_proj split per head into W_UK (keys) and W_UV (values). These and o_proj have
        # axis names of their own, so that a preset can also split them along heads (see
        # sharding.py's ep_fsdp).
        kv_b = ("kv_b_rank", "kv_b_heads", "kv_b_dim")
        self.wk_b_RHK = param(rngs, (m.kv_lora_rank, h, m.qk_nope_head_dim), kv_b, cfg, rt)
        self.wv_b_RHK = param(rngs, (m.kv_lora_rank, h, m.v_head_dim), kv_b, cfg, rt)
        o_axes = ("o_heads", "o_dim", "o_embed")
        self.wo_HKD = param(rngs, (h, m.v_head_dim, d), o_axes, cfg, rt)

    def queries(self, x_btd: jax.Array) -> jax.Array:
        """q [B, T, H, d_n + d_r], before RoPE."""
        if self.cfg.mla.q_lora_rank is None:
            return self.rt.einsum("btd,dhk->bthk", x_btd, cast(self.wq_DHK, self.rt))
        cq_btq = self.q_norm(self.rt.einsum("btd,dq->btq", x_btd, cast(self.wq_a_DQ, self.rt)))
        return self.rt.einsum("btq,qhk->bthk", cq_btq, cast(self.wq_b_QHK, self.rt))

    def latents(self, x_btd: jax.Array, cos_btk, sin_btk) -> tuple[jax.Array, jax.Array]:
        """Per-token state a cache holds: normed latent [B,T,R] and RoPE'd key [B,T,d_r]."""
        c_btr = self.kv_norm(self.rt.einsum("btd,dr->btr", x_btd, cast(self.wkv_a_DR, self.rt)))
        k_pe_btk = self.rt.einsum("btd,dk->btk", x_btd, cast(self.wk_rope_DK, self.rt))
        # Tagged for remat policies: the small per-token state every head's K and V come from.
        c_btr = checkpoint_name(c_btr, "mla_latent")
        k_pe_btk = checkpoint_name(apply_rope(k_pe_btk, cos_btk, sin_btk), "mla_latent")
        return c_btr, k_pe_btk

    def __call__(
        self,
        x_btd: jax.Array,
        cos_btk: jax.Array,
        sin_btk: jax.Array,
        segment_ids_bt: jax.Array | None = None,
    ) -> jax.Array:
        rt, h = self.rt, self.cfg.num_heads
        q_bthk = self.queries(x_btd)
        d_n = self.cfg.mla.qk_nope_head_dim
        q_bthk = jnp.concatenate(
            [q_bthk[..., :d_n], apply_rope(q_bthk[..., d_n:], cos_btk, sin_btk)], axis=-1
        )
        c_bsr, k_pe_bsk = self.latents(x_btd, cos_btk, sin_btk)
        k_nope_bshk = rt.einsum("bsr,rhk->bshk", c_bsr, cast(self.wk_b_RHK, rt))
        v_bshk = rt.einsum("bsr,rhk->bshk", c_bsr, cast(self.wv_b_RHK, rt))
        # One RoPE key shared by every head (SPEC §1), broadcast next to each head's nope key.
        k_pe_bshk = shared_by_heads(k_pe_bsk, h)
        k_bshk = jnp.concatenate([k_nope_bshk, k_pe_bshk], axis=-1)
        out_bthk = attention(
            q_bthk,
            k_bshk,
            v_bshk,
            segment_ids_bt=segment_ids_bt,
            scale=self.cfg.softmax_scale,
            rt=rt,
        )
        out_bthk = checkpoint_name(out_bthk, "attention_out")
        return rt.einsum("bthk,hkd->btd", out_bthk, cast(self.wo_HKD, rt))
