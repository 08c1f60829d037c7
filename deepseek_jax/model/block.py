"""The pre-norm decoder block and stacks of identical blocks run under `jax.lax.scan`."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.layers import RMSNorm, SwiGLU
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.moe import MoE
from deepseek_jax.model.remat import remat_policy
from deepseek_jax.runtime import Runtime


class Block(nnx.Module):
    """x += MLA(norm(x)); x += FFN(norm(x)); the FFN is a dense SwiGLU or DeepSeekMoE."""

    def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs, rt: Runtime):
        self.kind, self.rt = kind, rt
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rt)
        self.attn = MLA(cfg, rngs, rt)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg, rt)
        self.ffn = (
            MoE(cfg, rngs, rt) if kind == "moe" else SwiGLU(cfg, cfg.intermediate_size, rngs, rt)
        )

    def __call__(self, x_btd, cos_btk, sin_btk, segment_ids_bt=None):
        """Returns the new residual stream and the MoE aux dict (empty for a dense block)."""
        # Tagged for runtime.remat=offload_layer_input; everything below reads the tagged value.
        x_btd = checkpoint_name(self.rt.constrain(x_btd, ("batch", None, None)), "layer_input")
        with jax.named_scope("attention"):
            x_btd = x_btd + self.attn(self.attn_norm(x_btd), cos_btk, sin_btk, segment_ids_bt)
        with jax.named_scope(self.kind):
            h_btd = self.ffn_norm(x_btd)
            if self.kind == "moe":
                y_btd, aux = self.ffn(h_btd)
            else:
                y_btd, aux = self.ffn(h_btd), {}
        return x_btd + y_btd, aux


def stacked(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` modules built by `make`, parameters stacked along a leading 'layers' axis."""
    vmapped = nnx.vmap(
        make,
        in_axes=(0,),
        out_axes=0,
        transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"},
    )
    return nnx.split_rngs(splits=count)(vmapped)(rngs)


def stacked_blocks(cfg: ModelConfig, kind: str, count: int, rngs: nnx.Rngs, rt: Runtime) -> Block:
    """`count` decoder blocks of one kind with stacked parameters."""
    return stacked(lambda r: Block(cfg, kind, r, rt), count, rngs)


def run_stack(
    stack: Block,
    x_btd: jax.Array,
    cos_btk: jax.Array,
    sin_btk: jax.Array,
    segment_ids_bt: jax.Array | None,
    start: int,
    count: int,
    rt: Runtime,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run layers [start, start+count) of a stacked Block; aux values gain a leading layer axis.

    runtime.scan_layers traces one layer and loops with `jax.lax.scan`; otherwise the loop is
    unrolled in Python. Both read the same stacked parameters, so a checkpoint serves either.
    runtime.remat recomputes each layer in the backward pass, keeping what its policy names
    (`deepseek_jax.model.remat`).
    """
    graphdef, state = nnx.split(stack)
    total = jax.tree.leaves(state)[0].shape[0]
    if (start, count) != (0, total):
        state = jax.tree.map(lambda a: a[start : start + count], state)

    def layer(x, layer_state):
        return nnx.merge(graphdef, layer_state)(x, cos_btk, sin_btk, segment_ids_bt)

    scan = rt.cfg.scan_layers
    if rt.cfg.remat != "none":
        layer = jax.checkpoint(
            layer, policy=remat_policy(rt.cfg.remat, rt.platform), prevent_cse=not scan
        )

    if scan:
        return jax.lax.scan(layer, x_btd, state)
    auxes = []
    for i in range(count):
        x_btd, aux = layer(x_btd, jax.tree.map(lambda a, i=i: a[i], state))
        auxes.append(aux)
    return x_btd, jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes and auxes[0] else {}
