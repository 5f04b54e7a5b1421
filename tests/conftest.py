"""Shared fixtures: a tiny random Llama for fast tests, a character tokenizer, the real model."""

from __future__ import annotations

import os

import pytest
import torch
from tiny import CharTokenizer, make_tiny_llama, save_tiny_model_folder

pytest_plugins = ["pytester"]  # tests/test_reproducibility.py runs nbval on a notebook of its own

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("REFIMPL_PROGRESS", "0")


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_model_folder(tmp_path):
    """Path of a saved tiny model folder, and the model and tokenizer written there."""
    model, tokenizer = save_tiny_model_folder(tmp_path)
    return tmp_path, model, tokenizer


@pytest.fixture
def one_thread():
    """One intra-op thread during the test, restored afterwards: tiny models gain nothing from a
    thread pool, and on a busy 2-core machine two threads waiting on each other run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, CPU), loaded once per test session."""
    from refimpl.models import load_model

    return load_model("smollm2-135m")
