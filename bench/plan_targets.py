"""Run `deepseek-jax plan` for the pod-scale targets of issue #10 and print their table.

    python bench/plan_targets.py                 # every target, one compile at a time
    python bench/plan_targets.py --only v3_fsdp32_ep8 v2lite_v5p8
    python bench/plan_targets.py --summarize     # only print the table from saved JSON

Each target is one `deepseek-jax plan ... --json` subprocess (its exact command is printed and
saved next to its JSON in --out). V3 compiles take many minutes and several GiB of host memory
each: run them one at a time. Needs libtpu (`pip install -e ".[tpu-aot]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

GiB = 1024**3
V3 = "deepseek-v3-671b"
# Settings shared by the V3 training targets: bf16 compute, fp32 master weights and Adam (the
# config's defaults), memory-lean attention and loss, MTP depth 1 (the config's). Chunked
# attention, not splash: ops/attention.py picks Pallas interpret mode from the host backend, so
# an ahead-of-time compile from a CPU host gets the interpreted kernel (a loop of 8192 block
# steps in the HLO), not the TPU one.
V3_RUNTIME = [
    "runtime.attention=chunked",
    "runtime.cross_entropy=chunked",
    "runtime.remat=full",
]

TARGETS: dict[str, tuple[str, list[str]]] = {
    # seq 4096, one sequence per chip, fsdp 32 x expert 8 (MaxText: 66.8 GiB on these settings).
    "v3_fsdp32_ep8": (
        "V3 v5p-512, 256 x 4096, fsdp 32 x expert 8",
        [V3, "--topology", "v5p-512", "train.batch_size=256", "train.seq_len=4096"]
        + ["mesh.fsdp=32", "mesh.expert=8", "mesh.rules=ep", *V3_RUNTIME]
        + ["runtime.moe_dispatch=all_to_all"],
    ),
    # fsdp 4 x expert 64, dropless all-to-all dispatch.
    "v3_fsdp4_ep64": (
        "V3 v5p-512, 256 x 4096, fsdp 4 x expert 64, all-to-all",
        [V3, "--topology", "v5p-512", "train.batch_size=256", "train.seq_len=4096"]
        + ["mesh.fsdp=4", "mesh.expert=64", "mesh.rules=ep_fsdp", *V3_RUNTIME]
        + ["runtime.moe_dispatch=all_to_all"],
    ),
    # >= 32K tokens per chip: 8 x 4096 per chip.
    "v3_32k_per_chip": (
        "V3 v5p-512, 2048 x 4096 (32K tokens/chip), fsdp 32 x expert 8, offload",
        [V3, "--topology", "v5p-512", "train.batch_size=2048", "train.seq_len=4096"]
        + ["mesh.fsdp=32", "mesh.expert=8", "mesh.rules=ep"]
        + ["runtime.attention=chunked", "runtime.cross_entropy=chunked", "runtime.remat=offload"]
        + ["runtime.moe_dispatch=all_to_all"],
    ),
    # Collective bytes of the two dispatches at expert 64, on a batch both fit (256 x 1024).
    "v3_ep64_dispatch_a2a": (
        "V3 v5p-512, 256 x 1024, fsdp 4 x expert 64, all-to-all dispatch",
        [V3, "--topology", "v5p-512", "train.batch_size=256", "train.seq_len=1024"]
        + ["mesh.fsdp=4", "mesh.expert=64", "mesh.rules=ep_fsdp", *V3_RUNTIME]
        + ["runtime.moe_dispatch=all_to_all"],
    ),
    "v3_ep64_dispatch_allgather": (
        "V3 v5p-512, 256 x 1024, fsdp 4 x expert 64, all-gather dispatch",
        [V3, "--topology", "v5p-512", "train.batch_size=256", "train.seq_len=1024"]
        + ["mesh.fsdp=4", "mesh.expert=64", "mesh.rules=ep_fsdp", *V3_RUNTIME]
        + ["runtime.moe_dispatch=all_gather"],
    ),
    # V2-Lite on 4 chips with 4096-token sequences, one per chip.
    "v2lite_v5p8": (
        "V2-Lite v5p-8, 4 x 4096, fsdp 4",
        ["deepseek-v2-lite", "--topology", "v5p-8", "train.batch_size=4", "train.seq_len=4096"]
        + ["mesh.fsdp=4", "runtime.attention=chunked", "runtime.cross_entropy=chunked"]
        + ["runtime.remat=full"],
    ),
    # Decode: latent cache of 128 sequences x 32K tokens, bf16 weights, on v5p-64.
    "v3_decode_v5p64": (
        "V3 decode v5p-64, 128 x 32768 cache, bf16 weights",
        [V3, "--topology", "v5p-64", "--generate", "--batch", "128", "--context", "32768"]
        + ["mesh.fsdp=4", "mesh.expert=8", "mesh.rules=ep_fsdp"],
    ),
}


def command(args: list[str], hlo_out: str) -> list[str]:
    return [sys.executable, "-m", "deepseek_jax.cli", "plan", *args, "--json", "--hlo-out", hlo_out]


def run(name: str, out_dir: str, timeout: int) -> None:
    _, args = TARGETS[name]
    cmd = command(args, os.path.join(out_dir, f"{name}.hlo"))
    shown = "deepseek-jax plan " + " ".join(shlex.quote(a) for a in args)
    print(f"[{name}] {shown}", flush=True)
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, code, err = proc.stdout, proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        stdout, code, err = "", -1, f"timed out after {timeout} s"
    record = {"name": name, "command": shown, "exit_code": code, "wall_s": time.time() - start}
    try:
        record["results"] = json.loads(stdout)
    except json.JSONDecodeError:
        record["results"] = []
        record["stderr_tail"] = [
            line for line in err.splitlines() if not line.startswith(("W0", "I0", "E0"))
        ][-5:]
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"[{name}] exit {code} after {record['wall_s']:.0f} s", flush=True)


def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.1f}"


def summarize(out_dir: str) -> str:
    rows = [
        "| target | fits | params+opt GiB | temp GiB | total GiB | headroom | step ms (roofline) "
        "| MFU | dispatch per MoE layer | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (title, _) in TARGETS.items():
        path = os.path.join(out_dir, f"{name}.json")
        if not os.path.exists(path):
            rows.append(f"| {title} | not measured | | | | | | | | |")
            continue
        with open(path) as f:
            rec = json.load(f)
        if not rec["results"]:
            why = "; ".join(rec.get("stderr_tail", []))[-160:]
            rows.append(f"| {title} | failed: {why} | | | | | | | | `{rec['command']}` |")
            continue
        r = rec["results"][0]
        state = r["state_bytes"].get("params", 0) + r["state_bytes"].get("opt_state", 0)
        if r["fits"]:
            roof = r["roofline"]
            moved = sum(c["traffic_bytes"] for c in r["dispatch"].values())
            per_layer = f"{moved / r['moe_layers'] / GiB:.2f} GiB" if r["moe_layers"] else "-"
            rows.append(
                f"| {title} | yes | {_gib(state)} | {_gib(r['memory']['temp_size_in_bytes'])} "
                f"| {_gib(r['total_bytes'])} | {r['headroom']:.0%} | {roof['step_s'] * 1e3:.0f} "
                f"| {roof['mfu']:.1%} | {per_layer} | `{rec['command']}` |"
            )
        else:
            rows.append(
                f"| {title} | no (compiler needs {_gib(r['compiler_required_bytes'])} of "
                f"{_gib(r['hbm_compiler_bytes'])}) | {_gib(state)} | | | | | | | "
                f"`{rec['command']}` |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(TARGETS), help="run these targets")
    parser.add_argument("--out", default="runs/plan_targets", help="folder for the JSON records")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
    parser.add_argument("--summarize", action="store_true", help="only print the saved table")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.summarize:
        for name in args.only or list(TARGETS):
            run(name, args.out, args.timeout)
    print(summarize(args.out))


if __name__ == "__main__":
    main()
