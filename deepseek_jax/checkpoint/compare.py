"""Does a checkpoint's model fit the model asked for? One comparison for every caller."""

from __future__ import annotations

import dataclasses

from deepseek_jax.checkpoint.errors import CheckpointError
from deepseek_jax.config import ModelConfig

# Fields that change how the model runs, not its weights. The runtime section of the config is
# taking them out of ModelConfig; until then a comparison skips whichever are still there.
_RUNTIME_FIELDS = ("param_dtype", "compute_dtype", "scan_layers", "remat", "init_std")


def model_differences(saved: ModelConfig, wanted: ModelConfig) -> dict[str, tuple]:
    """{field: (saved, wanted)} for every weight-relevant field where the two differ."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(wanted)
    return {k: (a[k], b[k]) for k in a if k not in _RUNTIME_FIELDS and a[k] != b.get(k)}


def check_same_model(saved: ModelConfig, wanted: ModelConfig, where: str) -> None:
    """Raise CheckpointError naming `where` and the differing fields when the models differ."""
    diff = model_differences(saved, wanted)
    if diff:
        shown = ", ".join(f"model.{k}: {v[0]!r} there, {v[1]!r} here" for k, v in diff.items())
        raise CheckpointError(f"{where} holds a different model ({shown})")
