"""The one table between Hugging Face checkpoint names and our parameter tree, both directions.

Every HF tensor is described by an `HFTensor`: its name, its [out, in] shape, and the `Part`s of
our (always layer-stacked) tree it fills. A part views the HF tensor as `view`, optionally cuts a
`span` along one axis (kv_a holds the latent and the shared rope key; kv_b holds W_UK and W_UV),
transposes it to our axis order with `perm`, and lands at `leaf[index]`, where `index` picks the
layer slot of the stack and, for routed experts, the expert. Reading HF applies `to_ours`;
writing HF applies `to_hf`, its exact inverse, so a round trip moves bytes without arithmetic.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from deepseek_jax.config import ModelConfig

__all__ = [
    "HFTensor",
    "Part",
    "hf_tensors",
    "is_fp32_leaf",
    "leaf_specs",
    "stack_layout",
    "to_hf",
    "to_ours",
]

BIAS_LEAF = "router_bias_E"


@dataclasses.dataclass(frozen=True)
class Part:
    leaf: str  # dotted path in our tree, e.g. "moe_layers.ffn.gate_EDF"
    index: tuple[int, ...]  # leading indices into the leaf: (layer slot[, expert])
    view: tuple[int, ...]  # the HF tensor reshaped to this
    perm: tuple[int, ...]  # axes of `view` in our order
    axis: int = 0  # axis of `view` that `span` cuts
    span: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]
    # An MTP layer's copy of the embedding or output head, both shared with the main model
    # (SPEC §4): read only to check it, written so the output has the official layout.
    copy: bool = False


def to_ours(part: Part, hf: np.ndarray) -> np.ndarray:
    """The slice `leaf[part.index]` held by `hf` (a view; no copy when none is needed)."""
    x = hf.reshape(part.view)
    if part.span is not None:
        cut = [slice(None)] * x.ndim
        cut[part.axis] = slice(*part.span)
        x = x[tuple(cut)]
    return x.transpose(part.perm)


def to_hf(t: HFTensor, pieces: list[np.ndarray], dtype) -> np.ndarray:
    """The HF tensor `t` from the slices `leaf[part.index]` of its parts, cast to `dtype`."""
    view = t.parts[0].view
    out = np.empty(view, dtype)
    for part, piece in zip(t.parts, pieces, strict=True):
        cut = [slice(None)] * len(view)
        if part.span is not None:
            cut[part.axis] = slice(*part.span)
        out[tuple(cut)] = np.asarray(piece).transpose(np.argsort(part.perm))
    return out.reshape(t.shape)


def _linear(name: str, out: int, inp: int, leaf: str, index: tuple[int, ...]) -> HFTensor:
    """A plain [out, in] weight stored transposed as [in, out]."""
    return HFTensor(name, (out, inp), (Part(leaf, index, (out, inp), (1, 0)),))


def _vector(name: str, n: int, leaf: str, index: tuple[int, ...]) -> HFTensor:
    return HFTensor(name, (n,), (Part(leaf, index, (n,), (0,)),))


def _swiglu(p: str, d: int, width: int, leaf: str, index: tuple[int, ...]) -> list[HFTensor]:
    return [
        _linear(f"{p}gate_proj.weight", width, d, f"{leaf}.gate_DF", index),
        _linear(f"{p}up_proj.weight", width, d, f"{leaf}.up_DF", index),
        _linear(f"{p}down_proj.weight", d, width, f"{leaf}.down_FD", index),
    ]


def _block(cfg: ModelConfig, kind: str, p: str, stack: str, slot: int) -> list[HFTensor]:
    """One decoder block: HF names under prefix `p`, our leaves under `stack` at `slot`."""
    d, h, m = cfg.hidden_size, cfg.num_heads, cfg.mla
    qk, r, dn, dv, dr = (
        m.qk_head_dim,
        m.kv_lora_rank,
        m.qk_nope_head_dim,
        m.v_head_dim,
        m.qk_rope_head_dim,
    )
    i = (slot,)
    a, att = f"{p}self_attn.", f"{stack}.attn"
    out = [_vector(f"{p}input_layernorm.weight", d, f"{stack}.attn_norm.scale", i)]
    if m.q_lora_rank is None:
        q_part = Part(f"{att}.wq_DHK", i, (h, qk, d), (2, 0, 1))
        out.append(HFTensor(f"{a}q_proj.weight", (h * qk, d), (q_part,)))
    else:
        q = m.q_lora_rank
        q_part = Part(f"{att}.wq_b_QHK", i, (h, qk, q), (2, 0, 1))
        out += [
            _linear(f"{a}q_a_proj.weight", q, d, f"{att}.wq_a_DQ", i),
            _vector(f"{a}q_a_layernorm.weight", q, f"{att}.q_norm.scale", i),
            HFTensor(f"{a}q_b_proj.weight", (h * qk, q), (q_part,)),
        ]
    # kv_a rows: the latent c_KV [0, r), then the shared pre-RoPE key [r, r + dr) (SPEC §1).
    kv_a = (r + dr, d)
    out.append(
        HFTensor(
            f"{a}kv_a_proj_with_mqa.weight",
            kv_a,
            (
                Part(f"{att}.wkv_a_DR", i, kv_a, (1, 0), 0, (0, r)),
                Part(f"{att}.wk_rope_DK", i, kv_a, (1, 0), 0, (r, r + dr)),
            ),
        )
    )
    out.append(_vector(f"{a}kv_a_layernorm.weight", r, f"{att}.kv_norm.scale", i))
    # kv_b per head: rows [0, dn) are W_UK, rows [dn, dn + dv) are W_UV (SPEC §1).
    kv_b = (h, dn + dv, r)
    out.append(
        HFTensor(
            f"{a}kv_b_proj.weight",
            (h * (dn + dv), r),
            (
                Part(f"{att}.wk_b_RHK", i, kv_b, (2, 0, 1), 1, (0, dn)),
                Part(f"{att}.wv_b_RHK", i, kv_b, (2, 0, 1), 1, (dn, dn + dv)),
            ),
        )
    )
    out.append(
        HFTensor(
            f"{a}o_proj.weight", (d, h * dv), (Part(f"{att}.wo_HKD", i, (d, h, dv), (1, 2, 0)),)
        )
    )
    out.append(_vector(f"{p}post_attention_layernorm.weight", d, f"{stack}.ffn_norm.scale", i))

    f, ffn = f"{p}mlp.", f"{stack}.ffn"
    if kind == "dense":
        return out + _swiglu(f, d, cfg.intermediate_size, ffn, i)
    e, fi = cfg.moe.n_routed_experts, cfg.moe.moe_intermediate_size
    out.append(_linear(f"{f}gate.weight", e, d, f"{ffn}.router_DE", i))
    if cfg.moe.topk_method == "noaux_tc":  # V2 routers have no correction bias
        out.append(_vector(f"{f}gate.e_score_correction_bias", e, f"{ffn}.{BIAS_LEAF}", i))
    for j in range(e):
        x = f"{f}experts.{j}."
        out += [
            _linear(f"{x}gate_proj.weight", fi, d, f"{ffn}.gate_EDF", (slot, j)),
            _linear(f"{x}up_proj.weight", fi, d, f"{ffn}.up_EDF", (slot, j)),
            _linear(f"{x}down_proj.weight", d, fi, f"{ffn}.down_EFD", (slot, j)),
        ]
    if cfg.moe.n_shared_experts:
        width = cfg.moe.n_shared_experts * fi
        out += _swiglu(f"{f}shared_experts.", d, width, f"{ffn}.shared", i)
    return out


def stack_layout(cfg: ModelConfig) -> dict[str, list[int]]:
    """Which HF layer index sits in each slot of each stack: {"moe_layers": [1, 2, 3], ...}."""
    kinds = cfg.layer_kinds
    out: dict[str, list[int]] = {}
    for i in range(cfg.num_layers):
        out.setdefault(f"{kinds[i]}_layers", []).append(i)
    if cfg.mtp.depth:
        out["mtp"] = [cfg.num_layers + k for k in range(cfg.mtp.depth)]
    return out


def hf_tensors(cfg: ModelConfig) -> list[HFTensor]:
    """Every tensor of the official layout for `cfg`, in checkpoint order (MTP layers included
    when cfg.mtp.depth > 0)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    kinds = cfg.layer_kinds
    embed = (Part("embed.table_VD", (), (v, d), (0, 1)),)
    out = [HFTensor("model.embed_tokens.weight", (v, d), embed)]
    for stack, layers in stack_layout(cfg).items():
        for slot, i in enumerate(layers):
            p = f"model.layers.{i}."
            if stack != "mtp":
                out += _block(cfg, kinds[i], p, stack, slot)
                continue
            s = (slot,)
            out += [
                HFTensor(f"{p}embed_tokens.weight", (v, d), embed, copy=True),
                _vector(f"{p}enorm.weight", d, "mtp.emb_norm.scale", s),
                _vector(f"{p}hnorm.weight", d, "mtp.hidden_norm.scale", s),
                _linear(f"{p}eh_proj.weight", d, 2 * d, "mtp.proj_2DD", s),
                *_block(cfg, kinds[i], p, "mtp.block", slot),
                _vector(f"{p}shared_head.norm.weight", d, "mtp.head_norm.scale", s),
                _linear(f"{p}shared_head.head.weight", v, d, "lm_head_DV", ()),
            ]
            out[-1] = dataclasses.replace(out[-1], copy=True)
    out.sort(key=lambda t: _layer_of(t.name))  # main layers in order, MTP layers last
    out += [
        _vector("model.norm.weight", d, "final_norm.scale", ()),
        _linear("lm_head.weight", v, d, "lm_head_DV", ()),
    ]
    return out


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


def leaf_specs(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Dotted path -> shape and dtype of every leaf of our model (parameters and router biases)."""
    from deepseek_jax.model import DeepSeek

    abstract = nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(abstract))
    return {
        ".".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    }


def is_fp32_leaf(leaf: str) -> bool:
    """Router gate weights and correction biases stay float32 whatever the weights' dtype, as
    transformers keeps them (`_keep_in_fp32_modules_strict`); they are tiny and steer routing."""
    return leaf.endswith((".router_DE", f".{BIAS_LEAF}"))


def is_bias_leaf(leaf: str) -> bool:
    return leaf.endswith(f".{BIAS_LEAF}")


def nest(flat: dict[str, object]) -> dict:
    """{"a.b": x} -> {"a": {"b": x}}."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *head, last = path.split(".")
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    return out
