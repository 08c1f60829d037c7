"""Peak temporary memory of the runtime kernel options, read from the compiled program.

    python bench/runtime_memory.py                  # XLA:CPU compile
    python bench/runtime_memory.py --tpu v5p:2x2x1  # TPU compile through libtpu (no TPU needed)

Prints, for attention forward+backward (runtime.attention) and the loss over the vocabulary
(runtime.cross_entropy) at one modest shape each, XLA's `memory_analysis()` temporaries of the
compiled gradient program. Nothing is executed. On TPU the splash kernel is compiled too (a
Pallas kernel, batch split over the chips), and the tiny model under each remat policy
(`offload` needs a TPU or GPU).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.ops.attention import attention
from deepseek_jax.ops.cross_entropy import head_ce
from deepseek_jax.runtime import Runtime
from deepseek_jax.sharding import Sharding, rules_for

MIB = 2**20


def temp_mib(fn, *args) -> float:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / MIB


def attention_rows(sh, kinds, b, t, h, dtype):
    put = {} if sh is None else {"sharding": sh.named(("batch", None, None, None))}
    q = jax.ShapeDtypeStruct((b, t, h, 192), dtype, **put)
    v = jax.ShapeDtypeStruct((b, t, h, 128), dtype, **put)
    seg_put = {} if sh is None else {"sharding": sh.named(("batch", None))}
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32, **seg_put)
    for kind in kinds:
        rt = Runtime.of(sh, attention=kind, attention_chunk_size=512)

        def loss(q, k, v, seg, rt=rt):
            out = attention(q, k, v, segment_ids_bt=seg, scale=0.135, rt=rt)
            return out.astype(jnp.float32).sum()

        mib = temp_mib(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, q, v, seg)
        print(f"attention {kind:8s} B={b} T={t} H={h} qk 192 v 128: temporaries {mib:9.1f} MiB")


def cross_entropy_rows(sh, b, t, d, vocab, dtype):
    put = {} if sh is None else {"sharding": sh.named(("batch", None, None))}
    h = jax.ShapeDtypeStruct((b, t, d), dtype, **put)
    w = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
    tgt = jax.ShapeDtypeStruct((b, t), jnp.int32)
    for kind, chunk in (("full", 0), ("chunked", 4096), ("chunked", 1024)):
        rt = Runtime.of(sh, cross_entropy=kind, cross_entropy_chunk_size=max(chunk, 1))

        def loss(h, w, tgt, rt=rt):
            ce, lse = head_ce(h, w, tgt, rt)
            return ce.sum() + 1e-4 * (lse * lse).sum()

        mib = temp_mib(jax.jit(jax.grad(loss, argnums=(0, 1))), h, w, tgt)
        label = kind if kind == "full" else f"chunked/{chunk}"
        print(f"cross-entropy {label:13s} N={b * t} V={vocab} D={d}: temporaries {mib:9.1f} MiB")


def remat_rows(sh) -> None:
    """The tiny model's gradient under each remat policy; offload shows its host-memory buffers
    (memory space S(5) in the compiled HLO)."""
    from flax import nnx

    from deepseek_jax.config import load_config, replace
    from deepseek_jax.model import DeepSeek
    from deepseek_jax.sharding import state_shardings

    cfg = replace(load_config("tiny").model, num_layers=2, **{"mtp.depth": 0})
    tokens = jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=sh.named(("batch", None)))
    for remat in ("none", "full", "save_dots", "save_dots_except_experts", "offload"):
        rt = Runtime.of(sh, remat=remat, grouped_matmul="ragged_dot", moe_dispatch="all_gather")
        abstract = nnx.eval_shape(lambda rt=rt: DeepSeek(cfg, nnx.Rngs(0), runtime=rt))
        graphdef, state = nnx.split(abstract)
        state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            state,
            state_shardings(state, sh),
        )

        def loss(state, tokens, graphdef=graphdef):
            return nnx.merge(graphdef, state).forward(tokens).hidden.astype(jnp.float32).sum()

        compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
        mib = compiled.memory_analysis().temp_size_in_bytes / MIB
        host = compiled.as_text().count("S(5)")
        print(
            f"remat {remat:24s} tiny, 8x512 tokens: temporaries {mib:7.1f} MiB, host buffers {host}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tpu", help="TPU topology name, e.g. v5p:2x2x1 (compile through libtpu)")
    args = ap.parse_args()
    sh, kinds = None, ["xla", "dpa_xla", "causal_blocks", "chunked"]
    if args.tpu:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(
            platform="tpu",
            topology_name=args.tpu,
            chip_config_name="megacore",
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
        )
        devices = np.asarray(topo.devices)
        mesh = jax.sharding.Mesh(devices.reshape(1, -1, 1, 1), ("data", "fsdp", "expert", "tensor"))
        sh = Sharding(mesh, rules_for("fsdp"))
        kinds = ["xla", "chunked", "splash"]
        print(f"TPU {args.tpu}: {devices.size} devices, batch split over them")
    n = 1 if sh is None else sh.axis_size("batch")
    attention_rows(sh, kinds, b=n, t=4096, h=16, dtype=jnp.bfloat16)
    cross_entropy_rows(sh, b=2 * n, t=4096, d=1024, vocab=32768, dtype=jnp.bfloat16)
    if sh is not None:
        remat_rows(sh)


if __name__ == "__main__":
    main()
