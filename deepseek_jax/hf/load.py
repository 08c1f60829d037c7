"""Load an official-layout Hugging Face DeepSeek-V2/V3 checkpoint into our model.

Maps every checkpoint tensor onto our parameter tree (transposing PyTorch's [out, in] layout,
splitting fused projections, stacking layers and experts), dequantizes FP8 block-quantized
weights (SPEC §6), and refuses missing, unexpected or mis-shaped tensors by name.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from deepseek_jax.config import ModelConfig, from_hf_config, replace
from deepseek_jax.hf.fp8 import dequantize_fp8_block
from deepseek_jax.hf.mapping import (
    HFTensor,
    hf_tensors,
    is_bias_leaf,
    leaf_specs,
    nest,
    to_ours,
)
from deepseek_jax.hf.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointReader
from deepseek_jax.model import DeepSeek
from deepseek_jax.runtime import Runtime

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint does not match what its config.json describes."""


def check_tensors(
    cfg: ModelConfig, reader: CheckpointReader, block: tuple[int, int] | None
) -> list[HFTensor]:
    """The tensors to read for `cfg`, after checking every name, shape and FP8 scale against the
    checkpoint's headers and refusing tensors the config does not use (nothing is read yet).

    An MTP layer's copies of the embedding and output head are optional (they are shared)."""
    plan, used = [], set()
    for t in hf_tensors(cfg):
        if t.copy and t.name not in reader:
            continue
        if t.name not in reader:
            raise CheckpointError(
                f"checkpoint {reader.directory} is missing tensor {t.name} "
                f"(expected shape {list(t.shape)})"
            )
        got = tuple(reader.shape(t.name))
        if got != t.shape:
            raise CheckpointError(
                f"tensor {t.name} has shape {list(got)}, but config.json implies {list(t.shape)}"
            )
        used.add(t.name)
        if reader.dtype(t.name) == ml_dtypes.float8_e4m3fn:
            scale = f"{t.name}_scale_inv"
            if block is None:
                raise CheckpointError(
                    f"tensor {t.name} is float8_e4m3fn but config.json has no fp8 "
                    "quantization_config"
                )
            if scale not in reader:
                raise CheckpointError(f"FP8 tensor {t.name} has no scale tensor {scale}")
            used.add(scale)
        plan.append(t)
    unexpected = sorted(set(reader.keys()) - used)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"checkpoint has tensors the config does not use: {', '.join(unexpected[:5])}{more}"
        )
    return plan


def read_tensor(
    reader: CheckpointReader, name: str, block: tuple[int, int] | None, fresh: bool = False
) -> np.ndarray:
    """Tensor `name` in its stored dtype, or dequantized to float32 when it is FP8 (SPEC §6).

    fresh=True reads into a new array instead of viewing the memory-mapped file, which keeps the
    resident memory of a streaming conversion bounded."""
    get = reader.read if fresh else reader.get
    value = get(name)
    if value.dtype == ml_dtypes.float8_e4m3fn:
        try:
            return dequantize_fp8_block(value, get(f"{name}_scale_inv"), block)
        except ValueError as e:
            raise CheckpointError(f"FP8 tensor {name}: {e}") from None
    return value


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


def hf_to_arrays(cfg: ModelConfig, reader: CheckpointReader, block: tuple[int, int] | None) -> dict:
    """Our parameter tree (nested dict of float32 NumPy arrays) from an HF checkpoint."""
    plan = check_tensors(cfg, reader, block)
    specs = leaf_specs(cfg)
    flat = {leaf: np.zeros(spec.shape, np.float32) for leaf, spec in specs.items()}
    filled: set[str] = set()
    for t in plan:
        value = read_tensor(reader, t.name, block)
        for part in t.parts:
            piece = to_ours(part, value)
            if t.copy:
                # Embedding and head are shared with the main model (SPEC §4); the checkpoint
                # keeps copies, which we check rather than silently ignore.
                if not np.array_equal(piece, flat[part.leaf][part.index]):
                    log.warning("%s differs from the main model's copy; using the main one", t.name)
                continue
            flat[part.leaf][part.index] = piece
            filled.add(part.leaf)
    # Leaves no HF tensor fills are V2's router biases, which stay zero.
    assert all(leaf in filled or is_bias_leaf(leaf) for leaf in flat), set(flat) - filled
    return nest(flat)


def open_hf(path: str, **overrides) -> tuple[dict, ModelConfig, tuple[int, int] | None]:
    """(config.json dict, ModelConfig, FP8 block or None) of the HF checkpoint directory `path`."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
    with open(config_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None
    block = _fp8_block(hf)
    return hf, from_hf_config(hf, **overrides), block


def is_hf_checkpoint(path: str) -> bool:
    """Whether `path` holds HF weights (a run directory also has a config.json, of another kind)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in (SINGLE_FILE, INDEX_FILE)
    )


def without_absent_mtp(cfg: ModelConfig, reader: CheckpointReader) -> ModelConfig:
    """config.json may announce MTP layers that the checkpoint lacks (transformers drops them)."""
    probe = f"model.layers.{cfg.num_layers}.eh_proj.weight"
    if cfg.mtp.depth and probe not in reader:
        log.info(
            "config.json has %d MTP layer(s) but %s is absent: loading without MTP",
            cfg.mtp.depth,
            probe,
        )
        cfg = replace(cfg, **{"mtp.depth": 0})
    return cfg


def load(
    path: str | os.PathLike,
    *,
    compute_dtype: str = "float32",
    param_dtype: str = "float32",
    scan_layers: bool = True,
    mesh_sharding=None,
) -> DeepSeek:
    """A DeepSeek model with the weights at `path`: an HF checkpoint directory (config.json plus
    safetensors), a directory written by `hf_to_orbax`, or a training run directory, its
    `checkpoints/` directory or one step directory (the newest step is used).

    `mesh_sharding` (a `deepseek_jax.sharding.Sharding`) places the weights on its mesh by its
    rules. Orbax checkpoints are restored shard by shard; HF checkpoints are read into host
    memory first (convert them with `hf_to_orbax` to load models larger than one host).

    `m(tokens)` on int tokens [B, T] returns the main logits [B, T, V]; `m.forward` also returns
    MTP logits and routing statistics.
    """
    path = os.fspath(path)
    knobs = dict(compute_dtype=compute_dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    if os.path.isdir(path) and not is_hf_checkpoint(path):
        from deepseek_jax.hf.orbax_io import find_source, load_orbax

        if find_source(path, required=False) is not None:
            return load_orbax(path, **knobs, mesh_sharding=mesh_sharding)
    _, cfg, block = open_hf(path)
    with CheckpointReader(path) as reader:
        cfg = without_absent_mtp(cfg, reader)
        arrays = hf_to_arrays(cfg, reader, block)
    model = from_arrays(cfg, arrays, Runtime.of(mesh_sharding, **knobs))
    if mesh_sharding is not None:
        from deepseek_jax.sharding import state_shardings

        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh_sharding)))
    return model


def from_arrays(cfg: ModelConfig, arrays: dict, runtime: Runtime | None = None) -> DeepSeek:
    """A model whose parameters are `arrays` (a nested dict matching our parameter tree), run
    with `runtime` (default `Runtime.default()`)."""
    abstract = nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0), runtime=runtime))
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


__all__ = [
    "CheckpointError",
    "check_tensors",
    "from_arrays",
    "hf_to_arrays",
    "load",
    "open_hf",
    "read_tensor",
]
