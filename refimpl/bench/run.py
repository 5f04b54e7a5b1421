"""The benchmark run: every section of :mod:`refimpl.bench` on one device, written to one JSON file
with the device, library versions, command and date; and its command line."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import refimpl.bench
from refimpl import runtime
from refimpl.bench.attention import bench_attention
from refimpl.bench.bandwidth import bench_bandwidth
from refimpl.bench.common import QUICK_OVERRIDES, build_model, resolve_device
from refimpl.bench.decode import bench_decode
from refimpl.bench.sparse_2_4 import bench_sparse_2_4
from refimpl.bench.weight_only import bench_weight_only

#: The sections, in the order they run (the decode section reads the bandwidth section's roofline).
SECTIONS = ("bandwidth", "decode", "attention", "sparse_2_4", "weight_only")


def run_benchmarks(out: str | os.PathLike, device: str | None = None, quick: bool = False,
                   command: list[str] | None = None) -> dict[str, Any]:
    """Run every section on ``device`` and write the results to the JSON file ``out``.

    The file is rewritten after each section, so a run that fails part-way keeps what it measured
    (``"complete": false``). Returns the results.
    """
    resolved = resolve_device(device)
    import transformers

    results: dict[str, Any] = {
        "device": runtime.device_name(resolved),
        "device_type": resolved.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if resolved.type == "cuda" else None,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv if command is None else command),
        "quick": bool(quick),
        "model": "random weights, SmolLM2-135M config" + (" with " + ", ".join(
            f"{k}={v}" for k, v in QUICK_OVERRIDES.items()) if quick else ""),
        "complete": False,
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        path.write_text(json.dumps(results, indent=2) + "\n")

    model = build_model(resolved, quick)
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "bandwidth": lambda: bench_bandwidth(model, resolved, quick),
        "decode": lambda: bench_decode(model, resolved, quick, results["bandwidth"].get("roofline_tokens_per_s")),
        "attention": lambda: bench_attention(resolved, quick),
        "sparse_2_4": lambda: bench_sparse_2_4(resolved, quick),
        "weight_only": lambda: bench_weight_only(resolved, quick),
    }
    for name in runtime.progress(SECTIONS, desc="bench", total=len(SECTIONS)):
        start = time.perf_counter()
        results[name] = sections[name]()
        results[name]["section_s"] = time.perf_counter() - start
        write()
    results["complete"] = True
    write()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: ``python -m refimpl.bench --out PATH.json [--device cuda|cpu] [--quick]``."""
    parser = argparse.ArgumentParser(prog="python -m refimpl.bench",
                                     description=refimpl.bench.__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and lengths (seconds on a CPU)")
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    command = [sys.argv[0]] + list(argv) if argv is not None else None
    return run_benchmarks(args.out, args.device, args.quick, command)
