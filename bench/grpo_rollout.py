"""GRPO rollout speed with and without MTP speculative sampling, and the draft acceptance rate.

    python bench/grpo_rollout.py RUN_DIR [--rows 64] [--max-new-tokens 56] [--repeats 3]

RUN_DIR is a checkpoint `deepseek_jax.load` opens (a `deepseek-jax grpo` run, its pretraining
run, ...). Rollouts are G-row batches of the shipped addition task's prompts sampled at
temperature 1, as in GRPO; both paths draw from the same distribution (speculative sampling is
exact), so only the wall clock differs. Prints tokens/s of each (compilation excluded: the first
call of each is a warm-up) and the acceptance rate of MTP's drafts.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from deepseek_jax.checkpoint import load
from deepseek_jax.data.tokenizer import ByteTokenizer
from deepseek_jax.post.rollout import sample_completions
from deepseek_jax.post.tasks import AdditionTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=56)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--digits", type=int, default=2)
    args = parser.parse_args()
    model = load(args.run_dir)
    tok = ByteTokenizer()
    task = AdditionTask(args.digits)
    rng = np.random.default_rng(0)
    results = {}
    for speculative in (False, True):
        tokens = seconds = drafted = accepted = 0
        for r in range(args.repeats + 1):
            problems = task.sample("train", args.rows, rng)
            prompts = [tok.encode(p.prompt) for p in problems]
            roll = sample_completions(
                model,
                prompts,
                args.max_new_tokens,
                key=jax.random.key(r),
                temperature=1.0,
                eos_id=tok.eos_id,
                speculative=speculative,
            )
            if r == 0:
                continue  # compilation
            start = time.perf_counter()
            roll = sample_completions(
                model,
                prompts,
                args.max_new_tokens,
                key=jax.random.key(r),
                temperature=1.0,
                eos_id=tok.eos_id,
                speculative=speculative,
            )
            seconds += time.perf_counter() - start
            tokens += sum(map(len, roll.completions))
            drafted += roll.stats.get("drafted", 0)
            accepted += roll.stats.get("accepted", 0)
        results[speculative] = tokens / seconds
        name = "speculative (MTP drafts)" if speculative else "plain sampling"
        line = f"{name:>26}: {tokens / seconds:8.0f} tokens/s ({tokens} tokens, {seconds:.2f}s)"
        if speculative:
            line += f", acceptance {accepted / max(drafted, 1):.3f} ({accepted}/{drafted})"
        print(line)
    print(f"speed-up {results[True] / results[False]:.2f}x")


if __name__ == "__main__":
    main()
