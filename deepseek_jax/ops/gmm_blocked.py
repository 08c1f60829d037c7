"""A grouped matmul that computes only the routed rows: sorted rows, padded per group to a tile.

    out[m] = x[m] @ w[g(m)] for the first sum(group_sizes) rows, 0 for the rest

`jax.lax.ragged_dot` has no sparse lowering on XLA:CPU: it multiplies every row by every
group's matrix and selects, so a step with E experts pays E/K times the routed work. Here each
group's rows are laid out in tiles of `t` rows, padded with zero rows to whole tiles, and every
tile is multiplied by its own group's matrix in one batched matmul:

    x_ntd = x[src]                 (n tiles of t rows; padding reads a zero row)
    out_ntf = x_ntd @ w[tile_group] (one batched dot, each tile against one gathered matrix)
    out[m] = out_ntf[slot(m)]

The tile count is static: sum_g ceil(s_g/t) <= (M + G(t-1))/t tiles. The tile size is the
largest power of two (at most 256) whose worst-case padding G(t-1) stays within half of M, so
the work is at most ~1.5x the routed rows whatever the number of groups (with balanced loads
about 1 + Gt/2M). Each tile also copies its group's whole [D, F] matrix, so smaller tiles trade
padding for copies: with 8192 rows over 64 groups (D 256, F 128) a forward and backward took
62 ms at t = 32 (padding within M/4), 44 ms at t = 64 and 112 ms at t = 16. With few rows (a
decode step) t falls to 1 and the kernel gathers just the matrices of the rows present.

The gradient (custom VJP) reuses the layout: dx = (g laid out the same way) @ w[tile]^T, and
dw[g] = sum of x_tile^T g_tile over the tiles of group g (a segment sum over tiles). Everything is
plain XLA (gathers, one batched dot, a scatter-add), so it runs on any backend; it is registered
for CPU, where it replaces the dense lowering of ragged_dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MAX_TILE = 256


def tile_rows(m: int, groups: int) -> int:
    """Rows per tile for M rows in G groups: padding G(t-1) at most M/2, t a power of 2."""
    t = MAX_TILE
    while t > 1 and groups * (t - 1) > m // 2:
        t //= 2
    return t


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
    dw_EDF = jnp.zeros(w_EDF.shape, dw_ndf.dtype).at[tile_group_n].add(dw_ndf)
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
