"""Checkpoint conversion: HF <-> Orbax round trips are bitwise, converted checkpoints and training
runs load with logits equal to transformers, errors name the problem and leave nothing behind,
and memory stays bounded by the largest tensor, not the model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from hf_models import (
    FP8_BLOCK,
    MEMORY_V3,
    TOL,
    V2_BASE,
    V3_BASE,
    hf_logits,
    is_fp8_weight,
    mtp_tensors,
    our_logits,
    random_tokens,
    randomize,
)
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

import deepseek_jax
from deepseek_jax.checkpoint import CheckpointError
from deepseek_jax.checkpoint.convert import hf_to_orbax, orbax_to_hf, parse_size
from deepseek_jax.checkpoint.fp8 import dequantize_fp8_block, quantize_fp8_block
from deepseek_jax.checkpoint.mapping import leaf_specs
from deepseek_jax.checkpoint.safetensors_io import (
    INDEX_FILE,
    CheckpointReader,
    write_safetensors,
    write_sharded,
    write_streaming,
)
from deepseek_jax.cli import main
from deepseek_jax.config import load_config

LAYERS = 3  # layers 0-1 dense, layer 2 MoE, MTP layer 3 MoE


def _tensors(path) -> dict[str, np.ndarray]:
    with CheckpointReader(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}


def _hf_source(tmp, name, config_cls, model_cls, base, dtype=None, mtp=True):
    """A transformers model saved in the official layout, plus an MTP layer when `mtp`. With
    `dtype` bfloat16 every tensor is bf16 except the V3 correction biases (as in the release)."""
    torch.manual_seed(0)
    kwargs = dict(base, num_hidden_layers=LAYERS)
    model = model_cls(config_cls(**kwargs)).eval()
    randomize(model, seed=1)
    saved = tmp / f"{name}_saved"
    model.save_pretrained(saved)
    tensors = _tensors(saved)
    config = json.loads((saved / "config.json").read_text())
    if mtp:
        tensors.update(mtp_tensors(config, tensors, np.random.default_rng(3)))
        config["num_nextn_predict_layers"] = 1
    if dtype == "bfloat16":
        tensors = {
            k: v if k.endswith("e_score_correction_bias") else v.astype(ml_dtypes.bfloat16)
            for k, v in tensors.items()
        }
    src = tmp / name
    write_sharded(src, tensors, max_shard_bytes=150_000)
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    return src, model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sources")
    v3 = (DeepseekV3Config, DeepseekV3ForCausalLM, V3_BASE)
    v2 = (DeepseekV2Config, DeepseekV2ForCausalLM, V2_BASE)
    return {
        "v3_fp32_mtp": _hf_source(tmp, "v3_fp32_mtp", *v3),
        "v3_bf16_mtp": _hf_source(tmp, "v3_bf16_mtp", *v3, dtype="bfloat16"),
        "v2_fp32": _hf_source(tmp, "v2_fp32", *v2, mtp=False),
    }


@pytest.mark.parametrize("case", ["v3_fp32_mtp", "v3_bf16_mtp", "v2_fp32"])
def test_round_trip_is_bitwise(sources, case, tmp_path):
    src, _ = sources[case]
    dtype = "bfloat16" if "bf16" in case else "float32"
    conv = hf_to_orbax(src, tmp_path / "orbax", dtype=dtype, progress=False)
    back = orbax_to_hf(conv, tmp_path / "hf", shard_size="200KB", progress=False)
    assert os.path.exists(os.path.join(back, INDEX_FILE))
    assert os.path.exists(os.path.join(back, "tokenizer.json"))
    before, after = _tensors(src), _tensors(back)
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        got = after[name]
        assert (got.dtype, got.shape) == (value.dtype, value.shape), name
        assert got.tobytes() == value.tobytes(), name
    n_mtp = sum(k.startswith(f"model.layers.{LAYERS}.") for k in after)
    print(f"\n[convert] {case}: {len(after)} tensors bitwise equal ({n_mtp} in the MTP layer)")
    if case.startswith("v3"):
        assert n_mtp > 0
        bias = before[f"model.layers.{LAYERS - 1}.mlp.gate.e_score_correction_bias"]
        assert np.abs(bias).max() > 0


@pytest.fixture(scope="module")
def converted_v3(sources, tmp_path_factory):
    src, model = sources["v3_fp32_mtp"]
    return hf_to_orbax(src, tmp_path_factory.mktemp("conv") / "v3", progress=False), model


def test_converted_layout_restores_with_orbax(converted_v3):
    conv, _ = converted_v3
    meta = json.loads(open(os.path.join(conv, "deepseek_jax.json")).read())
    assert meta["layout"]["stacks"] == {"dense_layers": [0, 1], "moe_layers": [2], "mtp": [3]}
    cfg = deepseek_jax.from_hf_config(os.path.join(meta["source"]["path"], "config.json"))
    specs = leaf_specs(cfg)
    abstract: dict = {"params": {}, "router_bias": {}}
    for leaf, spec in specs.items():
        group = "router_bias" if leaf.endswith("router_bias_E") else "params"
        node = abstract[group]
        *head, last = leaf.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = jax.ShapeDtypeStruct(spec.shape, spec.dtype)
    restored = ocp.StandardCheckpointer().restore(os.path.join(conv, "params"), abstract)
    gate = np.asarray(restored["params"]["moe_layers"]["ffn"]["gate_EDF"])
    with CheckpointReader(meta["source"]["path"]) as reader:
        expert = reader.read("model.layers.2.mlp.experts.5.gate_proj.weight")
        bias = reader.read("model.layers.3.mlp.gate.e_score_correction_bias")
    np.testing.assert_array_equal(gate[0, 5], expert.T)
    mtp_bias = restored["router_bias"]["mtp"]["block"]["ffn"]["router_bias_E"][0]
    np.testing.assert_array_equal(mtp_bias, bias)


def test_converted_checkpoint_logits_match_transformers(converted_v3, sources, tmp_path):
    conv, model = converted_v3
    tokens = random_tokens()
    ours = deepseek_jax.load(conv)
    assert ours.cfg.mtp.depth == 1
    err = float(np.abs(our_logits(ours, tokens) - hf_logits(model, tokens)).max())
    v2_src, v2_model = sources["v2_fp32"]
    v2_conv = hf_to_orbax(v2_src, tmp_path / "v2", progress=False)
    err_v2 = float(
        np.abs(our_logits(deepseek_jax.load(v2_conv), tokens) - hf_logits(v2_model, tokens)).max()
    )
    print(f"\n[convert] converted V3 (MTP) vs transformers: {err:.2e}; V2: {err_v2:.2e}")
    assert err <= TOL and err_v2 <= TOL


def test_fp8_source(sources, tmp_path):
    src, _ = sources["v3_fp32_mtp"]
    tensors = _tensors(src)
    quantized, dequantized = {}, {}
    for name, value in tensors.items():
        if is_fp8_weight(name):
            q, scale = quantize_fp8_block(value, FP8_BLOCK)
            quantized[name], quantized[f"{name}_scale_inv"] = q, scale
            dequantized[name] = dequantize_fp8_block(q, scale, FP8_BLOCK)
        else:
            quantized[name] = dequantized[name] = value
    config = json.loads((src / "config.json").read_text())
    fp8 = tmp_path / "fp8"
    write_sharded(fp8, quantized, max_shard_bytes=100_000)
    quant = dict(quant_method="fp8", fmt="e4m3", weight_block_size=list(FP8_BLOCK))
    (fp8 / "config.json").write_text(json.dumps(dict(config, quantization_config=quant)))
    deq = tmp_path / "deq"
    deq.mkdir()
    main_only = {
        k: v for k, v in dequantized.items() if not k.startswith(f"model.layers.{LAYERS}.")
    }
    write_safetensors(deq / "model.safetensors", main_only)
    (deq / "config.json").write_text(json.dumps(dict(config, num_nextn_predict_layers=0)))

    conv = hf_to_orbax(fp8, tmp_path / "conv", progress=False)
    tokens = random_tokens(seed=5)
    reference = DeepseekV3ForCausalLM.from_pretrained(deq).eval()
    ours = our_logits(deepseek_jax.load(conv), tokens)
    err = float(np.abs(ours - hf_logits(reference, tokens)).max())
    print(f"\n[convert] FP8 source, converted, vs transformers on dequantized weights: {err:.2e}")
    assert err <= TOL
    # Written back dequantized: exactly the dequantized weights.
    back = _tensors(orbax_to_hf(conv, tmp_path / "back", progress=False))
    for name, value in dequantized.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


# --- Errors: each names the problem and leaves no destination --------------------------------


def _broken_copy(src, dst, edit_files=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_files:
        edit_files(dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _drop_index_entry(name):
    def edit(d):
        index = json.loads((d / INDEX_FILE).read_text())
        del index["weight_map"][name]
        (d / INDEX_FILE).write_text(json.dumps(index))

    return edit


def _remove_shard(d):
    index = json.loads((d / INDEX_FILE).read_text())
    shard = index["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    os.remove(d / shard)


ERRORS = {
    "missing_shard": (dict(edit_files=_remove_shard), r"shard model-\d+-of-\d+.safetensors"),
    "not_in_index": (
        dict(edit_files=_drop_index_entry("model.layers.2.mlp.experts.3.up_proj.weight")),
        "missing tensor model.layers.2.mlp.experts.3.up_proj.weight",
    ),
    "shape_vs_config": (
        dict(edit_config=lambda c: c.update(kv_lora_rank=20)),
        r"model.layers.0.self_attn.kv_a_proj_with_mqa.weight has shape \[32, 64\]",
    ),
    "quant_method": (
        dict(edit_config=lambda c: c.update(quantization_config={"quant_method": "awq"})),
        "unsupported quant_method 'awq'",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_hf_to_orbax_errors(sources, case, tmp_path):
    edits, message = ERRORS[case]
    bad = _broken_copy(sources["v3_fp32_mtp"][0], tmp_path / "bad", **edits)
    out = tmp_path / "out"
    with pytest.raises((CheckpointError, FileNotFoundError), match=message):
        hf_to_orbax(bad, out, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # no destination, no temporary left


def test_orbax_errors(converted_v3, tmp_path):
    conv, _ = converted_v3
    garbled = tmp_path / "garbled"
    shutil.copytree(conv, garbled)
    (garbled / "deepseek_jax.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="deepseek_jax.json is missing or garbled"):
        orbax_to_hf(garbled, tmp_path / "out1", progress=False)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(conv, mismatched)
    meta = json.loads((mismatched / "deepseek_jax.json").read_text())
    meta["model"]["moe"]["n_routed_experts"] = 8
    meta["model"]["moe"]["n_group"] = 2
    (mismatched / "deepseek_jax.json").write_text(json.dumps(meta))
    shape = r"down_EFD has shape \[1, 16, 24, 64\], but the model config implies \[1, 8"
    with pytest.raises(CheckpointError, match=shape):
        orbax_to_hf(mismatched, tmp_path / "out2", progress=False)
    with pytest.raises(CheckpointError, match=r"down_EFD has shape"):
        deepseek_jax.load(mismatched)
    meta["model"]["moe"]["first_k_dense_replace"] = 1
    meta["model"]["moe"].update(n_routed_experts=16, n_group=4)
    (mismatched / "deepseek_jax.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="layer layout"):
        deepseek_jax.load(mismatched)
    assert not os.path.exists(tmp_path / "out1") and not os.path.exists(tmp_path / "out2")


def test_cli_both_directions(sources, tmp_path, capsys):
    src, _ = sources["v2_fp32"]
    conv, back = str(tmp_path / "conv"), str(tmp_path / "back")
    assert main(["convert", "hf-to-orbax", str(src), conv, "--no-progress"]) == 0
    argv = ["convert", "orbax-to-hf", conv, back, "--shard-size", "100KB", "--no-progress"]
    assert main(argv) == 0
    assert len([f for f in os.listdir(back) if f.endswith(".safetensors")]) > 1
    assert main(["convert", "orbax-to-hf", conv, back, "--no-progress"]) == 2
    assert "deepseek-jax: error: destination" in capsys.readouterr().err
    assert main(["convert", "hf-to-orbax", str(tmp_path / "nope"), conv + "2"]) == 2
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20


# --- Training checkpoints --------------------------------------------------------------------

TRAIN = [
    "data.kind=stdlib",
    "train.batch_size=8",
    "train.seq_len=32",
    "train.steps=3",
    "train.peak_flops_per_device=1e11",
    "train.progress_bar=false",
    "train.tensorboard=false",
    "train.eval_every=0",
    "train.async_checkpointing=false",
    "train.bias_gamma=0.01",
    "runtime.compute_dtype=float32",
    "model.num_layers=2",
    "model.vocab_size=320",
    "data.tokenizer=byte",  # 259 tokens: fits the smaller vocabulary
    "model.mtp.depth=1",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from deepseek_jax.train.loop import train

    run = tmp_path_factory.mktemp("run")
    cfg = load_config("tiny", [*TRAIN, f"train.run_dir={run}"])
    train(cfg, log=lambda _: None)
    return run, cfg


def test_training_checkpoint_to_transformers(trained_run, tmp_path):
    run, cfg = trained_run
    ours = deepseek_jax.load(run)
    biases = np.asarray(ours.moe_layers.ffn.router_bias_E[...])
    assert np.abs(biases).max() > 0  # the V3 router's biases moved during training
    hf = orbax_to_hf(run / "checkpoints", tmp_path / "hf", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(hf).eval()
    assert reference.config.num_nextn_predict_layers == 1
    tokens = np.random.default_rng(0).integers(0, 320, size=(2, 40)).astype(np.int32)
    err = float(np.abs(our_logits(ours, tokens) - hf_logits(reference, tokens)).max())
    print(f"\n[convert] training checkpoint -> HF, transformers vs ours: {err:.2e}")
    assert err <= TOL
    with CheckpointReader(hf) as reader:
        assert "model.layers.2.eh_proj.weight" in reader  # the MTP layer
        bias = reader.read("model.layers.1.mlp.gate.e_score_correction_bias")
        np.testing.assert_array_equal(bias, biases[0])


def test_init_from_converted_checkpoint(trained_run, tmp_path):
    from deepseek_jax import sharding
    from deepseek_jax.train.loop import state_from_weights, train
    from deepseek_jax.train.step import Trainer

    run, cfg = trained_run
    hf = orbax_to_hf(run, tmp_path / "hf", progress=False)
    conv = hf_to_orbax(hf, tmp_path / "conv", progress=False)
    init = f"train.init_from={conv}"
    new = load_config("tiny", [*TRAIN, f"train.run_dir={tmp_path / 'new'}", init])
    mesh = sharding.make_mesh(new.mesh)
    trainer = Trainer.create(new, sharding.Sharding(mesh, sharding.rules_for(new.mesh.rules)))
    source = deepseek_jax.load(run)
    _, params, biases = nnx.split(source, nnx.Param, nnx.Variable)
    want = jax.tree.leaves(nnx.to_pure_dict(params)) + jax.tree.leaves(nnx.to_pure_dict(biases))
    for origin in (conv, hf):  # a converted directory and a Hugging Face one
        state = state_from_weights(trainer, str(origin))
        assert int(state.step) == 0
        got = jax.tree.leaves(state.params) + jax.tree.leaves(state.router_bias)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        opt = jax.tree.leaves(state.opt_state)
        assert all(not np.asarray(x).any() for x in opt if np.ndim(x))
    other = load_config(
        "tiny", [*TRAIN, "model.moe.n_routed_experts=8", f"train.run_dir={tmp_path / 'x'}", init]
    )
    with pytest.raises(CheckpointError, match="n_routed_experts"):
        train(other, log=lambda _: None)


def test_generate_command_on_a_training_run(trained_run, capsys):
    """`deepseek-jax generate RUN_DIR` finds the newest checkpoint and the byte tokenizer the
    run saved in its config; --speculative (MTP drafts) prints the same greedy text."""
    from deepseek_jax.cli import main
    from deepseek_jax.data.tokenizer import ByteTokenizer
    from deepseek_jax.generate import generate

    run, _ = trained_run
    argv = ["generate", str(run), "--prompt", "def main(", "--prompt", "import", "--ignore-eos"]
    assert main([*argv, "--max-new-tokens", "12"]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert main([*argv, "--max-new-tokens", "12", "--speculative"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == plain
    assert "MTP drafts accepted" in out.err
    tok = ByteTokenizer()
    new = generate(
        deepseek_jax.load(run),
        [tok.encode("def main("), tok.encode("import")],
        12,
        key=jax.random.key(0),
    )
    assert plain == ["def main(" + tok.decode(new[0]), "import" + tok.decode(new[1])]
    # Sharded: weights restored shard by shard onto (data=2, expert=4), experts split over
    # `expert`; the same text, plain and speculative.
    mesh = ["--mesh", "data=2,expert=4,fsdp=1", "--rules", "ep"]
    assert main([*argv, "--max-new-tokens", "12", *mesh, "--speculative"]) == 0
    assert capsys.readouterr().out.splitlines() == plain
    assert main([*argv, "--mesh", "data=2,bogus=4"]) == 2
    assert "AXIS=SIZE" in capsys.readouterr().err


def test_load_restores_shards_onto_a_mesh(trained_run):
    from deepseek_jax import sharding
    from deepseek_jax.config import MeshConfig

    run, _ = trained_run
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, expert=4), jax.devices()[:8])
    sh = sharding.Sharding(mesh, sharding.rules_for("ep"))
    model = deepseek_jax.load(run, mesh_sharding=sh)
    gate = model.moe_layers.ffn.gate_EDF[...]
    assert gate.sharding.spec[1] == "expert"  # [L, E, D, F]: experts split over `expert`
    assert {s.data.shape[1] for s in gate.addressable_shards} == {gate.shape[1] // 4}
    reference = deepseek_jax.load(run)
    tokens = np.random.default_rng(1).integers(0, 320, size=(2, 16)).astype(np.int32)
    np.testing.assert_allclose(
        our_logits(model, tokens), our_logits(reference, tokens), atol=1e-5, rtol=0
    )


# --- Memory ----------------------------------------------------------------------------------

MEM_CONFIG = dict(MEMORY_V3, num_hidden_layers=3)
OVERHEAD = 64 * 2**20  # fixed allowance: TensorStore and JAX tracing buffers, the allocator

MEASURE = r"""
import json, os, sys
from deepseek_jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
import deepseek_jax.checkpoint.mapping, deepseek_jax.checkpoint.arrays  # noqa: F401

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

