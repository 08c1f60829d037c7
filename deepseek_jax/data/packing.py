"""Document packing: a stream of token arrays -> fixed-length training rows.

Each document is its tokens followed by EOS. Grain's `ConcatThenSplitIterDataset` concatenates
the documents and cuts the stream into pieces of `seq_len + 1` tokens, recording for every token
its segment (1, 2, ... for the documents in the piece, 0 for padding) and its position in the
document. A document that does not fit continues at the start of the next piece, with positions
counting from 0 again: RoPE only sees position differences within a segment, and small positions
keep the fp32 rotation angles exact. Padding only appears at the end of a finite stream.

A piece of `seq_len + 1` tokens becomes one row of `seq_len`:
  tokens = piece[:-1], targets = piece[1:], loss_mask = 1 where the target is not padding,
  segment_ids / positions of the input tokens (all 1 / 0..T-1 when documents may attend to each
  other; padding keeps segment 0 either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset


def pack_documents(ds: grain.IterDataset, row_len: int) -> grain.IterDataset:
    """Concatenate-then-split `{"tokens": int32[n]}` documents into pieces of `row_len`."""
    packed = ConcatThenSplitIterDataset(ds, length_struct={"tokens": row_len})
    return _JsonSafeState(packed)


class _JsonSafeState(grain.IterDataset):
    """Makes the packer's state survive a JSON round trip (as Grain's Orbax handler does).

    grain 0.2.18's ConcatThenSplit compares `remainder_slices` to the tuple (-1, -1); after JSON
    they are lists, so a restored state with no remainder wrongly takes the next document as an
    empty remainder and drops it. Turning the lists back into tuples restores it exactly.
    """

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonSafeStateIterator(self._parent.__iter__())


class _JsonSafeStateIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


class PackedRows:
    """Packed piece (`tokens`, `tokens_segment_ids`, `tokens_positions`) -> one training row."""

    def __init__(self, pad_id: int, cross_document_attention: bool = False):
        self.pad_id = pad_id
        self.cross_document_attention = cross_document_attention

    def __call__(self, piece: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = piece["tokens_segment_ids"].astype(np.int32)
        real = seg > 0
        ids = np.where(real, piece["tokens"], self.pad_id).astype(np.int32)
        t = len(ids) - 1
        if self.cross_document_attention:
            segment_ids = real[:-1].astype(np.int32)
            positions = np.arange(t, dtype=np.int32)
        else:
            segment_ids = seg[:-1]
            positions = piece["tokens_positions"][:-1].astype(np.int32)
        return {
            "tokens": ids[:-1],
            "targets": ids[1:],
            "loss_mask": real[1:].astype(np.float32),
            "segment_ids": segment_ids,
            "positions": positions,
        }


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """An all-padding row (loss_mask 0) that fills up the last batch of a finite stream."""
    pad = np.full((seq_len,), pad_id, np.int32)
    zeros = np.zeros((seq_len,), np.int32)
    return {
        "tokens": pad,
        "targets": pad,
        "loss_mask": np.zeros((seq_len,), np.float32),
        "segment_ids": zeros,
        "positions": zeros,
    }


class StackRows:
    """Grain `batch_fn`: stack rows into [B, T] arrays, padding a short last batch to B rows."""

    def __init__(self, batch_size: int, seq_len: int, pad_id: int):
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        rows = list(rows)
        rows += [empty_row(self.seq_len, self.pad_id)] * (self.batch_size - len(rows))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
