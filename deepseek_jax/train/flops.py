"""Analytic model FLOPs per token (for MFU) and a measured peak when none is configured."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.layers import DTYPES


def _attention_matmul_params(cfg: ModelConfig) -> int:
    d, h, m = cfg.hidden_size, cfg.num_heads, cfg.mla
    q = d * h * m.qk_head_dim if m.q_lora_rank is None else m.q_lora_rank * (d + h * m.qk_head_dim)
    kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * h * (
        m.qk_nope_head_dim + m.v_head_dim
    )
    return q + kv + h * m.v_head_dim * d


def _ffn_matmul_params(cfg: ModelConfig, kind: str) -> int:
    d, moe = cfg.hidden_size, cfg.moe
    if kind == "dense":
        return 3 * d * cfg.intermediate_size
    active = moe.n_shared_experts + moe.n_experts_per_tok
    return d * moe.n_routed_experts + 3 * d * moe.moe_intermediate_size * active


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Multiply-adds x2 of one token's forward pass: projections, active experts, causal
    attention (a token attends to (T+1)/2 positions on average), lm_head, MTP modules."""
    m, h = cfg.mla, cfg.num_heads
    attn_ctx = 2 * h * (m.qk_head_dim + m.v_head_dim) * (seq_len + 1) / 2
    per_layer = {
        kind: 2 * (_attention_matmul_params(cfg) + _ffn_matmul_params(cfg, kind)) + attn_ctx
        for kind in ("dense", "moe")
    }
    head = 2 * cfg.hidden_size * cfg.vocab_size
    total = sum(per_layer[k] for k in cfg.layer_kinds[: cfg.num_layers]) + head
    for kind in cfg.layer_kinds[cfg.num_layers :]:  # MTP: projection, block, head
        total += 2 * 2 * cfg.hidden_size * cfg.hidden_size + per_layer[kind] + head
    return float(total)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward ≈ 3x forward."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def measure_peak_flops(dtype: str = "bfloat16", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one device on a large square matmul: a practical peak when none is known.

    The product accumulates and is written in fp32, as the model's matmuls are: XLA:CPU runs a
    bf16 dot that writes bf16 on fp32-converted operands, 4-5x below its bf16 kernel."""
    x = jnp.ones((n, n), DTYPES[dtype])
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    f(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(x).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)
