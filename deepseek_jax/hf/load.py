"""Load an official-layout Hugging Face DeepSeek-V2/V3 checkpoint into our model.

Maps every checkpoint tensor onto our parameter tree (transposing PyTorch's [out, in] layout,
splitting fused projections, stacking layers and experts), dequantizes FP8 block-quantized
weights (SPEC §6), and refuses missing, unexpected or mis-shaped tensors by name.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from deepseek_jax.config import ModelConfig, from_hf_config, replace
from deepseek_jax.hf.fp8 import dequantize_fp8_block
from deepseek_jax.hf.safetensors_io import CheckpointReader
from deepseek_jax.model import DeepSeek

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint does not match what its config.json describes."""


class _Tensors:
    """Reads named tensors as float32, dequantizing FP8 ones, and remembers what was used."""

    def __init__(self, reader: CheckpointReader, block: tuple[int, int] | None):
        self.reader, self.block, self.used = reader, block, set()

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.reader:
            raise CheckpointError(
                f"checkpoint is missing tensor {name} (expected shape {list(shape)})"
            )
        got = tuple(self.reader.shape(name))
        if got != tuple(shape):
            raise CheckpointError(
                f"tensor {name} has shape {list(got)}, but config.json implies {list(shape)}"
            )
        self.used.add(name)
        value = self.reader.get(name)
        if value.dtype == ml_dtypes.float8_e4m3fn:
            scale_name = f"{name}_scale_inv"
            if self.block is None:
                raise CheckpointError(
                    f"tensor {name} is {value.dtype} but config.json has no fp8 quantization_config"
                )
            if scale_name not in self.reader:
                raise CheckpointError(f"FP8 tensor {name} has no scale tensor {scale_name}")
            self.used.add(scale_name)
            return dequantize_fp8_block(value, self.reader.get(scale_name), self.block)
        return np.asarray(value, dtype=np.float32)


def _fp8_block(hf: dict) -> tuple[int, int] | None:
    quant = hf.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"unsupported quant_method {method!r} in config.json (only 'fp8')")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"unsupported fp8 fmt {fmt!r} in config.json (only 'e4m3')")
    block = quant.get("weight_block_size", [128, 128])
    if len(block) != 2:
        raise CheckpointError(f"weight_block_size {block} must have two entries")
    return int(block[0]), int(block[1])


def _block(cfg: ModelConfig, kind: str, get: Callable, p: str) -> dict:
    """One decoder block's arrays in our layout, from HF names under prefix `p`."""
    d, h, m = cfg.hidden_size, cfg.num_heads, cfg.mla
    qk, r, dn, dv, dr = (
        m.qk_head_dim,
        m.kv_lora_rank,
        m.qk_nope_head_dim,
        m.v_head_dim,
        m.qk_rope_head_dim,
    )
    a = f"{p}self_attn."
    attn: dict = {}
    if m.q_lora_rank is None:
        attn["wq_DHK"] = get(f"{a}q_proj.weight", (h * qk, d)).reshape(h, qk, d).transpose(2, 0, 1)
    else:
        q = m.q_lora_rank
        attn["wq_a_DQ"] = get(f"{a}q_a_proj.weight", (q, d)).T
        attn["q_norm"] = {"scale": get(f"{a}q_a_layernorm.weight", (q,))}
        attn["wq_b_QHK"] = (
            get(f"{a}q_b_proj.weight", (h * qk, q)).reshape(h, qk, q).transpose(2, 0, 1)
        )
    kv_a = get(f"{a}kv_a_proj_with_mqa.weight", (r + dr, d))
    attn["wkv_a_DR"], attn["wk_rope_DK"] = kv_a[:r].T, kv_a[r:].T
    attn["kv_norm"] = {"scale": get(f"{a}kv_a_layernorm.weight", (r,))}
    kv_b = get(f"{a}kv_b_proj.weight", (h * (dn + dv), r)).reshape(h, dn + dv, r)
    attn["wk_b_RHK"] = kv_b[:, :dn].transpose(2, 0, 1)
    attn["wv_b_RHK"] = kv_b[:, dn:].transpose(2, 0, 1)
    attn["wo_HKD"] = get(f"{a}o_proj.weight", (d, h * dv)).reshape(d, h, dv).transpose(1, 2, 0)

    f = f"{p}mlp."
    if kind == "moe":
        e, fi = cfg.moe.n_routed_experts, cfg.moe.moe_intermediate_size
        bias_name = f"{f}gate.e_score_correction_bias"
        if cfg.moe.topk_method == "noaux_tc":
            bias = get(bias_name, (e,))
        else:  # V2 routers have no correction bias
            bias = np.zeros((e,), np.float32)
        ffn = {
            "router_DE": get(f"{f}gate.weight", (e, d)).T,
            "router_bias_E": bias,
            "gate_EDF": np.stack(
                [get(f"{f}experts.{j}.gate_proj.weight", (fi, d)).T for j in range(e)]
            ),
            "up_EDF": np.stack(
                [get(f"{f}experts.{j}.up_proj.weight", (fi, d)).T for j in range(e)]
            ),
            "down_EFD": np.stack(
                [get(f"{f}experts.{j}.down_proj.weight", (d, fi)).T for j in range(e)]
            ),
        }
        if cfg.moe.n_shared_experts:
            ffn["shared"] = _swiglu(get, f"{f}shared_experts.", d, cfg.moe.n_shared_experts * fi)
    else:
        ffn = _swiglu(get, f, d, cfg.intermediate_size)
    return {
        "attn_norm": {"scale": get(f"{p}input_layernorm.weight", (d,))},
        "attn": attn,
        "ffn_norm": {"scale": get(f"{p}post_attention_layernorm.weight", (d,))},
        "ffn": ffn,
    }


