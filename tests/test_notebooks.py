"""Notebook pairs: every jupytext MyST source has an executed .ipynb twin with the same cells."""

from __future__ import annotations

import asyncio
import json
import platform
import re
import shutil
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



@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_opening_a_chapter_in_jupyterlab_leaves_the_files_unchanged(source, tmp_path):
    """What JupyterLab does to a chapter a reader only opens and runs: it reads the pair through jupytext's
    contents manager, starts ipykernel's "python3" kernel, writes that kernel's spec and language info
    into the notebook's metadata (``NotebookPanel``: ``{name, display_name, language}``, in this order)
    and autosaves. Both files must come back byte for byte (the ``.ipynb`` up to the Python version in
    ``language_info``, which the Lab writes as the reader's own)."""
    from ipykernel.ipkernel import IPythonKernel
    from ipykernel.kernelspec import get_kernel_dict
    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
    from jupytext.async_contentsmanager import build_async_jupytext_contents_manager_class

    for suffix in (".md", ".ipynb"):
        shutil.copy(source.with_suffix(suffix), tmp_path)
    manager = build_async_jupytext_contents_manager_class(AsyncLargeFileManager)(root_dir=str(tmp_path))
    spec = get_kernel_dict()

    async def open_run_and_save() -> None:
        nb = (await manager.get(source.name, content=True))["content"]
        nb["metadata"]["language_info"] = dict(IPythonKernel.language_info)
        nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": spec["display_name"],
                                        "language": spec["language"]}
        await manager.save({"type": "notebook", "format": "json", "content": nb}, source.name)

    asyncio.run(open_run_and_save())
    saved = tmp_path / source.name
    hint = f"re-execute it with `python scripts/execute_notebooks.py {source.stem}`"
    assert saved.read_bytes() == source.read_bytes(), f"opening {source.name} in JupyterLab rewrites it: {hint}"
    stored_text = source.with_suffix(".ipynb").read_text(encoding="utf-8")
    stored = json.loads(stored_text)
    saved_text = saved.with_suffix(".ipynb").read_text(encoding="utf-8")
    if stored["metadata"]["language_info"]["version"] == platform.python_version():
        assert saved_text == stored_text, f"opening {source.name} in JupyterLab rewrites {source.stem}.ipynb: {hint}"
    stored["metadata"]["language_info"]["version"] = platform.python_version()
    assert json.loads(saved_text) == stored, f"opening {source.name} in JupyterLab rewrites {source.stem}.ipynb: {hint}"
