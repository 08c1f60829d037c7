"""`Runtime`: how a model runs (the runtime config and the mesh), handed to it explicitly.

Every model module keeps the `Runtime` it was built with as a static attribute (`self.rt`): it is
part of the graphdef, so a jitted step compiles for one runtime and a different mesh or kernel
choice is a different program. Nothing is read from a context variable, so model code cannot
silently take the single-device path because a caller forgot to enter one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import RuntimeConfig
from deepseek_jax.ops import matmul
from deepseek_jax.sharding import Sharding, constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The runtime knobs and the mesh with its rules (None: one device). Hashable, static."""

    cfg: RuntimeConfig = RuntimeConfig()
    sharding: Sharding | None = None

    @classmethod
    def default(cls) -> Runtime:
        """One device, default knobs (bf16 compute, fp32 parameters, scanned layers)."""
        return cls(RuntimeConfig(), None)

    @classmethod
    def of(cls, sharding: Sharding | None = None, **knobs) -> Runtime:
        """Runtime(RuntimeConfig(**knobs), sharding): a shorthand for tests and notebooks."""
        return cls(RuntimeConfig(**knobs), sharding)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.cfg.compute_dtype])

    @property
    def param_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.cfg.param_dtype])

    @property
    def platform(self) -> str:
        """The platform the model compiles for: its mesh's devices' (an AOT TPU compile from a
        CPU host says "tpu"), else the default backend's."""
        if self.sharding is not None:
            return self.sharding.mesh.devices.flat[0].platform
        return jax.default_backend()

    def einsum(self, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
        """`jnp.einsum(spec, a, b)` of an activation and a weight in the compute dtype, run where
        this platform's library matmuls are fast (`ops/matmul.py`)."""
        return matmul.einsum(spec, a, b, self.platform)

    def constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        """Constrain `x` by logical axis names on this runtime's mesh (identity without one)."""
        return constrain(x, axes, self.sharding)

    def replace(self, **changes) -> Runtime:
        """A copy with `sharding=` and/or runtime knobs (`compute_dtype=...`) changed."""
        sh = changes.pop("sharding", self.sharding)
        return Runtime(dataclasses.replace(self.cfg, **changes) if changes else self.cfg, sh)


def with_runtime(model: nnx.Module, rt: Runtime) -> nnx.Module:
    """A copy of `model` (same arrays, not copied) whose modules all run with `rt`.

    The runtime is static graph data, so a model built for one device is re-targeted at a mesh
    (or other kernels) without rebuilding or moving weights; placing the weights is the caller's
    business (`sharding.state_shardings`). Dtypes of existing parameters are left as they are.
    """
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    for _, node in nnx.iter_graph(clone):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "rt", None), Runtime):
            node.rt = rt
    return clone
