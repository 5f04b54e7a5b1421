"""refimpl.quantization.gptq: equals RTN when inputs are uncorrelated, beats RTN on the layer-wise
objective when they are not (random and real SmolLM2 activations), and validates its inputs."""

from __future__ import annotations

import pytest
import torch

from refimpl import calibration, obs
from refimpl.quantization import gptq, packed, uniform


def _correlated_inputs(n_tokens=512, n_in=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_in, n_in, generator=g) / n_in**0.5
    scales = torch.logspace(-1, 1, n_in)  # some input channels far larger than others
    return (torch.randn(n_tokens, n_in, generator=g) @ mixing) * scales


def _reconstruction_error(weight, quantized, x):
    return ((x @ weight.T - x @ quantized.T) ** 2).sum().item()


def _grid(bits, group_size=None, symmetric=False, narrow_range=None):
    return uniform.Grid(bits, symmetric, group_size, narrow_range=narrow_range)


#: GPTQ's reference symmetric grid (quant.py, sym=True): all 2^bits codes, scale 2 absmax / (2^bits - 1)
def _full(bits, group_size=None):
    return _grid(bits, group_size, symmetric=True, narrow_range=False)


def _rtn(weight, grid):
    return uniform.fake_quantize(weight, grid, uniform.WEIGHT_SCALE_DTYPE)


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric, narrow_range", [(True, None), (True, False), (False, None)])
@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_give_round_to_nearest(group_size, symmetric, narrow_range, act_order):
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    identity = 2 * torch.eye(64, dtype=torch.float64)  # H of white inputs: nothing to compensate
    grid = _grid(3, group_size, symmetric, narrow_range)
    quantized = gptq.gptq_quantize(weight, identity, grid, act_order=act_order)[0]
    torch.testing.assert_close(quantized, _rtn(weight, grid), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size, act_order", [(None, False), (16, False), (None, True), (16, True)])
def test_gptq_beats_rtn_on_the_layer_objective(bits, group_size, act_order):
    x = _correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    quantized = gptq.gptq_quantize(weight, gptq.hessian(x), _grid(bits, group_size), act_order=act_order,
                                   block_size=16)[0]
    rtn = _rtn(weight, _grid(bits, group_size))
    assert _reconstruction_error(weight, quantized, x) < _reconstruction_error(weight, rtn, x)
    # every column stays on the grid: at most 2^bits distinct values per row (and group)
    per_scale = quantized.view(32, -1, group_size or 64)
    assert max(len(torch.unique(v)) for v in per_scale.reshape(-1, group_size or 64)) <= 2**bits


def test_act_order_helps_when_large_inputs_come_last():
    """The synthetic inputs grow along the columns: in natural order the largest columns are
    quantized last, with no columns left to absorb their error; act-order visits them first."""
    x = _correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    H = gptq.hessian(x)
    natural = _reconstruction_error(weight, gptq.gptq_quantize(weight, H, _grid(3), act_order=False)[0], x)
    act_order = _reconstruction_error(weight, gptq.gptq_quantize(weight, H, _grid(3), act_order=True)[0], x)
    assert act_order < natural


def test_act_order_is_the_default():
    """The authors' --act-order (their LLaMA results) and AutoGPTQ's desc_act=True: on by default."""
    import inspect

    for function in (gptq.gptq_quantize, gptq.quantize_model_gptq):
        assert inspect.signature(function).parameters["act_order"].default is True
    x = _correlated_inputs(seed=8)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))
    H = gptq.hessian(x)
    default = gptq.gptq_quantize(weight, H, _grid(3, 16))[0]
    assert torch.equal(default, gptq.gptq_quantize(weight, H, _grid(3, 16), act_order=True)[0])
    assert not torch.equal(default, gptq.gptq_quantize(weight, H, _grid(3, 16), act_order=False)[0])


