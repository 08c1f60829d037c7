"""Expert parallelism by all-to-all: each (token, expert) row travels only to its expert's owner.

Runs per device inside `shard_map` over the expert mesh axes (P devices, device p owning the
experts [p·E_l, (p+1)·E_l)). For its own n tokens and their K choices each device:

1. sorts its m = n·K (token, expert) pairs by expert, hence by destination device;
2. exchanges per-(peer, local expert) counts with an `all_to_all` of counts, so every device
   knows how many rows it sends to and receives from each peer, and for which of its experts;
3. sends its rows in rounds: in round r the rows [r·B, (r+1)·B) of its block for peer p go to
   p, with B = the per-peer buffer (`moe_a2a_buffer_factor` × the mean load m/P, rounded up to
   8 rows). The number of rounds is what the most loaded (sender, receiver) pair needs, agreed
   with a `pmax`; with balanced routing that is one round. No row is ever dropped, and every
   buffer is [P, B, D] whatever the routing: memory is bounded by the buffer, not the worst case;
4. the receiver sorts what arrived by local expert, runs the expert SwiGLU on a grouped matmul
   (ops/grouped_matmul.py), and sends each result row back the way it came;
5. the sender adds w · expert_output into its tokens' fp32 sums.

Exchanges are `jax.lax.ragged_all_to_all` (only the valid rows of each per-peer block move) on
TPU/GPU; XLA:CPU has no ragged all-to-all, so there a dense `jax.lax.all_to_all` of the
zero-padded [P, B, D] buffers does the same (identical results: the receiver ignores padding).

Expert weights arrive as this device's shard of its experts: split over the expert axes along
E, and, as the rules preset stores them, over the other mesh axes (fsdp) along D or F. Each
dispatch all-gathers them whole (compute dtype) just before use, and the backward pass
reduce-scatters their gradients straight back to shards (`gather_weight` / `scatter_grad`), in the
compute dtype as XLA's SPMD partitioner does for every other weight, then accumulates the shards
in fp32. Handing whole weights to `shard_map` instead made every device keep its
experts' whole gradients (fp32 in the rounds' loop: E/P·3·D·F·4 bytes, 5.25 GiB per MoE layer
for V3 at expert 8) and sum them with an all-reduce over fsdp; one V3 MoE layer's temporaries
at fsdp 32 x expert 8 went from 18.9 to 9.5 GiB (bench/plan_moe_layer.py). Converting the whole
gradients to fp32 before the reduce-scatter cost another E/P·3·D·F·4 bytes of transient memory
(5.25 GiB per layer for V3 at expert 8); they are summed in the compute dtype instead.

Differentiation: a `while_loop` cannot be reverse-differentiated, and saving every round's
residuals would bring back worst-case memory, so the whole exchange is one `custom_vjp` whose
residuals are only its inputs (the weight shards, not the gathered weights). The backward pass
replays the rounds: it sends each row's input and its output cotangent (w · dy, in the compute
dtype) to the expert owner, which recomputes the SwiGLU, takes its VJP (expert weight gradients
are reduce-scattered each round, then accumulated as fp32 shards), and sends back d(input row)
and the recomputed output row (for d(w) = <output, dy>).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from deepseek_jax.ops.grouped_matmul import grouped_matmul


def grouped_swiglu(
    x_md, group_sizes_e, gate_EDF, up_EDF, down_EFD, *, impl: str = "auto", platform=None
):
    """Each expert's SwiGLU down(silu(gate x) ⊙ up x) over its contiguous rows of x (SPEC §3).

    Rows sorted by expert; rows past sum(group_sizes) come out zero. `impl` and `platform` go to
    `grouped_matmul`.
    """
    kw = dict(impl=impl, platform=platform)
    gate_mf = grouped_matmul(x_md, gate_EDF, group_sizes_e, **kw)
    up_mf = grouped_matmul(x_md, up_EDF, group_sizes_e, **kw)
    return grouped_matmul(jax.nn.silu(gate_mf) * up_mf, down_EFD, group_sizes_e, **kw)


# Per expert weight, per array dimension: the mesh axes that dimension is split over on this
# device besides the expert axes (e.g. ((), ("fsdp",), ()) for gate_EDF under the ep rules).
WeightAxes = tuple[tuple[str, ...], ...]


def gather_weight(w: jax.Array, axes: WeightAxes) -> jax.Array:
    """This device's experts whole: all-gather each dimension of the shard over its mesh axes."""
    for dim, names in enumerate(axes):
        if names:
            w = jax.lax.all_gather(w, names, axis=dim, tiled=True)
    return w


