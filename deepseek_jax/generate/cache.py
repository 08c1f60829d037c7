"""The latent KV cache: per layer and token only the normed latent ĉ and the RoPE'd key k_pe.

MLA's absorbed form (SPEC §1) never materializes per-head keys or values, so a token costs
kv_lora_rank + qk_rope_head_dim elements per layer (V3: 576) instead of the H·(d_n + d_r + d_v)
of the expanded keys and values (V3: 40,960).

Padding convention: right padding. Row b holds `lengths_b[b]` valid tokens at positions
[0, lengths_b[b]); slots at or past its length are garbage and always masked out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from deepseek_jax.config import ModelConfig


@struct.dataclass
class LatentCache:
    c_lbsr: jax.Array  # [L, B, S_max, R] normed latents ĉ, one slice per layer
    k_pe_lbsk: jax.Array  # [L, B, S_max, d_r] RoPE'd shared keys
    lengths_b: jax.Array  # [B] int32: valid tokens per row

    @property
    def max_len(self) -> int:
        return self.c_lbsr.shape[2]


def init_cache(
    cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, layers: int | None = None
) -> LatentCache:
    """An empty cache for `batch` rows of up to `max_len` tokens each.

    One slice per main layer by default; `layers=1` gives the cache of one MTP module.
    """
    m, n = cfg.mla, cfg.num_layers if layers is None else layers
    return LatentCache(
        c_lbsr=jnp.zeros((n, batch, max_len, m.kv_lora_rank), dtype),
        k_pe_lbsk=jnp.zeros((n, batch, max_len, m.qk_rope_head_dim), dtype),
        lengths_b=jnp.zeros((batch,), jnp.int32),
    )


def bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    """Latent cache bytes per token over all main layers: (d_c + d_r)·L·itemsize."""
    m = cfg.mla
    return (m.kv_lora_rank + m.qk_rope_head_dim) * cfg.num_layers * np.dtype(dtype).itemsize


def expanded_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    """Bytes per token of a cache holding the expanded keys and values: H·(d_n + d_r + d_v)·L."""
    m = cfg.mla
    per_layer = cfg.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return per_layer * cfg.num_layers * np.dtype(dtype).itemsize
