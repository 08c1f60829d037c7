"""A deterministic, learnable token source: a pure function of (seed, step, row).

Each row is a walk on a fixed random graph over the vocabulary where every token has
`branching` possible successors, so a model can drive its loss from ln(V) down to about
ln(branching). Any process can build any row, so each host builds only its own share and
every mesh and process count sees the same global batch. (The Grain text pipeline replaces
this as the default data source.)
"""

from __future__ import annotations

import numpy as np


class MarkovTokens:
    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, branching: int = 4):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        rng = np.random.default_rng([seed, 0x5EED])
        self.successors = rng.integers(0, vocab_size, size=(vocab_size, branching))

    def rows(self, step: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the global batch for `step`: tokens, targets, loss_mask."""
        seqs = np.empty((stop - start, self.seq_len + 1), np.int32)
        for i, row in enumerate(range(start, stop)):
            rng = np.random.default_rng([self.seed, step, row])
            choice = rng.integers(0, self.successors.shape[1], size=self.seq_len)
            tok = int(rng.integers(0, self.vocab_size))
            seqs[i, 0] = tok
            for t in range(self.seq_len):
                tok = int(self.successors[tok, choice[t]])
                seqs[i, t + 1] = tok
        return {
            "tokens": seqs[:, :-1],
            "targets": seqs[:, 1:],
            "loss_mask": np.ones((stop - start, self.seq_len), np.float32),
        }
