"""Compile the real train step (or one decode step) ahead of time for a TPU slice, no TPU needed.

The program is the one training runs: `Trainer.jitted_step()` with its explicit shardings, on a
mesh of compile-only TPU devices from libtpu (`jax.experimental.topologies`). Its inputs are
abstract (`jax.eval_shape` of the state, with the trainer's shardings): nothing is allocated.
The compiler's verdict decides whether it fits: a RESOURCE_EXHAUSTED compile error means the
program needs more HBM than the chip has.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import sharding
from deepseek_jax.config import Config
from deepseek_jax.plan.chips import Topology
from deepseek_jax.plan.hlo import HloSummary, summarize

LIBTPU_HINT = 'pip install -e ".[tpu-aot]"  (libtpu==0.0.42.1, the release matching jax 0.10.2)'


class PlanError(RuntimeError):
    """The plan cannot be made (no libtpu, a mesh that does not match the slice, ...)."""


def require_libtpu() -> None:
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise PlanError(
            f"plan compiles for TPU through libtpu, which is missing: {LIBTPU_HINT}"
        ) from e


@dataclasses.dataclass
class Compiled:
    """What one compile says about one device's program."""

    fits: bool
    compile_seconds: float
    error: str = ""  # the compiler's RESOURCE_EXHAUSTED message when it does not fit
    compiler_hbm_limit: float | None = None  # bytes, read from that message
    compiler_hbm_used: float | None = None
    memory: dict[str, float] = dataclasses.field(default_factory=dict)  # memory_analysis()
    xla_flops: float = 0.0
    xla_bytes_accessed: float = 0.0
    hlo: HloSummary | None = None
    hlo_text: str = ""
    # The largest slots of the biggest allocation in XLA's buffer assignment (see
    # `read_memory_report`); empty unless asked for.
    memory_report: list[dict] = dataclasses.field(default_factory=list)


def _size(text: str) -> float | None:
    m = re.fullmatch(r"([\d.]+)([KMGT]?)(i?B?)?", text.strip())
    if not m:
        return None
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2)]
    return float(m.group(1)) * scale


def _oom_sizes(msg: str) -> tuple[float | None, float | None]:
    """(bytes required, bytes available) from the TPU compiler's out-of-memory message."""
    m = re.search(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", msg)
    if m:
        return _size(m.group(1)), _size(m.group(2))
    m = re.search(r"\(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)", msg)
    if m:
        return _size(m.group(1)), _size(m.group(2))
    return None, None


_LIMITS: dict[str, float | None] = {}


def compiler_hbm_limit(devices: list) -> float | None:
    """The HBM bytes the TPU compiler lets one program use on this chip (e.g. 95.74 GiB on v5p).

    Read from the error of a program that cannot fit (a 1 TiB temporary), once per chip kind.
    """
    kind = devices[0].device_kind
    if kind not in _LIMITS:
        mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("x",))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        x = jax.ShapeDtypeStruct((1 << 40,), jnp.int8, sharding=replicated)
        try:
            jax.jit(lambda a: a + 1, out_shardings=replicated).lower(x).compile()
            _LIMITS[kind] = None
        except Exception as e:
            _LIMITS[kind] = _oom_sizes(str(e))[1]
    return _LIMITS[kind]


_REPORT_ROW = re.compile(r"^\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+[KMGT]?i?B);\s*\d+;\s*(\d+);\s*(.*)$")


def read_memory_report(dump_dir: str, top: int) -> list[dict]:
    """The `top` largest slots of the biggest HBM allocation in XLA's buffer assignment.

    XLA writes `*after_optimizations-memory-usage-report.txt` into its dump folder: per memory
    space and allocation, one row per slot (an offset range) with its size and the shapes of the
    values that occupy it at one time or another (values whose live ranges do not overlap share a
    slot); it lists the slots that make up 95% of each allocation. In a train step the biggest
    allocation in HBM (the "default" space) is the temporaries', so its largest slots name what
    fills memory at the peak. Each row: {"bytes", "values" (sharing the slot), "shapes"}.
    """
    sections: list[list[dict]] = []
    for path in pathlib.Path(dump_dir).glob("*after_optimizations-memory-usage-report.txt"):
        in_hbm = False
        for line in path.read_text().splitlines():
            if line.startswith("Memory Space:"):
                in_hbm = line.split(":", 1)[1].strip().startswith("default")
            elif in_hbm and line.lstrip().startswith("cumulative_size"):
                sections.append([])
            elif in_hbm and sections and (m := _REPORT_ROW.match(line)):
                sections[-1].append(
                    {"bytes": _size(m.group(1)), "values": int(m.group(2)), "shapes": m.group(3)}
                )
    if not sections:
        return []
    rows = max(sections, key=lambda rows: sum(r["bytes"] for r in rows))
    return sorted(rows, key=lambda r: -r["bytes"])[:top]


def compile_program(lowered, n_devices: int, memory_report: int = 0) -> Compiled:
    """Compile a lowered program; a RESOURCE_EXHAUSTED error is the verdict "does not fit".

    `memory_report` > 0: also read that many of the largest temporaries from XLA's buffer
    assignment (the compiler dumps its reports into a temporary folder for this one compile).
    """
    if memory_report > 0:
        with tempfile.TemporaryDirectory(prefix="plan-xla-dump-") as dump:
            out = _compile(lowered, n_devices, {"xla_dump_to": dump})
            out.memory_report = read_memory_report(dump, memory_report)
        return out
    return _compile(lowered, n_devices, None)


