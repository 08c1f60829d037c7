"""MTP speculative decoding: MTP over its own latent cache reproduces the full forward's MTP
logits; greedy speculative decoding gives exactly plain greedy `generate`'s tokens (with both
accepted and rejected drafts, unequal prompts and EOS); the acceptance/residual rule emits
exactly the main model's distribution on a tiny vocabulary; sampling runs and is reproducible."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_weights import model_state

from deepseek_jax.config import load_config, replace
from deepseek_jax.generate import (
    forward_with_cache,
    generate,
    init_cache,
    mtp_with_cache,
    speculative_generate,
    verify_drafts,
)
from deepseek_jax.model.mtp import shift_tokens

jax.config.update("jax_default_matmul_precision", "highest")

TINY = replace(load_config("tiny").model, init_std=0.05)
PROMPTS = [[5, 17, 3, 9], [7, 2, 11, 30, 4, 8, 21, 6, 13], [12, 40, 3, 3, 19, 2]]
MAX_NEW = 12
KEY = jax.random.key(0)
EMBED_GAIN, HIDDEN_GAIN = 20.0, 1.0  # an acceptance rate near 0.1 for this seed


def bigram_mtp_model() -> nnx.Module:
    """A random tiny model whose MTP module drafts roughly what the main model would say if it
    only saw the current token, so its drafts are right some of the time, deterministically.

    MTP module 1 at position i sees Emb(x_{i+1}) and predicts x_{i+2}, as the main model does at
    position i+1 from h_{i+1} = Emb(x_{i+1}) + (what its blocks add). Here the MTP projection is
    [I; HIDDEN_GAIN·I] (embedding plus some of h_i) and its norms match the final norm, so before
    its (random) block it computes final_norm(Emb(x_{i+1}) + ...). Scaling the embedding table by
    EMBED_GAIN makes Emb dominate the main residual stream (the blocks see normed inputs, so
    their additions do not grow): the main model's argmax then agrees with the draft often but
    not always. The drafts still depend on h_i and on MTP's own cache (its block attends), so
    the replay in the greedy test checks all of the draft bookkeeping. No training.
    """
    graphdef, state = model_state(TINY, 0, std=TINY.init_std)
    params = nnx.to_pure_dict(state)
    eye = jnp.eye(TINY.hidden_size)
    params["embed"]["table_VD"] = params["embed"]["table_VD"] * EMBED_GAIN
    mtp = params["mtp"]
    mtp["proj_2DD"] = jnp.concatenate([eye, HIDDEN_GAIN * eye])[None]
    mtp["emb_norm"]["scale"] = jnp.ones_like(mtp["emb_norm"]["scale"])
    mtp["head_norm"]["scale"] = params["final_norm"]["scale"][None]
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def replay_stats(model, prompts, outputs) -> dict[str, int]:
    """The counters greedy speculative decoding must report for these final outputs, replayed
    from one full forward pass: with committed x_0..x_{n-1}, the draft for x_n is the argmax of
    the depth-1 MTP logits at position n-2; it is kept iff it equals x_n (then the bonus token
    comes too); a row runs until it has all its tokens."""
    seqs = [p + o for p, o in zip(prompts, outputs, strict=True)]
    tokens_bt = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for row, seq in zip(tokens_bt, seqs, strict=True):
        row[: len(seq)] = seq
    graphdef, state = nnx.split(model)
    mtp_logits = jax.jit(lambda s, t: nnx.merge(graphdef, s).forward(t).mtp_logits[0])
    drafts_bt = np.asarray(mtp_logits(state, jnp.asarray(tokens_bt))).argmax(-1)
    drafted = accepted = steps = 0
    for b, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
        n, row_steps = len(prompt) + 1, 0
        while n < len(prompt) + len(out):
            kept = drafts_bt[b, n - 2] == tokens_bt[b, n]
            drafted, accepted, row_steps = drafted + 1, accepted + kept, row_steps + 1
            n += 1 + kept
        steps = max(steps, row_steps)
    return dict(drafted=drafted, accepted=accepted, main_forward_calls=1 + steps)


@pytest.fixture(scope="module")
def model():
    return bigram_mtp_model()


@pytest.fixture(scope="module")
def greedy(model):
    return generate(model, PROMPTS, MAX_NEW, key=KEY)


def test_mtp_with_cache_matches_full_forward():
    """Random weights. Main layers in two right-padded chunks of unequal per-row lengths, MTP
    in three other chunks, against `forward` (hidden states and MTP depth-1 logits)."""
    graphdef, state = model_state(TINY, 1, std=TINY.init_std)
    b, t = 3, 12
    tokens_bt = jax.random.randint(jax.random.key(1), (b, t), 2, TINY.vocab_size)
    main_cuts = np.array([[0, 5, 12], [0, 9, 12], [0, 1, 12]])
    mtp_cuts = np.array([[0, 2, 7, 12], [0, 6, 10, 12], [0, 11, 11, 12]])

    def run(state, tokens_bt):
        model = nnx.merge(graphdef, state)
        want = model.forward(tokens_bt)
        cache = init_cache(TINY, b, t, jnp.float32)
        mtp_cache = init_cache(TINY, b, t, jnp.float32, layers=1)
        next_bt = shift_tokens(tokens_bt, 1)
        rows_b1 = jnp.arange(b)[:, None]
        hidden, mtp_logits = jnp.zeros_like(want.hidden), jnp.zeros_like(want.logits)
        for cuts, is_main in ((main_cuts, True), (mtp_cuts, False)):
            for j in range(cuts.shape[1] - 1):
                start_b, len_b = jnp.asarray(cuts[:, j]), jnp.asarray(cuts[:, j + 1] - cuts[:, j])
                idx_bt = jnp.minimum(start_b[:, None] + jnp.arange(t), t - 1)
                write_bt = jnp.where(jnp.arange(t) < len_b[:, None], idx_bt, t)  # t: dropped
                if is_main:
                    _, cache, h_btd = forward_with_cache(
                        model, tokens_bt[rows_b1, idx_bt], cache, len_b, return_hidden=True
                    )
                    hidden = hidden.at[rows_b1, write_bt].set(h_btd, mode="drop")
                else:
                    _, logits_btv, mtp_cache = mtp_with_cache(
                        model, hidden[rows_b1, idx_bt], next_bt[rows_b1, idx_bt], mtp_cache, len_b
                    )
                    mtp_logits = mtp_logits.at[rows_b1, write_bt].set(logits_btv, mode="drop")
        return want.hidden, want.mtp_logits[0], hidden, mtp_logits, mtp_cache.lengths_b

    want_h, want_mtp, got_h, got_mtp, lengths_b = jax.jit(run)(state, tokens_bt)
    np.testing.assert_allclose(got_h, want_h, atol=1e-4)
    np.testing.assert_allclose(got_mtp, want_mtp, atol=1e-4)
    np.testing.assert_array_equal(lengths_b, [t] * b)


def test_greedy_speculative_equals_generate(model, greedy):
    """Batch of 3 unequal prompts, 12 new tokens; an EOS that row 0 produces mid-way (and some
    other row never does) stops row 0 early. The expected output is plain greedy `generate`
    without EOS, cut after the first EOS: greedy tokens before an EOS do not depend on it."""
    eos = next((tok for tok in greedy[0][1:-1] if any(tok not in g for g in greedy[1:])), None)
    assert eos is not None, "no usable EOS candidate in this greedy run"
    want = [g[: g.index(eos) + 1] if eos in g else g for g in greedy]
    got, stats = speculative_generate(model, PROMPTS, MAX_NEW, key=KEY, eos_id=eos)
    assert got == want
    assert len(got[0]) < MAX_NEW and any(len(g) == MAX_NEW for g in got[1:])
    # Both branches ran: some drafts were kept (bonus tokens), some replaced.
    assert 0 < stats["accepted"] < stats["drafted"]
    # Exactly the drafts MTP makes over the committed tokens: its cache and inputs line up.
    assert {k: stats[k] for k in ("drafted", "accepted", "main_forward_calls")} == replay_stats(
        model, PROMPTS, got
    )
    assert 0 < stats["acceptance_rate"] < 1
    assert stats["new_tokens"] == sum(len(g) for g in want)


def test_greedy_speculative_on_a_mesh(model, greedy):
    """(data=2, expert=4) with the ep rules: weights placed as in training, rows and both
    caches over `data` (3 prompts padded with an empty row), MoE expert-parallel. Same tokens
    as plain greedy on one device, and the same draft counts as one device (the empty row
    drafts nothing)."""
    from deepseek_jax import sharding
    from deepseek_jax.config import MeshConfig

    cpus = jax.devices("cpu")
    if len(cpus) < 8:
        pytest.skip("needs 8 CPU devices (--xla_force_host_platform_device_count=8)")
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, expert=4, tensor=1), cpus[:8])
    sh = sharding.Sharding(mesh, sharding.rules_for("ep"))
    got, stats = speculative_generate(model, PROMPTS, MAX_NEW, key=KEY, mesh_sharding=sh)
    assert got == greedy
    counts = ("drafted", "accepted", "main_forward_calls")
    assert {k: stats[k] for k in counts} == replay_stats(model, PROMPTS, got)


def test_sampling_speculative_runs_and_is_reproducible(model):
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.9)
    a, stats_a = speculative_generate(model, PROMPTS, 8, key=jax.random.key(3), **kwargs)
    b, stats_b = speculative_generate(model, PROMPTS, 8, key=jax.random.key(3), **kwargs)
    c, _ = speculative_generate(model, PROMPTS, 8, key=jax.random.key(4), **kwargs)
    assert a == b and stats_a == stats_b
    assert all(len(x) == 8 for x in a) and a != c
    assert stats_a["drafted"] > 0 and 0 <= stats_a["acceptance_rate"] <= 1
    assert all(0 <= tok < TINY.vocab_size for row in a for tok in row)


def test_speculative_edge_cases(model):
    assert speculative_generate(model, PROMPTS, 0, key=KEY)[0] == [[], [], []]
    with pytest.raises(ValueError):
        speculative_generate(model, [[1], []], 3, key=KEY)
    no_mtp = nnx.merge(*model_state(replace(TINY, **{"mtp.depth": 0})))
    with pytest.raises(ValueError, match="MTP"):
        speculative_generate(no_mtp, PROMPTS, 3, key=KEY)


def test_verify_drafts_greedy_prefix():
    """K = 2 drafts; argmax p per position is (1, 2, 3)."""
    p_bkv = jnp.asarray(np.eye(5, dtype=np.float32)[[1, 2, 3]])[None].repeat(4, 0)
    q_bkv = jnp.zeros((4, 2, 5))
    drafts_bk = jnp.asarray([[1, 2], [1, 0], [0, 2], [4, 4]], jnp.int32)
    accepted_b, next_b = verify_drafts(p_bkv, q_bkv, drafts_bk, KEY)
    np.testing.assert_array_equal(accepted_b, [2, 1, 0, 0])
    np.testing.assert_array_equal(next_b, [3, 2, 1, 1])


N = 40_000  # frequency std <= 0.5/sqrt(N) = 0.0025, so atol 0.01 is 4 standard deviations
P = np.array([0.4, 0.25, 0.15, 0.12, 0.08])
CASES = {
    "q_differs": (P, np.array([0.1, 0.2, 0.3, 0.2, 0.2]), {}),
    "q_misses_p_mass": (P, np.array([0.0, 0.5, 0.5, 0.0, 0.0]), {}),
    "p_misses_q_mass": (np.array([0.5, 0.5, 0.0, 0.0, 0.0]), np.full(5, 0.2), {}),
    "q_equals_p": (P, P, {}),
    "temperature_top_k_top_p": (
        P,
        np.array([0.1, 0.2, 0.3, 0.2, 0.2]),
        dict(temperature=0.7, top_k=4, top_p=0.9),
    ),
}


def transformed(probs_v, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution `sample` draws from, recomputed in NumPy."""
    with np.errstate(divide="ignore"):
        logits_v = np.log(probs_v) / temperature
    order = np.argsort(-logits_v, kind="stable")
    keep = np.zeros(len(probs_v), bool)
    keep[order[: top_k or len(probs_v)]] = True
    w = np.where(keep, np.exp(logits_v - logits_v.max()), 0.0)
    w = w / w.sum()
    before = np.cumsum(w[order]) - w[order]
    keep[order[before >= top_p]] = False
    w = np.where(keep, w, 0.0)
    return w / w.sum()


