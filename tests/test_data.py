"""deepseek_jax.data: sources, tokenizers, packing, sharding, eval split, exact resume."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import grain
import numpy as np
import pytest

from deepseek_jax import data
from deepseek_jax.config import ConfigError, DataConfig, ModelConfig, load_config

SEQ = 16
BYTE = data.ByteTokenizer()


def _docs(n: int = 23) -> list[str]:
    # Unique prefixes so each document can be recognized in the packed stream; assorted lengths
    # so that some fit inside a row and others span two or three rows.
    return [f"doc{i:02d}:" + "abcdefghij"[: i % 7] * (i % 5 + 1) for i in range(n)]


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    for i, text in enumerate(_docs()):
        folder = root / "sub" if i % 2 else root
        (folder / f"d{i:02d}.txt").write_text(text)
    (root / "ignored.md").write_text("not matched by the glob")
    return root


def _cfg(path, **kw) -> DataConfig:
    kw = {"kind": "text", "path": str(path), "glob": "*.txt", "eval_fraction": 0.0, **kw}
    return DataConfig(**kw)


def _all_batches(cfg: DataConfig, **kw) -> list[dict]:
    kw = {"seq_len": SEQ, "batch_size": 3, "num_epochs": 1, **kw}
    it = data.make_iterator(cfg, **kw)
    out = list(it)
    it.close()
    return out


def _stream(batches: list[dict]) -> list[int]:
    """The packed token stream: each row is tokens + its last target, padding dropped."""
    out = []
    for b in batches:
        for row in range(b["tokens"].shape[0]):
            real = b["segment_ids"][row] > 0
            out += b["tokens"][row][real].tolist()
            if b["loss_mask"][row][-1]:
                out.append(int(b["targets"][row][-1]))
    return out


def _documents_in(batches: list[dict]) -> list[str]:
    stream = np.asarray(_stream(batches))
    ends = np.flatnonzero(stream == BYTE.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [BYTE.decode(stream[a:b]) for a, b in zip(starts, ends, strict=True)]


# ---------------------------------------------------------------------------------------------
# Tokenizers.


def test_byte_tokenizer_round_trip():
    text = "def f(x):\n    return 'héllo → 世界' + x\n"
    ids = BYTE.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert min(ids) >= 3 and max(ids) < BYTE.vocab_size == 259
    assert BYTE.decode(ids) == text
    assert BYTE.decode([BYTE.bos_id] + ids + [BYTE.eos_id, BYTE.pad_id]) == text
    assert (BYTE.bos_id, BYTE.eos_id, BYTE.pad_id) == (0, 1, 2)
    model = ModelConfig()
    assert (model.bos_token_id, model.eos_token_id) == (BYTE.bos_id, BYTE.eos_id)
    assert isinstance(data.make_tokenizer(DataConfig(), model), data.ByteTokenizer)


def _hf_tokenizer_file(tmp_path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world", "hello there", "the world of words"] * 5, trainer)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_json(tmp_path):
    path = _hf_tokenizer_file(tmp_path)
    model = ModelConfig(vocab_size=512, bos_token_id=1, eos_token_id=2)
    tok = data.make_tokenizer(DataConfig(tokenizer=path), model)
    assert isinstance(tok, data.HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # found by their names
    assert 256 < tok.vocab_size <= 300
    text = "hello world, wörld"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode())  # merges were learned and used
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text

    # Config ids win over names; tokenizer_config.json beside the file beats the name list.
    assert data.make_tokenizer(DataConfig(tokenizer=path, eos_id=0)).eos_id == 0
    (tmp_path / "tok" / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<pad>"}, "bos_token": "</s>"})
    )
    tok = data.make_tokenizer(DataConfig(tokenizer=str(tmp_path / "tok")))
    assert (tok.eos_id, tok.bos_id) == (0, 2)


def test_hf_tokenizer_pipeline(tmp_path, text_dir):
    path = _hf_tokenizer_file(tmp_path)
    model = ModelConfig(vocab_size=512, bos_token_id=1, eos_token_id=2)
    batches = _all_batches(_cfg(text_dir, tokenizer=path, shuffle=False), model=model)
    tok = data.make_tokenizer(DataConfig(tokenizer=path))
    want = []
    for f in data.TextFiles(text_dir, "*.txt").files:
        want += tok.encode(f.read_text()) + [tok.eos_id]
    assert _stream(batches) == want


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"259 tokens, more than model.vocab_size=256"):
        data.make_tokenizer(DataConfig(), ModelConfig(vocab_size=256))
    with pytest.raises(ConfigError, match=r"model.eos_token_id=5 differs"):
        data.make_tokenizer(DataConfig(), ModelConfig(eos_token_id=5))
    with pytest.raises(ConfigError, match=r"data.eos_id=7: the byte tokenizer's eos id is 1"):
        data.make_tokenizer(DataConfig(eos_id=7))
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        data.make_tokenizer(DataConfig(tokenizer=str(missing)))
    path = _hf_tokenizer_file(tmp_path)
    with pytest.raises(ConfigError, match=r"more than model.vocab_size=100"):
        data.make_tokenizer(DataConfig(tokenizer=path), ModelConfig(vocab_size=100))


# ---------------------------------------------------------------------------------------------
# Sources.


def test_text_source(text_dir):
    src = data.make_source(_cfg(text_dir))
    assert len(src) == len(_docs())
    assert sorted(src[i] for i in range(len(src))) == sorted(_docs())
    assert all(f.suffix == ".txt" for f in src.files)
    assert data.TextFiles(text_dir / "d00.txt")[0] == _docs()[0]


def test_jsonl_source_and_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two ü"}\n{"body": "x"}\n{"text": "fo\n')
    # Every line is parsed when the source is made: the first bad one stops it, named.
    with pytest.raises(ValueError, match=r"docs.jsonl:4: no field 'text'.*on_bad_record=skip"):
        data.make_source(DataConfig(kind="jsonl", path=str(path)))
    src = data.make_source(DataConfig(kind="jsonl", path=str(path), on_bad_record="skip"))
    assert len(src) == 2 and src.bad_records == 2  # the blank line is not a record
    assert [src[0], src[1]] == ["one", "two ü"]
    assert "docs.jsonl:4: no field 'text'" in src.first_bad
    broken = tmp_path / "sub" / "broken.jsonl"
    broken.parent.mkdir()
    broken.write_bytes(b'{"text": "ok"}\n{"text": "fo\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: bad JSON"):
        data.JsonLines(broken)
    assert data.JsonLines(broken, on_bad_record="skip").bad_records == 2  # bad JSON, bad UTF-8
    other = data.make_source(
        DataConfig(kind="jsonl", path=str(tmp_path), text_field="body", on_bad_record="skip")
    )
    assert other[0] == "x" and other.bad_records == 6


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i} " * (i + 1) for i in range(9)]
    pq.write_table(pa.table({"content": texts[:5], "n": list(range(5))}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"content": texts[5:], "n": list(range(4))}), tmp_path / "b.parquet")
    src = data.make_source(DataConfig(kind="parquet", path=str(tmp_path), text_field="content"))
    assert len(src) == 9 and [src[i] for i in range(9)] == texts
    assert src[7] == texts[7]  # random access across files
    with pytest.raises(ValueError, match=r"a.parquet: no column 'text'"):
        data.make_source(DataConfig(kind="parquet", path=str(tmp_path)))
    cfg = DataConfig(kind="parquet", path=str(tmp_path), text_field="content", eval_fraction=0.0)
    docs = _documents_in(_all_batches(cfg))
    assert sorted(docs) == sorted(texts)


def test_missing_paths(tmp_path):
    for kind in ("text", "jsonl", "parquet"):
        missing = tmp_path / f"missing-{kind}"
        with pytest.raises(FileNotFoundError, match=str(missing)):
            data.make_source(DataConfig(kind=kind, path=str(missing)))
    with pytest.raises(FileNotFoundError, match=r"no files matching '\*.rs'"):
        data.make_source(DataConfig(kind="text", path=str(tmp_path), glob="*.rs"))


def test_stdlib_source():
    files = data.stdlib_files()
    assert len(files) > 100
    assert files == sorted(files, key=lambda p: p.relative_to(files[0].parents[0]).as_posix())
    parts = {part for f in files for part in f.parts}
    assert not {"site-packages", "test", "tests"} & parts
    assert any(f.name == "functools.py" for f in files)
    src = data.make_source(DataConfig(kind="stdlib"))
    assert len(src) == len(files) and "def " in "".join(src[i] for i in range(5))
    batch = next(data.make_iterator(DataConfig(kind="stdlib"), SEQ, 2, model=ModelConfig()))
    assert batch["tokens"].shape == (2, SEQ) and batch["loss_mask"].all()


# ---------------------------------------------------------------------------------------------
# Packing.


def test_packing(text_dir):
    cfg = _cfg(text_dir, shuffle=False)
    batches = _all_batches(cfg)
    src = data.make_source(cfg)
    want = []
    for i in range(len(src)):
        want += BYTE.encode(src[i]) + [BYTE.eos_id]
    assert _stream(batches) == want  # every token once, in order, an EOS after each document
    assert math.ceil(len(want) / (SEQ + 1)) <= 3 * len(batches)
    n_docs = n_pad = 0
    for b in batches:
        assert all(v.shape == (3, SEQ) for v in b.values())
        assert {k: v.dtype for k, v in b.items()} == {
            "tokens": np.int32,
            "targets": np.int32,
            "loss_mask": np.float32,
            "segment_ids": np.int32,
            "positions": np.int32,
        }
        np.testing.assert_array_equal(b["targets"][:, :-1], b["tokens"][:, 1:])
        for tok, tgt, mask, seg, pos in zip(*(b[k] for k in b), strict=True):
            pad_in, pad_out = seg == 0, np.append(seg[1:] == 0, mask[-1] == 0)
            # Padding is a suffix, holds pad_id, and is exactly where the loss mask is 0.
            assert np.array_equal(mask == 0, pad_out)
            assert (tok[pad_in] == BYTE.pad_id).all() and (tgt[pad_out] == BYTE.pad_id).all()
            assert (np.diff(pad_in.astype(int)) >= 0).all()
            n_pad += pad_out.sum()
            real = ~pad_in
            if not real.any():
                continue
            # Segments count 1, 2, ... and step up right after each EOS; positions restart at
            # each new segment and count up within it.
            assert seg[0] == 1
            new = np.flatnonzero(np.diff(seg[real]) != 0) + 1
            assert (np.diff(seg[real])[new - 1] == 1).all()
            assert (tok[real][new - 1] == BYTE.eos_id).all()
            assert (pos[real][new] == 0).all() and pos[0] == 0
            same = np.diff(seg[real]) == 0
            assert (np.diff(pos[real])[same] == 1).all()
            n_docs += len(new)
    assert n_docs >= len(src) - len(batches) * 3  # most document starts are inside rows
    assert 0 < n_pad < SEQ * 3  # padding only at the end of the finite stream


def test_cross_document_attention(text_dir):
    blocked = _all_batches(_cfg(text_dir, shuffle=False))
    crossed = _all_batches(_cfg(text_dir, shuffle=False, cross_document_attention=True))
    for a, b in zip(blocked, crossed, strict=True):
        for k in ("tokens", "targets", "loss_mask"):
            np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(b["segment_ids"], (a["segment_ids"] > 0).astype(np.int32))
        np.testing.assert_array_equal(b["positions"], np.broadcast_to(np.arange(SEQ), (3, SEQ)))


# ---------------------------------------------------------------------------------------------
# Order, sharding, splits.


def test_shuffle_is_seeded(text_dir):
    order = {seed: _documents_in(_all_batches(_cfg(text_dir, seed=seed))) for seed in (0, 1)}
    again = _documents_in(_all_batches(_cfg(text_dir, seed=0)))
    assert order[0] == again
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1]) == sorted(_docs())
    unshuffled = _documents_in(_all_batches(_cfg(text_dir, shuffle=False)))
    assert unshuffled != order[0]
    # Two epochs: each holds every document once, in a different (deterministic) order.
    two = _documents_in(_all_batches(_cfg(text_dir, seed=0), num_epochs=2))
    n = len(_docs())
    assert two[:n] == order[0] and sorted(two[n:]) == sorted(_docs()) and two[n:] != two[:n]


def test_shuffle_window_mixes_rows(text_dir):
    def rows(batches):
        pairs = ((r, m) for b in batches for r, m in zip(b["tokens"], b["loss_mask"], strict=True))
        return [tuple(r) for r, m in pairs if m.any()]

    plain = rows(_all_batches(_cfg(text_dir, seed=2)))
    mixed = rows(_all_batches(_cfg(text_dir, seed=2, shuffle_window=7)))
    assert sorted(mixed) == sorted(plain)  # the same rows, each once
    assert mixed != plain
    # The eval split is never shuffled.
    evals = [_cfg(text_dir, eval_fraction=0.3, shuffle_window=w) for w in (0, 7)]
    _same(*(_all_batches(c, split="eval") for c in evals))


def test_processes_read_disjoint_covering_shards(text_dir):
    cfg = _cfg(text_dir)
    shards = [_documents_in(_all_batches(cfg, process_index=i, process_count=2)) for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(_docs())
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    with pytest.raises(ValueError, match="process_index=2 is not in"):
        data.make_iterator(cfg, SEQ, 2, process_index=2, process_count=2)


def test_eval_split(text_dir):
    cfg = _cfg(text_dir, eval_fraction=0.2)
    n = len(_docs())
    train, evals = (data.split_indices(n, 0.2, s) for s in ("train", "eval"))
    assert len(evals) == math.ceil(0.2 * n)
    assert sorted(np.concatenate([train, evals]).tolist()) == list(range(n))
    train_docs = _documents_in(_all_batches(cfg))
    eval_docs = _documents_in(_all_batches(cfg, split="eval"))
    assert len(eval_docs) == len(evals) and not set(train_docs) & set(eval_docs)
    assert sorted(train_docs + eval_docs) == sorted(_docs())
    # The split does not move with the seed or the process count.
    assert eval_docs == _documents_in(
        _all_batches(_cfg(text_dir, eval_fraction=0.2, seed=9), split="eval")
    )
    halves = [_all_batches(cfg, split="eval", process_index=i, process_count=2) for i in (0, 1)]
    assert sorted(_documents_in(halves[0]) + _documents_in(halves[1])) == sorted(eval_docs)
    with pytest.raises(ValueError, match="holds out no documents"):
        data.make_iterator(_cfg(text_dir), SEQ, 2, split="eval")
    # Without num_epochs the eval split repeats, so any number of eval batches can be taken.
    it = data.make_iterator(cfg, SEQ, 2, split="eval")
    assert len(list(itertools.islice(it, 20))) == 20


# ---------------------------------------------------------------------------------------------
# Resume.


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("window", [0, 5])
def test_resume_is_exact(text_dir, window):
    cfg = _cfg(text_dir, seed=3, shuffle_window=window)
    ref = list(itertools.islice(data.make_iterator(cfg, SEQ, 2), 40))  # crosses an epoch
    for k in range(0, 30, 3):
        it = data.make_iterator(cfg, SEQ, 2)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
        later = [next(it) for _ in range(10)]
        fresh = data.make_iterator(cfg, SEQ, 2)
        fresh.set_state(state)
        _same(later, [next(fresh) for _ in range(10)])
        _same(later, ref[k : k + 10])


def test_resume_through_orbax(text_dir, tmp_path):
    import orbax.checkpoint as ocp

    cfg = _cfg(text_dir, seed=5)
    it = data.make_iterator(cfg, SEQ, 2)
    for _ in range(7):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(7, args=ocp.args.Composite(data=data.orbax_save_args(it)))
    mngr.wait_until_finished()
    later = [next(it) for _ in range(5)]
    fresh = data.make_iterator(cfg, SEQ, 2)
    mngr.restore(7, args=ocp.args.Composite(data=data.orbax_restore_args(fresh)))
    _same(later, [next(fresh) for _ in range(5)])
    mngr.close()

    data.save_state(it, tmp_path / "state.json")
    later = [next(it) for _ in range(3)]
    fresh = data.make_iterator(cfg, SEQ, 2)
    data.restore_state(fresh, tmp_path / "state.json")
    _same(later, [next(fresh) for _ in range(3)])


def test_worker_processes_give_the_same_batches(text_dir):
    cfg = _cfg(text_dir, seed=1)
    ref = list(itertools.islice(data.make_iterator(cfg, SEQ, 2), 12))
    it = data.make_iterator(dataclasses.replace(cfg, num_workers=2), SEQ, 2)
    try:
        got = [next(it) for _ in range(7)]
        state = json.loads(json.dumps(it.get_state()))
        got += [next(it) for _ in range(5)]
    finally:
        it.close()
    _same(ref, got)
    # A state saved with workers restores into a pipeline with the same number of workers.
    fresh = data.make_iterator(dataclasses.replace(cfg, num_workers=2), SEQ, 2)
    try:
        fresh.set_state(state)
        _same(ref[7:], [next(fresh) for _ in range(5)])
    finally:
        fresh.close()


# ---------------------------------------------------------------------------------------------
# Synthetic source and config.


def test_synthetic_through_the_same_interface():
    from deepseek_jax.train.synthetic import MarkovTokens

    model = ModelConfig(vocab_size=97)
    cfg = DataConfig(seed=4)
    it = data.make_iterator(cfg, SEQ, 3, process_index=1, process_count=2, model=model)
    assert isinstance(it, grain.DatasetIterator)
    batches = [next(it) for _ in range(3)]
    markov = MarkovTokens(97, SEQ, 4)
    for step, b in enumerate(batches):
        want = markov.rows(step, 3, 6)
        for k in want:
            np.testing.assert_array_equal(b[k], want[k])
        assert (b["segment_ids"] == 1).all() and (b["positions"][:, -1] == SEQ - 1).all()
    state = it.get_state()
    fresh = data.make_iterator(cfg, SEQ, 3, process_index=1, process_count=2, model=model)
    fresh.set_state(state)
    _same([next(it)], [next(fresh)])
    ev = next(data.make_iterator(cfg, SEQ, 3, split="eval", model=model))
    assert not np.array_equal(ev["tokens"], batches[0]["tokens"])


def test_data_config():
    cfg = load_config(None, ["data.kind=jsonl", "data.path=/x", "data.eval_fraction=0.05"])
    assert (cfg.data.kind, cfg.data.path, cfg.data.eval_fraction) == ("jsonl", "/x", 0.05)
    assert load_config().data == DataConfig()
    with pytest.raises(ConfigError, match="data.path is required for data.kind=text"):
        DataConfig(kind="text")
    with pytest.raises(ConfigError, match=r"data.eval_fraction=1.0 must be in \[0, 1\)"):
        DataConfig(eval_fraction=1.0)
    with pytest.raises(ConfigError, match="data.num_workers=-1 must be >= 0"):
        DataConfig(num_workers=-1)
    with pytest.raises(ConfigError, match="'data.kind'=.*is not one of|data.kind='csv'"):
        load_config(None, ["data.kind=csv"])


def test_shuffle_window_is_capped_at_one_pass_over_a_small_split():
    """A 4096-row window over a corpus of two short records once took 76 s to fill (it read the
    corpus thousands of times); it is capped at the rows one pass gives (bytes + EOS per doc)."""
    from deepseek_jax.data.pipeline import window_rows

    two = ["good one", "good two"]  # 9 + 9 tokens with EOS: one row of 33
    assert window_rows(4096, two, 33) == 1
    assert window_rows(4096, ["é" * 40] * 3, 33) == 8  # 3 x 81 bytes+EOS = 243 tokens: 8 rows
    assert window_rows(7, ["x" * 1000] * 3, 33) == 7  # a pass has more rows than the window
    assert window_rows(5, ["a"] * 5, 33) == 5  # as many documents as rows: not read
    assert window_rows(0, two, 33) == 0 and window_rows(1, two, 33) == 1
