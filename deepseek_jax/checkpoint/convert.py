"""Streaming conversion between Hugging Face checkpoints and our Orbax layout, both ways.

`hf_to_orbax` reads an official-layout checkpoint (V2 or V3, single file or sharded, FP8
block-quantized or not, with or without MTP layers) one tensor at a time and writes each into its
slot of a pre-created zarr array (see `arrays` for the directory layout). `orbax_to_hf` reads
a converted directory or a training checkpoint slice by slice and appends each HF tensor to the
open shard file, whose header was computed from the shapes beforehand. Neither ever holds the
model: memory stays near the largest tensor. Both write into a temporary sibling of the
destination and rename it at the end, so a failed conversion leaves nothing at the destination.

The name mapping is `mapping.hf_tensors`, the same table `deepseek_jax.load` reads with.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tqdm

from deepseek_jax.checkpoint.arrays import ArrayStore, ArrayWriter, check_arrays, store_key
from deepseek_jax.checkpoint.errors import CheckpointError
from deepseek_jax.checkpoint.hf import check_tensors, read_tensor
from deepseek_jax.checkpoint.mapping import (
    hf_tensors,
    is_bias_leaf,
    is_fp32_leaf,
    leaf_specs,
    stack_layout,
    to_hf,
    to_ours,
)
from deepseek_jax.checkpoint.safetensors_io import CheckpointReader, write_streaming
from deepseek_jax.checkpoint.source import (
    FORMAT,
    META_FILE,
    PARAMS_DIR,
    VERSION,
    ConvertedSource,
    HFSource,
    resolve,
)
from deepseek_jax.config import ConfigError, parse_overrides, replace, to_dict, to_hf_config

__all__ = ["add_convert_parser", "hf_to_orbax", "orbax_to_hf", "parse_size"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


def parse_size(size: str | int) -> int:
    """Bytes from 5GB, 500MB, 64KiB or a plain number (decimal units, as transformers uses)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"shard size {size!r} is not like 5GB, 500MB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


@contextmanager
def _staging(dst: str) -> Iterator[str]:
    """A temporary sibling of `dst`, renamed to `dst` on success and removed on any error."""
    if os.path.exists(dst):
        raise CheckpointError(f"destination {dst} already exists; remove it or choose another")
    parent = os.path.dirname(dst) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_tokenizer(src: str, dst: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def _bar(total_tensors: int, total_bytes: int, enabled: bool, what: str):
    bar = tqdm.tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc=what, disable=not enabled, mininterval=1
    )
    count = [0]

    def step(name: str, nbytes: int) -> None:
        count[0] += 1
        bar.set_postfix_str(f"{count[0]}/{total_tensors} tensors", refresh=False)
        bar.update(nbytes)

    return bar, step


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _source_dtypes(reader: CheckpointReader, plan) -> tuple[str, dict[str, str]]:
    """The dtype holding most of the checkpoint's bytes, and the tensors stored otherwise, so
    that `orbax_to_hf` can write every tensor back as it was. FP8 weights count as neither (they
    are written back dequantized, in the main dtype)."""
    dtypes, totals = {}, {}
    for t in plan:
        dt = reader.dtype(t.name)
        if dt == ml_dtypes.float8_e4m3fn:
            continue
        dtypes[t.name] = dt.name
        totals[dt.name] = totals.get(dt.name, 0) + _nbytes(t.shape, dt)
    main = max(totals, key=totals.get) if totals else "float32"
    return main, {name: dt for name, dt in dtypes.items() if dt != main}


