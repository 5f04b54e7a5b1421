"""Unstructured and N:M pruning: masks, magnitude, Wanda and SparseGPT."""

from __future__ import annotations

import copy

import pytest
import torch

from tiny import make_tiny_llama
from refimpl import anatomy, calibration
from refimpl.pruning import magnitude, masks, sparsegpt, wanda


def _correlated_inputs(n_tokens: int, n_in: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and a few large ones, like an LLM layer's: [n_tokens, n_in]."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    x = torch.randn(n_tokens, n_in, generator=g) @ mixing
    x[:, :3] *= 10  # outlier features
    return x


def _stats(x: torch.Tensor) -> calibration.InputStatistics:
    return calibration.InputStatistics.from_inputs(x)


# --- masks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.93])
def test_row_mask_removes_exactly_the_lowest_of_every_row(sparsity):
    scores = torch.randn(7, 40).abs()
    keep = masks.unstructured_mask(scores, sparsity, "row")
    removed = round(sparsity * 40)
    assert ((~keep).sum(dim=1) == removed).all()
    for row, k in zip(scores, keep):
        if 0 < removed < 40:
            assert row[k].min() >= row[~k].max()


def test_layer_mask_removes_exactly_the_lowest_of_the_matrix_with_ties():
    scores = torch.randint(0, 4, (6, 10)).float()  # many ties
    keep = masks.unstructured_mask(scores, 0.45, "layer")
    assert (~keep).sum() == 27
    assert scores[keep].min() >= scores[~keep].max()
    assert torch.equal(keep, masks.unstructured_mask(scores, 0.45, "layer"))  # deterministic


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (3, 3)])
def test_nm_mask_keeps_the_n_highest_of_every_m(nm):
    n, m = nm
    scores = torch.randn(5, 48)
    keep = masks.nm_mask(scores, nm)
    groups, kept = scores.reshape(5, -1, m), keep.reshape(5, -1, m)
    assert (kept.sum(dim=2) == n).all()
    low_kept = torch.where(kept, groups, torch.inf).amin(dim=2)
    high_removed = torch.where(kept, -torch.inf, groups).amax(dim=2)
    assert (low_kept >= high_removed).all()


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "0.5", True, float("nan")])
def test_bad_sparsity_is_rejected(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        masks.unstructured_mask(torch.rand(2, 8), sparsity)


@pytest.mark.parametrize("nm, match", [((3, 2), "must not exceed"), ((0, 4), r"nm\[0\]"), ((2, 3), "divide"),
                                       ([2, 4], "tuple"), ((2,), "tuple")])
def test_bad_nm_is_rejected(nm, match):
    with pytest.raises(ValueError, match=match):
        masks.nm_mask(torch.rand(2, 8), nm)


def test_keep_highest_rejects_bad_counts():
    for n_remove in (-1, 9, 1.5):
        with pytest.raises(ValueError, match="n_remove"):
            masks.keep_highest(torch.rand(2, 8), n_remove)


@pytest.mark.parametrize("prune", [
    lambda m, **kw: magnitude.prune_model_magnitude(m, **kw),
    lambda m, **kw: wanda.prune_model_wanda(m, torch.randint(0, 128, (1, 8)), **kw),
    lambda m, **kw: sparsegpt.prune_model_sparsegpt(m, torch.randint(0, 128, (1, 8)), **kw),
], ids=["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=-0.1), "sparsity"), (dict(sparsity=1.0), "sparsity"), (dict(sparsity=float("nan")), "sparsity"),
    (dict(sparsity="0.5"), "sparsity"), (dict(sparsity=0.5, nm=(4, 2)), "must not exceed"),
    (dict(sparsity=0.5, nm=(2, 5)), "divide"),
])
def test_model_pruning_rejects_bad_arguments_and_leaves_the_model_alone(tiny_llama, prune, kwargs, match):
    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(ValueError, match=match):
        prune(tiny_llama, **kwargs)
    assert all(torch.equal(t, before[name]) for name, t in tiny_llama.state_dict().items())


def test_model_wanda_and_sparsegpt_reject_bad_calibration_arguments(tiny_llama):
    blocks = torch.randint(0, 128, (1, 8))
    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(ValueError, match="scope"):
        wanda.prune_model_wanda(tiny_llama, blocks, 0.5, scope="global")
    for prune in (wanda.prune_model_wanda, sparsegpt.prune_model_sparsegpt):
        with pytest.raises(ValueError, match="exactly one"):
            prune(tiny_llama, None, 0.5)
        with pytest.raises(ValueError, match="exactly one"):
            prune(tiny_llama, blocks, 0.5, statistics=calibration.input_statistics(tiny_llama, blocks))
    with pytest.raises(ValueError, match="damp"):
        sparsegpt.prune_model_sparsegpt(tiny_llama, blocks, 0.5, damp=0.0)
    with pytest.raises(ValueError, match="block_size"):
        sparsegpt.prune_model_sparsegpt(tiny_llama, blocks, 0.5, block_size=0)
    assert all(torch.equal(t, before[name]) for name, t in tiny_llama.state_dict().items())


def test_bad_scores_and_scope_are_rejected():
    with pytest.raises(ValueError, match="scores"):
        masks.unstructured_mask(torch.tensor([[0.1, float("nan")]]), 0.5)
    with pytest.raises(ValueError, match="scores"):
        masks.unstructured_mask(torch.rand(8), 0.5)
    with pytest.raises(ValueError, match="scope"):
        masks.unstructured_mask(torch.rand(2, 8), 0.5, scope="column")


# --- magnitude ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["layer", "row", "global"])
def test_magnitude_prunes_the_requested_fraction(tiny_llama, scope):
    magnitude.prune_model_magnitude(tiny_llama, 0.6, scope=scope)
    linears = anatomy.compressed_linears(tiny_llama).values()
    if scope == "global":
        total = sum(m.weight.numel() for m in linears)
        assert sum(int((m.weight == 0).sum()) for m in linears) == round(0.6 * total)
    else:
        for m in linears:
            zeros = (m.weight == 0).sum(dim=1) if scope == "row" else (m.weight == 0).sum()
            expected = round(0.6 * m.in_features) if scope == "row" else round(0.6 * m.weight.numel())
            assert (zeros == expected).all()
    assert tiny_llama.lm_head.weight.count_nonzero() == tiny_llama.lm_head.weight.numel()  # output layer dense


def test_global_magnitude_uses_one_threshold_and_breaks_ties_exactly(tiny_llama):
    with torch.no_grad():
        for m in anatomy.compressed_linears(tiny_llama).values():  # a coarse grid: many equal magnitudes
            m.weight.copy_((m.weight * 50).round() / 50)
    dense = copy.deepcopy(tiny_llama)
    magnitude.prune_model_magnitude(tiny_llama, 0.5, scope="global")
    kept, removed = [], []
    for (name, m), original in zip(anatomy.compressed_linears(tiny_llama).items(),
                                   anatomy.compressed_linears(dense).values()):
        kept.append(original.weight[m.weight != 0].abs())
        removed.append(original.weight[m.weight == 0].abs())
    kept, removed = torch.cat(kept), torch.cat(removed)
    assert kept.min() >= removed.max()
    assert len(removed) == round(0.5 * (len(kept) + len(removed)))
    assert masks.sparsity_of(tiny_llama) == pytest.approx(0.5, abs=1e-6)


def test_magnitude_nm_keeps_exactly_the_n_largest_of_every_m(tiny_llama):
    dense = copy.deepcopy(tiny_llama)
    magnitude.prune_model_magnitude(tiny_llama, 0.0, nm=(2, 4))
    for (name, m), original in zip(anatomy.compressed_linears(tiny_llama).items(),
                                   anatomy.compressed_linears(dense).values()):
        groups = m.weight.reshape(m.out_features, -1, 4)
        kept = groups != 0
        assert (kept.sum(dim=2) == 2).all(), name
        magnitudes = original.weight.abs().reshape(m.out_features, -1, 4)
        assert (torch.where(kept, magnitudes, torch.inf).amin(dim=2)
                >= torch.where(kept, -torch.inf, magnitudes).amax(dim=2)).all()
        assert torch.equal(m.weight[kept.reshape(m.weight.shape)], original.weight[kept.reshape(m.weight.shape)])


def test_magnitude_checks_before_changing_the_model(tiny_llama):
    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(ValueError, match="divide"):
        magnitude.prune_model_magnitude(tiny_llama, 0.5, nm=(2, 5))
    with pytest.raises(ValueError, match="global"):
        magnitude.prune_model_magnitude(tiny_llama, 0.5, scope="global", nm=(2, 4))
    with pytest.raises(ValueError, match="scope"):
        magnitude.prune_model_magnitude(tiny_llama, 0.5, scope="tensor")
    tiny_llama.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        magnitude.prune_model_magnitude(tiny_llama, 0.5)
    tiny_llama.model.layers[1].mlp.up_proj.weight.data[0, 0] = before["model.layers.1.mlp.up_proj.weight"][0, 0]
    for name, t in tiny_llama.state_dict().items():
        assert torch.equal(t, before[name]), name


# --- Wanda -------------------------------------------------------------------------------------------

def test_wanda_score_is_weight_magnitude_times_input_norm():
    w, x = torch.randn(4, 6), torch.randn(50, 6)
    norms = x.norm(dim=0)
    assert torch.allclose(wanda.wanda_scores(w, norms), w.abs() * norms[None, :])
    with pytest.raises(ValueError, match="input_norm"):
        wanda.wanda_scores(w, norms[:5])


def test_wanda_keeps_small_weights_on_large_inputs():
    w = torch.tensor([[0.1, 1.0, 0.9, 0.8]])
    x = torch.ones(16, 4)
    x[:, 0] = 100.0  # an outlier feature
    keep = wanda.wanda_mask(w, _stats(x), 0.5)
    assert keep[0, 0] and not keep[0, 3]
    assert not masks.unstructured_mask(w.abs(), 0.5)[0, 0]  # magnitude drops it


def test_wanda_mask_compares_per_row_or_per_layer_or_n_of_m():
    w, stats = torch.randn(6, 16), _stats(_correlated_inputs(64, 16))
    assert ((~wanda.wanda_mask(w, stats, 0.25)).sum(dim=1) == 4).all()
    assert (~wanda.wanda_mask(w, stats, 0.25, scope="layer")).sum() == 24
    assert (wanda.wanda_mask(w, stats, 0.0, nm=(2, 4)).reshape(6, 4, 4).sum(dim=2) == 2).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight=torch.randn(16)), ValueError, "weight"),
    (dict(weight=torch.randn(4, 8)), ValueError, "input_norm"),
    (dict(stats=torch.eye(16)), TypeError, "stats"),
    (dict(sparsity=1.0), ValueError, "sparsity"),
    (dict(nm=(2, 3)), ValueError, "divide"),
    (dict(scope="global"), ValueError, "scope"),
])
def test_wanda_mask_rejects_bad_arguments(kwargs, error, match):
    args = dict(weight=torch.randn(4, 16), stats=_stats(torch.randn(32, 16)), sparsity=0.5) | kwargs
    with pytest.raises(error, match=match):
        wanda.wanda_mask(**args)


