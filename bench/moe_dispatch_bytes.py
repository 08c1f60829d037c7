"""Bytes one device moves per MoE layer: all-gather vs all-to-all expert dispatch.

Prints, for one routed-expert layer (`model/dispatch.py`, forward and backward) of a config at a
given expert-parallel size:
1. the analytic per-device bytes of each dispatch (the model in `choose_dispatch`'s docstring);
2. unless --no-compile, the same layer compiled ahead of time for a TPU slice (libtpu, no TPU
   needed): collective bytes per kind read from the compiled HLO (deepseek_jax/plan/hlo.py; a
   ragged all-to-all counts its whole buffer, an upper bound, and the a2a round loop counts
   once: one round, the balanced case), HLO temporaries from memory_analysis(), and the
   compiler's verdict (a RESOURCE_EXHAUSTED compile does not fit).

    PYTHONPATH=$PWD python bench/moe_dispatch_bytes.py                      # V3, EP 64, v5p-512
    PYTHONPATH=$PWD python bench/moe_dispatch_bytes.py --expert 8 --fsdp 32
    PYTHONPATH=$PWD python bench/moe_dispatch_bytes.py --no-compile --expert 256 --fsdp 1
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from deepseek_jax.config import load_config
from deepseek_jax.model.dispatch import DOWN_AXES, GATE_AXES, dispatch_routed
from deepseek_jax.ops.moe_a2a import buffer_rows

GB = 1e9


def analytic(n: int, d: int, k: int, p: int, factor: float) -> dict[str, dict[str, float]]:
    """Per-device bytes per MoE layer (bf16 activations, fp32 sums) of each dispatch.

    all_gather: x rows gathered (2D B, P-1 peers' n rows) + fp32 outputs reduce-scattered (4D B);
      backward: dx reduce-scattered (2D) + dy gathered (4D). Routing ids/weights (12 B/row) too.
    all_to_all: of the n·K rows, (P-1)/P leave and come back: forward x out + y back (2·2D),
      backward x and w·dy out + dx and the recomputed y back (4·2D). Ragged exchanges move only
      real rows; the dense one (CPU) moves the whole per-peer buffers, `factor`× the mean.
    """
    ag_fwd = (p - 1) * n * (2 * d + 12) + (p - 1) * n * 4 * d
    ag_bwd = (p - 1) * n * 2 * d + (p - 1) * n * 4 * d
    rows_out = n * k * (p - 1) / p
    b = buffer_rows(n * k, p, factor)
    dense_rows_out = b * (p - 1)
    return {
        "all_gather": {"forward": ag_fwd, "forward+backward": ag_fwd + ag_bwd},
        "all_to_all (ragged)": {
            "forward": rows_out * 2 * 2 * d,
            "forward+backward": rows_out * 6 * 2 * d,
        },
        "all_to_all (dense)": {
            "forward": dense_rows_out * 2 * 2 * d,
            "forward+backward": dense_rows_out * 6 * 2 * d,
        },
    }


def compile_layer(cfg, mesh_sharding, dispatch: str, n_per_chip: int, with_grad: bool):
    from deepseek_jax.plan.compile import compile_program

    moe, d = cfg.model.moe, cfg.model.hidden_size
    e, f, k = moe.n_routed_experts, moe.moe_intermediate_size, moe.n_experts_per_tok
    n = n_per_chip * mesh_sharding.mesh.size
    sh = mesh_sharding

    def arg(shape, dtype, axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh.named(axes))

    args = (
        arg((n, d), jnp.bfloat16, ("batch", None)),
        arg((n, k), jnp.int32, ("batch", None)),
        arg((n, k), jnp.float32, ("batch", None)),
        arg((e, d, f), jnp.bfloat16, GATE_AXES),
        arg((e, d, f), jnp.bfloat16, GATE_AXES),
        arg((e, f, d), jnp.bfloat16, DOWN_AXES),
        arg((n, d), jnp.float32, ("batch", None)),  # an arbitrary output cotangent
    )

    @jax.named_scope("moe")  # plan/hlo.py's DISPATCH_SCOPE: collectives of the dispatch itself
    def layer(x, experts, weights, gate, up, down):
        return dispatch_routed(
            x,
            experts,
            weights,
            gate,
            up,
            down,
            mesh_sharding=sh,
            dispatch=dispatch,
            grouped_matmul="megablox",
            buffer_factor=cfg.runtime.moe_a2a_buffer_factor if hasattr(cfg, "runtime") else 1.25,
        )

    if with_grad:

        def fn(x, experts, weights, gate, up, down, cot):
            # <y, cot> with cot an input: d(loss)/dy must not be a constant XLA can fold (the
            # all-gather dispatch's backward gathers it).
            def loss(x, weights, gate, up, down):
                return jnp.sum(layer(x, experts, weights, gate, up, down) * cot)

            # The value too: the forward's exchanges are not needed by the gradient of a sum
            # (the a2a VJP recomputes what it needs) and would otherwise be dead code.
            return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(x, weights, gate, up, down)
    else:

        def fn(x, experts, weights, gate, up, down, cot):
            return layer(x, experts, weights, gate, up, down)

    lowered = jax.jit(fn).lower(*args)
    return compile_program(lowered, sh.mesh.size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="deepseek-v3-671b")
    ap.add_argument("--topology", default="v5p-512")
    ap.add_argument("--expert", type=int, default=64)
    ap.add_argument("--fsdp", type=int, default=4)
    ap.add_argument("--tokens-per-chip", type=int, default=4096)
    ap.add_argument("--buffer-factor", type=float, default=1.25)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--forward-only", action="store_true")
    args = ap.parse_args()

    cfg = load_config(args.config, [f"mesh.expert={args.expert}", f"mesh.fsdp={args.fsdp}"])
    moe, d = cfg.model.moe, cfg.model.hidden_size
    n, k, p = args.tokens_per_chip, moe.n_experts_per_tok, args.expert
    print(
        f"{args.config}: D={d} E={moe.n_routed_experts} K={k} F={moe.moe_intermediate_size}; "
        f"{n} tokens per chip, expert axis {p}, buffer factor {args.buffer_factor} "
        f"(B = {buffer_rows(n * k, p, args.buffer_factor)} rows per peer per round)"
    )
    print("analytic bytes per device per MoE layer:")
    table = analytic(n, d, k, p, args.buffer_factor)
    for name, row in table.items():
        print(f"  {name:22s} " + "  ".join(f"{kind} {v / GB:7.3f} GB" for kind, v in row.items()))
    ag = table["all_gather"]["forward+backward"]
    a2a = table["all_to_all (ragged)"]["forward+backward"]
    print(f"  all_gather / all_to_all (ragged): {ag / a2a:.1f}x")
    if args.no_compile:
        return

    from deepseek_jax.plan.chips import parse_topology
    from deepseek_jax.plan.compile import devices_for, make_mesh_sharding

    devices = devices_for(parse_topology(args.topology))
    sh = make_mesh_sharding(cfg, devices)
    print(f"compiled for {args.topology} ({len(devices)} devices), mesh {dict(sh.mesh.shape)}:")
    traffic = {}
    for dispatch in ("all_gather", "all_to_all"):
        start = time.perf_counter()
        c = compile_layer(cfg, sh, dispatch, n, with_grad=not args.forward_only)
        if not c.fits:
            print(f"  {dispatch}: does not fit ({c.error.splitlines()[0][:200]})")
            continue
        # Token traffic: what moves rows of x, y, dx, dy. The all-reduce inside the dispatch
        # sums the expert-weight gradients over the non-expert axes, the same for both.
        traffic[dispatch] = sum(
            s.traffic_bytes for kind, s in c.hlo.dispatch.items() if kind != "all-reduce"
        )

        def kinds(stats):
            return ", ".join(
                f"{kind} {s.traffic_bytes / GB:.3f} GB ({s.ops} ops)"
                for kind, s in stats.items()
                if s.ops
            )

        print(
            f"  {dispatch}: temporaries {c.memory.get('temp_size_in_bytes', 0) / GB:.2f} GB; "
            f"token traffic {traffic[dispatch] / GB:.3f} GB; inside the dispatch: "
            f"{kinds(c.hlo.dispatch)}; "
            f"whole program: {kinds(c.hlo.collectives)}; "
            f"compile {time.perf_counter() - start:.0f} s"
        )
    if len(traffic) == 2 and traffic["all_to_all"] > 0:
        ratio = traffic["all_gather"] / traffic["all_to_all"]
        print(f"  HLO all_gather / all_to_all token traffic: {ratio:.1f}x")


if __name__ == "__main__":
    main()
