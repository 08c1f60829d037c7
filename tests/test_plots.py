"""Plots of a run's metrics.jsonl: the PNGs that `plot_run` writes and its error messages."""

from __future__ import annotations

import json
import os

import matplotlib.image
import numpy as np
import pytest

from deepseek_jax import cli, plots
from deepseek_jax.config import load_config, to_dict
from deepseek_jax.plots import MetricsError, moe_layer_names, plot_command, plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_records(steps: int = 12, depth: int = 2, moe_rows: int = 4, experts: int = 16):
    """Records shaped like the ones `train` writes, with an eval loss every 4 steps."""
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, steps + 1):
        load_le = rng.integers(20, 120, size=(moe_rows, experts))
        lm = 6.2 - 0.1 * step
        r = {
            "balance_loss": 4.1,
            "expert_load": load_le.tolist(),
            "grad_norm": 2.0,
            "learning_rate": 3e-3 * min(1.0, step / 4),
            "lm_loss": lm,
            "load_imbalance": (load_le.max(-1) / load_le.mean(-1)).tolist(),
            "loss": lm + 0.3 * lm,
            "mtp_lambda": 0.3,
            "mtp_loss": [lm + 0.1 * (k + 1) for k in range(depth)],
            "tokens": 256.0,
            "z_loss": 39.0,
            "tokens_per_sec": 900.0,
            "mfu": 0.006,
            "step": step,
            "seconds": 0.3,
        }
        if step % 4 == 0:
            r["eval_loss"] = lm + 0.05
        records.append(r)
    return records


def write_run(run_dir, records, config=None) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if config is not None:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(to_dict(config), f)


def assert_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= 200 and pixels.shape[1] >= 400
    assert pixels.std() > 0.01  # something was drawn


def test_plot_run_writes_all_pngs(tmp_path):
    write_run(tmp_path, fake_records())
    paths = plot_run(tmp_path)
    names = [os.path.basename(p) for p in paths]
    assert names == ["loss.png", "learning_rate.png", "load_imbalance.png", "expert_load.png"]
    for p in paths:
        assert os.path.dirname(p) == str(tmp_path)
        assert_png(p)


def test_plot_run_to_another_folder(tmp_path):
    write_run(tmp_path / "run", fake_records())
    out = tmp_path / "plots" / "nested"
    paths = plot_run(tmp_path / "run", out)
    assert len(paths) == 4 and all(os.path.dirname(p) == str(out) for p in paths)
    assert not os.path.exists(tmp_path / "run" / "loss.png")


def test_dense_model_gets_no_expert_plots(tmp_path):
    records = fake_records()
    for r in records:
        r["expert_load"], r["load_imbalance"], r["mtp_loss"] = [], [], []
        r.pop("eval_loss", None)
    write_run(tmp_path, records)
    paths = plot_run(tmp_path)
    assert [os.path.basename(p) for p in paths] == ["loss.png", "learning_rate.png"]
    for p in paths:
        assert_png(p)


def test_layer_names_come_from_the_run_config():
    model = load_config("tiny", ["model.mtp.depth=2"]).model
    # tiny: layer 0 dense, layers 1-3 MoE, then the MTP blocks (MoE too).
    assert moe_layer_names(model) == ["layer 1", "layer 2", "layer 3", "MTP 1", "MTP 2"]


def test_run_config_names_the_heatmap_rows(tmp_path, monkeypatch):
    seen = []
    draw = plots.draw_expert_load

    def spy(ax, load_le, names):
        seen.append(names)
        draw(ax, load_le, names)

    monkeypatch.setattr(plots, "draw_expert_load", spy)
    cfg = load_config("tiny")  # 3 MoE layers + 1 MTP block: 4 rows, as in fake_records
    write_run(tmp_path / "named", fake_records(depth=1), config=cfg)
    plot_run(tmp_path / "named")
    # Rows that do not match the config (another model's metrics): generic names.
    write_run(tmp_path / "generic", fake_records(moe_rows=2), config=cfg)
    plot_run(tmp_path / "generic")
    assert seen == [["layer 1", "layer 2", "layer 3", "MTP 1"], ["MoE row 0", "MoE row 1"]]


def test_missing_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder .*nope does not exist"):
        plot_run(tmp_path / "nope")


def test_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        plot_run(tmp_path)


def test_empty_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(MetricsError, match="holds no metrics records"):
        plot_run(tmp_path)


def test_malformed_line_is_named(tmp_path):
    records = [json.dumps(r) for r in fake_records(steps=3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join([records[0], "{oops", records[2]]) + "\n")
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2 is not valid JSON"):
        read_metrics(tmp_path)


def test_partial_last_line_of_a_live_run_is_skipped(tmp_path):
    records = [json.dumps(r) for r in fake_records(steps=3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(records) + "\n" + records[0][:40])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_plot_command_prints_paths_and_reports_errors(tmp_path, capsys):
    write_run(tmp_path / "run", fake_records())
    assert plot_command(str(tmp_path / "run")) == 0
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "run" / n)
        for n in ("loss.png", "learning_rate.png", "load_imbalance.png", "expert_load.png")
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert plot_command(str(tmp_path / "empty")) == 2
    assert "holds no metrics records" in capsys.readouterr().err


def test_cli_plot_subcommand(tmp_path, capsys):
    write_run(tmp_path / "run", fake_records())
    assert cli.main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "png")]) == 0
    assert len(capsys.readouterr().out.split()) == 4
    assert os.path.isfile(tmp_path / "png" / "expert_load.png")
    assert cli.main(["plot", str(tmp_path / "missing")]) == 2
    assert "run folder" in capsys.readouterr().err


def test_a_v3_sized_run_gives_readable_pictures(tmp_path):
    # 58 MoE layers + 1 MTP block, 256 experts: no per-layer legend, a bounded image size.
    write_run(
        tmp_path, fake_records(moe_rows=59, experts=256), config=load_config("deepseek-v3-671b")
    )
    for p in plot_run(tmp_path):
        assert_png(p)
        height, width = matplotlib.image.imread(p).shape[:2]
        assert height <= 1000 and width <= 1600