def test_model_wanda_matches_the_layer_rule_and_prunes_per_row(tiny_llama):
    blocks = torch.randint(0, 128, (3, 16))
    statistics = calibration.input_statistics(tiny_llama, blocks)
    expected = {}
    for name, m in anatomy.compressed_linears(tiny_llama).items():
        scores = wanda.wanda_scores(m.weight, statistics[name].gram.diagonal().sqrt())
        expected[name] = m.weight * masks.unstructured_mask(scores, 0.5)
    wanda.prune_model_wanda(tiny_llama, None, 0.5, statistics=statistics)
    for name, m in anatomy.compressed_linears(tiny_llama).items():
        assert torch.equal(m.weight, expected[name])
        assert ((m.weight == 0).sum(dim=1) == m.in_features // 2).all()


def test_model_wanda_layer_by_layer_and_nm(tiny_llama):
    blocks = torch.randint(0, 128, (2, 16))
    once = copy.deepcopy(tiny_llama)
    wanda.prune_model_wanda(tiny_llama, blocks, 0.0, nm=(4, 8))
    wanda.prune_model_wanda(once, None, 0.0, nm=(4, 8), statistics=calibration.input_statistics(once, blocks))
    for name, m in anatomy.compressed_linears(tiny_llama).items():
        assert ((m.weight.reshape(m.out_features, -1, 8) != 0).sum(dim=2) <= 4).all()
        if name.startswith("model.layers.0."):  # the first layer sees the same inputs either way
            assert torch.equal(m.weight, once.get_submodule(name).weight)
    assert masks.sparsity_of(tiny_llama) == pytest.approx(0.5, abs=1e-6)


# --- SparseGPT ---------------------------------------------------------------------------------------

def _obs_reference(weight: torch.Tensor, H: torch.Tensor, sparsity: float, nm, block_size: int, damp: float = 0.01):
    """SparseGPT written from the paper without its speed tricks: exact inverses of the Hessian of the
    columns not yet visited, one column at a time, masks chosen per block (or per M columns)."""
    W, H = weight.double().clone(), H.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    n_out, n_in = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    group = nm[1] if nm else block_size
    for j in range(n_in):
        H_inv = torch.linalg.inv(H[j:, j:])  # [H_F^-1] for F = {j, ..., n_in - 1}
        if j % group == 0:
            cols = slice(j, min(j + group, n_in))
            d = torch.stack([torch.linalg.inv(H[c:, c:])[0, 0] for c in range(cols.start, cols.stop)])
            error = W[:, cols] ** 2 / d  # w^2 / [H_F^-1]_cc at the time of selection
            keep[:, cols] = masks.nm_mask(error.float(), nm) if nm else masks.unstructured_mask(error.float(), sparsity, "layer")
        pruned = torch.where(keep[:, j], 0.0, W[:, j])  # [out]: the weights removed from column j
        W[:, j:] -= pruned[:, None] * H_inv[0][None, :] / H_inv[0, 0]  # OBS update of the remaining columns
        W[:, j] = torch.where(keep[:, j], W[:, j], 0.0)
    return W.float()


@pytest.mark.parametrize("sparsity, nm, block_size", [(0.5, None, 16), (0.3, None, 64), (0.0, (2, 4), 16)])
def test_sparsegpt_equals_the_column_by_column_obs_reference(sparsity, nm, block_size):
    torch.manual_seed(0)
    weight, x = torch.randn(12, 40), _correlated_inputs(400, 40)
    H = _stats(x).hessian()
    ours = sparsegpt.sparsegpt_prune(weight, H, sparsity, nm, block_size=block_size)
    reference = _obs_reference(weight, H, sparsity, nm, block_size)
    assert torch.equal(ours == 0, reference == 0)
    assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4)


