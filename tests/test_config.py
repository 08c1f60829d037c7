"""deepseek_jax.config: shipped YAML configs, dotted overrides, error messages, HF config.json.

All CPU and fast: no model is built. The transformers config classes are the reference for
`from_hf_config` / `to_hf_config`; the hub config.json literals below are the published
DeepSeek-V3 and DeepSeek-V2-Lite files (SPEC §2, §5, §6).
"""

import copy
import dataclasses
import json
import math
import os
import pathlib

import pytest
import transformers

from deepseek_jax.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    config_from_dict,
    config_from_saved,
    from_hf_config,
    load_config,
    parse_overrides,
    replace,
    to_dict,
    to_hf_config,
    yarn_mscale,
)

SHIPPED = ("tiny", "deepseek-v2-lite", "deepseek-v3-671b")

# The hub config.json of deepseek-ai/DeepSeek-V3 (FP8 release), `rope_scaling` style.
V3_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

# The hub config.json of deepseek-ai/DeepSeek-V2-Lite.
V2_LITE_HUB = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}

YARN_SMALL = {
    "rope_type": "yarn",
    "rope_theta": 50000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}


def _hf_v3(**kw) -> transformers.DeepseekV3Config:
    """A small transformers V3 config with YaRN, every routing field away from its default."""
    args = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        moe_intermediate_size=24,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=12,
        n_shared_experts=2,
        num_experts_per_tok=3,
        n_group=3,
        topk_group=2,
        first_k_dense_replace=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        q_lora_rank=40,
        kv_lora_rank=24,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        rms_norm_eps=1e-5,
        max_position_embeddings=1024,
        bos_token_id=5,
        eos_token_id=7,
        num_nextn_predict_layers=2,
        rope_parameters=dict(YARN_SMALL),
    )
    args.update(kw)
    return transformers.DeepseekV3Config(**args)


def _hf_v2(**kw) -> transformers.DeepseekV2Config:
    """A small transformers V2 config: plain q_proj, greedy softmax routing."""
    args = dict(
        vocab_size=200,
        hidden_size=48,
        intermediate_size=96,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=3,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    )
    args.update(kw)
    return transformers.DeepseekV2Config(**args)


# ---------------------------------------------------------------------------------------------
# 1. Shipped configs.


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_by_name_and_path(name):
    by_name = load_config(name)
    assert isinstance(by_name, Config) and isinstance(by_name.model, ModelConfig)
    path = os.path.join(CONFIG_DIR, f"{name}.yaml")
    assert load_config(path) == by_name
    assert load_config(pathlib.Path(path)) == by_name
    assert load_config(f"{name}.yaml") == by_name
    # The YAML spells out every field: a dict round trip gives the same config.
    assert config_from_dict(to_dict(by_name)) == by_name


def test_v3_published_shapes():
    m = load_config("deepseek-v3-671b").model
    assert (m.vocab_size, m.hidden_size, m.intermediate_size) == (129280, 7168, 18432)
    assert (m.num_layers, m.num_heads, m.rms_norm_eps) == (61, 128, 1e-6)
    assert (m.bos_token_id, m.eos_token_id) == (0, 1)
    assert m.mla == MLAConfig(
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    )
    assert m.mla.qk_head_dim == 192
    moe = m.moe
    assert (moe.n_routed_experts, moe.n_shared_experts, moe.n_experts_per_tok) == (256, 1, 8)
    assert (moe.n_group, moe.topk_group, moe.first_k_dense_replace) == (8, 4, 3)
    assert moe.moe_intermediate_size == 2048
    assert (moe.topk_method, moe.scoring_func) == ("noaux_tc", "sigmoid")
    assert moe.norm_topk_prob is True and moe.routed_scaling_factor == 2.5
    assert m.mtp.depth == 1
    assert m.rope == RopeConfig(
        theta=10000.0,
        type="yarn",
        factor=40.0,
        original_max_position_embeddings=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    )
    assert m.max_position_embeddings == 163840
    # SPEC §1: 192^-0.5 * 1.368888^2.
    assert m.softmax_scale == pytest.approx(0.1352338, abs=1e-6)
    assert yarn_mscale(40.0, 1.0) == pytest.approx(1.368888, abs=1e-6)
    kinds = m.layer_kinds
    assert len(kinds) == 62  # 61 main layers + 1 MTP block
    assert kinds[:3] == ("dense",) * 3 and set(kinds[3:]) == {"moe"}


