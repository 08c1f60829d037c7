"""Issue 11 item 5: every configuration or environment mistake is one line naming the key and the
fix, raised before anything compiles (exit code 2); `--debug` shows the traceback. Plus property
tests of the override parser."""

from __future__ import annotations

import os

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax import cli
from deepseek_jax.config import ConfigError, load_config, parse_overrides

from .helpers import IN_PROCESS


def one_line_error(capsys, *args: str) -> str:
    rc = cli.main(["train", "tiny", *IN_PROCESS, *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("deepseek-jax: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["mesh.data=8", "mesh.fsdp=1", "train.batch_size=4"],
            "train.batch_size=4 is not divisible by the 8 batch shards (mesh.data=8)",
        ),
        (
            ["mesh.expert=8", "mesh.fsdp=1", "train.batch_size=8", "model.moe.n_routed_experts=12"],
            "model.moe.n_routed_experts=12 is not divisible by mesh.expert=8",
        ),
        (
            # ep_fsdp splits attention heads over fsdp: tiny's 4 heads cannot go 8 ways.
            ["mesh.fsdp=8", "mesh.rules=ep_fsdp", "train.batch_size=8"],
            "(4) is not divisible by mesh.fsdp=8 (mesh.rules=ep_fsdp)",
        ),
        (
            ["train.seq_len=4096"],
            "train.seq_len=4096 exceeds model.max_position_embeddings=2048",
        ),
        (["mesh.data=3", "mesh.fsdp=1"], "mesh {"),
        (["train.steps=0"], "train.steps=0 must be >= 1"),
        (["train.overwrite=maybe"], "train.overwrite='maybe' must be true or false"),
        (["train.stpes=3"], "did you mean 'train.steps'?"),
        (["data.on_bad_record=ignore"], "data.on_bad_record='ignore' is not one of"),
        (["distributed.heartbeat_timeout_s=0"], "distributed.heartbeat_timeout_s=0 must be >= 1"),
    ],
)
def test_config_mistakes_are_one_line(overrides, expected, tmp_path, capsys):
    err = one_line_error(capsys, *overrides, f"train.run_dir={tmp_path}/run")
    assert expected in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # refused before any saving


def test_unusable_run_dirs_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    err = one_line_error(capsys, f"train.run_dir={a_file}")
    assert f"train.run_dir={a_file} is a file, not a folder" in err
    err = one_line_error(capsys, "train.run_dir=/proc/deepseek-jax-run")  # even root cannot
    assert "train.run_dir=/proc/deepseek-jax-run cannot be created" in err
    err = one_line_error(capsys, f"train.run_dir={tmp_path}/r", "data.kind=text", "data.path=/nope")
    assert "data path not found: /nope" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    rc = cli.main(["train", "tiny", *IN_PROCESS, "train.seq_len=4096", "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("deepseek-jax: error: train.seq_len=4096")


# ---------------------------------------------------------------------------------------------
# Property tests of the override parser.

KEY = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
SCALAR = (
    st.integers(-(10**12), 10**12)
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=10)
)


@settings(max_examples=200, deadline=None)
@given(st.lists(KEY, min_size=1, max_size=4), SCALAR)
def test_override_round_trips_any_dotted_key_and_yaml_scalar(path, value):
    raw = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    tree = parse_overrides([".".join(path) + "=" + raw])
    node = tree
    for part in path[:-1]:
        node = node[part]
    assert node == {path[-1]: yaml.safe_load(raw)}
    assert node[path[-1]] == value or isinstance(value, str)  # YAML may read a word as a bool


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_any_override_string_is_accepted_or_a_config_error(item):
    try:
        load_config("tiny", [item])
    except ConfigError:
        pass  # the CLI prints it as one line


def test_a_value_that_is_not_yaml_is_one_line(capsys):
    err = one_line_error(capsys, "train.steps=[1,")
    assert "train.steps" in err
