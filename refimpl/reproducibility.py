"""What a printed measurement holds: the one rule by which the book compares a fresh run with its
stored figures.

The chapters' outputs were computed on one CPU. Another CPU (AVX-512, AMX), another thread count or
another BLAS adds the same floating-point numbers in another order, so the last bits of every sum
differ; most results then differ in their last printed digit at most, but rounding to a quantization
grid, choosing a pruning mask, or a few optimizer steps can carry a last-bit difference into the
second or third digit. A character-by-character comparison of outputs therefore checks one machine's
digits, not the book's figures. The notebook validation (nbval, through ``notebooks/conftest.py``)
and the effects table's check (``python -m refimpl effects --check``) compare with this rule instead:

* a number printed as an integer — a byte count, a count, a token id, a whole percent — must be
  equal: the computations that print integers are exact, or their result is a decision that a
  change must not flip;
* a number printed with a decimal point or an exponent agrees with the stored one when they differ
  by at most the relative tolerance of the measurement's *kind* (:data:`TOLERANCES`) or by one unit
  in the last printed digit (of the finer of the two), whichever is larger;
* every other character must be the same, except the spaces that pad a number (column widths follow
  the numbers' widths).

A notebook cell names its kind in a line ``# NBVAL_TOLERANCE <kind>``; a cell that names none is
``float``. The widest kind a cell's figures need applies to all of them, so a float baseline printed
beside quantized rows is compared loosely there — and strictly where a chapter first prints it.
Each tolerance is at least twice the largest difference measured for its kind (``evidence``: the
chapters executed with AVX2 kernels, with AVX-512 ones, on an Intel Xeon with AMX, and with the
weights perturbed in their last bit, which stands in for a machine not tried): wide enough for any
x86-64 CPU with AVX2 or newer, and for the narrow kinds narrow enough that a change to a method or to
the evaluation text fails it. The wide ones are properties of the measurements, not slack, and a
change smaller than them (a few percent) passes them unseen: a perplexity over 510 tokens of text
moves by up to a tenth when every forward pass rounds the activations to a coarse grid
(``activations``; a larger evaluation would narrow it), a model compressed layer by layer on the
outputs of the layers already compressed carries the last bits through all its layers and lands up
to a tenth apart (``sequential``, measured on two CPUs so far), a model trained tens of steps from a
destroyed start ends a sixth apart on two CPUs (``long-training``; only a longer, gentler training
would narrow that), and the ratio of GPTQ calibrated on barely more tokens than a layer has inputs
to its full run moves by a fifth at its interval's upper end (``underdetermined``; more calibration
text narrows it to ``sequential``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from refimpl._validation import check_choice


@dataclass(frozen=True)
class Tolerance:
    """The relative tolerance of one kind of measurement, and why it is that wide."""

    rtol: float
    what: str
    evidence: str


TOLERANCES: dict[str, Tolerance] = {
    "float": Tolerance(
        1e-3, "float32 arithmetic in another order, nothing that amplifies it",
        "the float model's perplexities agree to 1e-5 between the machines; printed to 2 decimals"),
    "bfloat16": Tolerance(
        0.02, "bfloat16 arithmetic: CPUs with bfloat16 instructions accumulate it otherwise",
        "the bfloat16 model on one block: 39.98 (AVX2, emulated), 40.05 (AMX), 40.22 (AVX-512 BF16)"),
    "grid": Tolerance(
        0.05, "weights through a discrete choice: a quantization grid, a pruning mask, a search",
        "GPTQ 3-bit g64 571.39 (AVX2), 575.43 (AMX), 563.03 (AVX-512); GPTQ calibrated on one corpus "
        "124.02 -> 126.26 (AVX-512); magnitude, Wanda, SparseGPT and RTN within 0.4 %"),
    "trained": Tolerance(
        0.05, "a model trained for a few optimizer steps, carrying every difference through its updates",
        "QAT 3-bit 85.62 -> 85.91 (AVX-512), 93.80 -> 94.03 (AMX); LoRA recovery of pruned models within "
        "0.4 %; the distilled students within 1e-5"),
    "off-distribution": Tolerance(
        0.15, "a model quantized to 3 bits with one corpus's calibration statistics and scored on the "
        "other corpus: far from dense, where the grid choices that the calibration did not constrain "
        "amplify last-bit differences",
        "GPTQ 3-bit g64 calibrated on Shakespeare, scored on docstrings: 319.17 (AVX-512), 341.99 (no "
        "vector kernels, ATEN_CPU_CAPABILITY=default); the same model on its own corpus within 1 %"),
    "activations": Tolerance(
        0.2, "activations rounded to a grid on every forward pass (W8A8, a quantized KV cache): a "
        "last-bit difference moves a rounding, and the change runs through the rest of the block",
        "a 2-bit KV cache: 99.00 (AVX2), 91.53 (AVX-512), 90.54-95.26 over five last-bit perturbations of "
        "the weights; SmoothQuant a=0.5 + down_proj 55.94 -> 52.68 (AVX-512); ZeroQuant W8A8 42.21-42.86"),
    "sequential": Tolerance(
        0.25, "a model compressed layer by layer, each layer calibrated on the outputs of the layers before "
        "it as already compressed (GPTQ and SparseGPT as their papers run them): a last-bit difference "
        "changes the next layer's statistics, and so on through 30 layers",
        "GPTQ 3-bit g64, first token weighted, on 4 blocks of 512 calibration tokens per corpus, scored on 510 "
        "tokens: 70.02 (AVX-512), 77.34 (AVX2); 4-bit per channel on 8 blocks per corpus: 70.49 -> 67.03, the lower "
        "end of its ratio to RTN 0.725 -> 0.680; GPTQ 3-bit g64 107.30 -> 103.80; SparseGPT 50 %: the upper end "
        "of SparseGPT / Wanda on the docstrings 1.024 -> 0.972; the same runs calibrated on the float model's "
        "statistics within 1 %"),
    "long-training": Tolerance(
        0.35, "a model trained far from where it started (a destroyed model, a high learning rate, tens "
        "of steps): a last-bit difference grows with every update",
        "SmolLM2's mean-pooled MQA version uptrained 64 steps at lr 3e-3: 228.39 / 282.91 (AVX2), "
        "263.84 / 318.39 (AVX-512), 230.67 / 269.54 (no vector kernels); at 16 steps it moved fourfold"),
    "underdetermined": Tolerance(
        0.4, "a layer-by-layer calibration on about as many tokens as its widest layer has inputs: every "
        "Hessian is nearly singular, and the rounding noise of the arithmetic decides much of the result",
        "GPTQ 3-bit g64 calibrated sequentially on 4 blocks of 512 tokens (2,048 tokens for layers of 1,536 "
        "inputs): 137.14 (AVX-512), 152.33 (AVX2); its ratio to the 16-block run 1.278 -> 1.468, the upper "
        "end of that ratio's interval 1.477 -> 1.774"),
}


_NUMBER = re.compile(
    r"(?<![\w.])[-+]?"  # not inside a word such as 'g64' or 'W8A8'
    r"(?:\d{1,3}(?:,\d{3})+|\d+(?!,\d{3}))"  # 1,234,567 or 1234
    r"(?:\.\d+)?(?:[eE][-+]?\d+)?"  # .56 and e-05
    r"(?![\w.]?\d)"  # not the start of a version such as 2.13.0
    r"|(?<![\w.])[-+]?\.\d+(?:[eE][-+]?\d+)?"  # .5
)
_SPACES = re.compile(r"[ \t]+")
_PADDED_NUMBER = re.compile(r"[ \t]*#[ \t]*")  # column padding grows and shrinks with a number's width
_MARKER = re.compile(r"#\s*NBVAL_TOLERANCE\s+([\w-]+)")


@dataclass(frozen=True)
class Mismatch:
    """Why a fresh output does not hold the stored one: a number outside its tolerance
    (``number=True``), or text."""

    stored: str
    fresh: str
    reason: str
    number: bool


def cell_kind(source: str) -> str:
    """The kind a notebook cell's source names in a line ``# NBVAL_TOLERANCE <kind>`` (``float`` if none).

    Raises ``ValueError`` for an unknown kind, for a cell naming two, and for a line that mentions
    ``NBVAL_TOLERANCE`` in any other form (a misspelt marker must not pass as ``float``).
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    kinds = []
    for line in source.splitlines():
        if "NBVAL_TOLERANCE" in line:
            marker = _MARKER.fullmatch(line.strip())
            if marker is None:
                raise ValueError(f"write a tolerance marker as a line '# NBVAL_TOLERANCE <kind>', got {line.strip()!r}")
            kinds.append(marker.group(1))
    if len(kinds) > 1:
        raise ValueError(f"a cell names one tolerance kind, this one names {kinds}")
    kind = kinds[0] if kinds else "float"
    check_choice("kind", kind, tuple(TOLERANCES))
    return kind


