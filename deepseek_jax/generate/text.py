"""Text in, text out: a checkpoint's model and tokenizer, and `generate_text` for notebooks and
the `deepseek-jax generate` command.

The tokenizer of a checkpoint is, in order: the one asked for (`"byte"` or a tokenizer.json
path); a `tokenizer.json` in the checkpoint folder (Hugging Face and converted checkpoints); the
`data.tokenizer` of the config a training run saved with its checkpoints. Prompts from a
tokenizer.json start with its BOS token (the DeepSeek convention); byte-tokenized prompts do not,
because our packed training documents carry only an EOS between them.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from deepseek_jax.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    check_against_model,
    make_tokenizer,
    resolve_tokenizer_path,
)
from deepseek_jax.generate.loop import generate
from deepseek_jax.generate.speculative import speculative_generate


def load_tokenizer(path: str | os.PathLike, model_cfg, tokenizer: str | None = None) -> Tokenizer:
    """The tokenizer for the checkpoint at `path` (see the module docstring for the order)."""
    path = os.fspath(path)
    if tokenizer == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif tokenizer:
        if not os.path.isfile(resolve_tokenizer_path(tokenizer)):
            raise FileNotFoundError(f"tokenizer file {tokenizer} does not exist")
        tok = HFTokenizer(tokenizer)
    elif os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = HFTokenizer(os.path.join(path, "tokenizer.json"))
    else:
        from deepseek_jax.checkpoint import CheckpointError, TrainingSource, resolve

        try:
            source = resolve(path)
        except CheckpointError:
            source = None
        if not isinstance(source, TrainingSource):
            raise FileNotFoundError(
                f"no tokenizer.json in {path} and no training config beside it: pass "
                "--tokenizer (a tokenizer.json path, or 'byte')"
            )
        tok = make_tokenizer(source.config.data)
    check_against_model(tok, model_cfg)
    return tok


def load_for_generation(
    path: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    compute_dtype: str = "float32",
    mesh_sharding=None,
):
    """(model, tokenizer) of a checkpoint: Hugging Face, converted Orbax, or a training run.
    With `mesh_sharding` the weights are loaded onto its mesh (see `deepseek_jax.load`); pass
    the same `mesh_sharding` to `generate_text`."""
    from deepseek_jax.checkpoint import load

    model = load(
        path, compute_dtype=compute_dtype, param_dtype=compute_dtype, mesh_sharding=mesh_sharding
    )
    return model, load_tokenizer(path, model.cfg, tokenizer)


def encode_prompt(tokenizer: Tokenizer, text: str, add_bos: bool | None = None) -> list[int]:
    if add_bos is None:
        add_bos = isinstance(tokenizer, HFTokenizer) and tokenizer.bos_id is not None
    ids = tokenizer.encode(text)
    if add_bos:
        ids = [tokenizer.bos_id, *ids]
    if not ids:
        raise ValueError("the prompt is empty (and the tokenizer adds no BOS token)")
    return ids


def generate_text(
    model,
    tokenizer: Tokenizer,
    prompts: str | list[str],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    add_bos: bool | None = None,
    stop_at_eos: bool = True,
    cache_dtype=jnp.float32,
    mesh_sharding=None,
    speculative: bool = False,
    stats: dict | None = None,
) -> str | list[str]:
    """Continuations of `prompts` (one string or a list), decoded without special tokens.

    temperature 0 is greedy; sampling is seeded by `seed`. Generation stops at the tokenizer's
    EOS (unless `stop_at_eos` is false) or after `max_new_tokens` tokens. `speculative` drafts
    with the model's MTP module (same tokens when greedy, same distribution when sampling);
    pass a dict as `stats` to receive its acceptance counts.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    check_against_model(tokenizer, model.cfg)
    ids = [encode_prompt(tokenizer, t, add_bos) for t in texts]
    eos = tokenizer.eos_id if stop_at_eos else None
    sampling = dict(
        key=jax.random.key(seed),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos,
        cache_dtype=cache_dtype,
    )
    if speculative:
        new, counts = speculative_generate(
            model, ids, max_new_tokens, mesh_sharding=mesh_sharding, **sampling
        )
        if stats is not None:
            stats.update(counts)
    else:
        new = generate(model, ids, max_new_tokens, mesh_sharding=mesh_sharding, **sampling)
    out = [tokenizer.decode(n) for n in new]
    return out[0] if single else out
