"""Plots of a training run from its `metrics.jsonl`: losses, learning rate, expert load.

`plot_run(run_dir)` writes PNG files next to the metrics (behind `deepseek-jax plot RUN_DIR`).
The `draw_*` functions each fill one matplotlib Axes from a list of metric records (one dict per
logged step, as `train` returns and writes), so a notebook draws the same pictures inline.
Figures are built with `matplotlib.figure.Figure` and the Agg canvas, never through pyplot, so
plotting from a script needs no display and leaves pyplot's global state alone.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from deepseek_jax.config import ConfigError, ModelConfig, config_from_saved

Record = dict


class MetricsError(ValueError):
    """metrics.jsonl is empty or holds something that is not one JSON object per line."""


def read_metrics(path: str | os.PathLike) -> list[Record]:
    """The records of a metrics.jsonl file (or of `<path>/metrics.jsonl` for a run folder).

    A last line without its newline is a record still being written by a live run: skipped.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (has this run logged a step yet?)")
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it yet: a partial write
                continue
            raise MetricsError(f"{path}:{number} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise MetricsError(f"{path}:{number} is not a metrics record with a 'step' key")
        records.append(record)
    if not records:
        raise MetricsError(f"{path} holds no metrics records")
    return records


def moe_layer_names(model: ModelConfig) -> list[str]:
    """Names of the rows of `expert_load`: the main MoE layers in order, then MTP blocks."""
    names = []
    for i, kind in enumerate(model.layer_kinds):
        if kind == "moe":
            names.append(
                f"layer {i}" if i < model.num_layers else f"MTP {i - model.num_layers + 1}"
            )
    return names


def _row_names(records: Sequence[Record], model: ModelConfig | None) -> list[str]:
    n = next((len(r["expert_load"]) for r in records if r.get("expert_load")), 0)
    names = moe_layer_names(model) if model is not None else []
    return names if len(names) == n else [f"MoE row {i}" for i in range(n)]


def _series(records: Sequence[Record], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of `key` over the records that have it (values may be lists)."""
    rows = [r for r in records if r.get(key) is not None]
    steps = np.array([r["step"] for r in rows])
    return steps, np.array([r[key] for r in rows], dtype=np.float64)


def _step_axis(ax: Axes) -> None:
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def draw_losses(ax: Axes, records: Sequence[Record]) -> None:
    """Total loss, LM loss, the MTP loss of each depth and, where logged, the eval loss."""
    for key, style in (("loss", "-"), ("lm_loss", "-")):
        steps, values = _series(records, key)
        if len(steps):
            ax.plot(steps, values, style, label=key)
    steps, mtp_sd = _series(records, "mtp_loss")
    if len(steps) and mtp_sd.ndim == 2:
        for k in range(mtp_sd.shape[1]):
            ax.plot(steps, mtp_sd[:, k], "--", label=f"mtp_loss depth {k + 1}")
    steps, values = _series(records, "eval_loss")
    if len(steps):
        ax.plot(steps, values, "o-", label="eval_loss")
    _step_axis(ax)
    ax.set_ylabel("nats")
    ax.set_title("losses")
    ax.legend()


def draw_learning_rate(ax: Axes, records: Sequence[Record]) -> None:
    steps, lr = _series(records, "learning_rate")
    ax.plot(steps, lr)
    _step_axis(ax)
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))


def draw_rewards(ax: Axes, records: Sequence[Record]) -> None:
    """GRPO runs: mean reward and training accuracy per step, held-out accuracy where logged."""
    for key, style in (("reward_mean", "-"), ("accuracy", "-"), ("mtp_acceptance", ":")):
        steps, values = _series(records, key)
        if len(steps):
            ax.plot(steps, values, style, label=key)
    for key in ("eval_accuracy", "eval_accuracy_sampled"):
        steps, values = _series(records, key)
        if len(steps):
            ax.plot(steps, values, "o-", label=key)
    _step_axis(ax)
    ax.set_title("rewards and accuracy")
    ax.legend()


# Beyond this many MoE layers, a legend or one tick label per layer would not be readable.
_MAX_NAMED_ROWS = 12


def draw_load_imbalance(
    ax: Axes, records: Sequence[Record], names: Sequence[str] | None = None
) -> None:
    """max/mean expert load of each MoE layer over steps (1 is perfect balance)."""
    steps, imb_sl = _series(records, "load_imbalance")
    n = imb_sl.shape[1] if imb_sl.ndim == 2 else 0
    names = names or [f"MoE row {i}" for i in range(n)]
    if 0 < n <= _MAX_NAMED_ROWS:
        for i in range(n):
            ax.plot(steps, imb_sl[:, i], label=names[i])
        ax.legend()
    elif n:  # too many layers for a legend: colour the lines by row, with a colorbar
        colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, n))
        for i in range(n):
            ax.plot(steps, imb_sl[:, i], color=colors[i], linewidth=0.8)
        scale = ScalarMappable(Normalize(0, n - 1), ListedColormap(colors))
        ax.figure.colorbar(scale, ax=ax, label="MoE row (main layers, then MTP)")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    _step_axis(ax)
    ax.set_ylabel("max / mean expert load")
    ax.set_title("expert load imbalance per MoE layer")


def draw_expert_load(
    ax: Axes, load_le: Sequence[Sequence[float]], names: Sequence[str] | None = None
) -> None:
    """Heatmap of tokens routed to each expert [MoE layer x expert], with a colorbar."""
    load_le = np.asarray(load_le, dtype=np.float64)
    image = ax.imshow(load_le, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="tokens routed")
    if load_le.shape[0] <= _MAX_NAMED_ROWS:
        names = names or [f"MoE row {i}" for i in range(load_le.shape[0])]
        ax.set_yticks(range(load_le.shape[0]), names)
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("MoE row (main layers, then MTP)")
    ax.set_xlabel("expert")
    ax.set_title("expert load")


def _model_config(run_dir: str) -> ModelConfig | None:
    """The run's model config from the config.json that `train` writes, if it is readable."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            return config_from_saved(json.load(f)).model
    except (OSError, json.JSONDecodeError, ConfigError):
        return None  # only used to name layers; generic names do otherwise


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[str]:
    """Write loss, learning-rate and expert-load PNGs for a run; returns their paths.

    Reads `<run_dir>/metrics.jsonl` (and config.json, to name MoE layers); writes into `out_dir`
    (default: run_dir). Expert plots are skipped for a model without MoE layers.
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    out_dir = run_dir if out_dir is None else os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    names = _row_names(records, _model_config(run_dir))
    paths = []

    fig = Figure(figsize=(8, 5), layout="constrained")
    draw_losses(fig.add_subplot(), records)
    paths.append(_save(fig, os.path.join(out_dir, "loss.png")))

    if any("reward_mean" in r for r in records):
        fig = Figure(figsize=(8, 5), layout="constrained")
        draw_rewards(fig.add_subplot(), records)
        paths.append(_save(fig, os.path.join(out_dir, "rewards.png")))

    fig = Figure(figsize=(8, 4), layout="constrained")
    draw_learning_rate(fig.add_subplot(), records)
    paths.append(_save(fig, os.path.join(out_dir, "learning_rate.png")))

    if names:
        fig = Figure(figsize=(8, 5), layout="constrained")
        draw_load_imbalance(fig.add_subplot(), records, names)
        paths.append(_save(fig, os.path.join(out_dir, "load_imbalance.png")))

        last = next(r for r in reversed(records) if r.get("expert_load"))
        n_experts = len(last["expert_load"][0])
        size = (min(max(6, 0.35 * n_experts + 2), 16), min(1 + 0.5 * len(names), 10))
        fig = Figure(figsize=size)
        fig.set_layout_engine("constrained")
        ax = fig.add_subplot()
        draw_expert_load(ax, last["expert_load"], names)
        ax.set_title(f"expert load at step {last['step']}")
        paths.append(_save(fig, os.path.join(out_dir, "expert_load.png")))
    return paths


def plot_command(run_dir: str, out_dir: str | None = None) -> int:
    """`deepseek-jax plot RUN_DIR [--out DIR]`: write the PNGs and print their paths."""
    try:
        paths = plot_run(run_dir, out_dir)
    except (MetricsError, FileNotFoundError) as e:
        print(f"deepseek-jax: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