def test_v2_lite_published_shapes():
    m = load_config("deepseek-v2-lite").model
    assert (m.vocab_size, m.hidden_size, m.intermediate_size) == (102400, 2048, 10944)
    assert (m.num_layers, m.num_heads) == (27, 16)
    assert (m.bos_token_id, m.eos_token_id) == (100000, 100001)
    assert m.mla.q_lora_rank is None
    assert (m.mla.kv_lora_rank, m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim) == (512, 128, 64)
    assert m.mla.v_head_dim == 128
    moe = m.moe
    assert (moe.n_routed_experts, moe.n_shared_experts, moe.n_experts_per_tok) == (64, 2, 6)
    assert moe.moe_intermediate_size == 1408 and moe.first_k_dense_replace == 1
    assert (moe.topk_method, moe.scoring_func) == ("greedy", "softmax")
    assert moe.norm_topk_prob is False and moe.routed_scaling_factor == 1.0
    assert m.mtp.depth == 0
    assert (m.rope.type, m.rope.factor, m.rope.mscale, m.rope.mscale_all_dim) == (
        "yarn",
        40.0,
        0.707,
        0.707,
    )
    assert m.softmax_scale == pytest.approx(0.1147214, abs=1e-6)
    assert m.layer_kinds == ("dense",) + ("moe",) * 26


