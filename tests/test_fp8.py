"""Block-scaled FP8 (DeepSeek-V3 release format): dequantization and the test-side quantizer."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from deepseek_jax.checkpoint.fp8 import E4M3_MAX, dequantize_fp8_block, quantize_fp8_block

SHAPES = [(256, 384), (300, 200), (1, 1), (129, 127), (128, 1), (7, 513)]


def torch_dequant(w_fp8: np.ndarray, scale_inv: np.ndarray, block=(128, 128)) -> np.ndarray:
    """Independent reference: torch float8 -> float32 times repeat_interleave'd scales."""
    m, n = w_fp8.shape
    t = torch.from_numpy(w_fp8.view(np.uint8).copy()).view(torch.float8_e4m3fn).float()
    s = torch.from_numpy(scale_inv.astype(np.float32))
    s = s.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)[:m, :n]
    return (t * s).numpy()


def random_fp8(rng, shape, block=(128, 128)):
    w = (rng.standard_normal(shape) * 100).astype(ml_dtypes.float8_e4m3fn)
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    scale = rng.uniform(1e-4, 1e-1, grid).astype(np.float32)
    return w, scale


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_torch(shape):
    rng = np.random.default_rng(0)
    w, scale = random_fp8(rng, shape)
    out = dequantize_fp8_block(w, scale)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_array_equal(out, torch_dequant(w, scale))


def test_dequantize_formula_and_block_boundaries():
    # Entries exactly representable in e4m3; check W[i, j] = Wq[i, j] * S[i // 128, j // 128].
    w = np.full((200, 260), 2.0, dtype=ml_dtypes.float8_e4m3fn)
    scale = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    out = dequantize_fp8_block(w, scale)
    for i, j in [(0, 0), (127, 127), (127, 128), (128, 127), (128, 255), (199, 256), (199, 259)]:
        assert out[i, j] == 2.0 * scale[i // 128, j // 128], (i, j)


def test_dequantize_other_block_and_batch():
    rng = np.random.default_rng(1)
    w, scale = random_fp8(rng, (10, 9), block=(4, 3))
    np.testing.assert_array_equal(
        dequantize_fp8_block(w, scale, block=(4, 3)), torch_dequant(w, scale, block=(4, 3))
    )
    # Stacked experts [E, M, N] with scales [E, mb, nb].
    ws, ss = zip(*(random_fp8(rng, (130, 140)) for _ in range(3)), strict=True)
    out = dequantize_fp8_block(np.stack(ws), np.stack(ss))
    for e in range(3):
        np.testing.assert_array_equal(out[e], torch_dequant(ws[e], ss[e]))


@pytest.mark.parametrize(
    "w_shape, s_shape",
    [((256, 256), (2, 1)), ((129, 128), (1, 1)), ((128, 128), (1, 1, 1)), ((300, 5), (2, 1))],
)
def test_dequantize_bad_scale_shape(w_shape, s_shape):
    w = np.zeros(w_shape, ml_dtypes.float8_e4m3fn)
    expected = (math.ceil(w_shape[0] / 128), math.ceil(w_shape[1] / 128))
    msg = rf"\({s_shape[0]}, .*{w_shape[0]}, {w_shape[1]}.*\({expected[0]}, {expected[1]}\)"
    with pytest.raises(ValueError, match=msg):
        dequantize_fp8_block(w, np.ones(s_shape, np.float32))


def test_dequantize_rejects_1d():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        dequantize_fp8_block(np.zeros(4, ml_dtypes.float8_e4m3fn), np.ones(1, np.float32))


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_round_trip_error_bound(shape):
    """e4m3 keeps 3 mantissa bits, so round-to-nearest errs by at most |x|/16 for normal x and by
    half the subnormal spacing (2**-10) below 2**-6. In weight units, per entry:
        |W - deq(quant(W))| <= |W| / 16 + scale * 2**-10,
    and hence per block: max error <= amax / 16 (amax/448*2**-10 is negligible, still added)."""
    rng = np.random.default_rng(2)
    # Mix magnitudes across blocks so the per-block scaling matters.
    w = rng.standard_normal(shape).astype(np.float32)
    w *= np.exp(rng.uniform(-6, 6, (shape[0], 1))).astype(np.float32)
    w_fp8, scale = quantize_fp8_block(w)
    mb, nb = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
    assert w_fp8.dtype == ml_dtypes.float8_e4m3fn and w_fp8.shape == shape
    assert scale.dtype == np.float32 and scale.shape == (mb, nb)
    assert np.all(np.isfinite(w_fp8.astype(np.float32)))

    deq = dequantize_fp8_block(w_fp8, scale)
    err = np.abs(deq - w)
    s_full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[: shape[0], : shape[1]]
    tol = 1e-6  # float32 rounding of the scale and of the product
    assert np.all(err <= (np.abs(w) / 16 + s_full * 2.0**-10) * (1 + tol) + 1e-30)
    for bi in range(mb):
        for bj in range(nb):
            blk = np.s_[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
            amax = np.abs(w[blk]).max()
            assert scale[bi, bj] == np.float32(amax / np.float32(E4M3_MAX))
            assert err[blk].max() <= amax / 16 * (1 + tol)
            # The block's largest entry maps to the e4m3 maximum.
            assert np.abs(w_fp8[blk].astype(np.float32)).max() == E4M3_MAX
    assert np.linalg.norm(deq - w) <= np.linalg.norm(w) / 16


def test_quantize_matches_torch_cast():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((200, 300)).astype(np.float32)
    w_fp8, scale = quantize_fp8_block(w)
    s = torch.from_numpy(scale).repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    ref = (torch.from_numpy(w) / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    assert w_fp8.view(np.uint8).tobytes() == ref.view(torch.uint8).numpy().tobytes()


def test_quantize_zero_blocks_and_exact_values():
    w = np.zeros((256, 130), np.float32)
    w[:128, :128] = 3.0
    w[130, 129] = -448.0
    w_fp8, scale = quantize_fp8_block(w)
    expected = np.array([[np.float32(3) / np.float32(448), 1], [1, 1]], np.float32)
    np.testing.assert_array_equal(scale, expected)
    assert np.all(w_fp8[:128, 128:].astype(np.float32) == 0)
    np.testing.assert_allclose(dequantize_fp8_block(w_fp8, scale), w, rtol=1e-6)


def test_quantize_rejects_non_finite():
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_fp8_block(np.array([[1.0, np.nan]], np.float32))
