"""The taxonomy file: schema, and consistency with refimpl, the notebooks and the bibliography."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pybtex.database
import pytest
import yaml

from refimpl import taxonomy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((ROOT / "taxonomy" / "taxonomy.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bibkeys():
    return set(pybtex.database.parse_file(ROOT / "book" / "references.bib").entries)


def test_taxonomy_loads_with_the_four_branches():
    tax = taxonomy.load()
    assert [c.id for c in tax.categories] == list(taxonomy.CATEGORY_IDS)
    assert len(tax.methods) >= 50
    assert all(c.methods for c in tax.categories)


def test_survey_methods_are_implemented_and_additions_at_least_explained():
    """Every method the survey names (S) or very likely discusses (L) is implemented and measured; every
    addition (A) is at least explained."""
    methods = taxonomy.load().methods
    missing = [m.id for m in methods if m.tag in ("S", "L") and m.status != "implemented"]
    assert not missing, f"S/L methods not implemented: {missing}"
    unexplained = [m.id for m in methods if m.tag == "A" and m.status not in ("explained", "implemented")]
    assert not unexplained, f"A methods neither explained nor implemented: {unexplained}"


def test_survey_methods_are_all_present():
    names = " ".join(m.name.lower() for m in taxonomy.load().methods)
    for method in ["llm.int8", "zeroquant", "smoothquant", "gptq", "awq", "qlora", "llm-qat", "sparsegpt",
                   "wanda", "llm-pruner", "minillm", "gkd", "flashattention", "pagedattention",
                   "speculative", "grouped-query", "multi-query", "nf4"]:
        assert method in names, method


def test_repository_is_consistent_with_taxonomy(bibkeys):
    problems = taxonomy.check_repository(taxonomy.load(), ROOT, bibkeys)
    assert problems == []


# A citation role ({cite}, {cite:p}, {cite:t}, ...) and the code cells of a jupytext MyST notebook, whose
# text the book does not render as markdown.
_CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]*)`")
_CODE_CELL = re.compile(r"^```\{code-cell\}.*?^```[ \t]*$", flags=re.MULTILINE | re.DOTALL)


def cited_keys(markdown: str) -> set[str]:
    """The bibkeys cited by ``{cite}`` roles in the markdown of a page or a notebook's .md source."""
    text = _CODE_CELL.sub("", markdown)
    return {key.strip() for match in _CITE.finditer(text) for key in match.group(1).split(",") if key.strip()}


def test_cited_keys_reads_roles_and_skips_code_cells():
    page = ("See {cite}`a2020x,b2021y` and {cite:t}`c2022z`.\n"
            "```{code-cell} ipython3\nprint('{cite}`d2023w`')\n```\n"
            "```{exercise}\n{cite:p}`e2024v`\n```\n")
    assert cited_keys(page) == {"a2020x", "b2021y", "c2022z", "e2024v"}


@pytest.fixture(scope="module")
def book_citations() -> dict[str, set[str]]:
    """Cited bibkeys of every notebook source and hand-written book page (the generated taxonomy page,
    which cites every taxonomy key by construction, is left out)."""
    pages = sorted((ROOT / "notebooks").glob("*.md")) + sorted((ROOT / "book").glob("*.md"))
    return {str(p.relative_to(ROOT)): cited_keys(p.read_text(encoding="utf-8"))
            for p in pages if p.relative_to(ROOT).as_posix() != "book/taxonomy.md"}


def test_every_taxonomy_bibkey_is_cited_in_the_book(book_citations):
    cited = set().union(*book_citations.values())
    uncited = sorted(taxonomy.load().bibkeys() - cited)
    assert not uncited, (f"taxonomy bibkeys cited nowhere in notebooks/*.md or book/*.md: {uncited}; cite each "
                         "in the section of its method")


def test_bibliography_and_citations_match(book_citations, bibkeys):
    cited = set().union(*book_citations.values())
    unknown = {page: sorted(keys - bibkeys) for page, keys in book_citations.items() if keys - bibkeys}
    assert not unknown, f"cited keys missing from book/references.bib: {unknown}"
    assert not sorted(bibkeys - cited), f"references.bib entries cited nowhere: {sorted(bibkeys - cited)}"


def _first_method(data):
    return data["categories"][0]["groups"][0]["methods"][0]


@pytest.mark.parametrize("field, value, match", [
    ("tag", "X", "tag must be one of"),
    ("status", "done", "status must be one of"),
    ("section", "gptq", "section must be a label"),
    ("refimpl", "refimpl.x", "refimpl"),
    ("paper", {"title": "T", "year": 2020, "arxiv": 2210.17323}, "arxiv must be a quoted id"),
    ("paper", {"title": "T", "year": 2020, "arxiv": None}, "needs a venue"),
    ("colour", "red", "unknown field"),
])
def test_schema_errors_name_the_field(raw, field, value, match):
    data = copy.deepcopy(raw)
    _first_method(data)[field] = value
    with pytest.raises(taxonomy.TaxonomyError, match=match):
        taxonomy.parse(data)


def test_missing_field_is_named(raw):
    data = copy.deepcopy(raw)
    del _first_method(data)["bibkey"]
    with pytest.raises(taxonomy.TaxonomyError, match="missing field 'bibkey'"):
        taxonomy.parse(data)


def test_duplicate_ids_are_rejected(raw):
    data = copy.deepcopy(raw)
    methods = data["categories"][0]["groups"][0]["methods"]
    methods[1]["id"] = methods[0]["id"]
    with pytest.raises(taxonomy.TaxonomyError, match="used twice"):
        taxonomy.parse(data)


def test_categories_must_be_the_survey_branches(raw):
    data = copy.deepcopy(raw)
    data["categories"] = data["categories"][:3]
    with pytest.raises(taxonomy.TaxonomyError, match="categories must be exactly"):
        taxonomy.parse(data)


def test_implemented_needs_a_symbol(raw):
    data = copy.deepcopy(raw)
    method = _first_method(data)
    method.update(status="implemented", refimpl=[])
    with pytest.raises(taxonomy.TaxonomyError, match="must name its refimpl symbol"):
        taxonomy.parse(data)


def test_consistency_check_catches_each_kind_of_break(raw, bibkeys, tmp_path):
    data = copy.deepcopy(raw)
    method = _first_method(data)
    method.update(status="implemented", refimpl=["refimpl.evaluate.no_such_function"],
                  notebook="98_missing", bibkey="nobody2099nothing")
    second = data["categories"][0]["groups"][0]["methods"][1]
    second.update(status="explained", notebook="99_present", section="sec-not-there")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "99_present.md").write_text("(sec-something-else)=\n# Title\n")
    problems = taxonomy.check_repository(taxonomy.parse(data), tmp_path, bibkeys)
    text = "\n".join(problems)
    assert "'nobody2099nothing' is missing" in text
    assert "refimpl.evaluate.no_such_function' does not import" in text
    assert "notebooks/98_missing.md does not exist" in text
    assert "has no section label (sec-not-there)=" in text


def test_resolve_symbol_handles_modules_and_attributes():
    assert taxonomy.resolve_symbol("refimpl.evaluate").__name__ == "refimpl.evaluate"
    assert taxonomy.resolve_symbol("refimpl.evaluate.perplexity").__name__ == "perplexity"
    with pytest.raises(ModuleNotFoundError):
        taxonomy.resolve_symbol("refimpl.no_such_module.thing")