def test_block_size_does_not_change_the_result():
    x = _correlated_inputs(seed=3)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    H = gptq.hessian(x)
    a = gptq.gptq_quantize(weight, H, _grid(3), block_size=64)[0]
    b = gptq.gptq_quantize(weight, H, _grid(3), block_size=7)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _reference_gptq(weight, H, bits, group_size, act_order, damp=0.01):
    """GPTQ without lazy batches, one column at a time on the full matrix, with U from the paper's
    formula (Cholesky factor of the inverse): what the optimised loop must reproduce."""
    W, H = weight.clone(), H.clone()
    n = W.shape[1]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    params = lambda cols: uniform.compute_qparams(cols, _grid(bits), uniform.WEIGHT_SCALE_DTYPE)  # noqa: E731
    static = {g: params(W[:, g:g + group_size]) for g in range(0, n, group_size)} if group_size else {}
    whole = None if group_size else params(W)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(n)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i in range(n):
        column = int(perm[i])
        if whole is not None:
            qp = whole
        elif act_order:
            qp = static[column - column % group_size]
        elif column % group_size == 0:
            qp = params(W[:, i:i + group_size])
        Q[:, i] = uniform.dequantize(uniform.quantize(W[:, i:i + 1], qp), qp, (W.shape[0], 1))[:, 0]
        W[:, i + 1:] -= ((W[:, i] - Q[:, i]) / U[i, i])[:, None] * U[i, i + 1:][None, :]
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize("group_size, act_order", [(None, False), (16, False), (16, True), (None, True)])
def test_the_blocked_loop_equals_the_column_by_column_algorithm(group_size, act_order):
    x = _correlated_inputs(seed=5)
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    H = gptq.hessian(x)
    reference = _reference_gptq(weight, H, 3, group_size, act_order)
    for block_size in (128, 32, 16):  # multiples of the group size: the same scales
        ours = gptq.gptq_quantize(weight, H, _grid(3, group_size), act_order=act_order, block_size=block_size)[0]
        assert ours.is_contiguous()
        # a last-bit difference in U may move a value across a rounding boundary: allow one code step in 1 %
        step = (ours - reference).abs()
        assert (step > 1e-5).float().mean() < 0.01


def test_upper_cholesky_of_inverse_equals_the_papers_formula():
    H = gptq.hessian(_correlated_inputs(seed=6)) + 0.01 * torch.eye(64)
    U = obs.upper_cholesky_of_inverse(H)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    assert torch.equal(U, torch.triu(U))
    # float32, two routes through H (condition number 2.5e4): measured 3.3e-6 to 4.5e-6 (largest |U| 8.5)
    torch.testing.assert_close(U, reference, rtol=1e-4, atol=1e-5)
    exact = obs.upper_cholesky_of_inverse(H.double())  # the identity itself, without float32 rounding
    # float64, but a factorisation and two inverses are not order-independent: their error is bounded by
    # n * eps * cond(H) = 64 * 1.1e-16 * 2.5e4 = 2e-10 of H^-1's size, not of each (possibly tiny) entry
    # (measured: 3e-15 of max |H^-1| = 75; a wrong factor is off by O(1))
    inverse = torch.linalg.inv(H.double())
    torch.testing.assert_close(exact.T @ exact, inverse, rtol=0, atol=2e-10 * inverse.abs().max().item())


