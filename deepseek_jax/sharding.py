"""Device meshes and the one table that maps logical axis names to mesh axes.

Parameters carry logical names (`embed`, `experts`, ...; see `model/layers.py`) and activations
are constrained with logical names too (`batch`). A preset of rules maps each name to zero or
more mesh axes (`data`, `fsdp`, `expert`, `tensor`). Model code never names a mesh axis: it holds
a `Sharding` (through its `deepseek_jax.runtime.Runtime`) and this module resolves the names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from deepseek_jax.config import MESH_AXES, MeshConfig

# Activations: the batch is split over every data-like axis in every preset.
_BATCH = ("data", "fsdp", "expert")
# Tensor parallelism splits heads and FFN widths; a no-op while mesh.tensor == 1.
_TENSOR = {
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "expert_mlp": ("tensor",),
    "kv_b_heads": ("tensor",),
    "o_heads": ("tensor",),
    "vocab": ("tensor",),
}

# logical name -> mesh axes. Names absent from a preset are replicated.
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # Pure data parallelism: every weight replicated.
    "dp": {"batch": _BATCH, **_TENSOR},
    # ZeRO-3 style: every weight split over fsdp along its model width (or, for MLA's
    # up-projections, which have none, along the low rank; for the routed experts' down
    # projections along F: see model/dispatch.py's DOWN_AXES).
    "fsdp": {
        "batch": _BATCH,
        "embed": ("fsdp",),
        "expert_embed": ("fsdp",),
        "q_lora": ("fsdp",),
        "kv_lora": ("fsdp",),
        "kv_b_rank": ("fsdp",),
        "o_embed": ("fsdp",),
        **_TENSOR,
        "expert_mlp": ("fsdp", "tensor"),
    },
    # Expert parallelism: routed experts split over expert; other weights over fsdp.
    "ep": {
        "batch": _BATCH,
        "experts": ("expert",),
        "embed": ("fsdp",),
        "expert_embed": ("fsdp",),
        "q_lora": ("fsdp",),
        "kv_lora": ("fsdp",),
        "kv_b_rank": ("fsdp",),
        "o_embed": ("fsdp",),
        **_TENSOR,
        "expert_mlp": ("fsdp", "tensor"),
    },
    # The expert axis also shards attention and dense weights FSDP-style (it holds a slice of
    # the batch anyway), so no device keeps a full copy of any weight.
    "ep_fsdp": {
        "batch": _BATCH,
        "experts": ("expert",),
        "embed": ("fsdp", "expert"),
        "expert_embed": ("fsdp",),
        "q_lora": ("fsdp", "expert"),
        "kv_lora": ("fsdp", "expert"),
        **_TENSOR,
        "expert_mlp": ("fsdp", "tensor"),
        # MLA's key/value up-projections split along heads (fsdp) and the rank (expert), o_proj
        # along heads (fsdp) and D (expert), rather than fsdp x expert ways along the rank or D:
        # the TPU compiler re-lays out each whole fp32 stack to put the rank (o_proj: D)
        # innermost, where a 2- or 28-wide shard is padded to 128 (0.45 GiB per stack in V3).
        "kv_b_heads": ("fsdp", "tensor"),
        "kv_b_rank": ("expert",),
        "o_heads": ("fsdp", "tensor"),
        "o_embed": ("expert",),
    },
}


class ShardingError(ValueError):
    """A logical-to-mesh mapping that cannot hold (two array axes on one mesh axis, ...)."""


@dataclasses.dataclass(frozen=True)
class Rules:
    table: Mapping[str, tuple[str, ...]]

    def __hash__(self) -> int:  # hashable, so a Sharding can be a static jit argument
        return hash(tuple(sorted((k, tuple(v)) for k, v in self.table.items())))

    def spec(self, axes: tuple[str | None, ...], mesh: Mesh | None = None) -> PartitionSpec:
        """PartitionSpec for an array with logical `axes`; mesh axes of size 1 are dropped."""
        out, used = [], {}
        for i, name in enumerate(axes):
            targets = tuple(self.table.get(name, ())) if name is not None else ()
            if mesh is not None:
                targets = tuple(a for a in targets if mesh.shape.get(a, 1) > 1)
            for t in targets:
                if t in used:
                    raise ShardingError(
                        f"logical axes {axes}: '{axes[used[t]]}' and '{name}' both map to mesh "
                        f"axis '{t}'"
                    )
                used[t] = i
            out.append(targets[0] if len(targets) == 1 else (targets or None))
        return PartitionSpec(*out)

    def mesh_axes(self, name: str) -> tuple[str, ...]:
        return tuple(self.table.get(name, ()))


def rules_for(preset: str) -> Rules:
    if preset not in PRESETS:
        raise ShardingError(f"unknown rules preset {preset!r}; choose from {sorted(PRESETS)}")
    return Rules(PRESETS[preset])


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor), hybrid across slices when dcn_data > 1."""
    devices = jax.devices() if devices is None else devices
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (AxisType.Auto,) * len(MESH_AXES)
    if cfg.dcn_data > 1:
        from jax.experimental import mesh_utils

        granules = (
            len({d.slice_index for d in devices})
            if devices[0].platform == "tpu"
            else len({d.process_index for d in devices})
        )
        if granules % cfg.dcn_data:
            raise ShardingError(
                f"mesh.dcn_data={cfg.dcn_data} needs the devices to come from a multiple of "
                f"{cfg.dcn_data} slices/processes, found {granules}"
            )

        ici = (sizes["data"] // cfg.dcn_data,) + shape[1:]
        dcn = (cfg.dcn_data,) + (1,) * (len(shape) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=devices[0].platform != "tpu"
        )
        return Mesh(grid, MESH_AXES, axis_types=types)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


@dataclasses.dataclass(frozen=True)
class Sharding:
    """A mesh and its rules, handed to the model inside its `Runtime`."""

    mesh: Mesh
    rules: Rules

    def spec(self, axes: tuple[str | None, ...]) -> PartitionSpec:
        return self.rules.spec(axes, self.mesh)

    def named(self, axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes))

    def axis_size(self, logical: str) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.mesh_axes(logical)] or [1]))

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        return tuple(a for a in self.rules.mesh_axes(logical) if self.mesh.shape.get(a, 1) > 1)


def constrain(x: jax.Array, axes: tuple[str | None, ...], sharding: Sharding | None) -> jax.Array:
    """`with_sharding_constraint` by logical names on `sharding`'s mesh; identity for None."""
    if sharding is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding.named(axes))


def variable_axes(state: nnx.State) -> nnx.State:
    """The logical axes of every variable in `state` (same tree, tuples as leaves)."""
    return jax.tree.map(
        lambda v: v.get_metadata().get("axes"),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def state_specs(state: nnx.State, sharding: Sharding) -> nnx.State:
    """PartitionSpec for every variable in an NNX state (abstract or concrete)."""

    def spec(v: nnx.Variable) -> nnx.Variable:
        axes = v.get_metadata().get("axes")
        if axes is None:
            raise ShardingError(f"variable of shape {v.get_value().shape} has no logical axes")
        return v.replace(sharding.spec(axes))

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, sharding: Sharding) -> nnx.State:
    """NamedSharding for every variable in an NNX state."""
    specs = state_specs(state, sharding)
    return jax.tree.map(lambda p: NamedSharding(sharding.mesh, p), specs)
