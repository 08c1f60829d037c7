"""The train step: sharded == single device, state sharding and donation, the MTP weight λ,
gradient accumulation, aux-loss-free bias balancing, weight decay and the LR schedule, and whole
`deepseek-jax train` runs (two processes against one, metrics.jsonl, the loss falling).

Runs on 8 CPU devices (tests/conftest.py forces them). Exactness tests use fp32 compute and the
"highest" matmul precision; tolerances are stated at the top of each test and are fixed. Run with
`-s` to see the measured figures (losses per mesh, gradient differences, load imbalance).

Budget: every distinct config/mesh is one XLA compilation of ~10 s on 2 CPU cores, so each test
compiles as little as it can: the single-device reference (loss_and_grads and the step in one
program) is computed once per module, each mesh compiles only its real `jitted_step`, and the
step's gradient is read back from Adam's first moment (see `grads_from_adam`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax import sharding
from deepseek_jax.config import ConfigError, TrainConfig, load_config, replace
from deepseek_jax.train.optim import (
    adamw_with_moments,
    bias_gamma,
    clip_by_global_norm,
    decay_mask,
    learning_rate,
)
from deepseek_jax.train.step import Trainer, TrainState, update_router_bias
from deepseek_jax.train.synthetic import MarkovTokens

REPO = pathlib.Path(__file__).resolve().parent.parent
CPUS = jax.devices("cpu")
needs_8 = pytest.mark.skipif(
    len(CPUS) < 8, reason="needs 8 CPU devices (--xla_force_host_platform_device_count=8)"
)

BATCH, SEQ = 8, 16
# Adam's first update is lr·g/(|g| + eps): with eps 1e-8 a parameter whose gradient is ~1e-8
# flips its whole update on 1e-9 of rounding, so updated params could not be compared to 1e-6.
# With eps = 1e-4 the update is lr/eps = 3-Lipschitz in g (lr 3e-4 at step 0), and the clipped
# gradients (median 6e-5, max 3e-2 here) still move the median weight by ~lr/3.
BASE = [
    "runtime.compute_dtype=float32",
    f"train.batch_size={BATCH}",
    f"train.seq_len={SEQ}",
    "train.steps=10",
    "train.eps=1e-4",
]
# (id, mesh sizes with unused axes at 1, rules preset)
MESHES = [
    ("dp/data=8", dict(data=8, fsdp=1), "dp"),
    ("fsdp/fsdp=8", dict(fsdp=8), "fsdp"),
    ("ep/data=2,expert=4", dict(data=2, fsdp=1, expert=4), "ep"),
    ("ep_fsdp/fsdp=2,expert=4", dict(fsdp=2, expert=4), "ep_fsdp"),
]
ROUTED = ("gate_EDF", "up_EDF", "down_EFD")


@pytest.fixture(scope="module", autouse=True)
def cpu_highest_precision():
    """fp32 matmuls at full precision, and single-device work on the host CPU like the meshes
    (so the tests mean the same on a machine with an accelerator)."""
    with jax.default_matmul_precision("highest"), jax.default_device(CPUS[0]):
        yield


# ---------------------------------------------------------------------------------------------
# Helpers


def base_cfg(*overrides: str):
    return load_config("tiny", [*BASE, *overrides])


def markov_batch(step: int = 0, rows: int = BATCH, seq: int = SEQ) -> dict[str, np.ndarray]:
    return MarkovTokens(512, seq, seed=0).rows(step, 0, rows)


def mesh_trainer(cfg, sizes: dict, preset: str) -> Trainer:
    cfg = replace(cfg, **{f"mesh.{k}": v for k, v in sizes.items()}, **{"mesh.rules": preset})
    mesh = sharding.make_mesh(cfg.mesh, CPUS[:8])
    return Trainer.create(cfg, sharding.Sharding(mesh, sharding.rules_for(preset)))


def grads_and_step(trainer: Trainer, state, batch) -> dict:
    """One program: loss_and_grads and the full step (same code as jitted_step, no donation)."""

    def fn(state, batch):
        obj, aux, grads = trainer.loss_and_grads(state, batch)
        new_state, metrics = trainer.step(state, batch)
        return dict(obj=obj, aux=aux, grads=grads, new=new_state, metrics=metrics)

    if trainer.batch_sharding is not None:
        batch = jax.device_put(batch, trainer.batch_sharding)
    return jax.device_get(jax.jit(fn)(state, batch))


def flat(tree) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def max_abs_diff(a, b) -> tuple[float, str]:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    worst = max(fa, key=lambda k: np.max(np.abs(fa[k] - fb[k]), initial=0.0))
    return float(np.max(np.abs(fa[worst] - fb[worst]), initial=0.0)), worst


def opt_moments(opt_state, name: str) -> dict:
    """{param path: leaf} of the Adam moment `name` ('mu' or 'nu') in the optax state."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = [getattr(k, "name", getattr(k, "key", getattr(k, "idx", None))) for k in path]
        if name in keys:
            out[tuple(keys[keys.index(name) + 1 :])] = leaf
    return out


