"""Tiny random DeepSeek models in transformers and what the HF tests share about them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

TOL = 1e-4  # fixed; never loosened
# Router gaps below this are ties at fp32 rounding level: positions from one on are not held to
# TOL (`routing_margins`). Smallest gap per parity case: 2.4e-7 in v3_q_lora_null (where one
# machine's XLA broke the tie the other way from PyTorch: logit diff 0.37), 1.3e-6 in v2_greedy,
# 6.2e-6 in v2_group_limited_greedy, 1.7e-5 in v3_grouped_bias_yarn.
ROUTING_TIE = 1e-5
VOCAB, T = 160, 96
ORIGINAL_CONTEXT = 32  # YaRN's pre-extension length; T = 3x beyond it

V3_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    first_k_dense_replace=2,  # 2 dense then 3 MoE layers
    q_lora_rank=40,
    kv_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    max_position_embeddings=4 * ORIGINAL_CONTEXT,
    initializer_range=0.1,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=ORIGINAL_CONTEXT,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
)

# For host-memory tests: large enough that the embedding and head (4096 x 512 fp32 = 8 MiB each)
# are the largest tensors and the whole checkpoint is many times that.
MEMORY_V3 = dict(
    V3_BASE,
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=512,
    moe_intermediate_size=256,
    n_routed_experts=32,
    n_group=4,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_nextn_predict_layers=0,
    architectures=["DeepseekV3ForCausalLM"],
    model_type="deepseek_v3",
)

V2_BASE = dict(
    V3_BASE,
    q_lora_rank=None,
    n_group=1,
    topk_group=1,
    topk_method="greedy",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    n_shared_experts=2,
    num_experts_per_tok=3,
    rope_parameters=dict(V3_BASE["rope_parameters"], mscale=0.707, mscale_all_dim=0.707),
)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Norm weights away from 1 and a non-zero correction bias, so both are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=g))


def random_tokens(seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, T)).astype(np.int32)


def hf_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def routing_margins(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    """[B, T]: per token, the smallest gap over the MoE layers between the last choice its
    router made and the first it did not (the topk_group-th vs the next group score where groups
    limit the choice, the K-th vs the next expert score), from transformers' fp32 router logits.

    A gap at fp32 rounding level is a tie that two correct implementations may break either way.
    """
    cfg, logits = model.config, []
    method = getattr(cfg, "topk_method", "noaux_tc")  # V3 configs route only this way
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopkRouter")]
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: logits.append(out[0].detach())) for m in routers
    ]
    try:
        hf_logits(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    margins = []
    for router, router_logits in zip(routers, logits, strict=True):
        n, e = router_logits.shape
        if method == "noaux_tc":
            choice = router_logits.sigmoid() + router.e_score_correction_bias
            group_score = choice.view(n, cfg.n_group, -1).topk(2, dim=-1)[0].sum(-1)
        else:
            choice = router_logits.softmax(dim=-1)
            group_score = choice.view(n, cfg.n_group, -1).max(dim=-1).values
        gap = torch.full((n,), float("inf"))
        if method != "greedy" and cfg.n_group > 1:
            g_sorted, g_idx = group_score.sort(dim=-1, descending=True)
            gap = g_sorted[:, cfg.topk_group - 1] - g_sorted[:, cfg.topk_group]
            kept = torch.zeros_like(group_score, dtype=torch.bool)
            kept.scatter_(1, g_idx[:, : cfg.topk_group], True)
            choice = choice.masked_fill(~kept.repeat_interleave(e // cfg.n_group, 1), -1.0)
        c_sorted = choice.sort(dim=-1, descending=True).values
        k = cfg.num_experts_per_tok
        margins.append(torch.minimum(gap, c_sorted[:, k - 1] - c_sorted[:, k]))
    return torch.stack(margins).min(0).values.reshape(tokens.shape).numpy()


def our_logits(model, tokens: np.ndarray) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(model(jnp.asarray(tokens)))


FP8_BLOCK = (32, 32)  # smaller than the release's 128 so that weights span several blocks


def is_fp8_weight(name: str) -> bool:
    # SPEC §6: attention, dense-MLP and expert projections are FP8; embeddings, lm_head, router
    # gates, norms and MTP extras are not.
    return name.endswith("_proj.weight") and "eh_proj" not in name and ".gate." not in name


def mtp_tensors(cfg: dict, reference: dict[str, np.ndarray], rng) -> dict[str, np.ndarray]:
    """A full MTP layer at index num_hidden_layers, shaped like layer 2 (an MoE layer)."""
    n, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    out = {}
    for name, value in reference.items():
        if name.startswith("model.layers.2."):
            out[name.replace("model.layers.2.", f"model.layers.{n}.")] = value + rng.normal(
                0, 0.01, value.shape
            ).astype(np.float32)
    out[f"model.layers.{n}.enorm.weight"] = np.ones(d, np.float32)
    out[f"model.layers.{n}.hnorm.weight"] = np.ones(d, np.float32)
    out[f"model.layers.{n}.eh_proj.weight"] = rng.normal(0, 0.1, (d, 2 * d)).astype(np.float32)
    out[f"model.layers.{n}.shared_head.norm.weight"] = np.ones(d, np.float32)
    out[f"model.layers.{n}.embed_tokens.weight"] = reference["model.embed_tokens.weight"]
    out[f"model.layers.{n}.shared_head.head.weight"] = reference["lm_head.weight"]
    return out
