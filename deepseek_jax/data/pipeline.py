"""The Grain input pipeline: documents -> shuffled, sharded, tokenized, packed, batched rows.

    it = make_iterator(cfg.data, seq_len, rows_per_process, jax.process_index(),
                       jax.process_count(), split="train", model=cfg.model)
    batch = next(it)   # tokens, targets, segment_ids, positions: int32 [B, T]; loss_mask: f32

Stages, for a document source (`data.kind` stdlib / text / jsonl / parquet):
1. Split: the `ceil(eval_fraction * n)` documents with the smallest fixed hash of their index are
   the eval split, the rest train (independent of the seed, the process count and the workers).
   When that would hold out every document (a single file, say), both splits take all the
   documents and each is cut by tokens instead: eval gets the last ceil(fraction * n) tokens.
2. Shard: process i of n keeps the split's documents i, i+n, i+2n, ... (disjoint, covering).
3. Shuffle (train, `data.shuffle`) with `data.seed`, then repeat for `num_epochs` (None: without
   end); Grain folds the epoch into the seed, so every epoch has its own deterministic order.
4. Tokenize, append EOS; in `data.num_workers` processes when > 0 (Grain `mp_prefetch`). Workers
   take documents round-robin and their outputs are interleaved back in order, so the stream is
   the same for any number of workers. Packing runs after, in this process (`packing.py`).
5. Shuffle packed train rows within windows of `data.shuffle_window` rows (when > 1), at most
   about one pass over the split's rows (`window_rows`).
6. Batch `batch_size` rows; the last batch of a finite stream is filled with padding rows.

kind=synthetic wraps `train.synthetic.MarkovTokens` (rows [i*B, (i+1)*B) of the global batch of
each step; the eval split uses steps from 2**40 on) behind the same interface; it never ends
(`num_epochs` does not apply).

Worker processes are spawned, so a script that sets `data.num_workers > 0` needs the usual
`if __name__ == "__main__":` guard, and should `close()` the iterator when done.

The iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()` give JSON-able dicts,
and restoring a state continues with bitwise the same batches (see `state.py` for Orbax).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import grain
import numpy as np
from absl import flags
from grain.experimental import WindowShuffleIterDataset

from deepseek_jax.config import DataConfig, ModelConfig
from deepseek_jax.data.packing import PackedRows, StackRows, pack_documents
from deepseek_jax.data.sources import make_source
from deepseek_jax.data.tokenizer import Tokenizer, make_tokenizer
from deepseek_jax.errors import DataError
from deepseek_jax.train.synthetic import MarkovTokens

Split = Literal["train", "eval"]
_SYNTHETIC_EVAL_OFFSET = 2**40


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mixing hash, so the eval split never depends on the Python build."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_indices(n_docs: int, eval_fraction: float, split: Split) -> np.ndarray:
    """Sorted document indices of `split`: eval is the ceil(fraction * n) smallest hashes."""
    n_eval = math.ceil(eval_fraction * n_docs) if eval_fraction > 0 else 0
    if n_eval >= n_docs:
        raise ValueError(
            f"data.eval_fraction={eval_fraction} holds out {n_eval} of {n_docs} documents, "
            "leaving none to train on"
        )
    order = np.argsort(_splitmix64(np.arange(n_docs)), kind="stable")
    picked = order[:n_eval] if split == "eval" else order[n_eval:]
    return np.sort(picked)


def shard_indices(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's documents: every `process_count`-th one from `process_index` on."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    return indices[process_index::process_count]


class _Documents:
    """The documents of `source` at `indices`, as a random-access data source."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        return self.source[int(self.indices[i])]


