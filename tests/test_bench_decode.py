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


def test_acceptance_needed_solves_the_break_even():
    costs = {"main_1": 300e-6, "main_2": 560e-6, "mtp_1": 55e-6, "mtp_2": 105e-6}
    for speedup in (1.0, 1.2):
        a = bench_decode.acceptance_needed(costs, speedup)
        spec = costs["main_2"] + costs["mtp_1"] + a * (costs["mtp_2"] - costs["mtp_1"])
        np.testing.assert_allclose((1 + a) * costs["main_1"], speedup * spec, rtol=1e-9)
    # A verify that costs what a step does, and free drafts, pay off at any acceptance.
    cheap = {"main_1": 1.0, "main_2": 1.0, "mtp_1": 0.0, "mtp_2": 0.0}
    assert bench_decode.acceptance_needed(cheap, 1.0) == 0.0


def test_ffn_shapes_change_only_the_ffns():
    cfg = load_config("tiny").model
    shapes = list(bench_decode.ffn_shapes(cfg).values())
    assert shapes[0] == cfg
    all_active, dense = shapes[1], shapes[2]
    assert all_active.moe.n_routed_experts == all_active.moe.n_experts_per_tok == 4
    assert all_active.layer_kinds == cfg.layer_kinds
    assert set(dense.layer_kinds[: dense.num_layers]) == {"dense"}
    for c in (all_active, dense):
        assert (c.hidden_size, c.num_layers, c.mla) == (cfg.hidden_size, cfg.num_layers, cfg.mla)


def test_without_passes_a_part_through_and_restores_it():
    import jax.numpy as jnp
    import pytest

    from deepseek_jax.generate import decode, forward_with_cache, init_cache
    from deepseek_jax.model import moe

    cfg = load_config("tiny").model
    model = nnx.merge(*model_state(cfg))
    tokens_bt = jnp.arange(4, dtype=jnp.int32).reshape(1, 4)

    def logits():
        return np.asarray(forward_with_cache(model, tokens_bt, init_cache(cfg, 1, 8))[0])

    originals = (moe.routed_experts, decode.absorbed_attention)
    as_is = logits()
    for part in ("routed experts", "attention"):
        with bench_decode.without(part):
            assert (moe.routed_experts, decode.absorbed_attention) != originals
            assert np.all(np.isfinite(logits()))
            assert not np.allclose(logits(), as_is)
        assert (moe.routed_experts, decode.absorbed_attention) == originals
    np.testing.assert_array_equal(logits(), as_is)
    with pytest.raises(ValueError, match="unknown part"), bench_decode.without("router"):
        pass
