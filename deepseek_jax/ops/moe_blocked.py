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


def _pair_layout(experts_nk: jax.Array, e: int, t: int):
    """(tok_p: the token each padded slot reads, n for padding; pair_p: its (token, k) pair,
    n·k for padding; slot_nk: the slot of each pair; tile_group: each tile's expert)."""
    n, k = experts_nk.shape
    m = n * k
    flat_m = experts_nk.reshape(-1)
    order_m = jnp.argsort(flat_m, stable=True)  # sorted position -> pair
    sizes_e = jnp.bincount(flat_m, length=e).astype(jnp.int32)
    src_p, slot_m, _, tile_group = _layout(sizes_e, m, t, num_tiles(m, e, t))
    pair_p = jnp.concatenate([order_m, jnp.full((1,), m, order_m.dtype)])[src_p]
    slot_nk = jnp.zeros((m,), slot_m.dtype).at[order_m].set(slot_m).reshape(n, k)
    return pair_p // k, pair_p, slot_nk, tile_group


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _moe(x_nd, weights_nk, gate_EDF, up_EDF, down_EFD, experts_nk, t):
    return _moe_fwd(x_nd, weights_nk, gate_EDF, up_EDF, down_EFD, experts_nk, t)[0]


def _moe_fwd(x_nd, weights_nk, gate_EDF, up_EDF, down_EFD, experts_nk, t):
    e, d, _ = gate_EDF.shape
    dt = x_nd.dtype
    tok_p, pair_p, slot_nk, tile_group = _pair_layout(experts_nk, e, t)
    x_ntd = with_zero_row(x_nd)[tok_p].reshape(-1, t, d)
    gate_ntf = _dot("ntd,ndf->ntf", x_ntd, gate_EDF[tile_group])
    up_ntf = _dot("ntd,ndf->ntf", x_ntd, up_EDF[tile_group])
    h_ntf = (jax.nn.silu(gate_ntf) * up_ntf).astype(dt)
    o_nkd = _dot("ntf,nfd->ntd", h_ntf, down_EFD[tile_group]).reshape(-1, d)[slot_nk]
    y_nd = jnp.einsum("nkd,nk->nd", o_nkd, weights_nk)
    res = (x_ntd, gate_ntf, up_ntf, h_ntf, o_nkd, weights_nk, gate_EDF, up_EDF, down_EFD)
    return y_nd, res + (tok_p, pair_p, slot_nk, tile_group)


def _moe_bwd(t, res, dy_nd):
    x_ntd, gate_ntf, up_ntf, h_ntf, o_nkd, weights_nk, gate_EDF, up_EDF, down_EFD = res[:9]
    tok_p, pair_p, slot_nk, tile_group = res[9:]
    d, dt = x_ntd.shape[-1], x_ntd.dtype
    dy_nd = dy_nd.astype(jnp.float32)
    dweights_nk = jnp.einsum("nkd,nd->nk", o_nkd, dy_nd)
    # Each slot's output cotangent: its pair's routing weight times its token's dy (0 padding).
    w_p = with_zero_row(weights_nk.reshape(-1))[pair_p]
    do_ntd = (w_p[:, None] * with_zero_row(dy_nd)[tok_p]).astype(dt).reshape(-1, t, d)

    # d silu(g)/dg = σ(g)(1 + g(1 - σ(g))), all in fp32 on the fp32 products.
    dh_ntf = _dot("ntd,nfd->ntf", do_ntd, down_EFD[tile_group])
    sig_ntf = jax.nn.sigmoid(gate_ntf)
    dgate_ntf = (dh_ntf * up_ntf * sig_ntf * (1 + gate_ntf * (1 - sig_ntf))).astype(dt)
    dup_ntf = (dh_ntf * gate_ntf * sig_ntf).astype(dt)
    dx_ntd = _dot("ntf,ndf->ntd", dgate_ntf, gate_EDF[tile_group]) + _dot(
        "ntf,ndf->ntd", dup_ntf, up_EDF[tile_group]
    )
    dx_nd = dx_ntd.reshape(-1, d)[slot_nk].sum(axis=1).astype(dt)

    # Per-tile weight gradients summed per expert; unused tiles and padding rows add zeros.
    def per_expert(w_EAB, a_nta, b_ntb):
        dw_nab = _tile_weight_grads(a_nta, b_ntb)
        return sum_per_group(dw_nab, tile_group, w_EAB.shape[0]).astype(w_EAB.dtype)

    return (
        dx_nd,
        dweights_nk.astype(weights_nk.dtype),
        per_expert(gate_EDF, x_ntd, dgate_ntf),
        per_expert(up_EDF, x_ntd, dup_ntf),
        per_expert(down_EFD, h_ntf, do_ntd),
        None,
    )


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
