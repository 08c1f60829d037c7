"""Meshes, logical-axis rules, golden partition specs and sharded-vs-single-device forwards.

Runs on 8 CPU devices (tests/conftest.py forces them). The golden partition specs live in
tests/golden/partition_specs_tiny.json; regenerate them after an intended change with
    DEEPSEEK_JAX_REGEN_GOLDEN=1 pytest tests/test_sharding.py
and review the diff.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax import sharding
from deepseek_jax.config import MESH_AXES, ConfigError, MeshConfig, load_config, replace
from deepseek_jax.model.transformer import DeepSeek
from deepseek_jax.runtime import Runtime, with_runtime
from deepseek_jax.sharding import Rules, Sharding, ShardingError, make_mesh, rules_for

FP32 = Runtime.of(compute_dtype="float32")

jax.config.update("jax_default_matmul_precision", "highest")

# Always the host devices, so that the tests mean the same on a machine with an accelerator.
CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(
    len(CPUS) < 8, reason="needs 8 CPU devices (--xla_force_host_platform_device_count=8)"
)

GOLDEN = pathlib.Path(__file__).parent / "golden" / "partition_specs_tiny.json"
REGEN = os.environ.get("DEEPSEEK_JAX_REGEN_GOLDEN") == "1"

# (case name, mesh sizes, rules preset); fsdp defaults to -1 and fills the remaining devices.
CASES = [
    ("dp/data=8", dict(data=8), "dp"),
    ("fsdp/fsdp=8", dict(fsdp=8), "fsdp"),
    ("ep/data=2,expert=4", dict(data=2, expert=4), "ep"),
    ("ep/fsdp=2,expert=4", dict(fsdp=2, expert=4), "ep"),
    ("ep_fsdp/fsdp=2,expert=4", dict(fsdp=2, expert=4), "ep_fsdp"),
]
CASE_IDS = [c[0] for c in CASES]
ROUTED = ("gate_EDF", "up_EDF", "down_EFD")


def mesh_of(**sizes) -> jax.sharding.Mesh:
    return make_mesh(MeshConfig(**sizes), CPUS[:8])


def sharding_of(sizes: dict, preset: str) -> Sharding:
    return Sharding(mesh_of(**sizes), rules_for(preset))


def dotted(path) -> str:
    return ".".join(str(p) for p in path)


# ---------------------------------------------------------------------------------------------
# MeshConfig.resolve


def test_resolve_fills_the_minus_one_axis():
    assert MeshConfig().resolve(8) == dict(data=1, fsdp=8, expert=1, tensor=1)
    assert MeshConfig(data=2, expert=4).resolve(16) == dict(data=2, fsdp=2, expert=4, tensor=1)
    assert MeshConfig(data=-1, fsdp=2).resolve(8) == dict(data=4, fsdp=2, expert=1, tensor=1)
    assert MeshConfig(data=2, fsdp=2, expert=2).resolve(8)["tensor"] == 1
    assert MeshConfig(data=4, fsdp=1, dcn_data=2).resolve(4)["data"] == 4


def test_resolve_errors():
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match=r"needs 4 devices, but 8 are present"):
        MeshConfig(data=2, fsdp=2).resolve(8)
    with pytest.raises(ConfigError, match=r"mesh.fsdp=-1: 8 devices are not divisible .*\(3\)"):
        MeshConfig(data=3).resolve(8)
    with pytest.raises(ConfigError, match="mesh.data=2 is not divisible by mesh.dcn_data=4"):
        MeshConfig(data=2, fsdp=-1, dcn_data=4).resolve(8)
    with pytest.raises(ConfigError, match="must be >= 1 or -1"):
        MeshConfig(expert=0)
    with pytest.raises(ConfigError, match="mesh.dcn_data=0 must be >= 1"):
        MeshConfig(dcn_data=0)


# ---------------------------------------------------------------------------------------------
# make_mesh


@pytest.mark.parametrize(
    "sizes",
    [dict(data=8), dict(fsdp=8), dict(data=2, expert=4), dict(fsdp=2, expert=4)],
    ids=str,
)
def test_make_mesh_axes_and_sizes(sizes):
    mesh = mesh_of(**sizes)
    want = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **sizes}
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == want
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in CPUS[:8])


def test_make_mesh_on_the_default_devices_and_explicit_order():
    if len(jax.devices()) == 8 and jax.devices()[0].platform == "cpu":
        mesh = make_mesh(MeshConfig(expert=4))  # fsdp=-1 -> 2
        assert dict(mesh.shape) == dict(data=1, fsdp=2, expert=4, tensor=1)
    order = CPUS[:8][::-1]
    mesh = make_mesh(MeshConfig(data=2, expert=4, fsdp=1), order)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in order]
    with pytest.raises(ConfigError, match="needs 8 devices, but 4 are present"):
        make_mesh(MeshConfig(data=8, fsdp=1), CPUS[:4])


def test_hybrid_mesh_needs_several_processes_on_cpu():
    """A real hybrid mesh is built in the two-process training test (tests/test_train.py)."""
    assert jax.process_count() == 1
    with pytest.raises(ShardingError, match="mesh.dcn_data=2 needs .* found 1"):
        make_mesh(MeshConfig(data=2, fsdp=4, dcn_data=2), CPUS[:8])


# ---------------------------------------------------------------------------------------------
# Rules


def test_rules_collision_names_both_logical_axes_and_the_mesh_axis():
    with pytest.raises(ShardingError, match="'a' and 'b' both map to mesh axis 'fsdp'"):
        Rules({"a": ("fsdp",), "b": ("fsdp",)}).spec(("a", "b"))
    with pytest.raises(ShardingError, match="'embed' and 'experts' both map to mesh axis 'expert'"):
        rules_for("ep_fsdp").spec(("embed", "experts"), mesh_of(fsdp=2, expert=4))
    # With expert=1 the expert axis is dropped from both and nothing collides.
    assert rules_for("ep_fsdp").spec(("embed", "experts"), mesh_of(fsdp=8)) == P("fsdp", None)


def test_unknown_preset():
    with pytest.raises(ShardingError, match=r"unknown rules preset 'zero3'.*'ep_fsdp'"):
        rules_for("zero3")


def test_size_one_mesh_axes_are_dropped():
    ep = rules_for("ep")
    assert ep.spec(("batch", None)) == P(("data", "fsdp", "expert"), None)
    assert ep.spec(("batch", None), mesh_of(data=8)) == P("data", None)
    assert ep.spec(("batch", None), mesh_of(fsdp=2, expert=4)) == P(("fsdp", "expert"), None)
    assert ep.spec(("experts", "embed", "mlp"), mesh_of(data=8)) == P(None, None, None)
    assert ep.spec(("layers", "experts", "expert_embed"), mesh_of(fsdp=2, expert=4)) == P(
        None, "expert", "fsdp"
    )
    sh = sharding_of(dict(fsdp=2, expert=4), "ep_fsdp")
    assert sh.mesh_axes("embed") == ("fsdp", "expert") and sh.axis_size("embed") == 8
    assert sh.mesh_axes("heads") == () and sh.axis_size("heads") == 1
    assert sh.axis_size("experts") == 4


def test_constrain_is_identity_without_a_sharding():
    x = jnp.ones((8, 4))
    assert sharding.constrain(x, ("batch", None), None) is x
    assert Runtime.default().constrain(x, ("batch", None)) is x
    sh = sharding_of(dict(data=8), "dp")
    y = jax.jit(lambda x: Runtime.of(sh).constrain(x, ("batch", None)))(x)
    assert y.sharding.is_equivalent_to(sh.named(("batch", None)), 2)


def test_with_runtime_retargets_every_module(tiny):
    """The runtime is static graph data in every submodule; with_runtime swaps it everywhere,
    shares the arrays, and leaves the original model as it was."""
    model = nnx.eval_shape(lambda: DeepSeek(tiny, nnx.Rngs(0)))
    sh = sharding_of(dict(data=2, expert=4), "ep")
    moved = with_runtime(model, model.rt.replace(sharding=sh))
    before = [m.rt for _, m in nnx.iter_graph(model) if hasattr(m, "rt")]
    after = [m.rt for _, m in nnx.iter_graph(moved) if hasattr(m, "rt")]
    assert len(after) == len(before) > 10
    assert all(rt == Runtime.default() for rt in before)
    assert all(rt.sharding is sh and rt.cfg == model.rt.cfg for rt in after)
    assert nnx.graphdef(moved) != nnx.graphdef(model)
    assert jax.tree.structure(nnx.state(moved)) == jax.tree.structure(nnx.state(model))


# ---------------------------------------------------------------------------------------------
# Golden partition specs of every parameter of the tiny model


def _spec_json(spec: P) -> list:
    return [list(s) if isinstance(s, tuple) else s for s in spec]


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny").model


def test_golden_partition_specs(tiny):
    assert tiny.mtp.depth == 1
    abstract = nnx.state(nnx.eval_shape(lambda: DeepSeek(tiny, nnx.Rngs(0))))
    got = {}
    for name, sizes, preset in CASES:
        specs = sharding.state_specs(abstract, sharding_of(sizes, preset))
        got[name] = {
            dotted(path): _spec_json(v.get_value()) for path, v in nnx.to_flat_state(specs)
        }
        for path, v in nnx.to_flat_state(specs):  # stacked layers are never split
            if v.get_metadata()["axes"][0] == "layers":
                assert v.get_value()[0] is None, dotted(path)
    if REGEN:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    diffs = [
        f"{case} {path}: golden {want.get(case, {}).get(path, '<absent>')}, "
        f"now {got.get(case, {}).get(path, '<absent>')}"
        for case in sorted(set(want) | set(got))
        for path in sorted(set(want.get(case, {})) | set(got.get(case, {})))
        if want.get(case, {}).get(path, "<absent>") != got.get(case, {}).get(path, "<absent>")
    ]
    assert not diffs, "partition specs differ from the golden file " + (
        "(DEEPSEEK_JAX_REGEN_GOLDEN=1 regenerates it):\n" + "\n".join(diffs)
    )


def test_state_specs_needs_logical_axes():
    state = nnx.State({"w": nnx.Param(jax.ShapeDtypeStruct((4, 2), jnp.float32))})
    with pytest.raises(ShardingError, match=r"shape \(4, 2\) has no logical axes"):
        sharding.state_specs(state, sharding_of(dict(data=8), "dp"))


# ---------------------------------------------------------------------------------------------
# Sharded forward == single-device forward


@pytest.fixture(scope="module")
def f32_model(tiny):
    cfg = replace(tiny, init_std=0.05)
    graphdef, state = nnx.split(DeepSeek(cfg, nnx.Rngs(0), runtime=FP32))
    tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size)
    return graphdef, state, tokens


def _forward_fn(graphdef, sh: Sharding | None):
    def f(state, tokens):
        model = nnx.merge(graphdef, state)
        out = with_runtime(model, model.rt.replace(sharding=sh)).forward(tokens)
        return out.logits, out.mtp_logits, out.expert_load

    return f


@pytest.fixture(scope="module")
def reference(f32_model):
    graphdef, state, tokens = f32_model
    state, tokens = jax.device_put((state, tokens), CPUS[0])
    return jax.jit(_forward_fn(graphdef, None))(state, tokens)


@pytest.mark.parametrize("name,sizes,preset", CASES, ids=CASE_IDS)
def test_sharded_forward_matches_single_device(f32_model, reference, name, sizes, preset):
    graphdef, state, tokens = f32_model
    sh = sharding_of(sizes, preset)
    state = jax.device_put(state, sharding.state_shardings(state, sh))
    tokens = jax.device_put(tokens, sh.named(("batch", None)))
    compiled = jax.jit(_forward_fn(graphdef, sh)).lower(state, tokens).compile()
    logits, mtp_logits, load = compiled(state, tokens)

    ref_logits, ref_mtp, ref_load = reference
    assert logits.shape == (8, 32, 512) and mtp_logits.shape == (1, 8, 32, 512)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(mtp_logits, ref_mtp, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(load, ref_load)
    assert int(load.sum()) == 4 * 8 * 32 * 4  # 3 MoE layers + MTP, top-4 of every token

    expert_split = preset != "dp" and preset != "fsdp"
    for stack in ("moe_layers", "mtp"):
        ffn = state[stack]["block"]["ffn"] if stack == "mtp" else state[stack]["ffn"]
        for w in ROUTED:
            arr = ffn[w].get_value()
            assert ("expert" in arr.sharding.spec) == expert_split, (stack, w, arr.sharding)
            assert arr.sharding.spec[1] == ("expert" if expert_split else None)
            local_e = arr.addressable_shards[0].data.shape[1]
            assert local_e == (16 // 4 if expert_split else 16), (stack, w)

    if name == "ep/data=2,expert=4":
        hlo = compiled.as_text()
        # moe_dispatch=auto is the all-to-all dispatch at expert axis 4 >= top-4 (ops/moe_a2a.py).
        assert "all-to-all" in hlo


# ---------------------------------------------------------------------------------------------
# Dispatch errors


def test_dispatch_rejects_experts_not_divisible_by_the_expert_axis(tiny):
    cfg = replace(tiny, **{"moe.n_routed_experts": 12})  # 4 groups of 3: a valid config
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DeepSeek(cfg, nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((8, 32), jnp.int32)
    sh = sharding_of(dict(fsdp=1, expert=8), "ep")
    with pytest.raises(ShardingError, match="12 routed experts cannot be split over an expert "):
        jax.eval_shape(_forward_fn(graphdef, sh), state, tokens)


def test_dispatch_needs_the_expert_axis_to_split_the_batch(tiny):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DeepSeek(tiny, nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((8, 32), jnp.int32)
    rules = Rules({"batch": ("data",), "experts": ("expert",)})
    sh = Sharding(mesh_of(data=2, expert=4, fsdp=1), rules)
    with pytest.raises(ShardingError, match="must also split the batch"):
        jax.eval_shape(_forward_fn(graphdef, sh), state, tokens)
