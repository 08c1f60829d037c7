"""Our Orbax checkpoints on disk: converted directories and training runs, array by array.

A converted directory (written by `hf_to_orbax`) holds:
- `params/`: an Orbax PyTree checkpoint (zarr v2 per leaf, no OCDBT) of
  `{"params": <parameter pure dict>, "router_bias": <router bias pure dict>}`; arrays are chunked
  so that one layer (and one expert) is one chunk, which lets a converter write and read them
  slice by slice;
- `deepseek_jax.json`: format version, the ModelConfig, the stacked layer layout (which HF layer
  sits in which stack slot), the dtype and the source;
- the source's tokenizer files.
A training step directory holds the same two subtrees inside its `state` item (OCDBT), next to
the optimizer state, with the run's Config in its `config` item.

`ArrayStore` reads either through TensorStore one slice at a time; `restore` hands them to Orbax
for whole-model restores (`deepseek_jax.load`, `train.init_from`).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from deepseek_jax.config import Config, ConfigError, ModelConfig, config_from_saved
from deepseek_jax.hf.load import CheckpointError
from deepseek_jax.hf.mapping import is_bias_leaf, leaf_specs, stack_layout

FORMAT = "deepseek_jax.converted"
VERSION = 1
META_FILE = "deepseek_jax.json"
PARAMS_DIR = "params"
GROUPS = ("params", "router_bias")

__all__ = [
    "ArrayStore",
    "ArrayWriter",
    "Source",
    "find_source",
    "load_orbax",
    "restore",
]


def store_key(leaf: str) -> str:
    """Key of a model leaf in the saved tree: router biases under router_bias, the rest params."""
    return f"{'router_bias' if is_bias_leaf(leaf) else 'params'}.{leaf}"


# -- writing ------------------------------------------------------------------------------------


class ArrayWriter:
    """Creates one zarr array per leaf in an Orbax (non-OCDBT) PyTree directory and writes it in
    slices; `finish` adds the metadata files that make the directory an Orbax checkpoint."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._arrays: dict[str, ts.TensorStore] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._context = ts.Context()

    def create(self, key: str, shape: tuple[int, ...], dtype, lead: int) -> None:
        """Array `key` (dotted path); each index of its `lead` leading axes is one chunk."""
        chunks = [1] * lead + list(shape[lead:])
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": os.path.join(self.directory, key)},
            "metadata": {
                "shape": list(shape),
                "chunks": [max(c, 1) for c in chunks],
                "dtype": np.dtype(dtype).str if np.dtype(dtype) != jnp.bfloat16 else "bfloat16",
                "compressor": None,
                "dimension_separator": ".",
            },
            "create": True,
            "delete_existing": True,
        }
        self._arrays[key] = ts.open(spec, context=self._context).result()
        self._shapes[key] = tuple(shape)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._arrays[key].dtype.numpy_dtype)

    def write(self, key: str, index: tuple[int, ...], value: np.ndarray) -> None:
        arr = self._arrays[key]
        arr[index].write(np.asarray(value, dtype=self.dtype(key))).result()

    def finish(self) -> None:
        tree = {}
        for key, shape in self._shapes.items():
            path = tuple(key.split("."))
            tree[str(path)] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in path],
                "value_metadata": {
                    "value_type": "jax.Array",
                    "skip_deserialize": False,
                    "write_shape": list(shape),
                },
            }
        metadata = {
            "tree_metadata": tree,
            "use_ocdbt": False,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }
        now = time.time_ns()
        checkpoint = {
            "item_handlers": (
                "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
            ),
            "metrics": {},
            "performance_metrics": {},
            "init_timestamp_nsecs": now,
            "commit_timestamp_nsecs": now,
            "custom_metadata": {},
        }
        _write_json(os.path.join(self.directory, "_METADATA"), metadata)
        _write_json(os.path.join(self.directory, "_CHECKPOINT_METADATA"), checkpoint)
        with open(os.path.join(self.directory, "commit_success.txt"), "w") as f:
            f.write(f"Checkpoint commit was successful to {self.directory}\n")
        self._arrays.clear()


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")


# -- reading ------------------------------------------------------------------------------------


