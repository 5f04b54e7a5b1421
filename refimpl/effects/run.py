"""Running the effects table: measure the chosen rows of one model and write ``<out>/<model>.csv``,
``.md`` and ``.json`` (provenance: command, git commit, machine and CPU, library versions, date, the
protocol) after every row. A row already in the CSV for the same model, row, settings and key
(:func:`refimpl.effects.key.row_key`) is kept as it is, so an interrupted run resumes where it stopped
and a change to the code a row depends on re-measures exactly that row."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from refimpl import data, runtime
from refimpl.effects import table
from refimpl.effects.context import Context
from refimpl.effects.key import row_key
from refimpl.effects.measure import measure_row
from refimpl.effects.protocol import DEFAULT_PROTOCOL, Protocol
from refimpl.effects.registry import ROW_IDS, select_rows
from refimpl.runtime import progress


def git_state() -> dict[str, Any]:
    """The repository's commit and whether tracked files have uncommitted changes (``None`` for both
    where git cannot say): the provenance every recorded run carries."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def machine(device: torch.device) -> dict[str, Any]:
    """The machine a table was measured on: CPU, its vector units as PyTorch sees them, cores, GPU."""
    info = {"cpu": runtime.cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def check_out(out: str | os.PathLike) -> Path:
    """The output folder, created if needed; ``ValueError`` if it is a file or cannot be written."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"out must be a folder path, got {out!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out must be a folder, but {path} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"out folder {path} cannot be created: {exc}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"out folder {path} is not writable")
    return path


def load(model: str | os.PathLike | tuple[nn.Module, Any], device: str | torch.device | None,
          model_name: str | None) -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer, name)`` of a shipped alias, folder or hub id (loaded on ``device``, default
    CPU), or of a given ``(model, tokenizer)`` pair (on its own device; ``device`` must agree)."""
    if isinstance(model, tuple):
        if len(model) != 2 or not isinstance(model[0], nn.Module):
            raise TypeError("model must be a name or path, or a (model, tokenizer) pair")
        if device is not None and runtime.resolve_device(device) != runtime.model_device(model[0]):
            raise ValueError(f"device {device!r} differs from the given model's ({runtime.model_device(model[0])})")
        name = model_name or getattr(getattr(model[0], "config", None), "_name_or_path", "") or "model"
        return model[0].eval(), model[1], name
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name or path, or a (model, tokenizer) pair, got {type(model).__name__}")
    from refimpl.models import load_model

    loaded, tokenizer = load_model(model, device=runtime.resolve_device("cpu" if device is None else device))
    return loaded, tokenizer, model_name or os.fspath(model)


def run_effects(out: str | os.PathLike, model: str | os.PathLike | tuple[nn.Module, Any] = "smollm2-135m",
                methods: Sequence[str] | str | None = None, device: str | torch.device | None = None,
                train: bool = False, model_name: str | None = None, protocol: Protocol = DEFAULT_PROTOCOL,
                threads: int | None = 2, command: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure the rows of ``methods`` (default: all) on ``model`` and write ``<out>/<model>.csv``,
    ``.md`` and ``.json``, after every row. Rows already in the CSV with the same model, row, settings
    and key are kept as they are (:func:`row_key`).

    Args:
        model: a shipped alias, a local folder or a hub id (:func:`refimpl.models.load_model`), or a
            ``(model, tokenizer)`` pair (not modified).
        device: where to load a named model (default ``"cpu"``); for a given model, its device.
        train: train what a row needs and the cache does not hold (the distilled student).
        model_name: the name written to the table (default: ``model``, or a given model's config name).
        threads: CPU threads (:func:`refimpl.runtime.setup`, with seed 0).

    Returns:
        the table's rows (all of them, not only those measured now).
    """
    rows = select_rows(methods)  # every argument checked before anything is loaded or written
    if not isinstance(protocol, Protocol):
        raise TypeError(f"protocol must be a Protocol, got {type(protocol).__name__}")
    if device is not None:
        runtime.resolve_device(device)
    out_dir = check_out(out)
    runtime.setup(seed=0, threads=threads, progress=runtime.progress_enabled())
    base, tokenizer, name = load(model, device, model_name)
    stem = table.table_stem(name)
    csv_path, md_path, json_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "json"))
    records = table.read_table(csv_path) if csv_path.exists() else []
    provenance = json.loads(json_path.read_text()) if json_path.exists() else {}
    resolved = runtime.model_device(base)
    import transformers

    git = git_state()
    commit = "" if git["commit"] is None else git["commit"][:12] + ("+dirty" if git["dirty"] else "")
    run = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": list(sys.argv if command is None else command), "git": git, "measured": [], "kept": [],
           "skipped": [], "seconds": {}}
    provenance.update({
        "model": name, "device": str(resolved), "machine": machine(resolved), "torch": torch.__version__,
        "transformers": transformers.__version__, "protocol": dataclasses.asdict(protocol),
        "columns": {col: description for col, _, description in table.COLUMNS},
    })
    provenance.setdefault("runs", []).append(run)

    def write() -> None:
        order = {row_id: i for i, row_id in enumerate(ROW_IDS)}
        records.sort(key=lambda r: (order.get(r["row"], len(order)), r["row"]))
        table.write_csv(csv_path, records)
        table.atomic_write(md_path, table.markdown(records, f"Effects of every method on {name}"))
        table.atomic_write(json_path, json.dumps(provenance, indent=1) + "\n")

    ctx = Context(base, tokenizer, name, protocol, train)
    ctx.keep = {row.starts_from.id for row in rows if row.starts_from is not None}
    for row in progress(rows, desc="effects", total=len(rows)):
        key = row_key(row, protocol)
        done = next((r for r in records if r["model"] == name and r["row"] == row.id and r["settings"] == row.settings
                     and r["key"] == key and r["status"] == "ok"), None)
        if done is not None:
            run["kept"].append(row.id)
            continue
        start = time.perf_counter()
        values = measure_row(row, ctx)
        run["seconds"][row.id] = round(time.perf_counter() - start, 1)
        values.update(model=name, key=key, device=str(resolved), commit=commit,
                      measured_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        values = {column: values.get(column, "" if kind is str else None) for column, kind, _ in table.COLUMNS}
        records[:] = [r for r in records if not (r["model"] == name and r["row"] == row.id)] + [values]
        run["skipped" if values["status"] != "ok" else "measured"].append(row.id)
        if runtime.progress_enabled():
            print(_summary(values), file=sys.stderr, flush=True)
        write()
    write()
    ctx.release()
    return records


def _summary(values: dict[str, Any]) -> str:
    if values["status"] != "ok":
        return f"[effects] {values['row']}: skipped ({values['reason']})"
    ppl = "/".join(f"{values[f'ppl_{c}']:.2f}" for c in data.CORPORA)
    return (f"[effects] {values['row']}: ppl {ppl}, {values['weight_bytes'] / 2**20:.1f} MiB, "
            f"apply {values['apply_s']:.1f} s + calibration {values['calibration_s']:.1f} s")


