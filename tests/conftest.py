"""Shared fixtures: the real SmolLM2 tokenizer, tiny random llama/qwen2 models, and the real SmolLM2-135M."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from brep_rl.model import freeze, gguf_to_hf_folder, smollm2_gguf

torch.set_num_threads(int(os.environ.get("BREP_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def smollm2_folder():
    return gguf_to_hf_folder(smollm2_gguf())


@pytest.fixture(scope="session")
def tokenizer(smollm2_folder):
    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    tok.padding_side = "left"
    return tok


def make_tiny(arch: str, vocab_size: int, pad_token_id: int, seed: int = 0, hidden: int = 64, layers: int = 3):
    """A tiny random model whose greedy outputs vary with the input (initializer_range large enough)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    model.name_or_path = f"tiny-{arch}"
    freeze(model)
    return model


@pytest.fixture(params=["llama", "qwen2"])
def tiny(request, tokenizer):
    return make_tiny(request.param, len(tokenizer), tokenizer.pad_token_id)


@pytest.fixture
def tiny_llama(tokenizer):
    return make_tiny("llama", len(tokenizer), tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def smollm2():
    from brep_rl import load_base

    return load_base("smollm2-135m")


PROMPTS = [
    "What is 12 + 30?",
    "Tom has 3 apples and buys 4 more. How many apples does he have now?",
    "Compute 7 times 8.",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random llama saved as an HF folder with the real tokenizer: a stand-in base for training runs."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", len(tokenizer), tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