def window_rows(window: int, docs, row_len: int) -> int:
    """`data.shuffle_window`, capped at one pass's packed rows of `row_len` tokens.

    A window longer than the split only shuffles repeats of it, and filling it reads the split
    over and over: a two-record corpus took 76 s to fill tiny's 4096-row window. The pass is
    sized from the documents' UTF-8 bytes plus an EOS each (the byte tokenizer's count; subword
    tokenizers give fewer tokens, so the cap errs high), read only when the split has fewer
    documents than the window has rows (otherwise a pass has at least that many rows).
    """
    if window <= 1 or len(docs) >= window:
        return window
    tokens = sum(len(docs[i].encode()) + 1 for i in range(len(docs)))
    return max(1, min(window, -(-tokens // row_len)))


class _Tokenize:
    """Text -> tokens + EOS; with `token_split`, only the split's part of the document's tokens
    (train: all but the last ceil(fraction * n), eval: those)."""

    def __init__(self, tokenizer: Tokenizer, token_split: tuple[Split, float] | None = None):
        self.tokenizer, self.token_split = tokenizer, token_split
        self.eos = np.asarray([tokenizer.eos_id], np.int32)

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        tokens = self.tokenizer.encode_array(text)
        if self.token_split is not None:
            split, fraction = self.token_split
            cut = len(tokens) - math.ceil(fraction * len(tokens))
            tokens = tokens[:cut] if split == "train" else tokens[cut:]
        return {"tokens": np.concatenate([tokens, self.eos])}


class _SyntheticBatch:
    def __init__(self, markov: MarkovTokens, start: int, stop: int, step_offset: int):
        self.markov, self.start, self.stop, self.step_offset = markov, start, stop, step_offset

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        batch = self.markov.rows(self.step_offset + int(step), self.start, self.stop)
        shape = batch["tokens"].shape
        batch["segment_ids"] = np.ones(shape, np.int32)
        batch["positions"] = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
        return batch


def _prefetch(ds: grain.IterDataset, data: DataConfig) -> grain.IterDataset:
    if data.num_workers == 0:
        return ds
    # grain 0.2.18 reads an absl flag when it starts workers (with jax's profiler present) and
    # fails unless absl parsed its flags, which only absl.app programs do: take the defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=data.prefetch_buffer_size
    )
    return ds.mp_prefetch(options)


def make_dataset(
    data: DataConfig,
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    split: Split = "train",
    *,
    model: ModelConfig | None = None,
    tokenizer: Tokenizer | None = None,
    source=None,
    num_epochs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> grain.IterDataset:
    """The pipeline as a `grain.IterDataset` of batches; `make_iterator` iterates it.

    `model` checks the tokenizer (and gives kind=synthetic its vocabulary); `tokenizer` and
    `source` replace the ones `data` names; `num_epochs=None` repeats the split without end.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} is not 'train' or 'eval'")
    if data.kind == "synthetic":
        if model is None:
            raise ValueError("data.kind=synthetic needs the model config (its vocabulary)")
        markov = MarkovTokens(model.vocab_size, seq_len, data.seed)
        start = process_index * batch_size
        offset = 0 if split == "train" else _SYNTHETIC_EVAL_OFFSET
        ds = grain.MapDataset.range(2**62).map(
            _SyntheticBatch(markov, start, start + batch_size, offset)
        )
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        return _prefetch(ds, data)

    tokenizer = tokenizer or make_tokenizer(data, model)
    source = make_source(data) if source is None else source
    n_docs = len(source)
    if n_docs == 0:
        raise DataError(f"{source!r} holds no documents")
    # Too few documents to hold some out (one file, say): every document is split by tokens.
    token_split = data.eval_fraction > 0 and math.ceil(data.eval_fraction * n_docs) >= n_docs
    if token_split:
        indices = np.arange(n_docs)
        if log is not None:
            log(
                f"data: {n_docs} document(s) are too few to hold {data.eval_fraction:.0%} of them "
                f"out; the eval split is the last {data.eval_fraction:.0%} of each one's tokens"
            )
    else:
        indices = split_indices(n_docs, data.eval_fraction, split)
    if len(indices) == 0:
        raise DataError(
            f"data.eval_fraction={data.eval_fraction} holds out no documents to evaluate on: "
            "set data.eval_fraction > 0, or train.eval_every=0"
        )
    indices = shard_indices(indices, process_index, process_count)
    if len(indices) == 0:
        raise DataError(
            f"process {process_index} of {process_count} has no {split} documents "
            f"({source!r}); use more data or a larger data.eval_fraction"
        )
    docs = _Documents(source, indices)
    shuffled = split == "train" and data.shuffle
    window = window_rows(data.shuffle_window, docs, seq_len + 1) if shuffled else 0
    ds = grain.MapDataset.source(docs)
    if shuffled:
        ds = ds.shuffle(seed=data.seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(_Tokenize(tokenizer, (split, data.eval_fraction) if token_split else None))
    read = grain.ReadOptions(
        num_threads=data.read_threads, prefetch_buffer_size=data.prefetch_buffer_size
    )
    ds = _prefetch(ds.to_iter_dataset(read), data)
    ds = pack_documents(ds, seq_len + 1)
    ds = ds.map(PackedRows(tokenizer.pad_id, data.cross_document_attention))
    if window > 1:
        # Its state is the packer's state at the window's start (JSON-safe, see packing.py)
        # plus a position: a restore refills the window and skips what was already read.
        ds = WindowShuffleIterDataset(ds, window_size=window, seed=data.seed)
    return ds.batch(batch_size, batch_fn=StackRows(batch_size, seq_len, tokenizer.pad_id))


def make_iterator(
    data: DataConfig,
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    split: Split = "train",
    *,
    model: ModelConfig | None = None,
    tokenizer: Tokenizer | None = None,
    source=None,
    num_epochs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> grain.DatasetIterator:
    """An iterator of this process's batches: dicts of numpy arrays of `batch_size` rows.

    Keys: tokens, targets, segment_ids, positions (int32 [B, seq_len]), loss_mask (float32).
    Call `.close()` when done if `data.num_workers > 0` (it stops the worker processes).
    """
    ds = make_dataset(
        data,
        seq_len,
        batch_size,
        process_index,
        process_count,
        split,
        model=model,
        tokenizer=tokenizer,
        source=source,
        num_epochs=num_epochs,
        log=log,
    )
    return iter(ds)
