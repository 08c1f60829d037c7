"""What one plan found (memory, cost, collectives, roofline) and how it is printed."""

from __future__ import annotations

import dataclasses
import json

from deepseek_jax.plan.chips import GiB
from deepseek_jax.plan.hlo import COLLECTIVE_KINDS


@dataclasses.dataclass
class Roofline:
    """Step time as the slowest of compute, HBM and ICI at the chip's peak rates (a lower bound).

    compute: max(analytic model FLOPs x recompute factor, XLA's FLOPs) / peak bf16 FLOP/s
    hbm: max(XLA's bytes accessed, loop-aware HLO estimate) / HBM bandwidth
    ici: collective bytes over the links (HLO, loop trip counts applied) / ICI bandwidth
    """

    model_flops_per_chip: float
    compute_s: float
    hbm_s: float
    ici_s: float
    tokens_per_chip: float

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.hbm_s, self.ici_s)

    @property
    def bound(self) -> str:
        times = {"compute": self.compute_s, "HBM": self.hbm_s, "ICI": self.ici_s}
        return max(times, key=times.__getitem__)

    def mfu(self, peak: float) -> float:
        return self.model_flops_per_chip / (peak * self.step_s) if self.step_s else 0.0

    @property
    def tokens_per_s_per_chip(self) -> float:
        return self.tokens_per_chip / self.step_s if self.step_s else 0.0


@dataclasses.dataclass
class PlanResult:
    mode: str  # "train" or "generate"
    config: str
    overrides: list[str]
    topology: str
    chip: str
    chips: int
    mesh: dict[str, int]
    rules: str
    remat: str
    fits: bool
    compile_seconds: float
    state_bytes: dict[str, float]  # per chip, from the shardings: params, opt_state, cache, ...
    memory: dict[str, float]  # per chip, the executable's memory_analysis()
    hbm_doc_bytes: float
    hbm_compiler_bytes: float | None
    compiler_required_bytes: float | None = None  # from the out-of-memory message
    error: str = ""
    xla_flops: float = 0.0
    xla_bytes_accessed: float = 0.0
    hlo_hbm_bytes: float = 0.0
    collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    # The expert dispatch's share (collectives under moe/.../shard_map) and the MoE layer count.
    dispatch: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    moe_layers: int = 0
    loops: list = dataclasses.field(default_factory=list)
    roofline: Roofline | None = None
    peak_flops: float = 0.0
    shape: dict[str, int] = dataclasses.field(default_factory=dict)  # batch/seq or batch/context
    # --memory-report: the largest slots of the temporaries (plan/compile.py: read_memory_report)
    memory_report: list[dict] = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> float | None:
        """arguments + outputs - aliased (donated) + temporaries: the executable's HBM need."""
        m = self.memory
        if not m:
            return None
        return (
            m["argument_size_in_bytes"]
            + m["output_size_in_bytes"]
            - m["alias_size_in_bytes"]
            + m["temp_size_in_bytes"]
        )

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_compiler_bytes or self.hbm_doc_bytes

    @property
    def headroom(self) -> float | None:
        total = self.total_bytes
        return None if total is None else 1.0 - total / self.hbm_bytes

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["total_bytes"] = self.total_bytes
        out["headroom"] = self.headroom
        if self.roofline is not None:
            r = self.roofline
            out["roofline"].update(
                step_s=r.step_s,
                bound=r.bound,
                mfu=r.mfu(self.peak_flops),
                tokens_per_s_per_chip=r.tokens_per_s_per_chip,
            )
        out["error"] = self.error.splitlines()[0] if self.error else ""
        return out


def _gib(x: float | None) -> str:
    return "-" if x is None else _bytes(x)


