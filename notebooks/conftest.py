"""nbval compares the chapters' numbers by what they hold, not by one machine's last digits.

nbval checks a fresh run's outputs against the stored ones character by character. Before it does,
this plugin puts the stored text in place of every fresh text output that holds it by the rule of
:mod:`refimpl.reproducibility` (integers equal; decimals within the tolerance of the cell's
``# NBVAL_TOLERANCE <kind>``, default ``float``; the words around them identical). Outputs that do
not hold are left as they are, so nbval reports them as usual, and the numbers that broke the
rule are listed under its report.
"""

from __future__ import annotations

import nbval.plugin

from refimpl import reproducibility

_TEXT_FIELDS = ("text/plain", "text/markdown", "text/html")
_nbval_compare_outputs = nbval.plugin.IPyNbCell.compare_outputs


def _texts(output: dict) -> dict[tuple[str, ...], str]:
    """The text fields of one notebook output, keyed by where they sit in it."""
    if output.get("output_type") == "stream":
        return {("text",): output["text"]}
    return {("data", field): output["data"][field] for field in _TEXT_FIELDS if field in output.get("data", {})}


def _set(output: dict, where: tuple[str, ...], text: str) -> None:
    if where == ("text",):
        output["text"] = text
    else:
        output["data"][where[1]] = text


def compare_outputs(self: nbval.plugin.IPyNbCell, test: list, ref: list, skip_compare: tuple | None = None) -> bool:
    kind = reproducibility.cell_kind(self.cell.source)
    broken = []
    for fresh, stored in zip(test, ref):
        if fresh.get("output_type") != stored.get("output_type") or fresh.get("name") != stored.get("name"):
            continue
        stored_texts = _texts(stored)
        for where, text in _texts(fresh).items():
            if where not in stored_texts:
                continue
            mismatches = reproducibility.compare_text(self.sanitize(stored_texts[where]), self.sanitize(text), kind)
            if not mismatches:
                _set(fresh, where, stored_texts[where])
            else:
                broken += [m for m in mismatches if m.number]
    same = _nbval_compare_outputs(self, test, ref, skip_compare)
    if not same and broken:
        self.comparison_traceback.append(f"numbers that do not hold the stored ones (kind {kind!r}):")
        self.comparison_traceback += [f"  stored {m.stored}, fresh {m.fresh}: {m.reason}" for m in broken]
    return same


nbval.plugin.IPyNbCell.compare_outputs = compare_outputs
