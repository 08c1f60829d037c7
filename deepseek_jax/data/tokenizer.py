"""Tokenizers: a built-in UTF-8 byte tokenizer and any Hugging Face `tokenizer.json`.

Both have `encode(str) -> list[int]` (no special tokens added), `encode_array(str)` (the same
as an int32 array), `decode(list[int]) -> str` (special tokens dropped), `vocab_size`, `bos_id`,
`eos_id` and `pad_id`. `make_tokenizer(data_cfg, model_cfg)` builds the one a `DataConfig` names
and checks it against the model: its vocabulary must fit in `model.vocab_size`, and its bos/eos
ids must equal `model.bos_token_id` / `model.eos_token_id` where the model sets them.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Protocol

import numpy as np

from deepseek_jax.config import CONFIG_DIR, ConfigError, DataConfig, ModelConfig


class ByteTokenizer:
    """UTF-8 bytes 0..255 as ids 3..258 after the specials bos 0, eos 1, pad 2 (vocab 259)."""

    bos_id, eos_id, pad_id = 0, 1, 2
    n_special = 3
    vocab_size = 256 + n_special

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.n_special

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        ids = np.asarray(ids, np.int64)
        ids = ids[(ids >= self.n_special) & (ids < self.vocab_size)] - self.n_special
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# Names that tokenizer.json files use for their specials, tried in order when neither the config
# nor a tokenizer_config.json beside the file says which ids they have.
_KNOWN = {
    "bos": ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"),
    "eos": ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>"),
    "pad": ("<｜▁pad▁｜>", "<|pad|>", "<pad>", "[PAD]"),
}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json` file.

    Special ids come from the arguments, else from a `tokenizer_config.json` in the same folder
    (`bos_token`, `eos_token`, `pad_token`), else from well-known special token names; a missing
    pad id falls back to eos (padding is masked out of the loss anyway).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ):
        self.path = pathlib.Path(resolve_tokenizer_path(os.fspath(path)))
        if self.path.is_dir():
            self.path = self.path / "tokenizer.json"
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path} (data.tokenizer)")
        self._tok = None
        tok = self.tokenizer
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        named = self._config_specials()
        ids = {"bos": bos_id, "eos": eos_id, "pad": pad_id}
        for kind in ids:
            if ids[kind] is None:
                names = ((named[kind],) if named.get(kind) else ()) + _KNOWN[kind]
                ids[kind] = next((i for i in map(tok.token_to_id, names) if i is not None), None)
        if ids["eos"] is None:
            raise ConfigError(
                f"{self.path}: cannot tell the end-of-document token; set data.eos_id"
            )
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id = ids["eos"] if ids["pad"] is None else ids["pad"]
        for kind, tok_id in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)):
            if tok_id is not None and not 0 <= tok_id < self.vocab_size:
                raise ConfigError(
                    f"data.{kind}_id={tok_id} is outside the vocabulary [0, {self.vocab_size}) "
                    f"of {self.path}"
                )

    def _config_specials(self) -> dict[str, str]:
        cfg_path = self.path.parent / "tokenizer_config.json"
        if not cfg_path.is_file():
            return {}
        with open(cfg_path) as f:
            cfg = json.load(f)
        out = {}
        for kind in ("bos", "eos", "pad"):
            tok = cfg.get(f"{kind}_token")
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                out[kind] = tok
        return out

    @property
    def tokenizer(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(self.path))
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tok": None}  # worker processes reload the file

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_array(self, text: str) -> np.ndarray: ...
    def decode(self, ids) -> str: ...


def resolve_tokenizer_path(path: str) -> str:
    """`path` itself if it exists, else the tokenizer of that name shipped in configs/tokenizers
    (e.g. tiny.yaml's `stdlib-bpe512.json`), else `path` (the loader then names it missing)."""
    shipped = os.path.join(CONFIG_DIR, "tokenizers", path)
    return shipped if not os.path.exists(path) and os.path.isfile(shipped) else path


def make_tokenizer(data: DataConfig, model: ModelConfig | None = None) -> Tokenizer:
    """The tokenizer `data.tokenizer` names, checked against `model` when given."""
    if data.tokenizer == "byte":
        tok = ByteTokenizer()
        for kind in ("bos", "eos", "pad"):
            want = getattr(data, f"{kind}_id")
            if want is not None and want != getattr(tok, f"{kind}_id"):
                raise ConfigError(
                    f"data.{kind}_id={want}: the byte tokenizer's {kind} id is "
                    f"{getattr(tok, f'{kind}_id')} (set it to null)"
                )
    else:
        tok = HFTokenizer(data.tokenizer, data.bos_id, data.eos_id, data.pad_id)
    if model is not None:
        check_against_model(tok, model)
    return tok


def check_against_model(tok: Tokenizer, model: ModelConfig) -> None:
    if tok.vocab_size > model.vocab_size:
        raise ConfigError(
            f"data.tokenizer={tok!r} has {tok.vocab_size} tokens, more than "
            f"model.vocab_size={model.vocab_size}; raise model.vocab_size"
        )
    for kind in ("bos", "eos"):
        ours, theirs = getattr(tok, f"{kind}_id"), getattr(model, f"{kind}_token_id")
        if ours is not None and theirs is not None and ours != theirs:
            raise ConfigError(
                f"model.{kind}_token_id={theirs} differs from the tokenizer's {kind} id {ours} "
                f"({tok!r}); set model.{kind}_token_id={ours} or data.{kind}_id"
            )
