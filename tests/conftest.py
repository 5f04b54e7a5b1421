"""Shared fixtures: a tiny random Llama for fast tests, a character tokenizer, the real model."""

from __future__ import annotations

import os

import pytest
import torch

pytest_plugins = ["pytester"]  # tests/test_reproducibility.py runs nbval on a notebook of its own

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("REFIMPL_PROGRESS", "0")


class CharTokenizer:
    """A stand-in for a Hugging Face tokenizer: one token per character (code point mod vocab)."""

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True):
        return {"input_ids": [ord(c) % self.vocab_size for c in text]}


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


def make_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True)
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def save_tiny_model_folder(path, seed: int = 0):
    """Write a tiny random Llama and a word-level tokenizer as an ordinary Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    model = make_tiny_llama(seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


@pytest.fixture
def tiny_model_folder(tmp_path):
    """Path of a saved tiny model folder, and the model and tokenizer written there."""
    model, tokenizer = save_tiny_model_folder(tmp_path)
    return tmp_path, model, tokenizer


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, CPU), loaded once per test session."""
    from refimpl.models import load_model

    return load_model("smollm2-135m")
