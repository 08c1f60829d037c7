"""Does a checkpoint's model fit the model asked for? One comparison for every caller.

ModelConfig holds only the architecture (dtypes, scan, remat and kernels live in the runtime
section), so the question is `saved == wanted`; the differing fields are named for the error.
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.checkpoint.errors import CheckpointError
from deepseek_jax.config import ModelConfig


def model_differences(saved: ModelConfig, wanted: ModelConfig) -> dict[str, tuple]:
    """{field: (saved, wanted)} for every field that `==` compares and that differs."""
    keys = [f.name for f in dataclasses.fields(ModelConfig) if f.compare]
    return {
        k: (getattr(saved, k), getattr(wanted, k))
        for k in keys
        if getattr(saved, k) != getattr(wanted, k)
    }


def check_same_model(saved: ModelConfig, wanted: ModelConfig, where: str) -> None:
    """Raise CheckpointError naming `where` and the differing fields when the models differ."""
    if saved == wanted:
        return
    shown = ", ".join(
        f"model.{k}: {a!r} there, {b!r} here"
        for k, (a, b) in model_differences(saved, wanted).items()
    )
    raise CheckpointError(f"{where} holds a different model ({shown})")
