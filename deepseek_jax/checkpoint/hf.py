"""Reading Hugging Face DeepSeek-V2/V3 checkpoints: the tensors a model needs, checked against
the headers before anything is read, in their stored dtype or dequantized from FP8 (SPEC §6).

Every checkpoint tensor maps onto our parameter tree through `mapping.hf_tensors` (transposing
PyTorch's [out, in] layout, splitting fused projections, stacking layers and experts);
missing, unexpected or mis-shaped tensors are refused by name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from deepseek_jax.checkpoint.errors import CheckpointError
from deepseek_jax.checkpoint.fp8 import dequantize_fp8_block, dequantize_fp8_slice
from deepseek_jax.checkpoint.mapping import HFTensor, Part, hf_tensors
from deepseek_jax.checkpoint.safetensors_io import CheckpointReader
from deepseek_jax.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["LeafSlices", "check_tensors", "read_tensor"]


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


class LeafSlices:
    """Any slice of any leaf of our (layer- and expert-stacked) tree, gathered from the HF
    tensors that fill it and reading only their rows and columns that fall in the slice.

    A device's shard of `moe_layers.ffn.gate_EDF[L, E, D, F]` spans several HF tensors (one per
    layer and expert); each is read through `CheckpointReader.read_slice` and FP8 weights are
    dequantized slice by slice, so memory stays near the size of the slice asked for."""

    def __init__(self, reader: CheckpointReader, plan: list[HFTensor], block):
        self.reader, self.block = reader, block
        self.parts: dict[str, list[tuple[HFTensor, Part]]] = {}
        self.copies = [t for t in plan if t.copy]
        for t in plan:
            if not t.copy:
                for part in t.parts:
                    self.parts.setdefault(part.leaf, []).append((t, part))

    def read(self, leaf: str, shape: Sequence[int], dtype, index: Sequence[slice]) -> np.ndarray:
        """`leaf[index]` as `dtype`; leaves no HF tensor fills (V2's router biases) are zero."""
        bounds = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]
        out = np.zeros([b - a for a, b in bounds], dtype)
        for t, part in self.parts.get(leaf, ()):
            lead = len(part.index)
            if not all(a <= i < b for i, (a, b) in zip(part.index, bounds, strict=False)):
                continue
            view_bounds: list[tuple[int, int]] = [(0, 0)] * len(part.view)
            for ours, (a, b) in enumerate(bounds[lead:]):
                view_bounds[part.perm[ours]] = (a, b)
            if part.span is not None:
                a, b = view_bounds[part.axis]
                view_bounds[part.axis] = (a + part.span[0], b + part.span[0])
            piece = self.read_view(t.name, t.shape, part.view, view_bounds)
            at = tuple(i - a for i, (a, _) in zip(part.index, bounds, strict=False))
            out[at] = piece.transpose(part.perm)
        return out

    def read_view(self, name: str, shape, view, bounds) -> np.ndarray:
        """HF tensor `name` viewed as `view`, cut to `bounds`, dequantized when FP8."""
        index = tuple(slice(a, b) for a, b in bounds)
        value = self.reader.read_slice(name, index, view)
        if value.dtype != ml_dtypes.float8_e4m3fn:
            return value
        try:
            scale = self.reader.read(f"{name}_scale_inv")
            return dequantize_fp8_slice(value, scale, self.block, tuple(shape), view, bounds)
        except ValueError as e:
            raise CheckpointError(f"FP8 tensor {name}: {e}") from None

    def check_copies(self, rows_per_read: int = 4096) -> None:
        """An MTP layer's embedding and head copies should equal the main ones (SPEC §4): warn,
        naming the tensor, when they do not (compared in row blocks, never whole)."""
        for t in self.copies:
            main = "model.embed_tokens.weight" if "embed" in t.name else "lm_head.weight"
            rows, cols = t.shape
            for r in range(0, rows, rows_per_read):
                cut = [(r, min(rows, r + rows_per_read)), (0, cols)]
                a = self.read_view(t.name, t.shape, t.shape, cut)
                b = self.read_view(main, t.shape, t.shape, cut)
                if not np.array_equal(a, b):
                    log.warning(
                        "%s differs from the main model's %s; using the main one", t.name, main
                    )
                    break
