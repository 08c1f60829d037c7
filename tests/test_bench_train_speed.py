"""A small run of `bench/train_speed.py`'s workers: our jitted step and transformers' eager step
on the same tiny shapes and the same batch, each in its own process as the benchmark runs them.
The timings are the benchmark's to print; here both sides must run one real step of the same
model (same tokens per step, a first loss near ln V from their random inits)."""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from step_setup import Case, config_for  # noqa: E402
from train_speed import run_case  # noqa: E402


def test_workers_run_one_step_of_the_same_model():
    extra = ("model.moe.n_routed_experts=8", "model.mtp.depth=0")
    cfg = config_for(Case("jax", "tiny", "float32", extra))
    ln_v = math.log(cfg.model.vocab_size)
    out = {impl: run_case(Case(impl, "tiny", "float32", extra), 1, 0) for impl in ("jax", "torch")}
    for impl, r in out.items():
        assert r["step_s"] > 0, (impl, r)
        assert abs(r["loss"] - ln_v) < 0.2, (impl, r["loss"], ln_v)
    assert out["jax"]["tokens_per_step"] == out["torch"]["tokens_per_step"]
    assert out["jax"]["flops_per_token"] == out["torch"]["flops_per_token"]
