"""`deepseek-jax` command line: thin wrappers over library functions."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback

import yaml

from deepseek_jax.checkpoint import CheckpointError
from deepseek_jax.checkpoint.convert import add_convert_parser
from deepseek_jax.config import ConfigError, load_config
from deepseek_jax.errors import EXIT_USER_ERROR, RunStopped, UserError
from deepseek_jax.plan.cli import add_plan_parser
from deepseek_jax.post.cli import add_post_parsers
from deepseek_jax.sharding import ShardingError

# Mistakes the user can fix: printed as one line (exit code 2), the traceback only with --debug.
USER_ERRORS = (
    ConfigError,
    UserError,
    CheckpointError,
    ShardingError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def _info(args: argparse.Namespace) -> int:
    from deepseek_jax.model.stats import param_counts

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    counts = param_counts(cfg.model)
    print(
        f"# parameters: {counts['total'] / 1e9:.3f}B total, {counts['active'] / 1e9:.3f}B active "
        f"per token, {counts['mtp_total'] / 1e9:.3f}B in MTP modules"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.coordinator or args.num_processes is not None or args.process_id is not None:
        overrides.append("distributed.enabled=true")
    for key, value in (
        ("coordinator_address", args.coordinator),
        ("num_processes", args.num_processes),
        ("process_id", args.process_id),
    ):
        if value is not None:
            overrides.append(f"distributed.{key}={value}")
    cfg = load_config(args.config, overrides)
    from deepseek_jax.train.loop import train

    try:
        train(cfg)
    except RunStopped as e:
        print(f"deepseek-jax: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def _plot(args: argparse.Namespace) -> int:
    from deepseek_jax.plots import plot_command

    return plot_command(args.run_dir, args.out)


def _mesh_sharding(spec: str, rules: str):
    """A Sharding from `data=2,expert=4` (unnamed axes keep MeshConfig's defaults)."""
    from deepseek_jax import sharding
    from deepseek_jax.config import MeshConfig

    sizes = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in sharding.MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise ConfigError(
                f"--mesh {spec!r}: expected AXIS=SIZE pairs over {', '.join(sharding.MESH_AXES)}"
            )
        sizes[name.strip()] = int(value)
    mesh_cfg = MeshConfig(**sizes, rules=rules)
    return sharding.Sharding(sharding.make_mesh(mesh_cfg), sharding.rules_for(mesh_cfg.rules))


def _generate(args: argparse.Namespace) -> int:
    from deepseek_jax.generate.text import generate_text, load_for_generation

    if not args.prompt:
        raise ConfigError("give at least one --prompt")
    mesh_sharding = _mesh_sharding(args.mesh, args.rules) if args.mesh else None
    model, tokenizer = load_for_generation(
        args.checkpoint,
        tokenizer=args.tokenizer,
        compute_dtype=args.dtype,
        mesh_sharding=mesh_sharding,
    )
    if args.speculative and not model.cfg.mtp.depth:
        raise ConfigError(f"{args.checkpoint} has no MTP module to draft with: drop --speculative")
    stats: dict = {}
    outputs = generate_text(
        model,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_eos=not args.ignore_eos,
        speculative=args.speculative,
        stats=stats,
        mesh_sharding=mesh_sharding,
    )
    for prompt, text in zip(args.prompt, outputs, strict=True):
        print(prompt + text)
    if args.speculative:
        print(
            f"# MTP drafts accepted: {stats['accepted']}/{stats['drafted']} "
            f"({stats['acceptance_rate']:.2f}); {stats['main_forward_calls']} main-model calls "
            f"for {stats['new_tokens']} new tokens",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepseek-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the resolved config and its parameter counts")
    info.add_argument("config", nargs="?", default="tiny", help="YAML path or name in configs/")
    info.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    info.set_defaults(func=_info)
    train = sub.add_parser(
        "train", help="train a model; metrics go to <train.run_dir>/metrics.jsonl"
    )
    train.add_argument("config", nargs="?", default="tiny", help="YAML path or name in configs/")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    train.add_argument("--coordinator", help="host:port of process 0 (multi-process runs)")
    train.add_argument("--num-processes", type=int)
    train.add_argument("--process-id", type=int)
    train.set_defaults(func=_train)
    plot = sub.add_parser("plot", help="write PNG plots of <RUN_DIR>/metrics.jsonl")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (train.run_dir)")
    plot.add_argument("--out", metavar="DIR", help="folder for the PNGs (default: RUN_DIR)")
    plot.set_defaults(func=_plot)
    gen = sub.add_parser(
        "generate",
        help="continue prompts with a checkpoint (Hugging Face, converted, or a training run)",
    )
    gen.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder or training run dir")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    gen.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the checkpoint's)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    gen.add_argument(
        "--mesh",
        metavar="AXIS=N,...",
        help="shard the model over a device mesh, e.g. data=2,expert=4,fsdp=1",
    )
    gen.add_argument("--rules", default="ep", choices=["dp", "fsdp", "ep", "ep_fsdp"])
    gen.add_argument("--speculative", action="store_true", help="draft tokens with the MTP module")
    gen.set_defaults(func=_generate)
    add_convert_parser(sub)
    add_plan_parser(sub)
    add_post_parsers(sub)
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of errors (they are one line)"
    )
    args, extra = parser.parse_known_args(_debug_first(argv))
    if extra:
        # `plan CONFIG --topology T key=value ...`: overrides may follow the options.
        if args.command != "plan" or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "config", None) and "=" in args.config:
        # `deepseek-jax train key=value ...`: no config named, the default one with overrides.
        args.overrides, args.config = [args.config, *args.overrides], "tiny"
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        print(f"deepseek-jax: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


def _debug_first(argv: list[str] | None) -> list[str]:
    """`--debug` is accepted anywhere on the line (it is the main parser's option)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv = ["--debug", *(a for a in argv if a != "--debug")]
    return argv


def _one_line(e: BaseException) -> str:
    text = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
    return " ".join(text.split()) or type(e).__name__


def entry() -> None:
    """The `deepseek-jax` command: `main()`, then exit with its code.

    After a run stopped on failed checkpoint saves, exit at once (the error line printed, the
    streams flushed), without interpreter teardown: the last failed save's TensorStore writes
    may still be pending, and their callbacks would print tracebacks after the error line. So
    nothing printed after that line reaches the streams (they are pointed at /dev/null), and a
    multi-process run leaves its runtime in order first: without it process 0 could exit and
    stop the coordination service while another process's client still polls it, which then
    logged a gRPC "Socket closed" error after its own error line (seen once in a clean-clone CI).
    """
    from deepseek_jax.checkpoint.training import writes_abandoned

    code = main()
    if writes_abandoned():
        from deepseek_jax.train import distributed

        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
        distributed.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
