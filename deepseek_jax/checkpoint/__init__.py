"""Checkpoints, all in one place.

- `source`: what a path is (Hugging Face, converted, training run or step), decided once;
- `load`: the `deepseek_jax.load` front door, building every parameter on its devices;
- `training`: the Orbax checkpoints a training run saves and resumes from;
- `arrays`: our Orbax array directories, read and written slice by slice;
- `hf`, `mapping`, `safetensors_io`, `fp8`: Hugging Face checkpoints, their names and FP8;
- `convert`: streaming conversion HF <-> Orbax;
- `compare`: whether a checkpoint's model fits the model asked for.
Every error is a `CheckpointError` naming the path and what to do.
"""

from deepseek_jax.checkpoint.compare import check_same_model
from deepseek_jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from deepseek_jax.checkpoint.errors import CheckpointError
from deepseek_jax.checkpoint.load import load
from deepseek_jax.checkpoint.source import (
    ConvertedSource,
    HFSource,
    Source,
    TrainingSource,
    resolve,
)
from deepseek_jax.checkpoint.training import Checkpointer, abstract_like

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ConvertedSource",
    "HFSource",
    "Source",
    "TrainingSource",
    "abstract_like",
    "check_same_model",
    "hf_to_orbax",
    "load",
    "orbax_to_hf",
    "resolve",
]
