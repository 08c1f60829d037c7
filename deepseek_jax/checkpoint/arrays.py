"""Our Orbax array directories, array by array: converted checkpoints and training steps.

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
for whole-model restores onto devices (`deepseek_jax.load`, `train.init_from`).
"""

from __future__ import annotations

import ast
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from deepseek_jax.checkpoint.errors import CheckpointError
from deepseek_jax.checkpoint.mapping import is_bias_leaf, leaf_specs
from deepseek_jax.checkpoint.source import ConvertedSource, TrainingSource

GROUPS = ("params", "router_bias")

__all__ = ["ArrayStore", "ArrayWriter", "check_arrays", "restore", "store_key"]


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


def check_arrays(
    source: ConvertedSource | TrainingSource, store: ArrayStore
) -> dict[str, jax.ShapeDtypeStruct]:
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


def restore(source: ConvertedSource | TrainingSource, abstract: dict) -> dict:
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