@pytest.mark.parametrize("case", sorted(CASES))
def test_speculative_sampling_emits_p(case):
    """Draft d ~ q, then `verify_drafts`: the emitted token (d if kept, else the residual draw)
    is distributed as p, drafts are kept with frequency Σ min(p, q), and the bonus token drawn
    after a kept draft follows the next position's p (here: P reversed). All after the same
    temperature / top-k / top-p transform."""
    p_v, q_v, settings = CASES[case]
    settings = {"temperature": 1.0, **settings}
    with np.errstate(divide="ignore"):
        p_logits_v = np.log(p_v).astype(np.float32) + 0.3  # an offset changes nothing
        q_logits_v = np.log(q_v).astype(np.float32)
        bonus_logits_v = np.log(P[::-1]).astype(np.float32)
    p_bkv = jnp.broadcast_to(jnp.asarray(np.stack([p_logits_v, bonus_logits_v])), (N, 2, 5))
    q_bkv = jnp.broadcast_to(jnp.asarray(q_logits_v), (N, 1, 5))

    p_t, q_t = transformed(p_v, **settings), transformed(q_v, **settings)

    # Arrays as arguments, not closed over: XLA would constant-fold the sorts of top-k / top-p
    # over the whole batch, which takes tens of seconds on CPU.
    def run(p_bkv, q_bkv, draft_logits_v, key):
        key_draft, key_verify = jax.random.split(key)
        drafts_b = jax.random.categorical(key_draft, draft_logits_v, shape=(N,))
        drafts_bk = drafts_b[:, None].astype(jnp.int32)
        accepted_b, next_b = verify_drafts(p_bkv, q_bkv, drafts_bk, key_verify, **settings)
        return drafts_b, accepted_b, next_b

    with np.errstate(divide="ignore"):
        draft_logits_v = jnp.asarray(np.log(q_t), jnp.float32)
    outputs = jax.jit(run)(p_bkv, q_bkv, draft_logits_v, jax.random.key(7))
    drafts_b, accepted_b, next_b = map(np.asarray, outputs)
    kept = accepted_b == 1
    emitted_b = np.where(kept, drafts_b, next_b)
    freq = np.bincount(emitted_b, minlength=5) / N
    np.testing.assert_allclose(freq, p_t, atol=0.01)
    assert abs(kept.mean() - np.minimum(p_t, q_t).sum()) < 0.01
    # Every case keeps >= 40% of drafts: >= 16,000 bonus draws, again 4 standard deviations.
    bonus = np.bincount(next_b[kept], minlength=5) / kept.sum()
    atol = 4 * 0.5 / np.sqrt(kept.sum())
    np.testing.assert_allclose(bonus, transformed(P[::-1], **settings), atol=atol)
    assert set(np.unique(emitted_b)) <= set(np.flatnonzero(p_t > 0))


