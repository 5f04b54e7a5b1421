"""Shared fixtures: a tiny random Llama for fast tests, a character tokenizer, the real model."""

from __future__ import annotations

import os
import shutil

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


# Headless Chromium driven by Playwright, for the book's pages (tests/test_book.py) and the Lab
# (tests/test_lab.py). Skipped where Playwright or Chromium is missing, unless REFIMPL_REQUIRE_BROWSER
# is set, as CI does after installing Chromium (.ci/run).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str | None:
    return os.environ.get("REFIMPL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    required = bool(os.environ.get("REFIMPL_REQUIRE_BROWSER"))
    try:
        from playwright import sync_api
    except ImportError:
        (pytest.fail if required else pytest.skip)("playwright is not installed")
    executable = _chromium()
    if executable is None:
        (pytest.fail if required else pytest.skip)("no Chromium found (install it, or set REFIMPL_CHROMIUM to its path)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
