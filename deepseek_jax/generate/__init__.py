"""Inference with a latent KV cache: MLA's absorbed decode form (SPEC §1)."""

from deepseek_jax.generate.cache import (
    LatentCache,
    bytes_per_token,
    expanded_bytes_per_token,
    init_cache,
)
from deepseek_jax.generate.decode import absorbed_attention, cached_step, forward_with_cache

__all__ = [
    "LatentCache",
    "absorbed_attention",
    "bytes_per_token",
    "cached_step",
    "expanded_bytes_per_token",
    "forward_with_cache",
    "init_cache",
]
