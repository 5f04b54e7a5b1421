"""The comparison rule for stored figures, and nbval using it through notebooks/conftest.py."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from refimpl import reproducibility as rep

CONFTEST = Path(__file__).resolve().parent.parent / "notebooks" / "conftest.py"


def test_identical_text_and_noise_in_the_last_digit_hold():
    assert rep.compare_text("ppl 40.69", "ppl 40.69") == []
    assert rep.compare_text("ppl 40.69", "ppl 40.70") == []  # one unit in the last printed digit
    assert rep.compare_text("{'a': 64.4, 'b': 58.04}", "{'a': 64.41, 'b': 58.04}") == []  # round() drops a 0
    assert rep.compare_text("ppl 40.7", "ppl 40.79")  # the stored figure's unit, not the coarser one
    assert rep.compare_text("ratio 1", "ratio 1.4", "activations")  # an integer printed as a decimal


def test_integers_must_be_equal():
    (mismatch,) = rep.compare_text("163,500 bytes, 12 of 30 layers", "163,501 bytes, 12 of 30 layers", "trained")
    assert (mismatch.stored, mismatch.fresh) == ("163,500", "163,501") and "integer" in mismatch.reason
    assert rep.compare_text("token ids [1, 2, 3]", "token ids [1, 2, 4]", "trained")


def test_decimals_hold_within_their_kinds_tolerance():
    stored, fresh = "GPTQ 3-bit g64: 571.39", "GPTQ 3-bit g64: 575.43"  # 0.7 %
    assert rep.compare_text(stored, fresh, "grid") == []
    (mismatch,) = rep.compare_text(stored, fresh, "float")
    assert (mismatch.stored, mismatch.fresh) == ("571.39", "575.43")
    assert rep.compare_text("ppl 43.33", "ppl 46.00", "grid")  # 6.2 % is a change
    assert rep.compare_text("ppl 99.00", "ppl 91.53", "activations") == []  # a 2-bit KV cache on AVX-512
    assert rep.compare_text("ppl 99.00", "ppl 130.00", "activations")
    assert rep.compare_text("error 5.2e-05", "error 6.9e-05")  # a float error's digits are not a figure


def test_words_labels_and_column_widths():
    assert rep.compare_text("RTN 4-bit g64", "RTN 4-bit g32")  # digits inside a label are text
    assert rep.compare_text("W8A8 naive  99.99", "W8A8 naive 100.01", "grid") == []  # column width follows the number
    assert rep.compare_text("( 9.99)\n 9.99 x", "(10.00)\n10.00 x") == []  # padding of one space or none
    assert rep.compare_text("frontier: AWQ -> RTN", "frontier: RTN -> AWQ")[0].reason.startswith("the text")
    assert rep.compare_text("torch 2.13.0", "torch 2.14.0", "trained")  # a version is not a measurement
    assert rep.compare_text("a\nb 1.0", "a b 1.0")  # a line break is text


def test_values_agree_edges():
    assert rep.values_agree("float", float("nan"), float("nan"))
    assert not rep.values_agree("trained", float("nan"), 1.0)
    assert rep.values_agree("float", float("inf"), float("inf")) and not rep.values_agree("trained", float("inf"), 1e300)
    assert rep.values_agree("float", 0.0, 0.0004, unit=0.001) and not rep.values_agree("float", 0.0, 0.0004)


def test_cell_kind_is_read_from_the_marker_comment():
    assert rep.cell_kind("x = 1\nprint(x)") == "float"
    assert rep.cell_kind("# NBVAL_TOLERANCE grid\nprint(1)") == "grid"
    assert rep.cell_kind("x = 1\n# NBVAL_TOLERANCE long-training\n") == "long-training"
    with pytest.raises(ValueError, match="kind"):
        rep.cell_kind("# NBVAL_TOLERANCE nonsense\n")
    with pytest.raises(ValueError, match="one tolerance kind"):
        rep.cell_kind("# NBVAL_TOLERANCE grid\n# NBVAL_TOLERANCE trained\n")
    with pytest.raises(TypeError, match="source"):
        rep.cell_kind(None)
    for misspelt in ("#NBVAL_TOLERANCE: grid", "# NBVAL_TOLERANCE grid  # why", "x = 1  # NBVAL_TOLERANCE grid"):
        with pytest.raises(ValueError, match="marker"):
            rep.cell_kind(misspelt)
    with pytest.raises(ValueError, match="kind"):
        rep.compare_text("1.0", "1.0", "loose")


def test_every_kind_explains_itself():
    for kind, tolerance in rep.TOLERANCES.items():
        assert 0 < tolerance.rtol <= 0.4 and tolerance.what and tolerance.evidence, kind
    assert list(rep.TOLERANCES) == sorted(rep.TOLERANCES, key=lambda k: rep.TOLERANCES[k].rtol)


def _notebook(path: Path, cells: list[tuple[str, str]]) -> None:
    """A notebook whose code cells print something other than the output stored for them (``None``: the
    cell's stored output is an execute_result)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    for n, (source, stored) in enumerate(cells, 1):
        cell = nbformat.v4.new_code_cell(source, execution_count=n)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored) if stored is not None else
                        nbformat.v4.new_output("execute_result", data={"text/plain": "{'ppl': 571.39}"},
                                               execution_count=n)]
        nb.cells.append(cell)
    nbformat.write(nb, path)


def test_nbval_compares_with_the_rule(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    _notebook(pytester.path / "chapter.ipynb", [
        ("print(f'ppl {40.70:.2f}')", "ppl 40.69\n"),  # passes: one unit in the last digit
        ("# NBVAL_TOLERANCE grid\nprint('ppl', 575.43)", "ppl 571.39\n"),  # passes: 0.7 % < 3 %
        ("print('ppl', 575.43)", "ppl 571.39\n"),  # fails: 0.7 % > 0.1 %
        ("print('bytes', 1001)", "bytes 1000\n"),  # fails: integers are exact
        ("print('RTN g32', 1.0)", "RTN g64 1.0\n"),  # fails: text
        ("# NBVAL_TOLERANCE grid\n{'ppl': 575.43}", None),  # passes: an execute_result, not a stream
    ])
    result = pytester.runpytest_subprocess("--nbval", "--nbval-current-env", "-p", "no:cacheprovider", "-rf",
                                           "chapter.ipynb")
    result.assert_outcomes(passed=3, failed=3)
    result.stdout.fnmatch_lines(["*stored 571.39, fresh 575.43*'float' tolerance*",
                                 "*stored 1000, fresh 1001: an integer must be equal*"])
    result.stdout.fnmatch_lines(["FAILED chapter.ipynb::Cell 2*", "FAILED chapter.ipynb::Cell 3*",
                                 "FAILED chapter.ipynb::Cell 4*"])
