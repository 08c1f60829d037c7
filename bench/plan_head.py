"""The output head's loss, forward and backward, compiled ahead of time for a TPU slice.

    python bench/plan_head.py                                  # V3, v5p-512, fsdp 32 x expert 8
    python bench/plan_head.py --cross-entropy full --top 10

Seconds instead of the 15-25 minutes of a whole V3 `deepseek-jax plan`: the cross-entropy of the
main head and each MTP depth (`ops/cross_entropy.py`, as `train/loss.py` calls it) with V3's
shapes (D 7168, vocabulary 129280) on the config's mesh and rules, normed hidden states in the
compute dtype, the fp32 master head stored as the rules split it. Prints the executable's
temporaries and the bytes each collective kind moves, and with `--top N` the largest arrays in
the compiled HLO: how the whole fp32 copies of the head's gradient were found (issue #10).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

from deepseek_jax.config import load_config
from deepseek_jax.ops.cross_entropy import head_ce
from deepseek_jax.plan.chips import parse_topology
from deepseek_jax.plan.compile import make_mesh_sharding
from deepseek_jax.runtime import Runtime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plan_moe_layer import print_report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="deepseek-v3-671b")
    p.add_argument("--topology", default="v5p-512")
    p.add_argument("--fsdp", type=int, default=32)
    p.add_argument("--expert", type=int, default=8)
    p.add_argument("--rules", default="ep_fsdp")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--cross-entropy", default="chunked", choices=("full", "chunked"))
    p.add_argument("overrides", nargs="*", help="more config overrides (runtime.*=...)")
    p.add_argument("--top", type=int, default=0, help="also list the N largest HLO arrays")
    a = p.parse_args()

    cfg = load_config(
        a.config,
        [
            f"mesh.fsdp={a.fsdp}",
            f"mesh.expert={a.expert}",
            f"mesh.rules={a.rules}",
            f"runtime.cross_entropy={a.cross_entropy}",
            *a.overrides,
        ],
    )
    devices = parse_topology(a.topology).devices()
    sh = make_mesh_sharding(cfg, devices)
    rt = Runtime(cfg.runtime, sh)
    depths = 1 + cfg.model.mtp.depth
    d, v = cfg.model.hidden_size, cfg.model.vocab_size
    rows = sh.named((None, "batch", None, None))
    head_s = sh.named(("embed", "vocab"))  # as model/transformer.py names the head's axes
    args = (
        jax.ShapeDtypeStruct((depths, a.batch, a.seq_len, d), rt.compute_dtype, sharding=rows),
        jax.ShapeDtypeStruct((d, v), rt.param_dtype, sharding=head_s),
        jax.ShapeDtypeStruct((a.batch, a.seq_len), jnp.int32, sharding=sh.named(("batch", None))),
    )

    def step(h_kbtd, head_DV, targets_bt):
        def loss(h_kbtd, head_DV):
            total = 0.0
            for k in range(depths):  # main head, then each MTP depth (shifted targets aside)
                ce, lse = head_ce(h_kbtd[k], head_DV, targets_bt, rt)
                total += jnp.sum(ce) + 1e-4 * jnp.sum(lse * lse)
            return total

        return jax.grad(loss, argnums=(0, 1))(h_kbtd, head_DV)

    start = time.perf_counter()
    exe = jax.jit(step, out_shardings=(rows, head_s)).lower(*args).compile()
    facts = {
        "mesh": dict(sh.mesh.shape),
        "rules": a.rules,
        "cross_entropy": a.cross_entropy,
        "heads": depths,
    }
    print_report(facts, exe, time.perf_counter() - start, len(devices), a.top)


if __name__ == "__main__":
    main()
