"""Kernels behind one seam each, chosen by `runtime:` config keys and checked against the plain
XLA path: `attention` (runtime.attention), `cross_entropy` (runtime.cross_entropy) and the
grouped matmul of the routed experts (runtime.grouped_matmul). `matmul.py` holds the model's
activation x weight einsums (picked by platform, not config: its choices change no values)."""

import contextlib

import jax
import jax.numpy as jnp


def pallas_precision(dtype) -> contextlib.AbstractContextManager:
    """The matmul precision to trace a TPU Pallas kernel under, for operands of `dtype`.

    Mosaic lowers the global `jax_default_matmul_precision` into each of the kernel's dots, and
    rejects an fp32 contract precision on bf16 operands ("Bad lhs type"). Operands narrower than
    fp32 have only one meaningful precision (one pass, fp32 accumulation), so trace those
    kernels at "default"; fp32 operands keep whatever precision the caller chose.
    """
    if jnp.dtype(dtype).itemsize < 4:
        return jax.default_matmul_precision("default")
    return contextlib.nullcontext()


def at_pallas_precision(fn, dtype):
    """`fn(*args)`, a differentiable call into a Pallas kernel, traced forward and backward under
    `pallas_precision(dtype)`.

    A context manager around the call alone does not reach the backward kernels: a custom VJP's
    backward is traced later, when the gradient is transposed, outside any `with` block.
    """

    @jax.custom_vjp
    def call(*args):
        with pallas_precision(dtype):
            return fn(*args)

    def fwd(*args):
        with pallas_precision(dtype):
            return jax.vjp(fn, *args)

    def bwd(vjp, g):
        with pallas_precision(dtype):
            return vjp(g)

    call.defvjp(fwd, bwd)
    return call
