"""Rotary position embedding on adjacent pairs, with YaRN context extension (SPEC §2).

The official DeepSeek code treats (x[2i], x[2i+1]) as one complex number and rotates it by
pos·f_i. transformers' V3 de-interleaves first; that is a fixed permutation applied to both q and
k, so dot products (and logits) are identical.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig, RopeConfig, yarn_mscale


def inv_frequencies(rope: RopeConfig, dim: int) -> np.ndarray:
    """f_i for i < dim/2 (float32), YaRN-blended between extrapolation and interpolation."""
    freqs = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if rope.type != "yarn":
        return freqs.astype(np.float32)

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength completes `rotations` turns over the original context.
        orig = rope.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    # ramp 0: high-frequency dims keep f_i; ramp 1: low-frequency dims are interpolated f_i/factor.
    blended = freqs / rope.factor * ramp + freqs * (1 - ramp)
    return blended.astype(np.float32)


def attention_factor(rope: RopeConfig) -> float:
    """Scale on cos/sin: m(factor, mscale)/m(factor, mscale_all_dim) under YaRN (1 for V2/V3)."""
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.type != "yarn":
        return 1.0
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


def rope_tables(cfg: ModelConfig, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, d_r/2] in float32 for integer positions."""
    freqs = jnp.asarray(inv_frequencies(cfg.rope, cfg.mla.qk_rope_head_dim))
    angles_btk = positions_bt.astype(jnp.float32)[..., None] * freqs
    scale = attention_factor(cfg.rope)
    return jnp.cos(angles_btk) * scale, jnp.sin(angles_btk) * scale


def apply_rope(x_bt_k: jax.Array, cos_btk: jax.Array, sin_btk: jax.Array) -> jax.Array:
    """Rotate adjacent pairs of the last axis of x [B, T, (H,) d_r] in fp32; keeps x's dtype.

    `cos`/`sin` are [B, T, d_r/2]; a head axis between T and d_r is broadcast over.
    """
    extra = x_bt_k.ndim - 3
    cos = cos_btk.reshape(cos_btk.shape[:2] + (1,) * extra + cos_btk.shape[2:])
    sin = sin_btk.reshape(sin_btk.shape[:2] + (1,) * extra + sin_btk.shape[2:])
    pairs = x_bt_k.astype(jnp.float32).reshape(x_bt_k.shape[:-1] + (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x_bt_k.shape).astype(x_bt_k.dtype)
