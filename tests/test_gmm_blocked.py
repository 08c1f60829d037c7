"""The blocked grouped matmul equals jax.lax.ragged_dot: values and gradients, every layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.ops.gmm_blocked import gmm_blocked, num_tiles, tile_rows


def _problem(seed, m, e, d, f, total, empty=(), dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(total, np.ones(e) / e) if total else np.zeros(e, np.int64)
    for g in empty:  # move that group's rows to its neighbour
        sizes[(g + 1) % e] += sizes[g]
        sizes[g] = 0
    x = jnp.asarray(rng.normal(size=(m, d)), dtype)
    w = jnp.asarray(rng.normal(size=(e, d, f)), dtype)
    ct = jnp.asarray(rng.normal(size=(m, f)), jnp.float32)
    return x, w, jnp.asarray(sizes, jnp.int32), ct


CASES = [
    # m, e, d, f, rows in groups, empty groups, tile
    (64, 4, 8, 6, 64, (), None),
    (64, 4, 8, 6, 50, (1,), None),  # rows past sum(group_sizes)
    (37, 5, 8, 6, 30, (0, 3), 4),  # empty first group, ragged tiles
    (37, 5, 8, 6, 30, (2,), 1),  # one row per tile (the decode layout)
    (200, 16, 16, 8, 200, (4, 5, 6), 8),
    (10, 3, 4, 4, 0, (), 2),  # no routed rows at all
    (48, 2, 8, 8, 48, (1,), 64),  # one tile bigger than all rows
]


@pytest.mark.parametrize("m,e,d,f,total,empty,tile", CASES)
def test_matches_ragged_dot(m, e, d, f, total, empty, tile):
    x, w, sizes, ct = _problem(0, m, e, d, f, total, empty)
    ref = jax.lax.ragged_dot(x, w, sizes)
    out = jax.jit(gmm_blocked, static_argnums=3)(x, w, sizes, tile)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(out[int(sizes.sum()) :]))  # rows past the groups are zero

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * ct)

    grads_ref = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, sizes)), (0, 1))(x, w)
    grads = jax.jit(jax.grad(loss(lambda x, w: gmm_blocked(x, w, sizes, tile)), (0, 1)))(x, w)
    for got, want in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(grads[0][int(sizes.sum()) :]))


@pytest.mark.parametrize("tile", [None, 1, 4])
def test_bfloat16_matches_ragged_dot(tile):
    # bf16 operands, fp32 accumulation (the weight gradient contracts each tile's rows as two
    # axes when the tile has an even number of them; tile 1 takes the one-axis form).
    x, w, sizes, ct = _problem(1, 96, 8, 16, 8, 90, (3,), jnp.bfloat16)
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    out = gmm_blocked(x, w, sizes, tile)
    assert out.dtype == jnp.bfloat16
    ref = jax.lax.ragged_dot(x32, w32, sizes)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.1, rtol=2e-2)

    def loss(fn, x, w):
        return jnp.sum(fn(x, w).astype(jnp.float32) * ct)

    grads = jax.jit(
        jax.grad(lambda x, w: loss(lambda x, w: gmm_blocked(x, w, sizes, tile), x, w), (0, 1))
    )(x, w)
    grads_ref = jax.grad(
        lambda x, w: loss(lambda x, w: jax.lax.ragged_dot(x, w, sizes), x, w), (0, 1)
    )(x32, w32)
    for got, want in zip(grads, grads_ref, strict=True):
        assert got.dtype == jnp.bfloat16
        scale = float(np.abs(np.asarray(want)).max())
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2 * scale, rtol=2e-2)


def test_tile_size_follows_rows_per_group():
    """Decode-sized inputs take one-row tiles (the per-pair path relies on it); many rows per
    group take large tiles; many groups for the rows take smaller ones."""
    assert [tile_rows(m, 16) for m in (1, 4, 8, 16)] == [1, 1, 1, 1]
    assert tile_rows(8192, 8) == tile_rows(8192, 16) == 256
    assert tile_rows(8192, 64) < tile_rows(8192, 16)
    assert tile_rows(8192, 256) < tile_rows(8192, 64)


def test_tile_count_bounds_every_split():
    """The static tile count covers the worst splits of M rows over G groups: every group one
    row past a whole tile (most padding), and random splits."""
    rng = np.random.default_rng(0)
    for m, g in [(8192, 16), (8192, 64), (100, 7), (4, 16), (33, 4)]:
        t = tile_rows(m, g)
        assert t & (t - 1) == 0 and t <= max(m, 1)
        splits = [rng.multinomial(m, rng.dirichlet(np.ones(g))) for _ in range(200)]
        per = m // g
        adversarial = np.full(g, (per - 1) // t * t + 1 if per else 0)
        adversarial[0] += m - adversarial.sum()
        for sizes in [*splits, adversarial]:
            assert num_tiles(m, g, t) >= sum(-(-int(s) // t) for s in sizes)