@pytest.fixture(scope="module")
def ref():
    """The single-device reference: initial params, the batch, gradients and one full step."""
    cfg = base_cfg()
    trainer = Trainer.create(cfg, None)
    state = trainer.init()
    batch = {k: jnp.asarray(v) for k, v in markov_batch().items()}
    out = grads_and_step(trainer, state, batch)
    out.update(
        cfg=cfg,
        batch=markov_batch(),
        params=jax.device_get(state.params),
        router_bias=jax.device_get(state.router_bias),
    )
    m = out["metrics"]
    print(
        f"\n[1 device] loss {m['loss']:.7f} lm {m['lm_loss']:.7f} mtp {m['mtp_loss']} "
        f"grad_norm {m['grad_norm']:.7f}"
    )
    return out


SCALARS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "z_loss", "grad_norm", "tokens")


def assert_same_metrics(got: dict, want: dict, rtol: float) -> None:
    for k in SCALARS:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=0, err_msg=k)
    np.testing.assert_array_equal(got["expert_load"], want["expert_load"])
    np.testing.assert_array_equal(got["learning_rate"], want["learning_rate"])


def grads_from_adam(new_state, metrics: dict, tc) -> dict:
    """The step's gradient, read back from Adam's first moment after one step from zero:
    mu = (1 - b1)·clip(g), clip(g) = g·grad_clip/|g| when |g| > grad_clip (exact up to ~3 ulp)."""
    scale = max(1.0, float(metrics["grad_norm"]) / tc.grad_clip) / (1 - tc.b1)
    mu = opt_moments(jax.device_get(new_state.opt_state), "mu")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: mu[tuple(k.key for k in path)] * scale, jax.device_get(new_state.params)
    )


@dataclasses.dataclass
class MeshRun:
    trainer: Trainer
    before: TrainState  # the input state, donated to the step
    new: TrainState
    metrics: dict
    hlo: str


@pytest.fixture(scope="module")
def mesh_run(ref):
    """One real `jitted_step` per mesh (lowered and compiled once, shared by the tests)."""
    runs: dict[str, MeshRun] = {}

    def run(name: str) -> MeshRun:
        if name not in runs:
            sizes, preset = {m[0]: m[1:] for m in MESHES}[name]
            trainer = mesh_trainer(ref["cfg"], sizes, preset)
            state = trainer.state_from_params(ref["params"], ref["router_bias"])
            batch = jax.device_put(ref["batch"], trainer.batch_sharding)
            compiled = trainer.jitted_step().lower(state, batch).compile()
            new, metrics = compiled(state, batch)
            runs[name] = MeshRun(trainer, state, new, jax.device_get(metrics), compiled.as_text())
        return runs[name]

    return run


def assert_placed(tree, shardings) -> None:
    got = jax.tree_util.tree_flatten_with_path(tree)[0]
    want = jax.tree.leaves(shardings)
    for (path, arr), sh in zip(got, want, strict=True):
        assert arr.sharding.is_equivalent_to(sh, arr.ndim), jax.tree_util.keystr(path)


# ---------------------------------------------------------------------------------------------
# 1. Sharded == single device


