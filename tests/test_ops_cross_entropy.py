"""`runtime.cross_entropy=chunked` equals the full-logits loss: the head kernel alone, the loss
with two MTP depths and packed documents, and the whole train step (with chunked attention
too); its compiled program never holds [N, V] fp32 logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_config, replace
from deepseek_jax.model import DeepSeek
from deepseek_jax.ops.cross_entropy import head_ce
from deepseek_jax.runtime import Runtime
from deepseek_jax.train.loss import loss_sums
from deepseek_jax.train.step import Trainer
from deepseek_jax.train.synthetic import MarkovTokens

jax.config.update("jax_default_matmul_precision", "highest")

FULL = Runtime.of(compute_dtype="float32")
# 10 tokens x 16 vocabulary entries per tile: neither divides the test shapes.
CHUNKED = FULL.replace(
    cross_entropy="chunked", cross_entropy_chunk_size=10, cross_entropy_vocab_chunk_size=16
)
CPUS = jax.devices("cpu")


def test_head_ce_chunked_matches_full():
    """Per-token CE and logsumexp, and the gradients of a weighted sum of both, for chunks
    that divide neither T nor V (2 rows x 5 positions per chunk, T = 13; 4 vocabulary chunks
    of 13 for V = 50: the last token chunk padded, the last vocabulary chunk's extra column
    masked)."""
    r = np.random.default_rng(0)
    h = jnp.asarray(r.standard_normal((2, 13, 16)), jnp.float32)
    w = jnp.asarray(0.3 * r.standard_normal((16, 50)), jnp.float32)
    tgt = jnp.asarray(r.integers(0, 50, (2, 13)), jnp.int32)
    a, b = (jnp.asarray(r.standard_normal((2, 13)), jnp.float32) for _ in range(2))

    def run(rt):
        def f(h, w):
            ce, lse = head_ce(h, w, tgt, rt)
            return jnp.sum(a * ce + b * lse * lse), (ce, lse)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)

    (_, (ce, lse)), grads = run(CHUNKED)
    (_, (ce0, lse0)), grads0 = run(FULL)
    np.testing.assert_allclose(ce, ce0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, lse0, atol=1e-5, rtol=0)
    for g, g0 in zip(grads, grads0, strict=True):
        np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize(
    "sizes,rules",
    [
        (dict(data=2, fsdp=2, expert=2), "ep_fsdp"),  # head split over fsdp x expert
        (dict(data=2, fsdp=4, expert=1), "fsdp"),  # split over fsdp; data sums by psum
        (dict(data=1, fsdp=1, expert=8), "ep"),  # head replicated: no collective
    ],
)
def test_head_ce_chunked_on_a_mesh_matches_one_device(sizes, rules):
    """On 8 CPU devices the kernel runs per device under shard_map: each vocabulary chunk of the
    head is gathered over its D split and its gradient reduce-scattered back. Values and both
    gradients equal the full-logits loss on one device, and the head's gradient comes back in
    the head's own sharding."""
    from deepseek_jax.config import MeshConfig
    from deepseek_jax.sharding import Sharding, make_mesh, rules_for

    sh = Sharding(make_mesh(MeshConfig(**sizes), CPUS[:8]), rules_for(rules))
    rt = CHUNKED.replace(sharding=sh, cross_entropy_chunk_size=6)
    r = np.random.default_rng(2)
    h = jnp.asarray(r.standard_normal((8, 7, 16)), jnp.float32)
    w = jnp.asarray(0.3 * r.standard_normal((16, 50)), jnp.float32)
    tgt = jnp.asarray(r.integers(0, 50, (8, 7)), jnp.int32)
    a, b = (jnp.asarray(r.standard_normal((8, 7)), jnp.float32) for _ in range(2))

    def f(rt):
        def loss(h, w):
            ce, lse = head_ce(h, w, tgt, rt)
            return jnp.sum(a * ce + b * lse * lse), (ce, lse)

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

    w_sharding = sh.named(("embed", "vocab"))
    h_s = jax.device_put(h, sh.named(("batch", None, None)))
    w_s = jax.device_put(w, w_sharding)
    (_, (ce, lse)), (gh, gw) = jax.jit(f(rt))(h_s, w_s)
    (_, (ce0, lse0)), (gh0, gw0) = jax.jit(f(FULL))(h, w)
    assert gw.sharding.is_equivalent_to(w_sharding, 2)
    np.testing.assert_allclose(ce, ce0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, lse0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(gh, gh0, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(gw, gw0, atol=1e-5, rtol=1e-6)


def test_loss_with_mtp_depth_2_matches_full():
    """loss_sums from normed hidden states in chunks (main head and both MTP depths, packed
    documents, a partial loss mask) equals loss_sums from the full logits, values and grads."""
    # Dense blocks only (the FFN kind plays no part here): quicker to compile.
    cfg = replace(
        load_config("tiny").model,
        num_layers=1,
        init_std=0.05,
        **{"mtp.depth": 2, "moe.first_k_dense_replace": 3},
    )
    state = nnx.state(DeepSeek(cfg, nnx.Rngs(0), runtime=FULL))
    rng = np.random.default_rng(1)
    batch = MarkovTokens(cfg.vocab_size, 24, seed=1).rows(0, 0, 2)
    batch["loss_mask"][0, :5] = 0.0
    batch["segment_ids"] = np.repeat([[0, 1, 2], [0, 0, 1]], 8, axis=1).astype(np.int32)
    batch = jax.tree.map(jnp.asarray, batch)
    weights = jnp.asarray(rng.uniform(0.5, 1.5, 3), jnp.float32)

    def run(rt):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0), runtime=rt)))

        def f(state):
            model = nnx.merge(graphdef, state)
            out = model.forward(
                batch["tokens"],
                segment_ids_bt=batch["segment_ids"],
                logits=rt.cfg.cross_entropy == "full",
            )
            sums = loss_sums(out, batch, cfg.mtp.depth, model)
            return weights[0] * sums["lm"] + weights[1:] @ sums["mtp"] + 1e-3 * sums["z"], sums

        return jax.jit(jax.value_and_grad(f, has_aux=True))(state)

    (obj, sums), grads = run(CHUNKED)
    (obj0, sums0), grads0 = run(FULL)
    assert sums["mtp"].shape == (2,)
    for key in ("lm", "mtp", "z", "tokens"):
        np.testing.assert_allclose(sums[key], sums0[key], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(obj, obj0, rtol=1e-6)
    # Gradients are sums over 48 tokens x 3 heads, with entries up to ~10; the tiled kernel
    # sums in another order (softmax as exp(logit - online logsumexp)), which moves them by up
    # to ~1e-5 (relative 1e-6). A wrong tile or mask moves them by 1e-2 or more.
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_allclose(g, g0, atol=2e-5, rtol=1e-5)


def test_loss_needs_the_model_without_logits():
    cfg = replace(load_config("tiny").model, num_layers=1, **{"mtp.depth": 0})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0), runtime=CHUNKED)))
    batch = jax.tree.map(jnp.asarray, MarkovTokens(cfg.vocab_size, 8).rows(0, 0, 1))
    out = jax.eval_shape(
        lambda s: nnx.merge(graphdef, s).forward(batch["tokens"], logits=False), state
    )
    assert out.logits is None and out.normed.shape == (1, 8, cfg.hidden_size)
    with pytest.raises(ValueError, match="needs the model"):
        loss_sums(out, batch, 0)


