"""refimpl.quantization.awq: alpha = 0 is round-to-nearest, the search never does worse and helps
when some input channels are salient; shared scales for layers reading one input; validation."""

from __future__ import annotations

import pytest
import torch

from refimpl import anatomy, calibration
from refimpl.quantization import awq, packed, uniform


def _inputs_with_salient_channels(n_tokens=256, n_in=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, n_in, generator=g)
    x[:, :3] *= 30  # a few channels with large activations
    return x


def _stats(x):
    return calibration.InputStatistics.from_inputs(x)


def _grid(bits, group_size=64):
    return uniform.Grid(bits, symmetric=False, group_size=group_size)


def _error(weight, quantized, x):
    return ((x @ weight.T - x @ quantized.T) ** 2).sum().item()


def test_alpha_zero_is_round_to_nearest():
    x = _inputs_with_salient_channels()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    _, _, errors = awq.search_scales([weight], _stats(x), _grid(3, 16))
    rtn = uniform.fake_quantize(weight, _grid(3, 16), uniform.WEIGHT_SCALE_DTYPE)
    assert errors[0] == pytest.approx(_error(weight, rtn, x), rel=1e-5)


@pytest.mark.parametrize("bits, group_size", [(3, 16), (4, 16), (3, None), (2, 32)])
def test_search_beats_rtn_with_salient_channels(bits, group_size):
    x = _inputs_with_salient_channels()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    scales, alpha, errors = awq.search_scales([weight], _stats(x), _grid(bits, group_size))
    assert alpha > 0 and min(errors) < errors[0]
    assert scales[:3].min() > scales[3:].max()  # the salient channels get the largest scales
    quantized, _ = awq._quantize_scaled(weight, scales, _grid(bits, group_size))
    assert _error(weight, quantized, x) == pytest.approx(min(errors), rel=1e-5)


def test_search_validates():
    stats = _stats(torch.randn(8, 16))
    with pytest.raises(ValueError, match="in_features = 16"):
        awq.search_scales([torch.randn(4, 8)], stats, _grid(4, None))
    with pytest.raises(ValueError, match="non-empty list"):
        awq.search_scales([], stats, _grid(4))
    with pytest.raises(ValueError, match="n_grid"):
        awq.search_scales([torch.randn(4, 16)], stats, _grid(4, None), n_grid=0)
    with pytest.raises(TypeError, match="InputStatistics"):
        awq.search_scales([torch.randn(4, 16)], torch.randn(8, 16), _grid(4))
    with pytest.raises(TypeError, match="grid must be a uniform.Grid"):
        awq.search_scales([torch.randn(4, 16)], stats, 4)
    with pytest.raises(ValueError, match="grid must have a granularity in \\['channel', 'group'\\], got 'tensor'"):
        awq.search_scales([torch.randn(4, 16)], stats, uniform.Grid(4, per="tensor"))


