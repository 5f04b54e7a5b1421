"""The survey's taxonomy (``taxonomy/taxonomy.yaml``): loading and schema validation.

The YAML file is the book's table of contents by method: four categories (the survey's branches),
each split into groups, each group listing methods. Every method names its paper and bibkey, its tag
in the survey (S: named by the survey, L: very likely discussed, A: adjacent), its status
(``planned`` / ``explained`` / ``implemented``), the notebook and MyST section label that cover it,
and the ``refimpl`` modules or symbols that implement it.

:func:`load` checks the schema and raises :class:`TaxonomyError` naming the offending entry; the
consistency with the rest of the repository (symbols import, labels exist, bibkeys exist) is
checked by ``tests/test_taxonomy.py`` with :func:`check_repository`.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TAGS = ("S", "L", "A")
STATUSES = ("planned", "explained", "implemented")
CATEGORY_IDS = ("quantization", "pruning", "distillation", "architecture")

_ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_ARXIV = re.compile(r"^\d{4}\.\d{4,5}$")
_LABEL = re.compile(r"^sec-[a-z0-9-]+$")
_NOTEBOOK = re.compile(r"^\d\d_[a-z0-9_]+$")


class TaxonomyError(ValueError):
    """The taxonomy file does not follow the schema; the message names the entry and the field."""


@dataclass(frozen=True)
class Paper:
    title: str
    year: int
    arxiv: str | None
    venue: str | None = None


@dataclass(frozen=True)
class Method:
    id: str
    name: str
    tag: str
    status: str
    notebook: str
    section: str
    refimpl: tuple[str, ...]
    paper: Paper
    bibkey: str
    see_also: tuple[str, ...] = ()
    category: str = ""
    group: str = ""


@dataclass(frozen=True)
class Group:
    id: str
    name: str
    notebook: str
    methods: tuple[Method, ...]


@dataclass(frozen=True)
class Category:
    id: str
    name: str
    summary: str
    groups: tuple[Group, ...]

    @property
    def methods(self) -> list[Method]:
        return [m for g in self.groups for m in g.methods]


@dataclass(frozen=True)
class Taxonomy:
    survey: dict
    categories: tuple[Category, ...]
    path: Path | None = field(default=None, compare=False)

    @property
    def methods(self) -> list[Method]:
        return [m for c in self.categories for m in c.methods]

    def bibkeys(self) -> set[str]:
        keys = {self.survey["bibkey"]}
        for m in self.methods:
            keys.add(m.bibkey)
            keys.update(m.see_also)
        return keys


def default_path() -> Path:
    """``taxonomy/taxonomy.yaml`` of the repository this package lives in."""
    return Path(__file__).resolve().parent.parent / "taxonomy" / "taxonomy.yaml"


# --- schema -------------------------------------------------------------------------------------


def _require(entry: dict, key: str, kind: type | tuple[type, ...], where: str):
    if not isinstance(entry, dict):
        raise TaxonomyError(f"{where}: expected a mapping, got {type(entry).__name__}")
    if key not in entry:
        raise TaxonomyError(f"{where}: missing field {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise TaxonomyError(f"{where}: field {key!r} must be {names}, got {value!r}")
    return value


def _check_id(value: str, where: str, seen: set[str]) -> str:
    if not _ID.match(value):
        raise TaxonomyError(f"{where}: id {value!r} is not lowercase kebab-case")
    if value in seen:
        raise TaxonomyError(f"{where}: id {value!r} is used twice")
    seen.add(value)
    return value


def _check_known(entry: dict, allowed: set[str], where: str) -> None:
    unknown = set(entry) - allowed
    if unknown:
        raise TaxonomyError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def _parse_paper(raw: dict, where: str) -> Paper:
    where = f"{where}.paper"
    _check_known(raw, {"title", "year", "arxiv", "venue"}, where)
    title = _require(raw, "title", str, where)
    year = _require(raw, "year", int, where)
    if not 1950 <= year <= 2100:
        raise TaxonomyError(f"{where}: year {year} is not plausible")
    arxiv = raw.get("arxiv")
    venue = raw.get("venue")
    if arxiv is not None and (not isinstance(arxiv, str) or not _ARXIV.match(arxiv)):
        raise TaxonomyError(f"{where}: arxiv must be a quoted id like \"2210.17323\" or null, got {arxiv!r}")
    if arxiv is None and not isinstance(venue, str):
        raise TaxonomyError(f"{where}: a paper without an arXiv id needs a venue")
    return Paper(title=title, year=year, arxiv=arxiv, venue=venue)


def _parse_method(raw: dict, where: str, notebook: str, category: str, group: str, seen: set[str]) -> Method:
    _check_known(raw, {"id", "name", "tag", "status", "section", "refimpl", "paper", "bibkey",
                       "see_also", "notebook"}, where)
    method_id = _check_id(_require(raw, "id", str, where), where, seen)
    where = f"method {method_id!r}"
    tag = _require(raw, "tag", str, where)
    if tag not in TAGS:
        raise TaxonomyError(f"{where}: tag must be one of {list(TAGS)}, got {tag!r}")
    status = _require(raw, "status", str, where)
    if status not in STATUSES:
        raise TaxonomyError(f"{where}: status must be one of {list(STATUSES)}, got {status!r}")
    section = _require(raw, "section", str, where)
    if not _LABEL.match(section):
        raise TaxonomyError(f"{where}: section must be a label like 'sec-gptq', got {section!r}")
    notebook = raw.get("notebook", notebook)
    if not isinstance(notebook, str) or not _NOTEBOOK.match(notebook):
        raise TaxonomyError(f"{where}: notebook must be a name like '03_post_training_quantization', got {notebook!r}")
    refimpl = _require(raw, "refimpl", list, where)
    if not all(isinstance(s, str) and s.startswith("refimpl.") for s in refimpl):
        raise TaxonomyError(f"{where}: refimpl entries must be dotted names starting with 'refimpl.'")
    if status == "implemented" and not refimpl:
        raise TaxonomyError(f"{where}: an implemented method must name its refimpl symbol(s)")
    see_also = raw.get("see_also", [])
    if not isinstance(see_also, list) or not all(isinstance(k, str) for k in see_also):
        raise TaxonomyError(f"{where}: see_also must be a list of bibkeys")
    return Method(
        id=method_id,
        name=_require(raw, "name", str, where),
        tag=tag,
        status=status,
        notebook=notebook,
        section=section,
        refimpl=tuple(refimpl),
        paper=_parse_paper(_require(raw, "paper", dict, where), where),
        bibkey=_require(raw, "bibkey", str, where),
        see_also=tuple(see_also),
        category=category,
        group=group,
    )


def parse(data: dict, path: Path | None = None) -> Taxonomy:
    """Validate the loaded YAML ``data`` and build a :class:`Taxonomy`."""
    _check_known(data, {"survey", "categories"}, "top level")
    survey = _require(data, "survey", dict, "top level")
    for key, kind in (("title", str), ("year", int), ("arxiv", str), ("bibkey", str), ("authors", list)):
        _require(survey, key, kind, "survey")
    raw_categories = _require(data, "categories", list, "top level")
    ids = [c.get("id") if isinstance(c, dict) else None for c in raw_categories]
    if tuple(ids) != CATEGORY_IDS:
        raise TaxonomyError(f"categories must be exactly {list(CATEGORY_IDS)} in this order, got {ids}")
    seen: set[str] = set()
    categories = []
    for raw_cat in raw_categories:
        cat_id = _check_id(raw_cat["id"], "category", seen)
        where = f"category {cat_id!r}"
        _check_known(raw_cat, {"id", "name", "summary", "groups"}, where)
        groups = []
        for raw_group in _require(raw_cat, "groups", list, where):
            group_id = _check_id(_require(raw_group, "id", str, where), where, seen)
            gwhere = f"group {group_id!r}"
            _check_known(raw_group, {"id", "name", "notebook", "methods"}, gwhere)
            notebook = _require(raw_group, "notebook", str, gwhere)
            methods = tuple(
                _parse_method(m, gwhere, notebook, cat_id, group_id, seen)
                for m in _require(raw_group, "methods", list, gwhere)
            )
            if not methods:
                raise TaxonomyError(f"{gwhere}: has no methods")
            groups.append(Group(group_id, _require(raw_group, "name", str, gwhere), notebook, methods))
        categories.append(Category(cat_id, _require(raw_cat, "name", str, where),
                                   _require(raw_cat, "summary", str, where), tuple(groups)))
    return Taxonomy(survey=survey, categories=tuple(categories), path=path)


def load(path: str | Path | None = None) -> Taxonomy:
    """Load and validate the taxonomy file (default: the repository's ``taxonomy/taxonomy.yaml``)."""
    path = Path(path) if path is not None else default_path()
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise TaxonomyError(f"{path}: the top level must be a mapping")
    return parse(data, path)


# --- consistency with the repository -------------------------------------------------------------


def resolve_symbol(dotted: str):
    """Import ``refimpl.a.b`` (a module) or ``refimpl.a.b.name`` (an attribute of a module)."""
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        module_name, _, attr = dotted.rpartition(".")
        if not module_name or exc.name != dotted:
            raise
        return getattr(importlib.import_module(module_name), attr)


def notebook_labels(markdown: str) -> set[str]:
    """The MyST target labels ``(label)=`` defined in a notebook's markdown source."""
    return set(re.findall(r"^\((sec-[a-z0-9-]+)\)=\s*$", markdown, flags=re.MULTILINE))


def check_repository(taxonomy: Taxonomy, root: Path, bibkeys: set[str]) -> list[str]:
    """Problems that tie the taxonomy to the repository, one message each (empty: consistent).

    For every ``implemented`` method: each refimpl symbol imports; and for every ``explained`` or
    ``implemented`` method: its notebook ``notebooks/<name>.md`` exists and defines its section
    label. For every method: its bibkey and see-also keys are in ``bibkeys``.
    """
    problems = []
    for key in sorted(taxonomy.bibkeys() - bibkeys):
        problems.append(f"bibkey {key!r} is missing from book/references.bib")
    sources: dict[str, str | None] = {}
    for m in taxonomy.methods:
        if m.status == "implemented":
            for symbol in m.refimpl:
                try:
                    resolve_symbol(symbol)
                except (ImportError, AttributeError) as exc:
                    problems.append(f"method {m.id!r}: refimpl symbol {symbol!r} does not import ({exc})")
        if m.status in ("explained", "implemented"):
            if m.notebook not in sources:
                path = root / "notebooks" / f"{m.notebook}.md"
                sources[m.notebook] = path.read_text(encoding="utf-8") if path.is_file() else None
            source = sources[m.notebook]
            if source is None:
                problems.append(f"method {m.id!r}: notebook notebooks/{m.notebook}.md does not exist")
            elif m.section not in notebook_labels(source):
                problems.append(f"method {m.id!r}: notebook {m.notebook} has no section label ({m.section})=")
    return problems
