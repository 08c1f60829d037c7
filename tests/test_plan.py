"""`deepseek-jax plan`: real TPU compiles (libtpu compile-only devices) of small programs."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

pytest.importorskip("libtpu", reason='plan needs libtpu: pip install -e ".[tpu-aot]"')

from deepseek_jax import sharding  # noqa: E402
from deepseek_jax.cli import main  # noqa: E402
from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.plan import format_result, parse_topology, plan  # noqa: E402
from deepseek_jax.plan.hlo import summarize  # noqa: E402
from deepseek_jax.train.step import Trainer  # noqa: E402

# Megablox gmm (the TPU default) needs 128-multiples; tiny's 64-wide experts take ragged_dot.
GMM = "runtime.grouped_matmul=ragged_dot"
# Small enough to compile in seconds: one dense and one MoE layer, no MTP, 8 x 64 tokens.
TINY = [
    GMM,
    "model.num_layers=2",
    "model.mtp.depth=0",
    "train.batch_size=8",
    "train.seq_len=64",
    "mesh.fsdp=2",
    "mesh.expert=2",
]

_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def _printed(text: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s+([\d.]+) (B|KiB|MiB|GiB|TiB)", text)
    assert m, f"{label!r} not in:\n{text}"
    return float(m.group(1)) * _UNITS[m.group(2)]


def _independent_memory(overrides: list[str]):
    """Compile the Trainer's step here, without the plan package, and read memory_analysis."""
    from jax.experimental import mesh_utils

    cfg = load_config("tiny", overrides)
    devices = parse_topology("v5p-8").devices()
    sizes = cfg.mesh.resolve(len(devices))
    grid = mesh_utils.create_device_mesh(tuple(sizes[a] for a in sharding.MESH_AXES), devices)
    mesh = jax.sharding.Mesh(grid, sharding.MESH_AXES)
    trainer = Trainer.create(cfg, sharding.Sharding(mesh, sharding.rules_for(cfg.mesh.rules)))
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(trainer.init),
        trainer.state_shardings,
    )
    b, t = cfg.train.batch_size, cfg.train.seq_len
    batch = {
        k: jax.ShapeDtypeStruct((b, t), dt, sharding=trainer.batch_sharding)
        for k, dt in (("tokens", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32))
    }
    return trainer.jitted_step().lower(state, batch).compile().memory_analysis()


def test_plan_tiny_memory_is_the_executables():
    result = plan("tiny", "v5p-8", TINY, memory_report=10)
    assert result.fits and result.chips == 4 and result.chip == "v5p"
    assert result.mesh == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}
    text = format_result(result)
    ma = _independent_memory(TINY)
    for label, key in (
        ("arguments (memory_analysis)", "argument_size_in_bytes"),
        ("outputs", "output_size_in_bytes"),
        ("temporaries", "temp_size_in_bytes"),
    ):
        assert result.memory[key] == getattr(ma, key), key
        assert _printed(text, label) == pytest.approx(getattr(ma, key), rel=0.01), label
    total = (
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        - ma.alias_size_in_bytes
        + ma.temp_size_in_bytes
    )
    assert _printed(text, "total = args + out - alias + temp") == pytest.approx(total, rel=0.01)
    # The compiler's own HBM limit for v5p (read from an out-of-memory error) is about 95.7 GiB.
    assert 90 * 2**30 < result.hbm_compiler_bytes < 100 * 2**30
    # Parameters per chip from the shardings: fp32, split 4 ways at most, 2 ways at least.
    cfg = load_config("tiny", TINY)
    from deepseek_jax.model.stats import param_counts

    n = param_counts(cfg.model)["total"]
    assert 4 * n / 4 <= result.state_bytes["params"] <= 4 * n / 2
    assert result.state_bytes["opt_state"] >= 2 * result.state_bytes["params"]  # Adam mu, nu
    # A fitting plan has a roofline, collectives over the 2-way axes and the scan's trip count.
    assert result.roofline is not None and result.roofline.step_s > 0
    assert result.collectives["all-gather"]["traffic_bytes"] > 0
    assert all(t == 1 for _, t in result.loops)  # one dense and one MoE layer: scans of 1
    # expert 2: the all-gather dispatch gathers tokens and routing inside moe's shard_map.
    assert result.moe_layers == 1
    assert 0 < result.dispatch["all-gather"]["traffic_bytes"]
    assert (
        result.dispatch["all-gather"]["traffic_bytes"]
        <= (result.collectives["all-gather"]["traffic_bytes"])
    )
    assert "per MoE layer (1 layers)" in text
    assert "fits: yes" in text
    # --memory-report: the temporaries' largest slots from XLA's own buffer assignment.
    report = result.memory_report
    assert len(report) == 10 and "largest slots of the temporaries" in text
    assert [r["bytes"] for r in report] == sorted((r["bytes"] for r in report), reverse=True)
    assert 0 < sum(r["bytes"] for r in report) <= result.memory["temp_size_in_bytes"]
    assert all(re.search(r"(bf16|f32|s32|u32|pred)\[", r["shapes"]) for r in report)


