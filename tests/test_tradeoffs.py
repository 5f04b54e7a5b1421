"""refimpl.tradeoffs: quality, fronts, combinations and choices over effects-table rows."""

from __future__ import annotations

import math

import pytest

from refimpl import tradeoffs
from refimpl.effects.table import read_table


def row(name, mib, ppl_s, ppl_d, kv=100.0, family="quantization", training=False, decode=1.0, status="ok"):
    return {"row": name, "status": status, "family": family, "weight_bytes": mib * 2**20, "ppl_shakespeare": ppl_s,
            "ppl_docstrings": ppl_d, "kv_bytes_per_token": kv, "needs_training": training, "decode_speedup": decode}


@pytest.fixture
def records():
    return [row("dense", 100, 10.0, 20.0, decode=1.0, family="baseline"),
            row("a", 50, 12.0, 22.0, decode=0.5),
            row("b", 100, 15.0, 30.0, kv=25.0, decode=1.5),
            row("a+b", 50, 18.0, 34.0, kv=25.0),
            row("worse", 60, 40.0, 80.0),
            row("trained", 30, 11.0, 21.0, training=True),
            row("broken", 1, 1.0, 1.0, status="skipped")]


def test_quality_is_the_geometric_mean_of_the_corpora():
    assert tradeoffs.quality(row("x", 1, 4.0, 9.0)) == pytest.approx(6.0)
    dense = row("dense", 1, 10.0, 10.0)
    assert tradeoffs.quality_ratio(row("x", 1, 20.0, 5.0), dense) == pytest.approx(1.0)
    assert tradeoffs.quality_ratio(row("x", 1, 20.0, 20.0), dense) == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), None, "12", True])
def test_quality_rejects_missing_or_invalid_perplexities(bad):
    with pytest.raises(ValueError, match="ppl_shakespeare"):
        tradeoffs.quality(row("x", 1, bad, 2.0))


def test_measured_keeps_ok_rows_and_needs_dense(records):
    assert list(tradeoffs.measured(records)) == ["dense", "a", "b", "a+b", "worse", "trained"]
    with pytest.raises(ValueError, match="dense"):
        tradeoffs.measured(records[1:])
    with pytest.raises(TypeError, match="records"):
        tradeoffs.measured("results/effects/smollm2-135m.csv")
    with pytest.raises(ValueError, match="'a' twice"):
        tradeoffs.measured(records + [row("a", 1, 1.0, 1.0)])


def test_front_against_bytes_and_against_a_benefit(records):
    # by bytes: trained (30 MiB) beats everything larger except dense, the best quality
    assert tradeoffs.front(records, "weight_bytes") == ["trained", "dense"]
    records.append(row("tiny", 10, 100.0, 100.0))
    assert tradeoffs.front(records, "weight_bytes") == ["tiny", "trained", "dense"]
    # by speed (higher is better): b is fastest, dense is the best quality, a is dominated by dense
    assert tradeoffs.front(records, lambda r: r["kv_bytes_per_token"]) == ["b", "dense"]
    assert tradeoffs.front(records, "decode_speedup", higher_is_better=True) == ["b", "dense"]
    records.append(row("faster, better", 1, 10.0, 20.0, decode=1.2))  # beats dense on speed at equal quality
    assert tradeoffs.front(records, "decode_speedup", higher_is_better=True) == ["b", "faster, better"]


def test_front_rejects_a_missing_column(records):
    with pytest.raises(ValueError, match="prefill_speedup"):
        tradeoffs.front(records, "prefill_speedup")


def test_combination_against_independent_losses(records):
    c = tradeoffs.combination(records, "a+b")
    assert c.parts == ("a", "b")
    # predicted: dense * (a / dense) * (b / dense) per corpus
    assert c.ppl_predicted["shakespeare"] == pytest.approx(10.0 * 1.2 * 1.5)
    assert c.ppl_predicted["docstrings"] == pytest.approx(20.0 * 1.1 * 1.5)
    assert c.ppl_ratio["shakespeare"] == pytest.approx(18.0 / 18.0)
    assert c.ppl_ratio["docstrings"] == pytest.approx(34.0 / 33.0)
    assert c.weight_fraction == pytest.approx(0.5) and c.weight_fraction_predicted == pytest.approx(0.5)
    assert c.kv_fraction == pytest.approx(0.25) and c.kv_fraction_predicted == pytest.approx(0.25)
    explicit = tradeoffs.combination(records, "worse", parts=["a", "b"])
    assert explicit.ppl_ratio["shakespeare"] == pytest.approx(40.0 / 18.0)
    assert explicit.weight_fraction == pytest.approx(0.6) and explicit.weight_fraction_predicted == pytest.approx(0.5)
    assert explicit.kv_fraction == pytest.approx(1.0) and explicit.kv_fraction_predicted == pytest.approx(0.25)


