"""Grouped matmul implementations (deepseek_jax/ops/grouped_matmul.py) against a plain reference.

The reference is written here in numpy from the definition: row m of the output is x[m] @ w[g]
for the group g whose row range holds m, and zero past the last group. Forward and gradients
(with respect to x and w) of every implementation are compared to it; megablox (the TPU Pallas
kernel) runs in Pallas interpret mode on CPU. Tolerance: 1e-5 absolute on values of order 1-10
(fp32 at the "highest" matmul precision; sums run in another order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.ops import grouped_matmul as gm

M, D, F = 40, 32, 48
# Empty groups, a last group ending before M (rows 36.. belong to no group), one of 0 at the end.
SIZES = [5, 0, 20, 11, 0]


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"), jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="module")
def problem():
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (M, D), jnp.float32)
    w = jax.random.normal(kw, (len(SIZES), D, F), jnp.float32) / np.sqrt(D)
    cot = jax.random.normal(kc, (M, F), jnp.float32)
    return x, w, jnp.asarray(SIZES, jnp.int32), cot


def reference(x, w, sizes, cot):
    """Output, d<out, cot>/dx and /dw from the definition, in float64 numpy."""
    x, w, cot = (np.asarray(a, np.float64) for a in (x, w, cot))
    out, dx, dw = np.zeros((M, F)), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for g, size in enumerate(np.asarray(sizes)):
        rows = slice(start, start + size)
        out[rows] = x[rows] @ w[g]
        dx[rows] = cot[rows] @ w[g].T
        dw[g] = x[rows].T @ cot[rows]
        start += size
    return out, dx, dw


@pytest.mark.parametrize("impl", ["ragged_dot", "megablox", "auto"])
def test_forward_and_gradients_match_the_definition(problem, impl):
    x, w, sizes, cot = problem

    def f(x, w):
        return gm.grouped_matmul(x, w, sizes, impl=impl)

    out, vjp = jax.vjp(jax.jit(f), x, w)
    dx, dw = vjp(cot)
    want_out, want_dx, want_dw = reference(x, w, sizes, cot)
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=0)
    np.testing.assert_allclose(dx, want_dx, atol=1e-5, rtol=0)
    np.testing.assert_allclose(dw, want_dw, atol=1e-5, rtol=0)
    # Rows past the last group are exactly zero, and so is their gradient.
    end = sum(SIZES)
    assert np.all(np.asarray(out)[end:] == 0) and np.all(np.asarray(dx)[end:] == 0)
    # Empty groups get a zero weight gradient.
    assert np.all(np.asarray(dw)[[1, 4]] == 0)


def test_megablox_equals_ragged_dot_when_rows_past_the_groups_hold_nan(problem):
    """Padding rows may hold anything (NaN from an unwritten buffer): outputs and gradients of
    the real rows are unaffected and padding rows still come out zero."""
    x, w, sizes, cot = problem
    x = x.at[sum(SIZES) :].set(jnp.nan)
    got = {}
    for impl in ("ragged_dot", "megablox"):
        out, vjp = jax.vjp(lambda x, w, impl=impl: gm.grouped_matmul(x, w, sizes, impl=impl), x, w)
        got[impl] = (out, *vjp(cot))
    for a, b in zip(got["megablox"], got["ragged_dot"], strict=True):
        assert not np.any(np.isnan(np.asarray(a)))
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_megablox_tiling_divides_or_spans_each_dimension():
    assert gm.megablox_tiling(32768, 7168, 2048) == (512, 1024, 1024)
    assert gm.megablox_tiling(40, 7168, 1536) == (40, 1024, 512)  # 1536 = 3·512
    assert gm.megablox_tiling(1000, 32, 48) == (512, 32, 48)  # small dims: the whole dim
    assert gm.megablox_tiling(13, 256, 640) == (16, 256, 128)


def test_auto_resolves_by_backend_and_unknown_names_fail():
    want = {"tpu": "megablox", "cpu": "blocked"}.get(jax.default_backend(), "ragged_dot")
    assert gm.resolve("auto") == want
    assert gm.resolve("auto", "cpu") == "blocked" and gm.resolve("auto", "gpu") == "ragged_dot"
    with pytest.raises(ValueError, match=r"runtime.grouped_matmul='cutlass' .*'ragged_dot'"):
        gm.grouped_matmul(jnp.ones((4, 2)), jnp.ones((1, 2, 3)), jnp.array([4]), impl="cutlass")


def test_registered_kernels_are_selectable(problem, monkeypatch):
    x, w, sizes, cot = problem
    calls = []

    def dense_masked(x_md, w_EDF, sizes_e):  # a correct (slow) kernel: every group, masked
        calls.append(x_md.shape)
        group_m = jnp.searchsorted(jnp.cumsum(sizes_e), jnp.arange(x_md.shape[0]), side="right")
        out_emd = jnp.einsum("md,edf->emf", x_md, w_EDF)
        keep_em = group_m[None, :] == jnp.arange(w_EDF.shape[0])[:, None]
        return jnp.einsum("emf,em->mf", out_emd, keep_em.astype(x_md.dtype))

    monkeypatch.setitem(gm.IMPLS, "dense_masked", dense_masked)
    gm.register("dense_masked", dense_masked)
    out = gm.grouped_matmul(x, w, sizes, impl="dense_masked")
    assert calls == [(M, D)]
    np.testing.assert_allclose(out, reference(x, w, sizes, cot)[0], atol=1e-5, rtol=0)
