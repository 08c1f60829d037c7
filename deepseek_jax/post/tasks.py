"""The shipped R1-Zero task: multi-digit addition with exact answers and a digit-by-digit trace.

A problem is `a+b=` (the prompt, no template: the model is byte-level and tiny, so SPEC §8's
long R1 template would cost more tokens than the problem). Its worked completion is
    <think>7+5=12,4+3+1=8</think><answer>87</answer>
one `x+y(+carry)=s` step per digit column from the right, which is what brief pretraining
shows the model. The split is a fixed function of the problem: a problem is held out iff a hash
of its prompt falls below `held_out_fraction`, so the train and held-out sets never overlap.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # the reference the accuracy reward compares with
    solution: str  # a worked completion in the R1 format


def solve(a: int, b: int) -> str:
    """The worked completion for a + b: per column `x+y=s` or `x+y+c=s` (c the carry in)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    return f"<think>{','.join(steps)}</think><answer>{a + b}</answer>"


def _held_out(prompt: str, fraction: float) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


@dataclasses.dataclass(frozen=True)
class AdditionTask:
    """a + b with 1..`digits`-digit operands; train and held-out problems by a fixed hash."""

    digits: int = 2
    held_out_fraction: float = 0.1

    def __post_init__(self):
        if not 1 <= self.digits <= 6:
            raise ValueError(f"task.digits={self.digits} must be in [1, 6]")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"task.held_out_fraction={self.held_out_fraction} must be in (0, 1)")

    def problem(self, a: int, b: int) -> Problem:
        return Problem(prompt=f"{a}+{b}=", answer=str(a + b), solution=solve(a, b))

    def problems(self, split: str) -> list[Problem]:
        """Every problem of a split ('train' or 'eval'), in a fixed order."""
        if split not in ("train", "eval"):
            raise ValueError(f"split {split!r} is not 'train' or 'eval'")
        top = 10**self.digits
        out = []
        for a in range(top):
            for b in range(top):
                p = self.problem(a, b)
                if _held_out(p.prompt, self.held_out_fraction) == (split == "eval"):
                    out.append(p)
        return out

    def sample(self, split: str, n: int, rng: np.random.Generator) -> list[Problem]:
        """`n` problems of the split drawn uniformly (with replacement) by `rng`."""
        pool = self._pool(split)
        return [pool[i] for i in rng.integers(0, len(pool), n)]

    def _pool(self, split: str) -> list[Problem]:
        cache = self.__dict__.setdefault("_pools", {})
        if split not in cache:
            cache[split] = self.problems(split)
        return cache[split]

    def pretraining_text(self, n: int, seed: int) -> list[str]:
        """`n` training documents `prompt + solution` (what brief pretraining shows the model)."""
        rng = np.random.default_rng(seed)
        return [p.prompt + p.solution for p in self.sample("train", n, rng)]
