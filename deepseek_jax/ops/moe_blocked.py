"""One device's routed experts on the blocked layout, from tokens to combined output in one piece.

    y[i] = sum_j w[i, j] · down_e(silu(gate_e x_i) ⊙ up_e x_i),   e = experts[i, j]

The general path (`model/dispatch.py::_local`) sorts the N·K (token, expert) pairs, gathers the
tokens into that order, runs three grouped matmuls and scatters the outputs back to their pairs;
each blocked grouped matmul (`ops/gmm_blocked.py`) then lays its rows out in tiles and back
again. On XLA:CPU, where row gathers and scatters are loops over rows, that movement is a large
share of an MoE layer's time. Here the pairs go straight from tokens into the tile layout and
stay there through all three products (measured on the issue-12 shapes, one process, steps
interleaved: bf16 step 0.369 -> 0.358 s, fp32 0.59 -> 0.54 s):

    x_ntd  = x[token of slot]             one gather (padding slots read a zero row)
    g, u   = x_ntd @ gate[tile], x_ntd @ up[tile]
    o_ntd  = (silu(g) ⊙ u) @ down[tile]   padding rows stay zero: silu(0) ⊙ 0 = 0
    y      = sum over k of w · o[slot of pair]   one gather back

and the gradient only gathers too: a slot's output cotangent is w · dy of its token, and a
token's input gradient is the sum of its K slots' rows (each pair has one slot, so neither
direction needs a scatter-add over rows). The weight gradients are per-tile products summed per
expert, as in `gmm_blocked`.

The tile count is the dropless bound, ceil(NK/t) + up to E tiles for experts' partly filled last
tiles, but a layout fills only sum_e ceil(s_e/t) of them, all at the front; with balanced loads
about E/2 of the E extra tiles stay empty. The first ceil(NK/t) tiles (always filled) run as one
batched piece; the rest in EXCESS_CHUNKS chunks, each under a `lax.cond` that runs it only when
the layout reaches it (forward and backward alike; a skipped chunk's outputs are zeros no row
reads). Issue-12 shapes, bf16, whole step, one process, steps interleaved: 64 experts 0.370 ->
0.333 s, 16 experts 0.254 -> 0.248, 8 experts 0.239 -> 0.243 (4 chunks: 64 experts 0.334, 8
experts 0.250; 8 chunks, 64 experts 0.352).

In fp32 the values are those of the sorted path. In bf16 the products still accumulate in
fp32, but the SwiGLU between them runs in fp32 on the fp32 gate and up products, forward and
backward (the sorted path rounds gate and up to bf16 first and differentiates silu in bf16), and
the input gradient of the gate and up products is summed in fp32 and rounded once: fewer passes
over the [tiles, t, F] arrays (whole bf16 step 0.350 -> 0.337 s) and no less accurate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax.ops.gmm_blocked import (
    _dot,
    _layout,
    _tile_weight_grads,
    num_tiles,
    sum_per_group,
    tile_rows,
    with_zero_row,
)

# The tiles past ceil(N·K / t) hold rows only when experts' last tiles are partly empty; with
# balanced loads about half of those E tiles do. They are computed in this many chunks, each
# only when the layout reaches it (`_segments`).
EXCESS_CHUNKS = 2


def _pair_layout(experts_nk: jax.Array, e: int, t: int):
    """(tok_p: the token each padded slot reads, n for padding; pair_p: its (token, k) pair,
    n·k for padding; slot_nk: the slot of each pair; tile_group: each tile's expert; used: the
    number of tiles that hold rows, all before the empty ones)."""
    n, k = experts_nk.shape
    m = n * k
    flat_m = experts_nk.reshape(-1)
    order_m = jnp.argsort(flat_m, stable=True)  # sorted position -> pair
    sizes_e = jnp.bincount(flat_m, length=e).astype(jnp.int32)
    src_p, slot_m, _, tile_group = _layout(sizes_e, m, t, num_tiles(m, e, t))
    pair_p = jnp.concatenate([order_m, jnp.full((1,), m, order_m.dtype)])[src_p]
    slot_nk = jnp.zeros((m,), slot_m.dtype).at[order_m].set(slot_m).reshape(n, k)
    used = ((sizes_e + t - 1) // t).sum()
    return pair_p // k, pair_p, slot_nk, tile_group, used


def _segments(m: int, e: int, t: int) -> list[tuple[int, int]]:
    """Static tile ranges [a, b): first the ceil(m/t) tiles every layout fills (m rows need at
    least that many), then the rest of the dropless bound in EXCESS_CHUNKS chunks."""
    n = num_tiles(m, e, t)
    base = min(n, -(-m // t))
    step = max(1, -(-(n - base) // EXCESS_CHUNKS))
    return [(0, base)] + [(a, min(a + step, n)) for a in range(base, n, step)]


def _when_used(used, a: int, compute, skipped, *operands):
    """compute(*operands) if the layout's tiles reach tile a (always for a = 0), else
    skipped(*operands)."""
    if a == 0:
        return compute(*operands)
    return jax.lax.cond(used > a, compute, skipped, *operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _moe(x_nd, weights_nk, gate_EDF, up_EDF, down_EFD, experts_nk, t):
    return _moe_fwd(x_nd, weights_nk, gate_EDF, up_EDF, down_EFD, experts_nk, t)[0]


def _moe_fwd(x_nd, weights_nk, gate_EDF, up_EDF, down_EFD, experts_nk, t):
    e, d, _ = gate_EDF.shape
    dt = x_nd.dtype
    tok_p, pair_p, slot_nk, tile_group, used = _pair_layout(experts_nk, e, t)
    x0_nd = with_zero_row(x_nd)

    def segment(a, b):
        def compute():
            x_std = x0_nd[tok_p[a * t : b * t]].reshape(b - a, t, d)
            g_s = tile_group[a:b]
            gate_stf = _dot("ntd,ndf->ntf", x_std, gate_EDF[g_s])
            up_stf = _dot("ntd,ndf->ntf", x_std, up_EDF[g_s])
            h_stf = (jax.nn.silu(gate_stf) * up_stf).astype(dt)
            return x_std, gate_stf, up_stf, h_stf, _dot("ntf,nfd->ntd", h_stf, down_EFD[g_s])

        def skipped():  # zeros shaped like compute's outputs; no row reads them
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(compute))

        return _when_used(used, a, compute, skipped)

    segs = [segment(a, b) for a, b in _segments(slot_nk.size, e, t)]
    out_ntd = jnp.concatenate([seg[4] for seg in segs])
    o_nkd = out_ntd.reshape(-1, d)[slot_nk]
    y_nd = jnp.einsum("nkd,nk->nd", o_nkd, weights_nk)
    res = ([seg[:4] for seg in segs], o_nkd, weights_nk, gate_EDF, up_EDF, down_EFD)
    return y_nd, res + (tok_p, pair_p, slot_nk, tile_group, used)


def _moe_bwd(t, res, dy_nd):
    segs, o_nkd, weights_nk, gate_EDF, up_EDF, down_EFD = res[:6]
    tok_p, pair_p, slot_nk, tile_group, used = res[6:]
    e, d, _ = gate_EDF.shape
    dt = segs[0][0].dtype
    dy_nd = dy_nd.astype(jnp.float32)
    dweights_nk = jnp.einsum("nkd,nd->nk", o_nkd, dy_nd)
    # Each slot's output cotangent: its pair's routing weight times its token's dy (0 padding).
    w_p = with_zero_row(weights_nk.reshape(-1))[pair_p]
    dy0_nd = with_zero_row(dy_nd)

    def segment(a, b, saved, dw):
        x_std, gate_stf, up_stf, h_stf = saved

        def compute(dw):
            rows = slice(a * t, b * t)
            do_std = (w_p[rows, None] * dy0_nd[tok_p[rows]]).astype(dt).reshape(b - a, t, d)
            g_s = tile_group[a:b]
            # d silu(g)/dg = σ(g)(1 + g(1 - σ(g))), all in fp32 on the fp32 products.
            dh_stf = _dot("ntd,nfd->ntf", do_std, down_EFD[g_s])
            sig_stf = jax.nn.sigmoid(gate_stf)
            dgate_stf = (dh_stf * up_stf * sig_stf * (1 + gate_stf * (1 - sig_stf))).astype(dt)
            dup_stf = (dh_stf * gate_stf * sig_stf).astype(dt)
            dx_std = _dot("ntf,ndf->ntd", dgate_stf, gate_EDF[g_s]) + _dot(
                "ntf,ndf->ntd", dup_stf, up_EDF[g_s]
            )
            # Per-tile weight gradients summed per expert; padding rows add zeros.
            pairs = ((x_std, dgate_stf), (x_std, dup_stf), (h_stf, do_std))
            sums = [sum_per_group(_tile_weight_grads(p, q), g_s, e) for p, q in pairs]
            if dw is not None:
                sums = [acc + s for acc, s in zip(dw, sums, strict=True)]
            return dx_std, tuple(sums)

        def skipped(dw):
            return jnp.zeros((b - a, t, d), jnp.float32), dw

        return _when_used(used, a, compute, skipped, dw)

    dw, dx_parts = None, []
    for (a, b), saved in zip(_segments(slot_nk.size, e, t), segs, strict=True):
        dx_std, dw = segment(a, b, saved, dw)
        dx_parts.append(dx_std)
    dx_ntd = jnp.concatenate(dx_parts)
    dx_nd = dx_ntd.reshape(-1, d)[slot_nk].sum(axis=1).astype(dt)
    weights = (gate_EDF, up_EDF, down_EFD)
    dgate, dup, ddown = (g.astype(w.dtype) for g, w in zip(dw, weights, strict=True))
    return dx_nd, dweights_nk.astype(weights_nk.dtype), dgate, dup, ddown, None


_moe.defvjp(_moe_fwd, _moe_bwd)


def moe_blocked(
    x_nd: jax.Array,
    experts_nk: jax.Array,
    weights_nk: jax.Array,
    gate_EDF: jax.Array,
    up_EDF: jax.Array,
    down_EFD: jax.Array,
    tile: int | None = None,
) -> jax.Array:
    """sum_k weights_nk · SwiGLU_{experts_nk}(x_nd) -> [N, D] fp32 (as `_local` returns it).

    x_nd [N, D] and the expert weights [E, D, F], [E, F, D] in the compute dtype; experts_nk
    [N, K] int, weights_nk [N, K] fp32. `tile` overrides the rows per tile.
    """
    n, k = experts_nk.shape
    e, d, f = gate_EDF.shape
    if x_nd.shape != (n, d) or up_EDF.shape != (e, d, f) or down_EFD.shape != (e, f, d):
        raise ValueError(
            f"moe_blocked: x {x_nd.shape}, gate {gate_EDF.shape}, up {up_EDF.shape} and "
            f"down {down_EFD.shape} do not fit N={n} tokens of width D={d} and E={e} experts"
        )
    t = tile or tile_rows(n * k, e)
    return _moe(x_nd, weights_nk, gate_EDF, up_EDF, down_EFD, experts_nk, t)