def test_dead_inputs_get_zero_weights():
    x = _correlated_inputs()
    x[:, 5] = 0.0
    weight = torch.randn(8, 64)
    quantized = gptq.gptq_quantize(weight, gptq.hessian(x), _grid(4))[0]
    assert (quantized[:, 5] == 0).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(grid=4), TypeError, "grid must be a uniform.Grid"),
    (dict(grid=_grid(4, 5)), ValueError, "group_size 5 must divide"),
    (dict(grid=uniform.Grid(4, per="tensor")), ValueError, "grid must have a granularity in \\['channel', 'group'\\]"),
    (dict(grid=_grid(4), damp=1.5), ValueError, "damp"),
    (dict(grid=_grid(4), block_size=0), ValueError, "block_size"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        gptq.gptq_quantize(torch.randn(4, 16), torch.eye(16), **kwargs)[0]


def test_hessian_must_match_the_weight():
    with pytest.raises(ValueError, match="hessian_matrix must be a \\[16, 16\\]"):
        gptq.gptq_quantize(torch.randn(4, 16), torch.eye(8), _grid(4))[0]
    with pytest.raises(ValueError, match="non-empty"):
        gptq.hessian(torch.empty(0, 4))


@pytest.mark.parametrize("group_size, act_order", [(None, False), (16, False), (16, True)])
@pytest.mark.parametrize("make_grid", [_grid, _full])
def test_the_returned_grid_holds_the_weight(group_size, act_order, make_grid):
    x = _correlated_inputs()
    linear = torch.nn.Linear(64, 8)
    grid = make_grid(3, group_size)
    quantized, qparams = gptq.gptq_quantize(linear.weight, gptq.hessian(x), grid, act_order=act_order)
    assert qparams.grid == grid
    with torch.no_grad():
        linear.weight.copy_(quantized)
    module = packed.QuantizedLinear.from_linear(linear, grid, qparams=qparams)
    assert torch.equal(module.dequantized_weight(), quantized)


@pytest.mark.parametrize("group_size, reverse", [(None, False), (16, False), (16, True)])
@pytest.mark.parametrize("make_grid", [_grid, _full])
def test_quantize_columns_puts_every_column_on_its_groups_grid(group_size, reverse, make_grid):
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))
    order = list(range(64))[::-1] if reverse else list(range(64))
    params = lambda w: uniform.compute_qparams(w, make_grid(3), uniform.WEIGHT_SCALE_DTYPE)  # noqa: E731
    if group_size is None:
        given = {0: params(weight)}
    elif reverse:  # the columns of a group do not come together: every group's grid is fixed beforehand
        given = {g: params(weight[:, g:g + 16]) for g in range(0, 64, 16)}
    else:  # one group fixed, the others taken on the way
        given = {16: params(weight[:, 16:32])}
    fixed = dict(given)
    H = obs.dampen(gptq.hessian(_correlated_inputs(seed=7))[order][:, order], 0.01)
    grid = make_grid(3, group_size)
    QT, qparams = gptq.quantize_columns(weight[:, order].T.contiguous(), obs.upper_cholesky_of_inverse(H), order,
                                        grid, given)
    assert given == fixed and all(qparams[g] is p for g, p in given.items())  # not modified, and kept
    assert sorted(qparams) == ([0] if group_size is None else [0, 16, 32, 48])
    used = set()
    for i, column in enumerate(order):
        p = qparams[0 if group_size is None else column - column % group_size]
        codes = QT[i] / p.scale[:, 0] + p.zero_point[:, 0]  # [out]
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.min() >= grid.qmin - 1e-4 and codes.max() <= grid.qmax + 1e-4
        used.update(codes.round().int().tolist())
    assert min(used) == grid.qmin  # the full range's extra code -2^(b-1) is used, the narrow one's ends too


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(grid=(4, False, None)), TypeError, "grid must be a uniform.Grid"),
    (dict(grid=uniform.Grid(4, per="token")), ValueError, "grid must have a granularity"),
    (dict(order=[0] * 16), ValueError, "order"),
    (dict(WT=torch.ones(16, 4, dtype=torch.long)), ValueError, "WT"),
    (dict(qparams=None), TypeError, "qparams"),
    (dict(qparams={}), ValueError, "key 0"),
    (dict(grid=_grid(4, 5), qparams={}), ValueError, "group_size 5 must divide"),
    (dict(grid=_grid(4, 8), qparams={}, order=list(range(16))[::-1]), ValueError, "every group's parameters"),
    (dict(block_size=0), ValueError, "block_size"),
])
def test_quantize_columns_rejects_bad_arguments(kwargs, error, match):
    qparams = uniform.compute_qparams(torch.randn(4, 16), _grid(4))
    args = dict(WT=torch.randn(16, 4), U=torch.eye(16), order=list(range(16)), grid=_grid(4),
                qparams={0: qparams}) | kwargs
    with pytest.raises(error, match=match):
        gptq.quantize_columns(**args)


