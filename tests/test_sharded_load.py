"""Loading onto shards (issue 10 item 5): every parameter is built with make_array_from_callback
from the safetensors slices its devices hold, FP8 dequantized per slice; the result equals a
one-device load, and the host memory a load needs beyond the loaded weights stays within the
largest slice plus a fixed margin (peak resident memory, VmHWM, of a subprocess with 8 CPU
devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx
from hf_models import FP8_BLOCK, MEMORY_V3, V3_BASE

import deepseek_jax
from deepseek_jax import sharding
from deepseek_jax.checkpoint.fp8 import dequantize_fp8_block, quantize_fp8_block
from deepseek_jax.checkpoint.mapping import hf_tensors
from deepseek_jax.config import MeshConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_hf(directory, config: dict, fp8: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A random checkpoint in the official layout, written with the `safetensors` library (one
    file per ~30 MiB); FP8 weights as in the V3 release when `fp8`. Returns the tensors as a
    reader should see them (FP8 weights dequantized)."""
    from safetensors.numpy import save_file

    cfg = deepseek_jax.from_hf_config(config)
    rng = np.random.default_rng(seed)
    os.makedirs(directory)
    seen, shard, size, weight_map, n = {}, {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, n = {}, 0, n + 1

    for t in hf_tensors(cfg):
        value = (rng.standard_normal(t.shape) * 0.05).astype(np.float32)
        is_linear = t.name.endswith("proj.weight") and len(t.shape) == 2
        if fp8 and is_linear:
            q, scale = quantize_fp8_block(value, FP8_BLOCK)
            shard[t.name], shard[f"{t.name}_scale_inv"] = q, scale
            seen[t.name] = dequantize_fp8_block(q, scale, FP8_BLOCK)
        else:
            shard[t.name] = seen[t.name] = value
        size += value.nbytes
        if size > 30 * 2**20:
            flush()
    flush()
    index = {"metadata": {}, "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    if fp8:
        config = dict(
            config,
            quantization_config=dict(
                quant_method="fp8", fmt="e4m3", weight_block_size=list(FP8_BLOCK)
            ),
        )
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return seen


def _leaves(model) -> dict[str, np.ndarray]:
    state = nnx.to_pure_dict(nnx.state(model))
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(state)
    }


def test_fp8_sharded_load_equals_one_device_load(tmp_path):
    """FP8 weights (32x32 blocks) cut by fsdp=8 slices that start inside blocks: every
    parameter equals the one-device load bitwise, and the one-device load equals a checkpoint
    holding the dequantized weights in fp32."""
    config = dict(V3_BASE, num_hidden_layers=3)
    dequantized = _write_hf(tmp_path / "fp8", config, fp8=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    from deepseek_jax.checkpoint.safetensors_io import write_safetensors

    write_safetensors(plain / "model.safetensors", dequantized)
    (plain / "config.json").write_text(json.dumps(config))

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=8, expert=1), jax.devices()[:8])
    sh = sharding.Sharding(mesh, sharding.rules_for("fsdp"))
    sharded = deepseek_jax.load(tmp_path / "fp8", mesh_sharding=sh)
    gate = sharded.moe_layers.ffn.gate_EDF[...]
    assert len({str(s.index) for s in gate.addressable_shards}) == 8  # really split 8 ways
    one = _leaves(deepseek_jax.load(tmp_path / "fp8"))
    reference = _leaves(deepseek_jax.load(plain))
    got = _leaves(sharded)
    assert got.keys() == one.keys() == reference.keys()
    for key in one:
        np.testing.assert_array_equal(got[key], one[key], err_msg=key)
        np.testing.assert_array_equal(one[key], reference[key], err_msg=key)


MEM_CONFIG = MEMORY_V3
MARGIN = 48 * 2**20  # fixed allowance: XLA's CPU client, tracing the abstract model, the allocator

MEASURE = r"""
import json, sys
import jax, numpy as np
from flax import nnx
import deepseek_jax
from deepseek_jax import sharding
from deepseek_jax.config import MeshConfig

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

# The package loads its exports on first use: import what `load` runs before the baseline, so
# that module imports do not count as the load's memory.
for name in deepseek_jax.__all__:
    getattr(deepseek_jax, name)

path, out, mesh_kind = sys.argv[1], sys.argv[2], sys.argv[3]
sh = None
if mesh_kind != "none":
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=4), jax.devices())
    sh = sharding.Sharding(mesh, sharding.rules_for("ep"))
tokens = np.random.default_rng(0).integers(0, 4096, size=(2, 16)).astype(np.int32)
base = status("VmRSS:")
model = deepseek_jax.load(path, mesh_sharding=sh)
arrays = jax.tree.leaves(nnx.state(model))
jax.block_until_ready(arrays)
# The high-water mark of this process's own memory. (ru_maxrss would not do: Linux carries
# it over exec from the forked parent, here the much larger pytest process.)
peak = status("VmHWM:")
resident = sum(s.data.nbytes for a in arrays for s in a.addressable_shards)
largest = max(s.data.nbytes for a in arrays for s in a.addressable_shards)
np.save(out, np.asarray(model(tokens)))
print(json.dumps(dict(base=base, peak=peak, resident=resident, largest_slice=largest)))
"""


def test_sharded_load_memory_is_bounded_by_a_slice(tmp_path):
    tensors = _write_hf(tmp_path / "hf", MEM_CONFIG, fp8=False)
    largest = max(v.nbytes for v in tensors.values())
    total = sum(v.nbytes for v in tensors.values())
    assert largest == 8 * 2**20 and total > 150 * 2**20
    del tensors
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    figures = {}
    for kind in ("mesh", "none"):
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(tmp_path / "hf"), str(tmp_path / kind), kind],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        figures[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 2**20
    for kind, f in figures.items():
        grew = f["peak"] - f["base"]
        print(
            f"\n[sharded load] {kind}: checkpoint {total / mib:.0f} MiB (largest tensor "
            f"{largest / mib:.0f} MiB), on devices {f['resident'] / mib:.0f} MiB, largest slice "
            f"{f['largest_slice'] / mib:.1f} MiB; RSS before {f['base'] / mib:.0f} MiB, peak "
            f"{f['peak'] / mib:.0f} MiB: grew {grew / mib:.0f} MiB = weights + "
            f"{(grew - f['resident']) / mib:.0f} MiB (bound: slice + {MARGIN / mib:.0f} MiB)"
        )
    mesh = figures["mesh"]
    # On CPU the devices' memory is host memory: the loaded weights themselves are resident.
    # What the load needs beyond them is bounded by one slice plus a fixed margin (a load that
    # assembled whole tensors or the model on the host first would exceed it).
    assert mesh["peak"] - mesh["base"] <= mesh["resident"] + mesh["largest_slice"] + MARGIN
    assert mesh["largest_slice"] < largest  # slices, not whole stacked leaves
    np.testing.assert_allclose(
        np.load(tmp_path / "mesh.npy"), np.load(tmp_path / "none.npy"), atol=1e-5, rtol=0
    )
