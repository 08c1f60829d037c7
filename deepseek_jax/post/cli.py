"""The `grpo` and `distill` subcommands of `deepseek-jax` (thin: parse, then call the library)."""

from __future__ import annotations

import argparse


def _grpo(args: argparse.Namespace) -> int:
    from deepseek_jax.post.config import load_post_config
    from deepseek_jax.post.grpo_loop import run_grpo

    run_grpo(load_post_config(args.config, args.overrides))
    return 0


def _distill(args: argparse.Namespace) -> int:
    from deepseek_jax.post.config import load_post_config
    from deepseek_jax.post.distill import run_distill

    run_distill(load_post_config(args.config, args.overrides))
    return 0


def add_post_parsers(sub) -> None:
    """Register `grpo CONFIG [key=value ...]` and `distill CONFIG [key=value ...]`."""
    grpo = sub.add_parser(
        "grpo",
        help="GRPO with rule rewards (optionally after brief pretraining); metrics to "
        "<train.run_dir>/metrics.jsonl",
    )
    grpo.add_argument("config", help="YAML path or name in configs/ (e.g. r1zero_addition)")
    grpo.add_argument("overrides", nargs="*", help="dotted key=value overrides (grpo.beta=0.04)")
    grpo.set_defaults(func=_grpo)
    distill = sub.add_parser(
        "distill",
        help="SFT a student on a teacher's (reward-filtered) traces or a prompt/completion JSONL",
    )
    distill.add_argument("config", help="YAML path or name in configs/")
    distill.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    distill.set_defaults(func=_distill)