def test_weighting_the_first_token_protects_it():
    """Inputs whose first token (of every block) points along its own direction: with uniform weights
    GPTQ may push error onto it; weighting it in the Hessian lowers its error."""
    g = torch.Generator().manual_seed(5)
    x = _correlated_inputs(n_tokens=512)  # [512, 64] = 8 blocks of 64 tokens
    x[::64] = 3 * torch.randn(8, 64, generator=g)
    stats = calibration.InputStatistics.from_inputs(x, seq_len=64)
    weight = torch.randn(32, 64, generator=g)
    first = x[::64]
    uniform_weights = gptq.gptq_quantize(weight, stats.hessian(1.0), _grid(3, 16))[0]
    weighted = gptq.gptq_quantize(weight, stats.hessian(64.0), _grid(3, 16))[0]
    assert _reconstruction_error(weight, weighted, first) < _reconstruction_error(weight, uniform_weights, first)


def test_layers_reading_one_input_are_quantized_as_if_alone(tiny_llama):
    """Stacking q, k, v (one Hessian) into one column loop gives each the result it gets alone."""
    blocks = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    statistics = calibration.input_statistics(tiny_llama, blocks)
    alone = {name: gptq.gptq_quantize(tiny_llama.get_submodule(name).weight, statistics[name].hessian(),
                                      _grid(3, 32))[0]
             for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj")}
    gptq.quantize_model_gptq(tiny_llama, None, _grid(3, 32), statistics=statistics)
    for name, expected in alone.items():
        torch.testing.assert_close(tiny_llama.get_submodule(name).weight, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid", [_grid(3, 32), _full(4, 32)])
def test_model_gptq_packs_what_it_simulates(grid):
    from tiny import make_tiny_llama

    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    simulated = gptq.quantize_model_gptq(make_tiny_llama(), blocks, grid)
    stored = gptq.quantize_model_gptq(make_tiny_llama(), blocks, grid, pack=True)
    assert sum(isinstance(m, packed.QuantizedLinear) for m in stored.modules()) == 2 * 7
    with torch.no_grad():
        torch.testing.assert_close(stored(blocks).logits, simulated(blocks).logits, rtol=1e-5, atol=1e-5)


def test_model_gptq_quantizes_in_place_and_checks_first():
    from tiny import make_tiny_llama

    model = make_tiny_llama(intermediate_size=96)
    before = [p.clone() for p in model.parameters()]
    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="group_size 64 must divide in_features of model.layers.0.mlp.down_proj"):
        gptq.quantize_model_gptq(model, blocks, _grid(4, 64))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="grid must have a granularity in \\['channel', 'group'\\], got 'tensor'"):
        gptq.quantize_model_gptq(model, blocks, uniform.Grid(4, per="tensor"))
    gptq.quantize_model_gptq(model, blocks, _grid(4, 32))
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert sum(changed) == 2 * 7  # every projection of both layers; embeddings and norms untouched


def test_statistics_captured_once_and_the_error_report():
    from tiny import make_tiny_llama

    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    model = make_tiny_llama()
    statistics = calibration.input_statistics(model, blocks)
    errors = {}
    gptq.quantize_model_gptq(model, None, _grid(3, 32), statistics=statistics, errors=errors)
    assert len(errors) == 2 * 7
    assert all(gptq_error < rtn_error for rtn_error, gptq_error in errors.values())
    with pytest.raises(ValueError, match="exactly one"):
        gptq.quantize_model_gptq(model, blocks, _grid(3, 32), statistics=statistics)


@pytest.mark.slow
def test_gptq_beats_rtn_on_every_smollm2_layer(smollm2):
    """Real activations: every linear layer of SmolLM2 (calibrated layer by layer), 3 bits, groups
    of 64: GPTQ's output error on the calibration inputs is below round-to-nearest's."""
    import copy

    from refimpl import data

    model, tokenizer = smollm2
    blocks = data.token_blocks(tokenizer, data.load_text("shakespeare", "calibration"), seq_len=128, n_blocks=4)
    errors = {}
    gptq.quantize_model_gptq(copy.deepcopy(model), blocks, _grid(3, 64), errors=errors)
    assert len(errors) == 30 * 7
    worse = [name for name, (rtn_error, gptq_error) in errors.items() if not gptq_error < rtn_error]
    assert not worse, worse