def test_sampled_speculative_tokens_follow_the_main_model():
    """End to end through the decode loop: 8,000 rows of one prompt, 3 sampled tokens each, on a
    model with an 8-token vocabulary. The first token comes from the prefill, the second from
    the accept/residual rule on an MTP draft, the third is a bonus token or the next verify's
    outcome. The frequency of each token at each of the 3 positions must equal the main model's
    exact marginal, computed by full forward passes over all 8 and 64 continuations (std of a
    frequency <= 0.0056, tolerance 0.025)."""
    v, n = 8, 8000
    cfg = replace(TINY, vocab_size=v)
    small = nnx.merge(*model_state(cfg, 1, std=0.2))
    prompt = [3, 5, 2]
    out, stats = speculative_generate(
        small, [prompt] * n, 3, key=jax.random.key(7), temperature=1.0
    )
    assert 0.1 < stats["acceptance_rate"] < 0.9  # both the kept and the replaced path ran
    graphdef, state = nnx.split(small)
    probs = jax.jit(lambda s, t: jax.nn.softmax(nnx.merge(graphdef, s)(t)[:, -1], axis=-1))
    p1_a = np.asarray(probs(state, jnp.asarray([prompt])))[0]
    p2_ab = np.asarray(probs(state, jnp.asarray([prompt + [a] for a in range(v)])))
    seqs = [prompt + [a, b] for a in range(v) for b in range(v)]
    p3_abc = np.asarray(probs(state, jnp.asarray(seqs))).reshape(v, v, v)
    joint_ab = p1_a[:, None] * p2_ab
    exact = [p1_a, joint_ab.sum(0), (joint_ab[:, :, None] * p3_abc).sum((0, 1))]
    out = np.asarray(out)
    for i, want in enumerate(exact):
        got = np.bincount(out[:, i], minlength=v) / n
        np.testing.assert_allclose(got, want, atol=0.025, err_msg=f"new token {i}")
