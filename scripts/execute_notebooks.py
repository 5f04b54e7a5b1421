"""Re-execute chapter notebooks from their jupytext sources and write the paired ``.ipynb``.

Usage (from the repository root)::

    python scripts/execute_notebooks.py              # every chapter, in order
    python scripts/execute_notebooks.py 01_background

Each ``notebooks/NN_name.md`` (the source of truth, MyST markdown) is executed top to bottom in a
fresh kernel of this Python environment, with the notebook folder as working directory, and its
outputs are stored in ``notebooks/NN_name.ipynb``. Run it after changing ``refimpl`` or a notebook's
text, then commit both files: the test suite checks that the pair is in sync and nbval checks that
the stored outputs are what a fresh run produces.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
from ipykernel.kernelspec import get_kernel_dict
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(source: Path, timeout: int = 1800) -> float:
    """Execute one notebook source and write its executed ``.ipynb`` twin; return the seconds taken."""
    nb = jupytext.read(source)
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,md:myst"
    # The kernelspec as JupyterLab writes it when it starts ipykernel's "python3" kernel (these keys, in
    # this order), so that opening a chapter there leaves both files as they are (tests/test_notebooks.py).
    spec = get_kernel_dict()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": spec["display_name"], "language": spec["language"]}
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(source.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    jupytext.write(nb, source.with_suffix(".ipynb"))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names like 01_background (default: all)")
    args = parser.parse_args(argv)
    sources = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md"))
    if args.names:
        wanted = {n.removesuffix(".md").removesuffix(".ipynb") for n in args.names}
        unknown = wanted - {s.stem for s in sources}
        if unknown:
            parser.error(f"unknown notebook(s): {sorted(unknown)}; have {[s.stem for s in sources]}")
        sources = [s for s in sources if s.stem in wanted]
    # The kernel must be this environment's Python: put it first on PATH for the kernel launcher.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for source in sources:
        print(f"executing {source.name} ...", flush=True)
        print(f"  done in {execute(source):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
