"""Shared setup of the train-step benchmarks (`train_speed.py`, `profile_step.py`): the shapes,
the config of a case, a fixed random batch, and our compiled step on it.

Not a package module: the benchmark scripts import it from their own folder.
"""

from __future__ import annotations

import dataclasses
import time

# The shapes of issue #12: DeepSeek-V3 layout, hidden 256, 4 layers (1 dense), batch 8 x 256.
ISSUE = [
    "model.vocab_size=4096",
    "model.hidden_size=256",
    "model.intermediate_size=768",
    "model.num_layers=4",
    "model.num_heads=8",
    "model.mla.q_lora_rank=128",
    "model.mla.kv_lora_rank=64",
    "model.mla.qk_rope_head_dim=16",
    "model.mla.qk_nope_head_dim=32",
    "model.mla.v_head_dim=32",
    "model.moe.n_routed_experts=16",
    "model.moe.n_experts_per_tok=4",
    "model.moe.n_shared_experts=1",
    "model.moe.moe_intermediate_size=128",
    "model.moe.first_k_dense_replace=1",
    "model.moe.n_group=1",
    "model.moe.topk_group=1",
    "model.mtp.depth=0",
    "train.batch_size=8",
    "train.seq_len=256",
]
# tiny.yaml as the default run uses it, without MTP (transformers has none).
TINY = ["model.mtp.depth=0"]
SHAPES = {"issue": ISSUE, "tiny": TINY}


@dataclasses.dataclass(frozen=True)
class Case:
    impl: str  # jax | torch | peak
    shape: str = "issue"
    dtype: str = "float32"  # compute dtype
    extra: tuple[str, ...] = ()  # more overrides (experts, scan)
    label: str = ""
    # "thp": the process runs under deepseek_jax.host.malloc_env (as the `deepseek-jax` command
    # does); "plain": without glibc's transparent-huge-page malloc tunable.
    malloc: str = "thp"


def config_for(case: Case):
    """tiny.yaml with the case's shape, compute dtype and extra overrides."""
    from deepseek_jax.config import load_config

    overrides = [
        *SHAPES[case.shape],
        f"runtime.compute_dtype={case.dtype}",
        "train.progress_bar=false",
        *case.extra,
    ]
    return load_config("tiny", overrides)


def random_batch(cfg, seed: int = 0):
    """(tokens, targets) int32 [B, T]: one fixed random batch of the config's shape."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, t, v = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    tokens = rng.integers(0, v, size=(b, t + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def compiled_step(cfg):
    """Our jitted train step compiled for one device: (compiled, state, batch, compile seconds)."""
    import jax.numpy as jnp

    from deepseek_jax.train.step import Trainer

    trainer = Trainer.create(cfg, None)
    state = trainer.init()
    tokens, targets = random_batch(cfg)
    batch = {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(targets),
        "loss_mask": jnp.ones(tokens.shape, jnp.float32),
    }
    start = time.perf_counter()
    compiled = trainer.jitted_step().lower(state, batch).compile()
    return compiled, state, batch, time.perf_counter() - start
