"""`deepseek-jax` command line: thin wrappers over library functions."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from deepseek_jax.config import ConfigError, load_config
from deepseek_jax.hf.convert import add_convert_parser
from deepseek_jax.hf.load import CheckpointError


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

    train(cfg)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from deepseek_jax.plots import plot_command

    return plot_command(args.run_dir, args.out)


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
    add_convert_parser(sub)
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config:
        # `deepseek-jax train key=value ...`: no config named, the default one with overrides.
        args.overrides, args.config = [args.config, *args.overrides], "tiny"
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"deepseek-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
