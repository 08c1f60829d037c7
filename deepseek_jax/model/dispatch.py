"""Routed-expert computation behind one function, `routed_experts`, with three strategies.

- local (no mesh, or an expert axis of size 1): sort the N·K (token, expert) pairs by expert and
  run one grouped matmul per weight (`ops/grouped_matmul.py`). With the blocked kernel (the CPU
  one) the whole computation is `ops/moe_blocked.py`, which keeps the pairs in its tile layout
  from the tokens to the combined output; at most `PER_PAIR_MAX` pairs (a decode step) run each
  on its own instead (`_per_pair`).
- all_gather: inside `shard_map`, every device all-gathers the tokens and routing decisions of
  its expert group, runs the grouped matmul for the experts it owns on all of them, and a
  reduce-scatter returns each token's summed outputs to its owner. Static shapes, no sizes to
  exchange; but each device sorts and holds P·N·K rows of which 1/P are its own.
- all_to_all (`ops/moe_a2a.py`): each row travels only to its expert's owner and back, in
  rounds of bounded per-peer buffers; dropless for any routing.
`runtime.moe_dispatch=auto` picks by the bytes each moves (see `choose_dispatch`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax import sharding
from deepseek_jax.ops.gmm_blocked import tile_rows
from deepseek_jax.ops.grouped_matmul import resolve
from deepseek_jax.ops.moe_a2a import (
    A2APlan,
    WeightAxes,
    a2a_routed_experts,
    buffer_rows,
    exchange_kind,
    gathered,
)
from deepseek_jax.ops.moe_a2a import grouped_swiglu as grouped_swiglu
from deepseek_jax.ops.moe_blocked import moe_blocked
from deepseek_jax.runtime import Runtime

DISPATCHES = ("auto", "all_gather", "all_to_all")
# Logical axes of the routed expert weights (model/moe.py creates them with these).
GATE_AXES = ("experts", "expert_embed", "mlp")  # gate_EDF and up_EDF
# down_EFD is split along F, not D: D (7168 in V3) is the dimension the TPU compiler lays out
# innermost, and a weight split along its innermost dimension has to be re-laid out before it
# is gathered, which XLA does once for the whole layer stack (an fp32 copy held all step).
DOWN_AXES = ("experts", "expert_mlp", None)  # down_EFD


def _split_axes(spec: jax.sharding.PartitionSpec, ndim: int) -> WeightAxes:
    """Per dimension, the mesh axes a weight is split over, except dimension 0 (the experts,
    which the shard_map itself splits): what `gather_weight` gathers inside the dispatch."""
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    out = [()]
    for e in entries[1:]:
        out.append(() if e is None else (e,) if isinstance(e, str) else tuple(e))
    return tuple(out)


def _combine(out_md, slot_m, weights_nk):
    """Scatter expert outputs back to their (token, k) slot and sum with the routing weights."""
    n, k = weights_nk.shape
    out_nkd = jnp.zeros_like(out_md).at[slot_m].set(out_md).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", out_nkd.astype(jnp.float32), weights_nk)


# At most this many (token, expert) pairs take `_per_pair`: it is unrolled (three matrix-vector
# products per pair), so the bound keeps the program small; a decode step of a few tokens.
PER_PAIR_MAX = 16


def _per_pair(x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD):
    """Each (token, expert) pair times its expert's matrices (a dynamic slice of each weight):
    no sort, no tile layout, no gather of the weights and no scatter back.

    For a decode step's few tokens the sorted path's fixed cost dominates, and the blocked
    grouped matmul with fewer rows than would share a tile gathers every row's matrices anyway
    (`tile_rows` gives 1). On XLA:CPU one MoE layer with top-4 of 16 experts (D 128, F 64, fp32)
    took 14.5 us for one token and 26 us for two, against 18 and 30 us sorted and blocked.
    Each token's output depends on its own row only, so a token comes out the same whether it
    is decoded alone or verified beside a draft.
    """
    n, k = experts_nk.shape
    f32 = jnp.float32
    out = []
    for i in range(n):
        x_d = x_nd[i]
        y_d = jnp.zeros(x_nd.shape[1], f32)
        for j in range(k):
            e = experts_nk[i, j]

            def w(w_EAB, e=e):
                return jax.lax.dynamic_index_in_dim(w_EAB, e, keepdims=False)

            h_f = (jax.nn.silu(x_d @ w(gate_EDF)) * (x_d @ w(up_EDF))).astype(x_nd.dtype)
            y_d = y_d + (h_f @ w(down_EFD)).astype(x_nd.dtype).astype(f32) * weights_nk[i, j]
        out.append(y_d)
    return jnp.stack(out)


def _local(x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD, *, impl, platform=None):
    n, k = experts_nk.shape
    e = gate_EDF.shape[0]
    if resolve(impl, platform) == "blocked":
        if n * k <= PER_PAIR_MAX and tile_rows(n * k, e) == 1:
            return _per_pair(x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD)
        return moe_blocked(x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD)
    flat_m = experts_nk.reshape(-1)
    order_m = jnp.argsort(flat_m, stable=True)
    sizes_e = jnp.bincount(flat_m, length=e).astype(jnp.int32)
    x_md = checkpoint_name(x_nd[order_m // k], "moe_dispatch")
    out_md = grouped_swiglu(x_md, sizes_e, gate_EDF, up_EDF, down_EFD, impl=impl, platform=platform)
    return _combine(out_md, order_m, weights_nk)


def _whole_weights(weight_axes, *ws):
    return tuple(gathered(w, a) for w, a in zip(ws, weight_axes, strict=True))


def _all_gather_shard(
    x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD, *, axes, impl, platform, weight_axes
):
    """Per-device body: this device owns experts [e0, e0 + E_local)."""
    gate_EDF, up_EDF, down_EFD = _whole_weights(weight_axes, gate_EDF, up_EDF, down_EFD)
    x_nd = jax.lax.all_gather(x_nd, axes, tiled=True)
    experts_nk = jax.lax.all_gather(experts_nk, axes, tiled=True)
    weights_nk = jax.lax.all_gather(weights_nk, axes, tiled=True)
    k = experts_nk.shape[1]
    e_local = gate_EDF.shape[0]
    n_experts = e_local * jax.lax.axis_size(axes)
    e0 = jax.lax.axis_index(axes) * e_local

    flat_m = experts_nk.reshape(-1)
    m = flat_m.shape[0]
    order_m = jnp.argsort(flat_m, stable=True)
    sizes_e = jnp.bincount(flat_m, length=n_experts).astype(jnp.int32)
    local_sizes = jax.lax.dynamic_slice_in_dim(sizes_e, e0, e_local)
    start = jnp.cumsum(sizes_e)[e0] - sizes_e[e0]  # first sorted row of our experts
    # Rotate the sorted pairs so ours come first; the rest fall past sum(local_sizes) and come
    # out of the grouped matmul as zero.
    slot_m = order_m[(start + jnp.arange(m)) % m]
    x_md = checkpoint_name(x_nd[slot_m // k], "moe_dispatch")
    out_md = grouped_swiglu(
        x_md, local_sizes, gate_EDF, up_EDF, down_EFD, impl=impl, platform=platform
    )
    y_nd = _combine(out_md, slot_m, weights_nk)
    return jax.lax.psum_scatter(y_nd, axes, scatter_dimension=0, tiled=True)


def choose_dispatch(dispatch: str, ep_size: int, k: int) -> str:
    """Resolve `runtime.moe_dispatch` for an expert axis of `ep_size` devices and top-`k` routing.

    Bytes one device moves per MoE layer for its n tokens (D model width, bf16 activations):
      all_gather: forward gathers (P-1)·n rows of x (2D bytes) and reduce-scatters (P-1)·n fp32
        sums (4D); the backward moves the same again (dx reduce-scattered, dy gathered):
        ≈ 12·D·n·(P-1).
      all_to_all: each of the n·K rows leaves with probability (P-1)/P and comes back; forward
        x out + y back (2·2D), backward x and dy·w out + dx and the recomputed y back (4·2D):
        ≈ 12·D·n·K·(P-1)/P.
    The ratio all_gather/all_to_all is P/K, so all_gather moves fewer bytes only while P < K
    (P = 4 with V3's K = 8: half). At P ≥ K all_to_all also holds ~1/P of the rows, so it wins
    on both counts.
    """
    if dispatch not in DISPATCHES:
        raise ValueError(
            f"runtime.moe_dispatch={dispatch!r} is not a dispatch; choose from {list(DISPATCHES)}"
        )
    if dispatch != "auto":
        return dispatch
    return "all_gather" if ep_size < k else "all_to_all"


def dispatch_routed(
    x_nd: jax.Array,
    experts_nk: jax.Array,
    weights_nk: jax.Array,
    gate_EDF: jax.Array,
    up_EDF: jax.Array,
    down_EFD: jax.Array,
    *,
    mesh_sharding: sharding.Sharding | None,
    dispatch: str = "auto",
    grouped_matmul: str = "auto",
    buffer_factor: float = 1.25,
) -> jax.Array:
    """`routed_experts` with its knobs spelled out (the mesh and rules, the dispatch strategy,
    the grouped matmul implementation, the all-to-all buffer factor)."""
    impl = grouped_matmul
    if mesh_sharding is None:
        return _local(x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD, impl=impl)

    batch = mesh_sharding.mesh_axes("batch")
    ep = mesh_sharding.mesh_axes("experts")
    n_experts = gate_EDF.shape[0]
    ep_size = mesh_sharding.axis_size("experts")
    if n_experts % ep_size:
        raise sharding.ShardingError(
            f"{n_experts} routed experts cannot be split over an expert axis of size {ep_size}"
        )
    if ep and not set(ep) <= set(batch):
        raise sharding.ShardingError(f"expert mesh axes {ep} must also split the batch {batch}")
    strategy = choose_dispatch(dispatch, ep_size, experts_nk.shape[1])
    P = jax.sharding.PartitionSpec
    tokens = P(batch or None)
    # The expert weights enter as stored (split over the expert axes along E and, by the rules,
    # over fsdp along D for gate/up, F for down): each dispatch gathers them in the compute
    # dtype just before use, and their gradients leave reduce-scattered to shards in fp32
    # (ops/moe_a2a.py). Whole weights here would leave every device with its experts' whole
    # gradients, all-reduced over fsdp.
    gate_spec, down_spec = mesh_sharding.spec(GATE_AXES), mesh_sharding.spec(DOWN_AXES)
    weight_axes = (_split_axes(gate_spec, 3), _split_axes(gate_spec, 3), _split_axes(down_spec, 3))
    mesh = mesh_sharding.mesh
    # The mesh's devices say where the program runs (a TPU slice compiled ahead of time from a
    # CPU host: megablox, ragged exchanges), not this host's default backend.
    platform = mesh.devices.flat[0].platform
    if not ep:
        # Every device owns every expert: nothing to exchange, each device runs its own tokens.
        def body(x, e, w, *expert_weights):
            whole = _whole_weights(weight_axes, *expert_weights)
            return _local(x, e, w, *whole, impl=impl, platform=platform)
    elif strategy == "all_gather":

        def body(*a):
            return _all_gather_shard(
                *a, axes=ep, impl=impl, platform=platform, weight_axes=weight_axes
            )
    else:
        n_local = x_nd.shape[0] // mesh_sharding.axis_size("batch")
        pairs = n_local * experts_nk.shape[1]
        plan = A2APlan(
            axes=ep,
            peers=ep_size,
            buffer=buffer_rows(pairs, ep_size, buffer_factor),
            impl=impl,
            platform=platform,
            exchange=exchange_kind(platform),
            weight_axes=weight_axes,
        )

        def body(*a):
            return a2a_routed_experts(plan, *a)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, gate_spec, gate_spec, down_spec),
        out_specs=tokens,
        check_vma=False,
    )(x_nd, experts_nk, weights_nk, gate_EDF, up_EDF, down_EFD)


def routed_experts(
    x_nd: jax.Array,
    experts_nk: jax.Array,
    weights_nk: jax.Array,
    gate_EDF: jax.Array,
    up_EDF: jax.Array,
    down_EFD: jax.Array,
    *,
    rt: Runtime,
) -> jax.Array:
    """Σ_k w_k·expert_{e_k}(x) for every token, [N, D] float32. x [N, D]; experts, weights [N, K].

    The mesh (None: one device) and the knobs (moe_dispatch, grouped_matmul,
    moe_a2a_buffer_factor) come from the runtime `rt`.
    """
    return dispatch_routed(
        x_nd,
        experts_nk,
        weights_nk,
        gate_EDF,
        up_EDF,
        down_EFD,
        mesh_sharding=rt.sharding,
        dispatch=rt.cfg.moe_dispatch,
        grouped_matmul=rt.cfg.grouped_matmul,
        buffer_factor=rt.cfg.moe_a2a_buffer_factor,
    )
