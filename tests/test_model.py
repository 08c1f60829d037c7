"""Model-level properties: causality, jit/scan invariance, DeepSeekMoE and its router, the balance
loss, RoPE/YaRN, logical axis names and dtypes. Expectations come from plain NumPy written here
(SPEC §1-§3), never from the code under test."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_weights import FP32 as FP32_RT
from random_weights import model_state, random_state

from deepseek_jax.config import RopeConfig, load_config, replace
from deepseek_jax.model import DeepSeek
from deepseek_jax.model.layers import RMSNorm
from deepseek_jax.model.mla import shared_by_heads
from deepseek_jax.model.moe import MoE, RouterBias, route, sequence_balance_loss
from deepseek_jax.model.rope import apply_rope, inv_frequencies, rope_tables
from deepseek_jax.model.transformer import layer_runs
from deepseek_jax.runtime import Runtime

jax.config.update("jax_default_matmul_precision", "highest")

TINY = load_config("tiny").model
FP32 = replace(TINY, **{"mtp.depth": 2})
B, T = 2, 8


def _names(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def with_leaf(state, names: tuple, value):
    """A copy of `state` whose array at dict path `names` is `value` (works under tracing)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = [value if _names(p) == names else leaf for p, leaf in flat]
    return jax.tree.unflatten(treedef, leaves)


def distinct_tokens(seed: int, vocab: int) -> np.ndarray:
    """[B, T] tokens, all different and never the MTP pad token 0."""
    return np.random.default_rng(seed).permutation(np.arange(1, vocab))[: B * T].reshape(B, T)


# ---------------------------------------------------------------------------------------------
# Causality through gradients.


@pytest.fixture(scope="module")
def fp32_model():
    return model_state(FP32, seed=0)


def jacobian_rows(f, x, out_shape):
    """|d f(x)[idx] / d x| reduced over x's last axis, for every idx of f's output.

    A loop of VJPs: `jax.jacrev` vmaps the backward pass, and ragged_dot (the MoE grouped matmul)
    only batches over dimension 0 in this JAX version.
    """
    vjp = jax.jit(jax.grad(lambda x, w: (f(x) * w).sum()))
    rows = np.zeros(out_shape + x.shape[:-1])
    for idx in np.ndindex(*out_shape):
        w = np.zeros(out_shape, np.float32)
        w[idx] = 1.0
        rows[idx] = np.abs(np.asarray(vjp(x, jnp.asarray(w)))).max(-1)
    return rows


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_main_logits_are_causal(fp32_model, packed):
    """d(Σ_v logits[b,t,v]) / d x[b',s,:] is exactly 0 unless b' = b and s <= t (and, with
    packed documents, s is in t's document)."""
    graphdef, state = fp32_model
    tokens = jnp.asarray(distinct_tokens(0, FP32.vocab_size))
    x = nnx.merge(graphdef, state).embed(tokens)
    segments = np.array([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    segments = segments if packed else np.zeros((B, T), int)

    def per_position(x_btd):
        m = nnx.merge(graphdef, state)
        h, _ = m.trunk(x_btd, segment_ids_bt=jnp.asarray(segments) if packed else None)
        return m.head(h).sum(-1)  # [B, T]

    mag = jacobian_rows(per_position, x, (B, T))  # [B, T, B', S]
    causal = np.tril(np.ones((T, T), bool))
    same_doc = segments[:, :, None] == segments[:, None, :]  # [B, T, S]
    allowed = np.zeros((B, T, B, T), bool)
    for b in range(B):
        allowed[b, :, b, :] = causal & same_doc[b]
    np.testing.assert_array_equal(mag[~allowed], 0.0)
    assert (mag[allowed] > 0).all()


def test_mtp_logits_are_causal_up_to_t_plus_k(fp32_model):
    """Depth-k MTP logits at t depend on tokens at positions <= t+k of the same sequence only.

    Differentiates w.r.t. the embedding table, which feeds both the trunk input and the MTP
    embedding of t_{i+k}; tokens are distinct so each table row is one (sequence, position).
    """
    graphdef, state = fp32_model
    tokens = distinct_tokens(1, FP32.vocab_size)
    table = state["embed"]["table_VD"][...]

    def mtp_per_position(table_vd):
        s = with_leaf(state, ("embed", "table_VD"), table_vd)
        return nnx.merge(graphdef, s).forward(jnp.asarray(tokens)).mtp_logits.sum(-1)

    depth = FP32.mtp.depth
    mag = jacobian_rows(mtp_per_position, table, (depth, B, T))  # [K, B, T, V]
    for k in range(1, depth + 1):
        for b in range(B):
            for t in range(T):
                row = mag[k - 1, b, t]
                want = np.zeros(FP32.vocab_size, bool)
                want[tokens[b, : t + k + 1]] = True  # tokens at positions <= t+k
                want[0] = t + k >= T  # the pad token stands in past the end
                assert (row[want] > 0).all(), (k, b, t)
                np.testing.assert_array_equal(row[~want], 0.0, err_msg=f"k={k} b={b} t={t}")


# ---------------------------------------------------------------------------------------------
# jit / eager and scan / unrolled give the same model.


def assert_same_outputs(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(a.hidden), np.asarray(b.hidden), rtol=0, atol=atol)
    np.testing.assert_allclose(
        np.asarray(a.mtp_logits), np.asarray(b.mtp_logits), rtol=0, atol=atol
    )
    np.testing.assert_array_equal(np.asarray(a.expert_load), np.asarray(b.expert_load))
    np.testing.assert_allclose(
        np.asarray(a.balance_loss), np.asarray(b.balance_loss), rtol=0, atol=atol
    )


def test_jit_matches_eager():
    cfg = replace(FP32, num_layers=2, **{"mtp.depth": 1})  # one dense, one MoE layer
    graphdef, state = model_state(cfg, seed=5)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (B, T)))

    def f(state, tokens):
        return nnx.merge(graphdef, state).forward(tokens)

    assert_same_outputs(f(state, tokens), jax.jit(f)(state, tokens))