def test_sparsegpt_has_the_requested_sparsity_per_block_and_per_segment():
    weight, H = torch.randn(30, 96), _stats(_correlated_inputs(300, 96)).hessian()
    pruned = sparsegpt.sparsegpt_prune(weight, H, 0.6, block_size=32, segments=[10, 20])
    for rows in (slice(0, 10), slice(10, 30)):
        for start in range(0, 96, 32):
            block = pruned[rows, start : start + 32]
            assert (block == 0).sum() == round(0.6 * block.numel())
    nm = sparsegpt.sparsegpt_prune(weight, H, 0.0, nm=(2, 4), block_size=32)
    assert ((nm.reshape(30, -1, 4) != 0).sum(dim=2) == 2).all()


@pytest.mark.parametrize("patterns, segments", [([0.5], [12]), ([(2, 4)], [12]), ([0.25, (1, 4)], [5, 7])])
def test_prune_columns_without_compensation_is_pruning_by_magnitude(patterns, segments):
    """With U = I the OBS error is w^2 and no column is updated: each segment is magnitude-pruned to its
    pattern (unstructured within every block of columns, over the segment's rows)."""
    weight = torch.randn(12, 32, generator=torch.Generator().manual_seed(2))
    pruned = sparsegpt.prune_columns(weight.T.contiguous(), torch.eye(32), patterns, segments, block_size=16).T
    start = 0
    for pattern, size in zip(patterns, segments):
        rows = slice(start, start + size)
        start += size
        if isinstance(pattern, tuple):
            keep = masks.nm_mask(weight[rows].abs(), pattern)
        else:
            keep = torch.cat([masks.unstructured_mask(weight[rows, c:c + 16].T.abs(), pattern, scope="layer").T
                              for c in (0, 16)], dim=1)
        assert torch.equal(pruned[rows], weight[rows] * keep)


