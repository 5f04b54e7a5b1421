"""The optional peer check (scripts/peers.py): the llmcompressor recipes hold the settings the script
reports, and those match refimpl's effects-table settings; a stored quick run has the promised shape.

The recipe tests need llmcompressor, which only the peer environment has (`bash scripts/make_peers_env.sh`,
then `.venv-peers/bin/python -m pytest tests/test_peers.py -p no:nbval`); elsewhere they are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK_JSON = ROOT / "results" / "peers" / "llmcompressor-quick.json"


def _load_peers():
    spec = importlib.util.spec_from_file_location("peers", ROOT / "scripts" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peers = _load_peers()
needs_llmcompressor = pytest.mark.skipif(
    importlib.util.find_spec("llmcompressor") is None,
    reason="llmcompressor is only in the optional peer environment (bash scripts/make_peers_env.sh)")


def test_settings_quote_the_effects_rows_constants():
    from refimpl.effects import recipes

    assert peers.GROUP == recipes.GROUP and peers.SPARSITY == recipes.SPARSITY
    for method in peers.METHODS:
        described = peers.settings(method)
        assert set(described) == {"refimpl", "llmcompressor", "unmatched"}
        assert described["refimpl"]["call"] and described["llmcompressor"]["call"]
    with pytest.raises(ValueError, match="method must be one of"):
        peers.settings("rtn")


@needs_llmcompressor
def test_gptq_and_awq_recipes_hold_refimpls_grid():
    import torch

    (gptq,) = peers.llmcompressor_recipe("gptq")
    awq, rtn = peers.llmcompressor_recipe("awq")
    for modifier in (gptq, rtn):
        weights = modifier.config_groups["group_0"].weights
        assert (weights.num_bits, weights.symmetric, weights.strategy, weights.group_size) == (4, False, "group", 64)
        assert weights.scale_dtype == torch.float16
        assert modifier.ignore == ["lm_head"]
    assert gptq.config_groups["group_0"].weights.actorder in ("static", "weight")  # refimpl's act_order: static groups
    assert (gptq.block_size, gptq.dampening_frac) == (peers.BLOCK_SIZE, peers.DAMP)
    assert (awq.duo_scaling, awq.n_grid) == (False, peers.AWQ_GRID)  # refimpl's s = mean|x|^alpha


@needs_llmcompressor
def test_smoothquant_and_pruning_recipes():
    smooth, w8a8 = peers.llmcompressor_recipe("smoothquant")
    assert smooth.smoothing_strength == peers.SMOOTHQUANT_ALPHA
    assert smooth.mappings is None  # its default Llama mappings: norm -> q,k,v and norm -> gate,up
    assert peers.llmcompressor_recipe("smoothquant-row")[0].mappings is None
    assert "smooth_down_proj=False" in peers.settings("smoothquant")["refimpl"]["call"]
    assert "smooth_down_proj=True" in peers.settings("smoothquant-row")["refimpl"]["call"]  # the effects row
    scheme = w8a8.config_groups["group_0"]
    assert (scheme.weights.num_bits, scheme.weights.symmetric, scheme.weights.strategy) == (8, True, "channel")
    acts = scheme.input_activations
    assert (acts.num_bits, acts.symmetric, acts.strategy, acts.dynamic) == (8, True, "tensor", True)
    for method in ("sparsegpt", "wanda"):
        (modifier,) = peers.llmcompressor_recipe(method)
        assert (modifier.sparsity, modifier.mask_structure) == (peers.SPARSITY, "0:0")
        assert modifier.ignore == ["re:.*lm_head"]


@pytest.mark.skipif(not QUICK_JSON.exists(), reason="no stored quick run (results/peers/llmcompressor-quick.json)")
def test_stored_quick_run_has_the_promised_shape():
    result = json.loads(QUICK_JSON.read_text())
    assert {"command", "commit", "versions", "machine", "protocol", "dense", "methods"} <= set(result)
    assert {"torch", "transformers", "llmcompressor", "compressed-tensors"} <= set(result["versions"])
    corpora = set(result["dense"])
    assert result["methods"]
    for method, measured in result["methods"].items():
        assert method in peers.METHODS
        assert set(measured["settings"]) == {"refimpl", "llmcompressor", "unmatched"}
        assert set(measured["seconds"]) == {"refimpl", "llmcompressor"}
        assert all(seconds > 0 for seconds in measured["seconds"].values())
        assert set(measured["perplexity"]) == set(measured["ratio_refimpl_over_llmcompressor"]) == corpora
        intervals = [measured["ratio_refimpl_over_llmcompressor"][c] for c in corpora]
        intervals += [measured["perplexity"][c][side] for c in corpora for side in ("refimpl", "llmcompressor")]
        for interval in intervals:
            assert math.isfinite(interval["estimate"]) and interval["low"] <= interval["estimate"] <= interval["high"]


def test_the_committed_comparison_is_read_and_printed_without_the_peer_environment(tmp_path):
    from refimpl import peers as committed

    result = committed.load(QUICK_JSON)
    assert "llmcompressor 0.14" in committed.describe(result)
    table = committed.format_methods(result, ("gptq",))
    gptq = result["methods"]["gptq"]
    ratio = gptq["ratio_refimpl_over_llmcompressor"]["shakespeare"]
    assert f"{ratio['estimate']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]" in table
    assert f"{gptq['seconds']['refimpl'] / gptq['seconds']['llmcompressor']:.2f}" in table.splitlines()[-1]
    with pytest.raises(ValueError, match="methods"):
        committed.format_methods(result, ("rtn",))
    with pytest.raises(ValueError, match="methods"):
        committed.format_methods(result, "gptq")
    with pytest.raises(FileNotFoundError, match="path"):
        committed.load(tmp_path / "none.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="path .* no"):
        committed.load(tmp_path / "other.json")