INTERLEAVED = replace(FP32, num_layers=5, **{"moe.moe_layer_freq": 2, "mtp.depth": 1})


@pytest.mark.parametrize(
    "cfg, runs",
    [
        (FP32, [("dense", 0, 1), ("moe", 0, 3)]),
        # layers d d m d m (+ MTP block 5: dense): four scans, MoE and dense stacks sliced.
        (INTERLEAVED, [("dense", 0, 2), ("moe", 0, 1), ("dense", 2, 1), ("moe", 1, 1)]),
    ],
    ids=["default", "interleaved"],
)
def test_scan_matches_unrolled(cfg, runs):
    assert layer_runs(cfg.layer_kinds[: cfg.num_layers]) == runs
    scan_def, state = model_state(cfg, seed=6, runtime=FP32_RT)
    loop_def, loop_state = model_state(cfg, seed=6, runtime=FP32_RT.replace(scan_layers=False))
    assert jax.tree.structure(state) == jax.tree.structure(loop_state)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (B, T)))
    run = jax.jit(lambda g, s, t: nnx.merge(g, s).forward(t), static_argnums=0)
    scanned, looped = run(scan_def, state, tokens), run(loop_def, state, tokens)
    n_moe = sum(k == "moe" for k in cfg.layer_kinds)
    assert scanned.expert_load.shape == (n_moe, cfg.moe.n_routed_experts)
    assert scanned.balance_loss.shape == (n_moe,)
    assert_same_outputs(scanned, looped)


# ---------------------------------------------------------------------------------------------
# DeepSeekMoE against a dense NumPy reference.


