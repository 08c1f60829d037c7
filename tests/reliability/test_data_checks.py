"""Issue 11 item 4, data checked before compiling: every record of a text or JSONL corpus is
parsed up front (bad ones stop the run naming file and line, or are skipped and counted); an empty
corpus is an error; a single document trains, its tokens split between train and eval."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax import cli, data
from deepseek_jax.config import DataConfig, load_config
from deepseek_jax.data.sources import parse_record
from deepseek_jax.train.loop import data_iterators

from .helpers import IN_PROCESS, TINY, failure, metrics, run_train


def cli_train(capsys, *overrides: str) -> tuple[int, str]:
    rc = cli.main(["train", "tiny", *IN_PROCESS, *overrides])
    return rc, capsys.readouterr().err


def test_empty_corpus_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    rc, err = cli_train(
        capsys, "data.kind=text", f"data.path={tmp_path}", f"train.run_dir={tmp_path}/r"
    )
    assert rc == 2 and err.count("\n") == 1
    assert "holds 1 document(s), all empty: no text to train on" in err
    (tmp_path / "blank.jsonl").write_text("\n\n")
    rc, err = cli_train(capsys, "data.kind=jsonl", f"data.path={tmp_path}/blank.jsonl")
    assert rc == 2 and "holds no documents" in err


def test_bad_records_stop_or_are_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    lines = [b'{"text": "good one"}', b"{not json", b'{"body": "x"}', b'{"text": "\xff\xfe"}']
    path.write_bytes(b"\n".join([*lines, b'{"text": "good two"}']) + b"\n")
    rc, err = cli_train(
        capsys, "data.kind=jsonl", f"data.path={path}", f"train.run_dir={tmp_path}/r"
    )
    assert rc == 2 and err.count("\n") == 1
    assert f"{path}:2: bad JSON" in err and "data.on_bad_record=skip" in err
    # skip: the corpus is the 2 good records, and the count is logged before training.
    skip = ["data.kind=jsonl", f"data.path={path}", "data.on_bad_record=skip"]
    cfg = load_config("tiny", [*TINY, *skip, "data.eval_fraction=0"])
    logged: list[str] = []
    it, _ = data_iterators(cfg, (0, 4), logged.append)
    batch = next(it)
    assert batch["tokens"].shape == (4, 32)
    assert any("3 bad record(s) skipped (data.on_bad_record=skip)" in m for m in logged), logged


def test_single_document_corpus_trains_and_evaluates(tmp_path, jax_cache):
    corpus = tmp_path / "book.txt"
    corpus.write_text(
        "All happy families are alike; each unhappy family is unhappy in its way. " * 40
    )
    run = tmp_path / "run"
    result = run_train(
        jax_cache,
        "data.kind=text",
        f"data.path={corpus}",
        "data.eval_fraction=0.1",
        "train.steps=2",
        "train.eval_every=2",
        "train.eval_batches=1",
        f"train.run_dir={run}",
    )
    assert result.returncode == 0, failure(result)
    assert "the eval split is the last 10% of each one's tokens" in result.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and np.isfinite(rows[1]["eval_loss"])


def test_token_split_of_one_document_is_disjoint_and_covering():
    text = "abcdefghij" * 10  # 100 byte tokens
    cfg = DataConfig(kind="text", path="unused", eval_fraction=0.1, shuffle=False)
    src = [text]
    out = {}
    for split in ("train", "eval"):
        it = data.make_iterator(cfg, 200, 1, split=split, source=src, num_epochs=1)
        row = next(it)
        out[split] = row["tokens"][0][row["segment_ids"][0] > 0]
    tok = data.ByteTokenizer()
    assert out["train"].tolist() == tok.encode(text[:90]) + [tok.eos_id]
    assert out["eval"].tolist() == tok.encode(text[90:]) + [tok.eos_id]


# ---------------------------------------------------------------------------------------------
# Property tests of record parsing.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(), JSON_VALUES, max_size=4), st.text(min_size=1))
def test_parse_record_reads_exactly_the_string_field(record, field):
    raw = json.dumps(record, ensure_ascii=bool(len(field) % 2)).encode()
    text, why = parse_record(raw + b"\n", field)
    if isinstance(record.get(field), str):
        assert text == record[field] and why == ""
    else:
        assert text is None and ("no field" in why or "not a string" in why)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(["text", "body"]))
def test_parse_record_never_raises_on_any_bytes(raw, field):
    text, why = parse_record(raw, field)
    assert (text is None) == bool(why)
    if text is not None:  # then it was valid UTF-8 JSON holding that string
        assert json.loads(raw.decode("utf-8"))[field] == text
