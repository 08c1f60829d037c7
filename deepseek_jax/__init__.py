"""deepseek-jax: DeepSeek-V2/V3 language models (MLA, DeepSeekMoE, MTP) in JAX and Flax NNX."""

from deepseek_jax.checkpoint import load
from deepseek_jax.config import Config, ModelConfig, from_hf_config, load_config
from deepseek_jax.generate import generate_text, load_for_generation
from deepseek_jax.model import DeepSeek, ModelOutput

__all__ = [
    "Config",
    "DeepSeek",
    "ModelConfig",
    "ModelOutput",
    "from_hf_config",
    "generate_text",
    "load",
    "load_config",
    "load_for_generation",
]
