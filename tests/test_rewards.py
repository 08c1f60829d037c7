"""Rule rewards on correct, wrong, malformed and adversarial completions (SPEC §8)."""

from __future__ import annotations

import time

import pytest

from deepseek_jax.post.rewards import (
    RewardSet,
    accuracy_reward,
    answers_match,
    extract_answer,
    format_reward,
    overlong_penalty,
    resolve,
)

GOOD = "<think>12+30=42</think><answer>42</answer>"


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        (GOOD, "42", 1.0),
        ("<think>x</think> <answer> 42 </answer>", "42", 1.0),
        ("<think>x</think><answer>41</answer>", "42", 0.0),
        ("<think>so \\boxed{42}</think> the answer is \\boxed{42}", "42", 1.0),
        ("<think>x</think><answer>\\boxed{3/4}</answer>", "0.75", 1.0),
        ("<think>x</think><answer>1,000</answer>", "1000", 1.0),
        ("<think>x</think><answer>-0.50</answer>", "-1/2", 1.0),
        ("<think>x</think><answer>6/3</answer>", "2", 1.0),
        ("<think>x</think><answer>007</answer>", "7", 1.0),
        ("<think>x</think><answer>-0</answer>", "0", 1.0),
        ("<think>x</think><answer>x = 4</answer>", "x = 4", 1.0),  # exact string
        ("<think>x</think><answer>x=4</answer>", "x = 4", 0.0),
        # Malformed: no answer, unclosed tags, empty, division by zero.
        ("<think>42", "42", 0.0),
        ("<think>x</think><answer>42", "42", 0.0),
        ("", "42", 0.0),
        ("<think>x</think><answer>1/0</answer>", "1/0", 1.0),  # not a number: string equality
        ("<think>x</think><answer>1/0</answer>", "0", 0.0),
        ("42", "42", 0.0),  # a bare number is not an answer
    ],
)
def test_accuracy(completion, reference, expected):
    assert accuracy_reward("p", completion, reference) == expected


def test_answer_inside_think_does_not_count():
    c = "<think>maybe <answer>42</answer></think><answer>41</answer>"
    assert extract_answer(c) == "41"
    assert accuracy_reward("", c, "42") == 0.0
    # Only a think block, holding the right answer: no answer at all.
    assert accuracy_reward("", "<think><answer>42</answer></think>", "42") == 0.0
    # A think block that is never closed hides everything after it.
    assert accuracy_reward("", "<think>x<answer>42</answer>", "42") == 0.0


def test_several_answers_take_the_last_and_fail_format():
    hedge = "<think>x</think><answer>42</answer><answer>41</answer>"
    assert extract_answer(hedge) == "41"
    assert accuracy_reward("", hedge, "42") == 0.0
    assert accuracy_reward("", hedge, "41") == 1.0
    assert format_reward("", hedge, "41") == 0.0


def test_huge_numbers_compare_exactly_and_fast():
    big = "9" * 20000
    start = time.perf_counter()
    assert answers_match(big, big)
    assert answers_match(big + ".000", "000" + big)
    assert not answers_match(big, "9" * 19999 + "8")
    assert not answers_match(big, "1" + "0" * 20000)
    # An exponent is not a number here: no attempt to build 10**999999999.
    assert not answers_match("1e999999999", "1" + "0" * 20)
    assert answers_match("1e999999999", "1e999999999")  # equal as strings
    assert not answers_match("1" * 5000 + "/1", "1" * 5000)  # too long a fraction: strings differ
    assert time.perf_counter() - start < 5.0  # guards against a quadratic or exponential blow-up


@pytest.mark.parametrize(
    "completion, expected",
    [
        (GOOD, 1.0),
        ("  <think>a\nb</think>\n<answer>x</answer>\n", 1.0),
        ("<think>a</think>", 0.0),
        ("<answer>x</answer>", 0.0),
        ("<think>a</think><answer>x</answer> trailing", 0.0),
        ("lead <think>a</think><answer>x</answer>", 0.0),
        ("<think>a<think>b</think><answer>x</answer>", 0.0),
        ("<think>a</think><answer>x</answer><answer>y</answer>", 0.0),
        ("<think>a</think><answer><answer>x</answer>", 0.0),
        ("<answer>x</answer><think>a</think>", 0.0),
    ],
)
def test_format(completion, expected):
    assert format_reward("", completion, "") == expected


def test_weighted_sum_and_plugins():
    rs = RewardSet.from_weights({"accuracy": 1.0, "format": 0.5, "tests.test_rewards:length": 2})
    # Accuracy does not need the format: a bare answer tag still counts.
    totals, parts = rs.score(["p", "p"], [GOOD, "<answer>42</answer>"], ["42", "41"])
    assert parts == {
        "accuracy": [1.0, 0.0],
        "format": [1.0, 0.0],
        "tests.test_rewards:length": [len(GOOD) / 100, 0.19],
    }
    assert totals == pytest.approx([1.5 + 2 * len(GOOD) / 100, 2 * 0.19])
    assert accuracy_reward("", "<answer>42</answer>", "42") == 1.0
    with pytest.raises(ValueError, match="unknown reward 'acc'"):
        resolve("acc")
    with pytest.raises(ValueError, match="no callable"):
        resolve("tests.test_rewards:nothing")


def length(prompt: str, completion: str, reference: str) -> float:
    return len(completion) / 100


def test_overlong_penalty():
    assert overlong_penalty(10, 20, 4) == 0.0
    assert overlong_penalty(16, 20, 4) == 0.0
    assert overlong_penalty(18, 20, 4) == -0.5
    assert overlong_penalty(20, 20, 4) == -1.0
    assert overlong_penalty(25, 20, 4) == -1.0
    assert overlong_penalty(20, 20, 0) == 0.0
