"""Random-access sources of documents (strings), indexable like a Grain `RandomAccessDataSource`.

Every source has `__len__` and `__getitem__(i) -> str` over a fixed, sorted order of documents, so
that shuffling, sharding and the eval split work on document indices and never on file contents:

- `TextFiles(path, glob)`: one document per file (a file, or the files under a folder that match
  `glob`, recursively), read as UTF-8 (undecodable bytes become U+FFFD).
- `JsonLines(path, text_field, glob)`: one document per non-blank line, the text under
  `text_field`; a bad line or a missing field raises a `ValueError` naming the file and line.
- `ParquetText(path, text_field, glob)`: one document per row of the `text_field` column; each
  file's column is read into memory on first use.
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

import numpy as np

from deepseek_jax.config import DataConfig


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


class TextFiles:
    """One document per file."""

    def __init__(self, path: str | os.PathLike | Sequence[os.PathLike], glob: str = "*"):
        if isinstance(path, (str, os.PathLike)):
            self.files = list_files(path, glob)
        else:
            self.files = [pathlib.Path(p) for p in path]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> str:
        return _read_text(self.files[index])

    def __repr__(self) -> str:
        return f"TextFiles({len(self.files)} files)"


class JsonLines:
    """One document per non-blank JSONL line; its text is the string under `text_field`."""

    def __init__(self, path: str | os.PathLike, text_field: str = "text", glob: str = "*.jsonl"):
        self.files = list_files(path, glob)
        self.text_field = text_field
        file_ids, offsets, lines = [], [], []
        for f, name in enumerate(self.files):
            offset = 0
            with open(name, "rb") as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        file_ids.append(f)
                        offsets.append(offset)
                        lines.append(line_no)
                    offset += len(line)
        self._file = np.asarray(file_ids, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._line = np.asarray(lines, np.int64)

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, index: int) -> str:
        name = self.files[int(self._file[index])]
        where = f"{name}:{int(self._line[index])}"
        with open(name, "rb") as fh:
            fh.seek(int(self._offset[index]))
            raw = fh.readline()
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict) or self.text_field not in record:
            raise ValueError(f"{where}: no field {self.text_field!r} (data.text_field)")
        text = record[self.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {self.text_field!r} is {type(text).__name__}")
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
                raise ValueError(
                    f"{name}: no column {text_field!r} (data.text_field); columns: {columns}"
                )
            rows.append(meta.metadata.num_rows)
        self._starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
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
    return TextFiles(stdlib_files())


def make_source(cfg: DataConfig):
    """The document source that `cfg.kind` names (not for kind=synthetic, which has none)."""
    if cfg.kind == "stdlib":
        return stdlib_source()
    if cfg.kind == "text":
        return TextFiles(cfg.path, cfg.glob)
    glob = "*." + cfg.kind if cfg.glob == "*" else cfg.glob
    if cfg.kind == "jsonl":
        return JsonLines(cfg.path, cfg.text_field, glob)
    if cfg.kind == "parquet":
        return ParquetText(cfg.path, cfg.text_field, glob)
    raise ValueError(f"data.kind={cfg.kind!r} has no document source")