@pytest.mark.parametrize("kwargs, match", [
    (dict(segments=[4, 3]), "segments must be positive row counts"),
    (dict(patterns=[0.5, 0.5]), "one pattern per segment"),
    (dict(patterns=[1.0]), "sparsity"),
    (dict(patterns=[(2, 3)]), "divide"),
    (dict(patterns=[(2, 8)], block_size=4), "multiple of M"),
    (dict(WT=torch.ones(16, 8, dtype=torch.long)), "WT"),
    (dict(U=torch.eye(8)), r"U \[in, in\]"),
])
def test_prune_columns_rejects_bad_arguments(kwargs, match):
    args = dict(WT=torch.randn(16, 8), U=torch.eye(16), patterns=[0.5], segments=[8]) | kwargs
    with pytest.raises(ValueError, match=match):
        sparsegpt.prune_columns(**args)


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    torch.manual_seed(1)
    weight, x = torch.randn(64, 128), _correlated_inputs(2048, 128, seed=1)
    stats = _stats(x)
    errors = {
        "magnitude": stats.output_error(weight * masks.unstructured_mask(weight.abs(), 0.5, "layer") - weight),
        "wanda": stats.output_error(weight * masks.mask(wanda.wanda_scores(weight, x.norm(dim=0)), 0.5, None) - weight),
        "sparsegpt": stats.output_error(sparsegpt.sparsegpt_prune(weight, stats.hessian(), 0.5) - weight),
    }
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(hessian_matrix=torch.eye(5)), "hessian_matrix"),
    (dict(nm=(2, 4), block_size=6), "multiple of M"),
    (dict(segments=[3, 3]), "segments"),
    (dict(damp=1.0), "damp"),
    (dict(damp=0.0), "damp"),
    (dict(hessian_matrix=torch.full((16, 16), float("nan"))), "NaN"),
    (dict(block_size=0), "block_size"),
    (dict(sparsity=1.0), "sparsity"),
])
def test_sparsegpt_rejects_bad_arguments(kwargs, match):
    args = dict(weight=torch.randn(8, 16), hessian_matrix=torch.eye(16), sparsity=0.5) | kwargs
    with pytest.raises(ValueError, match=match):
        sparsegpt.sparsegpt_prune(**args)


