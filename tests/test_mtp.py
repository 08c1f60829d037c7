"""Multi-Token Prediction (SPEC §4) against an independent float64 NumPy DeepSeek.

The reference below re-implements, from the SPEC and with nothing from `deepseek_jax` in the math:
RMSNorm, adjacent-pair RoPE as complex rotation (with YaRN), naive MLA with a causal mask,
DeepSeekMoE with a per-token loop over the V3 sigmoid/group router and the V2 softmax routers,
the dense/MoE layer layout, and the MTP chain h' = [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1})] proj.
It reads only our parameter arrays (their layout: [in, out] matrices, stacked along 'layers').
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_weights import model_state

from deepseek_jax.config import load_config, replace
from deepseek_jax.model.mtp import shift_tokens

jax.config.update("jax_default_matmul_precision", "highest")

B, T = 2, 8


# ---------------------------------------------------------------------------------------------
# Random parameters (the model's own init is slow in eager mode and has unit norm scales).


def random_state(cfg, seed: int = 0, std: float = 0.08):
    return model_state(cfg, seed, std=std)


def numpy_params(state) -> dict:
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(state))


def layer(tree: dict, i: int) -> dict:
    return jax.tree.map(lambda a: a[i], tree)


# ---------------------------------------------------------------------------------------------
# The NumPy reference (float64, one sequence at a time).


def np_rmsnorm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def np_mscale(factor, mscale):
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def np_inv_freq(cfg):
    """SPEC §2, written out: f_i = θ^(-2i/D), YaRN-blended with a linear ramp."""
    r, dim = cfg.rope, cfg.mla.qk_rope_head_dim
    f = np.array([r.theta ** (-2.0 * i / dim) for i in range(dim // 2)])
    if r.type != "yarn":
        return f

    def corr(rot):
        return (
            dim
            * math.log(r.original_max_position_embeddings / (2 * math.pi * rot))
            / (2 * math.log(r.theta))
        )

    low = max(math.floor(corr(r.beta_fast)), 0)
    high = min(math.ceil(corr(r.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)
    return f * ((1 - ramp) + ramp / r.factor)


def np_rope(x, cfg):
    """Rotate adjacent pairs (x[2i], x[2i+1]) as complex numbers by pos·f_i; x is [T, ..., d_r]."""
    r = cfg.rope
    af = 1.0
    if r.type == "yarn":
        af = np_mscale(r.factor, r.mscale) / np_mscale(r.factor, r.mscale_all_dim)
    t = x.shape[0]
    rot = af * np.exp(1j * np.arange(t)[:, None] * np_inv_freq(cfg)[None, :])  # [T, d_r/2]
    rot = rot.reshape((t,) + (1,) * (x.ndim - 2) + rot.shape[1:])
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def np_softmax(a, axis=-1):
    a = a - a.max(axis=axis, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=axis, keepdims=True)


def np_mla(x, p, cfg):
    """Naive MLA for one sequence x [T, D]."""
    m, eps = cfg.mla, cfg.rms_norm_eps
    t, h = x.shape[0], cfg.num_heads
    if m.q_lora_rank is None:
        q = (x @ p["wq_DHK"].reshape(x.shape[1], -1)).reshape(t, h, -1)
    else:
        cq = np_rmsnorm(x @ p["wq_a_DQ"], p["q_norm"]["scale"], eps)
        q = (cq @ p["wq_b_QHK"].reshape(m.q_lora_rank, -1)).reshape(t, h, -1)
    q_nope, q_pe = q[..., : m.qk_nope_head_dim], np_rope(q[..., m.qk_nope_head_dim :], cfg)
    c = np_rmsnorm(x @ p["wkv_a_DR"], p["kv_norm"]["scale"], eps)
    k_pe = np_rope(x @ p["wk_rope_DK"], cfg)  # one key shared by all heads
    scale = m.qk_head_dim**-0.5
    if cfg.rope.type == "yarn" and cfg.rope.mscale_all_dim:
        scale *= np_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim) ** 2
    out = np.zeros((t, cfg.hidden_size))
    for head in range(h):
        k_nope = c @ p["wk_b_RHK"][:, head, :]
        v = c @ p["wv_b_RHK"][:, head, :]
        scores = scale * (q_nope[:, head] @ k_nope.T + q_pe[:, head] @ k_pe.T)
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
        out += (np_softmax(scores) @ v) @ p["wo_HKD"][head]
    return out


def np_swiglu(x, gate, up, down):
    g = x @ gate
    return ((g / (1 + np.exp(-g))) * (x @ up)) @ down


def np_route(x, p, moe):
    """Per-token routing. Returns (experts [N,K], weights [N,K], scores [N,E])."""
    logits = x @ p["router_DE"]
    if moe.scoring_func == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
    else:
        scores = np_softmax(logits)
    n, e = scores.shape
    per = e // moe.n_group
    experts = np.zeros((n, moe.n_experts_per_tok), int)
    weights = np.zeros((n, moe.n_experts_per_tok))
    for i in range(n):
        s = scores[i]
        if moe.topk_method == "noaux_tc":
            choice = s + p["router_bias_E"]
            group_score = [
                np.sort(choice[g * per : (g + 1) * per])[-2:].sum() for g in range(e // per)
            ]
        elif moe.topk_method == "group_limited_greedy":
            choice = s.copy()
            group_score = [choice[g * per : (g + 1) * per].max() for g in range(e // per)]
        else:
            choice, group_score = s.copy(), None
        if group_score is not None and moe.n_group > 1:
            kept = np.argsort(-np.asarray(group_score), kind="stable")[: moe.topk_group]
            allowed = np.isin(np.arange(e) // per, kept)
            choice = np.where(allowed, choice, -np.inf)
        idx = np.argsort(-choice, kind="stable")[: moe.n_experts_per_tok]
        w = s[idx]
        if moe.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        experts[i], weights[i] = idx, w * moe.routed_scaling_factor
    return experts, weights, scores


def np_moe(x, p, moe):
    """DeepSeekMoE on x [N, D]: shared + Σ_k w_k·expert_k(x). Returns (y, experts, scores)."""
    experts, weights, scores = np_route(x, p, moe)
    y = np.zeros_like(x)
    for i in range(x.shape[0]):
        for e, w in zip(experts[i], weights[i], strict=True):
            y[i] += w * np_swiglu(x[i], p["gate_EDF"][e], p["up_EDF"][e], p["down_EFD"][e])
    if "shared" in p:
        s = p["shared"]
        y += np_swiglu(x, s["gate_DF"], s["up_DF"], s["down_FD"])
    return y, experts, scores


def np_block(x, p, kind, cfg, aux):
    """Pre-norm decoder block on x [T, D]; MoE blocks append (experts, scores) to `aux`."""
    eps = cfg.rms_norm_eps
    x = x + np_mla(np_rmsnorm(x, p["attn_norm"]["scale"], eps), p["attn"], cfg)
    h = np_rmsnorm(x, p["ffn_norm"]["scale"], eps)
    if kind == "moe":
        y, experts, scores = np_moe(h, p["ffn"], cfg.moe)
        aux.append((experts, scores))
    else:
        f = p["ffn"]
        y = np_swiglu(h, f["gate_DF"], f["up_DF"], f["down_FD"])
    return x + y


def is_moe(cfg, i):
    return i >= cfg.moe.first_k_dense_replace and i % cfg.moe.moe_layer_freq == 0


def np_trunk(tokens, params, cfg, aux):
    """Main layers for one sequence; layer i uses the next unused entry of its kind's stack."""
    x = params["embed"]["table_VD"][tokens]
    used = {"dense": 0, "moe": 0}
    for i in range(cfg.num_layers):
        kind = "moe" if is_moe(cfg, i) else "dense"
        x = np_block(x, layer(params[f"{kind}_layers"], used[kind]), kind, cfg, aux)
        used[kind] += 1
    return x


