"""DeepSeekMoE (SPEC §3): shared experts plus dropless routed experts on a grouped matmul.

Routing: V3's sigmoid router selects with a correction bias (aux-loss-free balancing) inside the
best `topk_group` groups, and weights with the unbiased scores; V2's routers are softmax greedy
and group-limited greedy. Dispatch sorts the N·K (token, expert) pairs by expert and runs each
expert's SwiGLU on its contiguous slice with `jax.lax.ragged_dot`: no capacity, no dropping, no
dense all-experts compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.config import ModelConfig, MoEConfig
from deepseek_jax.model.dispatch import DOWN_AXES, GATE_AXES, routed_experts
from deepseek_jax.model.layers import SwiGLU, cast, param
from deepseek_jax.runtime import Runtime


class RouterBias(nnx.Variable):
    """The aux-loss-free correction bias: used for expert selection only, updated by the
    balancing rule b_i += γ·sign(mean load − load_i), never by gradients or the optimizer."""


def route(
    moe: MoEConfig, logits_ne: jax.Array, bias_e: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pick experts for each token. Returns (weights [N,K] f32, experts [N,K] int32, scores [N,E]).

    `logits_ne` are the fp32 router logits; `scores` are the affinities s the weights come from.
    """
    n, e = logits_ne.shape
    k, groups = moe.n_experts_per_tok, moe.n_group
    if moe.scoring_func == "sigmoid":
        scores_ne = jax.nn.sigmoid(logits_ne)
    else:
        scores_ne = jax.nn.softmax(logits_ne, axis=-1)

    if moe.topk_method == "noaux_tc":
        choice_ne = scores_ne + bias_e  # the bias steers selection only
        if groups > 1:
            by_group = choice_ne.reshape(n, groups, e // groups)
            group_score_ng = jax.lax.top_k(by_group, 2)[0].sum(-1)  # sum of the top-2 per group
            choice_ne = _keep_top_groups(choice_ne, group_score_ng, moe.topk_group, -jnp.inf)
    elif moe.topk_method == "group_limited_greedy":
        group_score_ng = scores_ne.reshape(n, groups, e // groups).max(-1)
        choice_ne = _keep_top_groups(scores_ne, group_score_ng, moe.topk_group, 0.0)
    else:  # greedy
        choice_ne = scores_ne

    _, experts_nk = jax.lax.top_k(choice_ne, k)
    weights_nk = jnp.take_along_axis(scores_ne, experts_nk, axis=-1)
    if moe.norm_topk_prob:
        weights_nk = weights_nk / (weights_nk.sum(-1, keepdims=True) + 1e-20)
    return weights_nk * moe.routed_scaling_factor, experts_nk.astype(jnp.int32), scores_ne


def _keep_top_groups(
    choice_ne: jax.Array, group_score_ng: jax.Array, keep: int, fill: float
) -> jax.Array:
    n, g = group_score_ng.shape
    _, top_groups_nk = jax.lax.top_k(group_score_ng, keep)
    keep_ng = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], top_groups_nk].set(True)
    keep_ne = jnp.repeat(keep_ng, choice_ne.shape[1] // g, axis=1)
    return jnp.where(keep_ne, choice_ne, fill)


def sequence_balance_loss(
    moe: MoEConfig, scores_bte: jax.Array, experts_btk: jax.Array
) -> jax.Array:
    """Σ_i f_i·P_i per sequence, averaged over sequences (SPEC §3), before the α weight.

    f_i = E/(K·T) · #{t: i chosen for t}; P_i = mean_t of the normalized affinity s_i/Σ_j s_j.
    """
    e, k = moe.n_routed_experts, moe.n_experts_per_tok
    t = scores_bte.shape[1]
    chosen_bte = jax.nn.one_hot(experts_btk, e, dtype=jnp.float32).sum(axis=2)
    f_be = chosen_bte.sum(axis=1) * (e / (k * t))
    p_be = (scores_bte / scores_bte.sum(-1, keepdims=True)).mean(axis=1)
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(f_be) * p_be, axis=-1))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        moe, d = cfg.moe, cfg.hidden_size
        e, f = moe.n_routed_experts, moe.moe_intermediate_size
        # Expert-side weights name their model-width axis `expert_embed`, so that a rules preset
        # can shard attention/dense weights over the expert axis without colliding with E.
        self.router_DE = param(rngs, (d, e), ("expert_embed", "experts"), cfg, rt)
        self.router_bias_E = RouterBias(jnp.zeros((e,), jnp.float32), axes=("experts",))
        self.gate_EDF = param(rngs, (e, d, f), GATE_AXES, cfg, rt)
        self.up_EDF = param(rngs, (e, d, f), GATE_AXES, cfg, rt)
        self.down_EFD = param(rngs, (e, f, d), DOWN_AXES, cfg, rt)
        self.shared = (
            SwiGLU(cfg, moe.n_shared_experts * f, rngs, rt) if moe.n_shared_experts > 0 else None
        )

    def __call__(self, x_btd: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns the FFN output and {'load': [E] token counts, 'balance_loss': scalar}."""
        moe = self.cfg.moe
        b, t, d = x_btd.shape
        e, k = moe.n_routed_experts, moe.n_experts_per_tok
        x_nd = x_btd.reshape(b * t, d)
        # The router runs in fp32 whatever the compute dtype (selection is precision-sensitive).
        logits_ne = x_nd.astype(jnp.float32) @ self.router_DE[...].astype(jnp.float32)
        weights_nk, experts_nk, scores_ne = route(moe, logits_ne, self.router_bias_E[...])

        # Dropless: every (token, expert) pair is computed, on a grouped matmul (dispatch.py).
        routed_nd = routed_experts(
            x_nd,
            experts_nk,
            weights_nk,
            cast(self.gate_EDF, self.rt),
            cast(self.up_EDF, self.rt),
            cast(self.down_EFD, self.rt),
            rt=self.rt,
        )
        routed_nd = checkpoint_name(routed_nd, "moe_out")
        load_e = jnp.bincount(experts_nk.reshape(-1), length=e).astype(jnp.int32)
        y_btd = routed_nd.astype(x_btd.dtype).reshape(b, t, d)
        if self.shared is not None:
            y_btd = y_btd + self.shared(x_btd)
        aux = {
            "load": load_e,
            "balance_loss": sequence_balance_loss(
                moe, scores_ne.reshape(b, t, e), experts_nk.reshape(b, t, k)
            ),
        }
        return y_btd, aux