@needs_8
@pytest.mark.parametrize("name", [m[0] for m in MESHES])
def test_sharded_step_matches_single_device(ref, mesh_run, name):
    """The same initial params and batch on 1 device and on a mesh, one real jitted step each.
    Tolerance: objective and metrics rtol 1e-6 (~8 ulp of fp32 at 8.0); every gradient leaf
    and every updated parameter max |diff| <= 1e-6 (measured <= ~1e-7: sums run in another
    order); expert loads (integer counts) and the bias update are equal."""
    run = mesh_run(name)
    assert_placed(run.before, run.trainer.state_shardings)
    m = run.metrics
    grads = grads_from_adam(run.new, m, ref["cfg"].train)
    grad_diff, worst = max_abs_diff(grads, ref["grads"])
    new = jax.device_get(run.new)
    param_diff, pworst = max_abs_diff(new.params, ref["new"].params)
    print(
        f"\n[{name}] loss {m['loss']:.7f} lm {m['lm_loss']:.7f} mtp {m['mtp_loss']} "
        f"grad_norm {m['grad_norm']:.7f} | loss diff {float(m['loss'] - ref['obj']):.2e} "
        f"max|dgrad| {grad_diff:.2e} ({worst}) max|dparam| {param_diff:.2e} ({pworst})"
    )
    np.testing.assert_allclose(m["loss"], ref["obj"], rtol=1e-6, atol=0)
    assert_same_metrics(m, ref["metrics"], rtol=1e-6)
    assert grad_diff <= 1e-6, worst
    assert param_diff <= 1e-6, pworst
    assert max_abs_diff(new.router_bias, ref["new"].router_bias)[0] == 0.0
    # The logged loss is the objective: LM + λ/D·Σ MTP + α·Σ balance (z-loss weight is 0).
    tc = ref["cfg"].train
    total = (
        m["lm_loss"] + tc.mtp_lambda * np.sum(m["mtp_loss"]) + tc.balance_alpha * m["balance_loss"]
    )
    np.testing.assert_allclose(m["loss"], total, rtol=1e-6)
    assert int(new.step) == 1


# ---------------------------------------------------------------------------------------------
# 2. Train-state sharding, collectives and donation


