"""The `deepseek-jax` command line and the analytic parameter counts behind `info`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deepseek_jax.cli import main
from deepseek_jax.config import load_config
from deepseek_jax.model.stats import param_counts


def test_v3_parameter_counts_match_the_report():
    counts = param_counts(load_config("deepseek-v3-671b").model)
    # V3 report: 671B total, 37B activated per token (main model; MTP weights are separate).
    assert counts["total"] == pytest.approx(671.0e9, rel=1e-3)
    assert 37.0e9 <= counts["active"] <= 38.0e9


def test_v2_lite_parameter_counts_match_the_report():
    counts = param_counts(load_config("deepseek-v2-lite").model)
    assert counts["total"] == pytest.approx(15.7e9, rel=2e-3)
    assert counts["mtp_total"] == 0
    # The 2.4B activated figure leaves out the input embedding table.
    cfg = load_config("deepseek-v2-lite").model
    assert counts["active"] - cfg.vocab_size * cfg.hidden_size == pytest.approx(2.4e9, rel=0.03)


def test_info_prints_config_and_counts(capsys):
    assert main(["info", "tiny", "model.mtp.depth=2"]) == 0
    out = capsys.readouterr().out
    assert "depth: 2" in out and "# parameters:" in out


def test_info_reports_config_errors(capsys):
    assert main(["info", "tiny", "model.moe.n_group=3"]) == 2
    err = capsys.readouterr().err
    assert "model.moe.n_routed_experts=16 is not divisible by model.moe.n_group=3" in err


def test_console_script_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "deepseek_jax.cli", "info", "deepseek-v3-671b"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "671.0" in result.stdout