def test_statistics_captured_once_give_the_same_first_layer():
    """Sequential calibration and statistics captured once agree on the first decoder layer (its
    inputs do not depend on earlier quantized layers) and differ later."""
    from tiny import make_tiny_llama

    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    sequential, captured = make_tiny_llama(), make_tiny_llama()
    statistics = calibration.input_statistics(captured, blocks)
    a, b = {}, {}
    awq.quantize_model_awq(sequential, blocks, _grid(3, 16), alphas=a)
    awq.quantize_model_awq(captured, None, _grid(3, 16), statistics=statistics, alphas=b)
    first = lambda alphas: {k: v for k, v in alphas.items() if k.startswith("model.layers.0.")}  # noqa: E731
    assert first(a) == first(b) and len(first(a)) == 4
    assert torch.equal(sequential.model.layers[0].self_attn.q_proj.weight, captured.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(sequential.model.layers[1].mlp.down_proj.weight, captured.model.layers[1].mlp.down_proj.weight)


def test_model_awq_shares_scales_among_layers_reading_one_input(tiny_llama):
    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    alphas = {}
    assert awq.quantize_model_awq(tiny_llama, blocks, _grid(3, 16), alphas=alphas) is tiny_llama
    # per decoder layer: {q,k,v}, o, {gate,up}, down
    assert sorted(alphas) == sorted(anatomy.layer_name(i, n) for i in range(2)
                                    for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"))
    changed = {n for n, p in tiny_llama.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.endswith("proj.weight")}


@pytest.mark.parametrize("grid, clip", [(_grid(3, 16), False),
                                        (uniform.Grid(4, group_size=16, narrow_range=False), True)])
def test_model_awq_packs_what_it_simulates(grid, clip):
    """Also on the full symmetric range (all 2^bits codes), with clipping."""
    from tiny import make_tiny_llama

    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    simulated, stored = make_tiny_llama(), make_tiny_llama()
    a, b = {}, {}
    awq.quantize_model_awq(simulated, blocks, grid, alphas=a, clip=clip)
    awq.quantize_model_awq(stored, blocks, grid, pack=True, alphas=b, clip=clip)
    assert a == b
    layers = [m for m in stored.modules() if isinstance(m, packed.QuantizedLinear)]
    assert len(layers) == 2 * 7 and all(m.input_scale is not None for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(stored(blocks).logits, simulated(blocks).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_half_precision_models_pack_and_nan_fails_first(method):
    from tiny import make_tiny_llama

    from refimpl.quantization import gptq

    blocks = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize = {"awq": awq.quantize_model_awq, "gptq": gptq.quantize_model_gptq}[method]
    model = make_tiny_llama().to(torch.bfloat16)
    quantize(model, blocks, _grid(4, 16), pack=True)
    assert sum(isinstance(m, packed.QuantizedLinear) for m in model.modules()) == 2 * 7
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj holds NaN"):
        quantize(model, blocks, _grid(4, 16))
    assert all(torch.equal(a, b) or a.isnan().any() for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("bits, group_size", [(3, 16), (4, None)])
def test_clipping_search_never_loses_on_its_objective(bits, group_size):
    """Every group keeps a ratio of its own absmax from the grid, and its error on the diagonal Gram
    block is at most the unclipped one (ratio 1 is a candidate) — strictly smaller somewhere."""
    x = _inputs_with_salient_channels()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    gram = x.T @ x
    max_abs = awq.search_clipping(weight, gram, _grid(bits, group_size))
    size = group_size or 64
    grouped = weight.reshape(16, -1, size)
    ratio = max_abs / grouped.abs().amax(dim=-1, keepdim=True)
    steps = (1 - ratio) * 20
    assert torch.allclose(steps, steps.round(), atol=1e-4) and ratio.min() > 0.5 - 1e-6 and ratio.max() <= 1 + 1e-6

    def block_errors(m):
        delta = (awq._quantize_scaled(weight, torch.ones(64), _grid(bits, group_size), m)[0] - weight).reshape(grouped.shape)
        blocks = torch.stack([gram[k * size:(k + 1) * size, k * size:(k + 1) * size] for k in range(grouped.shape[1])])
        return torch.einsum("ogi,gij,ogj->og", delta, blocks, delta)

    clipped, unclipped = block_errors(max_abs), block_errors(grouped.abs().amax(dim=-1, keepdim=True))
    assert (clipped <= unclipped * (1 + 1e-6)).all() and (clipped < unclipped).any()
    with pytest.raises(ValueError, match="max_shrink"):
        awq.search_clipping(weight, gram, _grid(bits), max_shrink=1.0)
    with pytest.raises(ValueError, match="gram"):
        awq.search_clipping(weight, gram[:8], _grid(bits))
    with pytest.raises(ValueError, match="group_size 24 must divide"):
        awq.search_clipping(weight, gram, _grid(bits, 24))
    assert torch.equal(awq.search_clipping(weight, gram.double(), _grid(bits, group_size)), max_abs)


def test_model_awq_clips_all_but_queries_and_keys_and_packs_it():
    from tiny import make_tiny_llama

    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    plain, clipped, stored = make_tiny_llama(), make_tiny_llama(), make_tiny_llama()
    awq.quantize_model_awq(plain, blocks, _grid(3, 16))
    awq.quantize_model_awq(clipped, blocks, _grid(3, 16), clip=True)
    awq.quantize_model_awq(stored, blocks, _grid(3, 16), clip=True, pack=True)
    # layer 0 sees the same inputs in both models, so only clipping can differ there
    first = {n: p for n, p in plain.named_parameters() if ".layers.0." in n}
    same = {n for n, p in clipped.named_parameters() if n in first and torch.equal(p, first[n])}
    assert {n for n in same if n.endswith("proj.weight")} == {"model.layers.0.self_attn.q_proj.weight",
                                                            "model.layers.0.self_attn.k_proj.weight"}
    with torch.no_grad():
        torch.testing.assert_close(stored(blocks).logits, clipped(blocks).logits, rtol=1e-5, atol=1e-5)


def test_model_awq_checks_before_changing(tiny_llama):
    before = [p.clone() for p in tiny_llama.parameters()]
    with pytest.raises(ValueError, match="group_size 48 must divide"):
        awq.quantize_model_awq(tiny_llama, torch.zeros(1, 8, dtype=torch.long), _grid(4, 48))
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_llama.parameters()))


@pytest.mark.slow
def test_awq_beats_rtn_on_smollm2_activations(smollm2):
    """Real activations of layers 0 and 29, 3 bits, groups of 64: the searched scales beat
    round-to-nearest (alpha = 0) on at least one of these layers."""
    from refimpl import data

    model, tokenizer = smollm2
    blocks = data.token_blocks(tokenizer, data.load_text("docstrings", "calibration"), seq_len=128, n_blocks=4)
    gains = []
    for capture in calibration.layerwise(model, blocks):
        if capture.index not in (0, 29):
            continue
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            _, _, errors = awq.search_scales([capture.linears[name].weight], _stats(capture.inputs[name]), _grid(3, 64),
                                             n_grid=10)
            gains.append(errors[0] / min(errors))
    assert max(gains) > 1.0