class ArrayStore:
    """The arrays of an Orbax PyTree directory (OCDBT or not), opened lazily, read in slices."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        meta_path = os.path.join(self.directory, "_METADATA")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            self.keys = {".".join(ast.literal_eval(k)) for k in meta["tree_metadata"]}
        except (OSError, ValueError, KeyError, TypeError, SyntaxError) as e:
            raise CheckpointError(f"{meta_path} is missing or not Orbax metadata ({e})") from None
        self.ocdbt = bool(meta.get("use_ocdbt", True))
        self._context = ts.Context()
        self._open: dict[str, ts.TensorStore] = {}

    def _array(self, key: str) -> ts.TensorStore:
        if key not in self._open:
            if key not in self.keys:
                raise CheckpointError(f"{self.directory} has no array {key}")
            if self.ocdbt:
                kv = {"driver": "ocdbt", "base": f"file://{self.directory}/", "path": f"{key}/"}
            else:
                kv = {"driver": "file", "path": os.path.join(self.directory, key)}
            spec = {"driver": "zarr", "kvstore": kv, "open": True}
            try:
                self._open[key] = ts.open(spec, context=self._context, read=True).result()
            except ValueError as e:
                raise CheckpointError(f"cannot open array {key} in {self.directory}: {e}") from None
        return self._open[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._array(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._array(key).dtype.numpy_dtype)

    def read(self, key: str, index: tuple[int, ...] = ()) -> np.ndarray:
        """The slice `array[index]` (only that slice's chunks are read)."""
        return np.asarray(self._array(key)[index].read().result())


# -- sources ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "converted" or "training"
    path: str  # the directory the user named
    arrays_dir: str  # Orbax PyTree directory holding the params and router_bias subtrees
    model: ModelConfig
    meta: dict | None = None  # deepseek_jax.json of a converted directory
    config: Config | None = None  # the whole saved Config of a training run


def _newest_step(directory: str) -> str | None:
    steps = [
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state"))
    ]
    return os.path.join(directory, str(max(steps))) if steps else None


def find_source(path: str | os.PathLike, required: bool = True) -> Source | None:
    """What `path` is: a converted directory, or a training run / checkpoints / step directory
    (newest step). None (or CheckpointError when `required`) if it is none of them."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(path, META_FILE)):
        return _converted(path)
    step = None
    if os.path.isdir(os.path.join(path, "state")):
        step = path
    else:
        for candidate in (os.path.join(path, "checkpoints"), path):
            if os.path.isdir(candidate) and (step := _newest_step(candidate)):
                break
    if step is None:
        if required:
            raise CheckpointError(
                f"{path} is neither a converted checkpoint ({META_FILE}) nor a training run, "
                "checkpoints or step directory (no <step>/state)"
            )
        return None
    config_path = os.path.join(step, "config", "metadata")
    try:
        with open(config_path) as f:
            config = config_from_saved(json.load(f))
    except (OSError, ValueError, ConfigError) as e:
        raise CheckpointError(f"cannot read the run config {config_path}: {e}") from None
    return Source("training", path, os.path.join(step, "state"), config.model, config=config)


def _converted(path: str) -> Source:
    meta_path = os.path.join(path, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise ValueError(f"version {meta.get('version')!r} is not {VERSION}")
        model = config_from_saved({"model": meta["model"]}).model
        layout = meta["layout"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{meta_path} is missing or garbled: {e}") from None
    want = {
        "format": "stacked",
        "layer_kinds": list(model.layer_kinds),
        "stacks": stack_layout(model),
    }
    if layout != want:
        raise CheckpointError(
            f"{meta_path}: layer layout {layout} does not match its model config ({want})"
        )
    return Source("converted", path, os.path.join(path, PARAMS_DIR), model, meta)


def check_arrays(source: Source, store: ArrayStore) -> dict[str, jax.ShapeDtypeStruct]:
    """Every leaf the model config needs, with the stored shape; raises on any mismatch."""
    specs = leaf_specs(source.model)
    for leaf, spec in specs.items():
        key = store_key(leaf)
        if key not in store.keys:
            raise CheckpointError(f"{store.directory} lacks array {key} that its config needs")
        if store.shape(key) != tuple(spec.shape):
            raise CheckpointError(
                f"{store.directory}: array {key} has shape {list(store.shape(key))}, but the "
                f"model config implies {list(spec.shape)}"
            )
    extra = sorted(
        k for k in store.keys if k.split(".")[0] in GROUPS and k.split(".", 1)[1] not in specs
    )
    if extra:
        raise CheckpointError(f"{store.directory} has arrays its config does not use: {extra[:5]}")
    return specs


def restore(source: Source, abstract: dict) -> dict:
    """{"params": ..., "router_bias": ...} restored by Orbax onto `abstract` (the same two pure
    dicts of ShapeDtypeStructs with shardings), cast to its dtypes; optimizer state is skipped."""
    check_arrays(source, ArrayStore(source.arrays_dir))
    args = ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(source.arrays_dir, args=args)


def model_differences(a: ModelConfig, b: ModelConfig) -> dict[str, tuple]:
    """Fields of two model configs that differ (those `==` compares: the architecture)."""
    keys = [f.name for f in dataclasses.fields(ModelConfig) if f.compare]
    return {k: (getattr(a, k), getattr(b, k)) for k in keys if getattr(a, k) != getattr(b, k)}


def load_orbax(
    path: str | os.PathLike,
    *,
    compute_dtype: str = "float32",
    param_dtype: str = "float32",
    scan_layers: bool = True,
    mesh_sharding=None,
):
    """A DeepSeek model from a converted directory or a training run (see `find_source`).

    With `mesh_sharding` (a `deepseek_jax.sharding.Sharding`), every array is restored straight
    into its shards on the mesh, placed by the rules as in training: no host ever holds a
    whole stacked array, which is what lets a model larger than one host's memory load."""
    source = find_source(path)
    cfg = source.model
    from flax import nnx

    from deepseek_jax.model import DeepSeek
    from deepseek_jax.model.moe import RouterBias
    from deepseek_jax.runtime import Runtime
    from deepseek_jax.sharding import state_shardings

    rt = Runtime.of(
        mesh_sharding,
        compute_dtype=compute_dtype,
        param_dtype=param_dtype,
        scan_layers=scan_layers,
    )
    graphdef, params, biases = nnx.split(
        nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0), runtime=rt)), nnx.Param, RouterBias
    )
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

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

    restored = restore(
        source,
        {"params": targets(params), "router_bias": targets(biases)},
    )
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.replace_by_pure_dict(biases, restored["router_bias"])
    return nnx.merge(graphdef, params, biases)
