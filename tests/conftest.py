"""Shared fixtures: the real SmolLM2 tokenizer, tiny random llama/qwen2 models, and the real SmolLM2-135M."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import AutoTokenizer

from brep_rl.model import gguf_to_hf_folder, smollm2_gguf
from testing_utils import make_tiny

torch.set_num_threads(int(os.environ.get("BREP_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def smollm2_folder():
    return gguf_to_hf_folder(smollm2_gguf())


@pytest.fixture(scope="session")
def tokenizer(smollm2_folder):
    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    tok.padding_side = "left"
    return tok


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random llama saved as an HF folder with the real tokenizer: a stand-in base for training runs."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", len(tokenizer), tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
