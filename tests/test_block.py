"""Layer stacks: rematerialization policies change memory, never values."""

from __future__ import annotations

import contextlib
import functools
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import load_config, replace
from deepseek_jax.model import DeepSeek
from deepseek_jax.runtime import Runtime

TINY = replace(load_config("tiny").model, init_std=0.05)


def _graphdef(rt: Runtime):
    return nnx.graphdef(nnx.eval_shape(lambda: DeepSeek(TINY, nnx.Rngs(0), runtime=rt)))


def _loss_and_grads(rt, state, tokens):
    graphdef = _graphdef(rt)

    def loss(state):
        out = nnx.merge(graphdef, state).forward(tokens)
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
        return nll + 0.3 * jnp.mean(jnp.square(out.mtp_logits)) + out.balance_loss.sum()

    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.value_and_grad(loss))(state)


@functools.cache
def _without_remat(scan: bool):
    """The reference for both scanned cases: runtime, state, tokens, (loss, grads)."""
    base = Runtime.of(compute_dtype="float32", scan_layers=scan)
    state = nnx.state(DeepSeek(TINY, nnx.Rngs(0), runtime=base))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)
    return base, state, tokens, _loss_and_grads(base, state, tokens)


@pytest.mark.parametrize(
    ("remat", "scan"),
    [("full", True), ("save_dots", False), ("save_dots_except_experts", True)],
)
def test_remat_gives_identical_loss_and_gradients(remat, scan):
    base, state, tokens, (loss0, grads0) = _without_remat(scan)
    loss1, grads1 = _loss_and_grads(base.replace(remat=remat), state, tokens)
    assert float(loss0) == pytest.approx(float(loss1), abs=1e-6)
    for g0, g1 in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1), strict=True):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), atol=1e-6, rtol=1e-5)


def test_remat_policy_is_in_the_compiled_program():
    """With remat=full the backward pass recomputes the forward: more dot ops are compiled."""
    base = Runtime.of(compute_dtype="float32")
    state = nnx.state(nnx.eval_shape(lambda: DeepSeek(TINY, nnx.Rngs(0), runtime=base)))
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def count_dots(rt):
        graphdef = _graphdef(rt)

        def loss(state, tokens):
            return nnx.merge(graphdef, state).forward(tokens).logits.mean()

        hlo = jax.jit(jax.grad(loss)).lower(state, tokens).as_text()
        return hlo.count("dot_general")

    assert count_dots(base.replace(remat="full")) > count_dots(base)


def _saved(remat: str) -> list[str]:
    """What the backward pass keeps, one line per residual (jax.ad_checkpoint's own report), for
    a dense and an MoE layer run unrolled (scan stacks residuals under anonymous names)."""
    cfg = replace(TINY, num_layers=2, **{"mtp.depth": 0})
    # ragged_dot: the CPU default (`blocked`) is a custom_vjp that keeps its own tile-padded copy
    # of the dispatched rows, so under remat=none the tagged rows themselves are not a residual.
    rt = Runtime.of(
        compute_dtype="float32", remat=remat, scan_layers=False, grouped_matmul="ragged_dot"
    )
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0), runtime=rt)))
    tokens = jnp.zeros((2, 16), jnp.int32)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(
            lambda s: nnx.merge(graphdef, s).forward(tokens).hidden.sum(), state
        )
    return out.getvalue().splitlines()


def _names(lines: list[str]) -> set[str]:
    return set(re.findall(r"named '(\w+)'", "\n".join(lines)))


def test_remat_policies_keep_what_they_name():
    """full keeps no activation the layer makes; save_dots keeps the projections' outputs and
    every tag the backward needs; save_dots_except_experts the same minus the tokens copied out
    to the experts; none keeps all of that and the rest (softmax, activations, ...)."""
    saved = {r: _saved(r) for r in ("none", "full", "save_dots", "save_dots_except_experts")}
    assert not _names(saved["full"])
    assert not any("dot_general" in line for line in saved["full"])
    tags = {"mla_latent", "attention_out", "mlp_hidden", "moe_dispatch"}
    # moe_out feeds only a residual add, whose backward needs no input: nobody keeps it.
    assert _names(saved["save_dots"]) == tags
    assert _names(saved["save_dots_except_experts"]) == tags - {"moe_dispatch"}
    # Without remat the norms' backward keeps the block input itself, under its tag.
    assert _names(saved["none"]) == tags | {"layer_input"}
    assert any("dot_general" in line for line in saved["save_dots_except_experts"])
    counts = [len(saved[r]) for r in ("full", "save_dots_except_experts", "save_dots", "none")]
    assert counts == sorted(set(counts)), counts


def test_offload_policy_needs_an_accelerator():
    from deepseek_jax.model.remat import remat_policy

    assert callable(remat_policy("offload", platform="tpu"))
    with pytest.raises(ValueError, match="remat=offload needs a TPU or GPU"):
        remat_policy("offload", platform="cpu")


def test_weight_cast_to_bf16_is_the_convert_bit_for_bit():
    """`cast` turns fp32 weights into bf16 with integer ops (so the TPU compiler cannot hoist a
    whole-stack conversion out of the layer loop); values, specials and the gradient must be
    exactly those of `astype`."""
    from deepseek_jax.model.layers import fp32_to_bf16

    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(50_000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 50_000),
            # ties at the rounding point, both parities, and the specials
            np.array(
                [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, -3.4e38, 1e-45, -0.0], np.float32
            ),  # fmt: skip
            np.array([np.inf, -np.inf, np.nan], np.float32),
        ]
    )
    ours = np.asarray(jax.jit(fp32_to_bf16)(x)).view(np.uint16)
    ref = np.asarray(jnp.asarray(x).astype(jnp.bfloat16)).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    assert np.isnan(np.asarray(jax.jit(fp32_to_bf16)(x[nan]), np.float32)).all()
    g = rng.standard_normal(int((~nan).sum())).astype(np.float32)
    grads = [
        jax.grad(lambda v, f=f: jnp.sum(f(v).astype(jnp.float32) * g))(jnp.asarray(x[~nan]))
        for f in (fp32_to_bf16, lambda v: v.astype(jnp.bfloat16))
    ]
    assert grads[0].dtype == jnp.float32
    np.testing.assert_array_equal(grads[0], grads[1])
