r"""Reading the effects table: one quality number, trade-off fronts, combinations, and choices.

The effects table (:mod:`refimpl.effects`) measures every method on the same model: weight bytes,
KV-cache bytes per token, perplexity on two corpora, speed against the dense model, and what applying
the method cost. Chapter 09 reads it with the functions here; none of them measures anything.

**Quality.** A row's quality is the geometric mean of its perplexities on the corpora,

.. math:: \bar{\mathrm{PPL}} = \exp\Big(\frac1C \sum_{c=1}^{C} \log \mathrm{PPL}_c\Big),

i.e. the perplexity of the mean per-token loss with every corpus weighted equally; a method's quality
cost is the ratio :math:`\bar{\mathrm{PPL}} / \bar{\mathrm{PPL}}_\text{dense}`. :func:`compare` gives
that ratio between any two rows with its 95 % interval (a paired block bootstrap over the per-block
losses the table stores): a ranking of two rows holds only where it excludes 1.

**Combinations.** If two methods damaged the model independently, their losses would add in
log-perplexity (the per-token loss), so the combination's perplexity on corpus :math:`c` would be

.. math:: \widehat{\mathrm{PPL}}_{A+B,c} = \mathrm{PPL}_{\text{dense},c}\,
          \frac{\mathrm{PPL}_{A,c}}{\mathrm{PPL}_{\text{dense},c}}\,
          \frac{\mathrm{PPL}_{B,c}}{\mathrm{PPL}_{\text{dense},c}},

and savings that act on the same bytes would multiply (a fraction :math:`f_A` of them, then
:math:`f_B` of what is left). :func:`combination` sets the measured row against that prediction: a ratio
near 1 means the gains add up, above 1 that the methods interfere (each makes the other's error
worse), below 1 that they overlap (they remove the same error or the same bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from refimpl import data, evaluate

Record = Mapping[str, Any]

#: ``results/`` of the repository this package lives in: the committed effects tables
#: (``effects/<model>.csv`` with its ``.json`` provenance) and GPU benchmark runs (``bench/<device>.json``).
RESULTS = Path(__file__).resolve().parent.parent / "results"

#: The table's perplexity columns, one per evaluation corpus.
PPL_COLUMNS = tuple(f"ppl_{corpus}" for corpus in data.CORPORA)


def measured(records: Sequence[Record]) -> dict[str, Record]:
    """``{row id: record}`` of the rows measured (``status == "ok"``), in table order; the table must
    hold the ``dense`` baseline."""
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise TypeError(f"records must be a sequence of table rows (refimpl.effects.table.read_table), got {type(records).__name__}")
    table: dict[str, Record] = {}
    for r in records:
        if r.get("status") == "ok":
            if r["row"] in table:
                raise ValueError(f"records hold the row {r['row']!r} twice")
            table[r["row"]] = r
    if "dense" not in table:
        raise ValueError("records must include the measured 'dense' row (the baseline every ratio is against)")
    return table


def quality(record: Record) -> float:
    """The geometric mean of the record's perplexities over :data:`PPL_COLUMNS`."""
    values = [record.get(column) for column in PPL_COLUMNS]
    if not all(_is_number(v) and v > 0 for v in values):
        raise ValueError(f"row {record.get('row')!r} needs positive finite {list(PPL_COLUMNS)}, got {values}")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def quality_ratio(record: Record, dense: Record) -> float:
    """:func:`quality` of ``record`` over that of ``dense`` (1.0: no loss)."""
    return quality(record) / quality(dense)


def compare(record: Record, reference: Record, confidence: float = 0.95) -> evaluate.Interval:
    """:func:`quality_ratio` of ``record`` over ``reference`` (any two rows, e.g. two methods) with its
    paired block-bootstrap interval, from the per-block NLLs the table stores (``block_nll_<corpus>``).

    Both rows were scored on the same blocks, so the per-block differences of their NLLs are resampled
    (:func:`refimpl.evaluate.paired_ratio`), the blocks of all corpora together: with the same number of
    blocks per corpus, the mean over all of them is the mean over the corpora, whose exponential is the
    quality ratio. An interval that excludes 1 orders the two rows; one that includes 1 says they are
    indistinguishable on this evaluation."""
    for row in (record, reference):
        if len({len(_block_nll(row, corpus)) for corpus in data.CORPORA}) != 1:
            raise ValueError(f"row {row.get('row')!r} has a different number of blocks per corpus")
    return evaluate.paired_ratio(*(torch.cat([_block_nll(row, corpus) for corpus in data.CORPORA])
                                   for row in (record, reference)), confidence=confidence)


def _block_nll(record: Record, corpus: str) -> torch.Tensor:
    """The record's per-block NLLs on ``corpus``, ``float64[n_blocks]``."""
    values = record.get(f"block_nll_{corpus}")
    if not isinstance(values, tuple) or len(values) < 2:
        raise ValueError(f"row {record.get('row')!r} has no per-block NLLs (block_nll_{corpus}): a table measured "
                         f"before they were recorded")
    return torch.tensor(values, dtype=torch.float64)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _value(record: Record, column: str | Callable[[Record], float]) -> float:
    value = column(record) if callable(column) else record.get(column)
    if not _is_number(value):
        name = getattr(column, "__name__", column)
        raise ValueError(f"row {record.get('row')!r} has no finite value for {name!r}: {value!r}")
    return float(value)


