"""The registry of the effects table: one :class:`Row` per method (or combination) at its chapter's
settings, and the implemented methods of the taxonomy that are not a row, with the reason."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from refimpl import reproducibility
from refimpl.attention import gqa
from refimpl.effects import recipes
from refimpl.effects.context import Applied, Context
from refimpl.effects.protocol import DEFAULT_PROTOCOL
from refimpl.quantization import qat

FAMILIES = ("baseline", "quantization", "pruning", "distillation", "architecture")


@dataclass(frozen=True)
class Row:
    """One row of the table: a method (or a combination) at its chapter's settings."""

    id: str
    methods: tuple[str, ...]  # taxonomy ids it applies (() for the baseline)
    family: str
    chapter: str
    settings: str
    apply: Callable[[nn.Module, Context], Applied]  # a recipe (refimpl.effects.recipes)
    evaluated: str  # what the row's model stores and computes (what is measured and timed)
    kernel: str  # what would turn it into speed
    calibration: str = ""  # calibration data it needs ("" none)
    training: str = ""  # training it needs ("" none)
    starts_from: "Row | None" = None  # a combination: the row whose result its recipe continues from
    kv_bits: int | None = None  # the KV cache quantized to this many bits while measured
    rounds_activations: bool = False  # its layers quantize their inputs on every call
    trained_far: bool = False  # trained tens of steps from a destroyed model: figures hold to a sixth

    @property
    def method(self) -> str:
        return "+".join(self.methods) if self.methods else "dense"

    @property
    def combination(self) -> bool:
        return self.starts_from is not None

    @property
    def tolerance(self) -> str:
        """The kind of its perplexities (:mod:`refimpl.reproducibility`), the widest that applies: every
        method passes its weights through a discrete choice (a grid, a mask, a search), and GPTQ and
        SparseGPT also carry it from layer to layer (sequential calibration); a row that trains
        carries every difference in the arithmetic through its updates; one that rounds activations or
        the KV cache does so again in every forward pass (``trained_far``: a training that starts from
        a destroyed model moves further still). The dense model is plain float arithmetic."""
        kinds = ["float"]
        if self.methods:
            kinds.append("sequential" if {"gptq", "sparsegpt"} & set(self.methods) else "grid")
        if self.training:
            kinds.append("long-training" if self.trained_far else "trained")
        if self.kv_bits is not None or self.rounds_activations:
            kinds.append("activations")
        return max(reversed(kinds), key=lambda kind: reproducibility.TOLERANCES[kind].rtol)  # ties: the later

    def during(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The context the row's model is measured in (a quantized KV cache)."""
        if self.kv_bits is None:
            return contextlib.nullcontext()
        from refimpl.quantization import kv_cache

        return kv_cache.kv_quantization(model, self.kv_bits)


def _tokens(seq_len_blocks: tuple[int, int]) -> str:
    seq_len, n_blocks = seq_len_blocks
    return f"{n_blocks}×{seq_len} tokens per corpus"


_p = functools.partial
_G = recipes.GROUP
_PTQ = _tokens(DEFAULT_PROTOCOL.ptq_calibration) + " (statistics of the float model)"
_LAYER_BY_LAYER = " (layer by layer, each on the outputs of the already {} layers)"
_GPTQ = _tokens(DEFAULT_PROTOCOL.ptq_calibration) + _LAYER_BY_LAYER.format("quantized")
_PRUNING = _tokens(DEFAULT_PROTOCOL.pruning_calibration) + _LAYER_BY_LAYER.format("pruned")
_IMPORTANCE = f"2×{DEFAULT_PROTOCOL.importance_tokens} tokens (importance scores)"
_UPTRAINING = f"{gqa.UPTRAINING.steps} steps × 2×128 calibration tokens"  # gqa.uptraining_recipe
_RECOVERY = (f"{recipes.RECOVERY.steps} steps × 2×{recipes.RECOVERY_SEQ_LEN} calibration tokens (LoRA, rank "
             f"{recipes.RECOVERY_RANK})")
_STUDENT_TRAINING = "8 steps × 2×128 calibration tokens, the teacher run on every batch"
_INT4 = "int4 weight-only GEMM (e.g. tinygemm, Marlin)"
_PACKED4 = "packed 4-bit codes + fp16 scales and zero-points (QuantizedLinear), dequantized on every call"
_W8A8 = ("simulated: float32 weights on the int8 grid, inputs fake-quantized on every call; bytes of the int8 "
         "weights packed (packed.packed_size)")
_DENSE_ZEROS = "float32, zeros stored densely (no sparse format)"
_SPARSE = "sparse GEMM (pays only at much higher sparsity)"
_TWO_FOUR = "2:4 sparse tensor cores (NVIDIA Ampere+, fp16/bf16)"
_SMALLER = "none: an ordinary smaller dense model"
_HALF = f"{recipes.SPARSITY:.0%}".replace("%", " %")

SPARSEGPT_50 = Row(
    id="sparsegpt-50", methods=("sparsegpt",), family="pruning", chapter="05",
    settings=f"{_HALF}, adaptive masks per 128 columns, OBS reconstruction, damp 0.01",
    apply=_p(recipes.sparsegpt_, nm=None), evaluated=_DENSE_ZEROS, kernel=_SPARSE, calibration=_PRUNING)
LLM_PRUNER_LORA = Row(
    id="llm-pruner-mlp-lora", methods=("llm-pruner", "lora-recovery"), family="pruning", chapter="05",
    settings=f"as llm-pruner-mlp, then LoRA recovery: rank {recipes.RECOVERY_RANK} on every projection, "
             f"{recipes.RECOVERY.steps} steps × 2×{recipes.RECOVERY_SEQ_LEN} calibration tokens, AdamW lr "
             f"{recipes.RECOVERY.lr:g}, merged",
    apply=_p(recipes.mlp_channels, recover=True), evaluated="float32, smaller matrices", kernel=_SMALLER,
    calibration=_IMPORTANCE, training=_RECOVERY)
KD_STUDENT = Row(
    id="kd-student", methods=("classic-kd",), family="distillation", chapter="06",
    settings="student of the 16 of 30 layers with the highest block influence (8/15 of the layers), trained "
             "online with forward KL, 8 steps × 2×128 tokens, AdamW lr 5e-4 (chapter 06's cached student)",
    apply=recipes.student, evaluated="float32, fewer layers", kernel=_SMALLER, calibration=_IMPORTANCE,
    training=_STUDENT_TRAINING)
MQA = Row(
    id="mqa", methods=("mqa",), family="architecture", chapter="07",
    settings=f"key-value heads mean-pooled to one (GQA -> MQA), then the k/v projections uptrained {_UPTRAINING}, "
             f"AdamW lr {gqa.UPTRAINING.lr:g}",
    apply=recipes.mqa, evaluated="float32, one key-value head", kernel="none (a smaller KV cache)",
    training=f"{_UPTRAINING} (k/v projections only)", trained_far=True)

ROWS: tuple[Row, ...] = (
    Row(id="dense", methods=(), family="baseline", chapter="01", settings="float32 weights and KV cache",
        apply=recipes.dense, evaluated="float32 (torch.nn.Linear)", kernel="dense GEMM"),
    # Quantization: chapters 02-04.
    Row(id="rtn-w8", methods=("rtn",), family="quantization", chapter="02",
        settings="8-bit asymmetric round-to-nearest, one scale per output channel",
        apply=_p(recipes.rtn, bits=8, group_size=None),
        evaluated="packed 8-bit codes + fp16 scales, dequantized on every call", kernel="int8 weight-only GEMM"),
    Row(id=f"rtn-w4g{_G}", methods=("rtn",), family="quantization", chapter="02",
        settings=f"4-bit asymmetric round-to-nearest, groups of {_G}", apply=_p(recipes.rtn, bits=4, group_size=_G),
        evaluated=_PACKED4, kernel=_INT4),
    Row(id="nf4", methods=("nf4",), family="quantization", chapter="02",
        settings=f"NF4 in blocks of {_G}, double-quantized absmax (QLoRA's storage)", apply=recipes.nf4,
        evaluated="packed NF4 codes + 8-bit absmax (CodeBookLinear), dequantized on every call",
        kernel="NF4 dequantizing GEMM (bitsandbytes)"),
    Row(id=f"gptq-w4g{_G}", methods=("gptq",), family="quantization", chapter="03",
        settings=f"4-bit asymmetric, groups of {_G}; act-order (static groups), damp 0.01, blocks of 128 columns",
        apply=recipes.gptq_w4, evaluated=_PACKED4, kernel=_INT4, calibration=_GPTQ),
    Row(id=f"awq-w4g{_G}", methods=("awq",), family="quantization", chapter="03",
        settings=f"4-bit asymmetric, groups of {_G}; per-channel scales searched over 20 exponents (each layer's "
                 "output error), then the clipping search",
        apply=recipes.awq_w4, evaluated=_PACKED4 + ", input scales", kernel=_INT4, calibration=_PTQ),
    Row(id="llm-int8", methods=("llm-int8",), family="quantization", chapter="03",
        settings="int8 vector-wise (absmax per row of X and column of W); input dimensions with |x| >= 6 kept in "
                 "float", apply=recipes.llm_int8_,
        evaluated="int8 codes + float32 scales (Int8Linear); the int8 product computed in float32",
        kernel="int8 GEMM + outlier GEMM (bitsandbytes)", rounds_activations=True),
    Row(id="smoothquant-w8a8", methods=("smoothquant",), family="quantization", chapter="03",
        settings="alpha 0.8, smoothing folded into the norms (q/k/v, gate/up) and into up_proj (down_proj); int8 "
                 "symmetric weights per channel, int8 inputs per tensor (dynamic)",
        apply=recipes.smoothquant_w8a8, evaluated=_W8A8, kernel="int8 x int8 GEMM", calibration=_PTQ,
        rounds_activations=True),
    Row(id="zeroquant-w8a8", methods=("zeroquant",), family="quantization", chapter="03",
        settings=f"int8 symmetric weights in groups of {_G}, int8 inputs per token (dynamic)",
        apply=recipes.zeroquant_w8a8, evaluated=_W8A8, kernel="int8 x int8 GEMM with group-wise scales",
        rounds_activations=True),
    Row(id=f"llm-qat-w{recipes.QAT_BITS}g{_G}", methods=("llm-qat", "fake-quant-ste"), family="quantization",
        chapter="04",
        settings=f"{recipes.QAT_BITS}-bit asymmetric, groups of {_G}; {qat.DISTILLATION.steps} steps of forward KL "
                 f"to the float model (straight-through estimator), AdamW lr {qat.DISTILLATION.lr:g}, "
                 f"2×{qat.DISTILLATION_SEQ_LEN} tokens per step, only the quantized layers' weights trained",
        apply=recipes.llm_qat, evaluated=f"packed {recipes.QAT_BITS}-bit codes + fp16 scales and zero-points "
                                         "(QuantizedLinear), dequantized on every call",
        kernel=f"int{recipes.QAT_BITS} weight-only GEMM",
        training=f"{qat.DISTILLATION.steps} steps × 2×{qat.DISTILLATION_SEQ_LEN} calibration tokens, the float "
                 "model as teacher"),
    Row(id="kv-int8", methods=("kv-cache-quantization",), family="quantization", chapter="03",
        settings="KIVI int8 KV cache: keys per channel in groups of 32 tokens, values per token, no float window; "
                 "weights float32", apply=recipes.unchanged,
        evaluated="float32 weights; keys and values fake-quantized in every attention call",
        kernel="attention over a packed int8 cache", kv_bits=8),
    # Pruning: chapter 05.
    Row(id="magnitude-50", methods=("magnitude-pruning",), family="pruning", chapter="05",
        settings=f"{_HALF} of each decoder linear layer, smallest |w|", apply=_p(recipes.magnitude_, nm=None),
        evaluated=_DENSE_ZEROS, kernel=_SPARSE),
    Row(id="magnitude-2of4", methods=("magnitude-pruning", "nm-sparsity"), family="pruning", chapter="05",
        settings="2:4 (two of every four consecutive weights of a row), smallest |w|",
        apply=_p(recipes.magnitude_, nm=(2, 4)), evaluated=_DENSE_ZEROS, kernel=_TWO_FOUR),
    Row(id="wanda-50", methods=("wanda",), family="pruning", chapter="05",
        settings=f"{_HALF} per output row by |w|·||x||", apply=_p(recipes.wanda_, nm=None), evaluated=_DENSE_ZEROS,
        kernel=_SPARSE, calibration=_PRUNING),
    Row(id="wanda-2of4", methods=("wanda", "nm-sparsity"), family="pruning", chapter="05",
        settings="2:4 by |w|·||x||", apply=_p(recipes.wanda_, nm=(2, 4)), evaluated=_DENSE_ZEROS, kernel=_TWO_FOUR,
        calibration=_PRUNING),
    SPARSEGPT_50,
    Row(id="sparsegpt-2of4", methods=("sparsegpt", "nm-sparsity"), family="pruning", chapter="05",
        settings="2:4, OBS reconstruction, damp 0.01", apply=_p(recipes.sparsegpt_, nm=(2, 4)),
        evaluated=_DENSE_ZEROS, kernel=_TWO_FOUR, calibration=_PRUNING),
    Row(id="llm-pruner-mlp", methods=("llm-pruner",), family="pruning", chapter="05",
        settings=f"{recipes.MLP_KEPT * 3:.0f}/3 of the MLP channels of every layer kept, a multiple of {_G} "
                 "(SmolLM2: 1024 of 1536), by first-order Taylor importance; no recovery",
        apply=_p(recipes.mlp_channels, recover=False), evaluated="float32, smaller matrices", kernel=_SMALLER,
        calibration=_IMPORTANCE),
    LLM_PRUNER_LORA,
    Row(id="shortgpt-depth", methods=("shortgpt",), family="pruning", chapter="05",
        settings="the tenth of the layers with the lowest block influence removed (SmolLM2: 27 of 30 kept)",
        apply=recipes.depth, evaluated="float32, fewer layers", kernel=_SMALLER, calibration=_IMPORTANCE),
    Row(id="head-pruning-kv-group", methods=("head-pruning",), family="pruning", chapter="05",
        settings="one key-value group and its query heads removed in every layer by activation importance "
                 "(SmolLM2: 2 of 3 groups kept)",
        apply=recipes.kv_group, evaluated="float32, smaller attention", kernel=_SMALLER, calibration=_IMPORTANCE),
    # Distillation: chapter 06. Architecture: chapter 07.
    KD_STUDENT,
    MQA,
    # Combinations: each continues from the result of the row it starts from.
    Row(id=f"sparsegpt-50+gptq-w4g{_G}", methods=("sparsegpt", "gptq"), family="pruning+quantization",
        chapter="03, 05", starts_from=SPARSEGPT_50,
        settings=f"sparsegpt-50, then gptq-w4g{_G} calibrated on the pruned model; the pruned weights restored to "
                 "zero (zero is on every grid)",
        apply=recipes.gptq_w4_keeping_zeros, evaluated=_PACKED4 + "; half of them zero",
        kernel="sparse int4 GEMM (none common)",
        calibration=_PRUNING + "; then " + _GPTQ),
    Row(id=f"llm-pruner-mlp-lora+gptq-w4g{_G}", methods=("llm-pruner", "lora-recovery", "gptq"),
        family="pruning+quantization", chapter="03, 05", starts_from=LLM_PRUNER_LORA,
        settings=f"llm-pruner-mlp-lora, then gptq-w4g{_G} calibrated on the pruned model",
        apply=recipes.gptq_w4, evaluated=_PACKED4, kernel=_INT4,
        calibration=_IMPORTANCE + "; then " + _GPTQ, training=_RECOVERY),
    Row(id=f"kd-student+gptq-w4g{_G}", methods=("classic-kd", "gptq"), family="distillation+quantization",
        chapter="03, 06", starts_from=KD_STUDENT,
        settings=f"kd-student, then gptq-w4g{_G} calibrated on the student",
        apply=recipes.gptq_w4, evaluated=_PACKED4, kernel=_INT4,
        calibration=_IMPORTANCE + "; then " + _GPTQ, training=_STUDENT_TRAINING),
    Row(id="mqa+kv-int8", methods=("mqa", "kv-cache-quantization"), family="architecture+quantization",
        chapter="03, 07", starts_from=MQA, settings="mqa with the kv-int8 cache", apply=recipes.unchanged,
        evaluated="float32, one key-value head; keys and values fake-quantized in every attention call",
        kernel="attention over a packed int8 cache", training=f"{_UPTRAINING} (k/v projections only)", kv_bits=8,
        trained_far=True),
)

#: Implemented methods of the taxonomy that are not a row of the table, and why (a method may be listed
#: before its chapter implements it).
NOT_A_ROW: dict[str, str] = {
    "uniform-affine": "the grid every quantization row uses (rtn-w8, rtn-w4g64)",
    "quantization-granularity": "a setting of the quantization rows (per channel at 8 bits, groups of 64 at 4)",
    "static-dynamic-ranges": "a setting of the W8A8 rows (dynamic ranges: per tensor in smoothquant-w8a8, "
                             "per token in zeroquant-w8a8)",
    "number-formats": "the format rows: nf4 and the integer rows",
    "fp8": "refimpl has no model-level FP8 storage; chapter 02 measures its rounding error on one layer",
    "kbit-scaling-laws": "an analysis over rows (perplexity against bytes), not a method",
    "zeroquant-lkd": "chapter 04 measures it at the chapter's 3-bit grid against RTN and QAT; not part of "
                     "this table yet",
    "qlora": "fine-tuning a quantized model, not compression: its stored model is the nf4 row "
             "(chapter 04 measures the fine-tune)",
    "minillm": "the kd-student trained with reverse KL; chapter 06 compares the objectives (not cached)",
    "gkd": "three on-policy steps on top of the kd-student; chapter 06 measures them (not cached)",
    "sequence-level-kd": "the kd-student row is the table's distilled student (token-level, online); chapter 06 "
                         "trains on the teacher's greedy answers (not cached)",
    "instruction-distillation": "fine-tuning on a teacher's answers (chapter 06): what a student learns, "
                                "not compression",
    "hallucination-inheritance": "an effect of instruction distillation (chapter 06), not a compression method",
    "distilling-step-by-step": "training on a teacher's rationales for a task (chapter 06): what a student "
                               "learns, not compression",
    "kv-cache": "every row's decode timing uses it",
    "gqa": "the baseline is a GQA model (SmolLM2: 3 key-value heads); the mqa row converts it further",
    "flashattention": "an attention kernel computing the same function: perplexity unchanged, and refimpl's "
                      "tiling runs in Python; refimpl.bench measures SDPA's flash kernel on a GPU",
    "flashattention-2": "as flashattention",
    "pagedattention": "memory management of many sequences' caches: a single sequence shows nothing "
                      "(chapter 07 simulates serving)",
    "sliding-window-attention": "a bounded cache changes only contexts longer than its window; the table's "
                                "512-token blocks would not show it (chapter 07 measures 1,024 tokens)",
    "streamingllm": "as sliding-window-attention",
    "speculative-decoding": "a decoding algorithm with the target's own output: its effect is speed alone, "
                            "measured in chapter 08; not part of this table yet",
    "self-speculative-decoding": "as speculative-decoding",
    "calm": "a decoding rule that changes the output per token with its threshold: its quality and layers "
            "per token are measured in chapter 08 on generated text, which this table's perplexity does not see",
}

ROW_IDS = tuple(row.id for row in ROWS)
DEFAULT_CHECK_ROWS = ("rtn-w4g64", "wanda-50", "mqa")  # one quantization, one pruning, one architecture row


def row(row_id: str) -> Row:
    """The row with id ``row_id``; ``ValueError`` naming the valid ids otherwise."""
    for candidate in ROWS:
        if candidate.id == row_id:
            return candidate
    raise ValueError(f"unknown row {row_id!r}: valid row ids are {list(ROW_IDS)}")


def select_rows(methods: Sequence[str] | str | None) -> list[Row]:
    """The rows to run, in registry order, always with the ``dense`` baseline first. ``methods`` holds
    row ids, taxonomy ids (every single-method row that applies it) or families; ``None``: all rows."""
    if methods is None:
        return list(ROWS)
    if isinstance(methods, str):
        methods = [m for m in methods.split(",") if m.strip()]
    tokens = [m.strip() for m in methods]
    if not tokens:
        raise ValueError("methods is empty: give row ids, taxonomy ids or families, or None for all rows")
    chosen: set[str] = {"dense"}
    for token in tokens:
        matches = [r.id for r in ROWS if token == r.id or token == r.family
                   or (not r.combination and token in r.methods)]
        if not matches:
            taxonomy_ids = sorted({m for r in ROWS for m in r.methods})
            raise ValueError(f"unknown method {token!r}: valid row ids are {list(ROW_IDS)}; taxonomy ids "
                             f"{taxonomy_ids}; families {sorted({r.family for r in ROWS})}")
        chosen.update(matches)
    return [r for r in ROWS if r.id in chosen]