@needs_8
def test_state_sharding_collectives_and_donation(mesh_run):
    """(data=2, expert=4), preset ep: routed experts and their Adam moments are split over
    'expert' (4 of the 16 experts per device); the compiled step has the dispatch collectives;
    the input state is donated and the new state keeps the state shardings."""
    run = mesh_run("ep/data=2,expert=4")
    e, d, f = 16, 128, 64
    local = {"gate_EDF": (3, e // 4, d, f), "up_EDF": (3, e // 4, d, f)}
    local["down_EFD"] = (3, e // 4, f, d)
    for state in (run.before, run.new):  # shapes of shards only on the live (new) state
        moments = {n: opt_moments(state.opt_state, n) for n in ("mu", "nu")}
        for w in ROUTED:
            arrays = [state.params["moe_layers"]["ffn"][w]]
            arrays += [moments[n][("moe_layers", "ffn", w)] for n in ("mu", "nu")]
            for arr in arrays:
                assert arr.sharding.spec == P(None, "expert", None, None), w
                if state is run.new:
                    assert {s.data.shape for s in arr.addressable_shards} == {local[w]}, w
        # The MTP block's experts too; the stacked depth/layer axis is never split.
        mtp_gate = state.params["mtp"]["block"]["ffn"]["gate_EDF"]
        assert mtp_gate.sharding.spec == P(None, "expert", None, None)
        bias = state.router_bias["moe_layers"]["ffn"]["router_bias_E"]
        assert bias.sharding.spec == P(None, "expert")
        # Under 'ep' with fsdp=1 the embedding (like attention) is replicated.
        assert state.params["embed"]["table_VD"].sharding.spec == P(None, None)
        # Adam moments mirror the params (and nothing else: the router bias is not there).
        for n in ("mu", "nu"):
            assert set(moments[n]) == set(flat_paths(state.params))

    counts = {
        op: len(re.findall(rf"\b{op}(-start)?\(", run.hlo))
        for op in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
    }
    print(f"\ncollectives in the (data=2, expert=4) step: {counts}")
    # all-to-all: routed rows to their experts' owners and results back (moe_dispatch=auto picks
    # it here, expert axis 4 >= top-4; ops/moe_a2a.py); all-reduce: gradients of the weights
    # replicated over the data-like axes.
    assert counts["all-to-all"] > 0 and counts["all-reduce"] > 0

    assert all(x.is_deleted() for x in jax.tree.leaves(run.before)), "state was not donated"
    assert not any(x.is_deleted() for x in jax.tree.leaves(run.new))
    assert_placed(run.new, run.trainer.state_shardings)


def flat_paths(tree) -> list[tuple]:
    """Dict-key paths of the leaves (arrays, or logical-axes tuples in an axes tree)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))
    return [tuple(getattr(k, "key", None) for k in path) for path, _ in leaves[0]]


# ---------------------------------------------------------------------------------------------
# 3. The MTP weight λ


def test_mtp_lambda_zero_is_the_lm_objective_and_the_schedule_switches(ref):
    """λ = mtp_lambda (0) before mtp_lambda_switch_step (3), mtp_lambda_final (0.5) from it.
    With λ = 0 (and α = 0, since the MTP block's own balance loss would reach the trunk):
    objective == lm_sum / N bitwise; MTP gradients exactly 0; main-model gradients equal a
    depth-0 model's to 1e-6 (max abs)."""
    cfg = base_cfg(
        "train.mtp_lambda=0",
        "train.mtp_lambda_final=0.5",
        "train.mtp_lambda_switch_step=3",
        "train.balance_alpha=0",
    )
    trainer = Trainer.create(cfg, None)
    state = trainer.state_from_params(ref["params"], ref["router_bias"])
    batch = {k: jnp.asarray(v) for k, v in ref["batch"].items()}
    lg = jax.jit(trainer.loss_and_grads)

    obj0, aux0, grads0 = jax.device_get(lg(state, batch))
    n = np.float32(BATCH * SEQ)
    lm = np.float32(aux0["sums"]["lm"])
    mtp = np.float32(aux0["sums"]["mtp"][0])
    assert obj0 == lm / n, (obj0, lm / n)
    assert mtp > 0
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads0["mtp"]))
    obj2 = jax.device_get(lg(state.replace(step=jnp.int32(2)), batch)[0])
    obj3 = jax.device_get(lg(state.replace(step=jnp.int32(3)), batch)[0])
    assert obj2 == obj0
    np.testing.assert_allclose(obj3, (lm + np.float32(0.5) * mtp) / n, rtol=1e-6)
    assert obj3 > obj0

    cfg0 = replace(cfg, **{"model.mtp.depth": 0})
    trainer0 = Trainer.create(cfg0, None)
    params0 = {k: v for k, v in ref["params"].items() if k != "mtp"}
    bias0 = {k: v for k, v in ref["router_bias"].items() if k != "mtp"}
    state0 = trainer0.state_from_params(params0, bias0)
    obj_d0, _, grads_d0 = jax.device_get(jax.jit(trainer0.loss_and_grads)(state0, batch))
    main = {k: v for k, v in grads0.items() if k != "mtp"}
    diff, worst = max_abs_diff(main, grads_d0)
    print(f"\nλ=0 vs depth 0: obj {obj0:.7f} vs {obj_d0:.7f}, max|dgrad| {diff:.2e} ({worst})")
    np.testing.assert_allclose(obj0, obj_d0, rtol=1e-6)
    assert diff <= 1e-6, worst


# ---------------------------------------------------------------------------------------------
# 4. Gradient accumulation


def test_micro_batches_match_the_full_batch(ref):
    """micro_batches=4 (rows i, i+4, ... per micro-batch) vs 1 on the same 8 sequences, one real
    jitted step each. The accumulated gradient is read back from Adam's first moment, which
    after one step is exactly (1 - b1)·clip(g), clip(g) = g·grad_clip/|g| when |g| > grad_clip.
    Tolerance: objective, loss terms, grad norm rtol 1e-6; gradients and updated params
    max |diff| <= 1e-6; expert loads and the bias update equal."""
    cfg = replace(ref["cfg"], **{"train.micro_batches": 4})
    trainer = Trainer.create(cfg, None)
    state = trainer.state_from_params(ref["params"], ref["router_bias"])
    batch = {k: jnp.asarray(v) for k, v in ref["batch"].items()}
    new, metrics = jax.device_get(trainer.jitted_step()(state, batch))
    assert_same_metrics(metrics, ref["metrics"], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref["obj"], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(metrics["expert_load"], ref["aux"]["load"])

    grads = grads_from_adam(new, metrics, cfg.train)
    grad_diff, worst = max_abs_diff(grads, ref["grads"])
    param_diff, pworst = max_abs_diff(new.params, ref["new"].params)
    print(
        f"\nmicro_batches=4 vs 1: loss diff {float(metrics['loss'] - ref['obj']):.2e}, "
        f"max|dgrad| {grad_diff:.2e} ({worst}), max|dparam| {param_diff:.2e} ({pworst})"
    )
    assert grad_diff <= 1e-6, worst
    assert param_diff <= 1e-6, pworst
    assert max_abs_diff(new.router_bias, ref["new"].router_bias)[0] == 0.0


# ---------------------------------------------------------------------------------------------
# 5. Aux-loss-free balancing


def test_update_router_bias_rule():
    bias = {
        "moe_layers": {"ffn": {"router_bias_E": jnp.zeros((2, 4))}},
        "mtp": {"block": {"ffn": {"router_bias_E": jnp.full((1, 4), 0.5)}}},
    }
    load = jnp.array([[4, 0, 2, 2], [1, 1, 1, 5], [0, 3, 3, 2]], jnp.int32)  # means 2, 2, 2
    new = update_router_bias(bias, load, 0.1)
    np.testing.assert_allclose(
        new["moe_layers"]["ffn"]["router_bias_E"], [[-0.1, 0.1, 0, 0], [0.1, 0.1, 0.1, -0.1]]
    )
    np.testing.assert_allclose(
        new["mtp"]["block"]["ffn"]["router_bias_E"], [[0.6, 0.4, 0.4, 0.5]], rtol=1e-6
    )
    same = update_router_bias(bias, load, 0.0)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(bias), strict=True)
    )
    with pytest.raises(ValueError, match="2 rows of expert load for 3 router biases"):
        update_router_bias(bias, load[:2], 0.1)
    with pytest.raises(ValueError, match="4 rows of expert load for 3 router biases"):
        update_router_bias(bias, jnp.concatenate([load, load[:1]]), 0.1)


def test_router_bias_is_not_a_parameter():
    trainer = Trainer.create(base_cfg(), None)
    param_paths = [".".join(map(str, p)) for p in flat_paths(trainer.param_axes)]
    assert not any("router_bias" in p for p in param_paths)
    assert {".".join(map(str, p)) for p in flat_paths(trainer.bias_axes)} == {
        "moe_layers.ffn.router_bias_E",
        "mtp.block.ffn.router_bias_E",
    }
    state = jax.eval_shape(trainer.init)
    assert set(flat_paths(state.params)) == set(flat_paths(trainer.param_axes))
    for n in ("mu", "nu"):
        assert set(opt_moments(state.opt_state, n)) == set(flat_paths(trainer.param_axes))
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert sum("router_bias" in p for p in opt_paths) == 2  # only state.router_bias itself


@needs_8
def test_bias_balancing_unloads_overloaded_experts(ref):
    """Biases start at +0.2 on experts 0-3 (all of group 0), so every token of every MoE layer
    picks those 4 of 16 experts: max/mean load ~4.0 (>= 3.8). With γ = 0.01 and a negligible
    learning rate, 30 steps on the (data=2, expert=4) mesh must bring the average max/mean over
    the last 10 steps below 2.2 in every layer and close the bias gap to < 0.05."""
    cfg = base_cfg(
        "train.bias_gamma=0.01",
        "train.bias_gamma_final=null",  # γ constant, as stated (tiny's recipe decays it)
        "train.learning_rate=1e-9",
        "train.min_learning_rate=0",
        "train.warmup_steps=0",
    )
    trainer = mesh_trainer(cfg, dict(data=2, fsdp=1, expert=4), "ep")
    favored = (np.arange(16) < 4).astype(np.float32)
    bias0 = jax.tree.map(lambda b: b + 0.2 * favored, ref["router_bias"])
    state = trainer.state_from_params(ref["params"], bias0)
    step = trainer.jitted_step()
    imbalance = []
    for i in range(30):
        batch = jax.device_put(markov_batch(step=i), trainer.batch_sharding)
        state, metrics = step(state, batch)
        imbalance.append(np.asarray(metrics["load_imbalance"]))
    imbalance = np.stack(imbalance)  # [steps, 3 MoE layers + 1 MTP block]
    first, last = imbalance[0], imbalance[-10:].mean(0)
    bias = jax.device_get(state.router_bias)
    gaps = [float(b[..., :4].mean() - b[..., 4:].mean()) for b in jax.tree.leaves(bias)]
    print(
        f"\nmax/mean load per layer: step 1 {np.round(first, 2)}, step 30 "
        f"{np.round(imbalance[-1], 2)}, mean of last 10 {np.round(last, 2)}; bias gap (favored - "
        f"others) 0.2 -> {np.round(gaps, 3)}"
    )
    assert np.all(first >= 3.8), first
    assert np.all(last < 2.2), last
    assert all(abs(g) < 0.05 for g in gaps), gaps
    moved = max_abs_diff(bias, bias0)[0]
    assert moved > 0.1


# ---------------------------------------------------------------------------------------------
# 6. Weight decay mask and the LR schedule


def test_decay_mask_covers_matrices_only():
    trainer = Trainer.create(base_cfg(), None)
    mask = decay_mask(trainer.param_axes)
    flat_mask = dict(zip(flat_paths(trainer.param_axes), jax.tree.leaves(mask), strict=True))
    flat_axes = dict(
        zip(
            flat_paths(trainer.param_axes),
            jax.tree.leaves(trainer.param_axes, is_leaf=lambda x: isinstance(x, tuple)),
            strict=True,
        )
    )
    norms = [p for p in flat_mask if p[-1] == "scale"]
    assert len(norms) >= 10  # attn/ffn/q/kv norms per stack, final norm, MTP norms
    for path, decayed in flat_mask.items():
        is_matrix = len([a for a in flat_axes[path] if a != "layers"]) >= 2
        assert decayed == is_matrix == (path[-1] != "scale"), (path, flat_axes[path])
    assert flat_mask[("final_norm", "scale")] is False
    assert flat_mask[("moe_layers", "attn", "q_norm", "scale")] is False
    assert flat_mask[("moe_layers", "ffn", "gate_EDF")] is True
    assert flat_mask[("embed", "table_VD")] is True


def test_zero_gradient_step_decays_matrices_only(ref):
    """Loss mask all zero and α = 0: every gradient is exactly 0, so one step only applies
    decoupled weight decay, p -> p·(1 - lr·wd) on matrices (rtol 1e-6) and nothing on norm
    scales (bitwise). γ = 0: the router biases are bitwise unchanged."""
    cfg = base_cfg(
        "train.learning_rate=0.1",
        "train.min_learning_rate=0.01",
        "train.warmup_steps=0",
        "train.weight_decay=0.1",
        "train.balance_alpha=0",
        "train.bias_gamma=0",
    )
    trainer = Trainer.create(cfg, None)
    state = trainer.state_from_params(ref["params"], ref["router_bias"])
    before = jax.device_get(state)
    batch = {k: jnp.asarray(v) for k, v in markov_batch().items()}
    batch["loss_mask"] = jnp.zeros_like(batch["loss_mask"])
    new, metrics = jax.device_get(trainer.jitted_step()(state, batch))
    assert metrics["grad_norm"] == 0.0 and metrics["loss"] == 0.0
    np.testing.assert_allclose(metrics["learning_rate"], 0.1)
    mask = jax.tree.leaves(decay_mask(trainer.param_axes))
    old_p, new_p = flat(before.params), flat(new.params)
    for decayed, key in zip(mask, old_p, strict=True):
        if decayed:
            np.testing.assert_allclose(new_p[key], old_p[key] * (1 - 0.1 * 0.1), rtol=1e-6)
            assert np.any(new_p[key] != old_p[key]), key
        else:
            np.testing.assert_array_equal(new_p[key], old_p[key], err_msg=key)
    for a, b in zip(
        jax.tree.leaves(new.router_bias), jax.tree.leaves(before.router_bias), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == 1


def test_global_norm_clip_matches_optax():
    """One scalar factor min(1, max/||g||) against optax.clip_by_global_norm's select: bitwise
    when the norm is under the limit, within fp32 rounding (rtol 1e-6) when it clips, to a
    global norm of max_norm; the same (empty) state."""
    import optax

    rng = np.random.default_rng(0)
    g = {
        "a": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
    }
    norm = float(np.sqrt(sum((np.asarray(v, np.float64) ** 2).sum() for v in g.values())))
    for max_norm in (2 * norm, norm / 3):
        ours, theirs = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
        got, state = jax.jit(ours.update)(g, ours.init(g))
        want, their_state = jax.jit(theirs.update)(g, theirs.init(g))
        assert jax.tree.structure(state) == jax.tree.structure(their_state)
        for k in g:
            if max_norm > norm:
                np.testing.assert_array_equal(got[k], g[k])
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
        clipped = np.sqrt(sum((np.asarray(v, np.float64) ** 2).sum() for v in got.values()))
        np.testing.assert_allclose(clipped, min(norm, max_norm), rtol=1e-6)


def test_bf16_adam_moments_update_from_the_stored_moments():
    """train.adam_moments=bfloat16 (V3's optimizer state): each step forms the new mu and nu in
    fp32 from the stored bf16 ones, stores them rounded, and takes its update from the stored
    values (NumPy Adam below, rounding the moments after every step). fp32 moments are
    optax.adamw bit for bit; both states have optax's structure."""
    lr, b1, b2, eps = 1e-2, 0.9, 0.95, 1e-8
    cfg = replace(
        TrainConfig(),
        learning_rate=lr,
        min_learning_rate=lr,
        warmup_steps=0,
        weight_decay=0.0,
        b1=b1,
        b2=b2,
        eps=eps,
    )
    axes = {"w": ("embed", "mlp")}
    rng = np.random.default_rng(1)
    p = {"w": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)} for _ in range(3)]
    tx = adamw_with_moments(replace(cfg, adam_moments="bfloat16"), decay_mask(axes))
    tx32 = adamw_with_moments(cfg, decay_mask(axes))
    optax32 = optax.adamw(
        lambda count: learning_rate(cfg, count),
        b1,
        b2,
        eps,
        weight_decay=0.0,
        mask=decay_mask(axes),
    )
    state, state32, their32 = tx.init(p), tx32.init(p), optax32.init(p)
    assert state[0].mu["w"].dtype == state[0].nu["w"].dtype == jnp.bfloat16
    assert state32[0].mu["w"].dtype == jnp.float32
    assert jax.tree.structure(state) == jax.tree.structure(state32)
    assert jax.tree.structure(state32) == jax.tree.structure(their32)

    def bf16(x):
        return np.asarray(np.asarray(x, np.float32).astype(jnp.bfloat16), np.float64)

    update, update32, their_update32 = (jax.jit(t.update) for t in (tx, tx32, optax32))
    mu = nu = np.zeros((32, 16))
    for step, g in enumerate(grads, start=1):
        u, state = update(g, state, p)
        u32, state32 = update32(g, state32, p)
        their_u32, their32 = their_update32(g, their32, p)
        np.testing.assert_array_equal(u32["w"], their_u32["w"])
        g64 = np.asarray(g["w"], np.float64)
        mu = bf16((1 - b1) * g64 + b1 * mu)
        nu = bf16((1 - b2) * g64 * g64 + b2 * nu)
        np.testing.assert_array_equal(np.asarray(state[0].mu["w"], np.float64), mu)
        np.testing.assert_array_equal(np.asarray(state[0].nu["w"], np.float64), nu)
        want = -lr * (mu / (1 - b1**step)) / (np.sqrt(nu / (1 - b2**step)) + eps)
        np.testing.assert_allclose(np.asarray(u["w"], np.float64), want, rtol=1e-5, atol=1e-7)
    assert state[0].mu["w"].dtype == state[0].nu["w"].dtype == jnp.bfloat16