def test_train_step_with_chunked_loss_and_attention_matches_default():
    """One full train step (MTP, balance loss, z-loss, Adam, bias update) with
    runtime.cross_entropy=chunked and runtime.attention=chunked equals the default runtime."""
    base = [
        "runtime.compute_dtype=float32",
        "model.num_layers=1",  # one dense block, then the MTP block (MoE)
        "train.batch_size=2",
        "train.seq_len=16",
        "train.eps=1e-4",  # see tests/test_train.py: keeps Adam's first update Lipschitz
        "train.z_loss=1e-3",
    ]
    lean = [
        "runtime.cross_entropy=chunked",
        "runtime.cross_entropy_chunk_size=12",
        "runtime.cross_entropy_vocab_chunk_size=100",
        "runtime.attention=chunked",
        "runtime.attention_chunk_size=8",
    ]
    cfg0 = load_config("tiny", base)
    batch = jax.tree.map(jnp.asarray, MarkovTokens(cfg0.model.vocab_size, 16).rows(0, 0, 2))

    def step(cfg):
        trainer = Trainer.create(cfg, None)
        state = trainer.init(seed=3)
        return jax.device_get(jax.jit(trainer.step)(state, batch))

    new, metrics = step(load_config("tiny", base + lean))
    new0, metrics0 = step(cfg0)
    for key in ("loss", "lm_loss", "mtp_loss", "z_loss", "balance_loss", "grad_norm"):
        np.testing.assert_allclose(metrics[key], metrics0[key], rtol=2e-6, err_msg=key)
    np.testing.assert_array_equal(metrics["expert_load"], metrics0["expert_load"])
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(new0.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_chunked_never_holds_the_logits():
    """Compiled loss + gradient for 2048 tokens x 8192 vocab: the chunked kernel's temporaries
    stay below half of one [N, V] fp32 logits array (a chunk's logits, their gradient and the
    head's fp32 gradient); the full path needs more than the whole array."""
    n_rows, t, d, v = 2, 1024, 64, 8192
    logits_bytes = n_rows * t * v * 4
    h = jax.ShapeDtypeStruct((n_rows, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    tgt = jax.ShapeDtypeStruct((n_rows, t), jnp.int32)

    def temp_bytes(rt):
        def f(h, w, tgt):
            ce, lse = head_ce(h, w, tgt, rt)
            return ce.sum() + lse.sum()

        grad = jax.jit(jax.grad(f, argnums=(0, 1)))
        return grad.lower(h, w, tgt).compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(FULL.replace(cross_entropy="chunked", cross_entropy_chunk_size=256))
    full = temp_bytes(FULL)
    print(f"temporaries: chunked {chunked / 2**20:.1f} MiB, full {full / 2**20:.1f} MiB")
    assert chunked < logits_bytes / 2
    assert full > logits_bytes