def np_mtp(tokens, h0, params, cfg, aux):
    """SPEC §4 for one sequence: returns [depth, T, V] logits."""
    eps, table, out = cfg.rms_norm_eps, params["embed"]["table_VD"], []
    kind = "moe" if is_moe(cfg, cfg.num_layers) else "dense"
    h = h0
    for k in range(1, cfg.mtp.depth + 1):
        p = layer(params["mtp"], k - 1)
        shifted = np.concatenate([tokens[k:], np.zeros(k, tokens.dtype)])  # pad token 0
        joined = np.concatenate(
            [
                np_rmsnorm(table[shifted], p["emb_norm"]["scale"], eps),
                np_rmsnorm(h, p["hidden_norm"]["scale"], eps),
            ],
            axis=-1,
        )
        h = np_block(joined @ p["proj_2DD"], p["block"], kind, cfg, aux)
        out.append(np_rmsnorm(h, p["head_norm"]["scale"], eps) @ params["lm_head_DV"])
    return np.stack(out)


def np_balance_loss(experts_btk, scores_bte, e, k):
    """SPEC §3: per sequence Σ_i f_i·P_i, averaged over sequences."""
    losses = []
    for experts, scores in zip(experts_btk, scores_bte, strict=True):
        t = scores.shape[0]
        f = e / (k * t) * np.bincount(experts.ravel(), minlength=e)
        p = (scores / scores.sum(-1, keepdims=True)).mean(0)
        losses.append((f * p).sum())
    return np.mean(losses)


