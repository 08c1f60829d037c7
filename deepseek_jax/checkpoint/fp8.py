"""Block-scaled FP8 weights as in the official DeepSeek-V3 release (SPEC §6).

A weight ``W`` of shape ``[M, N]`` is stored as ``Wq`` (float8_e4m3fn, same shape) plus a float32
``scale_inv`` of shape ``[ceil(M/bm), ceil(N/bn)]`` with the block ``(bm, bn) = (128, 128)``.
Despite its name the scale multiplies::

    W[i, j] = float32(Wq[i, j]) * scale_inv[i // bm, j // bn]

Edge blocks may be partial when M or N is not a multiple of the block size. Both functions also
accept leading batch dimensions (e.g. stacked experts ``[E, M, N]`` with scales ``[E, mb, nb]``);
the block always covers the last two axes.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

__all__ = ["E4M3_MAX", "dequantize_fp8_block", "dequantize_fp8_slice", "quantize_fp8_block"]

E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448.0


def _block_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    bm, bn = block
    if bm <= 0 or bn <= 0:
        raise ValueError(f"block sizes must be positive, got {block}")
    if len(shape) < 2:
        raise ValueError(f"FP8 block weights must have at least 2 dimensions, got shape {shape}")
    return -(-shape[-2] // bm), -(-shape[-1] // bn)


def _to_blocks(x: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[..., M, N] -> [..., mb, bm, nb, bn], zero-padding M and N up to block multiples."""
    bm, bn = block
    mb, nb = _block_grid(x.shape, block)
    pad_m, pad_n = mb * bm - x.shape[-2], nb * bn - x.shape[-1]
    if pad_m or pad_n:
        x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad_m), (0, pad_n)])
    return x.reshape(*x.shape[:-2], mb, bm, nb, bn)


def _from_blocks(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``_to_blocks``: [..., mb, bm, nb, bn] -> [..., M, N] (crops the padding)."""
    *lead, mb, bm, nb, bn = x.shape
    x = x.reshape(*lead, mb * bm, nb * bn)
    if x.shape[-2:] != shape[-2:]:
        x = x[..., : shape[-2], : shape[-1]]
    return x


def dequantize_fp8_block(
    w_fp8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)
) -> np.ndarray:
    """Return the float32 weight ``W[i, j] = f32(w_fp8[i, j]) * scale_inv[i // bm, j // bn]``.

    Raises ``ValueError`` if ``scale_inv.shape != w_fp8.shape[:-2] + (ceil(M/bm), ceil(N/bn))``.
    """
    w_fp8 = np.asarray(w_fp8)
    scale_inv = np.asarray(scale_inv)
    block = (int(block[0]), int(block[1]))
    mb, nb = _block_grid(w_fp8.shape, block)
    expected = (*w_fp8.shape[:-2], mb, nb)
    if scale_inv.shape != expected:
        raise ValueError(
            f"FP8 scale_inv has shape {scale_inv.shape}, but a weight of shape {w_fp8.shape} "
            f"with block {block} needs {expected}"
        )
    blocks = _to_blocks(w_fp8.astype(np.float32), block)
    blocks *= scale_inv.astype(np.float32)[..., :, None, :, None]
    return np.ascontiguousarray(_from_blocks(blocks, w_fp8.shape))


def quantize_fp8_block(
    w: np.ndarray, block: tuple[int, int] = (128, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w`` to float8_e4m3fn with one float32 scale per block.

    Each block's scale is ``amax / 448`` (``amax`` = largest absolute value in the block), so the
    block's largest entry maps to the e4m3 maximum; all-zero blocks get scale 1. Returns
    ``(w_fp8, scale_inv)`` such that ``dequantize_fp8_block(w_fp8, scale_inv, block) ~= w``; the
    rounding error per entry is at most ``|w| / 16`` plus ``scale * 2**-10`` (e4m3 subnormals).
    """
    w = np.asarray(w, dtype=np.float32)
    block = (int(block[0]), int(block[1]))
    if not np.all(np.isfinite(w)):
        raise ValueError("quantize_fp8_block: weight contains NaN or Inf")
    blocks = _to_blocks(w, block)  # [..., mb, bm, nb, bn]
    amax = np.abs(blocks).max(axis=(-3, -1))  # [..., mb, nb]
    scale = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)
    q = blocks / scale[..., :, None, :, None]
    # amax / (amax / 448) can round a hair above 448; e4m3fn has no Inf, so clip before casting.
    np.clip(q, -E4M3_MAX, E4M3_MAX, out=q)
    w_fp8 = _from_blocks(q.astype(ml_dtypes.float8_e4m3fn), w.shape)
    return np.ascontiguousarray(w_fp8), scale


def dequantize_fp8_slice(
    w_fp8: np.ndarray,
    scale_inv: np.ndarray,
    block: tuple[int, int],
    shape: tuple[int, int],
    view: tuple[int, ...],
    bounds: list[tuple[int, int]],
) -> np.ndarray:
    """float32 ``W.reshape(view)[bounds]`` from the same slice ``w_fp8`` of the FP8 weight.

    ``shape`` is the weight's stored 2-D shape ``[M, N]`` (whose blocks the scales cover) and
    ``view`` a reshape of it whose leading axes split M and trailing axes split N (as the
    checkpoint mapping's views do). Only the slice is ever materialized, plus one row of scales.
    """
    m, n = shape
    bm, bn = int(block[0]), int(block[1])
    expected = _block_grid(shape, (bm, bn))
    if scale_inv.shape != expected:
        raise ValueError(
            f"FP8 scale_inv has shape {scale_inv.shape}, but a weight of shape {shape} with "
            f"block {block} needs {expected}"
        )
    split = next((k for k in range(len(view) + 1) if math.prod(view[:k]) == m), None)
    if split is None or math.prod(view[split:]) != n:
        raise ValueError(f"view {view} does not split the FP8 weight's axes {shape}")

    def flat(axes, sizes):  # row-major positions along M (or N) of the sliced coordinates
        grids = np.meshgrid(*[np.arange(a, b) for a, b in axes], indexing="ij")
        return np.ravel_multi_index(grids, sizes).reshape(-1) if axes else np.zeros(1, np.int64)

    rows, cols = flat(bounds[:split], view[:split]), flat(bounds[split:], view[split:])
    out = w_fp8.astype(np.float32).reshape(rows.size, cols.size)
    col_blocks = cols // bn
    row_blocks = rows // bm  # non-decreasing: the slice keeps row-major order
    edges = np.flatnonzero(np.diff(row_blocks)) + 1
    for r0, r1 in zip([0, *edges], [*edges, rows.size], strict=True):
        out[r0:r1] *= scale_inv[row_blocks[r0], col_blocks].astype(np.float32)
    return out.reshape(w_fp8.shape)
