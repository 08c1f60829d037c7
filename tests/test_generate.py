"""Latent-cache generation (SPEC §1 absorbed form): cached prefill and one-token decode steps
reproduce the full forward pass at every position, for right-padded batches of unequal prompt
lengths and under YaRN past the original context; cache sizes match the (d_c + d_r)·L formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_weights
from flax import nnx

from deepseek_jax.config import load_config, replace
from deepseek_jax.generate import (
    bytes_per_token,
    cached_step,
    expanded_bytes_per_token,
    forward_with_cache,
    init_cache,
)

jax.config.update("jax_default_matmul_precision", "highest")

TINY = replace(load_config("tiny").model, init_std=0.05)
YARN = replace(
    TINY,
    **{
        "rope.type": "yarn",
        "rope.factor": 4.0,
        "rope.original_max_position_embeddings": 16,
        "rope.mscale_all_dim": 1.0,
    },
)
CONFIGS = {"default": TINY, "yarn": YARN}
T_TOTAL, S_MAX = 24, 32  # positions run past YaRN's original 16
PROMPTS = np.array([5, 9, 13], np.int32)
TOL = 1e-4


def model_state(cfg, seed: int = 0):
    return random_weights.model_state(cfg, seed, std=cfg.init_std)


def full_logits(graphdef, state, tokens_bt):
    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens_bt)


def tokens(cfg, seed: int = 1) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(2, cfg.vocab_size, (len(PROMPTS), T_TOTAL)), jnp.int32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
    cfg = CONFIGS[request.param]
    graphdef, state = model_state(cfg)
    tokens_bt = tokens(cfg)
    return cfg, graphdef, state, tokens_bt, np.asarray(full_logits(graphdef, state, tokens_bt))


def test_prefill_then_decode_matches_full_forward(setup):
    """Right-padded prompts of lengths 5/9/13, then one true token per step for each row until
    every row reaches T_TOTAL; rows that are done send a padding chunk (length 0)."""
    cfg, graphdef, state, tokens_bt, want_btv = setup
    toks = np.asarray(tokens_bt)
    b = len(PROMPTS)
    width = int(PROMPTS.max())
    prompt_bt = np.where(np.arange(width)[None] < PROMPTS[:, None], toks[:, :width], 0)
    cache = init_cache(cfg, b, S_MAX, jnp.float32)
    logits_btv, cache = cached_step(
        graphdef, state, jnp.asarray(prompt_bt), cache, jnp.asarray(PROMPTS)
    )
    got_btv = np.full(want_btv.shape, np.nan, np.float32)
    for i in range(b):
        got_btv[i, : PROMPTS[i]] = np.asarray(logits_btv)[i, : PROMPTS[i]]
    np.testing.assert_array_equal(np.asarray(cache.lengths_b), PROMPTS)

    lengths = PROMPTS.copy()
    while (lengths < T_TOTAL).any():
        live_b = (lengths < T_TOTAL).astype(np.int32)
        next_b1 = np.where(live_b, toks[np.arange(b), np.minimum(lengths, T_TOTAL - 1)], 0)[:, None]
        logits_btv, cache = cached_step(
            graphdef, state, jnp.asarray(next_b1), cache, jnp.asarray(live_b)
        )
        step_bv = np.asarray(logits_btv)[:, 0]
        for i in np.flatnonzero(live_b):
            got_btv[i, lengths[i]] = step_bv[i]
        lengths = lengths + live_b
    np.testing.assert_array_equal(np.asarray(cache.lengths_b), [T_TOTAL] * b)

    err = np.abs(got_btv - want_btv).max()
    assert err <= TOL, f"max |cached - full| = {err:.3g}"


def test_whole_sequence_prefill_matches_full_forward(setup):
    cfg, graphdef, state, tokens_bt, want_btv = setup
    cache = init_cache(cfg, len(PROMPTS), S_MAX, jnp.float32)
    # Unjitted on purpose: forward_with_cache is a plain function of the merged model.
    logits_btv, cache = forward_with_cache(nnx.merge(graphdef, state), tokens_bt, cache)
    err = np.abs(np.asarray(logits_btv) - want_btv).max()
    assert err <= TOL, f"max |prefill - full| = {err:.3g}"
    assert (np.asarray(cache.c_lbsr)[:, :, T_TOTAL:] == 0).all()  # unused slots untouched
    assert (np.asarray(cache.lengths_b) == T_TOTAL).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_bytes_per_token(dtype):
    cfg = TINY
    m = cfg.mla
    cache = init_cache(cfg, 3, S_MAX, dtype)
    measured = (cache.c_lbsr.nbytes + cache.k_pe_lbsk.nbytes) / S_MAX / 3
    itemsize = np.dtype(dtype).itemsize
    assert measured == bytes_per_token(cfg, dtype)
    assert measured == (m.kv_lora_rank + m.qk_rope_head_dim) * cfg.num_layers * itemsize
    # Tiny: 48 vs 4·(32 + 16 + 32) = 320 elements per layer.
    ratio = expanded_bytes_per_token(cfg, dtype) / bytes_per_token(cfg, dtype)
    assert ratio == pytest.approx(320 / 48)


def test_cache_bytes_v3():
    """SPEC §1: 576 elements per layer, 70,272 bf16 bytes per token over 61 layers; the expanded
    K/V cache is 40,960 per layer, 71.1× more."""
    v3 = load_config("deepseek-v3-671b").model
    assert bytes_per_token(v3, jnp.bfloat16) == 70_272
    assert expanded_bytes_per_token(v3, jnp.bfloat16) == 40_960 * 61 * 2
    ratio = expanded_bytes_per_token(v3) / bytes_per_token(v3)
    assert round(ratio, 1) == 71.1
    shapes = jax.eval_shape(lambda: init_cache(v3, 1, 4, jnp.bfloat16))
    per_token = sum(a.size * a.dtype.itemsize for a in (shapes.c_lbsr, shapes.k_pe_lbsk)) / 4
    assert per_token == 70_272


def test_bf16_cache_stays_close_to_fp32(setup):
    """A bf16 cache (fp32 compute) rounds ĉ and k_pe to 8 mantissa bits, nothing else: the
    next-token distributions stay within a small KL of the fp32 forward and agree on top-1."""
    cfg, graphdef, state, tokens_bt, want_btv = setup
    cache = init_cache(cfg, len(PROMPTS), S_MAX, jnp.bfloat16)
    logits_btv, _ = cached_step(graphdef, state, tokens_bt, cache)
    got = jax.nn.log_softmax(jnp.asarray(logits_btv))
    want = jax.nn.log_softmax(jnp.asarray(want_btv))
    kl_bt = np.asarray((jnp.exp(want) * (want - got)).sum(-1))
    top1 = (np.asarray(got).argmax(-1) == np.asarray(want).argmax(-1)).mean()
    print(f"bf16 cache: mean KL {kl_bt.mean():.2e}, max KL {kl_bt.max():.2e}, top-1 {top1:.3f}")
    assert kl_bt.mean() < 1e-4 and kl_bt.max() < 1e-3
    assert top1 >= 0.95
    assert np.abs(np.asarray(logits_btv) - want_btv).max() > 0  # the rounding is really there
