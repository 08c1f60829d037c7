"""Inference with a latent KV cache: MLA's absorbed decode form (SPEC §1)."""

from deepseek_jax.generate.cache import (
    LatentCache,
    bytes_per_token,
    expanded_bytes_per_token,
    init_cache,
)
from deepseek_jax.generate.decode import (
    absorbed_attention,
    cached_step,
    forward_with_cache,
    mtp_with_cache,
)
from deepseek_jax.generate.loop import generate
from deepseek_jax.generate.sampling import filter_logits, sample
from deepseek_jax.generate.speculative import speculative_generate, verify_drafts
from deepseek_jax.generate.text import generate_text, load_for_generation

__all__ = [
    "LatentCache",
    "absorbed_attention",
    "bytes_per_token",
    "cached_step",
    "expanded_bytes_per_token",
    "filter_logits",
    "forward_with_cache",
    "generate",
    "generate_text",
    "init_cache",
    "load_for_generation",
    "mtp_with_cache",
    "sample",
    "speculative_generate",
    "verify_drafts",
]
