"""Compile-verified TPU plans: will this config fit that slice, and how fast could it run?

`plan(config, "v5p-512", overrides)` compiles the real train step (or one decode step) for a TPU
slice on any machine through libtpu's compile-only devices, and reports per-chip memory, XLA's
cost figures, the bytes each collective kind moves, and a roofline step time and MFU.
"""

from deepseek_jax.plan.chips import CHIPS, Chip, Topology, TopologyError, parse_topology
from deepseek_jax.plan.cli import add_plan_parser
from deepseek_jax.plan.compile import LIBTPU_HINT, PlanError
from deepseek_jax.plan.report import PlanResult, format_result, format_sweep
from deepseek_jax.plan.run import plan, sweep

__all__ = [
    "CHIPS",
    "LIBTPU_HINT",
    "Chip",
    "PlanError",
    "PlanResult",
    "Topology",
    "TopologyError",
    "add_plan_parser",
    "format_result",
    "format_sweep",
    "parse_topology",
    "plan",
    "sweep",
]
