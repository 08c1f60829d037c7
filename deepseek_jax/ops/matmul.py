"""Two-operand einsums in the compute dtype: where a platform's matmul quirks are handled.

    einsum(spec, a, b, platform) == jnp.einsum(spec, a, b)

in value, on every platform: a bf16 einsum accumulates in fp32 and rounds its result to bf16,
and so does this one. What differs is how XLA:CPU (jax 0.10) runs it. Its library kernel for
bf16 dots (YNNPACK, which uses AMX or AVX512-BF16 where the CPU has them) only takes dots that
write fp32; a dot that writes bf16 is rewritten to convert both operands to fp32 and runs as an
fp32 dot. Measured on the 2-core development machine (a Xeon with AMX), one [2048, 256] x
[256, 768] dot: 1063 GFLOP/s with bf16 operands writing fp32, 231 writing bf16, 254 in fp32.

So on a CPU with bf16 operands the forward writes fp32 and rounds, and a custom VJP computes the
two gradient dots the same way, with the cotangent in the operands' dtype (what autodiff's own
backward of a bf16 dot takes: the cotangent of a bf16 result is bf16). Every other platform and
every fp32 einsum is `jnp.einsum` unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _parse(spec: str) -> tuple[str, str, str]:
    """('btd', 'df', 'btf') for 'btd,df->btf'; rejects what the transposed einsums cannot undo."""
    lhs, sep, out = spec.replace(" ", "").partition("->")
    a, _, b = lhs.partition(",")
    if not sep or not a or not b or "." in spec:
        raise ValueError(f"matmul.einsum takes 'ab,bc->ac'-style two-operand specs, got {spec!r}")
    for x, other in ((a, b), (b, a)):
        if len(set(x)) != len(x) or not set(x) <= set(other) | set(out):
            raise ValueError(
                f"matmul.einsum spec {spec!r}: every index of an operand must be distinct and "
                "appear in the other operand or the output"
            )
    if len(set(out)) != len(out) or not set(out) <= set(a) | set(b):
        raise ValueError(f"matmul.einsum spec {spec!r}: output indices must be distinct inputs")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp32_accumulated(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _fwd(spec, a, b):
    return _fp32_accumulated(spec, a, b), (a, b)


def _bwd(spec, residuals, g):
    a, b = residuals
    sa, sb, so = _parse(spec)
    g = g.astype(a.dtype)
    da = jnp.einsum(f"{so},{sb}->{sa}", g, b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{so}->{sb}", a, g, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_fp32_accumulated.defvjp(_fwd, _bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array, platform: str) -> jax.Array:
    """`jnp.einsum(spec, a, b)` for two operands of one dtype, run where `platform`'s library
    matmuls run fast (see the module docstring); `platform` is where the program will run
    (`Runtime.platform`)."""
    if platform == "cpu" and a.dtype == b.dtype == jnp.bfloat16:
        _parse(spec)
        return _fp32_accumulated(spec, a, b)
    return jnp.einsum(spec, a, b)
