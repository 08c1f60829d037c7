"""Random-access sources of documents (strings), indexable like a Grain `RandomAccessDataSource`.

Every source has `__len__` and `__getitem__(i) -> str` over a fixed, sorted order of documents, so
that shuffling, sharding and the eval split work on document indices and never on file contents:

- `TextFiles(path, glob, on_bad_record)`: one document per file (a file, or the files under a
  folder that match `glob`, recursively), read as UTF-8.
- `JsonLines(path, text_field, glob, on_bad_record)`: one document per non-blank line, the text
  under `text_field`.
- `ParquetText(path, text_field, glob)`: one document per row of the `text_field` column; each
  file's column is read into memory on first use.

Text files and JSONL lines are all read and checked when the source is made, before anything
compiles: a record that is not valid UTF-8 or JSON, or lacks its text field, raises a `DataError`
naming the file and line (`on_bad_record="error"`) or is left out and counted in `bad_records`
(`"skip"`); a source without any text raises a `DataError`.
- `stdlib_source()`: this interpreter's own standard library `.py` files (without site-packages
  and test folders): a corpus that is on every machine.

A source holds paths and offsets only, so it pickles cheaply into Grain worker processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import sysconfig
from collections.abc import Sequence
from typing import Literal

import numpy as np

from deepseek_jax.config import DataConfig
from deepseek_jax.errors import DataError


def list_files(path: str | os.PathLike, glob: str = "*") -> list[pathlib.Path]:
    """`path` itself if it is a file, else the files under it matching `glob`, sorted."""
    root = pathlib.Path(path)
    if root.is_file():
        return [root]
    if not root.exists():
        raise FileNotFoundError(f"data path not found: {root}")
    files = sorted(p for p in root.rglob(glob) if p.is_file())
    if not files:
        raise FileNotFoundError(f"no files matching {glob!r} under {root}")
    return files


def _read_text(path: pathlib.Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


OnBadRecord = Literal["skip", "error"]
_SKIP_HINT = "fix it or set data.on_bad_record=skip"


class _BadRecords:
    """Counts the records left out under on_bad_record=skip; raises under "error"."""

    def __init__(self, policy: OnBadRecord):
        if policy not in ("skip", "error"):
            raise ValueError(f"data.on_bad_record={policy!r} is not 'skip' or 'error'")
        self.policy, self.count, self.first = policy, 0, ""

    def __call__(self, where: str, reason: str) -> None:
        if self.policy == "error":
            raise DataError(f"{where}: {reason}; {_SKIP_HINT}")
        self.count += 1
        self.first = self.first or f"{where}: {reason}"


def _require_text(total_chars: int, n_docs: int, what: str) -> None:
    if n_docs == 0:
        raise DataError(f"{what} holds no documents: check data.path and data.glob")
    if total_chars == 0:
        raise DataError(f"{what} holds {n_docs} document(s), all empty: no text to train on")


class TextFiles:
    """One document per file. Every file is read once when the source is made, to check that it
    is valid UTF-8 (`on_bad_record`) and that there is some text at all."""

    def __init__(
        self,
        path: str | os.PathLike | Sequence[os.PathLike],
        glob: str = "*",
        on_bad_record: OnBadRecord = "error",
    ):
        if isinstance(path, (str, os.PathLike)):
            files = list_files(path, glob)
        else:
            files = [pathlib.Path(p) for p in path]
        bad = _BadRecords(on_bad_record)
        self.files, total = [], 0
        for name in files:
            raw = name.read_bytes()
            try:
                total += len(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad(str(name), f"not valid UTF-8 (byte {e.start})")
                continue
            self.files.append(name)
        self.bad_records, self.first_bad = bad.count, bad.first
        _require_text(total, len(self.files), f"data.path={path}" if files else "the file list")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> str:
        return _read_text(self.files[index])

    def __repr__(self) -> str:
        return f"TextFiles({len(self.files)} files)"


def parse_record(raw: bytes, text_field: str) -> tuple[str | None, str]:
    """The text of one JSONL line, or None and why it is not a usable record."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {e.start})"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"bad JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict) or text_field not in record:
        return None, f"no field {text_field!r} (data.text_field)"
    text = record[text_field]
    if not isinstance(text, str):
        return None, f"field {text_field!r} is {type(text).__name__}, not a string"
    return text, ""


