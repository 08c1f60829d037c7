"""Routed-expert computation behind one function, `routed_experts`, with two strategies.

- local: every token on this device, every expert on this device. Sort the N·K (token, expert)
  pairs by expert and run one grouped matmul (`jax.lax.ragged_dot`).
- expert-parallel (the runtime has a mesh): inside `shard_map`, each device routes its own tokens,
  all-gathers tokens and routing decisions over the expert axis, runs the grouped matmul for
  the experts it owns, and a reduce-scatter over the expert axis returns every token's summed
  expert outputs to the device that owns the token. Dropless and static-shaped, so it runs on
  XLA:CPU, which has no ragged all-to-all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax import sharding
from deepseek_jax.runtime import Runtime


def grouped_swiglu(x_md, group_sizes_e, gate_edf, up_edf, down_efd):
    """Each expert's SwiGLU over its contiguous rows of x (rows sorted by expert).

    Rows past sum(group_sizes) come out as zero (ragged_dot leaves them untouched).
    """
    x_md = checkpoint_name(x_md, "moe_dispatch")  # tokens as sent to experts (remat policies)
    gate_mf = jax.lax.ragged_dot(x_md, gate_edf, group_sizes_e)
    up_mf = jax.lax.ragged_dot(x_md, up_edf, group_sizes_e)
    return jax.lax.ragged_dot(jax.nn.silu(gate_mf) * up_mf, down_efd, group_sizes_e)


def _combine(out_md, slot_m, weights_nk):
    """Scatter expert outputs back to their (token, k) slot and sum with the routing weights."""
    n, k = weights_nk.shape
    out_nkd = jnp.zeros_like(out_md).at[slot_m].set(out_md).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", out_nkd.astype(jnp.float32), weights_nk)


def _local(x_nd, experts_nk, weights_nk, gate_edf, up_edf, down_efd):
    k = experts_nk.shape[1]
    flat_m = experts_nk.reshape(-1)
    order_m = jnp.argsort(flat_m, stable=True)
    sizes_e = jnp.bincount(flat_m, length=gate_edf.shape[0]).astype(jnp.int32)
    out_md = grouped_swiglu(x_nd[order_m // k], sizes_e, gate_edf, up_edf, down_efd)
    return _combine(out_md, order_m, weights_nk)


def _expert_shard(x_nd, experts_nk, weights_nk, gate_edf, up_edf, down_efd, *, axes, n_experts):
    """Per-device body: this device owns experts [e0, e0 + E_local)."""
    if axes:
        x_nd = jax.lax.all_gather(x_nd, axes, tiled=True)
        experts_nk = jax.lax.all_gather(experts_nk, axes, tiled=True)
        weights_nk = jax.lax.all_gather(weights_nk, axes, tiled=True)
    k = experts_nk.shape[1]
    e_local = gate_edf.shape[0]
    e0 = jax.lax.axis_index(axes) * e_local if axes else 0

    flat_m = experts_nk.reshape(-1)
    m = flat_m.shape[0]
    order_m = jnp.argsort(flat_m, stable=True)
    sizes_e = jnp.bincount(flat_m, length=n_experts).astype(jnp.int32)
    local_sizes = jax.lax.dynamic_slice_in_dim(sizes_e, e0, e_local)
    start = jnp.cumsum(sizes_e)[e0] - sizes_e[e0]  # first sorted row of our experts
    # Rotate the sorted pairs so ours come first; the rest fall past sum(local_sizes).
    slot_m = order_m[(start + jnp.arange(m)) % m]
    out_md = grouped_swiglu(x_nd[slot_m // k], local_sizes, gate_edf, up_edf, down_efd)
    valid_m = jnp.arange(m) < local_sizes.sum()
    out_md = jnp.where(valid_m[:, None], out_md, 0)
    y_nd = _combine(out_md, slot_m, weights_nk)
    if axes:
        y_nd = jax.lax.psum_scatter(y_nd, axes, scatter_dimension=0, tiled=True)
    return y_nd


def routed_experts(
    x_nd, experts_nk, weights_nk, gate_edf, up_edf, down_efd, *, rt: Runtime
) -> jax.Array:
    """Σ_k w_k·expert_{e_k}(x) for every token, in float32. x [N, D]; experts, weights [N, K].
    Expert-parallel when `rt.sharding` has a mesh, local otherwise."""
    ctx = rt.sharding
    if ctx is None:
        return _local(x_nd, experts_nk, weights_nk, gate_edf, up_edf, down_efd)

    batch = ctx.mesh_axes("batch")
    ep = ctx.mesh_axes("experts")
    n_experts = gate_edf.shape[0]
    ep_size = ctx.axis_size("experts")
    if n_experts % ep_size:
        raise sharding.ShardingError(
            f"{n_experts} routed experts cannot be split over an expert axis of size {ep_size}"
        )
    if ep and not set(ep) <= set(batch):
        raise sharding.ShardingError(f"expert mesh axes {ep} must also split the batch {batch}")
    P = jax.sharding.PartitionSpec
    tokens = P(batch or None)
    weights = P(ep or None)  # each device keeps whole matrices of its own experts
    body = jax.shard_map(
        lambda *a: _expert_shard(*a, axes=ep, n_experts=n_experts),
        mesh=ctx.mesh,
        in_specs=(tokens, tokens, tokens, weights, weights, weights),
        out_specs=tokens,
        check_vma=False,
    )
    return body(x_nd, experts_nk, weights_nk, gate_edf, up_edf, down_efd)
