"""The blocked routed experts (ops/moe_blocked.py) equal the general sorted path on
jax.lax.ragged_dot: values and every gradient, any routing (idle experts, one expert taking
everything, ragged tiles), fp32 and bf16; and they move rows with gathers only."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model import dispatch
from deepseek_jax.ops.moe_blocked import moe_blocked

D, F, K = 16, 24, 4


def _problem(n, e, routing, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (n, D))
    weights = jax.random.uniform(ks[1], (n, K), minval=0.1, maxval=1.0)
    gate = jax.random.normal(ks[2], (e, D, F)) / np.sqrt(D)
    up = jax.random.normal(ks[3], (e, D, F)) / np.sqrt(D)
    down = jax.random.normal(ks[4], (e, F, D)) / np.sqrt(F)
    if routing == "uniform":
        scores = jax.random.uniform(ks[5], (n, e))
    elif routing == "skewed":  # the first experts take most pairs, the last ones none
        scores = jax.random.uniform(ks[5], (n, e)) - 0.3 * jnp.arange(e)
    else:  # "idle": only experts 2..K+1 are ever chosen
        scores = jnp.zeros((n, e)).at[:, 2 : K + 2].set(1.0 + jax.random.uniform(ks[5], (n, K)))
    experts = jax.lax.top_k(scores, K)[1].astype(jnp.int32)
    cot = jax.random.normal(ks[6], (n, D))
    cast = lambda a: a.astype(dtype)  # noqa: E731
    return cast(x), weights, cast(gate), cast(up), cast(down), experts, cot


def _value_and_grads(fn, x, weights, gate, up, down, experts, cot):
    def loss(*a):
        y = fn(*a)
        return jnp.sum(y * cot), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
        x, weights, gate, up, down
    )
    return y, grads


def _reference(experts):
    return lambda x, w, g, u, d: dispatch._local(x, experts, w, g, u, d, impl="ragged_dot")


def _blocked(experts, tile=None):
    return lambda x, w, g, u, d: moe_blocked(x, experts, w, g, u, d, tile)


NAMES = ("x", "weights", "gate", "up", "down")


@pytest.mark.parametrize(
    "n,e,routing,tile",
    [
        (64, 16, "uniform", None),
        (64, 16, "skewed", None),
        (37, 8, "idle", 4),  # ragged tiles, idle experts
        (9, 16, "uniform", 1),  # one row per tile
        (100, 4, "uniform", 64),  # every expert active, big tiles
    ],
)
def test_fp32_matches_sorted_ragged_dot(n, e, routing, tile):
    problem = _problem(n, e, routing)
    experts = problem[5]
    with jax.default_matmul_precision("highest"):
        y, grads = _value_and_grads(_blocked(experts, tile), *problem)
        y_ref, grads_ref = _value_and_grads(_reference(experts), *problem)
    assert y.dtype == jnp.float32 and y.shape == (n, D)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-5, err_msg=f"d/d{name}")
        assert np.abs(np.asarray(g_ref)).max() > 0.05, name
    if routing == "idle":  # experts nobody chose get exactly zero gradient
        for g in grads[2:]:
            assert not np.any(np.asarray(g)[:2]) and not np.any(np.asarray(g)[K + 2 :])


def test_bfloat16_within_rounding_of_fp32():
    # bf16 operands, fp32 accumulation: against the fp32 reference on the same (rounded)
    # inputs, every value and gradient is within a few bf16 roundings of the largest entry.
    problem = _problem(96, 16, "uniform", seed=1, dtype=jnp.bfloat16)
    experts = problem[5]
    y, grads = _value_and_grads(_blocked(experts), *problem)
    as32 = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in problem]
    with jax.default_matmul_precision("highest"):
        y_ref, grads_ref = _value_and_grads(_reference(experts), *as32)
    assert y.dtype == jnp.float32
    for name, got, want in zip(("y", *NAMES), (y, *grads), (y_ref, *grads_ref), strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want)
        assert got.dtype == want.dtype
        scale = np.abs(want).max()
        assert scale > 0.05, name
        assert np.abs(got - want).max() <= 3 * 2.0**-8 * scale, name


def test_rows_move_by_gathers_only():
    problem = _problem(64, 16, "uniform")
    experts, cot = problem[5], problem[6]

    def loss(x, w, g, u, d):
        return jnp.sum(moe_blocked(x, experts, w, g, u, d) * cot)

    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*problem[:5]))
    scatters = re.findall(r"\w+:(\w+)\[([\d,]*)\] = scatter", text)
    # Left: the pair -> slot table (ints) and the per-expert weight-gradient sums; no token row
    # is scattered in either direction.
    assert scatters
    for dtype, shape in scatters:
        assert dtype == "i32" or shape in (f"16,{D},{F}", f"16,{F},{D}"), (dtype, shape)


def test_shape_mismatch_is_named():
    x, weights, gate, up, down, experts, _ = _problem(8, 4, "uniform")
    with pytest.raises(ValueError, match="do not fit"):
        moe_blocked(x, experts, weights, gate, up, down[:, :, :-1])


def test_local_dispatch_takes_it_on_cpu():
    # The one-device dispatch with the blocked kernel is this function, bit for bit.
    problem = _problem(64, 16, "uniform")
    x, weights, gate, up, down, experts, _ = problem
    via_dispatch = jax.jit(
        lambda *a: dispatch._local(*a, impl="blocked", platform="cpu"),
    )(x, experts, weights, gate, up, down)
    direct = jax.jit(lambda *a: moe_blocked(*a))(x, experts, weights, gate, up, down)
    np.testing.assert_array_equal(via_dispatch, direct)


def _cyclic_experts(n, e, shift):
    """Token i takes experts (shift·i + j) mod e, j < K: every expert gets the same rows."""
    return ((shift * jnp.arange(n)[:, None] + jnp.arange(K)[None]) % e).astype(jnp.int32)


@pytest.mark.parametrize(
    "n,e,tile,experts,chunks_computed",
    [
        # 4 experts each with 32 rows: whole tiles, the layout needs no tile past ceil(NK/t).
        (32, 4, 8, None, 0),
        # experts 2..5 with 37 rows each: 40 tiles of 4, the first of two chunks past 37.
        (37, 8, 4, "idle", 1),
        # 16 experts with 4 rows each: 16 half-empty tiles of 8, past the base 8 in both chunks.
        (16, 16, 8, "cyclic", 2),
    ],
)
def test_tiles_past_the_layout_are_skipped_exactly(n, e, tile, experts, chunks_computed):
    from deepseek_jax.ops import moe_blocked as mb

    problem = list(_problem(n, e, "idle" if experts == "idle" else "uniform"))
    if experts is None:
        problem[5] = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (n, K))
    elif experts == "cyclic":
        problem[5] = _cyclic_experts(n, e, 1)
    routed = problem[5]
    sizes = np.bincount(np.asarray(routed).reshape(-1), minlength=e)
    used = int(np.sum(-(-sizes // tile)))
    segments = mb._segments(n * K, e, tile)
    assert len(segments) == 1 + mb.EXCESS_CHUNKS
    assert sum(used > a for a, _ in segments[1:]) == chunks_computed
    with jax.default_matmul_precision("highest"):
        y, grads = _value_and_grads(_blocked(routed, tile), *problem)
        y_ref, grads_ref = _value_and_grads(_reference(routed), *problem)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-5, err_msg=f"d/d{name}")
