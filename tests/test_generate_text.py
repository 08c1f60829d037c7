"""Text generation from a checkpoint folder: `deepseek-jax generate` and `generate_text` on a
small random Hugging Face checkpoint with its own tokenizer.json print exactly what
transformers' greedy `generate` produces from the same prompt."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from deepseek_jax.cli import main
from deepseek_jax.data.tokenizer import HFTokenizer
from deepseek_jax.generate.text import encode_prompt, generate_text, load_for_generation

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
WORDS = "the a of to in is was for on that with as by at from it be this are an".split()
PROMPTS = ["the cat is on a", "it was"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_generate")
    vocab = {BOS: 0, EOS: 1, "[UNK]": 2} | {w: i + 3 for i, w in enumerate(WORDS + ["cat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    cfg = DeepseekV3Config(
        vocab_size=48,  # larger than the tokenizer's 24: padded vocabularies are the norm
        hidden_size=48,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return path, model


def transformers_greedy(model, tokenizer, prompt: str) -> str:
    ids = encode_prompt(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=MAX_NEW,
            min_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=1,
        )
    new = out[0, len(ids) :].tolist()
    assert len(new) == MAX_NEW
    return tokenizer.decode(new)


def test_cli_generate_matches_transformers_greedy(hf_dir, capsys):
    path, hf_model = hf_dir
    tokenizer = HFTokenizer(path / "tokenizer.json")
    want = [p + transformers_greedy(hf_model, tokenizer, p) for p in PROMPTS]
    argv = ["generate", str(path), "--max-new-tokens", str(MAX_NEW), "--ignore-eos"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == want
    assert len({w.split(p)[1] for w, p in zip(want, PROMPTS, strict=True)}) == 2  # not constant


def test_generate_text_function(hf_dir):
    path, _ = hf_dir
    model, tokenizer = load_for_generation(path)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.bos_id == 0
    one = generate_text(model, tokenizer, PROMPTS[0], MAX_NEW, stop_at_eos=False)
    both = generate_text(model, tokenizer, PROMPTS, MAX_NEW, stop_at_eos=False)
    assert isinstance(one, str) and both[0] == one
    sampled = generate_text(model, tokenizer, PROMPTS, 6, temperature=1.0, seed=3)
    assert sampled == generate_text(model, tokenizer, PROMPTS, 6, temperature=1.0, seed=3)


def test_cli_generate_errors(hf_dir, tmp_path, capsys):
    path, _ = hf_dir
    assert main(["generate", str(path)]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err
    # A tokenizer larger than the model's vocabulary is refused by name.
    big = tmp_path / "big"
    big.mkdir()
    vocab = {BOS: 0, EOS: 1} | {f"w{i}": i + 2 for i in range(100)}
    Tokenizer(models.WordLevel(vocab, unk_token=EOS)).save(str(big / "tokenizer.json"))
    code = main(
        ["generate", str(path), "--prompt", "x", "--tokenizer", str(big / "tokenizer.json")]
    )
    assert code == 2
    assert "vocab_size" in capsys.readouterr().err
