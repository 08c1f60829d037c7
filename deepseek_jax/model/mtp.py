"""Multi-Token Prediction modules (SPEC §4).

Module k at position i sees the main model's (k = 1) or the previous module's hidden state at i
and the embedding of token i+k, and predicts token i+k+1:
    h'_i = W_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]   (embedding half first, as vLLM loads
                                                              the released weights)
    h^k_i = Block_k(h'_i);  logits = lm_head(RMSNorm_k(h^k_i))
The embedding table and lm_head are the main model's. Positions past the end see a pad token;
their predictions have no target and the loss masks them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.block import Block
from deepseek_jax.model.layers import RMSNorm, cast, param
from deepseek_jax.runtime import Runtime


class MTPModule(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        d = cfg.hidden_size
        self.emb_norm = RMSNorm(d, cfg, rt)
        self.hidden_norm = RMSNorm(d, cfg, rt)
        # eh_proj [d, 2d] in the checkpoint; rows of ours: [embedding half; hidden half].
        self.proj_2DD = param(rngs, (2 * d, d), (None, "embed"), cfg, rt)
        self.block = Block(cfg, kind, rngs, rt)
        self.head_norm = RMSNorm(d, cfg, rt)

    def __call__(self, h_btd, emb_btd, cos_btk, sin_btk, segment_ids_bt=None):
        """Returns (h^k before the head norm, head-normed h^k, MoE aux)."""
        h_btd, aux = self.block(self.block_input(h_btd, emb_btd), cos_btk, sin_btk, segment_ids_bt)
        return h_btd, self.head_norm(h_btd), aux

    def block_input(self, h_btd: jax.Array, emb_btd: jax.Array) -> jax.Array:
        """h' = [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] W_k, the block's input."""
        joined_bt2d = jnp.concatenate([self.emb_norm(emb_btd), self.hidden_norm(h_btd)], axis=-1)
        return self.rt.einsum("bte,ed->btd", joined_bt2d, cast(self.proj_2DD, self.rt))


def shift_tokens(tokens_bt: jax.Array, k: int, pad: int = 0) -> jax.Array:
    """t_{i+k} at position i; the last k positions get `pad`."""
    if k == 0:
        return tokens_bt
    return jnp.concatenate(
        [tokens_bt[:, k:], jnp.full((tokens_bt.shape[0], k), pad, tokens_bt.dtype)], axis=1
    )