def _is_integer(number: str) -> bool:
    return not any(c in number for c in ".eE")


def _last_digit_unit(number: str) -> float:
    """The value of one unit in the last printed digit: 0.01 for '40.69', 1e-6 for '5.2e-05'."""
    mantissa, _, exponent = number.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def _value(number: str) -> float:
    return float(number.replace(",", ""))


def values_agree(kind: str, stored: float, fresh: float, unit: float = 0.0) -> bool:
    """Whether ``fresh`` holds ``stored`` as a measurement of ``kind``: within the kind's relative
    tolerance or ``unit`` (one unit in the last printed digit), whichever is larger.
    NaN agrees only with NaN, an infinity only with itself."""
    check_choice("kind", kind, tuple(TOLERANCES))
    if math.isnan(stored) or math.isnan(fresh):
        return math.isnan(stored) and math.isnan(fresh)
    if math.isinf(stored) or math.isinf(fresh):
        return stored == fresh
    # 1e-9: the unit itself is a rounded decimal (0.01 is not exact in binary)
    allowed = max(TOLERANCES[kind].rtol * max(abs(stored), abs(fresh)), unit * (1 + 1e-9))
    return abs(stored - fresh) <= allowed


def _skeleton(text: str) -> str:
    return _PADDED_NUMBER.sub("#", _SPACES.sub(" ", _NUMBER.sub("#", text)))


def compare_text(stored: str, fresh: str, kind: str = "float") -> list[Mismatch]:
    """Compare a fresh output text with the stored one by :data:`the rule <refimpl.reproducibility>`;
    an empty list means the fresh text holds every figure of the stored one."""
    check_choice("kind", kind, tuple(TOLERANCES))
    if stored == fresh:
        return []
    numbers = [_NUMBER.findall(text) for text in (stored, fresh)]
    if _skeleton(stored) != _skeleton(fresh) or len(numbers[0]) != len(numbers[1]):
        return [Mismatch(stored, fresh, "the text around the numbers differs", number=False)]
    mismatches = []
    for a, b in zip(*numbers):
        if a == b:
            continue
        if _is_integer(a) or _is_integer(b):
            mismatches.append(Mismatch(a, b, "an integer must be equal", number=True))
        elif not values_agree(kind, _value(a), _value(b), min(_last_digit_unit(a), _last_digit_unit(b))):
            mismatches.append(Mismatch(a, b, f"differs by more than the {kind!r} tolerance "
                                             f"({TOLERANCES[kind].rtol:g} relative) and one unit in the last digit",
                                       number=True))
    return mismatches
