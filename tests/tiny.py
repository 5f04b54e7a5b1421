"""Tiny random models and a character tokenizer for fast tests (imported by the tests and by conftest)."""

from __future__ import annotations

import torch


class CharTokenizer:
    """A stand-in for a Hugging Face tokenizer: one token per character (code point mod vocab)."""

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True):
        return {"input_ids": [ord(c) % self.vocab_size for c in text]}


def make_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True)
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


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


def make_decoding_llama(seed: int = 0, num_hidden_layers: int = 4):
    """A tiny Llama whose greedy output does not collapse onto one token (wide initialisation), with
    random RMSNorm gains: initialised to ones, every norm would be the same function and a mixed-up
    norm would go unseen. For the decoding tests (early exit, layer skipping)."""
    model = make_tiny_llama(seed, initializer_range=0.5, num_hidden_layers=num_hidden_layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
    return model


def random_prompt(length: int, seed: int = 0) -> torch.Tensor:
    """``LongTensor[1, length]`` of random ids of the tiny vocabulary (128)."""
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))