def test_model_sparsegpt_prunes_every_layer_in_place(tiny_llama):
    blocks = torch.randint(0, 128, (2, 16))
    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(ValueError, match="divide"):
        sparsegpt.prune_model_sparsegpt(tiny_llama, blocks, 0.5, nm=(2, 6))
    assert all(torch.equal(t, before[name]) for name, t in tiny_llama.state_dict().items())
    assert sparsegpt.prune_model_sparsegpt(tiny_llama, blocks, 0.5, block_size=32) is tiny_llama
    for name, m in anatomy.compressed_linears(tiny_llama).items():
        assert (m.weight == 0).sum() == m.in_features // 32 * round(0.5 * 32 * m.out_features), name  # per block
    assert torch.isfinite(tiny_llama(blocks).logits).all()


def test_sparsegpt_copies_equal_one_run_per_setting(tiny_llama):
    """Stacking the copies' rows in one column loop changes only the speed: every copy equals its own
    run of prune_model_sparsegpt from the same statistics (up to float summation order)."""
    blocks = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    statistics = calibration.input_statistics(tiny_llama, blocks)
    before = copy.deepcopy(tiny_llama.state_dict())
    settings = [0.25, (2, 4), 0.6, 0.6, (1, 4)]
    copies = sparsegpt.sparsegpt_copies(tiny_llama, settings, statistics, block_size=32)
    assert all(torch.equal(t, before[name]) for name, t in tiny_llama.state_dict().items())  # untouched
    for setting, pruned in zip(settings, copies):
        nm = setting if isinstance(setting, tuple) else None
        alone = sparsegpt.prune_model_sparsegpt(copy.deepcopy(tiny_llama), None, 0.0 if nm else setting, nm=nm,
                                                block_size=32, statistics=statistics)
        for (name, a), b in zip(anatomy.compressed_linears(alone).items(), anatomy.compressed_linears(pruned).values()):
            assert torch.equal(a.weight == 0, b.weight == 0), (setting, name)
            torch.testing.assert_close(b.weight, a.weight, rtol=1e-4, atol=1e-5)
    assert masks.sparsity_of(copies[0]) == pytest.approx(0.25, abs=0.01)
    assert masks.sparsity_of(copies[1]) == 0.5