def scatter_grad(g: jax.Array, axes: WeightAxes) -> jax.Array:
    """The transpose of `gather_weight`: sum `g` over the devices sharing the shard, keep ours."""
    for dim, names in reversed(list(enumerate(axes))):
        if names:
            g = jax.lax.psum_scatter(g, names, scatter_dimension=dim, tiled=True)
    return g


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gathered(w: jax.Array, axes: WeightAxes) -> jax.Array:
    """`gather_weight` whose gradient is reduce-scattered in its own dtype: w's (the compute
    dtype), as the SPMD partitioner sums the gradients of the model's other gathered weights. An
    fp32 sum would first hold the whole fp32 gradient (E/P·D·F·4 bytes per weight)."""
    return gather_weight(w, axes)


def _gathered_fwd(w, axes):
    return gather_weight(w, axes), None


def _gathered_bwd(axes, _, g):
    return (scatter_grad(g, axes),)


gathered.defvjp(_gathered_fwd, _gathered_bwd)


@dataclasses.dataclass(frozen=True)
class A2APlan:
    """Static description of one all-to-all dispatch (hashable: a custom_vjp static argument)."""

    axes: tuple[str, ...]  # the expert mesh axes, P devices in all
    peers: int
    buffer: int  # B: rows per peer per round
    impl: str  # grouped matmul implementation
    platform: str  # where the program runs (the mesh's devices)
    exchange: str  # "ragged" (ragged_all_to_all) or "dense" (all_to_all of padded buffers)
    # gate, up, down: the axes each weight shard is split over besides the experts' (see
    # `gather_weight`); empty when the expert weights come whole.
    weight_axes: tuple[WeightAxes, WeightAxes, WeightAxes] = ((), (), ())