def test_tiny_shapes_and_layer_kinds():
    m = load_config("tiny").model
    assert m.num_layers == 4 and m.mtp.depth == 1
    assert m.layer_kinds == ("dense", "moe", "moe", "moe", "moe")  # last one is the MTP block
    assert [m.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert (m.moe.n_routed_experts, m.moe.n_group, m.moe.topk_group) == (16, 4, 2)
    assert m.rope.type == "default"
    # No YaRN: the plain (d_n + d_r)^-0.5.
    assert m.softmax_scale == pytest.approx((32 + 16) ** -0.5, rel=1e-12)
    every_other = load_config("tiny", ["model.moe.moe_layer_freq=2"]).model
    assert every_other.layer_kinds == ("dense", "dense", "moe", "dense", "moe")


def test_yarn_softmax_scale_only_with_mscale_all_dim():
    m = load_config("deepseek-v3-671b", ["model.rope.mscale_all_dim=0"]).model
    assert m.softmax_scale == pytest.approx(192**-0.5, rel=1e-12)
    assert yarn_mscale(1.0, 1.0) == 1.0


def test_defaults_without_a_file():
    assert load_config() == Config()
    assert load_config(None, ["model.num_layers=2"]).model.num_layers == 2


# ---------------------------------------------------------------------------------------------
# 2. Overrides.


def test_overrides_apply_and_coerce():
    cfg = load_config(
        "tiny",
        [
            "model.moe.n_group=2",
            "model.mla.q_lora_rank=null",
            "runtime.compute_dtype=float32",
            "model.rope.theta=500000",  # an int where a float is expected
            "model.moe.routed_scaling_factor=2",
            "model.rms_norm_eps=1e-5",  # PyYAML reads this as a string; accepted as a float
            "runtime.scan_layers=false",
            "model.moe.norm_topk_prob=False",
        ],
    )
    m = cfg.model
    assert m.moe.n_group == 2 and m.mla.q_lora_rank is None
    assert cfg.runtime.compute_dtype == "float32"
    assert m.rope.theta == 500000.0 and isinstance(m.rope.theta, float)
    assert m.moe.routed_scaling_factor == 2.0 and isinstance(m.moe.routed_scaling_factor, float)
    assert m.rms_norm_eps == 1e-5
    assert cfg.runtime.scan_layers is False and m.moe.norm_topk_prob is False
    # Untouched fields keep the file's values.
    assert m.moe.topk_group == 2 and m.hidden_size == 128


def test_override_edge_forms():
    assert load_config("tiny", ["model.mla.q_lora_rank="]).model.mla.q_lora_rank is None
    assert load_config("tiny", [" model.num_layers = 3 "]).model.num_layers == 3
    # Later overrides win.
    assert load_config("tiny", ["model.num_layers=2", "model.num_layers=6"]).model.num_layers == 6
    assert parse_overrides(["model.moe.n_group=2", "model.mla.q_lora_rank=null", "a.b=x"]) == {
        "model": {"moe": {"n_group": 2}, "mla": {"q_lora_rank": None}},
        "a": {"b": "x"},
    }
    assert parse_overrides([]) == {}


def test_overrides_on_top_of_a_yaml_file(tmp_path):
    p = tmp_path / "small.yaml"
    p.write_text("model:\n  num_layers: 2\n  moe:\n    first_k_dense_replace: 0\n")
    m = load_config(p, ["model.moe.n_group=4", "model.moe.topk_group=2"]).model
    assert m.num_layers == 2 and m.moe.first_k_dense_replace == 0
    assert (m.moe.n_group, m.moe.topk_group) == (4, 2)
    assert m.hidden_size == ModelConfig().hidden_size  # defaults fill the rest
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def test_config_is_frozen():
    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.num_layers = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.moe.n_group = 2
    assert hash(cfg) == hash(load_config("tiny"))  # frozen dataclasses are hashable


def test_replace_dotted_and_checked():
    m = load_config("tiny").model
    r = replace(m, **{"moe.n_group": 2, "rope.theta": 5})
    assert (r.moe.n_group, r.rope.theta) == (2, 5.0)
    assert isinstance(r.rope.theta, float)
    assert m.moe.n_group == 4  # the original is untouched
    assert replace(m, rope=RopeConfig(theta=1e5)).rope.theta == 1e5
    assert replace(load_config("tiny"), **{"model.num_layers": 2}).model.num_layers == 2
    rt = load_config("tiny").runtime
    with pytest.raises(ConfigError, match=r"runtime\.compute_dtype='float64' is not one of"):
        replace(rt, compute_dtype="float64")
    assert replace(rt, remat="full").remat == "full"
    with pytest.raises(ConfigError, match=r"'model\.compute_dtype' moved to 'runtime\.comp"):
        replace(m, compute_dtype="float32")
    with pytest.raises(ConfigError, match=r"model\.num_layers='3' must be an integer"):
        replace(m, num_layers="3")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.n_layers'.*num_layers"):
        replace(m, n_layers=3)
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.moe\.n_experts'"):
        replace(m, **{"moe.n_experts": 3})
    with pytest.raises(ConfigError, match=r"n_routed_experts=16 is not divisible by"):
        replace(m, **{"moe.n_group": 3})
    with pytest.raises(ConfigError, match=r"model\.moe\.topk_group=5 must be between"):
        replace(m.moe, topk_group=5)


def test_model_equality_is_the_architecture():
    """ModelConfig == is "do these weights fit": init_std (how fresh weights are drawn) and the
    runtime knobs (another section) take no part."""
    m = load_config("tiny").model
    assert replace(m, init_std=0.5) == m
    assert replace(m, num_layers=2) != m
    assert not {"param_dtype", "compute_dtype", "scan_layers", "remat"} & {
        f.name for f in dataclasses.fields(ModelConfig)
    }


def test_saved_configs_from_before_the_runtime_section_still_load():
    """A checkpoint's saved config with the old model.* runtime keys is moved over, never lost;
    the same keys in a user's YAML or overrides are an error (test_override_errors)."""
    old = to_dict(load_config("tiny"))
    del old["runtime"]
    old["model"].update(
        param_dtype="float32", compute_dtype="float32", scan_layers=False, remat="dots"
    )
    cfg = config_from_saved(old)
    assert cfg.model == load_config("tiny").model
    assert (cfg.runtime.compute_dtype, cfg.runtime.scan_layers, cfg.runtime.remat) == (
        "float32",
        False,
        "save_dots",
    )
    assert config_from_saved(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"moved to 'runtime\.param_dtype'"):
        config_from_dict(old)


# ---------------------------------------------------------------------------------------------
# 3. Errors.


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            ["model.moe.n_experts=4"],
            r"unknown config key 'model\.moe\.n_experts'; did you mean .*"
            r"'model\.moe\.n_routed_experts'",
        ),
        (["train.lr=1"], r"unknown config key 'train.lr'"),
        (["model.num_layers=-1"], r"model\.num_layers=-1 must be positive"),
        (["model.hidden_size=0"], r"model\.hidden_size=0 must be positive"),
        (
            ["runtime.compute_dtype=float64"],
            r"runtime\.compute_dtype='float64' is not one of \['float32', 'bfloat16', 'float16'\]",
        ),
        (["runtime.param_dtype=fp32"], r"runtime\.param_dtype='fp32' is not one of"),
        (["model.hidden_size=big"], r"model\.hidden_size='big' must be an integer"),
        (["model.num_layers=2.5"], r"model\.num_layers=2\.5 must be an integer"),
        (["model.num_layers=true"], r"model\.num_layers=True must be an integer"),
        (["runtime.scan_layers=1"], r"runtime\.scan_layers=1 must be true or false"),
        (["runtime.remat=dots"], r"runtime\.remat='dots' is not one of \['none', 'full'"),
        (["runtime.attention=flash"], r"runtime\.attention='flash' is not one of"),
        (["runtime.attention_chunk_size=0"], r"runtime\.attention_chunk_size=0 must be >= 1"),
        (["runtime.cross_entropy_chunk_size=-2"], r"runtime\.cross_entropy_chunk_size=-2"),
        (["runtime.moe_a2a_buffer_factor=0"], r"runtime\.moe_a2a_buffer_factor=0.0 must be"),
        (
            ["model.compute_dtype=float32"],
            r"^'model\.compute_dtype' moved to 'runtime\.compute_dtype' .*"
            r"write runtime\.compute_dtype=\.\.\.$",
        ),
        (["model.remat=full"], r"'model\.remat' moved to 'runtime\.remat'"),
        (["model.scan_layers=true"], r"'model\.scan_layers' moved to 'runtime\.scan_layers'"),
        (["model.param_dtype=float32"], r"'model\.param_dtype' moved to 'runtime\.param_dtype'"),
        (["model.rope.theta=abc"], r"model\.rope\.theta='abc' must be a number"),
        (["model.mla.q_lora_rank=wide"], r"model\.mla\.q_lora_rank='wide' has the wrong type"),
        (["model.mla.q_lora_rank=0"], r"model\.mla\.q_lora_rank=0 must be positive or null"),
        (["model.mla.qk_rope_head_dim=15"], r"model\.mla\.qk_rope_head_dim=15 .*even"),
        (["model.moe=3"], r"model\.moe must be a mapping of MoEConfig fields"),
        (
            ["model.moe.n_routed_experts=10", "model.moe.n_group=4"],
            r"model\.moe\.n_routed_experts=10 is not divisible by model\.moe\.n_group=4",
        ),
        (
            ["model.moe.topk_group=5"],
            r"model\.moe\.topk_group=5 must be between 1 and model\.moe\.n_group=4",
        ),
        (["model.moe.topk_group=0"], r"model\.moe\.topk_group=0 must be between 1"),
        (
            ["model.moe.n_experts_per_tok=17"],
            r"model\.moe\.n_experts_per_tok=17 exceeds model\.moe\.n_routed_experts=16",
        ),
        (
            ["model.moe.n_experts_per_tok=5", "model.moe.topk_group=1"],
            r"model\.moe\.n_experts_per_tok=5 is more than the 4 experts in "
            r"model\.moe\.topk_group=1 groups",
        ),
        (
            ["model.moe.scoring_func=softmax"],
            r"model\.moe\.topk_method=noaux_tc needs model\.moe\.scoring_func=sigmoid, "
            r"got softmax",
        ),
        (
            ["model.moe.topk_method=greedy"],
            r"model\.moe\.topk_method=greedy needs model\.moe\.scoring_func=softmax",
        ),
        (["model.moe.topk_method=top2"], r"model\.moe\.topk_method='top2' is not one of"),
        (
            ["model.moe.n_group=16", "model.moe.topk_group=4"],
            r"noaux_tc group scores need at least 2 experts per group",
        ),
        (["model.moe.n_shared_experts=-1"], r"model\.moe\.n_shared_experts must be >= 0"),
        (["model.moe.moe_layer_freq=0"], r"model\.moe\.moe_layer_freq=0 must be >= 1"),
        (["model.mtp.depth=-1"], r"model\.mtp\.depth=-1 must be >= 0"),
        (["model.eos_token_id=512"], r"model\.eos_token_id=512 is outside the vocabulary"),
        (["model.rope.factor=0.5"], r"model\.rope\.factor=0\.5 must be >= 1"),
        (["model.rope.beta_fast=1"], r"model\.rope\.beta_fast=1\.0 must exceed"),
        (["model.rope.type=linear"], r"model\.rope\.type='linear' is not one of"),
        (["model.num_layers"], r"override 'model\.num_layers' is not of the form key=value"),
        (["=3"], r"override '=3' is not of the form key=value"),
        (
            ["model.num_layers=3", "model.num_layers.x=1"],
            r"override model\.num_layers\.x: 'num_layers' is a value, not a section",
        ),
    ],
)
def test_bad_overrides_raise_config_error(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("tiny", overrides)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- model\n- num_layers\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping"):
        load_config(p)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("model:\n  mla:\n    q_lora: 64\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.mla\.q_lora'.*q_lora_rank"):
        load_config(p)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*nope\.yaml"):
        load_config(missing)
    with pytest.raises(FileNotFoundError, match=r"no-such-config"):
        load_config("no-such-config")


def test_a_directory_does_not_shadow_a_shipped_config(tmp_path, monkeypatch):
    """`deepseek-jax train` after a run with `train.run_dir=tiny`: the directory ./tiny is not
    a config, so the name still means configs/tiny.yaml; a directory alone is refused by name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert load_config("tiny").model == load_config(os.path.join(CONFIG_DIR, "tiny.yaml")).model
    (tmp_path / "my-run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'my-run' is a directory, not a YAML file"):
        load_config("my-run")


# ---------------------------------------------------------------------------------------------
# 4. from_hf_config.


def _check_v3_small(m: ModelConfig) -> None:
    assert (m.vocab_size, m.hidden_size, m.intermediate_size) == (300, 64, 160)
    assert (m.num_layers, m.num_heads, m.rms_norm_eps) == (5, 4, 1e-5)
    assert (m.max_position_embeddings, m.bos_token_id, m.eos_token_id) == (1024, 5, 7)
    assert m.mla == MLAConfig(
        q_lora_rank=40, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12
    )
    assert m.moe == MoEConfig(
        n_routed_experts=12,
        n_shared_experts=2,
        n_experts_per_tok=3,
        moe_intermediate_size=24,
        first_k_dense_replace=2,
        moe_layer_freq=1,
        topk_method="noaux_tc",  # not in transformers' V3 config: the V3 default
        scoring_func="sigmoid",
        n_group=3,
        topk_group=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
    )
    assert m.mtp.depth == 2
    assert m.rope == RopeConfig(
        theta=50000.0,
        type="yarn",
        factor=4.0,
        original_max_position_embeddings=256,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=0.707,
        mscale_all_dim=0.707,
        attention_factor=None,
    )
    # Fields config.json does not carry keep the ModelConfig defaults.
    assert m.init_std == ModelConfig().init_std
    assert m.layer_kinds == ("dense", "dense", "moe", "moe", "moe", "moe", "moe")


def test_from_hf_v3_transformers_dict_and_files(tmp_path):
    hf = _hf_v3()
    d = hf.to_dict()
    m = from_hf_config(d)
    _check_v3_small(m)
    hf.save_pretrained(tmp_path / "ckpt")
    assert from_hf_config(tmp_path / "ckpt" / "config.json") == m
    assert from_hf_config(str(tmp_path / "ckpt" / "config.json")) == m
    hf.to_json_file(tmp_path / "c.json")
    assert from_hf_config(tmp_path / "c.json") == m
    # The input mapping is not mutated.
    assert d == hf.to_dict()


def test_from_hf_v2_transformers_config(tmp_path):
    hf = _hf_v2()
    m = from_hf_config(hf.to_dict())
    assert (m.vocab_size, m.hidden_size, m.intermediate_size) == (200, 48, 96)
    assert (m.num_layers, m.num_heads, m.max_position_embeddings) == (3, 3, 512)
    assert (m.bos_token_id, m.eos_token_id) == (0, 1)
    assert m.mla == MLAConfig(
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
    )
    assert m.moe == MoEConfig(
        n_routed_experts=8,
        n_shared_experts=2,
        n_experts_per_tok=3,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        topk_method="greedy",
        scoring_func="softmax",  # not in transformers' V2 config: implied by greedy
        n_group=1,  # null in the V2 config
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
    )
    assert m.mtp.depth == 0
    assert m.rope == RopeConfig(theta=10000.0)
    hf.save_pretrained(tmp_path)
    assert from_hf_config(tmp_path / "config.json") == m


def test_from_hf_v2_group_limited_and_norm_flag():
    m = from_hf_config(
        _hf_v2(topk_method="group_limited_greedy", n_group=4, topk_group=2).to_dict()
    )
    assert (m.moe.topk_method, m.moe.scoring_func) == ("group_limited_greedy", "softmax")
    assert (m.moe.n_group, m.moe.topk_group) == (4, 2)
    # transformers' V2 router never renormalizes, whatever norm_topk_prob says.
    assert from_hf_config(_hf_v2(norm_topk_prob=True).to_dict()).moe.norm_topk_prob is False


def test_hub_rope_scaling_style_equals_rope_parameters_style():
    d = _hf_v3().to_dict()
    hub = {k: v for k, v in d.items() if k != "rope_parameters"}
    params = dict(d["rope_parameters"])
    hub["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    hub["rope_scaling"] = params
    assert from_hf_config(hub) == from_hf_config(d)
    # A default-rope hub file: rope_scaling null, theta at the top level.
    plain = dict(hub, rope_scaling=None, rope_theta=500000)
    assert from_hf_config(plain).rope == RopeConfig(theta=500000.0)


def test_yarn_factor_derived_from_context_lengths():
    hub = copy.deepcopy(V3_HUB)
    del hub["rope_scaling"]["factor"]
    assert from_hf_config(hub).rope.factor == 40.0  # 163840 / 4096


def test_from_hf_ignores_keys_that_do_not_change_the_math():
    d = _hf_v3().to_dict()
    noisy = dict(
        d,
        use_cache=False,
        initializer_range=0.5,
        attention_dropout=0.1,
        transformers_version="0.0.1",
        architectures=["Something"],
        head_dim=999,
        pretraining_tp=4,
        quantization_config={"quant_method": "fp8"},
        torch_dtype="bfloat16",
    )
    assert from_hf_config(noisy) == from_hf_config(d)
    lean = {k: v for k, v in d.items() if k not in ("head_dim", "use_cache", "architectures")}
    assert from_hf_config(lean) == from_hf_config(d)


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
        ({"tie_word_embeddings": True}, r"tie_word_embeddings=True is not supported"),
        ({"attention_bias": True}, r"attention_bias=True is not supported"),
        ({"mlp_bias": True}, r"mlp_bias=True is not supported"),
        ({"num_key_value_heads": 2}, r"num_key_value_heads=2 != num_attention_heads=4"),
        ({"rope_interleave": False}, r"rope_interleave=false is not supported"),
        (
            {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
            r"rope type 'linear' is not supported",
        ),
        ({"model_type": "llama"}, r"model_type='llama' is not deepseek_v2 or deepseek_v3"),
        ({"topk_method": "noaux_tc", "scoring_func": "softmax"}, r"needs model\.moe\.scoring"),
        ({"n_group": 5}, r"model\.moe\.n_routed_experts=12 is not divisible by"),
        ({"num_nextn_predict_layers": -1}, r"model\.mtp\.depth=-1"),
    ],
)
def test_from_hf_refuses_unsupported_keys(change, pattern):
    d = dict(_hf_v3().to_dict(), **change)
    with pytest.raises(ConfigError, match=pattern):
        from_hf_config(d)


def test_from_hf_yarn_needs_original_length():
    d = _hf_v3().to_dict()
    del d["rope_parameters"]["original_max_position_embeddings"]
    with pytest.raises(ConfigError, match=r"original_max_position_embeddings"):
        from_hf_config(d)


def test_from_hf_eos_list_and_overrides():
    d = dict(_hf_v3().to_dict(), eos_token_id=[7, 9])
    assert from_hf_config(d).eos_token_id == 7
    m = from_hf_config(d, init_std=0.02, **{"mtp.depth": 0})
    assert (m.init_std, m.mtp.depth) == (0.02, 0)
    # Overrides are checked like YAML overrides; runtime knobs are not the model's.
    with pytest.raises(ConfigError, match=r"model\.num_layers=0 must be positive"):
        from_hf_config(d, num_layers=0)
    with pytest.raises(ConfigError, match=r"'model\.compute_dtype' moved to 'runtime\."):
        from_hf_config(d, compute_dtype="float32")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.dtype'"):
        from_hf_config(d, dtype="float32")


def test_hub_v3_config_equals_shipped_yaml(tmp_path):
    # The hub file carries no init_std; the shipped YAML keeps it at the ModelConfig default
    # (0.006 is SPEC §7's recipe, not the hub's initializer_range 0.02, which is ignored), and
    # init_std takes no part in == anyway.
    want = load_config("deepseek-v3-671b").model
    assert from_hf_config(V3_HUB) == want
    p = tmp_path / "config.json"
    p.write_text(json.dumps(V3_HUB))
    assert from_hf_config(p) == want
    assert from_hf_config(V3_HUB).softmax_scale == pytest.approx(0.1352338, abs=1e-6)


def test_hub_v2_lite_config_equals_shipped_yaml():
    assert from_hf_config(V2_LITE_HUB) == load_config("deepseek-v2-lite").model


def test_hub_dict_is_not_mutated():
    before = copy.deepcopy(V3_HUB)
    from_hf_config(V3_HUB, init_std=0.02)
    assert before == V3_HUB


# ---------------------------------------------------------------------------------------------
# 5. to_hf_config round trips.


def _training_only(m: ModelConfig) -> dict:
    """Fields a config.json does not carry: passed back to from_hf_config as overrides."""
    return dict(init_std=m.init_std)


@pytest.mark.parametrize("name", SHIPPED)
def test_to_hf_round_trip(name, tmp_path):
    m = load_config(name).model
    hf = to_hf_config(m)
    json.dumps(hf)  # plain JSON
    assert from_hf_config(hf, **_training_only(m)) == m
    p = tmp_path / "config.json"
    p.write_text(json.dumps(hf))
    assert from_hf_config(p, **_training_only(m)) == m


@pytest.mark.parametrize("name", SHIPPED)
def test_to_hf_round_trip_through_transformers(name):
    m = load_config(name).model
    hf = to_hf_config(m)
    cls = {
        "deepseek_v3": transformers.DeepseekV3Config,
        "deepseek_v2": transformers.DeepseekV2Config,
    }
    t = cls[hf["model_type"]](**hf)
    assert (t.num_hidden_layers, t.hidden_size, t.n_routed_experts) == (
        m.num_layers,
        m.hidden_size,
        m.moe.n_routed_experts,
    )
    assert t.q_lora_rank == m.mla.q_lora_rank
    assert from_hf_config(t.to_dict(), **_training_only(m)) == m


def test_tiny_builds_a_transformers_v3_config():
    m = load_config("tiny").model
    t = transformers.DeepseekV3Config(**to_hf_config(m))
    assert t.model_type == "deepseek_v3"
    assert (t.vocab_size, t.num_attention_heads, t.num_key_value_heads) == (512, 4, 4)
    assert (t.q_lora_rank, t.kv_lora_rank) == (64, 32)
    assert (t.n_group, t.topk_group, t.num_experts_per_tok) == (4, 2, 4)
    assert t.first_k_dense_replace == 1 and t.routed_scaling_factor == 2.5
    assert t.rope_parameters["rope_type"] == "default"
    assert math.isclose(t.rope_parameters["rope_theta"], 10000.0)
    assert t.tie_word_embeddings is False and t.hidden_act == "silu"


def test_to_hf_round_trip_after_overrides():
    m = load_config(
        "tiny",
        [
            "model.mla.q_lora_rank=null",
            "model.moe.n_group=2",
            "model.moe.topk_group=1",
            "model.moe.moe_layer_freq=2",
            "model.rope.type=yarn",
            "model.rope.factor=8",
            "model.rope.original_max_position_embeddings=256",
            "model.rope.mscale=0.5",
            "model.rope.mscale_all_dim=0.5",
            "model.rope.attention_factor=1.25",
            "model.mtp.depth=0",
        ],
    ).model
    assert from_hf_config(to_hf_config(m), **_training_only(m)) == m
