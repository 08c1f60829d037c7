"""A grouped matmul that computes only the routed rows: sorted rows, padded per group to a tile.

    out[m] = x[m] @ w[g(m)] for the first sum(group_sizes) rows, 0 for the rest

`jax.lax.ragged_dot` has no sparse lowering on XLA:CPU: it multiplies every row by every
group's matrix and selects, so a step with E experts pays E/K times the routed work. Here each
group's rows are laid out in tiles of `t` rows, padded with zero rows to whole tiles, and every
tile is multiplied by its own group's matrix in one batched matmul:

    x_ntd = x[src]                 (n tiles of t rows; padding reads a zero row)
    out_ntf = x_ntd @ w[tile_group] (one batched dot, each tile against one gathered matrix)
    out[m] = out_ntf[slot(m)]

The tile count is static: sum_g ceil(s_g/t) <= (M + G(t-1))/t tiles, all of which are computed.
Each tile also copies its group's whole [D, F] matrix, writes its own weight-gradient product
and is one more small matmul in each batched dot, so the tile size trades padding rows against
per-tile costs: `tile_rows` takes the power of two that minimizes tiles x (t + 96), a tile
costing about 96 rows' worth. Fitted to one MoE layer's forward and backward on XLA:CPU (bf16,
top-4, D 256, F 128; ms by t, the chosen one starred):

    16 tokens, 16 experts     t 2: 5.05   t 8: 2.95   t 16*: 2.83   t 32: 3.06
    512 tokens, 64 experts    t 16: 34.2  t 32: 26.7  t 64*: 23.0   t 128: 25.4
    2048 tokens, 64 experts   t 32: 60.7  t 64: 45.5  t 128*: 41.5  t 256: 52.1
    2048 tokens, 32 experts   t 64: 37.9  t 128*: 32.0 t 256: 29.5

(the rule before, padding G(t-1) within M/2, took t 2, 16, 64 and 128 there). These single
layers vary by ~10% between runs (a rerun read 50.5 and 51.0 ms at t 64 and 128 for 2048 tokens
and 64 experts); the whole issue-12 step with 64 experts, both compiled in one process and run in
turns, went 0.389 -> 0.366 s from t 64 to 128 with the one-hot weight-gradient sum. With a decode
step's few rows t falls to 1 and the kernel gathers just the matrices of the rows present.

The gradient (custom VJP) reuses the layout: dx = (g laid out the same way) @ w[tile]^T, and
dw[g] = sum of x_tile^T g_tile over the tiles of group g (a one-hot matmul over tiles). Everything
is plain XLA (gathers, batched dots), so it runs on any backend; it is registered
for CPU, where it replaces the dense lowering of ragged_dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MAX_TILE = 256
# What one tile costs besides its rows, in rows' worth of work: each tile copies its group's
# matrices (forward and backward), writes its own weight-gradient product, and is one more small
# matmul in each batched dot. Fitted on XLA:CPU to one MoE layer's forward and backward (bf16,
# top-4, D 256, F 128); see the module docstring.
TILE_COST_ROWS = 96


def tile_rows(m: int, groups: int) -> int:
    """Rows per tile for M rows in G groups: the power of 2 (at most MAX_TILE) that minimizes the
    static work, num_tiles x (t + TILE_COST_ROWS) rows' worth (ties to the smaller tile)."""
    sizes = [2**i for i in range(MAX_TILE.bit_length()) if 2**i <= max(m, 1)]
    return min(sizes, key=lambda t: num_tiles(m, groups, t) * (t + TILE_COST_ROWS))


