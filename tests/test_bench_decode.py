"""A small run of `bench/decode.py`'s in-loop per-call costs on a random tiny model: each
call kind (main model over 1 and 2 tokens, MTP over 1 and 2) compiles, runs and gets a finite
time. The figures themselves are the benchmark's to print, not a test's to assert."""

from __future__ import annotations

import os
import sys

import numpy as np
from flax import nnx
from random_weights import model_state

from deepseek_jax.config import load_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import decode as bench_decode  # noqa: E402


def test_call_costs_times_every_call_kind():
    cfg = load_config("tiny").model
    model = nnx.merge(*model_state(cfg))
    prompts_bt = np.arange(8, dtype=np.int32).reshape(1, 8)
    costs = bench_decode.call_costs(model, prompts_bt, repeats=1)
    assert set(costs) == {"main_1", "main_2", "mtp_1", "mtp_2"}
    assert all(np.isfinite(v) and v > 0 for v in costs.values()), costs