@pytest.mark.parametrize("settings, match", [
    ([], "non-empty"), (0.5, "non-empty"), ([0.5, 1.2], r"settings\[1\]: sparsity"),
    ([(2, 3)], r"settings\[0\]: nm: M \(3\) must divide"), ([(2, 4)], "block_size"),
])
def test_sparsegpt_copies_reject_bad_settings(tiny_llama, settings, match):
    statistics = calibration.input_statistics(tiny_llama, torch.randint(0, 128, (1, 8)))
    with pytest.raises(ValueError, match=match):
        sparsegpt.sparsegpt_copies(tiny_llama, settings, statistics, block_size=6 if settings == [(2, 4)] else 32)


@pytest.mark.parametrize("shape, n_remove", [((5, 37), 11), ((200,), 150), ((3, 4, 8), 4), ((2, 9), 0), ((2, 9), 9)])
def test_keep_highest_equals_a_stable_sort_with_many_ties(shape, n_remove):
    scores = torch.randint(0, 5, shape, generator=torch.Generator().manual_seed(n_remove)).float()
    order = scores.argsort(dim=-1, stable=True)
    expected = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, order[..., :n_remove], False)
    assert torch.equal(masks.keep_highest(scores, n_remove), expected)


def test_sparsity_of_counts_the_zeros_of_packed_layers_too():
    from refimpl.quantization import packed, uniform

    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    linears = anatomy.compressed_linears(model).values()
    dense = masks.sparsity_of(model)
    assert dense == model.model.layers[0].mlp.up_proj.weight.numel() / sum(m.weight.numel() for m in linears)
    packed_model = packed.pack_model(model, uniform.Grid(8, symmetric=False, group_size=64))
    with pytest.raises(ValueError, match="no nn.Linear"):  # nothing left to prune: every weight is packed
        anatomy.compressed_linears(packed_model)
    assert masks.sparsity_of(packed_model) >= dense
