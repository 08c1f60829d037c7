"""Rematerialization policies for one decoder block (`runtime.remat`), built from the
`checkpoint_name` tags the model puts on its activations:

    mla_latent     MLA's normed latent c_KV [B,T,R] and RoPE'd shared key k_pe [B,T,d_r]
    attention_out  the attention kernel's output per head [B,T,H,d_v], before o_proj
    moe_dispatch   tokens as sent to the routed experts [N·K, D]
    moe_out        the routed experts' combined output [N, D]
    mlp_hidden     silu(gate)·up of a dense or shared-expert SwiGLU [B,T,F]
    layer_input    the block's input [B,T,D] (the residual stream between layers); every use
                   inside the block reads the tagged value, so a policy that moves it elsewhere
                   leaves no on-device copy of it behind

Policies (what the backward pass finds saved; everything else is recomputed from the block
input, which the layer scan always keeps):
    none                      everything (no jax.checkpoint at all)
    full                      nothing
    save_dots                 matmul outputs without batch dims (the projections) and every tag
    save_dots_except_experts  the same minus the expert-side tags (moe_dispatch, moe_out): the
                              routed experts' K-fold token copies are the largest activations
    offload                   nothing on device; the MLA, attention and MoE output tags are
                              copied to pinned host memory and fetched back for the backward
    offload_layer_input       full remat, with each block's input kept in pinned host memory
                              instead of on device: the layer scan's only per-layer residual
                              [L,B,T,D] leaves HBM, at one [B,T,D] copy out and back per layer
"""

from __future__ import annotations

from collections.abc import Callable

import jax

TAGS = ("mla_latent", "attention_out", "moe_dispatch", "moe_out", "mlp_hidden")
EXPERT_TAGS = ("moe_dispatch", "moe_out")
OFFLOADED = ("mla_latent", "attention_out", "moe_out", "mlp_hidden")


def remat_policy(name: str, platform: str | None = None) -> Callable | None:
    """The `jax.checkpoint` policy for `runtime.remat=name` (None saves nothing).

    `platform` (default: the default backend) decides whether host offload is available.
    """
    cp = jax.checkpoint_policies
    if name == "full":
        return None
    if name == "save_dots":
        return cp.save_from_both_policies(
            cp.dots_with_no_batch_dims_saveable, cp.save_only_these_names(*TAGS)
        )
    if name == "save_dots_except_experts":
        kept = tuple(t for t in TAGS if t not in EXPERT_TAGS)
        return cp.save_from_both_policies(
            cp.dots_with_no_batch_dims_saveable, cp.save_only_these_names(*kept)
        )
    if name in ("offload", "offload_layer_input"):
        platform = platform or jax.default_backend()
        if platform == "cpu":
            raise ValueError(
                f"runtime.remat={name} needs a TPU or GPU (pinned host memory next to device "
                "memory); on CPU activations already live in host memory: use "
                "runtime.remat=save_dots_except_experts or full"
            )
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=list(OFFLOADED if name == "offload" else ("layer_input",)),
            offload_src="device",
            offload_dst="pinned_host",
        )
    raise ValueError(f"runtime.remat={name!r} has no policy (none is not a checkpoint)")
