"""Checks that turn would-be compile or runtime failures into one-line errors, before compiling.

Each names the config key and the fix: a batch the mesh cannot split, experts or other weights
the mesh cannot divide, sequences longer than the model's positions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from deepseek_jax.config import Config, ConfigError
from deepseek_jax.model import DeepSeek
from deepseek_jax.model.moe import RouterBias
from deepseek_jax.train.step import TrainState


def check_config(cfg: Config) -> None:
    """Checks that need no devices."""
    tc, model = cfg.train, cfg.model
    if tc.seq_len > model.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={tc.seq_len} exceeds model.max_position_embeddings="
            f"{model.max_position_embeddings}: lower train.seq_len"
        )


def _mesh_text(mesh, axes) -> str:
    return " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)


def check_shardable(cfg: Config, batch_sharding: NamedSharding, state_shardings, state_shapes):
    """Raise ConfigError if the batch or a state array does not divide over its mesh axes."""
    mesh = batch_sharding.mesh
    batch_axes = [a for a in _flat(batch_sharding.spec[0]) if mesh.shape[a] > 1]
    ways = math.prod(mesh.shape[a] for a in batch_axes)
    micro = cfg.train.batch_size // cfg.train.micro_batches
    if ways > 1 and micro % ways:
        what = (
            f"train.batch_size={cfg.train.batch_size}"
            if cfg.train.micro_batches == 1
            else f"train.batch_size/train.micro_batches={micro}"
        )
        raise ConfigError(
            f"{what} is not divisible by the {ways} batch shards ({_mesh_text(mesh, batch_axes)}):"
            f" use a multiple of {ways}"
        )
    flat_shapes = jax.tree_util.tree_flatten_with_path(state_shapes)[0]
    flat_shardings = jax.tree.leaves(state_shardings)
    for (path, shape), sh in zip(flat_shapes, flat_shardings, strict=True):
        for dim, (size, part) in enumerate(zip(shape.shape, sh.spec, strict=False)):
            axes = [a for a in _flat(part) if mesh.shape[a] > 1]
            ways = math.prod(mesh.shape[a] for a in axes)
            if ways > 1 and size % ways:
                name = jax.tree_util.keystr(path)
                if "expert" in axes and ("_EDF" in name or "_EFD" in name):
                    raise ConfigError(
                        f"model.moe.n_routed_experts={cfg.model.moe.n_routed_experts} is not "
                        f"divisible by {_mesh_text(mesh, axes)}: change either"
                    )
                raise ConfigError(
                    f"{name} dimension {dim} ({size}) is not divisible by "
                    f"{_mesh_text(mesh, axes)} (mesh.rules={cfg.mesh.rules}): change the mesh "
                    "or the rules"
                )


def _flat(part) -> list[str]:
    if part is None:
        return []
    return [part] if isinstance(part, str) else list(part)


def state_shapes(trainer) -> TrainState:
    """Shapes and dtypes of the train state, computed without shardings (so that a layout that
    does not divide can be reported by `check_shardable` rather than fail in JAX)."""
    abstract = nnx.eval_shape(lambda: DeepSeek(trainer.cfg.model, nnx.Rngs(0)))
    _, params, biases = nnx.split(abstract, nnx.Param, RouterBias)
    params = nnx.to_pure_dict(params)
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        router_bias=nnx.to_pure_dict(biases),
        opt_state=jax.eval_shape(trainer.tx.init, params),
    )
