"""One MoE layer's routed experts, forward and backward, compiled ahead of time for a TPU slice.

    python bench/plan_moe_layer.py --fsdp 32 --expert 8
    python bench/plan_moe_layer.py --fsdp 4 --expert 64 --rules ep_fsdp --dispatch all_gather

A few minutes instead of the 15-25 of a whole V3 `deepseek-jax plan`: the same dispatch
(`model/dispatch.py`) with V3's shapes (D 7168, F 2048, 256 experts, top-8) on the config's mesh
and rules, fp32 master expert weights cast to bf16 as the model does, one token row per position
of `--batch` x `--seq-len`. Prints the executable's temporaries and the bytes each collective kind
moves (loop trip counts applied; the all-to-all rounds' loop counts once), and with `--top N` the
largest arrays in the compiled HLO, which is how the expert-weight gradients were found
(issue #10: whole fp32 gradients per device, summed over fsdp).
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jax
import jax.numpy as jnp

from deepseek_jax.config import load_config
from deepseek_jax.model.dispatch import DOWN_AXES, GATE_AXES, dispatch_routed
from deepseek_jax.plan.chips import parse_topology
from deepseek_jax.plan.compile import make_mesh_sharding
from deepseek_jax.plan.hlo import summarize, type_bytes

GiB = 1024**3


def largest_arrays(hlo: str, top: int) -> list[tuple[float, str, str]]:
    """(GiB, computation, instruction) of the largest results outside fusion bodies."""
    out, comp = [], ""
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$", line)
        if m:
            comp = m.group(1)
            continue
        m = re.match(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+)\s", line)
        if m and not comp.startswith("fused") and ".clone" not in comp:
            out.append((type_bytes(m.group(2)) / GiB, comp, m.group(1)))
    return sorted(out, reverse=True)[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5p-512")
    p.add_argument("--fsdp", type=int, default=32)
    p.add_argument("--expert", type=int, default=8)
    p.add_argument("--rules", default="ep")
    p.add_argument("--dispatch", default="all_to_all")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--top", type=int, default=0, help="also list the N largest HLO arrays")
    a = p.parse_args()

    cfg = load_config(
        "deepseek-v3-671b",
        [f"mesh.fsdp={a.fsdp}", f"mesh.expert={a.expert}", f"mesh.rules={a.rules}"],
    )
    devices = parse_topology(a.topology).devices()
    sh = make_mesh_sharding(cfg, devices)
    moe = cfg.model.moe
    n, d, f = a.batch * a.seq_len, cfg.model.hidden_size, moe.moe_intermediate_size
    e, k = moe.n_routed_experts, moe.n_experts_per_tok
    rows = sh.named(("batch", None))
    gate_s, down_s = sh.named(GATE_AXES), sh.named(DOWN_AXES)

    def spec(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    args = (
        spec((n, d), jnp.bfloat16, rows),  # tokens
        spec((n, k), jnp.int32, rows),  # chosen experts
        spec((n, k), jnp.float32, rows),  # routing weights
        spec((e, d, f), jnp.float32, gate_s),
        spec((e, d, f), jnp.float32, gate_s),
        spec((e, f, d), jnp.float32, down_s),
        spec((n, d), jnp.float32, rows),  # output cotangent
    )

    def step(x, experts, weights, gate, up, down, cot):
        def loss(x, weights, gate, up, down):
            bf16 = jnp.bfloat16
            y = dispatch_routed(
                x, experts, weights, gate.astype(bf16), up.astype(bf16), down.astype(bf16),
                mesh_sharding=sh, dispatch=a.dispatch,
            )  # fmt: skip
            return jnp.sum(y * cot)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, weights, gate, up, down)

    start = time.perf_counter()
    exe = jax.jit(step, out_shardings=(rows, rows, gate_s, gate_s, down_s)).lower(*args).compile()
    facts = {"mesh": dict(sh.mesh.shape), "rules": a.rules, "dispatch": a.dispatch}
    print_report(facts, exe, time.perf_counter() - start, len(devices), a.top)


def print_report(facts: dict, exe, seconds: float, n_devices: int, top: int) -> None:
    """`facts` plus the executable's temporaries and collective bytes as JSON, then the `top`
    largest HLO arrays."""
    ma, text = exe.memory_analysis(), exe.as_text()
    hlo = summarize(text, n_devices)
    collectives = {
        kind: {
            "ops": c.ops,
            "operand": round(c.buffer_bytes / GiB, 3),
            "over_links": round(c.traffic_bytes / GiB, 3),
        }
        for kind, c in hlo.collectives.items()
        if c.ops
    }
    facts = {
        **facts,
        "compile_s": round(seconds),
        "temp_gib": round(ma.temp_size_in_bytes / GiB, 3),
        "arguments_gib": round(ma.argument_size_in_bytes / GiB, 3),
        "collectives_gib": collectives,
    }
    print(json.dumps(facts, indent=1))
    for gib, comp, name in largest_arrays(text, top):
        print(f"{gib:7.2f} GiB  {comp[:40]:40}  {name}")


if __name__ == "__main__":
    main()