# ---------------------------------------------------------------------------------------------
# Tests.

TINY = load_config("tiny").model
VARIANTS = {
    # V3-style: MoE MTP blocks with the sigmoid/group router, depth 2.
    "moe": replace(TINY, **{"mtp.depth": 2}),
    # Dense MTP blocks, plain q_proj (V2-Lite style), YaRN with an attention factor != 1.
    "dense_yarn": replace(
        TINY,
        **{
            "mtp.depth": 2,
            "moe.first_k_dense_replace": 6,
            "mla.q_lora_rank": None,
            "rope.type": "yarn",
            "rope.factor": 8.0,
            "rope.original_max_position_embeddings": 256,
            "rope.mscale": 1.0,
            "rope.mscale_all_dim": 0.707,
        },
    ),
    # Interleaved dense/MoE layout (dense, dense, moe, dense; MTP block is MoE) with the V2
    # group-limited softmax router and no renormalization.
    "interleaved_v2": replace(
        TINY,
        **{
            "mtp.depth": 1,
            "moe.moe_layer_freq": 2,
            "moe.topk_method": "group_limited_greedy",
            "moe.scoring_func": "softmax",
            "moe.norm_topk_prob": False,
            "moe.routed_scaling_factor": 1.5,
        },
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_mtp_matches_numpy_reference(name):
    cfg = VARIANTS[name]
    graphdef, state = random_state(cfg, seed=1)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (B, T))

    @jax.jit
    def run(state, tokens):
        return nnx.merge(graphdef, state).forward(tokens)

    out = run(state, jnp.asarray(tokens))
    params = numpy_params(state)
    assert out.mtp_logits.shape == (cfg.mtp.depth, B, T, cfg.vocab_size)

    # MTP chain from our main hidden state h^0 (isolates MTP from the trunk).
    hidden = np.asarray(out.hidden, np.float64)
    mtp_aux = [[] for _ in range(B)]
    want_mtp = np.stack(
        [np_mtp(tokens[b], hidden[b], params, cfg, mtp_aux[b]) for b in range(B)], axis=1
    )
    np.testing.assert_allclose(np.asarray(out.mtp_logits), want_mtp, rtol=0, atol=1e-4)

    # The main model too, so h^0 itself is checked and the whole chain is independent.
    trunk_aux = [[] for _ in range(B)]
    want_hidden = np.stack([np_trunk(tokens[b], params, cfg, trunk_aux[b]) for b in range(B)])
    np.testing.assert_allclose(hidden, want_hidden, rtol=0, atol=1e-4)
    want_logits = np_rmsnorm(want_hidden, params["final_norm"]["scale"], cfg.rms_norm_eps)
    want_logits = want_logits @ params["lm_head_DV"]
    np.testing.assert_allclose(np.asarray(out.logits), want_logits, rtol=0, atol=1e-4)

    # Expert loads and balance losses: main MoE layers, then MTP MoE blocks.
    per_layer = [
        (np.stack([a[b][j][0] for b in range(B)]), np.stack([a[b][j][1] for b in range(B)]))
        for a in (trunk_aux, mtp_aux)
        for j in range(len(a[0]))
    ]
    if not per_layer:
        assert out.expert_load is None and out.balance_loss is None
        return
    e, k = cfg.moe.n_routed_experts, cfg.moe.n_experts_per_tok
    want_load = np.stack([np.bincount(ex.ravel(), minlength=e) for ex, _ in per_layer])
    np.testing.assert_array_equal(np.asarray(out.expert_load), want_load)
    want_bal = np.array([np_balance_loss(ex, sc, e, k) for ex, sc in per_layer])
    np.testing.assert_allclose(np.asarray(out.balance_loss), want_bal, rtol=1e-5)


def test_shift_tokens():
    tokens = np.arange(1, 13).reshape(2, 6)
    for k in range(4):
        want = np.concatenate([tokens[:, k:], np.zeros((2, k), tokens.dtype)], axis=1)
        np.testing.assert_array_equal(np.asarray(shift_tokens(jnp.asarray(tokens), k)), want)
    np.testing.assert_array_equal(
        np.asarray(shift_tokens(jnp.asarray(tokens), 2, pad=9))[:, -2:], np.full((2, 2), 9)
    )
