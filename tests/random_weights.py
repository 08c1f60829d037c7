"""Random weights for test models, built abstractly: the model's eager init is slow on CPU
and gives unit norm scales, which would hide a swapped or missing norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.model import DeepSeek
from deepseek_jax.runtime import Runtime

# Most numerics tests run in fp32 compute so that differences are the algorithm's, not bf16's.
FP32 = Runtime.of(compute_dtype="float32")


def random_state(make, seed: int = 0, std: float = 0.08, bias_std: float = 0.1):
    """(graphdef, state) of the module `make()` builds, with every array drawn at random:
    norm scales 1 + 0.1·N(0,1), router biases bias_std·N(0,1), everything else std·N(0,1)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif name == "router_bias_E":
            value = bias_std * rng.standard_normal(leaf.shape)
        else:
            value = std * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(fill, state)


def model_state(cfg, seed: int = 0, *, runtime: Runtime | None = FP32, **kw):
    """`random_state` of a whole DeepSeek model for `cfg`, run with `runtime` (default: one
    device, fp32 compute; None is `Runtime.default()`, bf16 compute)."""
    return random_state(lambda: DeepSeek(cfg, nnx.Rngs(0), runtime=runtime), seed, **kw)