def hf_to_orbax(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str = "float32",
    progress: bool = True,
    overrides: list[str] | tuple[str, ...] = (),
) -> str:
    """Convert the HF checkpoint directory `src` into a converted directory `dst` (returned).

    Weights are stored as `dtype` (float32 or bfloat16); router gates and correction biases stay
    float32. FP8 weights are dequantized. `overrides` are dotted ModelConfig keys recorded in the
    metadata (e.g. max_position_embeddings=8192); keys that change shapes are refused.
    """
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    source = resolve(src)
    if not isinstance(source, HFSource):
        raise CheckpointError(
            f"{source.path} is a {source.kind} checkpoint, not a Hugging Face one"
        )
    block = source.fp8_block
    cfg = _apply_overrides(source.model, overrides)
    with CheckpointReader(src) as reader:
        plan = check_tensors(cfg, reader, block)  # every check before anything is written
        source_dtype, dtype_exceptions = _source_dtypes(reader, plan)
        specs = leaf_specs(cfg)
        total = sum(_nbytes(t.shape, reader.dtype(t.name)) for t in plan)
        with _staging(dst) as tmp:
            writer = ArrayWriter(os.path.join(tmp, PARAMS_DIR))
            lead = _lead_axes(plan)
            for leaf, spec in specs.items():
                out = np.float32 if is_fp32_leaf(leaf) else DTYPES[dtype]
                writer.create(store_key(leaf), tuple(spec.shape), out, lead.get(leaf, 0))
            if cfg.moe.topk_method != "noaux_tc":  # V2: no correction bias in HF, ours is zero
                for leaf, spec in specs.items():
                    if is_bias_leaf(leaf):
                        writer.write(store_key(leaf), (), np.zeros(spec.shape, np.float32))
            bar, step = _bar(len(plan), total, progress, "hf-to-orbax")
            with bar:
                for t in plan:
                    value = read_tensor(reader, t.name, block, fresh=True)
                    nbytes = _nbytes(t.shape, reader.dtype(t.name))
                    if t.copy:
                        _check_copy(reader, t.name, value, t.parts[0], block)
                    else:
                        for part in t.parts:
                            writer.write(store_key(part.leaf), part.index, to_ours(part, value))
                    del value
                    step(t.name, nbytes)
            writer.finish()
            meta = {
                "format": FORMAT,
                "version": VERSION,
                "model": to_dict(cfg),
                "layout": {
                    "format": "stacked",
                    "layer_kinds": list(cfg.layer_kinds),
                    "stacks": stack_layout(cfg),
                },
                "dtype": dtype,
                "source": {"path": os.path.abspath(src), "kind": "huggingface"},
                "source_dtype": source_dtype,
                "source_dtype_exceptions": dtype_exceptions,
                "fp8_block": list(block) if block else None,
                "tokenizer_files": _copy_tokenizer(src, tmp),
            }
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f, indent=1)
                f.write("\n")
    return dst


def _apply_overrides(cfg, overrides) -> object:
    if not overrides:
        return cfg
    flat = _flatten(parse_overrides(list(overrides)))
    new = replace(cfg, **{k.removeprefix("model."): v for k, v in flat.items()})
    if leaf_shapes(new) != leaf_shapes(cfg):
        raise ConfigError(f"overrides {list(overrides)} change parameter shapes; not applied")
    return new


def leaf_shapes(cfg) -> dict:
    return {k: tuple(v.shape) for k, v in leaf_specs(cfg).items()}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _lead_axes(plan) -> dict[str, int]:
    """Per leaf, how many leading axes its parts index (layer slot, expert): one chunk each."""
    lead: dict[str, int] = {}
    for t in plan:
        for part in t.parts:
            lead[part.leaf] = len(part.index)
    return lead


def _check_copy(reader, name: str, value: np.ndarray, part, block) -> None:
    """The MTP copy of a shared tensor should equal the main one; warn (as `load` does) if not."""
    import logging

    main = "model.embed_tokens.weight" if part.leaf.startswith("embed") else "lm_head.weight"
    if not np.array_equal(value, read_tensor(reader, main, block, fresh=True)):
        logging.getLogger(__name__).warning(
            "%s differs from the main model's copy %s; using the main one", name, main
        )


