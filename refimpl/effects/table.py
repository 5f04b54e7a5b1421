"""The effects table on disk: its columns, the CSV (typed reading and atomic writing), the Markdown view,
and the file name of a model's table."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any

from refimpl import data

def _columns() -> list[tuple[str, type, str]]:
    return [
        ("model", str, "the model (alias, folder or hub id)"),
        ("row", str, "row id (ROWS)"),
        ("method", str, "taxonomy id(s) of the method(s) applied, '+'-joined"),
        ("family", str, "baseline, quantization, pruning, distillation, architecture, or a combination"),
        ("settings", str, "the chapter's recommended settings"),
        ("key", str, "hash of what decides the results (protocol, row, the sources its recipe reaches, data, versions)"),
        ("status", str, "ok, or skipped (see reason)"),
        ("reason", str, "why a row was skipped"),
        ("weight_bytes", int, "bytes of the weights as stored (measured)"),
        ("weight_fraction", float, "weight_bytes / the dense model's"),
        ("zero_fraction", float, "fraction of exactly-zero weights in the decoder layers' linear layers"),
        ("kv_bytes_per_token", float, "KV-cache bytes per token of the first evaluation block (packed if quantized)"),
        *[column for name in data.CORPORA for column in (
            (f"ppl_{name}", float, f"perplexity on the {name} evaluation blocks"),
            (f"ppl_{name}_low", float, "its 95 % block-bootstrap interval: low end"),
            (f"ppl_{name}_high", float, "high end"),
            (f"ratio_{name}", float, f"perplexity / the dense model's on the same {name} blocks"),
            (f"ratio_{name}_low", float, "its 95 % paired block-bootstrap interval: low end"),
            (f"ratio_{name}_high", float, "high end"),
            (f"block_nll_{name}", tuple, "mean NLL of each evaluation block, space-separated (paired comparisons "
                                         "between rows: refimpl.tradeoffs.compare)"))],
        ("prefill_tokens_per_s", float, "prefill throughput (64-token prompt), this machine"),
        ("decode_tokens_per_s", float, "greedy decode throughput (8 tokens after 32), this machine"),
        ("prefill_speedup", float, "dense median time / this row's, timed in alternation"),
        ("decode_speedup", float, "dense median time / this row's, timed in alternation"),
        ("apply_s", float, "seconds to apply the method (training included, calibration capture not)"),
        ("calibration_s", float, "seconds to capture the calibration data the row uses"),
        ("needs_calibration", bool, "needs calibration data"),
        ("calibration_data", str, "which calibration data"),
        ("needs_training", bool, "needs training"),
        ("training_data", str, "which training"),
        ("needs_kernel", str, "the kernel that would turn the method into speed"),
        ("evaluated", str, "what the measured model stores and computes"),
        ("notes", str, "details of this run"),
        ("device", str, "the device measured on"),
        ("commit", str, "git commit of the code (+dirty if it had uncommitted changes)"),
        ("measured_at", str, "UTC time of the measurement"),
    ]


COLUMNS = _columns()
_TYPES = {name: kind for name, kind, _ in COLUMNS}


def _parse(name: str, text: str) -> Any:
    kind = _TYPES.get(name, str)
    if text == "" and kind is not str:
        return None
    if kind is bool:
        return text == "true"
    if kind is tuple:
        return tuple(float(value) for value in text.split())
    return kind(text)


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return " ".join(repr(float(v)) for v in value)
    return str(value)


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of an effects CSV, typed (numbers as numbers, booleans as booleans, empty as None)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"model", "row", "settings", "key", "status"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not an effects table: it lacks the columns {sorted(missing)}")
        return [{name: _parse(name, text) for name, text in record.items()} for record in reader]


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: a reader never sees half a table."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[name for name, _, _ in COLUMNS], lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({name: _format(record.get(name)) for name, _, _ in COLUMNS})
    atomic_write(path, buffer.getvalue())


def _cell(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _interval(record: dict[str, Any], column: str, fmt: str) -> str:
    """``column``'s value with its interval, e.g. ``43.33 [41.20, 45.61]``."""
    if record.get(column) is None:
        return ""
    return f"{record[column]:{fmt}} [{record[f'{column}_low']:{fmt}}, {record[f'{column}_high']:{fmt}}]"


def _text(value: str) -> str:
    """A string as a Markdown table cell: its ``|`` escaped."""
    return value.replace("|", "\\|")


def markdown(records: list[dict[str, Any]], title: str = "") -> str:
    """The table as Markdown: the measured rows, then the needs, then the skipped rows with reasons."""
    lines = [f"# {title}", ""] if title else []
    ok = [r for r in records if r["status"] == "ok"]
    corpora = [c for c in data.CORPORA]
    head = (["row", "method", "MiB", "× dense"] + [f"{kind} {c} [95 %]" for c in corpora for kind in ("ppl", "ratio")]
            + ["KV B/token", "zeros", "prefill tok/s", "decode tok/s", "apply s", "calibration s"])
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in ok:
        speed = [f"{_cell(r.get(f'{phase}_tokens_per_s'), '.1f')}"
                 + (f" ({r[f'{phase}_speedup']:.2f}×)" if r.get(f"{phase}_speedup") is not None else "")
                 for phase in ("prefill", "decode")]
        cells = ([r["row"], r["method"], _cell(r["weight_bytes"] / 2**20, ".1f"), _cell(r["weight_fraction"], ".2f")]
                 + [_interval(r, f"{kind}_{c}", digits) for c in corpora
                    for kind, digits in (("ppl", ".2f"), ("ratio", ".3f"))]
                 + [_cell(r["kv_bytes_per_token"], ",.0f"), _cell(r["zero_fraction"], ".1%")] + speed
                 + [_cell(r["apply_s"], ".1f"), _cell(r["calibration_s"], ".1f")])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| row | settings | calibration | training | kernel for speed | measured as |",
              "|---|---|---|---|---|---|"]
    for r in ok:
        lines.append("| " + " | ".join(_text(cell) for cell in (
            r["row"], r["settings"], r["calibration_data"] or "—", r["training_data"] or "—", r["needs_kernel"],
            r["evaluated"])) + " |")
    skipped = [r for r in records if r["status"] != "ok"]
    if skipped:
        lines += ["", "Not measured:", ""] + [f"- `{r['row']}`: {r['reason']}" for r in skipped]
    notes = [r for r in ok if r.get("notes")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- `{r['row']}`: {r['notes']}" for r in notes]
    return "\n".join(lines) + "\n"


def table_stem(model_name: str) -> str:
    """The file name stem of a model's table: a local folder's name, or the alias or hub id with
    ``/`` as ``--``."""
    name = os.fspath(model_name).rstrip("/")
    if os.path.isdir(name):
        name = os.path.basename(os.path.abspath(name))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-.")
    if not stem:
        raise ValueError(f"model name {model_name!r} gives no usable file name")
    return stem

