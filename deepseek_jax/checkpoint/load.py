"""`deepseek_jax.load`: a model from any checkpoint, built leaf by leaf onto its devices.

Every parameter is created as `jax.make_array_from_callback` would (see `build_array`): each
process reads only the slices its own devices hold (for HF checkpoints through
`hf.LeafSlices`, for our Orbax directories through Orbax's sharded restore), so no host ever
holds the whole model and the memory a load needs beyond the loaded weights stays near the size
of one slice.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from deepseek_jax.checkpoint import arrays
from deepseek_jax.checkpoint.hf import LeafSlices, check_tensors
from deepseek_jax.checkpoint.safetensors_io import CheckpointReader
from deepseek_jax.checkpoint.source import HFSource, Source, resolve
from deepseek_jax.config import ModelConfig

__all__ = ["load", "load_weights"]


def load(
    path: str | os.PathLike | Source,
    *,
    compute_dtype: str = "float32",
    param_dtype: str = "float32",
    scan_layers: bool = True,
    mesh_sharding=None,
):
    """A DeepSeek model with the weights at `path`: an HF checkpoint directory (config.json plus
    safetensors, FP8 or not), a directory written by `hf_to_orbax`, or a training run directory,
    its `checkpoints/` directory or one step directory (the newest complete step); or a source
    already returned by `deepseek_jax.checkpoint.resolve`.

    `mesh_sharding` (a `deepseek_jax.sharding.Sharding`) places the weights on its mesh by its
    rules; each process then reads only the slices its devices hold.

    `m(tokens)` on int tokens [B, T] returns the main logits [B, T, V]; `m.forward` also returns
    MTP logits and routing statistics.
    """
    from deepseek_jax.runtime import Runtime

    source = path if not isinstance(path, str | os.PathLike) else resolve(path)
    rt = Runtime.of(
        mesh_sharding,
        compute_dtype=compute_dtype,
        param_dtype=param_dtype,
        scan_layers=scan_layers,
    )
    graphdef, params, biases = load_weights(source, rt)
    return nnx.merge(graphdef, params, biases)


def load_weights(source: Source, rt):
    """(graphdef, params, router biases) of `source`'s model run with `rt` (a
    `deepseek_jax.runtime.Runtime`), every array placed on `rt.sharding`'s mesh by its rules
    (one device without it)."""
    from deepseek_jax.model import DeepSeek
    from deepseek_jax.model.moe import RouterBias
    from deepseek_jax.sharding import state_shardings

    cfg, mesh_sharding = source.model, rt.sharding
    graphdef, params, biases = nnx.split(
        nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0), runtime=rt)), nnx.Param, RouterBias
    )
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def targets(state):
        if mesh_sharding is None:
            shardings = jax.tree.map(lambda _: one_device, nnx.to_pure_dict(state))
        else:
            shardings = nnx.to_pure_dict(state_shardings(state, mesh_sharding))
        return jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
            nnx.to_pure_dict(state),
            shardings,
        )

    wanted = {"params": targets(params), "router_bias": targets(biases)}
    if isinstance(source, HFSource):
        loaded = _from_hf(source, cfg, wanted)
    else:
        loaded = arrays.restore(source, wanted)
    nnx.replace_by_pure_dict(params, loaded["params"])
    nnx.replace_by_pure_dict(biases, loaded["router_bias"])
    return graphdef, params, biases


def _from_hf(source: HFSource, cfg: ModelConfig, wanted: dict) -> dict:
    with CheckpointReader(source.path) as reader:
        plan = check_tensors(cfg, reader, source.fp8_block)  # every check before any read
        slices = LeafSlices(reader, plan, source.fp8_block)
        if jax.process_index() == 0:
            slices.check_copies()

        def build(path, target):
            leaf = ".".join(str(k.key) for k in path)
            return build_array(
                target, lambda index: slices.read(leaf, target.shape, target.dtype, index)
            )

        return {
            group: jax.tree_util.tree_map_with_path(build, tree) for group, tree in wanted.items()
        }


def build_array(target: jax.ShapeDtypeStruct, read) -> jax.Array:
    """`jax.make_array_from_callback(target.shape, target.sharding, read)`, one slice at a time.

    `read(index)` returns the host array for one device's index. Each distinct slice is read
    once, copied to the devices holding it and waited for before the next is read, so at most
    one slice is on the host at a time (`make_array_from_callback` would read them all before
    transferring any, holding a whole leaf and, with asynchronous transfers, several)."""
    indices = target.sharding.addressable_devices_indices_map(target.shape)
    groups: dict[tuple, tuple] = {}
    for device, index in indices.items():
        key = tuple(s.indices(n) for s, n in zip(index, target.shape, strict=True))
        groups.setdefault(key, (index, []))[1].append(device)
    shards = {}
    for index, devices in groups.values():
        host = read(index)
        placed = [jax.device_put(host, d) for d in devices]
        jax.block_until_ready(placed)
        shards.update(zip(devices, placed, strict=True))
        del host
    return jax.make_array_from_single_device_arrays(
        target.shape, target.sharding, [shards[d] for d in indices]
    )
