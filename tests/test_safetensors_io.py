"""deepseek_jax.checkpoint.safetensors_io against the reference safetensors library."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepseek_jax.checkpoint.safetensors_io import (
    CheckpointReader,
    SafetensorsFile,
    write_safetensors,
    write_sharded,
)

TORCH_TO_NP = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.float8_e4m3fn: np.dtype(ml_dtypes.float8_e4m3fn),
    torch.float8_e5m2: np.dtype(ml_dtypes.float8_e5m2),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
}


def torch_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def np_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def torch_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 7, generator=g) * 3
    out = {
        f"float.{dt}".replace("torch.", ""): f.to(dt)
        for dt in (
            torch.float64,
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.float8_e4m3fn,
            torch.float8_e5m2,
        )
    }
    for dt in (torch.int64, torch.int32, torch.int16, torch.int8):
        name = f"int.{dt}".replace("torch.", "")
        out[name] = torch.randint(-100, 100, (3, 4), generator=g).to(dt)
    out["uint8"] = torch.randint(0, 256, (9,), generator=g).to(torch.uint8)
    out["bool"] = torch.rand(2, 3, generator=g) > 0.5
    out["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    out["empty"] = torch.zeros(0, 4)
    out["model.layers.0.mlp.weight"] = torch.randn(3, 130, generator=g).to(torch.float8_e4m3fn)
    return out


def numpy_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f64": rng.standard_normal((4, 3)),
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f16": rng.standard_normal(6).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, (3,)),
        "i32": rng.integers(-1000, 1000, (2, 2), dtype=np.int32),
        "i16": rng.integers(-1000, 1000, (5,), dtype=np.int16),
        "i8": rng.integers(-128, 128, (7,), dtype=np.int8),
        "u8": rng.integers(0, 256, (3, 1), dtype=np.uint8),
        "bool": rng.random((4,)) > 0.5,
        "scalar": np.array(3.0, dtype=np.float32),
        "empty": np.zeros((2, 0), np.int32),
    }


def mixed_numpy_tensors() -> dict[str, np.ndarray]:
    """numpy_tensors plus the ml_dtypes types the reference numpy writer cannot handle."""
    rng = np.random.default_rng(1)
    out = numpy_tensors()
    out["bf16"] = rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    out["fp8"] = (rng.standard_normal((129, 3)) * 50).astype(ml_dtypes.float8_e4m3fn)
    out["fp8_e5m2"] = rng.standard_normal((2, 2)).astype(ml_dtypes.float8_e5m2)
    out["fp8.weight_scale_inv"] = rng.random((2, 1)).astype(np.float32)
    return out


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert np_bytes(a) == np_bytes(b)


# -- reading files written by the reference library ---------------------------------------------


def test_read_torch_written_file(tmp_path):
    tensors = torch_tensors()
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "hi"})
    st = SafetensorsFile(path)
    assert st.keys() == sorted(tensors)
    assert st.metadata() == {"format": "pt", "note": "hi"}
    for name, t in tensors.items():
        a = st.get(name)
        assert st.shape(name) == tuple(t.shape) == a.shape
        assert st.dtype(name) == TORCH_TO_NP[t.dtype] == a.dtype
        assert np_bytes(a) == torch_bytes(t), name
    # Values, not just bytes, for the ml_dtypes types.
    np.testing.assert_array_equal(
        st.get("float.bfloat16").astype(np.float32), tensors["float.bfloat16"].float().numpy()
    )
    np.testing.assert_array_equal(
        st.get("float.float8_e4m3fn").astype(np.float32),
        tensors["float.float8_e4m3fn"].float().numpy(),
    )


def test_read_numpy_written_file(tmp_path):
    tensors = numpy_tensors()
    path = tmp_path / "n.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    st = SafetensorsFile(path)
    assert st.keys() == sorted(tensors)
    for name, a in tensors.items():
        assert_same(st.get(name), a)


def test_get_is_a_readonly_view_on_a_memmap(tmp_path):
    path = tmp_path / "n.safetensors"
    safetensors.numpy.save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(path))
    a = SafetensorsFile(path).get("w")
    assert not a.flags.owndata and not a.flags.writeable
    base = a
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    with pytest.raises(ValueError):
        a[0, 0] = 1.0


def test_missing_tensor_is_keyerror(tmp_path):
    path = tmp_path / "n.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(2, np.float32)}, str(path))
    with pytest.raises(KeyError, match="'nope'"):
        SafetensorsFile(path).get("nope")


# -- files we write, read by the reference library -----------------------------------------------


def test_written_file_loads_in_torch_bitwise(tmp_path):
    tensors = mixed_numpy_tensors()
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, tensors)
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for name, a in tensors.items():
        t = loaded[name]
        assert TORCH_TO_NP[t.dtype] == a.dtype, name
        assert tuple(t.shape) == a.shape, name
        assert torch_bytes(t) == np_bytes(a), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_written_file_layout(tmp_path):
    tensors = mixed_numpy_tensors()
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, tensors, metadata={"format": "np", "k": "v"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header.pop("__metadata__") == {"format": "np", "k": "v"}
    assert list(header) == sorted(header)
    spans = sorted(tuple(h["data_offsets"]) for h in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
        assert end == begin  # densely packed, as the reference reader requires
    for name, h in header.items():  # every tensor starts aligned to its item size
        assert (8 + n + h["data_offsets"][0]) % tensors[name].dtype.itemsize == 0
    st = SafetensorsFile(path)
    assert st.metadata() == {"format": "np", "k": "v"}
    for name, a in tensors.items():
        assert_same(st.get(name), a)


def test_writer_accepts_non_contiguous_and_big_endian(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {"t": base.T, "be": np.arange(5, dtype=">i4")}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors)
    loaded = load_file(str(path))
    np.testing.assert_array_equal(loaded["t"].numpy(), base.T)
    np.testing.assert_array_equal(loaded["be"].numpy(), np.arange(5))
    assert loaded["be"].dtype == torch.int32


def test_writer_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(TypeError, match="'c'"):
        write_safetensors(tmp_path / "x.safetensors", {"c": np.zeros(2, np.complex64)})


# -- sharded checkpoints --------------------------------------------------------------------------


def test_sharded_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {
        f"model.layers.{i}.w": rng.standard_normal((16, 16)).astype(np.float32) for i in range(5)
    }
    tensors["model.embed_tokens.weight"] = rng.standard_normal((64, 16)).astype(ml_dtypes.bfloat16)
    tensors["big"] = np.zeros((40, 40), np.float32)  # larger than a shard: gets its own
    files = write_sharded(tmp_path, tensors, max_shard_bytes=2 * 16 * 16 * 4)
    shards = [f for f in files if f.endswith(".safetensors")]
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "model.safetensors").exists()

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        size = sum(tensors[k].nbytes for k, v in index["weight_map"].items() if v == shard)
        keys = [k for k, v in index["weight_map"].items() if v == shard]
        assert size <= 2 * 16 * 16 * 4 or keys == ["big"]
        assert sorted(load_file(str(tmp_path / shard))) == sorted(keys)

    ckpt = CheckpointReader(tmp_path)
    assert ckpt.keys() == sorted(tensors)
    assert "big" in ckpt and "nope" not in ckpt
    for name, a in tensors.items():
        assert ckpt.shape(name) == a.shape
        assert ckpt.dtype(name) == a.dtype
        assert_same(ckpt.get(name), a)
        assert ckpt.shard_of(name) == index["weight_map"][name]
    with pytest.raises(KeyError, match="'nope'"):
        ckpt.get("nope")


def test_sharded_single_file_when_it_fits(tmp_path):
    tensors = numpy_tensors()
    assert write_sharded(tmp_path, tensors, max_shard_bytes=1 << 20) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    ckpt = CheckpointReader(tmp_path)
    assert ckpt.keys() == sorted(tensors)
    for name, a in tensors.items():
        assert_same(ckpt.get(name), a)


def test_rewrite_in_other_layout_removes_stale_file(tmp_path):
    small = {"a": np.zeros(4, np.float32)}
    big = {f"w{i}": np.full((8, 8), i, np.float32) for i in range(3)}
    write_sharded(tmp_path, small, max_shard_bytes=1 << 20)
    write_sharded(tmp_path, big, max_shard_bytes=8 * 8 * 4)
    assert not (tmp_path / "model.safetensors").exists()
    assert CheckpointReader(tmp_path).keys() == sorted(big)
    write_sharded(tmp_path, small, max_shard_bytes=1 << 20)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert CheckpointReader(tmp_path).keys() == ["a"]


def test_reader_on_torch_written_shards(tmp_path):
    """An index + shards written by the reference library (as a hub checkpoint would be)."""
    tensors = torch_tensors()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[:6], names[6:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    ckpt = CheckpointReader(tmp_path)
    for name, t in tensors.items():
        a = ckpt.get(name)
        assert a.dtype == TORCH_TO_NP[t.dtype] and a.shape == tuple(t.shape)
        assert np_bytes(a) == torch_bytes(t)


# -- errors ---------------------------------------------------------------------------------------


def test_missing_shard_names_shard_and_tensor(tmp_path):
    tensors = {f"w{i}": np.full((8, 8), i, np.float32) for i in range(4)}
    write_sharded(tmp_path, tensors, max_shard_bytes=8 * 8 * 4)
    (tmp_path / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00003-of-00004\.safetensors.*'w2'"):
        CheckpointReader(tmp_path)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointReader(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json"):
        CheckpointReader(tmp_path)


def test_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"a": np.zeros(4, np.float32), "z": np.ones((8, 8), np.float32)})
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"corrupt safetensors file .*t\.safetensors: tensor 'z'"):
        SafetensorsFile(path)
    path.write_bytes(raw[:5])
    with pytest.raises(ValueError, match="corrupt safetensors file"):
        SafetensorsFile(path)


def test_garbage_header(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"\xff\x00not json at all" + b"\0" * 32)
    with pytest.raises(ValueError, match=r"corrupt safetensors file .*g\.safetensors: header"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="corrupt safetensors file .*header length"):
        SafetensorsFile(path)


def _write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_inconsistent_header_entries(tmp_path):
    path = tmp_path / "h.safetensors"
    _write_raw(path, {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, bytes(24))
    with pytest.raises(ValueError, match="tensor 'w'.*needs 24"):
        SafetensorsFile(path)
    _write_raw(path, {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(ValueError, match="tensor 'w'.*unknown dtype"):
        SafetensorsFile(path)
    _write_raw(path, {"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, bytes(1))
    with pytest.raises(ValueError, match="tensor 'w'.*bad shape"):
        SafetensorsFile(path)
