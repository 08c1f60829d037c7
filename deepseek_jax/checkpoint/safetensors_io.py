"""Pure-NumPy reader and writer for the safetensors format (no torch needed).

File layout: an unsigned 64-bit little-endian header length ``n``, then ``n`` bytes of UTF-8 JSON,
then the data buffer. The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets"}``,
with offsets ``[begin, end)`` relative to the start of the data buffer; an optional
``"__metadata__"`` entry maps strings to strings. All data is little-endian and C-ordered.

``SafetensorsFile.get`` returns read-only views on a memory map of the file, so opening a large
checkpoint reads only the headers; bytes are paged in when a tensor is actually used. Pages of a
memory map that were touched count toward the process's resident memory until it is dropped, so
converters that stream a whole checkpoint use ``read`` instead: a plain read into a fresh array.
``write_streaming`` writes shards tensor by tensor, never holding more than one tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

__all__ = [
    "DTYPES",
    "CheckpointReader",
    "SafetensorsFile",
    "write_safetensors",
    "write_sharded",
    "write_streaming",
]

# safetensors dtype name -> little-endian NumPy dtype.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_NAMES: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
_METADATA_KEY = "__metadata__"


class SafetensorsFile:
    """One ``.safetensors`` file. The header is parsed and validated on construction."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mmap: np.memmap | None = None
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._corrupt(f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > size:
                raise self._corrupt(f"header length {n} is not sane for a file of {size} bytes")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"header is not valid UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        self._data_start = 8 + n
        data_len = size - self._data_start

        metadata = header.pop(_METADATA_KEY, None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._corrupt(f"{_METADATA_KEY} must map strings to strings")
        self._metadata: dict[str, str] = metadata

        # name -> (dtype, shape, begin, end), offsets relative to the data buffer
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self._entries[name] = self._parse_entry(name, info, data_len)

    def _corrupt(self, what: str, tensor: str | None = None) -> ValueError:
        where = f"tensor {tensor!r} " if tensor is not None else ""
        return ValueError(f"corrupt safetensors file {self.path}: {where}{what}")

    def _parse_entry(self, name: str, info: object, data_len: int):
        if not isinstance(info, dict):
            raise self._corrupt("header entry is not an object", name)
        dtype_name = info.get("dtype")
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise self._corrupt(f"unknown dtype {dtype_name!r}", name)
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise self._corrupt(f"bad shape {shape!r}", name)
        offsets = info.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise self._corrupt(f"bad data_offsets {offsets!r}", name)
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise self._corrupt(
                f"data_offsets [{begin}, {end}] fall outside the {data_len}-byte data buffer "
                "(file truncated?)",
                name,
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise self._corrupt(
                f"data_offsets [{begin}, {end}] span {end - begin} bytes but shape {shape} "
                f"of {dtype_name} needs {nbytes}",
                name,
            )
        return dtype, tuple(shape), begin, end

    # -- queries ---------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._entries)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def get(self, name: str) -> np.ndarray:
        """A read-only array viewing the file's bytes (``np.array(x)`` for a writable copy)."""
        dtype, shape, begin, end = self._entry(name)
        if begin == end:  # zero-size tensor (mmap cannot map zero bytes)
            out = np.empty(shape, dtype)
            out.flags.writeable = False
            return out
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + begin
        return self._mmap[start : self._data_start + end].view(dtype).reshape(shape)

    def read(self, name: str) -> np.ndarray:
        """A fresh, writable copy of tensor ``name`` read with a plain file read (no memory map)."""
        dtype, shape, begin, end = self._entry(name)
        count = (end - begin) // dtype.itemsize
        out = np.fromfile(self.path, dtype=dtype, count=count, offset=self._data_start + begin)
        if out.size != count:
            raise self._corrupt(f"read {out.size} of {count} elements (file truncated?)", name)
        return out.reshape(shape)

    def read_slice(
        self, name: str, index: Sequence[slice], view: Sequence[int] | None = None
    ) -> np.ndarray:
        """A fresh array holding ``tensor.reshape(view)[index]`` (``index``: one slice of step 1
        per axis), read with plain file reads of at most ``READ_CHUNK_BYTES`` beyond the result,
        so memory stays near the size of the slice whatever the size of the tensor."""
        dtype, shape, begin, _ = self._entry(name)
        view = tuple(shape if view is None else view)
        if math.prod(view) != math.prod(shape):
            raise ValueError(f"tensor {name!r} of shape {list(shape)} cannot be viewed as {view}")
        bounds = _bounds(index, view)
        out = np.empty([b - a for a, b in bounds], dtype)
        if out.size:
            with open(self.path, "rb") as f:
                _read_region(f, self._data_start + begin, view, bounds, dtype, out)
        return out

    def close(self) -> None:
        """Drop this object's memory map; arrays already returned keep it alive."""
        self._mmap = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


READ_CHUNK_BYTES = 8 * 2**20  # largest plain read of a sliced tensor beyond the slice itself


def _bounds(index: Sequence[slice], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    if len(index) != len(shape):
        raise ValueError(f"slice {index} has {len(index)} axes for a view of shape {shape}")
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"slice {s} has step {step}; only contiguous slices are read")
        out.append((start, max(start, stop)))
    return out


def _read_region(f, offset: int, shape, bounds, dtype: np.dtype, out: np.ndarray) -> None:
    """Fill `out` with the C-ordered array of `shape` at file `offset`, cut to `bounds`.

    Rows (index along axis 0) are read in runs of at most READ_CHUNK_BYTES and cut on the other
    axes; a row larger than that is read by recursing into it."""
    row_items = math.prod(shape[1:])
    row_bytes = row_items * dtype.itemsize
    first, last = bounds[0]
    if len(shape) > 1 and row_bytes > READ_CHUNK_BYTES:
        for r in range(first, last):
            _read_region(f, offset + r * row_bytes, shape[1:], bounds[1:], dtype, out[r - first])
        return
    rest = tuple(slice(a, b) for a, b in bounds[1:])
    per_read = max(1, READ_CHUNK_BYTES // max(row_bytes, 1))
    for r0 in range(first, last, per_read):
        r1 = min(last, r0 + per_read)
        f.seek(offset + r0 * row_bytes)
        raw = f.read((r1 - r0) * row_bytes)
        if len(raw) != (r1 - r0) * row_bytes:
            raise ValueError(f"corrupt safetensors file {f.name}: short read (file truncated?)")
        rows = np.frombuffer(raw, dtype).reshape((r1 - r0, *shape[1:]))
        out[r0 - first : r1 - first] = rows[(slice(None), *rest)]


class CheckpointReader:
    """A Hugging Face checkpoint directory: ``model.safetensors`` or an indexed set of shards.

    A single ``model.safetensors`` is preferred when present (as transformers does); otherwise
    ``model.safetensors.index.json`` maps each tensor name to its shard. Shards are opened on
    first use and cached.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        single = os.path.join(self.directory, SINGLE_FILE)
        index = os.path.join(self.directory, INDEX_FILE)
        self._files: dict[str, SafetensorsFile] = {}
        if os.path.isfile(single):
            st = SafetensorsFile(single)
            self._files[SINGLE_FILE] = st
            self._weight_map = {name: SINGLE_FILE for name in st.keys()}
            self.metadata: dict = st.metadata()
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                try:
                    idx = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"checkpoint index {index} is not valid JSON ({e})") from None
            weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError(f"checkpoint index {index} has no 'weight_map' object")
            self._weight_map = dict(weight_map)
            self.metadata = dict(idx.get("metadata") or {})
            needed_by: dict[str, str] = {}
            for name, shard in self._weight_map.items():
                needed_by.setdefault(shard, name)
            for shard, name in sorted(needed_by.items()):
                if not os.path.isfile(os.path.join(self.directory, shard)):
                    raise FileNotFoundError(
                        f"checkpoint {self.directory}: shard {shard} listed in {INDEX_FILE} "
                        f"is missing (needed for tensor {name!r}, among others)"
                    )
        else:
            raise FileNotFoundError(
                f"checkpoint directory {self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}"
            )

    def _file_for(self, name: str) -> tuple[SafetensorsFile, str]:
        try:
            shard = self._weight_map[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.directory}") from None
        st = self._files.get(shard)
        if st is None:
            st = self._files[shard] = SafetensorsFile(os.path.join(self.directory, shard))
        if name not in st:
            raise ValueError(
                f"checkpoint {self.directory}: {INDEX_FILE} places tensor {name!r} in {shard}, "
                "but that shard does not contain it"
            )
        return st, shard

    def keys(self) -> list[str]:
        return sorted(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._weight_map)

    def shard_of(self, name: str) -> str:
        """File name (relative to the directory) that holds ``name``."""
        return self._file_for(name)[1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file_for(name)[0].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file_for(name)[0].dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._file_for(name)[0].get(name)

    def read(self, name: str) -> np.ndarray:
        """A fresh copy of ``name`` read without a memory map (see ``SafetensorsFile.read``)."""
        return self._file_for(name)[0].read(name)

    def read_slice(
        self, name: str, index: Sequence[slice], view: Sequence[int] | None = None
    ) -> np.ndarray:
        """``name`` viewed as ``view``, cut to ``index`` (see ``SafetensorsFile.read_slice``)."""
        return self._file_for(name)[0].read_slice(name, index, view)

    def close(self) -> None:
        for st in self._files.values():
            st.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({self.directory!r}, {len(self)} tensors)"


# -- writing ---------------------------------------------------------------------------------------


def _prepare(name: str, value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.byteorder == ">":  # safetensors data is little-endian
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype not in _NAMES:
        raise TypeError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors equivalent")
    return arr


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` as one safetensors file.

    ``metadata`` defaults to ``{"format": "pt"}``, which transformers expects. Header keys are
    sorted by name; the data is laid out by decreasing item size, then name, so every tensor
    starts at an offset aligned to its item size (the header is padded to a multiple of 8).
    """
    if metadata is None:
        metadata = {"format": "pt"}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    if _METADATA_KEY in tensors:
        raise ValueError(f"{_METADATA_KEY!r} is reserved and cannot be a tensor name")
    arrays = {name: _prepare(name, value) for name, value in tensors.items()}
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))

    header: dict[str, object] = {}
    if metadata:
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for name in order:
        arr = arrays[name]
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            arr = arrays[name]
            if arr.size:
                f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def write_sharded(
    directory: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write a checkpoint directory in the Hugging Face layout; returns the file names written.

    Tensors are packed in name order into shards of at most ``max_shard_bytes`` of tensor data
    (a tensor larger than that gets a shard of its own). One shard is written as
    ``model.safetensors``; several as ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json`` with ``metadata.total_size`` and the ``weight_map``.
    A stale ``model.safetensors`` or index left in ``directory`` from an earlier write of the
    other layout is removed, since readers would otherwise pick it up.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    arrays = {name: _prepare(name, value) for name, value in tensors.items()}

    groups: list[list[str]] = [[]]
    used = 0
    for name in sorted(arrays):
        nbytes = arrays[name].nbytes
        if groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes

    stale = os.path.join(directory, INDEX_FILE if len(groups) == 1 else SINGLE_FILE)
    if os.path.exists(stale):
        os.remove(stale)
    if len(groups) == 1:
        write_safetensors(os.path.join(directory, SINGLE_FILE), arrays, metadata)
        return [SINGLE_FILE]

    files = [_shard_name(i + 1, len(groups)) for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    for fname, names in zip(files, groups, strict=True):
        write_safetensors(os.path.join(directory, fname), {k: arrays[k] for k in names}, metadata)
        weight_map.update(dict.fromkeys(names, fname))
    index = {
        "metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return [*files, INDEX_FILE]


def write_streaming(
    directory: str | os.PathLike,
    entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> list[str]:
    """Write a sharded checkpoint one tensor at a time; returns the file names written.

    ``entries`` lists (name, dtype, shape) in the order to pack them into shards of at most
    ``max_shard_bytes`` (a larger tensor gets a shard of its own). Each shard's header is computed
    from the shapes before any data, then ``produce(name)`` is called once per tensor and its
    bytes appended to the open file, so memory holds one tensor at a time whatever the shard size.
    Always writes ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if metadata is None:
        metadata = {"format": "pt"}
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    sized = [(name, np.dtype(dt), tuple(shape)) for name, dt, shape in entries]
    for name, dt, _ in sized:
        if dt not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {dt} has no safetensors equivalent")
    groups: list[list[tuple[str, np.dtype, tuple[int, ...]]]] = [[]]
    used = 0
    for entry in sized:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(entry)
        used += nbytes

    files = [_shard_name(i + 1, len(groups)) for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    total = 0
    for fname, group in zip(files, groups, strict=True):
        # Larger items first keeps every tensor aligned to its item size (offsets are contiguous).
        group = sorted(group, key=lambda e: -e[1].itemsize)
        header: dict[str, object] = {_METADATA_KEY: dict(metadata)} if metadata else {}
        offset = 0
        for name, dt, shape in group:
            nbytes = math.prod(shape) * dt.itemsize
            header[name] = {
                "dtype": _NAMES[dt],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(directory, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, dt, shape in group:
                arr = _prepare(name, produce(name))
                if arr.dtype != dt or arr.shape != shape:
                    raise ValueError(
                        f"tensor {name!r}: produced {arr.dtype}{list(arr.shape)}, "
                        f"planned {dt}{list(shape)}"
                    )
                if arr.size:
                    f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
                if on_tensor is not None:
                    on_tensor(name, arr.nbytes)
                del arr
        weight_map.update(dict.fromkeys((e[0] for e in group), fname))
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return [*files, INDEX_FILE]