base = status("VmRSS:")
fn = hf_to_orbax if sys.argv[1] == "hf-to-orbax" else orbax_to_hf
fn(sys.argv[2], sys.argv[3], progress=False)
print(json.dumps({"baseline": base, "peak": status("VmHWM:")}))
"""


def test_memory_is_bounded_by_the_largest_tensor(tmp_path):
    cfg = deepseek_jax.from_hf_config(MEM_CONFIG)
    from deepseek_jax.checkpoint.mapping import hf_tensors

    plan = hf_tensors(cfg)
    rng = np.random.default_rng(0)
    entries = [(t.name, np.dtype(np.float32), t.shape) for t in plan]
    src = tmp_path / "src"
    write_streaming(
        src,
        entries,
        lambda name: rng.standard_normal(dict((e[0], e[2]) for e in entries)[name], np.float32),
        max_shard_bytes=30 * 2**20,
    )
    (src / "config.json").write_text(json.dumps(MEM_CONFIG))
    largest = max(int(np.prod(s)) * 4 for _, _, s in entries)
    total = sum(int(np.prod(s)) * 4 for _, _, s in entries)
    assert total >= 10 * largest
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    figures = {}
    for direction, a, b in (
        ("hf-to-orbax", src, tmp_path / "conv"),
        ("orbax-to-hf", tmp_path / "conv", tmp_path / "back"),
    ):
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, direction, str(a), str(b)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        figures[direction] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    for direction, f in figures.items():
        grew = f["peak"] - f["baseline"]
        print(
            f"\n[memory] {direction}: checkpoint {total / mib:.0f} MiB, largest tensor "
            f"{largest / mib:.0f} MiB, baseline RSS {f['baseline'] / mib:.0f} MiB, peak "
            f"{f['peak'] / mib:.0f} MiB, growth {grew / mib:.0f} MiB "
            f"(bound {(3 * largest + OVERHEAD) / mib:.0f} MiB)"
        )
        assert grew < 3 * largest + OVERHEAD
    back = CheckpointReader(tmp_path / "back")
    with CheckpointReader(src) as reader:
        for name in ("model.embed_tokens.weight", "model.layers.2.mlp.experts.31.down_proj.weight"):
            assert reader.read(name).tobytes() == back.read(name).tobytes()
