"""Rule-based rewards for GRPO (SPEC §8): answer accuracy, output format, weighted sums, plug-ins.

A reward function is any Python callable `fn(prompt, completion, reference) -> float` on
decoded text. The built-in ones follow R1-Zero: the reasoning goes inside <think>...</think>,
the final answer inside <answer>...</answer> (or a LaTeX \\boxed{...}), and only the answer
counts. Everything here is plain Python on strings and must not be fooled or stalled by the
policy: text inside the think block never counts as the answer, numbers are compared without
ever building huge integers (no `1e999999999` expansion), and odd input gives 0, never an error.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

RewardFn = Callable[[str, str, str], float]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)

# Numbers: an optional sign, digits with optional thousands separators, an optional decimal
# part; or a fraction of two integers. No exponents: `1e999999999` would be a denial of service.
_DECIMAL_RE = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3})+|\d*)(?:\.(\d*))?")
_FRACTION_RE = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")
# Fractions are compared exactly with Python ints; beyond this many digits (Python refuses to
# parse ints of more than 4300 digits by default) a fraction is not treated as a number.
_MAX_FRACTION_DIGITS = 1000


def after_thinking(completion: str) -> str | None:
    """The part of `completion` after its reasoning: everything after the last </think>.

    A completion that opens <think> and never closes it has no answer part (None). One that
    never opens a think block is returned whole.
    """
    close = completion.rfind(THINK_CLOSE)
    if close >= 0:
        return completion[close + len(THINK_CLOSE) :]
    if THINK_OPEN in completion:
        return None
    return completion


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} in `text`, braces balanced; None if there is none
    or it is not closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer: the last <answer>...</answer> after the think block, else the last
    \\boxed{...} there; None when there is neither (answers inside <think> never count)."""
    tail = after_thinking(completion)
    if tail is None:
        return None
    answers = _ANSWER_RE.findall(tail)
    if answers:
        inner = answers[-1]
        boxed = last_boxed(inner)
        return (boxed if boxed is not None else inner).strip()
    boxed = last_boxed(tail)
    return None if boxed is None else boxed.strip()


def _decimal_key(text: str) -> tuple[str, str, str] | None:
    """(sign, integer digits, fraction digits) with leading/trailing zeros dropped, so that two
    decimals are equal iff their keys are; pure string work, any length."""
    m = _DECIMAL_RE.fullmatch(text)
    if m is None:
        return None
    sign, whole, frac = m.group(1), m.group(2).replace(",", ""), m.group(3) or ""
    if not whole and not frac:
        return None
    whole, frac = whole.lstrip("0"), frac.rstrip("0")
    if not whole and not frac:
        sign = ""  # -0 == 0
    return ("-" if sign == "-" else "", whole, frac)


def parse_number(text: str) -> Fraction | tuple[str, str, str] | None:
    """A canonical form of a number written as an integer, decimal or fraction, or None.

    Decimals and integers become a normalized digit-string key (compared exactly at any length);
    fractions become a `Fraction` (only up to 1000 digits). Fractions with an integer value, and
    decimals with at most 1000 digits, are turned into Fractions too, so `6/3 == 2 == 2.0`.
    """
    text = text.strip().replace(" ", "")
    if text.startswith("$") and text.endswith("$") and len(text) >= 2:
        text = text[1:-1]
    key = _decimal_key(text)
    if key is not None:
        if len(key[1]) + len(key[2]) <= _MAX_FRACTION_DIGITS:
            sign, whole, frac = key
            scale = 10 ** len(frac)
            value = Fraction(int(whole or "0") * scale + int(frac or "0"), scale)
            return -value if sign else value
        return key
    m = _FRACTION_RE.fullmatch(text)
    if m is None or len(text) > _MAX_FRACTION_DIGITS:
        return None
    num, den = int(m.group(1)), int(m.group(2))
    return None if den == 0 else Fraction(num, den)


def answers_match(answer: str, reference: str) -> bool:
    """Equal as numbers (integer/fraction/decimal, exactly) when both parse, else as strings
    after trimming surrounding whitespace."""
    a, b = parse_number(answer), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    return answer.strip() == reference.strip()


def accuracy_reward(prompt: str, completion: str, reference: str) -> float:
    """1.0 if the completion's final answer (see `extract_answer`) matches the reference."""
    answer = extract_answer(completion)
    return float(answer is not None and answers_match(answer, reference))


def format_reward(prompt: str, completion: str, reference: str) -> float:
    """1.0 for exactly `<think>...</think><answer>...</answer>` (whitespace around allowed, no
    tag repeated or nested, nothing else outside the tags), else 0.0."""
    m = _FORMAT_RE.fullmatch(completion)
    if m is None:
        return 0.0
    return float(not any(tag in part for part in m.groups() for tag in _TAGS))


BUILTIN: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}


def resolve(name: str) -> RewardFn:
    """A built-in reward by name, or any callable as `package.module:function`."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ValueError(
            f"unknown reward {name!r}: use one of {sorted(BUILTIN)} or 'package.module:function'"
        )
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {module} has no callable {attr!r}")
    return fn


@dataclasses.dataclass(frozen=True)
class RewardSet:
    """Named reward functions and their weights; the total reward is the weighted sum."""

    fns: tuple[tuple[str, RewardFn, float], ...]

    @classmethod
    def from_weights(cls, weights: Mapping[str, float | int]) -> RewardSet:
        """From {'accuracy': 1.0, 'format': 0.1, 'my.module:fn': 0.5}."""
        if not weights:
            raise ValueError("at least one reward function is needed")
        return cls(tuple((name, resolve(name), float(w)) for name, w in weights.items()))

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.fns]

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]
    ) -> tuple[list[float], dict[str, list[float]]]:
        """(total reward per completion, each function's raw reward per completion)."""
        parts: dict[str, list[float]] = {}
        for name, fn, _ in self.fns:
            parts[name] = [
                float(fn(p, c, r)) for p, c, r in zip(prompts, completions, references, strict=True)
            ]
        totals = [
            sum(w * parts[name][i] for name, _, w in self.fns) for i in range(len(completions))
        ]
        return totals, parts


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_length - buffer tokens, then falling
    linearly to -1 at max_length (and -1 beyond)."""
    if buffer <= 0:
        return 0.0
    start = max_length - buffer
    if length <= start:
        return 0.0
    return max(-1.0, (start - length) / buffer)
