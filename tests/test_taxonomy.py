"""The taxonomy file: schema, and consistency with refimpl, the notebooks and the bibliography."""

from __future__ import annotations

import copy
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


def test_survey_methods_are_all_present():
    names = " ".join(m.name.lower() for m in taxonomy.load().methods)
    for method in ["llm.int8", "zeroquant", "smoothquant", "gptq", "awq", "qlora", "llm-qat", "sparsegpt",
                   "wanda", "llm-pruner", "minillm", "gkd", "flashattention", "pagedattention",
                   "speculative", "grouped-query", "multi-query", "nf4"]:
        assert method in names, method


def test_repository_is_consistent_with_taxonomy(bibkeys):
    problems = taxonomy.check_repository(taxonomy.load(), ROOT, bibkeys)
    assert problems == []


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
