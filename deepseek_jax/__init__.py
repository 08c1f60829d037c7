"""deepseek-jax: DeepSeek-V2/V3 language models (MLA, DeepSeekMoE, MTP) in JAX and Flax NNX.

The names below load on first use, so that `deepseek_jax.host` (the command's entry point, which
may re-execute the process before JAX starts) does not pay for importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "load": "deepseek_jax.checkpoint",
    "Config": "deepseek_jax.config",
    "ModelConfig": "deepseek_jax.config",
    "from_hf_config": "deepseek_jax.config",
    "load_config": "deepseek_jax.config",
    "generate_text": "deepseek_jax.generate",
    "load_for_generation": "deepseek_jax.generate",
    "DeepSeek": "deepseek_jax.model",
    "ModelOutput": "deepseek_jax.model",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the same names, for type checkers (re-exported by the `as` aliases)
    from deepseek_jax.checkpoint import load as load
    from deepseek_jax.config import Config as Config
    from deepseek_jax.config import ModelConfig as ModelConfig
    from deepseek_jax.config import from_hf_config as from_hf_config
    from deepseek_jax.config import load_config as load_config
    from deepseek_jax.generate import generate_text as generate_text
    from deepseek_jax.generate import load_for_generation as load_for_generation
    from deepseek_jax.model import DeepSeek as DeepSeek
    from deepseek_jax.model import ModelOutput as ModelOutput


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deepseek_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
