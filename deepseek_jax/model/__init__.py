"""DeepSeek-V2/V3 model in Flax NNX.

Shape legend used in names (`q_bthk`, `wq_b_QHK`): B batch, T query time, S key time, D model
width, H heads, K per-head dim (d_n, d_r or d_v by context), R kv_lora_rank, Q q_lora_rank,
E routed experts, F ffn width, V vocab, N tokens (B·T flattened), M token-expert pairs (N·K
after dispatch). Upper-case letters mark parameters, lower-case activations.
"""

from deepseek_jax.model.transformer import DeepSeek, ModelOutput

__all__ = ["DeepSeek", "ModelOutput"]
