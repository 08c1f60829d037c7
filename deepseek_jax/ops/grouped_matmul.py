"""Grouped matmul: rows of `x_md` sorted by group, each group times its own weight matrix.

    out[m] = x[m] @ w[g(m)],  g(m) = the group whose row range holds m (ranges from group_sizes)

Rows past sum(group_sizes) belong to no group and come out as zero in every implementation (the
MoE dispatch pads its buffers with such rows and relies on it).

Implementations, picked by `runtime.grouped_matmul`:
- `ragged_dot`: `jax.lax.ragged_dot`, portable (the reference).
- `megablox`: the TPU Pallas kernel `jax.experimental.pallas.ops.tpu.megablox.gmm` (with its own
  VJP); runs anywhere else in Pallas interpret mode, which is slow and only meant for tests.
- `blocked` (`ops/gmm_blocked.py`): only the tiles of routed rows, one batched dot; for CPU.
- `auto`: megablox on TPU, blocked on CPU, ragged_dot elsewhere.
Other kernels register themselves with `register(name, fn)` (e.g. a CPU kernel from `ops/gmm_*`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from deepseek_jax.ops import at_pallas_precision, pallas_precision
from deepseek_jax.ops.gmm_blocked import gmm_blocked

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _ragged_dot(x_md: jax.Array, w_EDF: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
    # ragged_dot never writes rows past the last group: they are zero. XLA:TPU lowers it to a
    # Mosaic kernel that, like the Pallas ones, rejects an fp32 precision on bf16 operands.
    with pallas_precision(x_md.dtype):
        return jax.lax.ragged_dot(x_md, w_EDF, group_sizes_e)


def _tile(dim: int, preferred: int) -> int:
    """The largest of preferred, preferred/2, ..., 128 that divides dim; else the whole dim.

    Mosaic needs each block dim to be a multiple of 128 lanes or the full array dim.
    """
    t = preferred
    while t >= 128:
        if dim % t == 0:
            return t
        t //= 2
    return dim


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn) for megablox gmm on an [m, k] x [g, k, n] problem.

    Large k/n tiles keep the MXU busy and amortize the per-tile weight loads (each m tile reloads
    a [tk, tn] slice of its group's matrix); tm is modest because groups are ragged: a tile that
    straddles two groups is computed twice (once per group), so the waste grows with tm. The
    [tm, tk] + [tk, tn] + [tm, tn] fp32 blocks, double-buffered, stay within a few MiB of VMEM.
    """
    tm = 512 if m >= 512 else max(8, -(-m // 8) * 8)
    return tm, _tile(k, 1024), _tile(n, 1024)


def _megablox(
    x_md: jax.Array, w_EDF: jax.Array, group_sizes_e: jax.Array, *, interpret: bool = False
) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    m, k = x_md.shape
    n = w_EDF.shape[2]
    tm, tk, tn = megablox_tiling(m, k, n)
    pad = -m % tm
    # The kernel never writes rows outside every group (they hold garbage), and its VJP leaves
    # garbage in those rows of d(x) too: zero both sides with a select, which also blocks
    # whatever the unwritten rows hold (NaN included) from reaching the gradient.
    valid_m = jnp.arange(m + pad) < jnp.sum(group_sizes_e)
    x_md = jnp.where(valid_m[:, None], jnp.pad(x_md, ((0, pad), (0, 0))), 0)
    kernel = functools.partial(
        gmm, preferred_element_type=x_md.dtype, tiling=(tm, tk, tn), interpret=interpret
    )
    out_md = at_pallas_precision(kernel, x_md.dtype)(x_md, w_EDF, group_sizes_e.astype(jnp.int32))
    return jnp.where(valid_m[:, None], out_md, 0)[:m]


# blocked: computes only the routed row tiles; XLA:CPU runs ragged_dot densely over every expert.
IMPLS: dict[str, GroupedMatmul] = {
    "ragged_dot": _ragged_dot,
    "megablox": _megablox,
    "blocked": gmm_blocked,
}


def register(name: str, fn: GroupedMatmul) -> None:
    """Make `fn(x_md, w_EDF, group_sizes_e)` selectable as `runtime.grouped_matmul=<name>`.

    It must follow this module's contract (zero rows past the groups, differentiable in x and w).
    """
    IMPLS[name] = fn


def resolve(impl: str, platform: str | None = None) -> str:
    """The implementation `impl` stands for on `platform` (default: the default backend)."""
    platform = platform or jax.default_backend()
    if impl == "auto":
        # XLA:CPU lowers ragged_dot densely (every row times every expert's matrix).
        return {"tpu": "megablox", "cpu": "blocked"}.get(platform, "ragged_dot")
    if impl not in IMPLS:
        raise ValueError(
            f"runtime.grouped_matmul={impl!r} is not a grouped matmul; choose from "
            f"{sorted(['auto', *IMPLS])}"
        )
    return impl


def grouped_matmul(
    x_md: jax.Array,
    w_EDF: jax.Array,
    group_sizes_e: jax.Array,
    *,
    impl: str = "auto",
    platform: str | None = None,
) -> jax.Array:
    """x_md [M, D] (rows sorted by group) times w_EDF [E, D, F] per group -> [M, F] in x's dtype.

    group_sizes_e [E] int32 splits the first sum(group_sizes) rows; the rest come out zero.
    `platform` is where the program will run (the mesh's devices; default: the default backend),
    which can differ from this host when compiling ahead of time for TPU.
    """
    platform = platform or jax.default_backend()
    name = resolve(impl, platform)
    if name == "megablox":
        # Off TPU the Pallas kernel runs interpreted (tests); on TPU it is the Mosaic kernel.
        return _megablox(x_md, w_EDF, group_sizes_e, interpret=platform != "tpu")
    return IMPLS[name](x_md, w_EDF, group_sizes_e)