class JsonLines:
    """One document per non-blank JSONL line; its text is the string under `text_field`.

    Every line is parsed once when the source is made: a line that is not valid UTF-8 or JSON, or
    lacks a string `text_field`, stops there (`on_bad_record="error"`, naming file and line) or
    is left out and counted (`"skip"`, `bad_records`)."""

    def __init__(
        self,
        path: str | os.PathLike,
        text_field: str = "text",
        glob: str = "*.jsonl",
        on_bad_record: OnBadRecord = "error",
    ):
        self.files = list_files(path, glob)
        self.text_field = text_field
        bad = _BadRecords(on_bad_record)
        file_ids, offsets, lines, total = [], [], [], 0
        for f, name in enumerate(self.files):
            offset = 0
            with open(name, "rb") as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        text, why = parse_record(line, text_field)
                        if text is None:
                            bad(f"{name}:{line_no}", why)
                        else:
                            file_ids.append(f)
                            offsets.append(offset)
                            lines.append(line_no)
                            total += len(text)
                    offset += len(line)
        self._file = np.asarray(file_ids, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._line = np.asarray(lines, np.int64)
        self.bad_records, self.first_bad = bad.count, bad.first
        _require_text(total, len(self._offset), f"data.path={path}")

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, index: int) -> str:
        name = self.files[int(self._file[index])]
        with open(name, "rb") as fh:
            fh.seek(int(self._offset[index]))
            raw = fh.readline()
        text, why = parse_record(raw, self.text_field)
        if text is None:  # checked when indexed: the file changed since
            raise DataError(f"{name}:{int(self._line[index])}: {why} (the file changed?)")
        return text

    def __repr__(self) -> str:
        return f"JsonLines({len(self)} lines in {len(self.files)} files)"


class ParquetText:
    """One document per row of the string column `text_field` of one or more Parquet files."""

    def __init__(self, path: str | os.PathLike, text_field: str = "text", glob: str = "*.parquet"):
        import pyarrow.parquet as pq

        self.files = list_files(path, glob)
        self.text_field = text_field
        rows = []
        for name in self.files:
            meta = pq.ParquetFile(name)
            columns = meta.schema_arrow.names
            if text_field not in columns:
                raise DataError(
                    f"{name}: no column {text_field!r} (data.text_field); columns: {columns}"
                )
            rows.append(meta.metadata.num_rows)
        self._starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        _require_text(1, int(self._starts[-1]), f"data.path={path}")
        self._columns: dict = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> str:
        import pyarrow.parquet as pq

        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range [0, {len(self)})")
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        if f not in self._columns:
            table = pq.read_table(self.files[f], columns=[self.text_field])
            self._columns[f] = table.column(0)
        text = self._columns[f][index - int(self._starts[f])].as_py()
        return "" if text is None else text

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_columns": {}}  # workers read the columns they need

    def __repr__(self) -> str:
        return f"ParquetText({len(self)} rows in {len(self.files)} files)"


_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_files() -> list[pathlib.Path]:
    """The standard library's `.py` files outside site-packages and test folders, sorted."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if p.is_file())
    keep = (p for p in files if not _STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1]))
    return sorted(keep, key=lambda p: p.relative_to(root).as_posix())


def stdlib_source() -> TextFiles:
    return TextFiles(stdlib_files(), on_bad_record="skip")


def make_source(cfg: DataConfig):
    """The document source that `cfg.kind` names (not for kind=synthetic, which has none)."""
    if cfg.kind == "stdlib":
        return stdlib_source()
    if cfg.kind == "text":
        return TextFiles(cfg.path, cfg.glob, cfg.on_bad_record)
    glob = "*." + cfg.kind if cfg.glob == "*" else cfg.glob
    if cfg.kind == "jsonl":
        return JsonLines(cfg.path, cfg.text_field, glob, cfg.on_bad_record)
    if cfg.kind == "parquet":
        return ParquetText(cfg.path, cfg.text_field, glob)
    raise ValueError(f"data.kind={cfg.kind!r} has no document source")
