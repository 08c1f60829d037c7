"""Sampling and the generation loop: greedy `generate` over the latent cache equals re-running
the full forward pass per new token; EOS stops a row while the others continue; the sampler's
temperature, top-k and top-p filters give the right distributions on a tiny fixed vector."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_weights import model_state

from deepseek_jax.config import load_config, replace
from deepseek_jax.generate import generate, sample

jax.config.update("jax_default_matmul_precision", "highest")

TINY = replace(load_config("tiny").model, init_std=0.05)
PROMPTS = [[5, 17, 3, 9], [7, 2, 11, 30, 4, 8, 21, 6, 13], [12, 40, 3, 3, 19, 2]]
MAX_NEW = 8
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def model():
    """A tiny model with random weights, built abstractly (eager init is slow). Norm scales are
    1 + 0.1·N(0,1), router biases 0.1·N(0,1), everything else init_std·N(0,1)."""
    return nnx.merge(*model_state(TINY, 0, std=TINY.init_std))


def naive_greedy(model, prompts, max_new):
    """Re-run the full forward pass over each whole sequence for every new token (argmax at the
    row's last real token). Rows are right-padded to one fixed width so it compiles once."""
    graphdef, state = nnx.split(model)
    logits_fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    width = max(len(p) for p in prompts) + max_new
    seqs = [list(p) for p in prompts]
    for _ in range(max_new):
        tokens_bt = np.zeros((len(seqs), width), np.int32)
        for row, s in zip(tokens_bt, seqs, strict=True):
            row[: len(s)] = s
        logits_btv = np.asarray(logits_fn(state, jnp.asarray(tokens_bt)))
        for b, s in enumerate(seqs):
            s.append(int(logits_btv[b, len(s) - 1].argmax()))
    return [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]


@pytest.fixture(scope="module")
def greedy(model):
    return naive_greedy(model, PROMPTS, MAX_NEW)


def test_greedy_generate_matches_full_forward(model, greedy):
    got = generate(model, PROMPTS, MAX_NEW, key=KEY)
    assert got == greedy
    assert all(len(g) == MAX_NEW for g in got)


def test_eos_stops_row_and_others_continue(model, greedy):
    # EOS: row 0's token at some step k >= 1 that some other row never produces.
    eos, stop = None, None
    for k in range(1, MAX_NEW):
        cand = greedy[0][k]
        if any(cand not in g for g in greedy[1:]):
            eos, stop = cand, greedy[0].index(cand)
            break
    assert eos is not None, "no usable EOS candidate in this greedy run"
    got = generate(model, PROMPTS, MAX_NEW, key=KEY, eos_id=eos)
    want = [g[: g.index(eos) + 1] if eos in g else g for g in greedy]
    assert got == want
    assert got[0] == greedy[0][: stop + 1] and got[0][-1] == eos
    assert any(len(g) == MAX_NEW and eos not in g for g in got[1:])


def test_eos_as_first_token_ends_at_once(model, greedy):
    """EOS sampled from the prefill logits: the row stops with just that token (and with a
    single row, every row is done before the decode loop runs)."""
    assert generate(model, PROMPTS[:1], MAX_NEW, key=KEY, eos_id=greedy[0][0]) == [greedy[0][:1]]


def test_generate_bf16_cache_and_empty(model):
    got = generate(model, PROMPTS, 3, key=KEY, cache_dtype=jnp.bfloat16)
    assert [len(g) for g in got] == [3, 3, 3]
    assert generate(model, PROMPTS, 0, key=KEY) == [[], [], []]
    with pytest.raises(ValueError):
        generate(model, [[1], []], 3, key=KEY)


def test_generate_sampling_is_reproducible(model):
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, PROMPTS[:2], 4, key=jax.random.key(3), **kwargs)
    b = generate(model, PROMPTS[:2], 4, key=jax.random.key(3), **kwargs)
    assert a == b and all(len(x) == 4 for x in a)


PROBS = np.array([0.4, 0.25, 0.15, 0.12, 0.08])
LOGITS = np.log(PROBS).astype(np.float32) + 1.7  # an offset changes nothing
N = 20_000


def draw(key=KEY, **kwargs):
    logits_bv = jnp.broadcast_to(jnp.asarray(LOGITS), (N, len(LOGITS)))
    tokens_b = jax.jit(lambda l, k: sample(l, k, **kwargs))(logits_bv, key)
    assert tokens_b.dtype == jnp.int32 and tokens_b.shape == (N,)
    return np.asarray(tokens_b)


def freqs(tokens_b):
    return np.bincount(tokens_b, minlength=len(LOGITS)) / len(tokens_b)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    want = np.asarray(jax.nn.softmax(jnp.asarray(LOGITS) / temperature))
    np.testing.assert_allclose(freqs(draw(temperature=temperature)), want, atol=0.01)


def test_top_k_keeps_only_largest():
    got = draw(temperature=1.0, top_k=2)
    assert set(np.unique(got)) == {0, 1}
    np.testing.assert_allclose(freqs(got)[:2], PROBS[:2] / PROBS[:2].sum(), atol=0.01)


def test_top_p_keeps_exactly_nucleus():
    # Cumulative 0.4, 0.65, 0.80: the smallest set reaching 0.7 is {0, 1, 2}.
    got = draw(temperature=1.0, top_p=0.7)
    assert set(np.unique(got)) == {0, 1, 2}
    np.testing.assert_allclose(freqs(got)[:3], PROBS[:3] / PROBS[:3].sum(), atol=0.01)
    # A tiny p still keeps the top token.
    assert set(np.unique(draw(temperature=1.0, top_p=0.01))) == {0}


def test_temperature_zero_is_argmax():
    logits_bv = jax.random.normal(jax.random.key(1), (7, 50))
    got = sample(logits_bv, KEY, temperature=0.0, top_k=3, top_p=0.5)
    np.testing.assert_array_equal(got, np.asarray(logits_bv).argmax(-1))
    assert got.dtype == jnp.int32


def test_same_key_same_samples():
    a, b = draw(jax.random.key(5), temperature=1.0), draw(jax.random.key(5), temperature=1.0)
    np.testing.assert_array_equal(a, b)
    assert (a != draw(jax.random.key(6), temperature=1.0)).any()


@pytest.mark.parametrize(
    "preset, axes",
    [("ep", {"data": 2, "expert": 4, "fsdp": 1}), ("fsdp", {"data": 1, "fsdp": 8, "expert": 1})],
)
def test_greedy_generate_on_a_mesh_matches_one_device(model, greedy, preset, axes):
    """Weights placed by the training rules (experts split over `expert`, or everything over
    `fsdp`), rows and cache over the batch axes (3 prompts padded to 4 rows on data=2), MoE
    expert-parallel inside shard_map: the same greedy tokens as on one device."""
    from deepseek_jax import sharding
    from deepseek_jax.config import MeshConfig

    cpus = jax.devices("cpu")
    if len(cpus) < 8:
        pytest.skip("needs 8 CPU devices (--xla_force_host_platform_device_count=8)")
    mesh = sharding.make_mesh(MeshConfig(**axes, tensor=1), cpus[:8])
    sh = sharding.Sharding(mesh, sharding.rules_for(preset))
    assert generate(model, PROMPTS, MAX_NEW, key=KEY, mesh_sharding=sh) == greedy
