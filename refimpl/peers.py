"""The committed comparison of refimpl's compression methods with a production library, llmcompressor.

``scripts/peers.py`` measures it in an environment of its own (``bash scripts/make_peers_env.sh``:
llmcompressor pins another transformers than the book's): each method applied by both libraries, with
matched settings, to fresh copies of SmolLM2-135M-Instruct on the same calibration blocks, both results
scored on the same evaluation blocks, each compression timed with the two libraries alternating. It
writes ``results/peers/llmcompressor.json``. This module only reads and prints that file, so that the
chapters show the comparison without the peer environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from refimpl.evaluate import Interval

PEERS_FILE = Path(__file__).resolve().parents[1] / "results" / "peers" / "llmcompressor.json"
_KEYS = ("date", "commit", "versions", "machine", "protocol", "methods")


def load(path: str | Path | None = None) -> dict[str, Any]:
    """The comparison written by ``scripts/peers.py`` (default :data:`PEERS_FILE`)."""
    path = PEERS_FILE if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {path} does not exist: make it with `bash scripts/make_peers_env.sh` and "
                                "`.venv-peers/bin/python scripts/peers.py`")
    result = json.loads(path.read_text())
    missing = [key for key in _KEYS if key not in result]
    if missing:
        raise ValueError(f"path {path} is not a peer comparison of scripts/peers.py: it has no {missing}")
    return result


def _interval(values: dict[str, float], confidence: float = 0.95) -> Interval:
    return Interval(values["estimate"], values["low"], values["high"], confidence)


def describe(result: dict[str, Any]) -> str:
    """Where and how the comparison was measured: library versions, machine, threads, protocol."""
    versions, machine, protocol = result["versions"], result["machine"], result["protocol"]
    return (f"llmcompressor {versions['llmcompressor']} (compressed-tensors {versions['compressed-tensors']}, "
            f"transformers {versions['transformers']}) against refimpl at commit {result['commit'][:7]}, "
            f"torch {versions['torch']}; {machine['cpu']} ({machine['cpu_capability']}), "
            f"{machine['threads']} thread(s), {result['date'][:10]}\n"
            f"calibration: {protocol['calibration']}\nevaluation: {protocol['evaluation']}")


def format_methods(result: dict[str, Any], methods: Sequence[str]) -> str:
    """Per method and corpus: both libraries' perplexities with their 95 % intervals, the ratio
    refimpl / llmcompressor with its paired interval (an interval containing 1: indistinguishable at
    this evaluation size), and each side's compression seconds with their ratio."""
    unknown = [m for m in methods if m not in result["methods"]]
    if isinstance(methods, str) or not methods or unknown:
        raise ValueError(f"methods must name measured methods {list(result['methods'])}, got {methods!r}")
    lines = [f"{'method':<16} {'corpus':<12} {'refimpl':>22} {'llmcompressor':>22} {'refimpl / llmcompressor':>26}"]
    for method in methods:
        measured = result["methods"][method]
        for corpus, ratio in measured["ratio_refimpl_over_llmcompressor"].items():
            ppl = measured["perplexity"][corpus]
            cells = (format(_interval(ppl["refimpl"]), ".2f"), format(_interval(ppl["llmcompressor"]), ".2f"),
                     format(_interval(ratio), ".3f"))
            lines.append(f"{method:<16} {corpus:<12} {cells[0]:>22} {cells[1]:>22} {cells[2]:>26}")
        seconds = measured["seconds"]
        lines.append(f"{'':<16} {'seconds':<12} {seconds['refimpl']:>22.1f} {seconds['llmcompressor']:>22.1f} "
                     f"{seconds['refimpl'] / seconds['llmcompressor']:>26.2f}")
    return "\n".join(lines)