def num_tiles(m: int, groups: int, t: int) -> int:
    """A static bound on sum_g ceil(s_g / t) over all splits of M rows into G groups."""
    return max(1, min(-(-m // t) + groups, (m + groups * (t - 1)) // t))


def _layout(group_sizes_e: jax.Array, m: int, t: int, n: int):
    """Where each row goes among n tiles of t rows.

    Returns (src_p [n·t]: the row each padded slot reads, m for padding; slot_m [M]: the padded
    slot of each row; valid_m [M]: row m belongs to a group; tile_group_n [n]).
    """
    e = group_sizes_e.shape[0]
    sizes_e = group_sizes_e.astype(jnp.int32)
    ends_e = jnp.cumsum(sizes_e)
    starts_e = ends_e - sizes_e
    tiles_e = (sizes_e + t - 1) // t
    tile_ends_e = jnp.cumsum(tiles_e)
    tile_starts_e = tile_ends_e - tiles_e

    # Padded slot p = tile j, row r of the tile: position (j - first tile of its group)·t + r
    # within the group; it reads row start + position while that is inside the group.
    tile_group_n = jnp.minimum(
        jnp.searchsorted(tile_ends_e, jnp.arange(n, dtype=jnp.int32), side="right"), e - 1
    ).astype(jnp.int32)
    pos_nt = (jnp.arange(n, dtype=jnp.int32) - tile_starts_e[tile_group_n])[:, None] * t + (
        jnp.arange(t, dtype=jnp.int32)[None, :]
    )
    used_nt = (pos_nt < sizes_e[tile_group_n][:, None]) & (jnp.arange(n)[:, None] < tile_ends_e[-1])
    src_p = jnp.where(used_nt, starts_e[tile_group_n][:, None] + pos_nt, m).reshape(-1)

    rows_m = jnp.arange(m, dtype=jnp.int32)
    group_m = jnp.searchsorted(ends_e, rows_m, side="right").astype(jnp.int32)
    valid_m = group_m < e
    group_m = jnp.minimum(group_m, e - 1)
    slot_m = tile_starts_e[group_m] * t + rows_m - starts_e[group_m]
    slot_m = jnp.where(valid_m, slot_m, 0)
    return src_p, slot_m, valid_m, tile_group_n


def with_zero_row(a: jax.Array) -> jax.Array:
    """a with one more row (or entry) of zeros at the end: what padding slots read."""
    return jnp.concatenate([a, jnp.zeros((1, *a.shape[1:]), a.dtype)])


def _tiles(a_md: jax.Array, src_p: jax.Array, n: int, t: int) -> jax.Array:
    """Rows of a laid out as [n, t, ·] tiles; padding slots read a zero row."""
    return with_zero_row(a_md)[src_p].reshape(n, t, a_md.shape[1])


def _rows(out_ntf: jax.Array, slot_m: jax.Array, valid_m: jax.Array) -> jax.Array:
    out_pf = out_ntf.reshape(-1, out_ntf.shape[-1])
    return jnp.where(valid_m[:, None], out_pf[slot_m], 0)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """An einsum accumulated in fp32 and written in fp32: XLA:CPU runs bf16 dots on its library
    kernel (AMX where the CPU has it) only when they write fp32 (see ops/matmul.py)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _tile_weight_grads(x_ntd: jax.Array, g_ntf: jax.Array) -> jax.Array:
    """x_tileᵀ g_tile per tile, [n, D, F] fp32.

    The tile's rows are contracted as two axes (t = 2 x t/2): XLA:CPU then copies x into the
    transposed layout its bf16 kernel takes, where a contraction over one leading axis runs as
    an fp32 dot on converted operands. Measured for 47 tiles of 256 rows, D 256, F 128, bf16:
    8.3 ms in one axis, 2.3 ms in two.
    """
    n, t, d = x_ntd.shape
    if t % 2:
        return _dot("ntd,ntf->ndf", x_ntd, g_ntf)
    halves = (n, 2, t // 2)
    return _dot("nabd,nabf->ndf", x_ntd.reshape(*halves, d), g_ntf.reshape(*halves, -1))


def sum_per_group(dw_nab: jax.Array, tile_group_n: jax.Array, groups: int) -> jax.Array:
    """Per-tile products summed per group: [n, A, B] -> [G, A, B], as a one-hot [G, n] matmul.

    A scatter-add of whole [A, B] tiles is a loop over tiles on XLA:CPU, and it needs a zeroed
    [G, A, B] buffer first; the matmul reads the tiles once. With 191 tiles into 64 groups of
    [256, 128] (fp32): 9.7 -> 6.1 ms with the tile products. The one-hot factor is exact and the
    products are summed in fp32 (HIGHEST precision, so no backend rounds them to bf16).
    """
    onehot_gn = tile_group_n[None, :] == jnp.arange(groups, dtype=tile_group_n.dtype)[:, None]
    return jnp.einsum(
        "gn,nab->gab",
        onehot_gn.astype(dw_nab.dtype),
        dw_nab,
        precision=jax.lax.Precision.HIGHEST,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x_md, w_EDF, group_sizes_e, t):
    return _gmm_fwd(x_md, w_EDF, group_sizes_e, t)[0]


def _gmm_fwd(x_md, w_EDF, group_sizes_e, t):
    m = x_md.shape[0]
    n = num_tiles(m, w_EDF.shape[0], t)
    src_p, slot_m, valid_m, tile_group_n = _layout(group_sizes_e, m, t, n)
    x_ntd = _tiles(x_md, src_p, n, t)
    out_ntf = _dot("ntd,ndf->ntf", x_ntd, w_EDF[tile_group_n])
    out_mf = _rows(out_ntf, slot_m, valid_m).astype(x_md.dtype)
    return out_mf, (x_ntd, w_EDF, group_sizes_e, src_p, slot_m, valid_m, tile_group_n)


def _gmm_bwd(t, res, g_mf):
    x_ntd, w_EDF, group_sizes_e, src_p, slot_m, valid_m, tile_group_n = res
    n = x_ntd.shape[0]
    g_ntf = _tiles(g_mf.astype(x_ntd.dtype), src_p, n, t)
    dx_ntd = _dot("ntf,ndf->ntd", g_ntf, w_EDF[tile_group_n])
    dx_md = _rows(dx_ntd, slot_m, valid_m).astype(x_ntd.dtype)
    dw_ndf = _tile_weight_grads(x_ntd, g_ntf)
    # Tiles past the used ones (and padding rows) hold zeros, so they add nothing.
    dw_EDF = sum_per_group(dw_ndf, tile_group_n, w_EDF.shape[0])
    return dx_md, dw_EDF.astype(w_EDF.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm_blocked(
    x_md: jax.Array, w_EDF: jax.Array, group_sizes_e: jax.Array, tile: int | None = None
) -> jax.Array:
    """x_md [M, D] (rows sorted by group) times w_EDF [E, D, F] per group -> [M, F] in x's dtype.

    Same contract as `jax.lax.ragged_dot`: group_sizes_e [E] splits the first sum(group_sizes)
    rows; the rest come out zero (and get zero gradient). `tile` overrides the rows per tile.
    """
    t = tile or tile_rows(x_md.shape[0], w_EDF.shape[0])
    return _gmm(x_md, w_EDF, group_sizes_e, t)