def test_combination_rejects_unknown_rows_and_parts(records):
    with pytest.raises(ValueError, match="'c\\+d' is not a measured row"):
        tradeoffs.combination(records, "c+d")
    with pytest.raises(ValueError, match="parts must name"):
        tradeoffs.combination(records, "a")
    with pytest.raises(ValueError, match="broken"):
        tradeoffs.combination(records, "worse", parts=["a", "broken"])


def test_choose_minimizes_within_the_quality_budget(records):
    assert tradeoffs.choose(records, "weight_bytes", 1.0)["row"] == "dense"
    assert tradeoffs.choose(records, "weight_bytes", 1.2)["row"] == "trained"
    assert tradeoffs.choose(records, "weight_bytes", 1.2, where=lambda r: not r["needs_training"])["row"] == "a"
    assert tradeoffs.choose(records, "kv_bytes_per_token", 1.01, where=lambda r: r["row"] == "b") is None
    assert tradeoffs.choose(records, "kv_bytes_per_token", 2.0)["row"] == "b"  # ties at 25 B: b is better than a+b
    bytes_read = lambda r: r["weight_bytes"] + 2**20 * r["kv_bytes_per_token"]  # noqa: E731
    assert tradeoffs.choose(records, bytes_read, 2.0)["row"] == "a+b"  # 50 + 25 MiB beats trained's 30 + 100


@pytest.mark.parametrize("budget", [0.9, "1.1", None, float("nan"), True])
def test_choose_rejects_a_bad_budget(records, budget):
    with pytest.raises(ValueError, match="max_quality_ratio"):
        tradeoffs.choose(records, "weight_bytes", budget)


def test_committed_table_reads_and_its_combinations_have_parts():
    records = read_table(tradeoffs.RESULTS / "effects" / "smollm2-135m.csv")
    table = tradeoffs.measured(records)
    combinations = [r for r in table if "+" in r]
    assert combinations, "the committed table has no combination rows"
    for name in combinations:
        c = tradeoffs.combination(records, name)
        assert all(math.isfinite(v) and v > 0 for v in c.ppl_ratio.values())
    # what chapter 09 reads from it: sparse zeros cost 4 bits like any weight once GPTQ packs them
    assert table["sparsegpt-50+gptq-w4g64"]["weight_bytes"] == table["gptq-w4g64"]["weight_bytes"]


def test_compare_is_the_quality_ratio_with_a_paired_interval():
    base = row("base", 1, math.exp(3.0), math.exp(4.0))
    other = row("other", 1, math.exp(3.1), math.exp(4.1))
    base.update(block_nll_shakespeare=(2.5, 3.5, 2.8, 3.2), block_nll_docstrings=(3.5, 4.5, 3.9, 4.1))
    other.update(block_nll_shakespeare=(2.62, 3.58, 2.9, 3.3), block_nll_docstrings=(3.58, 4.62, 4.0, 4.2))
    interval = tradeoffs.compare(other, base)
    assert interval.estimate == pytest.approx(tradeoffs.quality_ratio(other, base))  # blocks of the same length
    assert interval.excludes(1.0) and interval.low > 1  # every block is worse: the order is certain
    assert tradeoffs.compare(base, base).estimate == 1.0


def test_compare_needs_per_block_losses():
    with pytest.raises(ValueError, match="per-block NLLs"):
        tradeoffs.compare(row("a", 1, 2.0, 2.0), row("b", 1, 2.0, 2.0))


def test_interaction_is_the_combinations_ratio_to_its_prediction_with_an_interval():
    def blocks(s, d):
        return dict(block_nll_shakespeare=s, block_nll_docstrings=d)

    def ppl(values):
        return math.exp(sum(values) / len(values))

    rows = {"dense": ((3.0, 3.2, 2.8), (4.0, 4.4, 3.6)), "a": ((3.1, 3.3, 2.9), (4.2, 4.6, 3.8)),
            "b": ((3.2, 3.4, 3.0), (4.1, 4.5, 3.7)), "a+b": ((3.3, 3.5, 3.1), (4.5, 4.9, 4.1))}
    records = [{**row(name, 1, ppl(s), ppl(d), family="baseline" if name == "dense" else "quantization"),
                **blocks(s, d)} for name, (s, d) in rows.items()]
    ratios = tradeoffs.interaction(records, "a+b")
    expected = tradeoffs.combination(records, "a+b").ppl_ratio
    assert ratios["shakespeare"].estimate == pytest.approx(expected["shakespeare"]) == pytest.approx(1.0)
    assert not ratios["shakespeare"].excludes(1.0)  # losses add up exactly on every block
    assert ratios["docstrings"].estimate == pytest.approx(expected["docstrings"]) == pytest.approx(math.exp(0.2))
    assert ratios["docstrings"].low > 1  # the combination is worse than its parts predict on every block