def buffer_rows(pairs: int, peers: int, factor: float) -> int:
    """B, rows per peer per round: `factor` × the mean load pairs/P, rounded up to 8 rows.

    8 rows is a sublane tile; coarser rounding would only add padding to dense exchanges (the
    grouped matmul pads to its own tiles). More than `pairs` never helps: one round then carries
    any routing.
    """
    want = max(1, -(-int(factor * pairs) // peers))
    return min(-(-want // 8) * 8, pairs)


def exchange_kind(platform: str) -> str:
    """ragged_all_to_all where XLA implements it (TPU, GPU); the dense emulation elsewhere."""
    return "ragged" if platform in ("tpu", "gpu", "cuda", "rocm") else "dense"


# ---------------------------------------------------------------------------------------------
# Bookkeeping shared by the forward and backward passes


@dataclasses.dataclass(frozen=True)
class _Layout:
    order_m: jax.Array  # pair indices (token·K + k) sorted by expert
    send_start_p: jax.Array  # first sorted pair of the block for peer p
    send_p: jax.Array  # rows this device sends to peer p (all rounds)
    recv_p: jax.Array  # rows this device receives from peer p (all rounds)
    recv_end_pl: jax.Array  # [P, E_l] cumulative counts from peer p per local expert
    rounds: jax.Array  # scalar: rounds every device runs


def _layout(experts_nk: jax.Array, n_experts: int, plan: A2APlan) -> _Layout:
    flat_m = experts_nk.reshape(-1)
    counts_pl = jnp.bincount(flat_m, length=n_experts).astype(jnp.int32)
    counts_pl = counts_pl.reshape(plan.peers, n_experts // plan.peers)
    # Row p of the result: what peer p sends to each of this device's experts.
    recv_pl = jax.lax.all_to_all(counts_pl, plan.axes, 0, 0, tiled=True)
    send_p, recv_p = counts_pl.sum(1), recv_pl.sum(1)
    # Every device that meets another inside the rounds' loop must run as many rounds: the
    # expert peers (the all-to-alls) and, in the backward pass, the devices sharing a weight
    # shard (each round reduce-scatters the weight gradients over them). Agreeing over the
    # expert axes alone deadlocked fsdp peers whose expert groups needed different counts.
    shard_axes = {n for w in plan.weight_axes for names in w for n in names} - set(plan.axes)
    worst = jax.lax.pmax(jnp.max(send_p), (*plan.axes, *sorted(shard_axes)))
    return _Layout(
        order_m=jnp.argsort(flat_m, stable=True).astype(jnp.int32),
        send_start_p=jnp.cumsum(send_p) - send_p,
        send_p=send_p,
        recv_p=recv_p,
        recv_end_pl=jnp.cumsum(recv_pl, axis=1),
        rounds=(worst + plan.buffer - 1) // plan.buffer,
    )


def _in_round(r, total_p: jax.Array, plan: A2APlan) -> tuple[jax.Array, jax.Array]:
    """Positions [P, B] of round r's rows within each per-peer block, and which are real."""
    pos_pb = r * plan.buffer + jnp.arange(plan.buffer, dtype=jnp.int32)[None, :]
    pos_pb = jnp.broadcast_to(pos_pb, (plan.peers, plan.buffer))
    return pos_pb, pos_pb < total_p[:, None]


def _round_count(r, total_p: jax.Array, plan: A2APlan) -> jax.Array:
    return jnp.clip(total_p - r * plan.buffer, 0, plan.buffer).astype(jnp.int32)


def _exchange(buf_pbx: jax.Array, send_n_p, recv_n_p, plan: A2APlan) -> jax.Array:
    """Send block p of `buf_pbx` (its first send_n_p[p] rows) to peer p.

    Returns [P, B, ...] whose block q holds the recv_n_p[q] rows peer q sent here, then zeros.
    Padding rows of `buf_pbx` must be zero (the dense exchange moves them as they are).
    """
    if plan.exchange == "dense":
        return jax.lax.all_to_all(buf_pbx, plan.axes, 0, 0, tiled=True)
    p, b = plan.peers, plan.buffer
    flat = buf_pbx.reshape(p * b, *buf_pbx.shape[2:])
    me = jax.lax.axis_index(plan.axes).astype(jnp.int32)
    offsets_p = jnp.arange(p, dtype=jnp.int32) * b
    out = jax.lax.ragged_all_to_all(
        flat,
        jnp.zeros_like(flat),
        offsets_p,  # block p of ours starts at p·B
        send_n_p,
        jnp.full((p,), me * b, jnp.int32),  # ours land in block `me` of each receiver
        recv_n_p,
        axis_name=plan.axes,
    )
    return out.reshape(buf_pbx.shape)


def _receiver_groups(r, lay: _Layout, plan: A2APlan):
    """Order that sorts the received [P·B] rows by local expert (padding last), group sizes."""
    pos_pb, ok_pb = _in_round(r, lay.recv_p, plan)
    e_local = lay.recv_end_pl.shape[1]
    # Rows from peer p arrive sorted by expert: row at position pos is expert #{l: end_l <= pos}.
    expert_pb = jnp.sum(pos_pb[:, :, None] >= lay.recv_end_pl[:, None, :], axis=-1)
    key_m = jnp.where(ok_pb, expert_pb, e_local).reshape(-1)
    perm_m = jnp.argsort(key_m, stable=True)
    sizes_e = jnp.bincount(key_m, length=e_local + 1)[:e_local].astype(jnp.int32)
    return perm_m, sizes_e


def _sender_rows(r, lay: _Layout, plan: A2APlan, k: int):
    """For round r: pair index [P, B] of each outgoing row, its token, and which are real."""
    pos_pb, ok_pb = _in_round(r, lay.send_p, plan)
    m = lay.order_m.shape[0]
    sorted_pb = jnp.clip(lay.send_start_p[:, None] + pos_pb, 0, m - 1)
    pair_pb = lay.order_m[sorted_pb]
    return pair_pb, pair_pb // k, ok_pb


def _unsort(rows_md: jax.Array, perm_m: jax.Array, plan: A2APlan) -> jax.Array:
    back = jnp.zeros_like(rows_md).at[perm_m].set(rows_md)
    return back.reshape(plan.peers, plan.buffer, -1)


def _masked(ok_pb: jax.Array, rows_pbx: jax.Array) -> jax.Array:
    return jnp.where(ok_pb[..., None], rows_pbx, 0)


# ---------------------------------------------------------------------------------------------
# The dispatch and its VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def a2a_routed_experts(plan, x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD):
    """Per-device Σ_k w_k·expert_{e_k}(x) [n, D] fp32 for this device's tokens (see module doc).

    Call inside shard_map over `plan.axes`; experts_nk holds global expert ids, and the expert
    weights are this device's shards of its E/P experts (split as `plan.weight_axes` says).
    """
    return _forward(plan, x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD)


def _whole(plan, *shards):
    return tuple(gather_weight(w, a) for w, a in zip(shards, plan.weight_axes, strict=True))


def _forward(plan, x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD):
    n, k = experts_nk.shape
    gate_EDF, up_EDF, down_EFD = _whole(plan, gate_EDF, up_EDF, down_EFD)
    lay = _layout(experts_nk, gate_EDF.shape[0] * plan.peers, plan)

    def one_round(carry):
        r, y_nd = carry
        pair_pb, token_pb, ok_pb = _sender_rows(r, lay, plan, k)
        send_n, recv_n = _round_count(r, lay.send_p, plan), _round_count(r, lay.recv_p, plan)
        got_pbd = _exchange(_masked(ok_pb, x_nd[token_pb]), send_n, recv_n, plan)
        perm_m, sizes_e = _receiver_groups(r, lay, plan)
        out_md = grouped_swiglu(
            got_pbd.reshape(-1, got_pbd.shape[-1])[perm_m],
            sizes_e,
            gate_EDF,
            up_EDF,
            down_EFD,
            impl=plan.impl,
            platform=plan.platform,
        )
        out_pbd = _exchange(_unsort(out_md, perm_m, plan), recv_n, send_n, plan)
        w_pb = jnp.where(ok_pb, weights_nk.reshape(-1)[pair_pb], 0.0).astype(jnp.float32)
        token_pb = jnp.where(ok_pb, token_pb, n)  # padding rows fall off the end (dropped)
        y_nd = y_nd.at[token_pb.reshape(-1)].add(
            (w_pb[..., None] * out_pbd.astype(jnp.float32)).reshape(-1, y_nd.shape[1]),
            mode="drop",
        )
        return r + 1, y_nd

    y0 = jnp.zeros((n, x_nd.shape[1]), jnp.float32)
    _, y_nd = jax.lax.while_loop(lambda c: c[0] < lay.rounds, one_round, (jnp.int32(0), y0))
    return y_nd


def _fwd(plan, x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD):
    y_nd = _forward(plan, x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD)
    return y_nd, (x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD)


def _bwd(plan, residuals, dy_nd):
    x_nd, experts_nk, weights_nk, *shards = residuals
    n, k = experts_nk.shape
    d = x_nd.shape[1]
    gate_EDF, up_EDF, down_EFD = _whole(plan, *shards)
    lay = _layout(experts_nk, gate_EDF.shape[0] * plan.peers, plan)
    dy_nd = dy_nd.astype(jnp.float32)

    def one_round(carry):
        r, dx_nd, dw_m, dgate, dup, ddown = carry
        pair_pb, token_pb, ok_pb = _sender_rows(r, lay, plan, k)
        send_n, recv_n = _round_count(r, lay.send_p, plan), _round_count(r, lay.recv_p, plan)
        dy_pbd = dy_nd[token_pb]
        w_pb = weights_nk.reshape(-1)[pair_pb].astype(jnp.float32)
        # The cotangent of each expert output row, in the dtype the experts compute in: the
        # same value the local dispatch's autodiff forms (y = Σ w·out.astype(fp32)).
        g_pbd = (w_pb[..., None] * dy_pbd).astype(x_nd.dtype)
        send = _masked(ok_pb, jnp.concatenate([x_nd[token_pb], g_pbd], axis=-1))
        got = _exchange(send, send_n, recv_n, plan).reshape(-1, 2 * d)
        perm_m, sizes_e = _receiver_groups(r, lay, plan)
        got = got[perm_m]

        def experts(x_md, gate, up, down):
            return grouped_swiglu(
                x_md, sizes_e, gate, up, down, impl=plan.impl, platform=plan.platform
            )

        out_md, vjp = jax.vjp(experts, got[:, :d], gate_EDF, up_EDF, down_EFD)
        dx_md, dg, du, dd = vjp(got[:, d:].astype(out_md.dtype))
        back = _unsort(jnp.concatenate([dx_md.astype(x_nd.dtype), out_md], axis=-1), perm_m, plan)
        back = _exchange(back, recv_n, send_n, plan)
        token_m = jnp.where(ok_pb, token_pb, n).reshape(-1)
        pair_m = jnp.where(ok_pb, pair_pb, n * k).reshape(-1)
        dx_nd = dx_nd.at[token_m].add(back[..., :d].reshape(-1, d).astype(jnp.float32), mode="drop")
        # d(w) = <out, dy> as in the local dispatch (out cast to fp32 first).
        dw_pb = jnp.sum(back[..., d:].astype(jnp.float32) * dy_pbd, axis=-1)
        dw_m = dw_m.at[pair_m].add(dw_pb.reshape(-1), mode="drop")
        # Each round's weight gradients go straight back to shards (summed in the compute dtype,
        # accumulated in fp32): no device holds its experts' whole fp32 gradients. The barrier
        # keeps XLA from moving the reduce-scatter out of the loop (it would rather accumulate
        # whole gradients and scatter once).
        dg, du, dd = jax.lax.optimization_barrier(
            tuple(
                scatter_grad(g, a).astype(jnp.float32)
                for g, a in zip((dg, du, dd), plan.weight_axes, strict=True)
            )
        )
        return r + 1, dx_nd, dw_m, dgate + dg, dup + du, ddown + dd

    f32 = jnp.float32
    init = (
        jnp.int32(0),
        jnp.zeros((n, d), f32),
        jnp.zeros((n * k,), f32),
        *(jnp.zeros(w.shape, f32) for w in shards),
    )
    _, dx_nd, dw_m, dgate, dup, ddown = jax.lax.while_loop(
        lambda c: c[0] < lay.rounds, one_round, init
    )
    return (
        dx_nd.astype(x_nd.dtype),
        None,
        dw_m.reshape(n, k).astype(weights_nk.dtype),
        *(g.astype(w.dtype) for g, w in zip((dgate, dup, ddown), shards, strict=True)),
    )


a2a_routed_experts.defvjp(_fwd, _bwd)
