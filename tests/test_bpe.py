"""The byte-level BPE trainer (data/bpe.py) and the tokenizer the default run ships with
(configs/tokenizers/stdlib-bpe512.json, named by configs/tiny.yaml): specials at the model's
ids, exact round trips of any text, and Python compressed to about two bytes per token."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from deepseek_jax.config import load_config
from deepseek_jax.data import bpe
from deepseek_jax.data.pipeline import split_indices
from deepseek_jax.data.sources import stdlib_source
from deepseek_jax.data.tokenizer import HFTokenizer, make_tokenizer
from deepseek_jax.generate.text import load_tokenizer

ODD_TEXT = "naïve café ☕ — 日本語\r\n\ttabs\x00nul and 😀 emoji\n"


def test_trained_bpe_round_trips_and_compresses(tmp_path):
    texts = [inspect.getsource(m) for m in (json, dataclasses, inspect)]
    tok = bpe.train_byte_bpe(texts, vocab_size=320)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = HFTokenizer(path)
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (0, 1, 2)
    assert hf.vocab_size == 320
    for text in (texts[0][:2000], ODD_TEXT):
        assert hf.decode(hf.encode(text)) == text
    sample = texts[1][:5000]
    assert len(hf.encode(sample)) < 0.8 * len(sample.encode())  # the merges do merge


def test_too_small_a_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocab_size=100"):
        bpe.train_byte_bpe(["x"], vocab_size=100)


def test_the_default_run_uses_the_shipped_stdlib_tokenizer():
    cfg = load_config("tiny")
    tok = make_tokenizer(cfg.data, cfg.model)  # also checks it against the model's ids
    assert isinstance(tok, HFTokenizer)
    assert tok.path.parent.name == "tokenizers"
    assert tok.vocab_size == cfg.model.vocab_size == 512
    assert (tok.bos_id, tok.eos_id) == (cfg.model.bos_token_id, cfg.model.eos_token_id)
    assert tok.decode(tok.encode(ODD_TEXT)) == ODD_TEXT
    # `deepseek-jax generate --tokenizer` takes the shipped name too.
    named = load_tokenizer("unused", cfg.model, tokenizer=cfg.data.tokenizer)
    assert named.path == tok.path
    # On held-out standard library files (never seen by the trainer): ~2.1 bytes per token.
    source = stdlib_source()
    text = "".join(source[i] for i in split_indices(len(source), cfg.data.eval_fraction, "eval"))
    ratio = len(text.encode()) / len(tok.encode(text))
    assert 1.8 < ratio < 2.6, ratio


def test_a_missing_tokenizer_is_named():
    cfg = load_config("tiny", ["data.tokenizer=no-such-tokenizer.json"])
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer.json"):
        make_tokenizer(cfg.data)
