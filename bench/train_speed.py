"""Train-step speed: our jitted step against transformers' DeepseekV3ForCausalLM (PyTorch eager,
AdamW) on the same model, in the same run, plus expert scaling and compile time.

    python bench/train_speed.py                     # everything, a few minutes on 2 cores
    python bench/train_speed.py --rounds 5 --steps 8 --only compare
    python bench/train_speed.py --results runs/bench/train_speed.jsonl

Every measurement runs in a fresh process, and the implementations alternate (ours, theirs,
ours, ...) for --rounds rounds, so that drift in machine load hits both sides alike; the table
shows medians over rounds of each process's median step time, and the ratio of the medians.
Each process times --steps steps after --warmup steps (compilation excluded) on one fixed
random batch. MFU is the analytic FLOP count (`train/flops.py`: 6 x active matmul parameters
plus attention, per token) against the matmul peak (a 2048^3 matmul) measured in the same run.

Our processes run as the `deepseek-jax` command runs them, under glibc's transparent-huge-page
malloc tunable (deepseek_jax/host.py); transformers runs both without it (its default) and with
it, and the ratio is taken against its faster median.

Sections (--only): `compare` (ours in fp32 and bf16 compute vs transformers in fp32, on the
issue's shapes and on tiny.yaml without MTP; plus ours in fp32 with the runtime tiny.yaml had
before, scanned layers and the xla attention kernel, without the tunable, and ours in bf16
without it), `experts` (tokens/s with 8, 16, 64 routed experts at top-4 and expert width
128: ours in each --expert-dtypes, and transformers' fp32 step for reference unless
--no-expert-reference), `compile` (scanned vs unrolled layers) and `runtime` (our step
with the old and the current tiny.yaml runtime, compiled in one process and run in turns: the
way to see differences smaller than the drift between processes). Results are
also appended as JSON lines to --results, one line per process plus one summary line per row.
On a shared machine absolute figures are noisy; ratios within one run are what to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_setup import Case, compiled_step, config_for, random_batch  # noqa: E402

from deepseek_jax.host import malloc_env, reexec_with_malloc_env, without_malloc_thp  # noqa: E402

# The runtime tiny.yaml had before it unrolled its layers, took causal_blocks attention and the
# tiled cross-entropy.
BEFORE = ("runtime.scan_layers=true", "runtime.attention=xla", "runtime.cross_entropy=full")

# -- workers (one per process) ---------------------------------------------------------------


def worker_jax(case: Case, steps: int, warmup: int) -> dict:
    import jax
    import numpy as np

    from deepseek_jax.train.flops import train_flops_per_token

    cfg = config_for(case)
    compiled, state, batch, compile_s = compiled_step(cfg)
    tokens = batch["tokens"]
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - start)
    tokens_per_step = tokens.size
    return dict(
        step_s=float(np.median(times)),
        compile_s=compile_s,
        tokens_per_step=tokens_per_step,
        flops_per_token=train_flops_per_token(cfg.model, cfg.train.seq_len),
        loss=float(metrics["loss"]),
        imbalance=[round(float(x), 3) for x in np.asarray(metrics["load_imbalance"])],
    )


def worker_torch(case: Case, steps: int, warmup: int) -> dict:
    import numpy as np
    import torch
    import transformers

    from deepseek_jax.config import to_hf_config
    from deepseek_jax.train.flops import train_flops_per_token

    cfg = config_for(case)
    if case.dtype != "float32":
        raise ValueError("the transformers baseline runs in float32 only")
    hf = transformers.DeepseekV3Config(**to_hf_config(cfg.model))
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(hf)
    model.train()
    tc = cfg.train
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=tc.learning_rate,
        betas=(tc.b1, tc.b2),
        eps=tc.eps,
        weight_decay=tc.weight_decay,
    )
    tokens, targets = random_batch(cfg)
    x = torch.from_numpy(tokens.astype(np.int64))
    y = torch.from_numpy(targets.astype(np.int64))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return dict(
        step_s=float(np.median(times)),
        tokens_per_step=int(x.numel()),
        flops_per_token=train_flops_per_token(cfg.model, cfg.train.seq_len),
        loss=float(loss.detach()),
        torch_threads=torch.get_num_threads(),
        attn_implementation=hf._attn_implementation,
        experts_implementation=getattr(hf, "_experts_implementation", None),
    )


def worker_peak(case: Case, steps: int, warmup: int) -> dict:
    from deepseek_jax.train.flops import measure_peak_flops

    return dict(peak_flops=max(measure_peak_flops(case.dtype) for _ in range(3)))


WORKERS = {"jax": worker_jax, "torch": worker_torch, "peak": worker_peak}


# -- driver ----------------------------------------------------------------------------------


def run_case(case: Case, steps: int, warmup: int) -> dict:
    """Run one case in a fresh process; returns its JSON result."""
    env = malloc_env() if case.malloc == "thp" else without_malloc_thp(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        json.dumps(dataclasses.asdict(case)),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved(variants: dict, steps: int, warmup: int) -> dict[str, list[float]]:
    """Step times of our step under each variant's overrides, compiled in this process and run
    in turns (one step of each per round), so that load drift hits every variant alike."""
    import jax

    runs = {}
    for label, extra in variants.items():
        compiled, state, batch, _ = compiled_step(config_for(Case("jax", "issue", extra=extra)))
        for _ in range(warmup):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        runs[label] = [compiled, state, batch, []]
    for _ in range(steps):
        for run in runs.values():
            compiled, state, batch, ts = run
            start = time.perf_counter()
            run[1], metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
            ts.append(time.perf_counter() - start)
    return {label: run[3] for label, run in runs.items()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the processes")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument(
        "--only", choices=("compare", "experts", "compile", "runtime"), action="append"
    )
    parser.add_argument("--shapes", default="issue,tiny", help="comma list of: issue, tiny")
    parser.add_argument("--expert-dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--expert-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the experts section also times transformers (fp32) at each expert count",
    )
    parser.add_argument("--results", default="runs/bench/train_speed.jsonl")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured

    if args.worker:
        fields = json.loads(args.worker)
        case = Case(**{**fields, "extra": tuple(fields["extra"])})
        out = WORKERS[case.impl](case, args.steps, args.warmup)
        print(json.dumps({**dataclasses.asdict(case), **out}))
        return 0

    # Run as the `deepseek-jax` command does (see deepseek_jax/host.py): the in-process sections
    # and the workers inherit the malloc tunable; "plain" cases drop it.
    if argv is None:
        reexec_with_malloc_env()
    sections = args.only or ["compare", "experts", "compile", "runtime"]
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    log = open(args.results, "a")

    def record(kind: str, row: dict) -> None:
        log.write(json.dumps({"run": run_id, "kind": kind, **row}) + "\n")
        log.flush()

    print(f"# run {run_id}, load average at start {load_average()}, {os.cpu_count()} CPUs")
    # The matmul peak, measured in this run, in both dtypes (for MFU).
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        r = run_case(Case("peak", dtype=dtype), 0, 0)
        record("process", r)
        peaks[dtype] = r["peak_flops"]
    print(
        "# matmul peak (2048^3): "
        + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items())
    )

    if "compare" in sections:
        print("\n## ours vs transformers (tokens/s, median over rounds)")
        print(
            f"{'shape':<6} {'implementation':<36} {'step s':>8} {'tokens/s':>9} "
            f"{'vs HF':>6} {'MFU':>6}  per-round step s"
        )
        for shape in args.shapes.split(","):
            cases = [
                Case(
                    "jax",
                    shape,
                    "float32",
                    BEFORE,
                    "deepseek-jax fp32, scan + xla attn (before)",
                    malloc="plain",
                ),
                Case("jax", shape, "float32", label="deepseek-jax fp32 compute"),
                Case("jax", shape, "bfloat16", label="deepseek-jax bf16 compute"),
                Case(
                    "jax",
                    shape,
                    "bfloat16",
                    label="deepseek-jax bf16, plain malloc",
                    malloc="plain",
                ),
                Case("torch", shape, "float32", label="transformers eager fp32, THP malloc"),
                Case(
                    "torch",
                    shape,
                    "float32",
                    label="transformers eager fp32 (AdamW)",
                    malloc="plain",
                ),
            ]
            per = {c: [] for c in cases}
            for _ in range(args.rounds):
                for c in cases:
                    r = run_case(c, args.steps, args.warmup)
                    r["load_average"] = load_average()
                    record("process", r)
                    per[c].append(r)
            # Against transformers' faster environment: the tunable is ours, not its default.
            base = min(statistics.median(r["step_s"] for r in per[c]) for c in cases[-2:])
            for c in cases:
                rs = per[c]
                step = statistics.median(r["step_s"] for r in rs)
                tps = rs[0]["tokens_per_step"] / step
                mfu = tps * rs[0]["flops_per_token"] / peaks[c.dtype]
                row = dict(
                    section="compare",
                    shape=shape,
                    label=c.label,
                    dtype=c.dtype,
                    step_s=step,
                    tokens_per_s=tps,
                    speedup_vs_hf=base / step,
                    mfu=mfu,
                    rounds=[round(r["step_s"], 4) for r in rs],
                )
                record("summary", row)
                print(
                    f"{shape:<6} {c.label:<36} {step:8.3f} {tps:9.0f} {base / step:5.2f}x "
                    f"{mfu:6.1%}  {row['rounds']}"
                )

    if "experts" in sections:
        print("\n## routed experts at top-4, expert width 128 (issue shapes)")
        print(f"{'experts':>7} {'implementation':<22} {'step s':>8} {'tokens/s':>9} {'vs 8':>6}")
        counts = (8, 16, 64)
        impls = [("jax", dtype, f"deepseek-jax {dtype}") for dtype in args.expert_dtypes.split(",")]
        if args.expert_reference:
            impls.append(("torch", "float32", "transformers float32"))
        for impl, dtype, name in impls:
            cases = [
                Case(impl, "issue", dtype, (f"model.moe.n_routed_experts={e}",), f"{e} experts")
                for e in counts
            ]
            per = {c: [] for c in cases}
            for _ in range(args.rounds):
                for c in cases:
                    r = run_case(c, args.steps, args.warmup)
                    record("process", r)
                    per[c].append(r["step_s"])
            base = statistics.median(per[cases[0]])
            for e, c in zip(counts, cases, strict=True):
                step = statistics.median(per[c])
                tps = 2048 / step
                record(
                    "summary",
                    dict(
                        section="experts",
                        experts=e,
                        impl=impl,
                        dtype=dtype,
                        step_s=step,
                        vs_8=step / base,
                        rounds=[round(t, 4) for t in per[c]],
                    ),
                )
                print(f"{e:>7} {name:<22} {step:8.3f} {tps:9.0f} {step / base:5.2f}x")

    if "compile" in sections:
        print("\n## compile time of the train step (issue shapes, fp32, seconds)")
        cases = [
            Case("jax", "issue", "float32", ("runtime.scan_layers=true",), "scanned"),
            Case("jax", "issue", "float32", ("runtime.scan_layers=false",), "unrolled"),
        ]
        per = {c: [] for c in cases}
        for _ in range(max(1, args.rounds - 1)):
            for c in cases:
                r = run_case(c, 1, 0)
                record("process", r)
                per[c].append(r)
        for c in cases:
            comp = statistics.median(r["compile_s"] for r in per[c])
            step = statistics.median(r["step_s"] for r in per[c])
            record("summary", dict(section="compile", label=c.label, compile_s=comp, step_s=step))
            print(f"{c.label:<9} compile {comp:6.1f} s   first timed step {step:.3f} s")

    if "runtime" in sections:
        # Process-to-process drift on a shared machine can exceed the differences between
        # runtimes: compile them in one process and interleave their steps instead.
        print("\n## runtime variants in one process, steps interleaved (issue shapes, fp32)")
        variants = {
            "scan + xla attention + full CE (before)": BEFORE,
            "unrolled + xla attention + full CE": (
                "runtime.attention=xla",
                "runtime.cross_entropy=full",
            ),
            "unrolled + causal_blocks 64 + full CE": ("runtime.cross_entropy=full",),
            "tiny.yaml (unrolled, causal_blocks 64, tiled CE)": (),
        }
        times = interleaved(variants, args.steps * 2, args.warmup)
        base = statistics.median(next(iter(times.values())))
        for label, ts in times.items():
            step = statistics.median(ts)
            record("summary", dict(section="runtime", label=label, step_s=step, steps=ts))
            print(f"{label:<40} median {step:.3f} s  min {min(ts):.3f} s  {base / step:.2f}x")

    print(f"\n# load average at end {load_average()}; results appended to {args.results}")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
