"""Every `runtime.attention` kernel equals the plain XLA reference, forward and gradients, with
causal masking, packed-document segment ids and a YaRN-scaled softmax; the chunked kernel's
compiled program holds no [T, T] score matrix, the causal-blocks kernel's computes fewer scores;
MLA reaches the kernels through the seam."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_config, replace
from deepseek_jax.model import DeepSeek
from deepseek_jax.ops.attention import attention
from deepseek_jax.runtime import Runtime

jax.config.update("jax_default_matmul_precision", "highest")

# V2-Lite's YaRN (factor 40, mscale_all_dim 0.707): softmax scale 192^-0.5 · m² (SPEC §1).
YARN_SCALE = load_config("deepseek-v2-lite").model.softmax_scale
ATOL = 2e-6  # fp32 rounding of differently ordered sums


def inputs(b, t, h, d_qk, d_v, seed=0):
    r = np.random.default_rng(seed)
    q, k = (jnp.asarray(r.standard_normal((b, t, h, d_qk)), jnp.float32) for _ in range(2))
    v = jnp.asarray(r.standard_normal((b, t, h, d_v)), jnp.float32)
    # Three packed documents per row, of random lengths; row 1 has one document only.
    seg = np.sort(r.integers(0, 3, (b, t)), axis=1)
    seg[1:] = 0
    return q, k, v, jnp.asarray(seg, jnp.int32)


def value_and_grads(kind: str, q, k, v, seg, **knobs):
    rt = Runtime.of(attention=kind, **knobs)
    # A fixed random cotangent, so every output element's gradient path is exercised.
    w = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape[:3] + v.shape[3:]))

    def loss(q, k, v):
        out = attention(q, k, v, segment_ids_bt=seg, scale=YARN_SCALE, rt=rt)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_same(got, want, atol=ATOL):
    out, grads = got
    ref_out, ref_grads = want
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=0)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=atol, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize(
    "kind, knobs, with_segments",
    [
        ("chunked", dict(attention_chunk_size=16), True),  # T=40: 3 blocks, the last padded
        ("chunked", dict(attention_chunk_size=16), False),  # plain causal
        ("chunked", dict(attention_chunk_size=64), True),  # one block larger than T
        ("causal_blocks", dict(attention_chunk_size=16), True),  # blocks 16, 16, 8
        ("causal_blocks", dict(attention_chunk_size=16), False),
        ("causal_blocks", dict(attention_chunk_size=64), True),  # one block: xla itself
        ("dpa_xla", {}, True),
    ],
    ids=[
        "chunked-16",
        "chunked-16-causal",
        "chunked-64",
        "causal_blocks-16",
        "causal_blocks-16-causal",
        "causal_blocks-64",
        "dpa_xla",
    ],
)
def test_kernel_matches_reference(kind, knobs, with_segments):
    q, k, v, seg = inputs(2, 40, 3, 12, 8)
    seg = seg if with_segments else None
    assert_same(value_and_grads(kind, q, k, v, seg, **knobs), value_and_grads("xla", q, k, v, seg))


def test_causal_blocks_in_bf16_is_as_close_as_the_reference():
    """bf16 q, k, v (tiny.yaml's compute dtype): causal_blocks' hand-written backward lands as
    near the fp32 answer as the reference kernel run in bf16 does, values and gradients."""
    q, k, v, seg = inputs(2, 40, 3, 12, 8, seed=5)
    exact = value_and_grads("xla", q, k, v, seg)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    blocks = value_and_grads("causal_blocks", *bf16, seg, attention_chunk_size=16)
    reference = value_and_grads("xla", *bf16, seg)
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        pick = (lambda r: r[0]) if i == 0 else (lambda r, i=i: r[1][i - 1])
        assert pick(blocks).dtype == jnp.bfloat16, name
        want = np.asarray(pick(exact), np.float32)
        err_blocks = np.abs(np.asarray(pick(blocks), np.float32) - want).max()
        err_reference = np.abs(np.asarray(pick(reference), np.float32) - want).max()
        assert err_blocks <= 2 * err_reference + 1e-3, (name, err_blocks, err_reference)


def test_reference_is_causal_and_segmented():
    """The reference itself: a query's output moves only with keys at or before it, in its own
    document (so the kernels above are held to the right mask)."""
    q, k, v, seg = inputs(2, 40, 3, 12, 8)
    rt = Runtime.of(attention="xla")
    seg0 = np.asarray(seg[0])
    t = int(np.flatnonzero(seg0 == seg0[20])[-1])  # the last query of a middle document
    grad_k = jax.grad(
        lambda k: attention(q, k, v, segment_ids_bt=seg, scale=0.3, rt=rt)[0, t].sum()
    )(k)
    seen = np.abs(np.asarray(grad_k[0])).sum(axis=(1, 2)) > 0
    allowed = (np.arange(40) <= t) & (seg0 == seg0[t])
    assert allowed.sum() >= 2
    np.testing.assert_array_equal(seen, allowed)


def test_splash_matches_reference_in_interpret_mode():
    """TPU splash attention through Pallas interpret mode: MLA's head dims (qk 192, v 128),
    the YaRN scale folded into q, segment ids; one 128-token block."""
    q, k, v, seg = inputs(1, 128, 1, 192, 128, seed=3)
    want = value_and_grads("xla", q, k, v, seg)
    assert_same(value_and_grads("splash", q, k, v, seg), want, atol=2e-5)


def test_splash_refuses_lengths_it_cannot_tile():
    q, k, v, seg = inputs(1, 40, 1, 12, 8)
    with pytest.raises(ValueError, match="multiple of 128.*chunked"):
        attention(q, k, v, segment_ids_bt=seg, scale=0.1, rt=Runtime.of(attention="splash"))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error off GPU")
def test_cudnn_needs_a_gpu():
    q, k, v, seg = inputs(1, 8, 1, 12, 8)
    with pytest.raises(ValueError, match="dpa_cudnn needs a CUDA GPU"):
        attention(q, k, v, segment_ids_bt=seg, scale=0.1, rt=Runtime.of(attention="dpa_cudnn"))


def test_chunked_never_holds_a_score_matrix():
    """Compiled forward+backward at T=1024: the chunked kernel's temporaries stay below one
    fp32 [B, H, T, T] score matrix; the reference needs several."""
    b, t, h = 1, 1024, 4
    score_bytes = b * h * t * t * 4
    shapes = [jax.ShapeDtypeStruct((b, t, h, d), jnp.float32) for d in (24, 24, 16)]
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp_bytes(kind):
        rt = Runtime.of(attention=kind, attention_chunk_size=128)

        def loss(q, k, v, seg):
            return attention(q, k, v, segment_ids_bt=seg, scale=0.1, rt=rt).sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(*shapes, seg).compile().memory_analysis().temp_size_in_bytes

    chunked, reference = temp_bytes("chunked"), temp_bytes("xla")
    print(f"temporaries: chunked {chunked / 2**20:.1f} MiB, xla {reference / 2**20:.1f} MiB")
    assert chunked < score_bytes / 2
    assert reference > score_bytes


def test_causal_blocks_skips_the_masked_scores():
    """Four blocks of queries over their key prefixes: the compiled forward+backward does about
    5/8 of the reference's floating-point work (the score and value matmuls dominate)."""
    b, t, h = 2, 256, 4
    shapes = [jax.ShapeDtypeStruct((b, t, h, d), jnp.float32) for d in (48, 48, 32)]

    def flops(kind):
        rt = Runtime.of(attention=kind, attention_chunk_size=64)

        def loss(q, k, v):
            return attention(q, k, v, segment_ids_bt=None, scale=0.1, rt=rt).sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(*shapes).compile().cost_analysis()["flops"]

    blocks, reference = flops("causal_blocks"), flops("xla")
    print(f"flops: causal_blocks {blocks:.3g}, xla {reference:.3g} ({blocks / reference:.2f}x)")
    assert 0.55 < blocks / reference < 0.72


def test_mla_through_the_seam():
    """The model (YaRN rope, packed documents) with each kernel gives the reference's logits;
    gradients are the kernel tests' business."""
    cfg = replace(
        load_config("tiny").model,
        num_layers=1,
        **{
            "mtp.depth": 0,
            "moe.first_k_dense_replace": 1,
            "rope.type": "yarn",
            "rope.factor": 4.0,
            "rope.original_max_position_embeddings": 16,
            "rope.mscale": 0.707,
            "rope.mscale_all_dim": 0.707,
        },
    )
    ref_rt = Runtime.of(compute_dtype="float32")
    state = nnx.state(DeepSeek(cfg, nnx.Rngs(0), runtime=ref_rt))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
    seg = jnp.asarray(np.repeat([[0, 1, 2], [0, 0, 0]], 8, axis=1), jnp.int32)

    def logits(rt):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0), runtime=rt)))
        return jax.jit(lambda s: nnx.merge(graphdef, s).forward(tokens, segment_ids_bt=seg).logits)(
            state
        )

    want = logits(ref_rt)
    for kind in ("chunked", "causal_blocks", "dpa_xla"):
        got = logits(ref_rt.replace(attention=kind, attention_chunk_size=8))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=kind)