def orbax_to_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    progress: bool = True,
) -> str:
    """Write the HF checkpoint directory `dst` (returned) from `src`: a converted directory, a
    training run directory, its `checkpoints/` directory or one step directory (newest step).

    With `dtype` (float32 or bfloat16) every tensor is written in it except router gates and
    correction biases, which stay float32 as transformers keeps them. Without, each tensor gets
    the dtype the converted checkpoint's source had (FP8 weights: the source's main dtype, as
    they are written dequantized), or for a training run the stored dtype. The optimizer state
    is ignored.
    """
    dst = os.path.abspath(os.fspath(dst))
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    max_shard = parse_size(shard_size)
    source = resolve(src)
    if isinstance(source, HFSource):
        raise CheckpointError(f"{source.path} is already a Hugging Face checkpoint")
    cfg = source.model
    store = ArrayStore(source.arrays_dir)
    check_arrays(source, store)
    plan = hf_tensors(cfg)
    by_name = {t.name: t for t in plan}
    meta = source.meta if isinstance(source, ConvertedSource) else {}

    def out_dtype(t) -> np.dtype:
        if dtype is not None:
            return np.dtype(np.float32) if is_fp32_leaf(t.parts[0].leaf) else DTYPES[dtype]
        if "source_dtype" in meta:  # as the converted checkpoint's source stored it
            exceptions = meta.get("source_dtype_exceptions") or {}
            return np.dtype(exceptions.get(t.name, meta["source_dtype"]))
        return store.dtype(store_key(t.parts[0].leaf))

    entries = [(t.name, out_dtype(t), t.shape) for t in plan]

    def produce(name: str) -> np.ndarray:
        t = by_name[name]
        pieces = [store.read(store_key(p.leaf), p.index) for p in t.parts]
        return to_hf(t, pieces, out_dtype(t))

    main_dtype = dtype or meta.get("source_dtype") or store.dtype(store_key("embed.table_VD")).name
    hf_config = dict(to_hf_config(cfg), torch_dtype=main_dtype)
    total = sum(_nbytes(shape, dt) for _, dt, shape in entries)
    with _staging(dst) as tmp:
        bar, step = _bar(len(entries), total, progress, "orbax-to-hf")
        with bar:
            write_streaming(tmp, entries, produce, max_shard, on_tensor=step)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
            f.write("\n")
        _copy_tokenizer(source.path, tmp)
    return dst


# -- command line -------------------------------------------------------------------------------


def _run(fn: Callable[[argparse.Namespace], str]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            out = fn(args)
        except (CheckpointError, ValueError, FileNotFoundError) as e:
            # ConfigError is a ValueError; the CLI prints all of these as usage errors.
            raise ConfigError(str(e)) from e
        print(f"wrote {out}")
        return 0

    return run


def add_convert_parser(subparsers) -> None:
    """`deepseek-jax convert hf-to-orbax|orbax-to-hf SRC DST ...`."""
    convert = subparsers.add_parser(
        "convert", help="convert checkpoints between Hugging Face and Orbax layouts"
    )
    sub = convert.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-orbax", help="HF safetensors directory -> converted Orbax directory")
    a.add_argument("src", metavar="SRC", help="HF checkpoint directory (config.json, safetensors)")
    a.add_argument("dst", metavar="DST", help="output directory (must not exist)")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("overrides", nargs="*", help="model key=value overrides to record")
    a.set_defaults(
        func=_run(
            lambda args: hf_to_orbax(
                args.src,
                args.dst,
                args.dtype,
                progress=not args.no_progress,
                overrides=args.overrides,
            )
        )
    )
    b = sub.add_parser("orbax-to-hf", help="converted directory or training run -> HF directory")
    b.add_argument("src", metavar="SRC", help="converted dir, run dir, checkpoints/ or a step dir")
    b.add_argument("dst", metavar="DST", help="output directory (must not exist)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    b.add_argument("--shard-size", default="5GB", help="max bytes per shard: 5GB, 500MB, ...")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(
        func=_run(
            lambda args: orbax_to_hf(
                args.src,
                args.dst,
                args.dtype,
                shard_size=args.shard_size,
                progress=not args.no_progress,
            )
        )
    )
