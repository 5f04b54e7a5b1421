"""Checking a committed table: recompute some of its rows and compare what another machine must
reproduce (bytes exactly, perplexities within the tolerance of the row's kind); timings are not
compared, they belong to the machine."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from refimpl import data, reproducibility, runtime
from refimpl.effects.context import Context
from refimpl.effects.key import row_key
from refimpl.effects.measure import measure_row
from refimpl.effects.protocol import DEFAULT_PROTOCOL, Protocol
from refimpl.effects.registry import DEFAULT_CHECK_ROWS, ROW_IDS, row as row_by_id
from refimpl.effects.run import load
from refimpl.effects.table import read_table
from refimpl.runtime import progress


@dataclass
class RowCheck:
    """One recomputed row against the table: the values compared and what differs."""

    row: str
    key_matches: bool  # False: the code or versions changed since the table was written
    compared: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # column: (table, recomputed)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def check_table(table: str | os.PathLike, model: str | os.PathLike | tuple[nn.Module, Any] | None = None,
                rows: Sequence[str] | None = None, device: str | torch.device | None = None,
                model_name: str | None = None) -> list[RowCheck]:
    """Recompute ``rows`` of a written table (default: :data:`DEFAULT_CHECK_ROWS`, those of them the table
    has) and compare: perplexities within the tolerance of the row's kind (:attr:`Row.tolerance`, the
    book's rule for what a figure holds on another machine, :mod:`refimpl.reproducibility`), weight and
    KV-cache bytes exactly, the zero fraction to 1e-4; timings and the ratios to the unmodified model are
    not recomputed (the ratios would cost one more evaluation, of that model). The protocol is read
    from the table's JSON beside it.

    Args:
        model: default: load the table's model by name; or a name, path or ``(model, tokenizer)`` pair.
    """
    table = Path(table)
    if not table.is_file():
        raise ValueError(f"table {table} does not exist")
    records = read_table(table)
    provenance_path = table.with_suffix(".json")
    protocol = DEFAULT_PROTOCOL
    if provenance_path.is_file():
        protocol = Protocol.from_dict(json.loads(provenance_path.read_text()).get("protocol", {}))
    measured = {r["row"]: r for r in records if r["status"] == "ok"}
    names = {r["model"] for r in records}
    if len(names) != 1:
        raise ValueError(f"table {table} must hold one model's rows, found {sorted(names)}")
    table_model = names.pop()
    wanted = list(rows) if rows is not None else [r for r in DEFAULT_CHECK_ROWS if r in measured]
    unknown = [r for r in wanted if r not in ROW_IDS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}: valid row ids are {list(ROW_IDS)}")
    missing = [r for r in wanted if r not in measured]
    if missing:
        raise ValueError(f"rows {missing} are not measured in {table} (its rows: {sorted(measured)})")
    if not wanted:
        raise ValueError(f"{table} has none of the rows {list(DEFAULT_CHECK_ROWS)}: name rows to check")
    runtime.setup(seed=0, threads=2, progress=runtime.progress_enabled())
    base, tokenizer, name = load(table_model if model is None else model, device, model_name or table_model)
    ctx = Context(base, tokenizer, name, protocol, train=False)
    checks = []
    for row_id in progress(wanted, desc="check", total=len(wanted)):
        row = row_by_id(row_id)
        stored = measured[row_id]
        values = measure_row(row, ctx, timing=False, paired=False)  # ratios are not compared
        check = RowCheck(row_id, key_matches=stored["key"] == row_key(row, protocol))
        if values["status"] != "ok":
            check.mismatches.append(f"status: {values['status']} ({values['reason']})")
            checks.append(check)
            continue
        for column in [f"ppl_{c}" for c in data.CORPORA] + ["weight_bytes", "kv_bytes_per_token", "zero_fraction"]:
            old, new = stored.get(column), values[column]
            check.compared[column] = (old, new)
            if column.startswith("ppl_"):
                same = old is not None and reproducibility.values_agree(row.tolerance, old, new)
            elif column == "zero_fraction":
                same = old is not None and abs(old - new) <= 1e-4
            else:
                same = old == new
            if not same:
                beyond = f" (beyond the {row.tolerance!r} tolerance)" if column.startswith("ppl_") else ""
                check.mismatches.append(f"{column}: table {old!r}, recomputed {new!r}{beyond}")
        checks.append(check)
    ctx.release()
    return checks


def format_checks(checks: list[RowCheck]) -> str:
    lines = []
    for check in checks:
        state = "ok" if check.ok else "DIFFERS"
        key = "" if check.key_matches else " (the code or library versions changed since the table was written)"
        lines.append(f"{check.row}: {state}{key}")
        lines += [f"    {m}" for m in check.mismatches]
        if check.ok:
            lines += [f"    {column}: {new!r}" for column, (_, new) in check.compared.items()]
    return "\n".join(lines)