def _compile(lowered, n_devices: int, options: dict | None) -> Compiled:
    start = time.perf_counter()
    try:
        exe = lowered.compile(compiler_options=options)
    except Exception as e:  # the TPU compiler raises XlaRuntimeError
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
            raise
        out = Compiled(fits=False, compile_seconds=time.perf_counter() - start, error=msg)
        out.compiler_hbm_used, out.compiler_hbm_limit = _oom_sizes(msg)
        return out
    seconds = time.perf_counter() - start
    ma = exe.memory_analysis()
    memory = {
        k: float(getattr(ma, k))
        for k in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "alias_size_in_bytes",
            "temp_size_in_bytes",
            "generated_code_size_in_bytes",
            "peak_memory_in_bytes",
            "host_temp_size_in_bytes",
            "host_argument_size_in_bytes",
        )
        if hasattr(ma, k)
    }
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = exe.as_text()
    return Compiled(
        fits=True,
        compile_seconds=seconds,
        memory=memory,
        xla_flops=float(cost.get("flops", 0.0)),
        xla_bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        hlo=summarize(text, n_devices),
        hlo_text=text,
    )


def make_mesh_sharding(cfg: Config, devices: list) -> sharding.Sharding:
    """The config's mesh over compile-only devices, laid out on the slice's physical torus."""
    sizes = cfg.mesh.resolve(len(devices))
    shape = tuple(sizes[a] for a in sharding.MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # a shape the torus-aware layout does not handle: plain order
        grid = np.asarray(devices).reshape(shape)
    mesh = jax.sharding.Mesh(
        grid, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape)
    )
    return sharding.Sharding(mesh, sharding.rules_for(cfg.mesh.rules))


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def _per_device_bytes(tree) -> float:
    """Bytes one device holds of an abstract, sharded pytree (the largest shard of each leaf)."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class TrainProgram:
    lowered: object
    state_bytes: dict[str, float]  # per device: params, router_bias, opt_state, batch
    n_devices: int
    mesh_shape: dict[str, int]


def lower_train_step(cfg: Config, devices: list) -> TrainProgram:
    """Lower the Trainer's jitted step on abstract, sharded state and batch."""
    from deepseek_jax.train.step import Trainer

    mesh_sharding = make_mesh_sharding(cfg, devices)
    trainer = Trainer.create(cfg, mesh_sharding)
    state = _abstract(jax.eval_shape(trainer.init), trainer.state_shardings)
    b, t = cfg.train.batch_size, cfg.train.seq_len
    row = trainer.batch_sharding
    batch = {
        "tokens": jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=row),
        "targets": jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=row),
        "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.float32, sharding=row),
    }
    lowered = trainer.jitted_step().lower(state, batch)
    state_bytes = {
        "params": _per_device_bytes(state.params),
        "router_bias": _per_device_bytes(state.router_bias),
        "opt_state": _per_device_bytes(state.opt_state),
        "batch": _per_device_bytes(batch),
    }
    return TrainProgram(lowered, state_bytes, len(devices), dict(mesh_sharding.mesh.shape))


def lower_decode_step(cfg: Config, devices: list, batch: int, context: int) -> TrainProgram:
    """Lower one greedy decode step: B new tokens against a latent cache of `context` slots.

    Weights are held in the compute dtype (as `generate` serves them); the cache too. Rows and the
    cache are split over the batch axes, weights by the config's rules.
    """
    from flax import nnx

    from deepseek_jax.generate.cache import LatentCache
    from deepseek_jax.generate.decode import forward_with_cache
    from deepseek_jax.generate.loop import shard_cache
    from deepseek_jax.model import DeepSeek

    mesh_sharding = make_mesh_sharding(cfg, devices)
    split = mesh_sharding.axis_size("batch")
    if batch % split:
        raise PlanError(
            f"--batch {batch} is not divisible by the {split} devices the batch is split over"
        )
    from deepseek_jax.runtime import Runtime

    # Serving keeps the weights in the compute dtype; the model gets its mesh explicitly.
    dtype = cfg.runtime.compute_dtype
    rt = Runtime(dataclasses.replace(cfg.runtime, param_dtype=dtype), mesh_sharding)
    abstract = nnx.eval_shape(lambda: DeepSeek(cfg.model, nnx.Rngs(0), runtime=rt))
    graphdef, state = nnx.split(abstract)
    state = _abstract(state, sharding.state_shardings(state, mesh_sharding))
    m, n_layers = cfg.model.mla, cfg.model.num_layers
    cache_dtype = jnp.dtype(dtype)
    rows = mesh_sharding.named((None, "batch", None, None))
    cache = LatentCache(
        c_lbsr=jax.ShapeDtypeStruct(
            (n_layers, batch, context, m.kv_lora_rank), cache_dtype, sharding=rows
        ),
        k_pe_lbsk=jax.ShapeDtypeStruct(
            (n_layers, batch, context, m.qk_rope_head_dim), cache_dtype, sharding=rows
        ),
        lengths_b=jax.ShapeDtypeStruct(
            (batch,), jnp.int32, sharding=mesh_sharding.named(("batch",))
        ),
    )
    tokens = jax.ShapeDtypeStruct(
        (batch, 1), jnp.int32, sharding=mesh_sharding.named(("batch", None))
    )

    def step(state, tokens_b1, cache):
        model = nnx.merge(graphdef, state)
        logits_btv, cache = forward_with_cache(model, tokens_b1, cache)
        next_b = jnp.argmax(logits_btv[:, -1], axis=-1).astype(jnp.int32)
        return next_b, shard_cache(cache, rt)

    lowered = jax.jit(step, donate_argnums=2).lower(state, tokens, cache)
    state_bytes = {
        "params": _per_device_bytes(state),
        "cache": _per_device_bytes(cache),
        "batch": _per_device_bytes(tokens),
    }
    return TrainProgram(lowered, state_bytes, len(devices), dict(mesh_sharding.mesh.shape))


def devices_for(topology: Topology) -> list:
    require_libtpu()
    return topology.devices()
