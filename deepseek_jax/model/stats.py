"""Parameter counts of a config, total and active per token, without allocating weights."""

from __future__ import annotations

import math

import jax
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import DeepSeek


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """{'total', 'active', 'mtp_total'}: all weights (main model, MTP excluded), the ones a token
    touches (shared experts and top-k routed experts only), and the MTP modules' own weights."""
    abstract = nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))

    def size(tree) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

    mtp_total = size(params.pop("mtp", {}))
    total = size(params)
    moe = cfg.moe
    per_expert = 3 * cfg.hidden_size * moe.moe_intermediate_size
    n_moe = cfg.layer_kinds[: cfg.num_layers].count("moe")
    inactive = n_moe * (moe.n_routed_experts - moe.n_experts_per_tok) * per_expert
    return {"total": total, "active": total - inactive, "mtp_total": mtp_total}
