"""The one-device dispatch (model/dispatch.py `_local`): with a decode step's few tokens it
computes each (token, expert) pair on its own (`_per_pair`); that path equals the sorted path
on `jax.lax.ragged_dot`, in values and in every gradient, and a token's output does not depend
on the other tokens beside it (speculative decoding verifies a draft beside the last token
and must get what a one-token step gets)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model import dispatch

E, D, F, K = 16, 16, 24, 4


def _problem(n, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (n, D))
    weights = jax.random.uniform(ks[1], (n, K), minval=0.1, maxval=1.0)
    gate = jax.random.normal(ks[2], (E, D, F)) / np.sqrt(D)
    up = jax.random.normal(ks[3], (E, D, F)) / np.sqrt(D)
    down = jax.random.normal(ks[4], (E, F, D)) / np.sqrt(F)
    experts = jax.lax.top_k(jax.random.uniform(ks[5], (n, E)), K)[1].astype(jnp.int32)
    return x, weights, gate, up, down, experts


def _sorted_reference(x, weights, gate, up, down, experts):
    # ragged_dot never takes the per-pair path: this is the sorted path on the reference kernel.
    return dispatch._local(x, experts, weights, gate, up, down, impl="ragged_dot")


def _local(x, weights, gate, up, down, experts):
    return dispatch._local(x, experts, weights, gate, up, down, impl="blocked", platform="cpu")


def _sorts(fn, *args) -> bool:
    return "stablehlo.sort" in jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("n", [1, 2, 4])
def test_per_pair_equals_sorted_path(n):
    x, weights, gate, up, down, experts = _problem(n)
    cot = jax.random.normal(jax.random.key(9), (n, D))
    # The few-token path is taken: no sort, no scatter back.
    assert n * K <= dispatch.PER_PAIR_MAX
    assert not _sorts(_local, x, weights, gate, up, down, experts)

    def value_and_grads(fn):
        def f(*a):
            y = fn(*a, experts)
            return jnp.sum(y * cot), y

        (_, y), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))(
            x, weights, gate, up, down
        )
        return y, grads

    with jax.default_matmul_precision("highest"):
        y, grads = value_and_grads(_local)
        y_ref, grads_ref = value_and_grads(_sorted_reference)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=0)
    for name, g, g_ref in zip(
        ("x", "weights", "gate", "up", "down"), grads, grads_ref, strict=True
    ):
        np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=0, err_msg=f"d/d{name}")
        assert np.abs(np.asarray(g_ref)).max() > 0.05, name


def test_many_tokens_take_the_sorted_path():
    x, weights, gate, up, down, experts = _problem(64)
    assert _sorts(_local, x, weights, gate, up, down, experts)


def test_a_token_alone_equals_it_beside_another():
    x, weights, gate, up, down, experts = _problem(2, seed=3)
    f = jax.jit(_local)
    pair = np.asarray(f(x, weights, gate, up, down, experts))
    for i in range(2):
        alone = np.asarray(f(x[i : i + 1], weights[i : i + 1], gate, up, down, experts[i : i + 1]))
        np.testing.assert_array_equal(alone[0], pair[i])