def _swiglu(get: Callable, p: str, d: int, width: int) -> dict:
    return {
        "gate_DF": get(f"{p}gate_proj.weight", (width, d)).T,
        "up_DF": get(f"{p}up_proj.weight", (width, d)).T,
        "down_FD": get(f"{p}down_proj.weight", (d, width)).T,
    }


def _stack(trees: list[dict]) -> dict:
    return jax.tree.map(lambda *a: np.stack(a), *trees)


def hf_to_arrays(cfg: ModelConfig, reader: CheckpointReader, block: tuple[int, int] | None) -> dict:
    """Our parameter tree (nested dict of float32 NumPy arrays) from an HF checkpoint."""
    get = _Tensors(reader, block)
    d, v = cfg.hidden_size, cfg.vocab_size
    kinds = cfg.layer_kinds
    tree: dict = {
        "embed": {"table_VD": get("model.embed_tokens.weight", (v, d))},
        "final_norm": {"scale": get("model.norm.weight", (d,))},
        "lm_head_DV": get("lm_head.weight", (v, d)).T,
    }
    for kind in ("dense", "moe"):
        layers = [i for i in range(cfg.num_layers) if kinds[i] == kind]
        if layers:
            tree[f"{kind}_layers"] = _stack(
                [_block(cfg, kind, get, f"model.layers.{i}.") for i in layers]
            )
    if cfg.mtp.depth:
        modules = []
        for k in range(cfg.mtp.depth):
            i = cfg.num_layers + k
            p = f"model.layers.{i}."
            modules.append(
                {
                    "emb_norm": {"scale": get(f"{p}enorm.weight", (d,))},
                    "hidden_norm": {"scale": get(f"{p}hnorm.weight", (d,))},
                    "proj_2DD": get(f"{p}eh_proj.weight", (d, 2 * d)).T,
                    "block": _block(cfg, kinds[i], get, p),
                    "head_norm": {"scale": get(f"{p}shared_head.norm.weight", (d,))},
                }
            )
            # Embedding and head are shared with the main model (SPEC §4); the checkpoint keeps
            # copies, which we check rather than silently ignore.
            for name, ours in (
                (f"{p}embed_tokens.weight", tree["embed"]["table_VD"]),
                (f"{p}shared_head.head.weight", tree["lm_head_DV"].T),
            ):
                if name in reader:
                    if not np.array_equal(get(name, (v, d)), ours):
                        log.warning(
                            "%s differs from the main model's copy; using the main one", name
                        )
        tree["mtp"] = _stack(modules)

    unexpected = sorted(set(reader.keys()) - get.used)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"checkpoint has tensors the config does not use: {', '.join(unexpected[:5])}{more}"
        )
    return tree


def load(
    path: str | os.PathLike,
    *,
    compute_dtype: str = "float32",
    param_dtype: str = "float32",
    scan_layers: bool = True,
) -> DeepSeek:
    """A DeepSeek model with the weights of the HF checkpoint directory at `path`.

    `m(tokens)` on int tokens [B, T] returns the main logits [B, T, V]; `m.forward` also returns
    MTP logits and routing statistics.
    """
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
    with open(config_path) as f:
        hf = json.load(f)
    cfg = from_hf_config(
        hf, compute_dtype=compute_dtype, param_dtype=param_dtype, scan_layers=scan_layers
    )
    with CheckpointReader(path) as reader:
        mtp_probe = f"model.layers.{cfg.num_layers}.eh_proj.weight"
        if cfg.mtp.depth and mtp_probe not in reader:
            # config.json announces MTP layers, but checkpoints written by transformers drop them.
            log.info(
                "config.json has %d MTP layer(s) but %s is absent: loading without MTP",
                cfg.mtp.depth,
                mtp_probe,
            )
            cfg = replace(cfg, **{"mtp.depth": 0})
        arrays = hf_to_arrays(cfg, reader, _fp8_block(hf))
    return from_arrays(cfg, arrays)


def from_arrays(cfg: ModelConfig, arrays: dict) -> DeepSeek:
    """A model whose parameters are `arrays` (a nested dict matching our parameter tree)."""
    abstract = nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = nnx.to_pure_dict(state)
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(arrays)}
    if want.keys() != have.keys():
        raise CheckpointError(
            f"parameter tree mismatch: missing {sorted(want.keys() - have.keys())}, "
            f"unexpected {sorted(have.keys() - want.keys())}"
        )
    for key, spec in want.items():
        if tuple(spec.shape) != tuple(have[key].shape):
            raise CheckpointError(f"parameter {key}: shape {have[key].shape} != {spec.shape}")

    def convert(spec, value):
        return jnp.asarray(value, dtype=spec.dtype)

    nnx.replace_by_pure_dict(state, jax.tree.map(convert, expected, arrays))
    return nnx.merge(graphdef, state)


__all__ = ["CheckpointError", "from_arrays", "hf_to_arrays", "load"]
