"""The `deepseek-jax plan` subcommand: argument parsing and printing around `plan` / `sweep`."""

from __future__ import annotations

import argparse
import sys


def add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="compile the train (or decode) step for a TPU slice: memory, cost, roofline",
        description="Compile the real train step ahead of time for a TPU slice (no TPU needed; "
        'libtpu from `pip install -e ".[tpu-aot]"`) and report per-chip memory, XLA cost, '
        "collective bytes and a roofline estimate. Exits 1 when it does not fit.",
    )
    p.add_argument("config", help="YAML path or name in configs/")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (mesh.*, train.*)")
    p.add_argument(
        "--topology",
        required=True,
        help="TPU slice: v5p-512, v4-128, v5e-256, v6e-64, v5p:8x8x4; a comma list plans each "
        "(the smallest that fits is named)",
    )
    p.add_argument("--sweep", action="store_true", help="try several meshes/rules/remat policies")
    p.add_argument(
        "--meshes",
        help="sweep these meshes, ';'-separated, e.g. 'fsdp=32,expert=8;fsdp=4,expert=64'",
    )
    p.add_argument("--rules", help="sweep these rules presets, comma-separated")
    p.add_argument("--remats", help="sweep these remat policies, comma-separated")
    p.add_argument("--generate", action="store_true", help="plan one decode step instead")
    p.add_argument("--batch", type=int, help="--generate: sequences decoded together")
    p.add_argument("--context", type=int, help="--generate: latent cache length in tokens")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--hlo-out", metavar="FILE", help="write the compiled HLO text here")
    p.add_argument(
        "--memory-report",
        type=int,
        default=0,
        metavar="N",
        help="list the N largest temporaries from XLA's buffer assignment (what fills HBM)",
    )
    p.set_defaults(func=plan_command)


def _split(text: str | None, sep: str) -> list[str] | None:
    return [s.strip() for s in text.split(sep) if s.strip()] if text else None


def plan_command(args: argparse.Namespace) -> int:
    from deepseek_jax.plan.chips import TopologyError
    from deepseek_jax.plan.compile import PlanError

    try:
        return _run(args)
    except (PlanError, TopologyError) as e:
        print(f"deepseek-jax plan: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from deepseek_jax.plan.report import dumps, format_result, format_sweep
    from deepseek_jax.plan.run import plan, sweep

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = []
    for topology in _split(args.topology, ","):
        if args.sweep:
            results += sweep(
                args.config,
                topology,
                args.overrides,
                meshes=_split(args.meshes, ";"),
                rules=_split(args.rules, ","),
                remats=_split(args.remats, ","),
                generate=args.generate,
                batch=args.batch,
                context=args.context,
                log=log,
            )
        else:
            results.append(
                plan(
                    args.config,
                    topology,
                    args.overrides,
                    generate=args.generate,
                    batch=args.batch,
                    context=args.context,
                    hlo_out=args.hlo_out,
                    memory_report=args.memory_report,
                )
            )
    if args.json:
        print(dumps(results))
    elif args.sweep:
        print(format_sweep(results))
    else:
        print("\n\n".join(format_result(r) for r in results))
    fitting = [r for r in results if r.fits]
    if len(results) > 1 and not args.json:
        by_size = sorted(fitting, key=lambda r: r.chips)
        print(
            f"\nsmallest that fits: {by_size[0].topology} ({by_size[0].chips} chips)"
            if by_size
            else "\nnone of these fits"
        )
    if not fitting or (not args.sweep and len(results) == 1 and not results[0].fits):
        print("deepseek-jax plan: does not fit", file=sys.stderr)
        return 1
    return 0
