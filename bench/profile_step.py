"""Where the train step's time goes: a `jax.profiler` trace of the compiled step, each XLA op
attributed to the model code that emitted it.

    python bench/profile_step.py                           # issue #12's shapes, fp32 compute
    python bench/profile_step.py --dtype bfloat16 --steps 5
    python bench/profile_step.py --shape tiny model.moe.n_routed_experts=64

XLA:CPU records one trace event per executed op (a "thunk", named after its HLO instruction).
The optimized HLO gives each instruction its source stack; the innermost frame in our package
(or optax) picks the category, e.g. `model/mla.py` -> attention, `grouped_swiglu` -> grouped
matmul, `optax` -> optimizer; `transpose(...)` in the op name marks the backward pass. Op time
is summed over all threads, so categories are shares of busy time; "host and idle" is the wall
time of a step minus the time at least one op was running.

Read the shares as where to look, not as what a change will save: XLA:CPU runs independent ops
two at a time on a 2-core machine, and an op sharing the cores runs slower, so its recorded time
depends on what ran beside it. Measured: the tiled cross-entropy showed 74 -> 134 ms of op time
against the full one while the step, timed in one process with the two programs interleaved,
got 57 ms faster. Judge changes that way (`train_speed.py --only runtime`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

# Category of an op by the innermost frame of ours: (file suffix, function or None) -> name.
RULES = [
    ("ops/gmm_", None, "grouped matmul"),
    ("ops/grouped_matmul.py", None, "grouped matmul"),
    ("model/dispatch.py", "grouped_swiglu", "grouped matmul"),
    ("model/dispatch.py", None, "dispatch gather/scatter/sort"),
    ("ops/moe_blocked.py", None, "routed experts, blocked (layout, matmuls, combine)"),
    ("ops/moe_", None, "dispatch gather/scatter/sort"),
    ("model/moe.py", None, "routing (router, top-k, load, balance loss)"),
    ("model/mla.py", None, "attention"),
    ("model/rope.py", None, "attention"),
    ("ops/attention.py", None, "attention"),
    ("model/layers.py", "SwiGLU.__call__", "dense and shared-expert MLP"),
    ("model/layers.py", "RMSNorm.__call__", "norms"),
    ("model/layers.py", "Embed.__call__", "embedding"),
    ("train/loss.py", None, "lm head and cross-entropy"),
    ("ops/cross_entropy.py", None, "lm head and cross-entropy"),
    ("model/transformer.py", "DeepSeek.head", "lm head and cross-entropy"),
    ("optax/", None, "optimizer and bias update"),
    ("train/optim.py", None, "optimizer and bias update"),
    ("train/step.py", "update_router_bias", "optimizer and bias update"),
]
SKIP_FUNCTIONS = {"cast", "param"}  # helpers called from everywhere: look one frame further
CONTROL = {"while", "conditional", "call", "parameter", "get-tuple-element", "tuple"}


def parse_hlo(text: str) -> dict[str, tuple[str, str, list[tuple[str, str]]]]:
    """instruction name -> (opcode, op_name, [(file, function), ...] innermost first)."""
    head, _, rest = text.partition("FunctionNames")
    files = dict(re.findall(r'^(\d+) "(.*)"$', head, re.M))
    funcs_part = rest.split("FileLocations")[0]
    funcs = dict(re.findall(r'^(\d+) "(.*)"$', funcs_part, re.M))
    locs = {
        i: (f, fn)
        for i, f, fn in re.findall(
            r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+)", text, re.M
        )
    }
    frames = {
        i: (loc, parent)
        for i, loc, parent in re.findall(
            r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", text, re.M
        )
    }

    def stack(frame: str) -> list[tuple[str, str]]:
        out, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc, parent = frames[frame]
            f, fn = locs[loc]
            out.append((files.get(f, "?"), funcs.get(fn, "?")))
            if parent == frame:
                break
            frame = parent
        return out

    instr = {}
    pattern = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([\w-]+)\(.*?(?:metadata=\{(.*)\})?$")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        name, opcode, meta = m.group(1), m.group(2), m.group(3) or ""
        op_name = re.search(r'op_name="([^"]*)"', meta)
        frame = re.search(r"stack_frame_id=(\d+)", meta)
        instr[name] = (
            opcode,
            op_name.group(1) if op_name else "",
            stack(frame.group(1)) if frame else [],
        )
    return instr


def categorize(op_name: str, frames: list[tuple[str, str]]) -> str:
    for file, func in frames:
        if func.split(".")[-1] in SKIP_FUNCTIONS:
            continue
        for suffix, want, category in RULES:
            if suffix in file and (want is None or func.endswith(want)):
                return category
        if "deepseek_jax" in file or "optax" in file:
            return "other (" + file.split("/")[-1] + ":" + func + ")"
    return "other (no source)"


def trace_step(args) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step_setup import Case, compiled_step, config_for

    cfg = config_for(Case("jax", args.shape, args.dtype, tuple(args.overrides)))
    compiled, state, batch, _ = compiled_step(cfg)
    hlo = parse_hlo(compiled.as_text())
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])

    directory = tempfile.mkdtemp(prefix="profile_step_")
    walls = []
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        walls.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events

    by_cat: dict[str, float] = collections.defaultdict(float)
    by_op: dict[tuple[str, str, str], float] = collections.defaultdict(float)
    intervals = []
    for e in events:
        if e.get("ph") != "X" or e["name"] not in hlo:
            continue
        opcode, op_name, frames = hlo[e["name"]]
        if opcode in CONTROL:
            continue
        category = categorize(op_name, frames)
        pass_ = "bwd" if "transpose(" in op_name else "fwd"
        if category.startswith("optimizer"):
            pass_ = "-"
        dur = e["dur"] * 1e-6 / args.steps
        by_cat[(category, pass_)] += dur
        by_op[(e["name"], category, op_name[-90:])] += dur
        intervals.append((e["ts"], e["ts"] + e["dur"]))
    intervals.sort()
    busy, end = 0.0, -1.0
    for a, b in intervals:
        if b > end:
            busy += b - max(a, end)
            end = b
    wall = float(np.median(walls))
    return dict(
        shape=args.shape,
        dtype=args.dtype,
        overrides=args.overrides,
        wall_s=wall,
        busy_s=busy * 1e-6 / args.steps,
        categories={f"{c} [{p}]": v for (c, p), v in by_cat.items()},
        top_ops=sorted(((v, n, c, o) for (n, c, o), v in by_op.items()), reverse=True)[:25],
        load_average=os.getloadavg(),
    )


def report(r: dict) -> None:
    total = sum(r["categories"].values())
    print(
        f"# shape {r['shape']}, {r['dtype']} compute {r['overrides']}: step {r['wall_s']:.3f} s "
        f"wall, ops busy {r['busy_s']:.3f} s, op time summed over threads {total:.3f} s; "
        f"load average {[round(x, 2) for x in r['load_average']]}"
    )
    merged: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for key, v in r["categories"].items():
        cat, pass_ = key.rsplit(" [", 1)
        merged[cat][pass_[:-1]] = v
    print(f"{'category':<46} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} {'share':>6}")
    for cat, parts in sorted(merged.items(), key=lambda kv: -sum(kv[1].values())):
        s = sum(parts.values())
        fwd, bwd = parts.get("fwd", 0.0), parts.get("bwd", 0.0)
        print(f"{cat:<46} {1e3 * fwd:8.1f} {1e3 * bwd:8.1f} {1e3 * s:9.1f} {s / total:6.1%}")
    host = max(r["wall_s"] - r["busy_s"], 0.0)
    print(f"{'host and idle (wall - busy)':<46} {'':>8} {'':>8} {1e3 * host:9.1f}")
    print("\ntop ops (ms per step):")
    for v, name, cat, op in r["top_ops"][:15]:
        print(f"{1e3 * v:8.1f}  {name:<28} {cat[:28]:<28} {op}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="issue", choices=("issue", "tiny"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--results", default="runs/bench/profile_step.jsonl")
    parser.add_argument("--label", default="", help="stored with the result (e.g. before/after)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, key=value")
    args = parser.parse_args(argv)
    if argv is None:  # profile the step as the `deepseek-jax` command runs it
        from deepseek_jax.host import reexec_with_malloc_env

        reexec_with_malloc_env()
    r = trace_step(args)
    r["label"] = args.label
    report(r)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