def _bytes(x: float) -> str:
    """Binary units, 2 decimals (GiB from 1 GiB up, MiB below, ...)."""
    for unit, scale in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def format_result(r: PlanResult) -> str:
    """The per-chip report a person reads."""
    mesh = " x ".join(f"{k} {v}" for k, v in r.mesh.items() if v > 1) or "1 device"
    shape = ", ".join(f"{k} {v}" for k, v in r.shape.items())
    lines = [
        f"deepseek-jax plan: {r.config} ({r.mode}) on {r.topology} = {r.chips} {r.chip} chips",
        f"  mesh {mesh}, rules {r.rules}"
        + (f", remat {r.remat}" if r.mode == "train" else "")
        + f"; {shape}",
        f"  compiled in {r.compile_seconds:.0f} s",
        "",
        "  memory per chip",
    ]
    for key, value in r.state_bytes.items():
        lines.append(f"    {key + ' (from shardings)':<34}{_gib(value):>14}")
    if r.memory:
        m = r.memory
        for label, key in (
            ("arguments (memory_analysis)", "argument_size_in_bytes"),
            ("outputs", "output_size_in_bytes"),
            ("aliased (donated) outputs", "alias_size_in_bytes"),
            ("temporaries", "temp_size_in_bytes"),
            ("generated code", "generated_code_size_in_bytes"),
        ):
            lines.append(f"    {label:<34}{_gib(m.get(key)):>14}")
        lines.append(f"    {'total = args + out - alias + temp':<34}{_gib(r.total_bytes):>14}")
        if m.get("host_temp_size_in_bytes"):  # runtime.remat=offload*: not counted in HBM
            label = "host temporaries (pinned host)"
            lines.append(f"    {label:<34}{_gib(m['host_temp_size_in_bytes']):>14}")
    lines.append(
        f"    {'HBM (compiler limit / docs)':<34}{_gib(r.hbm_compiler_bytes):>14} / "
        f"{_gib(r.hbm_doc_bytes)}"
    )
    if r.memory_report:
        lines.append(
            "    largest slots of the temporaries (XLA buffer assignment; values whose "
            "lifetimes do not overlap share a slot):"
        )
        for row in r.memory_report:
            shapes = row["shapes"] if len(row["shapes"]) <= 110 else row["shapes"][:107] + "..."
            lines.append(f"      {_gib(row['bytes']):>12}  {row['values']:>4} x  {shapes}")
    if r.fits:
        lines.append(f"    fits: yes, the TPU compiler accepts it; headroom {r.headroom:.1%}")
    else:
        need = f" (needs {_gib(r.compiler_required_bytes)})" if r.compiler_required_bytes else ""
        lines.append(f"    does not fit: the TPU compiler ran out of HBM{need}")
        lines.append(f"    compiler: {r.error.splitlines()[0][:300] if r.error else ''}")
        lines.append(f"    largest known consumer: {largest_consumer(r)}")
        return "\n".join(lines)
    lines += [
        "",
        "  cost per chip (XLA cost_analysis; counts each loop body once)",
        f"    FLOPs {r.xla_flops:.3e}   bytes accessed {_bytes(r.xla_bytes_accessed)}",
        f"    HLO estimate of HBM traffic, loop trip counts applied: {_bytes(r.hlo_hbm_bytes)}",
        "",
        "  collectives per chip and step (compiled HLO, loop trip counts applied)",
        f"    {'kind':<20}{'ops':>6}{'runs':>8}{'buffers':>14}{'over links':>14}",
    ]
    for kind in COLLECTIVE_KINDS:
        c = r.collectives.get(kind)
        if c and c["ops"]:
            lines.append(
                f"    {kind:<20}{c['ops']:>6.0f}{c['executions']:>8.0f}"
                f"{_bytes(c['buffer_bytes']):>14}{_bytes(c['traffic_bytes']):>14}"
            )
    moved = sum(c["traffic_bytes"] for c in r.dispatch.values())
    if r.moe_layers and moved:
        kinds = ", ".join(k for k, c in r.dispatch.items() if c["ops"])
        lines.append(
            f"    of which expert dispatch ({kinds}): {_bytes(moved)} over links, "
            f"{_bytes(moved / r.moe_layers)} per MoE layer ({r.moe_layers} layers)"
        )
    loops = ", ".join(f"{t if t is not None else '?'}" for _, t in r.loops)
    lines.append(f"    while-loop trip counts: {loops or 'none'}")
    if r.roofline is not None:
        f = r.roofline
        lines += [
            "",
            "  roofline estimate (peak rates; a lower bound on step time)",
            f"    compute {f.compute_s * 1e3:10.2f} ms   "
            f"(model FLOPs/chip {f.model_flops_per_chip:.3e})",
            f"    HBM     {f.hbm_s * 1e3:10.2f} ms",
            f"    ICI     {f.ici_s * 1e3:10.2f} ms",
            f"    step    {f.step_s * 1e3:10.2f} ms, {f.bound}-bound; "
            f"MFU {f.mfu(r.peak_flops):.1%}; {f.tokens_per_s_per_chip:,.0f} tokens/s per chip",
        ]
    return "\n".join(lines)


def largest_consumer(r: PlanResult) -> str:
    """Name the biggest thing we know of when the compiler gives up."""
    parts = dict(r.state_bytes)
    if r.compiler_required_bytes:
        state = sum(parts.values())
        parts["temporaries and the rest (compiler need - state)"] = max(
            r.compiler_required_bytes - state, 0.0
        )
    if not parts:
        return "unknown"
    name = max(parts, key=parts.__getitem__)
    return f"{name}: {_gib(parts[name])}"


def format_sweep(results: list[PlanResult]) -> str:
    """One line per configuration tried: those that fit first, best estimated step first."""
    header = (
        f"{'mesh':<28}{'rules':<9}{'remat':<26}{'fits':<6}{'total GiB':>10}{'headroom':>10}"
        f"{'step ms':>10}{'MFU':>7}{'tok/s/chip':>12}"
    )
    lines = [header]
    for r in sorted(results, key=sweep_key):
        mesh = ",".join(f"{k}={v}" for k, v in r.mesh.items() if v > 1) or "1"
        if r.fits and r.roofline is not None:
            f = r.roofline
            lines.append(
                f"{mesh:<28}{r.rules:<9}{r.remat:<26}{'yes':<6}{r.total_bytes / GiB:>10.2f}"
                f"{r.headroom:>10.1%}{f.step_s * 1e3:>10.1f}{f.mfu(r.peak_flops):>7.1%}"
                f"{f.tokens_per_s_per_chip:>12,.0f}"
            )
        else:
            need = r.compiler_required_bytes
            lines.append(
                f"{mesh:<28}{r.rules:<9}{r.remat:<26}{'no':<6}"
                f"{(need / GiB if need else float('nan')):>10.2f}"
            )
    return "\n".join(lines)


def sweep_key(r: PlanResult) -> tuple:
    if r.fits and r.roofline is not None:
        return (0, r.roofline.step_s)
    return (1, r.compiler_required_bytes or float("inf"))


def dumps(results: list[PlanResult]) -> str:
    return json.dumps([r.to_json() for r in results], indent=2)
