"""Notebook pairs: every jupytext MyST source has an executed .ipynb twin with the same cells."""

from __future__ import annotations

import re
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md"))


def test_there_are_chapters():
    assert [p.stem for p in SOURCES][:2] == ["00_introduction", "01_background"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_pair_is_in_sync(source):
    twin = source.with_suffix(".ipynb")
    assert twin.is_file(), f"{twin.name} is missing: run `jupytext --sync {source}` and execute it"
    text = jupytext.read(source)
    executed = nbformat.read(twin, as_version=4)
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert cells(text) == cells(executed), (
        f"{source.name} and {twin.name} differ: re-execute with `python scripts/execute_notebooks.py {source.stem}`"
    )


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_is_executed_in_order(source):
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts and counts == list(range(1, len(counts) + 1)), "execute the notebook top to bottom once"
    assert any(c.outputs for c in nb.cells if c.cell_type == "code"), "the notebook has no stored outputs"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, "the stored outputs contain an error"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_code_is_shown_whole(source):
    """A chapter shows refimpl's code as whole functions, ``print(inspect.getsource(f))``, never as a
    slice of a function's text between anchors, which reformatting the code would break."""
    uses = [line.strip() for line in source.read_text().splitlines() if "getsource" in line]
    sliced = [line for line in uses if not re.fullmatch(r"print\(inspect\.getsource\([\w.]+\)\)", line)]
    assert not sliced, f"{source.name}: print whole functions instead of {sliced}"
