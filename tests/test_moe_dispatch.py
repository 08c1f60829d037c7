"""Expert-parallel dispatch (model/dispatch.py, ops/moe_a2a.py) == the local dispatch.

On 8 CPU devices (tests/conftest.py forces them), for expert axes of 2, 4 and 8 inside several
meshes, the all-to-all dispatch (and the all-gather one) give the local dispatch's output and
its gradients with respect to the tokens, the routing weights and the three expert weights.
Routings: random top-K; every token on the experts of one device (the worst case: with a small
buffer factor it needs several overflow rounds, counted here from the routing); and routings
that leave experts, or whole devices, idle.

XLA:CPU has no ragged_all_to_all, so these runs use the dense exchange. The ragged exchange's
offsets and sizes are checked by running it with `jax.lax.ragged_all_to_all` replaced by an
emulation written from that primitive's documented semantics (its real lowering is compiled for
TPU in bench/moe_dispatch_bytes.py).

Tolerance: max |diff| <= 2e-5 on values of order 1-10 (fp32 at the "highest" matmul precision;
sums over a token's K experts and over rounds run in another order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import MeshConfig
from deepseek_jax.model import dispatch
from deepseek_jax.ops import moe_a2a
from deepseek_jax.sharding import Sharding, make_mesh, rules_for

CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(
    len(CPUS) < 8, reason="needs 8 CPU devices (--xla_force_host_platform_device_count=8)"
)

N, D, F, E, K = 128, 16, 24, 32, 4
TOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"), jax.default_device(CPUS[0]):
        yield


def routing(kind: str) -> jax.Array:
    """experts [N, K] int32, K distinct experts per token."""
    key = jax.random.key(1)
    if kind == "random":
        scores = jax.random.uniform(key, (N, E))
    elif kind == "one_device":  # every token picks among the 4 experts of device 0 (at EP 8)
        scores = jax.random.uniform(key, (N, E)) + (jnp.arange(E) < E // 8)
    elif kind == "idle":  # experts 8-15 (device 1 at EP 4, devices 2-3 at EP 8) and 31 idle
        busy = (jnp.arange(E) // 8 != 1) & (jnp.arange(E) != E - 1)
        scores = jnp.where(busy, jax.random.uniform(key, (N, E)), -1.0)
    else:
        raise ValueError(kind)
    return jax.lax.top_k(scores, K)[1].astype(jnp.int32)


@pytest.fixture(scope="module")
def params():
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (N, D))
    weights = jax.random.uniform(ks[1], (N, K), minval=0.1, maxval=1.0)
    gate = jax.random.normal(ks[2], (E, D, F)) / np.sqrt(D)
    up = jax.random.normal(ks[3], (E, D, F)) / np.sqrt(D)
    down = jax.random.normal(ks[4], (E, F, D)) / np.sqrt(F)
    cot = jax.random.normal(ks[5], (N, D))
    return x, weights, gate, up, down, cot


def value_and_grads(params, experts, **knobs):
    """Output and the VJP of <output, cot> w.r.t. x, the routing weights and the expert weights."""
    x, weights, gate, up, down, cot = params

    def f(x, weights, gate, up, down):
        y = dispatch.dispatch_routed(x, experts, weights, gate, up, down, **knobs)
        return jnp.sum(y * cot), y

    grad_fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))
    (_, y), grads = grad_fn(x, weights, gate, up, down)
    return jax.device_get((y, grads))


_REFERENCE = {}


def reference(params, kind):
    if kind not in _REFERENCE:
        _REFERENCE[kind] = value_and_grads(params, routing(kind), mesh_sharding=None)
    return _REFERENCE[kind]


def assert_same(got, want):
    (y, grads), (y_ref, grads_ref) = got, want
    np.testing.assert_allclose(y, y_ref, atol=TOL, rtol=0)
    for name, g, g_ref in zip(
        ("x", "weights", "gate", "up", "down"), grads, grads_ref, strict=True
    ):
        np.testing.assert_allclose(g, g_ref, atol=TOL, rtol=0, err_msg=f"d/d{name}")
        assert np.abs(g_ref).max() > 0.1, name  # the gradient is not trivially zero


def mesh_sharding(**sizes) -> Sharding:
    sizes = {"fsdp": 1, **sizes}
    return Sharding(make_mesh(MeshConfig(**sizes), CPUS[:8]), rules_for("ep"))


def rounds_needed(experts: jax.Array, ep: int, factor: float) -> int:
    """All-to-all rounds for this routing: the largest (sender, receiver) block over B."""
    n_dev = 8  # the batch is split over every device, N/8 consecutive tokens each
    owner = np.asarray(experts).reshape(n_dev, -1) // (E // ep)  # [device, its pairs]
    worst = max(np.bincount(row, minlength=ep).max() for row in owner)
    b = moe_a2a.buffer_rows(N // n_dev * K, ep, factor)
    return -(-worst // b)


# (mesh sizes, routing, buffer factor): EP 8, 4 and 2 in several meshes.
CASES = [
    (dict(expert=8), "random", 1.25),
    (dict(expert=8), "one_device", 1.25),
    (dict(data=2, expert=4), "random", 1.25),
    (dict(data=2, expert=4), "idle", 0.5),
    (dict(data=2, fsdp=2, expert=2), "one_device", 0.25),
]


@pytest.mark.parametrize("sizes,kind,factor", CASES, ids=lambda c: str(c))
def test_all_to_all_equals_local(params, sizes, kind, factor):
    sh = mesh_sharding(**sizes)
    experts = routing(kind)
    rounds = rounds_needed(experts, sizes["expert"], factor)
    print(f"\n{sizes} {kind} factor {factor}: {rounds} round(s)")
    if kind == "one_device":
        assert rounds >= 4  # the worst case really runs overflow rounds
    got = value_and_grads(
        params, experts, mesh_sharding=sh, dispatch="all_to_all", buffer_factor=factor
    )
    assert_same(got, reference(params, kind))


def test_all_gather_equals_local(params):
    got = value_and_grads(
        params,
        routing("idle"),
        mesh_sharding=mesh_sharding(fsdp=2, expert=4),
        dispatch="all_gather",
    )
    assert_same(got, reference(params, "idle"))


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """`jax.lax.ragged_all_to_all` as its docstring defines it, from all_gather (CPU has none).

    Peer q's slice i (i = this device's index) of operand[input_offsets[i]:][:send_sizes[i]]
    lands at output[q's output_offsets[i]:]. A recv_sizes that disagrees with what the peer
    sends poisons the result with NaN (the primitive requires them to match).
    """
    me = jax.lax.axis_index(axis_name)
    ops, in_off, sizes, out_off = (
        jax.lax.all_gather(a, axis_name)
        for a in (operand, input_offsets, send_sizes, output_offsets)
    )
    rows = jnp.arange(output.shape[0])
    result = output
    for q in range(ops.shape[0]):
        start, size, dst = in_off[q, me], sizes[q, me], out_off[q, me]
        take = (rows >= dst) & (rows < dst + size)
        src = jnp.clip(rows - dst + start, 0, operand.shape[0] - 1)
        result = jnp.where(take[:, None], ops[q][src], result)
    agreed = jnp.all(sizes[:, me] == recv_sizes)
    return jnp.where(agreed, result, jnp.nan)


@pytest.mark.parametrize("kind,factor", [("one_device", 0.5), ("idle", 1.25)])
def test_ragged_exchange_offsets(params, monkeypatch, kind, factor):
    monkeypatch.setattr(moe_a2a, "exchange_kind", lambda platform: "ragged")
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    got = value_and_grads(
        params,
        routing(kind),
        mesh_sharding=mesh_sharding(expert=8),
        dispatch="all_to_all",
        buffer_factor=factor,
    )
    assert_same(got, reference(params, kind))


def test_buffer_rows():
    assert moe_a2a.buffer_rows(32768, 64, 1.25) == 640  # V3 at EP 64: 512 mean, ×1.25
    assert moe_a2a.buffer_rows(8192, 64, 1.25) == 160
    assert moe_a2a.buffer_rows(64, 8, 1.25) == 16  # 10 rounded up to a sublane tile of 8
    assert moe_a2a.buffer_rows(64, 2, 4.0) == 64  # never more than every row
    assert moe_a2a.buffer_rows(64, 8, 0.01) == 8


def test_auto_dispatch_and_errors():
    assert dispatch.choose_dispatch("auto", 4, 8) == "all_gather"
    assert dispatch.choose_dispatch("auto", 8, 8) == "all_to_all"
    assert dispatch.choose_dispatch("auto", 64, 8) == "all_to_all"
    assert dispatch.choose_dispatch("all_gather", 64, 8) == "all_gather"
    with pytest.raises(ValueError, match=r"runtime.moe_dispatch='ragged' .*'all_to_all'"):
        dispatch.choose_dispatch("ragged", 8, 8)


# ---------------------------------------------------------------------------------------------
# The whole train step with moe_dispatch=all_to_all == one device


def test_train_step_all_to_all_equals_one_device():
    """tiny (16 experts, top-4, fp32 compute), batch 8 x 16: one step on one device and on an
    expert=8 mesh with runtime.moe_dispatch=all_to_all and buffer factor 0.25 (B = 8 rows per
    peer, against up to 16 a device can send one peer: overflow rounds). tests/test_train.py
    runs the EP-4 meshes, where moe_dispatch=auto is all_to_all too. Tolerances as there: loss
    rtol 1e-6, updated params and Adam's first moment (0.1·grad) max |diff| <= 1e-6 and 1e-7;
    expert loads equal."""
    from flax import nnx

    from deepseek_jax import sharding
    from deepseek_jax.config import load_config
    from deepseek_jax.model import DeepSeek
    from deepseek_jax.model.moe import RouterBias
    from deepseek_jax.train.step import Trainer
    from deepseek_jax.train.synthetic import MarkovTokens

    base = [
        "runtime.compute_dtype=float32",
        "train.batch_size=8",
        "train.seq_len=16",
        "train.eps=1e-4",
    ]
    batch = MarkovTokens(512, 16, seed=0).rows(0, 0, 8)
    single = Trainer.create(load_config("tiny", base), None)
    # Eager init (many tiny ops) instead of compiling Trainer.init: compiles are the cost here.
    model = DeepSeek(single.cfg.model, nnx.Rngs(0), runtime=single.runtime)
    _, params, bias = nnx.split(model, nnx.Param, RouterBias)
    params, bias = nnx.to_pure_dict(params), nnx.to_pure_dict(bias)
    state = single.state_from_params(params, bias)
    want_state, want = jax.device_get(jax.jit(single.step)(state, batch))

    for sizes, factor in ((dict(expert=8, fsdp=1), 0.25),):  # more meshes: more compiles
        over = [f"mesh.{k}={v}" for k, v in sizes.items()]
        over += ["runtime.moe_dispatch=all_to_all", f"runtime.moe_a2a_buffer_factor={factor}"]
        cfg = load_config("tiny", [*base, *over])
        mesh = sharding.make_mesh(cfg.mesh, CPUS[:8])
        trainer = Trainer.create(cfg, sharding.Sharding(mesh, sharding.rules_for("ep")))
        st = trainer.state_from_params(params, bias)
        step = jax.jit(trainer.step)
        hlo = step.lower(st, jax.device_put(batch, trainer.batch_sharding)).as_text()
        assert "all_to_all" in hlo or "all-to-all" in hlo  # the a2a dispatch is what ran
        got_state, got = jax.device_get(step(st, jax.device_put(batch, trainer.batch_sharding)))
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
        np.testing.assert_array_equal(got["expert_load"], want["expert_load"])
        for a, b in zip(
            jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params), strict=True
        ):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        for a, b in zip(
            jax.tree.leaves(got_state.opt_state), jax.tree.leaves(want_state.opt_state), strict=True
        ):
            np.testing.assert_allclose(a, b, atol=1e-7, rtol=0)