def test_bf16_adam_moments_config_is_checked():
    with pytest.raises(ConfigError, match="adam_moments='float16'"):
        replace(TrainConfig(), adam_moments="float16")
    with pytest.raises(ConfigError, match="b2=0.999"):
        replace(TrainConfig(), adam_moments="bfloat16", b2=0.999)
    assert replace(TrainConfig(), adam_moments="bfloat16").b2 == 0.95


def test_learning_rate_schedule():
    """Linear warmup (step+1)/W·peak reaching the peak at step W-1, cosine from the peak at
    step W to the minimum at `steps`, then flat. Tolerance rtol 1e-6 (fp32 arithmetic)."""
    tc = TrainConfig(steps=110, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-4)
    lr = np.asarray([learning_rate(tc, s) for s in range(130)])
    np.testing.assert_allclose(lr[:10], 1e-3 * np.arange(1, 11) / 10, rtol=1e-6)
    np.testing.assert_allclose(lr[10], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(lr[60], (1e-3 + 1e-4) / 2, rtol=1e-6)
    np.testing.assert_allclose(lr[35], 1e-4 + 0.5 * 9e-4 * (1 + np.cos(np.pi / 4)), rtol=1e-6)
    np.testing.assert_allclose(lr[110:], 1e-4, rtol=1e-6)
    assert np.all(np.diff(lr[:10]) > 0) and np.all(np.diff(lr[10:111]) < 0)
    no_warmup = TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-3, min_learning_rate=0.0)
    np.testing.assert_allclose(learning_rate(no_warmup, 0), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(learning_rate(no_warmup, 10), 0.0, atol=1e-12)


def test_bias_gamma_schedule():
    """Constant γ by default; with bias_gamma_final a cosine from bias_gamma at step 0 to the
    final value at `steps`, flat after. Tolerance rtol 1e-6 (fp32 arithmetic)."""
    np.testing.assert_allclose(bias_gamma(TrainConfig(bias_gamma=0.01), 57), 0.01, rtol=1e-6)
    tc = TrainConfig(steps=100, bias_gamma=0.02, bias_gamma_final=0.002)
    g = np.asarray([bias_gamma(tc, s) for s in range(120)])
    np.testing.assert_allclose(g[0], 0.02, rtol=1e-6)
    np.testing.assert_allclose(g[50], 0.011, rtol=1e-6)
    np.testing.assert_allclose(g[100:], 0.002, rtol=1e-6)
    assert np.all(np.diff(g[:101]) < 0)
    with pytest.raises(ConfigError, match=r"train.bias_gamma_final=-1"):
        TrainConfig(bias_gamma_final=-1)


# ---------------------------------------------------------------------------------------------
# 7-8. Whole runs through the command line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int | None) -> dict:
    """This environment without any forced device count, plus `devices` CPU devices."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _read_metrics(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(cmd: list[str], env: dict, timeout: float, logs: list[pathlib.Path] = ()):
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        text = "".join(p.read_text()[-3000:] for p in logs if p.exists())
        pytest.fail(f"{cmd} failed ({result.returncode}):\n{result.stderr[-3000:]}\n{text}")
    return result


RUN = [
    "train.steps=5",
    f"train.batch_size={BATCH}",
    f"train.seq_len={SEQ}",
    "mesh.data=2",
    "mesh.expert=4",
    "mesh.fsdp=1",
    "runtime.compute_dtype=float32",
    "train.peak_flops_per_device=1e11",
]
# The process-count-invariant Markov source: with a document corpus (tiny.yaml's stdlib) each
# process reads its own share of the documents, so 1 and 2 processes see different batches.
QUIET = [
    "data.kind=synthetic",
    "train.progress_bar=false",
    "train.tensorboard=false",
    "train.eval_every=0",
]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 processes × 4 CPU devices (jax.distributed, gloo; the data axis spans the processes:
    a hybrid mesh with mesh.dcn_data=2) vs 1 process × 8 devices on the same (data=2, expert=4)
    mesh. The 5 logged steps agree to rtol 1e-6 (cross-process gloo sums run in another order,
    so not bitwise); expert loads are equal."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    launch = [sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "4"]
    launch += ["--port", str(_free_port()), "--log-dir", str(multi / "logs"), "--timeout", "400"]
    logs = [multi / "logs" / f"process_{i}.log" for i in range(2)]
    _run(
        [*launch, "--", "tiny", *RUN, *QUIET, "mesh.dcn_data=2", f"train.run_dir={multi}"],
        _env(None),
        timeout=450,
        logs=logs,
    )
    _run(
        [sys.executable, "-m", "deepseek_jax.cli", "train", "tiny", *RUN, *QUIET]
        + [f"train.run_dir={single}"],
        _env(8),
        timeout=300,
    )
    a, b = _read_metrics(multi), _read_metrics(single)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4, 5]
    worst, bitwise = 0.0, True
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "lm_loss", "mtp_loss", "grad_norm", "balance_loss"):
            xa, ya = np.asarray(x[k], np.float64), np.asarray(y[k], np.float64)
            np.testing.assert_allclose(xa, ya, rtol=1e-6, atol=0, err_msg=f"step {x['step']} {k}")
            worst = max(worst, float(np.max(np.abs(xa - ya) / np.abs(ya))))
            bitwise &= bool(np.array_equal(xa, ya))
        assert x["expert_load"] == y["expert_load"]
    print(
        "\n2 processes vs 1: losses "
        f"{[round(m['loss'], 6) for m in a]} vs {[round(m['loss'], 6) for m in b]}; "
        f"max relative diff {worst:.2e}, bitwise {bitwise}"
    )
