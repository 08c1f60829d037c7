"""Input data: document sources, tokenizers, and the Grain packing pipeline.

    from deepseek_jax import data
    tok = data.make_tokenizer(cfg.data, cfg.model)            # byte or tokenizer.json
    it = data.make_iterator(cfg.data, cfg.train.seq_len, rows_per_process,
                            jax.process_index(), jax.process_count(), model=cfg.model)
    batch = next(it)  # {tokens, targets, segment_ids, positions: int32, loss_mask: f32} [B, T]
    state = it.get_state(); it.set_state(state)              # exact resume (see state.py)
    ev = data.make_iterator(..., split="eval", num_epochs=1)  # held-out documents, one pass

Modules: `sources` (text files, JSONL, Parquet, the Python stdlib), `tokenizer`, `packing`
(documents -> rows with segment ids and positions), `pipeline` (split, shard, shuffle, workers,
batches), `state` (iterator checkpoints, with or without Orbax).
"""

from deepseek_jax.data.pipeline import make_dataset, make_iterator, shard_indices, split_indices
from deepseek_jax.data.sources import (
    JsonLines,
    ParquetText,
    TextFiles,
    make_source,
    stdlib_files,
    stdlib_source,
)
from deepseek_jax.data.state import orbax_restore_args, orbax_save_args, restore_state, save_state
from deepseek_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "JsonLines",
    "ParquetText",
    "TextFiles",
    "Tokenizer",
    "make_dataset",
    "make_iterator",
    "make_source",
    "make_tokenizer",
    "orbax_restore_args",
    "orbax_save_args",
    "restore_state",
    "save_state",
    "shard_indices",
    "split_indices",
    "stdlib_files",
    "stdlib_source",
]