def front(records: Sequence[Record], cost: str | Callable[[Record], float],
          higher_is_better: bool = False) -> list[str]:
    """The row ids on the Pareto front of ``cost`` (a column or a function of a record) against
    :func:`quality`: the rows no other row beats in both (:func:`refimpl.evaluate.pareto_frontier`),
    ordered from the cheapest (with ``higher_is_better``, from the largest benefit: ``cost`` is then a
    benefit, such as a speed-up)."""
    table = measured(records)
    sign = -1.0 if higher_is_better else 1.0
    return evaluate.pareto_frontier({row: (sign * _value(r, cost), quality(r)) for row, r in table.items()})


@dataclass(frozen=True)
class Combination:
    """A measured combination row against the prediction from its parts (see the module docstring)."""

    row: str
    parts: tuple[str, ...]
    ppl: dict[str, float]  # corpus: measured perplexity
    ppl_predicted: dict[str, float]  # corpus: dense * prod(part / dense)
    weight_fraction: float
    weight_fraction_predicted: float  # prod of the parts' weight fractions
    kv_fraction: float
    kv_fraction_predicted: float

    @property
    def ppl_ratio(self) -> dict[str, float]:
        """Measured over predicted perplexity per corpus (> 1: the methods interfere)."""
        return {c: self.ppl[c] / self.ppl_predicted[c] for c in self.ppl}


def combination(records: Sequence[Record], row: str, parts: Sequence[str] | None = None) -> Combination:
    """Compare combination ``row`` with the independent prediction from ``parts`` (default: the row id
    split at ``+``, each part a measured row)."""
    table = measured(records)
    if row not in table:
        raise ValueError(f"row {row!r} is not a measured row of the table (rows: {sorted(table)})")
    parts = tuple(row.split("+")) if parts is None else tuple(parts)
    missing = [p for p in parts if p not in table]
    if len(parts) < 2 or missing:
        raise ValueError(f"parts must name at least two measured rows, got {parts} (not measured: {missing})")
    dense, combined = table["dense"], table[row]

    def product(column: str) -> float:
        return math.prod(_value(table[p], column) / _value(dense, column) for p in parts)

    corpora = [column.removeprefix("ppl_") for column in PPL_COLUMNS]
    return Combination(
        row=row, parts=parts,
        ppl={c: _value(combined, f"ppl_{c}") for c in corpora},
        ppl_predicted={c: _value(dense, f"ppl_{c}") * product(f"ppl_{c}") for c in corpora},
        weight_fraction=_value(combined, "weight_bytes") / _value(dense, "weight_bytes"),
        weight_fraction_predicted=product("weight_bytes"),
        kv_fraction=_value(combined, "kv_bytes_per_token") / _value(dense, "kv_bytes_per_token"),
        kv_fraction_predicted=product("kv_bytes_per_token"))


def interaction(records: Sequence[Record], row: str, parts: Sequence[str] | None = None,
                confidence: float = 0.95) -> dict[str, evaluate.Interval]:
    """:attr:`Combination.ppl_ratio` — the combination's measured perplexity over the independent
    prediction from its parts, per corpus — with a paired block-bootstrap interval: per block, the
    combination's NLL minus the sum of its parts' plus the dense model's (n - 1 times, for n parts),
    resampled (:func:`refimpl.evaluate.paired_ratio`). An interval that excludes 1 says the methods
    interfere (> 1) or overlap (< 1); one that includes 1, that their losses add up as independent ones."""
    table = measured(records)
    parts = combination(records, row, parts).parts  # checked there
    result = {}
    for corpus in data.CORPORA:
        combined = _block_nll(table[row], corpus) - sum(_block_nll(table[p], corpus) for p in parts)
        result[corpus] = evaluate.paired_ratio(combined, (1 - len(parts)) * _block_nll(table["dense"], corpus),
                                               confidence=confidence)
    return result


def choose(records: Sequence[Record], minimize: str | Callable[[Record], float], max_quality_ratio: float,
           where: Callable[[Record], bool] | None = None) -> Record | None:
    """The row that minimizes ``minimize`` among those whose :func:`quality_ratio` is at most
    ``max_quality_ratio`` (and for which ``where`` holds), or ``None`` when no row qualifies; ties go to
    the better quality. The decision guide of chapter 09 is a list of such questions."""
    if not _is_number(max_quality_ratio) or not max_quality_ratio >= 1:
        raise ValueError(f"max_quality_ratio must be a number >= 1 (1: no loss allowed), got {max_quality_ratio!r}")
    table = measured(records)
    dense = table["dense"]
    candidates = [r for r in table.values()
                  if quality_ratio(r, dense) <= max_quality_ratio and (where is None or where(r))]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (_value(r, minimize), quality(r)))