def np_route(logits, bias, moe):
    """SPEC §3 per token: (experts [N,K], weights [N,K], scores [N,E])."""
    logits = np.asarray(logits, np.float64)
    if moe.scoring_func == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    n, e = scores.shape
    per = e // moe.n_group
    experts = np.zeros((n, moe.n_experts_per_tok), int)
    weights = np.zeros((n, moe.n_experts_per_tok))
    for i in range(n):
        s = scores[i]
        if moe.topk_method == "noaux_tc":
            choice = s + np.asarray(bias, np.float64)
            groups = [np.sort(choice[g * per : (g + 1) * per])[-2:].sum() for g in range(e // per)]
        elif moe.topk_method == "group_limited_greedy":
            choice = s.copy()
            groups = [choice[g * per : (g + 1) * per].max() for g in range(e // per)]
        else:
            choice, groups = s.copy(), None
        if groups is not None and moe.n_group > 1:
            kept = np.argsort(-np.asarray(groups), kind="stable")[: moe.topk_group]
            choice = np.where(np.isin(np.arange(e) // per, kept), choice, -np.inf)
        idx = np.argsort(-choice, kind="stable")[: moe.n_experts_per_tok]
        w = s[idx]
        if moe.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        experts[i], weights[i] = idx, w * moe.routed_scaling_factor
    return experts, weights, scores


def np_swiglu(x, gate, up, down):
    g = x @ gate
    return ((g / (1 + np.exp(-g))) * (x @ up)) @ down


def np_balance_loss(experts_btk, scores_bte, e, k):
    """SPEC §3: per sequence Σ_i f_i·P_i, f_i = E/(K T)·#chosen, P_i = mean_t s_i/Σ_j s_j."""
    losses = []
    for experts, scores in zip(experts_btk, scores_bte, strict=True):
        t = scores.shape[0]
        f = e / (k * t) * np.bincount(np.ravel(experts), minlength=e)
        p = (scores / scores.sum(-1, keepdims=True)).mean(0)
        losses.append((f * p).sum())
    return float(np.mean(losses))


MOE_CASES = {
    "v3_groups_bias": {},  # tiny: noaux_tc sigmoid, 16 experts in 4 groups, top-2 groups, K=4
    "v2_greedy": {
        "moe.topk_method": "greedy",
        "moe.scoring_func": "softmax",
        "moe.norm_topk_prob": False,
        "moe.routed_scaling_factor": 1.0,
        "moe.n_shared_experts": 0,
    },
    "v2_group_limited": {
        "moe.topk_method": "group_limited_greedy",
        "moe.scoring_func": "softmax",
        "moe.norm_topk_prob": False,
        "moe.routed_scaling_factor": 1.5,
        "moe.n_shared_experts": 2,
    },
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_matches_numpy_reference(case):
    cfg = replace(TINY, **MOE_CASES[case])
    moe = cfg.moe
    graphdef, state = random_state(lambda: MoE(cfg, nnx.Rngs(0), FP32_RT), seed=7, bias_std=0.3)
    bt, tt = 2, 16
    x = np.random.default_rng(8).standard_normal((bt, tt, cfg.hidden_size)).astype(np.float32)
    y, aux = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(x))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(state))
    x_nd = x.reshape(-1, cfg.hidden_size).astype(np.float64)
    experts, weights, scores = np_route(x_nd @ p["router_DE"], p["router_bias_E"], moe)
    want = np.zeros_like(x_nd)
    for n in range(x_nd.shape[0]):
        for e, w in zip(experts[n], weights[n], strict=True):
            want[n] += w * np_swiglu(x_nd[n], p["gate_EDF"][e], p["up_EDF"][e], p["down_EFD"][e])
    if moe.n_shared_experts:
        sh = p["shared"]
        assert sh["gate_DF"].shape[1] == moe.n_shared_experts * moe.moe_intermediate_size
        want += np_swiglu(x_nd, sh["gate_DF"], sh["up_DF"], sh["down_FD"])
    else:
        assert "shared" not in p
    np.testing.assert_allclose(np.asarray(y).reshape(want.shape), want, rtol=0, atol=1e-5)

    load = np.asarray(aux["load"])
    np.testing.assert_array_equal(
        load, np.bincount(experts.ravel(), minlength=moe.n_routed_experts)
    )
    assert load.sum() == bt * tt * moe.n_experts_per_tok
    want_bal = np_balance_loss(
        experts.reshape(bt, tt, -1),
        scores.reshape(bt, tt, -1),
        moe.n_routed_experts,
        moe.n_experts_per_tok,
    )
    np.testing.assert_allclose(float(aux["balance_loss"]), want_bal, rtol=1e-5)

    # The case really exercises its router: the bias / group limit changes some selections.
    def changed(other_moe, bias):
        other, _, _ = np_route(x_nd @ p["router_DE"], bias, other_moe)
        return (np.sort(other, -1) != np.sort(experts, -1)).any()

    if moe.topk_method == "noaux_tc":
        assert changed(moe, 0 * p["router_bias_E"]), "the bias changes no selection"
    if moe.topk_method != "greedy":
        assert changed(replace(moe, n_group=1, topk_group=1), p["router_bias_E"]), "groups"


def sigmoid(a):
    return 1 / (1 + np.exp(-np.asarray(a, np.float64)))


def test_router_bias_changes_selection_not_weights():
    moe = replace(
        TINY.moe,
        n_routed_experts=8,
        n_group=1,
        topk_group=1,
        n_experts_per_tok=2,
        routed_scaling_factor=2.5,
    )
    logits = jnp.asarray([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    s = sigmoid(logits[0])
    w, ex, _ = route(moe, logits, jnp.zeros(8))
    assert sorted(np.asarray(ex[0]).tolist()) == [0, 1]
    bias = jnp.zeros(8).at[5].set(1.0)  # s_5 + 1 > s_0: expert 5 now wins
    w, ex, scores = route(moe, logits, bias)
    ex = np.asarray(ex[0])
    assert sorted(ex.tolist()) == [0, 5]
    want = 2.5 * s[ex] / s[ex].sum()  # weights from the unbiased scores
    np.testing.assert_allclose(np.asarray(w[0]), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(scores[0]), s, rtol=1e-6)
    w, ex, _ = route(replace(moe, norm_topk_prob=False), logits, bias)
    np.testing.assert_allclose(np.asarray(w[0]), 2.5 * s[np.asarray(ex[0])], rtol=1e-6)


def test_norm_topk_prob_sums_to_scaling_factor():
    moe = replace(TINY.moe, routed_scaling_factor=2.5)
    rng = np.random.default_rng(9)
    logits = jnp.asarray(rng.standard_normal((64, moe.n_routed_experts)), jnp.float32)
    w, _, _ = route(moe, logits, jnp.asarray(0.2 * rng.standard_normal(moe.n_routed_experts)))
    np.testing.assert_allclose(np.asarray(w).sum(-1), 2.5, rtol=1e-6)


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy"])
def test_experts_only_from_top_groups(method):
    scoring = "sigmoid" if method == "noaux_tc" else "softmax"
    moe = replace(TINY.moe, topk_method=method, scoring_func=scoring)  # 16 experts, 4 groups
    per = moe.n_routed_experts // moe.n_group
    rng = np.random.default_rng(10)
    logits = rng.standard_normal((256, moe.n_routed_experts)).astype(np.float32)
    bias = (0.3 * rng.standard_normal(moe.n_routed_experts)).astype(np.float32)
    _, ex, _ = route(moe, jnp.asarray(logits), jnp.asarray(bias))
    ex = np.asarray(ex)
    s = sigmoid(logits) if scoring == "sigmoid" else np.asarray(jax.nn.softmax(logits, -1))
    if method == "noaux_tc":
        grouped = (s + bias).reshape(len(s), moe.n_group, per)
        group_score = np.sort(grouped, -1)[..., -2:].sum(-1)
    else:
        group_score = s.reshape(len(s), moe.n_group, per).max(-1)
    top = np.argsort(-group_score, -1)[:, : moe.topk_group]
    for n in range(len(ex)):
        assert set((ex[n] // per).tolist()) <= set(top[n].tolist()), n
    assert len(set((ex // per).ravel().tolist())) == moe.n_group  # the kept groups vary
    want, _, _ = np_route(logits, bias, moe)
    np.testing.assert_array_equal(np.sort(ex, -1), np.sort(want, -1))


# ---------------------------------------------------------------------------------------------
# Sequence-wise balance loss (SPEC §3).


def test_balance_loss_matches_numpy():
    moe = TINY.moe
    e, k = moe.n_routed_experts, moe.n_experts_per_tok
    rng = np.random.default_rng(11)
    scores = sigmoid(rng.standard_normal((3, 10, e))).astype(np.float32)
    experts = np.argsort(rng.random((3, 10, e)), -1)[..., :k]
    got = sequence_balance_loss(moe, jnp.asarray(scores), jnp.asarray(experts))
    np.testing.assert_allclose(float(got), np_balance_loss(experts, scores, e, k), rtol=1e-6)


def test_balance_loss_is_one_when_balanced():
    moe = TINY.moe
    e, k, t = moe.n_routed_experts, moe.n_experts_per_tok, 8
    # Round-robin selection (every expert exactly K·T/E times) and uniform scores: exactly 1.
    experts = (np.arange(t * k).reshape(1, t, k) % e).repeat(2, axis=0)
    scores = np.full((2, t, e), 0.3, np.float32)
    got = sequence_balance_loss(moe, jnp.asarray(scores), jnp.asarray(experts))
    np.testing.assert_allclose(float(got), 1.0, rtol=1e-6)
    # Near-uniform affinities: ~1 whatever the selection (Σ_i f_i = E).
    rng = np.random.default_rng(12)
    scores = sigmoid(0.01 * rng.standard_normal((2, 64, e))).astype(np.float32)
    experts = np.argsort(rng.random((2, 64, e)), -1)[..., :k]
    got = sequence_balance_loss(moe, jnp.asarray(scores), jnp.asarray(experts))
    np.testing.assert_allclose(float(got), 1.0, atol=1e-2)
    # Collapsed routing (same K experts, which hold nearly all the affinity): ~E/K.
    scores = np.full((2, 64, e), 1e-4, np.float32)
    scores[..., :k] = 1.0
    experts = np.broadcast_to(np.arange(k), (2, 64, k))
    got = sequence_balance_loss(moe, jnp.asarray(scores), jnp.asarray(experts))
    np.testing.assert_allclose(float(got), e / k, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# RoPE and YaRN (SPEC §1-§2).


def np_rotate(x, angles):
    """Adjacent pairs (x[2i], x[2i+1]) as complex numbers times exp(i·angle_i)."""
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)
    out = np.empty(x.shape)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


@pytest.mark.parametrize("heads", [None, 3])
def test_apply_rope_is_complex_rotation_of_adjacent_pairs(heads):
    rng = np.random.default_rng(13)
    d = 16
    shape = (2, 5) + ((heads,) if heads else ()) + (d,)
    x = rng.standard_normal(shape).astype(np.float32)
    angles = rng.uniform(-10, 10, (2, 5, d // 2)).astype(np.float32)
    got = apply_rope(jnp.asarray(x), jnp.cos(angles), jnp.sin(angles))
    bcast = angles[:, :, None] if heads else angles
    np.testing.assert_allclose(np.asarray(got), np_rotate(x, bcast), rtol=0, atol=1e-5)
    got16 = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.cos(angles), jnp.sin(angles))
    assert got16.dtype == jnp.bfloat16


def test_rope_tables_default():
    cfg = FP32
    d = cfg.mla.qk_rope_head_dim
    positions = np.array([[0, 1, 2, 3, 4, 5], [7, 8, 9, 40, 41, 63]])
    cos, sin = rope_tables(cfg, jnp.asarray(positions))
    f = cfg.rope.theta ** (-np.arange(d // 2) * 2.0 / d)
    angles = positions[..., None] * f
    np.testing.assert_allclose(np.asarray(cos), np.cos(angles), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(sin), np.sin(angles), rtol=0, atol=2e-5)
    np.testing.assert_allclose(inv_frequencies(cfg.rope, d), f, rtol=1e-6)


V3_YARN = RopeConfig(
    theta=10000.0,
    type="yarn",
    factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)


def test_yarn_inv_frequencies_v3():
    dim = 64
    f = np.array([10000.0 ** (-2 * i / dim) for i in range(dim // 2)])

    def corr(r):  # the dimension index that turns r times over the original context
        return dim * math.log(4096 / (2 * math.pi * r)) / (2 * math.log(10000.0))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
    assert (low, high) == (10, 23)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    want = f * ((1 - ramp) + ramp / 40.0)
    got = inv_frequencies(V3_YARN, dim)
    assert got.shape == (dim // 2,)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got[:low], f[:low], rtol=1e-6)  # high frequencies: unchanged
    np.testing.assert_allclose(got[high:], f[high:] / 40.0, rtol=1e-6)  # low: interpolated
    mid = slice(low + 1, high)
    assert (got[mid] < f[mid]).all() and (got[mid] > f[mid] / 40.0).all()


# ---------------------------------------------------------------------------------------------
# Logical axis names and dtypes.

ALLOWED_AXES = {
    None,  # a dimension that is never sharded
    "embed",
    "expert_embed",
    "heads",
    "q_lora",
    "kv_lora",
    "head_dim",
    "experts",
    "mlp",
    "expert_mlp",
    "kv_b_rank",
    "kv_b_heads",
    "kv_b_dim",
    "o_heads",
    "o_dim",
    "o_embed",
    "vocab",
}
STACKED = ("dense_layers", "moe_layers", "mtp")


@pytest.mark.parametrize("q_lora", [64, None])
def test_params_carry_logical_axes(q_lora):
    cfg = replace(TINY, **{"mla.q_lora_rank": q_lora, "mtp.depth": 1})
    model = nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(params) > 20
    for path, var in params:
        assert isinstance(var, nnx.Param)
        axes, shape = var.get_metadata()["axes"], var.get_value().shape
        assert isinstance(axes, tuple) and len(axes) == len(shape), (path, axes, shape)
        if path[0] in STACKED:
            assert axes[0] == "layers", (path, axes)
            axes = axes[1:]
        assert set(axes) <= ALLOWED_AXES, (path, axes)
    names = {"/".join(map(str, p)) for p, _ in params}
    assert ("mtp/block/attn/wq_DHK" in names) == (q_lora is None)

    biases = nnx.to_flat_state(nnx.state(model, RouterBias))
    assert {p for p, _ in biases} == {
        ("moe_layers", "ffn", "router_bias_E"),
        ("mtp", "block", "ffn", "router_bias_E"),
    }
    for _, var in biases:
        assert not isinstance(var, nnx.Param)
        assert var.get_metadata()["axes"] == ("layers", "experts")
        assert var.get_value().dtype == jnp.float32
    assert not any("router_bias" in "/".join(map(str, p)) for p, _ in params)


def test_param_dtype_separate_from_compute_dtype():
    cfg = TINY
    rt = Runtime.of(param_dtype="float32", compute_dtype="bfloat16")
    graphdef, state = model_state(cfg, seed=14, std=0.02, runtime=rt)  # small: no bf16 flips
    assert {a.dtype for a in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
    tokens = jnp.asarray(np.random.default_rng(14).integers(0, cfg.vocab_size, (B, T)))

    @jax.jit
    def run(state, tokens):
        m = nnx.merge(graphdef, state)
        x = m.embed(tokens)
        h, _ = m.trunk(x)
        return x, h, m.forward(tokens), nnx.state(m)

    x, h, out, after = run(state, tokens)
    assert x.dtype == jnp.bfloat16 and h.dtype == jnp.bfloat16
    assert out.hidden.dtype == jnp.bfloat16
    assert out.logits.dtype == jnp.float32 and out.mtp_logits.dtype == jnp.float32
    assert out.balance_loss.dtype == jnp.float32
    assert {a.dtype for a in jax.tree.leaves(after)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(np.asarray(out.logits)).all()
    # bf16 compute tracks the fp32 model (~1% here from bf16 rounding).
    graphdef32 = nnx.split(nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0), runtime=FP32_RT)))[0]
    ref = jax.jit(lambda s, t: nnx.merge(graphdef32, s)(t))(state, tokens)
    err = np.abs(np.asarray(out.logits) - np.asarray(ref))
    assert err.mean() < 0.03 * np.abs(np.asarray(ref)).mean()


def test_bf16_norm_rounds_like_bf16_and_sums_its_scale_gradient_in_fp32():
    rt = Runtime.of(param_dtype="float32", compute_dtype="bfloat16")
    norm = RMSNorm(256, TINY, rt)
    rng = np.random.default_rng(3)
    norm.scale[...] = jnp.asarray(rng.normal(1.0, 0.3, 256), jnp.float32)
    x = jnp.asarray(rng.normal(size=(8, 256, 256)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(8, 256, 256)) * 1e-3, jnp.bfloat16)

    # Forward: the product of the bf16 scale and the bf16 normalized input, rounded once to bf16.
    x64 = np.asarray(x, np.float64)
    normed = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + TINY.rms_norm_eps)
    normed = np.asarray(jnp.asarray(normed, jnp.float32).astype(jnp.bfloat16), np.float64)
    scale = np.asarray(norm.scale[...].astype(jnp.bfloat16), np.float64)
    want = np.asarray(jnp.asarray(scale * normed, jnp.float32).astype(jnp.bfloat16))
    out, vjp = jax.vjp(lambda s: nnx.merge(nnx.graphdef(norm), s)(x), nnx.state(norm))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), want)

    # Backward: the scale's gradient sums 2048 tokens; in bf16 that sum would be off by ~1%.
    grad = np.asarray(vjp(g)[0]["scale"][...], np.float64)
    exact = (np.asarray(g, np.float64) * normed).sum((0, 1))
    err = np.abs(grad - exact) / np.abs(exact).mean()
    assert np.median(err) < 2e-3 and err.max() < 1e-2


def test_shared_rope_key_sums_its_heads_gradient_in_fp32():
    rng = np.random.default_rng(4)
    k = jnp.asarray(rng.normal(size=(2, 64, 16)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(2, 64, 128, 16)) * 1e-3, jnp.bfloat16)
    out, vjp = jax.vjp(lambda k: shared_by_heads(k, 128), k)
    np.testing.assert_array_equal(
        np.asarray(out), np.broadcast_to(np.asarray(k)[:, :, None], g.shape)
    )
    (grad,) = vjp(g)
    assert grad.dtype == jnp.bfloat16
    exact = np.asarray(g, np.float64).sum(2)
    # One rounding of the exact sum: within half a bf16 ulp (2^-8 of it) of it.
    np.testing.assert_allclose(np.asarray(grad, np.float64), exact, rtol=2**-8, atol=1e-9)
