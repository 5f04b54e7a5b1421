"""refimpl.quantization.smoothquant: the edge cases of Eq. 4, smoothing fixes channel outliers that
per-token ranges cannot, the folded model computes the same logits (tiny model and SmolLM2) and
quantizes better with W8A8 than the naive model, atomicity and validation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from refimpl import calibration
from refimpl.quantization import activation, smoothquant, uniform
from refimpl.quantization.activation import ActivationQuantizedLinear


def _relative_error(y_hat, y) -> float:
    return ((y_hat - y).norm() / y.norm()).item()


def _absmax_and_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(16, generator=g) * 10 + 0.1, [torch.randn(8, 16, generator=g), torch.randn(4, 16, generator=g)]


def test_alpha_edge_cases_of_eq4():
    x_max, weights = _absmax_and_weights()
    w_max = torch.cat(weights).abs().amax(dim=0)  # max|W_j| over both layers reading the input
    # alpha = 1: s_j = max|X_j| (Eq. 3), every smoothed activation channel has range 1
    torch.testing.assert_close(smoothquant.smoothing_factors(x_max, weights, 1.0), x_max)
    # alpha = 0: s_j = 1 / max|W_j|, every smoothed weight column has range 1
    torch.testing.assert_close(smoothquant.smoothing_factors(x_max, weights, 0.0), 1 / w_max)
    # alpha = 0.5: the ranges of X diag(s)^-1 and diag(s) W are equal, sqrt(max|X_j| max|W_j|)
    s = smoothquant.smoothing_factors(x_max, weights, 0.5)
    torch.testing.assert_close(x_max / s, w_max * s)
    torch.testing.assert_close(x_max / s, (x_max * w_max).sqrt())
    # the max is over all layers: smoothing with one of them alone gives other factors
    assert not torch.allclose(smoothquant.smoothing_factors(x_max, weights[:1], 0.5), s)


def test_all_zero_channels_are_left_alone():
    x_max, weights = _absmax_and_weights()
    x_max[2] = 0.0
    for w in weights:
        w[:, 5] = 0.0
    s = smoothquant.smoothing_factors(x_max, weights, 0.5)
    assert s[2] == 1.0 and s[5] == 1.0 and torch.isfinite(s).all()


def test_smoothing_fixes_channel_outliers_for_per_token_w8a8():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 17]] *= 100.0  # outlier channels, in every token
    layer = nn.Linear(64, 32, bias=False)
    nn.init.normal_(layer.weight, std=0.05, generator=g)
    reference = layer(x)
    naive = ActivationQuantizedLinear(layer, weight_grid=uniform.Grid(8), act_grid=uniform.Grid(8, per="token"))
    s = smoothquant.smoothing_factors(x.abs().amax(dim=0), [layer.weight], alpha=0.5)
    smoothed_layer = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        smoothed_layer.weight.copy_(layer.weight * s)  # diag(s) W
    smoothed = ActivationQuantizedLinear(smoothed_layer, weight_grid=uniform.Grid(8), act_grid=uniform.Grid(8, per="token"))
    torch.testing.assert_close(smoothed_layer(x / s), reference, rtol=1e-4, atol=1e-4)  # Eq. 2: exact in fp
    naive_error, smoothed_error = _relative_error(naive(x), reference), _relative_error(smoothed(x / s), reference)
    assert smoothed_error < naive_error / 3


@pytest.mark.parametrize("smooth_down_proj", [False, True])
def test_smooth_model_keeps_logits_and_changes_only_norms_and_their_readers(tiny_llama, smooth_down_proj):
    blocks = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in tiny_llama.model.layers:  # make the factors differ from 1 a lot
            layer.input_layernorm.weight[[1, 7]] *= 50
            layer.post_attention_layernorm.weight[3] *= 50
        reference = tiny_llama(blocks).logits
    before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    assert smoothquant.smooth_model(tiny_llama, blocks, alpha=0.5, smooth_down_proj=smooth_down_proj) is tiny_llama
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(blocks).logits, reference, rtol=1e-4, atol=1e-5)
    changed = {n for n, p in tiny_llama.named_parameters() if not torch.equal(p, before[n])}
    readers = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "input_layernorm", "post_attention_layernorm")
    readers += ("down_proj",) if smooth_down_proj else ()
    assert changed == {n for n in before if any(f".{r}." in n for r in readers)}


def _outlier_llama(tiny_llama):
    with torch.no_grad():
        for layer in tiny_llama.model.layers:
            layer.input_layernorm.weight[[1, 7]] *= 50
            layer.post_attention_layernorm.weight[3] *= 50
    return tiny_llama


@pytest.mark.parametrize("per, static", [("token", False), ("tensor", False), ("tensor", True)])
def test_smoothing_reduces_w8a8_error_with_outlier_channels(tiny_llama, per, static):
    """Naive W8A8 vs SmoothQuant + W8A8 on a tiny Llama whose norms produce two outlier channels."""
    blocks = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    model = _outlier_llama(tiny_llama)
    with torch.no_grad():
        reference = model(blocks).logits
    errors = {}
    for name in ("naive", "smoothed"):
        candidate = copy.deepcopy(model)
        if name == "smoothed":
            smoothquant.smooth_model(candidate, blocks, alpha=0.5)
        activation.quantize_model_w8a8(candidate, blocks, act_grid=uniform.Grid(8, per=per), static=static)
        with torch.no_grad():
            errors[name] = _relative_error(candidate(blocks).logits, reference)
    assert errors["smoothed"] < 0.7 * errors["naive"]


@pytest.mark.parametrize("smooth_down_proj", [False, True])
def test_smooth_model_from_a_capture_equals_smoothing_from_blocks(tiny_llama, smooth_down_proj):
    blocks = torch.randint(0, tiny_llama.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    statistics = calibration.input_statistics(tiny_llama, blocks)
    from_blocks = smoothquant.smooth_model(copy.deepcopy(tiny_llama), blocks, 0.6, smooth_down_proj=smooth_down_proj)
    from_capture = smoothquant.smooth_model(copy.deepcopy(tiny_llama), None, 0.6, smooth_down_proj=smooth_down_proj,
                                            statistics=statistics)
    captured = dict(from_capture.named_parameters())
    assert all(torch.equal(p, captured[n]) for n, p in from_blocks.named_parameters())
    with pytest.raises(ValueError, match="exactly one of blocks"):
        smoothquant.smooth_model(tiny_llama, blocks, statistics=statistics)
    with pytest.raises(ValueError, match="exactly one of blocks"):
        smoothquant.smooth_model(tiny_llama, None)
    del statistics["model.layers.1.mlp.gate_proj"]
    before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    with pytest.raises(ValueError, match="model.layers.1.mlp.gate_proj"):
        smoothquant.smooth_model(tiny_llama, None, statistics=statistics)
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.named_parameters())


def test_smooth_model_is_atomic(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    with pytest.raises(ValueError, match="NaN"):
        smoothquant.smooth_model(tiny_llama, torch.zeros(1, 8, dtype=torch.long))
    assert all(torch.allclose(p, before[n], rtol=0, atol=0, equal_nan=True) for n, p in tiny_llama.named_parameters())


@pytest.mark.parametrize("alpha", [-0.1, 1.5, True, "0.5", float("nan")])
def test_alpha_is_validated(tiny_llama, alpha):
    with pytest.raises(ValueError, match="alpha"):
        smoothquant.smooth_model(tiny_llama, torch.zeros(1, 8, dtype=torch.long), alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant.smoothing_factors(torch.ones(4), [torch.ones(2, 4)], alpha=alpha)


def test_factor_validation():
    with pytest.raises(ValueError, match="in_features = 4"):
        smoothquant.smoothing_factors(torch.ones(4), [torch.ones(2, 5)])
    with pytest.raises(ValueError, match="non-empty list"):
        smoothquant.smoothing_factors(torch.ones(4), [])
    with pytest.raises(ValueError, match="act_absmax"):
        smoothquant.smoothing_factors(-torch.ones(4), [torch.ones(2, 4)])
    with pytest.raises(TypeError, match="Hugging Face decoder"):
        smoothquant.smooth_model(nn.Sequential(nn.Linear(4, 4)), torch.zeros(1, 8, dtype=torch.long))


def test_smooth_model_needs_llama_structure(tiny_llama):
    tiny_llama.model.layers[0].input_layernorm = nn.Identity()
    with pytest.raises(TypeError, match="input_layernorm"):
        smoothquant.smooth_model(tiny_llama, torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_smooth_model_keeps_smollm2_logits(smollm2):
    """The real model, two 64-token calibration blocks: the folded model's logits (up to ~34 in
    magnitude) stay within 1e-3 (measured: 1e-4) of the original's."""
    from refimpl import data

    model, tokenizer = smollm2
    blocks = data.token_blocks(tokenizer, data.load_text("shakespeare", "calibration"), 64, 2)
    smoothed = smoothquant.smooth_model(copy.deepcopy(model), blocks, alpha=0.5)  # never touch the shared model
    with torch.no_grad():
        reference, logits = model(blocks).logits, smoothed(blocks).logits
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-3)
    norm = smoothed.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, model.model.layers[0].input_layernorm.weight)  # it did smooth