def test_memory_report_reads_the_biggest_hbm_allocation(tmp_path):
    """XLA's memory-usage report: HBM ("default") allocations only, the biggest one, by size."""
    (tmp_path / "module_0001.jit_step.after_optimizations-memory-usage-report.txt").write_text(
        """Memory Space: default (color=0)
Total bytes: 3221225472 (3.00GiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    1.00GiB( 50%);    1.00GiB;            0;                2; f32[32,7168,2048], bf16[4,8]
    2.00GiB(100%);    1.00GiB;   1073741824;                1; bf16[32,7168,2048]
    2.00GiB(100%);   512.0KiB;   2147483648;                3; 3×f32[128]
  The rest 9 values are less than 5% of the total size and not shown.

  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    1.00GiB(100%);    1.00GiB;            0;                1; f32[129280,2048]

Memory Space: vmem (color=1)
Total bytes: 8589934592 (8.00GiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    8.00GiB(100%);    8.00GiB;            0;                1; f32[1024,1024,2048]
"""
    )
    from deepseek_jax.plan.compile import read_memory_report

    rows = read_memory_report(str(tmp_path), 2)
    assert rows == [
        {"bytes": 2.0**30, "values": 2, "shapes": "f32[32,7168,2048], bf16[4,8]"},
        {"bytes": 2.0**30, "values": 1, "shapes": "bf16[32,7168,2048]"},
    ]
    assert len(read_memory_report(str(tmp_path), 10)) == 3
    assert read_memory_report(str(tmp_path / "missing"), 10) == []


def test_collective_parser_on_a_hand_made_program():
    """Known sizes: an all-gather of 8 KiB pieces over 4 devices in a 5-step loop, and a psum."""
    devices = parse_topology("v5p-8").devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("x",))
    spec = PartitionSpec("x")

    def body(w_lrc):
        def step(acc, w_rc):  # w_rc: this device's [64, 32] f32 piece = 8 KiB
            full = jax.lax.all_gather(w_rc, "x", tiled=True)  # [256, 32]
            return acc + full.sum(), None

        acc, _ = jax.lax.scan(step, 0.0 * w_lrc[0, 0, 0], w_lrc)  # a per-device carry
        return jax.lax.psum(acc, "x")[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(None, "x"), out_specs=spec))
    w = jax.ShapeDtypeStruct(
        (5, 256, 32), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "x"))
    )
    hlo = f.lower(w).compile().as_text()
    s = summarize(hlo, 4)
    gather = s.collectives["all-gather"]
    assert gather.executions == 5
    assert gather.buffer_bytes == 5 * 64 * 32 * 4
    assert gather.traffic_bytes == 5 * 3 * 64 * 32 * 4  # each device receives 3 pieces
    reduce = s.collectives["all-reduce"]
    assert reduce.executions >= 1
    assert reduce.traffic_bytes == pytest.approx(reduce.buffer_bytes * 2 * 3 / 4)
    assert (None not in [t for _, t in s.loops]) and 5 in [t for _, t in s.loops]
    # A Pallas kernel's attributes span lines (splash attention's kernel_metadata JSON), and the
    # continuation starts with "}}": before the ENTRY's loop it once hid the rest of the ENTRY.
    lines = hlo.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("ENTRY")) + 1
    lines[at:at] = [
        '  %kernel = f32[8]{0} custom-call(), custom_call_target="tpu_custom_call", '
        "frontend_attributes={kernel_metadata={",
        '"xprof_metadata":"{\\"block_q\\": 256}"',
        '}}, metadata={op_name="jit(f)/attention/pallas_call"}',
    ]
    spliced = summarize("\n".join(lines), 4)
    assert spliced.loops == s.loops
    assert spliced.collectives == s.collectives
    assert spliced.hbm_bytes == s.hbm_bytes + 8 * 4  # the kernel writes its f32[8] result


