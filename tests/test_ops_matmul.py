"""`ops/matmul.py`: a two-operand einsum that on a CPU keeps bf16 operands on the library kernel
(fp32 result, rounded) with its own backward. It must equal `jnp.einsum` in value and gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.ops import matmul

# The model's activation x weight einsums (SwiGLU, MLA, MTP), at small sizes.
SPECS = {
    "btd,df->btf": ((2, 5, 16), (16, 12)),
    "btq,qhk->bthk": ((2, 5, 8), (8, 3, 6)),
    "bsr,rhk->bshk": ((2, 5, 4), (4, 3, 6)),
    "bthk,hkd->btd": ((2, 5, 3, 6), (3, 6, 16)),
}
BF16_ULP = 2.0**-7  # relative spacing of bf16 values in [1, 2)


def _operands(shapes, dtype, seed=0):
    ka, kb, kg = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.normal(ka, shapes[0], jnp.float32).astype(dtype)
    b = jax.random.normal(kb, shapes[1], jnp.float32).astype(dtype)
    return a, b, kg


def _value_and_grads(fn, spec, a, b, ct):
    def f(a, b):
        out = fn(spec, a, b)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(a, b)
    return out, grads


@pytest.mark.parametrize("spec", SPECS)
def test_bf16_on_cpu_equals_jnp_einsum(spec):
    a, b, kg = _operands(SPECS[spec], jnp.bfloat16)
    out_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), a, b).shape
    ct = jax.random.normal(kg, out_shape, jnp.float32)
    out, grads = _value_and_grads(lambda s, a, b: matmul.einsum(s, a, b, "cpu"), spec, a, b, ct)
    ref, grads_ref = _value_and_grads(jnp.einsum, spec, a, b, ct)
    assert out.dtype == ref.dtype == jnp.bfloat16
    # Both accumulate in fp32 and round once; the kernels may sum in different orders, so a
    # result can land on the neighbouring bf16 value.
    np.testing.assert_allclose(
        out.astype(np.float32), ref.astype(np.float32), rtol=BF16_ULP, atol=1e-6
    )
    for name, g, g_ref in zip("ab", grads, grads_ref, strict=True):
        assert g.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(
            np.asarray(g, np.float32),
            np.asarray(g_ref, np.float32),
            rtol=2 * BF16_ULP,
            atol=1e-3,
            err_msg=f"d/d{name}",
        )
        assert np.abs(np.asarray(g_ref, np.float32)).max() > 0.1, name


@pytest.mark.parametrize("platform,dtype", [("cpu", jnp.float32), ("tpu", jnp.bfloat16)])
def test_elsewhere_it_is_jnp_einsum(platform, dtype):
    spec = "btd,df->btf"
    a, b, kg = _operands(SPECS[spec], dtype, seed=1)
    ct = jax.random.normal(kg, (2, 5, 12), jnp.float32)
    out, grads = _value_and_grads(lambda s, a, b: matmul.einsum(s, a, b, platform), spec, a, b, ct)
    ref, grads_ref = _value_and_grads(jnp.einsum, spec, a, b, ct)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_ref, np.float32))


@pytest.mark.parametrize(
    "spec", ["btd,df", "...d,df->...f", "bd,df->bfz", "bdd,df->bf", "btd,tf->f"]
)
def test_rejects_specs_it_cannot_transpose(spec):
    a = jnp.ones((2, 3, 4), jnp.bfloat16)
    b = jnp.ones((4, 5), jnp.bfloat16)
    with pytest.raises(ValueError, match="matmul.einsum"):
        matmul.einsum(spec, a, b, "cpu")