def test_plan_cli_does_not_fit_exits_nonzero_with_json(capsys):
    # A 50M-token vocabulary: 50M x 128 fp32 embedding and head, with Adam, on one 16 GB v5e chip.
    code = main(
        [
            "plan",
            "tiny",
            "--topology",
            "v5e-1",
            "model.vocab_size=50000000",
            GMM,
            "model.num_layers=2",
            "model.mtp.depth=0",
            "train.batch_size=1",
            "train.seq_len=16",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert "does not fit" in err
    (result,) = json.loads(out)
    assert result["fits"] is False and result["chips"] == 1
    assert "RESOURCE_EXHAUSTED" in result["error"] or "memory" in result["error"].lower()
    assert result["compiler_required_bytes"] > result["hbm_compiler_bytes"]
    # The state alone (fp32 params + 2 Adam moments of two 50M x 128 tables) is ~143 GiB.
    state = result["state_bytes"]["params"] + result["state_bytes"]["opt_state"]
    assert state > 3 * 2 * 50_000_000 * 128 * 4 * 0.99


def test_topology_names():
    t = parse_topology("v5p-512")
    assert (t.chips, t.libtpu_name) == (256, "v5p:4x8x8")
    assert parse_topology("v4-128").chips == 64
    assert parse_topology("v5e-256").chips == 256
    assert parse_topology("v6e-8").libtpu_name == "v6e:2x4"
    assert parse_topology("v5p:8x8x4").chips == 256
    with pytest.raises(ValueError, match="N must be even"):
        parse_topology("v5p-7")
    with pytest.raises(ValueError, match="expected e.g."):
        parse_topology("a100-8")


def test_sweep_candidates_cover_meshes_rules_and_remat():
    from deepseek_jax.plan.run import remat_key, sweep_candidates

    cfg = load_config("deepseek-v3-671b")
    got = sweep_candidates(cfg, 256)
    key = remat_key(cfg)
    meshes = {tuple(o for o in c if o.startswith("mesh.") and "rules" not in o) for c in got}
    assert meshes == {
        ("mesh.data=1", "mesh.fsdp=256", "mesh.expert=1"),
        ("mesh.data=1", "mesh.fsdp=32", "mesh.expert=8"),
        ("mesh.data=1", "mesh.fsdp=4", "mesh.expert=64"),
    }
    assert ["mesh.rules=fsdp"] == sorted(
        {o for c in got if "mesh.expert=1" in c for o in c if "rules" in o}
    )
    assert {f"{key}=full", f"{key}=none"} <= {o for c in got for o in c if o.startswith(key)}
    mine = sweep_candidates(cfg, 256, meshes=["fsdp=4,expert=64"], rules=["ep"], remats=["full"])
    assert mine == [["mesh.fsdp=4", "mesh.expert=64", "mesh.rules=ep", f"{key}=full"]]


def test_offload_layer_input_moves_the_layer_scan_residuals_to_host():
    """runtime.remat=offload_layer_input: the stacked block inputs the layer scan keeps for the
    backward live in pinned host memory, not HBM (full remat keeps them on device)."""
    shape = ["model.num_layers=4", "train.seq_len=256"]
    full = plan("tiny", "v5p-8", [*TINY, *shape, "runtime.remat=full"])
    off = plan("tiny", "v5p-8", [*TINY, *shape, "runtime.remat=offload_layer_input"])
    assert full.fits and off.fits
    assert full.memory["host_temp_size_in_bytes"] == 0
    cfg = load_config("tiny")
    moe_layers = 4 - cfg.model.moe.first_k_dense_replace
    # batch 8 over fsdp 2 x expert 2: 2 rows x 256 tokens x hidden, bf16, per MoE layer.
    per_layer = 2 * 256 * cfg.model.hidden_size * 2
    assert off.memory["host_temp_size_in_bytes"] >= moe_layers * per_layer
    printed = _printed(format_result(off), "host temporaries (pinned host)")
    assert printed == pytest.approx(off.memory["host_temp_size_in_bytes"], rel=0.01)
    assert "host temporaries" not in format_result(full)


def test_plan_generate_holds_the_latent_cache_in_bf16(capsys):
    """Decode: weights and cache in the compute dtype, rows split over the 4 chips."""
    args = ["plan", "tiny", "--topology", "v5e-4", "--generate", "--batch", "8"]
    code = main([*args, "--context", "512", "model.num_layers=2", GMM, "--json"])
    (r,) = json.loads(capsys.readouterr().out)
    assert code == 0 and r["fits"] and r["mode"] == "generate"
    cfg = load_config("tiny")
    m = cfg.model.mla
    # 2 layers x 2 rows x 512 slots x (d_c + d_r) bf16, plus 2 int32 row lengths.
    per_chip_cache = 2 * (8 // 4) * 512 * (m.kv_lora_rank + m.qk_rope_head_dim) * 2 + 2 * 4
    assert r["state_bytes"]["cache"] == per_chip_cache
    assert r["memory"]["argument_size_in_bytes"] >= r["state_bytes"]["params"] + per_chip_cache
    assert r["roofline"]["tokens_per_chip"] == 2


@pytest.mark.parametrize("kernel", ["ragged_dot", "megablox", "splash"])
def test_tpu_kernels_compile_with_bf16_operands_at_highest_precision(kernel):
    """Test modules that set jax_default_matmul_precision="highest" must not break TPU compiles.

    Mosaic (the Pallas kernels, and XLA:TPU's own ragged_dot kernel) rejects an fp32 contract
    precision on bf16 operands ("Bad lhs type"); the kernels trace at "default" for bf16, forward
    and backward (a custom VJP's backward is traced outside the caller's `with` block).
    """
    from deepseek_jax.ops.attention import attention
    from deepseek_jax.ops.grouped_matmul import grouped_matmul
    from deepseek_jax.runtime import Runtime

    dev = parse_topology("v5p-8").devices()[0]
    one = jax.sharding.SingleDeviceSharding(dev)

    def spec(*shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=one)

    if kernel == "splash":
        rt = Runtime.of(attention="splash")
        args = (spec(2, 256, 4, 192), spec(2, 256, 4, 192), spec(2, 256, 4, 128))

        def loss(q, k, v):
            out = attention(q, k, v, segment_ids_bt=None, scale=0.1, rt=rt, interpret=False)
            return out.astype(jnp.float32).sum()
    else:
        args = (spec(512, 256), spec(4, 256, 256), spec(4, dtype=jnp.int32))

        def loss(x, w, g):
            out = grouped_matmul(x, w, g, impl=kernel, platform="tpu")
            return out.astype(jnp.float32).sum()

    with jax.default_matmul_precision("highest"):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    assert compiled.memory_analysis().temp_size_in_bytes >= 0
