r"""The effects table: every method of the book applied to one model and measured the same way.

Run ``python -m refimpl effects --model smollm2-135m --out results/effects`` (``--methods a,b,...``
for some rows, ``--device cuda``, ``--train`` to train what is not cached, ``--list`` for the rows,
``--check TABLE.csv`` to recompute a sample of a written table). Each row of the registry
(:data:`ROWS`) applies one method — or a combination — at the settings its chapter recommends to a
fresh copy of the same model, by calling the chapter's ``refimpl`` functions, and measures:

- **weight bytes** actually stored (:func:`refimpl.evaluate.model_bytes` of the model the row evaluates:
  real packed codes and scales where refimpl has a packed format; :func:`refimpl.quantization.packed.packed_size`
  of the weight grid where the row evaluates a simulated model — the W8A8 rows);
- **perplexity** on both corpora (:data:`refimpl.data.CORPORA`) on the blocks the chapters use: the first 2
  of the 8 standard 256-token evaluation blocks of each corpus;
- **KV-cache bytes per token** of one 256-token block (packed where the row quantizes the cache), and the
  measured fraction of zero weights in the decoder layers;
- **prefill and decode throughput** on this machine (chapter 05's protocol: prefill of 64 tokens, 8 greedy
  tokens after a 32-token prompt, here in 3 rounds), each timed in alternation with the dense model
  (:func:`refimpl.evaluate.side_by_side`), so that the speed-up over dense survives a change in the
  machine's load. The speed is that of the model the row measures, as refimpl stores and computes it:
  packed layers dequantize their weights on every call and W8A8 is simulated in float32, so without
  the low-bit kernel the ``needs_kernel`` column names, quantization costs time here instead of saving it;
- **cost**: wall-clock seconds to apply the method (training included) and, separately, to capture the
  calibration data it uses (statistics and importance scores are captured once and shared by the rows
  that use them, but every such row is charged their full time);
- **what it needs**: calibration data, training, and the kernel that would turn it into speed.

Rows are independent: each starts from a fresh copy of the model with the random seeds reset, so a row
recomputed alone (:func:`check_table`) gives the figures of the full run. Results go to
``<out>/<model>.csv``, ``<out>/<model>.md`` and ``<out>/<model>.json`` (provenance: command, git commit,
machine and CPU, library versions, date, the protocol), rewritten after every row. A row already in the
CSV for the same model, row, settings and *key* — a hash of the protocol, the row's recipe, the source of
the refimpl modules it calls and the library versions — is not measured again, so an interrupted run
resumes where it stopped and a change to a method's code re-measures exactly its rows.

Combinations start from the result of the rows they extend (``Row.reuses``); when both run, that
result is made once, and the combination is charged its seconds. A model quantized after unstructured
pruning keeps its pruned weights at zero (:func:`_restore_zeros`: GPTQ's updates would otherwise fill them).

Methods of the taxonomy that are not a row say why in :data:`NOT_A_ROW` (kernels that compute the same
function, decoding algorithms, analyses). Speculative decoding, whose effect is speed at unchanged output,
is measured in chapter 08 and is not part of this table yet.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime as _dt
import functools
import gc
import hashlib
import importlib.util
import inspect
import io
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from refimpl import anatomy, calibration, data, evaluate, reproducibility, runtime, training
from refimpl._rollback import private_copy
from refimpl._validation import check_token_ids, vocabulary_size
from refimpl.attention import gqa
from refimpl.pruning import masks
from refimpl.runtime import progress

FAMILIES = ("baseline", "quantization", "pruning", "distillation", "architecture")

#: GPTQ's weight on the first token of every calibration block (chapter 03's attention-sink weighting).
SINK_WEIGHT = 512.0


# --- the protocol -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """How every row is measured (the chapters' protocol). Tests shrink it for tiny models."""

    eval_seq_len: int = 256  # the standard evaluation blocks ...
    eval_n_blocks: int = 8  # ... of which the quantization and pruning chapters score
    eval_use: int = 2  # the first 2 per corpus
    ptq_calibration: tuple[int, int] = (512, 4)  # (tokens, blocks) per corpus: chapter 03
    pruning_calibration: tuple[int, int] = (512, 3)  # chapter 05
    importance_tokens: int = 256  # chapter 05: structure importance on one block of this many per corpus
    prefill_tokens: int = 64  # chapter 05's speed protocol
    decode_prompt: int = 32
    decode_tokens: int = 8
    timing_rounds: int = 3
    timing_warmup_rounds: int = 1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Protocol":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"protocol has unknown fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


DEFAULT_PROTOCOL = Protocol()


class RowSkipped(Exception):
    """Raised by a recipe that cannot run here (e.g. it needs training that was not allowed); the
    message is the reason written to the table."""


# --- the context a recipe sees ------------------------------------------------------------------


class Context:
    """What every recipe may use: the unmodified model (``base``, never changed), its tokenizer, the
    protocol, and calibration data made once and shared by the rows (statistics, importance scores,
    intermediate models), with the seconds each took."""

    def __init__(self, model: nn.Module, tokenizer: Any, model_name: str, protocol: Protocol = DEFAULT_PROTOCOL,
                 train: bool = False):
        self.base, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.protocol, self.train = protocol, train
        self.device = evaluate.model_device(model)
        self._shared: dict[str, tuple[Any, float]] = {}
        self._models: dict[str, tuple[nn.Module, float, float, set[str]]] = {}
        self.keep_for_reuse: set[str] = set()  # the steps (row ids) a later row of the run reuses
        self.begin_row()

    def begin_row(self) -> None:
        """Reset the per-row bookkeeping and the random seeds: every row starts from the same state."""
        random.seed(0)
        torch.manual_seed(0)
        self._row_keys: set[str] = set()
        self.calibration_s = 0.0  # calibration this row uses (shared captures at their full cost)
        self.reused_apply_s = 0.0  # recipe steps this row reuses from an earlier row, at their cost
        self.excluded_s = 0.0  # seconds spent in this row on calibration and on steps counted above
        self.stored_bytes: int | None = None  # set by recipes that evaluate a simulated model
        self.apply_s_override: float | None = None
        self.notes: list[str] = []

    # Token blocks.
    @functools.cached_property
    def eval_blocks(self) -> dict[str, torch.Tensor]:
        p = self.protocol
        return {name: data.token_blocks(self.tokenizer, data.load_text(name, "evaluation"), p.eval_seq_len,
                                        p.eval_n_blocks)[:p.eval_use] for name in data.CORPORA}

    def calibration_blocks(self, seq_len: int, n_blocks: int) -> dict[str, torch.Tensor]:
        """``n_blocks`` blocks of ``seq_len`` tokens from the calibration split of each corpus."""
        return {name: data.token_blocks(self.tokenizer, data.load_text(name, "calibration"), seq_len, n_blocks)
                for name in data.CORPORA}

    # Calibration: timed, charged to calibration_s.
    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per run on the unmodified model and reused; every row that uses it is
        charged its seconds as calibration."""
        if key not in self._shared:
            start = time.perf_counter()
            value = make()
            seconds = time.perf_counter() - start
            self._shared[key] = (value, seconds)
            self.excluded_s += seconds
        self._charge(key)
        return self._shared[key][0]

    def _charge(self, key: str) -> None:
        if key not in self._row_keys:
            self._row_keys.add(key)
            self.calibration_s += self._shared[key][1]

    def calibrate(self, make: Callable[[], Any]) -> Any:
        """``make()`` now, for this row only (calibration on a model the row changed), charged as calibration."""
        start = time.perf_counter()
        value = make()
        seconds = time.perf_counter() - start
        self.calibration_s += seconds
        self.excluded_s += seconds
        return value

    def statistics(self, which: str, model: nn.Module | None = None) -> dict[str, calibration.InputStatistics]:
        """Input statistics of every decoder linear layer on chapter 03's (``"ptq"``) or chapter 05's
        (``"pruning"``) calibration blocks of both corpora, combined: of the unmodified model (shared),
        or of ``model`` (a row's changed model, captured for that row)."""
        seq_len, n_blocks = {"ptq": self.protocol.ptq_calibration,
                             "pruning": self.protocol.pruning_calibration}[which]

        def capture(m: nn.Module) -> dict[str, calibration.InputStatistics]:
            blocks = self.calibration_blocks(seq_len, n_blocks)
            return calibration.combine_statistics(*(calibration.input_statistics(m, b) for b in blocks.values()))

        if model is None:
            return self.shared(f"statistics-{which}", lambda: capture(self.base))
        return self.calibrate(lambda: capture(model))

    def importance(self, kind: str):
        """Chapter 05's structure importance of the unmodified model (``"taylor"`` or ``"activation"``) on
        the first ``importance_tokens`` tokens of the first pruning calibration block of each corpus."""
        from refimpl.pruning import structured

        def make():
            seq_len, n_blocks = self.protocol.pruning_calibration
            blocks = torch.cat([b[:1, :self.protocol.importance_tokens]
                                for b in self.calibration_blocks(seq_len, n_blocks).values()])  # [2, tokens]
            if kind == "taylor":
                return structured.taylor_importance(self.base, blocks, batch_size=2)
            return structured.activation_importance(self.base, blocks)

        return self.shared(f"importance-{kind}", make)

    # Recipe steps shared between rows (a part of a combination): reused as a copy, charged as apply time.
    def reuse(self, key: str, model: nn.Module, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """``make(model)``, or a copy of what it returned when an earlier row of this run made it (the
        steps are deterministic; the result of row ``key``'s recipe, kept when ``key`` is in
        :attr:`keep_for_reuse`). The row is charged the seconds ``make`` took as apply time, and the
        calibration it used as calibration."""
        if key not in self._models:
            keys_before, calibration_before = set(self._row_keys), self.calibration_s
            excluded_before, start = self.excluded_s, time.perf_counter()
            made = make(model)
            apply_s = time.perf_counter() - start - (self.excluded_s - excluded_before)
            keys = self._row_keys - keys_before
            own_calibration_s = self.calibration_s - calibration_before - sum(self._shared[k][1] for k in keys)
            if key in self.keep_for_reuse:
                self._models[key] = (copy.deepcopy(made), apply_s, own_calibration_s, keys)
            return made
        made, apply_s, own_calibration_s, keys = self._models[key]
        self.reused_apply_s += apply_s
        self.calibration_s += own_calibration_s
        for k in keys:
            self._charge(k)
        return copy.deepcopy(made)

    def release(self) -> None:
        """Forget the shared data and models (memory)."""
        self._shared.clear()
        self._models.clear()


# --- the recipes ----------------------------------------------------------------------------------
# Each takes a fresh copy of the model and the context and returns the model to measure. They call the
# chapters' refimpl functions with the chapters' settings; nothing here re-implements a method.


def _dense(model: nn.Module, ctx: Context) -> nn.Module:
    return model


def _rtn(model: nn.Module, ctx: Context, bits: int, group_size: int | None) -> nn.Module:
    from refimpl.quantization import packed

    return packed.pack_model(model, bits, False, "channel" if group_size is None else "group", group_size)


def _nf4(model: nn.Module, ctx: Context) -> nn.Module:
    from refimpl.quantization import formats, packed

    return packed.pack_model_code_book(model, formats.NF4_CODE, 64, double_quant=True)


def _gptq(model: nn.Module, ctx: Context, statistics: str | None = "ptq") -> nn.Module:
    """GPTQ 4-bit g64, sink weighted (chapter 03), packed; ``statistics=None``: captured on ``model``."""
    from refimpl.quantization import gptq

    stats = ctx.statistics("ptq", None if statistics else model)
    return gptq.quantize_model_gptq(model, None, 4, group_size=64, statistics=stats, first_token_weight=SINK_WEIGHT,
                                    pack=True)


def _awq(model: nn.Module, ctx: Context) -> nn.Module:
    from refimpl.quantization import awq

    return awq.quantize_model_awq(model, None, 4, group_size=64, statistics=ctx.statistics("ptq"), n_grid=10,
                                  pack=True)


def _llm_int8(model: nn.Module, ctx: Context) -> nn.Module:
    from refimpl.quantization import llm_int8

    return llm_int8.quantize_model_int8(model)


def _smoothquant(model: nn.Module, ctx: Context) -> nn.Module:
    from refimpl.quantization import activation, packed, smoothquant

    smoothed = smoothquant.smooth_model(model, None, 0.8, smooth_down_proj=True, statistics=ctx.statistics("ptq"))
    ctx.stored_bytes = packed.packed_size(smoothed, 8, True, "channel", None)  # the int8 weights as stored
    return activation.quantize_model_w8a8(smoothed, act_granularity="tensor")


def _zeroquant(model: nn.Module, ctx: Context) -> nn.Module:
    from refimpl.quantization import packed, zeroquant

    ctx.stored_bytes = packed.packed_size(model, 8, True, "group", 64)  # the int8 weights as stored
    return zeroquant.quantize_model_zeroquant(model, 8, 64, 8)


def _qat(model: nn.Module, ctx: Context) -> nn.Module:
    """Chapter 04: 3-bit g64 QAT, 7 steps of forward KL to the float model on real calibration text."""
    from refimpl.distillation.losses import forward_kl
    from refimpl.quantization import qat

    steps, teacher = 7, ctx.base
    text = torch.cat([data.token_blocks(ctx.tokenizer, data.load_text(name, "calibration"), 128, steps)
                      for name in data.CORPORA])  # [2 * steps, 128]
    model.requires_grad_(False)  # only the latent weights of the quantized layers train
    student = qat.prepare_qat(model, 3, group_size=64)

    def loss(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(ctx.device)
        with torch.no_grad():
            teacher_logits = teacher(batch).logits
        return forward_kl(m(batch).logits, teacher_logits)

    with evaluate.eval_mode(teacher):
        training.train(student, [text[i::steps] for i in range(steps)], loss,
                       training.TrainConfig(steps=steps, lr=3e-4, warmup_steps=1), desc="QAT")
    return qat.convert_qat(student, pack=True)


def _kv_only(model: nn.Module, ctx: Context) -> nn.Module:
    return model  # the row's kv_bits quantize the cache while it is measured


def _magnitude(model: nn.Module, ctx: Context, nm: tuple[int, int] | None) -> nn.Module:
    from refimpl.pruning import magnitude

    return magnitude.prune_model_magnitude(model, 0.5, nm=nm)


def _wanda(model: nn.Module, ctx: Context, nm: tuple[int, int] | None) -> nn.Module:
    from refimpl.pruning import wanda

    return wanda.prune_model_wanda(model, None, 0.5, nm=nm, statistics=ctx.statistics("pruning"))


def _sparsegpt(model: nn.Module, ctx: Context, nm: tuple[int, int] | None) -> nn.Module:
    from refimpl.pruning import sparsegpt

    def make(m: nn.Module) -> nn.Module:
        return sparsegpt.prune_model_sparsegpt(m, None, 0.5, nm=nm, statistics=ctx.statistics("pruning"))

    return ctx.reuse("sparsegpt-50" if nm is None else "sparsegpt-2of4", model, make)


def _mlp_channels(model: nn.Module, ctx: Context, recover: bool) -> nn.Module:
    """Chapter 05: keep 2/3 of the MLP channels by Taylor importance; then, if ``recover``, LoRA recovery
    (rank 8, 4 steps)."""
    from refimpl.pruning import structured

    # 2/3 of the channels, in whole groups of 64 so that the 4-bit rows can quantize the result.
    keep = 64 * max(1, round(model.config.intermediate_size * 2 / 3 / 64))
    ctx.notes.append(f"{keep} of {model.config.intermediate_size} MLP channels kept")

    def make(m: nn.Module) -> nn.Module:
        structured.prune_structured(m, ctx.importance("taylor"), intermediate_size=keep)
        if recover:
            seq_len, n_blocks = ctx.protocol.pruning_calibration
            text = torch.cat([b.reshape(-1, 128) for b in ctx.calibration_blocks(seq_len, n_blocks).values()])
            structured.recover(m, text, training.TrainConfig(steps=4, lr=1e-3, warmup_steps=1), r=8, batch_size=2)
        return m

    return ctx.reuse("llm-pruner-mlp-lora" if recover else "llm-pruner-mlp", model, make)


def _depth(model: nn.Module, ctx: Context) -> nn.Module:
    from refimpl.pruning import structured

    n_layers = model.config.num_hidden_layers
    keep = n_layers - max(1, round(n_layers / 10))
    ctx.notes.append(f"{keep} of {n_layers} layers kept")
    return structured.prune_structured(model, ctx.importance("activation"), n_layers=keep)


def _kv_group(model: nn.Module, ctx: Context) -> nn.Module:
    from refimpl.pruning import structured

    n_kv = anatomy.attention_shape(model.config).n_kv_heads
    if n_kv < 2:
        raise RowSkipped(f"the model has {n_kv} key-value group: none can be removed")
    ctx.notes.append(f"{n_kv - 1} of {n_kv} key-value groups kept")
    return structured.prune_structured(model, ctx.importance("activation"), n_kv_heads=n_kv - 1)


def student_name(model_name: str) -> str:
    """The cache name of a model's distilled student (``smollm2-kd``: chapter 06's name for SmolLM2's)."""
    return "smollm2-kd" if model_name == "smollm2-135m" else f"{table_stem(model_name)}-kd"


def _student(model: nn.Module, ctx: Context) -> nn.Module:
    """Chapter 06's distilled student: from the cache, or trained now when the run allows training."""
    from refimpl.distillation import cache

    n_layers = max(1, round(model.config.num_hidden_layers * 16 / 30))  # SmolLM2: 16 of 30
    recipe, blocks = ctx.calibrate(lambda: cache.influence_student_recipe(
        model, ctx.tokenizer, ctx.model_name, n_layers=n_layers))
    name = student_name(ctx.model_name)
    folder = cache.student_folder(recipe, blocks, name)
    cached = (folder / "student.json").is_file()
    if not cached and not ctx.train:
        raise RowSkipped(f"needs training (8 distillation steps; chapter 06 measured about 35 s on a 2-core CPU): "
                         f"the student is not in the cache ({folder}); run chapter 06 or pass --train")
    tokenizer = ctx.tokenizer if hasattr(ctx.tokenizer, "save_pretrained") else None  # saved beside it, if it can be
    student, record = cache.cached_student(recipe, model, blocks, name=name, tokenizer=tokenizer)
    ctx.apply_s_override = float(record["seconds"])
    ctx.notes.append(f"{n_layers} of {model.config.num_hidden_layers} layers; "
                     + ("loaded from the cache, apply_s is its recorded training time" if cached else "trained now"))
    return student


def _mqa(model: nn.Module, ctx: Context) -> nn.Module:
    """Chapter 07: mean-pool the key-value heads into one, then the book's uptraining of the k/v projections."""
    def make(m: nn.Module) -> nn.Module:
        gqa.convert_kv_heads(m, 1)
        config, batches = gqa.uptraining_recipe(ctx.tokenizer)
        gqa.uptrain(m, batches, config)
        return m

    return ctx.reuse("mqa", model, make)


@torch.no_grad()
def _restore_zeros(model: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """Set the weights a pruning removed (``keep`` False) back to zero in the packed layers of a model
    quantized after pruning: zero is a point of every asymmetric grid, so the codes stay on the
    quantizer's grid (:meth:`QuantizedLinear.from_linear` checks it)."""
    from refimpl.quantization import packed

    replacements = {}
    for name, kept in keep.items():
        layer = model.get_submodule(name)
        weight = layer.dequantized_weight() * kept  # [out, in]
        replacements[name] = packed.QuantizedLinear.from_linear(
            anatomy.linear_from_weight(weight, layer.bias), layer.bits, layer.symmetric, layer.granularity,
            layer.group_size, qparams=layer.qparams(), weight=weight)
    anatomy.swap_linears(model, replacements)


def _sparsegpt_gptq(model: nn.Module, ctx: Context) -> nn.Module:
    """SparseGPT 50 %, then GPTQ 4-bit calibrated on the pruned model; the pruned weights stay zero."""
    model = _sparsegpt(model, ctx, None)
    keep = {name: linear.weight != 0 for name, linear in anatomy.compressed_linears(model).items()}
    model = _gptq(model, ctx, statistics=None)
    _restore_zeros(model, keep)
    return model


def _mlp_channels_gptq(model: nn.Module, ctx: Context) -> nn.Module:
    return _gptq(_mlp_channels(model, ctx, recover=True), ctx, statistics=None)


def _student_gptq(model: nn.Module, ctx: Context) -> nn.Module:
    """Chapter 06's student (structured depth pruning with distillation as the recovery), then GPTQ 4-bit
    calibrated on the student; apply time: the student's recorded training plus the quantization."""
    student = _student(model, ctx)
    trained_s, excluded_s, start = ctx.apply_s_override, ctx.excluded_s, time.perf_counter()
    student = _gptq(student, ctx, statistics=None)
    ctx.apply_s_override = trained_s + time.perf_counter() - start - (ctx.excluded_s - excluded_s)
    return student


# --- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of the table: a method (or combination) at its chapter's settings."""

    id: str
    methods: tuple[str, ...]  # taxonomy ids it applies ("" for the baseline)
    family: str
    settings: str
    apply: Callable[[nn.Module, Context], nn.Module]
    chapter: str
    evaluated: str  # what the row's model stores and computes (what is measured and timed)
    kernel: str  # what would turn it into speed
    calibration: str = ""  # calibration data it needs ("" none)
    training: str = ""  # training it needs ("" none)
    kv_bits: int | None = None  # the KV cache quantized to this many bits while measured
    modules: tuple[str, ...] = ()  # refimpl modules whose code decides its results (for the key)
    combination: bool = False
    reuses: tuple[str, ...] = ()  # rows whose result this row starts from (made once when both run)
    trained_far: bool = False  # trained tens of steps from a destroyed model: figures hold to a sixth

    @property
    def method(self) -> str:
        return "+".join(self.methods) if self.methods else "dense"

    @property
    def tolerance(self) -> str:
        """The kind of its perplexities (:mod:`refimpl.reproducibility`), the widest that applies: every
        method passes its weights through a discrete choice (a grid, a mask, a search); a row that trains
        carries every difference in the arithmetic through its updates; one that rounds activations or
        the KV cache does so again in every forward pass (``trained_far``: a training that starts from
        a destroyed model moves further still). The dense model is plain float arithmetic."""
        kinds = ["float"]
        if self.methods:
            kinds.append("grid")
        if self.training:
            kinds.append("long-training" if self.trained_far else "trained")
        if self.kv_bits is not None or {"refimpl.quantization.activation", "refimpl.quantization.llm_int8"} & set(
                self.modules):
            kinds.append("activations")
        return max(reversed(kinds), key=lambda kind: reproducibility.TOLERANCES[kind].rtol)  # ties: the later

    def during(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The context the row's model is measured in (a quantized KV cache)."""
        if self.kv_bits is None:
            return contextlib.nullcontext()
        from refimpl.quantization import kv_cache

        return kv_cache.kv_quantization(model, self.kv_bits)


_PTQ_CALIBRATION = "4×512 tokens per corpus (statistics of the float model)"
_UPTRAINING = f"{gqa.UPTRAINING.steps} steps × 2×128 calibration tokens"  # gqa.uptraining_recipe
_PRUNING_CALIBRATION = "3×512 tokens per corpus (statistics of the dense model)"
_IMPORTANCE = "2×256 tokens (importance scores)"
_INT4 = "int4 weight-only GEMM (e.g. tinygemm, Marlin)"
_PACKED4 = "packed 4-bit codes + fp16 scales and zero-points (QuantizedLinear), dequantized on every call"
_DENSE_ZEROS = "float32, zeros stored densely (no sparse format)"
_SMALLER = "none: an ordinary smaller dense model"
_Q = ("refimpl.quantization.uniform", "refimpl.quantization.packed")
_CALIBRATED = ("refimpl.calibration", "refimpl.obs")


def _p(fn: Callable, **kwargs: Any) -> Callable[[nn.Module, Context], nn.Module]:
    return functools.partial(fn, **kwargs) if kwargs else fn


ROWS: tuple[Row, ...] = (
    Row("dense", (), "baseline", "float32 weights and KV cache", _dense, "01",
        "float32 (torch.nn.Linear)", "dense GEMM"),
    # Quantization: chapters 02-04.
    Row("rtn-w8", ("rtn",), "quantization", "8-bit asymmetric round-to-nearest, one scale per output channel",
        _p(_rtn, bits=8, group_size=None), "02", "packed 8-bit codes + fp16 scales, dequantized on every call",
        "int8 weight-only GEMM", modules=_Q),
    Row("rtn-w4g64", ("rtn",), "quantization", "4-bit asymmetric round-to-nearest, groups of 64",
        _p(_rtn, bits=4, group_size=64), "02", _PACKED4, _INT4, modules=_Q),
    Row("nf4", ("nf4",), "quantization", "NF4 in blocks of 64, double-quantized absmax (QLoRA's storage)",
        _nf4, "02", "packed NF4 codes + 8-bit absmax (CodeBookLinear), dequantized on every call",
        "NF4 dequantizing GEMM (bitsandbytes)", modules=_Q + ("refimpl.quantization.formats",)),
    Row("gptq-w4g64", ("gptq",), "quantization",
        "4-bit asymmetric, groups of 64; first token of each calibration block weighted 512 (attention sink), "
        "damp 0.01, blocks of 128 columns", _gptq, "03", _PACKED4, _INT4, calibration=_PTQ_CALIBRATION,
        modules=_Q + _CALIBRATED + ("refimpl.quantization.gptq",)),
    Row("awq-w4g64", ("awq",), "quantization",
        "4-bit asymmetric, groups of 64; per-channel scales searched over 10 exponents, no clipping",
        _awq, "03", _PACKED4 + ", input scales", _INT4, calibration=_PTQ_CALIBRATION,
        modules=_Q + _CALIBRATED + ("refimpl.quantization.awq",)),
    Row("llm-int8", ("llm-int8",), "quantization",
        "int8 vector-wise (absmax per row of X and column of W); input dimensions with |x| >= 6 kept in float",
        _llm_int8, "03", "int8 codes + float32 scales (Int8Linear); the int8 product computed in float32",
        "int8 GEMM + outlier GEMM (bitsandbytes)", modules=_Q + ("refimpl.quantization.llm_int8",)),
    Row("smoothquant-w8a8", ("smoothquant",), "quantization",
        "alpha 0.8, smoothing folded into the norms (q/k/v, gate/up) and into up_proj (down_proj); int8 "
        "symmetric weights per channel, int8 inputs per tensor (dynamic)", _smoothquant, "03",
        "simulated: float32 weights on the int8 grid, inputs fake-quantized on every call; bytes of the "
        "int8 weights packed (packed.packed_size)", "int8 x int8 GEMM", calibration=_PTQ_CALIBRATION,
        modules=_Q + _CALIBRATED + ("refimpl.quantization.smoothquant", "refimpl.quantization.activation")),
    Row("zeroquant-w8a8", ("zeroquant",), "quantization",
        "int8 symmetric weights in groups of 64, int8 inputs per token (dynamic)", _zeroquant, "03",
        "simulated: float32 weights on the int8 grid, inputs fake-quantized on every call; bytes of the "
        "int8 weights packed (packed.packed_size)", "int8 x int8 GEMM with group-wise scales",
        modules=_Q + ("refimpl.quantization.zeroquant", "refimpl.quantization.activation")),
    Row("llm-qat-w3g64", ("llm-qat", "fake-quant-ste"), "quantization",
        "3-bit asymmetric, groups of 64; 7 steps of forward KL to the float model (straight-through "
        "estimator), AdamW lr 3e-4, 2×128 tokens per step", _qat, "04",
        "packed 3-bit codes + fp16 scales and zero-points (QuantizedLinear), dequantized on every call",
        "int3 weight-only GEMM", training="7 steps × 2×128 calibration tokens, the float model as teacher",
        modules=_Q + ("refimpl.quantization.qat", "refimpl.distillation.losses", "refimpl.training")),
    Row("kv-int8", ("kv-cache-quantization",), "quantization",
        "KIVI int8 KV cache: keys per channel in groups of 32 tokens, values per token, no float window; "
        "weights float32", _kv_only, "03", "float32 weights; keys and values fake-quantized in every attention call",
        "attention over a packed int8 cache", kv_bits=8, modules=_Q + ("refimpl.quantization.kv_cache",)),
    # Pruning: chapter 05.
    Row("magnitude-50", ("magnitude-pruning",), "pruning", "50 % of each decoder linear layer, smallest |w|",
        _p(_magnitude, nm=None), "05", _DENSE_ZEROS, "sparse GEMM (pays only at much higher sparsity)",
        modules=("refimpl.pruning.magnitude", "refimpl.pruning.masks")),
    Row("magnitude-2of4", ("magnitude-pruning", "nm-sparsity"), "pruning",
        "2:4 (two of every four consecutive weights of a row), smallest |w|", _p(_magnitude, nm=(2, 4)), "05",
        _DENSE_ZEROS, "2:4 sparse tensor cores (NVIDIA Ampere+, fp16/bf16)",
        modules=("refimpl.pruning.magnitude", "refimpl.pruning.masks")),
    Row("wanda-50", ("wanda",), "pruning", "50 % per output row by |w|·||x||", _p(_wanda, nm=None), "05",
        _DENSE_ZEROS, "sparse GEMM (pays only at much higher sparsity)", calibration=_PRUNING_CALIBRATION,
        modules=_CALIBRATED + ("refimpl.pruning.wanda", "refimpl.pruning.masks")),
    Row("wanda-2of4", ("wanda", "nm-sparsity"), "pruning", "2:4 by |w|·||x||", _p(_wanda, nm=(2, 4)), "05",
        _DENSE_ZEROS, "2:4 sparse tensor cores (NVIDIA Ampere+, fp16/bf16)", calibration=_PRUNING_CALIBRATION,
        modules=_CALIBRATED + ("refimpl.pruning.wanda", "refimpl.pruning.masks")),
    Row("sparsegpt-50", ("sparsegpt",), "pruning",
        "50 %, adaptive masks per 128 columns, OBS reconstruction, damp 0.01", _p(_sparsegpt, nm=None), "05",
        _DENSE_ZEROS, "sparse GEMM (pays only at much higher sparsity)", calibration=_PRUNING_CALIBRATION,
        modules=_CALIBRATED + ("refimpl.pruning.sparsegpt", "refimpl.pruning.masks")),
    Row("sparsegpt-2of4", ("sparsegpt", "nm-sparsity"), "pruning", "2:4, OBS reconstruction, damp 0.01",
        _p(_sparsegpt, nm=(2, 4)), "05", _DENSE_ZEROS, "2:4 sparse tensor cores (NVIDIA Ampere+, fp16/bf16)",
        calibration=_PRUNING_CALIBRATION, modules=_CALIBRATED + ("refimpl.pruning.sparsegpt", "refimpl.pruning.masks")),
    Row("llm-pruner-mlp", ("llm-pruner",), "pruning",
        "2/3 of the MLP channels of every layer kept, a multiple of 64 (SmolLM2: 1024 of 1536), by first-order "
        "Taylor importance; "
        "no recovery", _p(_mlp_channels, recover=False), "05", "float32, smaller matrices", _SMALLER,
        calibration=_IMPORTANCE, modules=("refimpl.pruning.structured", "refimpl.training")),
    Row("llm-pruner-mlp-lora", ("llm-pruner", "lora-recovery"), "pruning",
        "as llm-pruner-mlp, then LoRA recovery: rank 8 on every projection, 4 steps × 2×128 calibration "
        "tokens, AdamW lr 1e-3, merged", _p(_mlp_channels, recover=True), "05", "float32, smaller matrices",
        _SMALLER, calibration=_IMPORTANCE, training="4 steps × 2×128 calibration tokens (LoRA, rank 8)",
        modules=("refimpl.pruning.structured", "refimpl.training", "refimpl.lora")),
    Row("shortgpt-depth", ("shortgpt",), "pruning",
        "the tenth of the layers with the lowest block influence removed (SmolLM2: 27 of 30 kept)", _depth, "05",
        "float32, fewer layers", _SMALLER, calibration=_IMPORTANCE, modules=("refimpl.pruning.structured",)),
    Row("head-pruning-kv-group", ("head-pruning",), "pruning",
        "one key-value group and its query heads removed in every layer by activation importance "
        "(SmolLM2: 2 of 3 groups kept)", _kv_group, "05", "float32, smaller attention", _SMALLER,
        calibration=_IMPORTANCE, modules=("refimpl.pruning.structured",)),
    # Distillation: chapter 06.
    Row("kd-student", ("classic-kd",), "distillation",
        "student of the 16 of 30 layers with the highest block influence (8/15 of the layers), trained online "
        "with forward KL, 8 steps × 2×128 tokens, AdamW lr 5e-4 (chapter 06's cached student)", _student, "06",
        "float32, fewer layers", _SMALLER, calibration=_IMPORTANCE,
        training="8 steps × 2×128 calibration tokens, the teacher run on every batch",
        modules=("refimpl.distillation.cache", "refimpl.distillation.train", "refimpl.distillation.losses",
                 "refimpl.distillation.student", "refimpl.pruning.structured", "refimpl.training")),
    # Architecture: chapter 07.
    Row("mqa", ("mqa",), "architecture",
        "key-value heads mean-pooled to one (GQA -> MQA), then the k/v projections uptrained "
        f"{_UPTRAINING}, AdamW lr {gqa.UPTRAINING.lr:g}", _mqa, "07", "float32, one key-value head",
        "none (a smaller KV cache)", training=f"{_UPTRAINING} (k/v projections only)",
        modules=("refimpl.attention.gqa", "refimpl.training"), trained_far=True),
    # Combinations.
    Row("sparsegpt-50+gptq-w4g64", ("sparsegpt", "gptq"), "pruning+quantization",
        "sparsegpt-50, then gptq-w4g64 calibrated on the pruned model; the pruned weights restored to zero "
        "(zero is on every grid)", _sparsegpt_gptq, "03, 05", _PACKED4 + "; half of them zero",
        "sparse int4 GEMM (none common)", calibration=_PRUNING_CALIBRATION + "; then " + _PTQ_CALIBRATION.replace(
            "float model", "pruned model"),
        modules=_Q + _CALIBRATED + ("refimpl.pruning.sparsegpt", "refimpl.pruning.masks",
                                    "refimpl.quantization.gptq"), combination=True, reuses=("sparsegpt-50",)),
    Row("llm-pruner-mlp-lora+gptq-w4g64", ("llm-pruner", "lora-recovery", "gptq"), "pruning+quantization",
        "llm-pruner-mlp-lora, then gptq-w4g64 calibrated on the pruned model", _mlp_channels_gptq, "03, 05",
        _PACKED4, _INT4, calibration=_IMPORTANCE + "; then " + _PTQ_CALIBRATION.replace("float model", "pruned model"),
        training="4 steps × 2×128 calibration tokens (LoRA, rank 8)",
        modules=_Q + _CALIBRATED + ("refimpl.pruning.structured", "refimpl.training", "refimpl.lora",
                                    "refimpl.quantization.gptq"), combination=True,
        reuses=("llm-pruner-mlp-lora",)),
    Row("kd-student+gptq-w4g64", ("classic-kd", "gptq"), "distillation+quantization",
        "kd-student, then gptq-w4g64 calibrated on the student", _student_gptq, "03, 06", _PACKED4, _INT4,
        calibration=_IMPORTANCE + "; then " + _PTQ_CALIBRATION.replace("float model", "student"),
        training="8 steps × 2×128 calibration tokens, the teacher run on every batch",
        modules=_Q + _CALIBRATED + ("refimpl.distillation.cache", "refimpl.distillation.train",
                                    "refimpl.distillation.losses", "refimpl.distillation.student",
                                    "refimpl.pruning.structured", "refimpl.training", "refimpl.quantization.gptq"),
        combination=True),
    Row("mqa+kv-int8", ("mqa", "kv-cache-quantization"), "architecture+quantization",
        "mqa with the kv-int8 cache", _mqa, "03, 07", "float32, one key-value head; keys and values "
        "fake-quantized in every attention call", "attention over a packed int8 cache", kv_bits=8,
        training=f"{_UPTRAINING} (k/v projections only)",
        modules=("refimpl.attention.gqa", "refimpl.training", "refimpl.quantization.kv_cache") + _Q,
        combination=True, reuses=("mqa",), trained_far=True),
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
    "qlora": "fine-tuning a quantized model, not compression: its stored model is the nf4 row "
             "(chapter 04 measures the fine-tune)",
    "minillm": "the kd-student trained with reverse KL; chapter 06 compares the objectives (not cached)",
    "gkd": "three on-policy steps on top of the kd-student; chapter 06 measures them (not cached)",
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
                                "256-token blocks would not show it (chapter 07 measures 1,024 tokens)",
    "streamingllm": "as sliding-window-attention",
    "speculative-decoding": "a decoding algorithm with the target's own output: its effect is speed alone, "
                            "measured in chapter 08; not part of this table yet",
    "self-speculative-decoding": "as speculative-decoding",
}

ROW_IDS = tuple(row.id for row in ROWS)
DEFAULT_CHECK_ROWS = ("rtn-w4g64", "wanda-50", "mqa")  # one quantization, one pruning, one architecture row


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
        matches = [row.id for row in ROWS if token == row.id or token == row.family
                   or (not row.combination and token in row.methods)]
        if not matches:
            taxonomy_ids = sorted({m for row in ROWS for m in row.methods})
            raise ValueError(f"unknown method {token!r}: valid row ids are {list(ROW_IDS)}; taxonomy ids "
                             f"{taxonomy_ids}; families {sorted({row.family for row in ROWS})}")
        chosen.update(matches)
    return [row for row in ROWS if row.id in chosen]


# --- measuring one row ----------------------------------------------------------------------------


@torch.inference_mode()
def kv_bytes_per_token(model: nn.Module, block: torch.Tensor, kv_bits: int | None = None) -> float:
    """Bytes per token of the KV cache ``model`` builds over ``block [1, L]``: as float tensors
    (:func:`refimpl.evaluate.cache_bytes`) or packed to ``kv_bits`` (KIVI, :func:`kv_cache.pack_cache`)."""
    check_token_ids("block", block, vocabulary_size(model))
    with evaluate.eval_mode(model):
        cache = model(block.to(evaluate.model_device(model)), use_cache=True).past_key_values
    if kv_bits is None:
        nbytes = evaluate.cache_bytes(cache)
    else:
        from refimpl.quantization import kv_cache

        nbytes = kv_cache.pack_cache(cache, kv_bits)[1]
    return nbytes / block.shape[1]


def measure_row(row: Row, ctx: Context, timing: bool = True) -> dict[str, Any]:
    """Apply ``row`` to a fresh copy of ``ctx.base`` and measure it (without the speed columns when
    ``timing`` is False). Returns the row's values (see :data:`COLUMNS`); a :class:`RowSkipped` recipe
    gives ``status="skipped"`` and its reason."""
    ctx.begin_row()
    values: dict[str, Any] = {"row": row.id, "method": row.method, "family": row.family, "settings": row.settings,
                              "status": "ok", "reason": ""}
    model = copy.deepcopy(ctx.base)
    start = time.perf_counter()
    try:
        with private_copy(model):  # no caller holds the copy: apply_s times the method, not a rollback snapshot
            model = row.apply(model, ctx)
    except RowSkipped as skipped:
        values.update(status="skipped", reason=str(skipped))
        return values
    elapsed = time.perf_counter() - start
    model.eval()
    apply_s = ctx.apply_s_override if ctx.apply_s_override is not None else (
        elapsed - ctx.excluded_s + ctx.reused_apply_s)
    p = ctx.protocol
    with row.during(model):
        values.update({f"ppl_{name}": value for name, value in evaluate.perplexities(model, ctx.eval_blocks).items()})
        if timing:
            prompt = ctx.eval_blocks[data.CORPORA[0]][:1, :p.prefill_tokens]  # [1, prefill_tokens]
            contestants = {"dense": ctx.base, "row": model}
            prefill = evaluate.side_by_side(
                contestants, lambda m: evaluate.prefill_latency(m, prompt, repeats=1, warmup=0),
                rounds=p.timing_rounds, warmup_rounds=p.timing_warmup_rounds)
            decode = evaluate.side_by_side(
                contestants, lambda m: evaluate.decode_latency(m, prompt[:, :p.decode_prompt], n_tokens=p.decode_tokens,
                                                               repeats=1, warmup=0),
                rounds=p.timing_rounds, warmup_rounds=p.timing_warmup_rounds)
            values.update(prefill_tokens_per_s=prefill["row"].tokens_per_s,
                          decode_tokens_per_s=decode["row"].tokens_per_s,
                          prefill_speedup=prefill["dense"].median_s / prefill["row"].median_s,
                          decode_speedup=decode["dense"].median_s / decode["row"].median_s)
    weight_bytes = ctx.stored_bytes if ctx.stored_bytes is not None else evaluate.model_bytes(model)
    values.update(
        weight_bytes=weight_bytes,
        weight_fraction=weight_bytes / evaluate.model_bytes(ctx.base),
        zero_fraction=masks.sparsity_of(model),
        kv_bytes_per_token=kv_bytes_per_token(model, ctx.eval_blocks[data.CORPORA[-1]][:1], row.kv_bits),
        apply_s=apply_s, calibration_s=ctx.calibration_s,
        needs_calibration=bool(row.calibration), calibration_data=row.calibration,
        needs_training=bool(row.training), training_data=row.training,
        needs_kernel=row.kernel, evaluated=row.evaluated, notes="; ".join(ctx.notes))
    del model
    gc.collect()
    return values


# --- the key: what decides a row's results ------------------------------------------------------

_COMMON_MODULES = ("refimpl.evaluate", "refimpl.data", "refimpl.models")


@functools.lru_cache(maxsize=None)
def _module_digest(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"module {module!r} not found")
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()


def _recipe_source(fn: Callable) -> str:
    if isinstance(fn, functools.partial):
        return inspect.getsource(fn.func) + repr(sorted(fn.keywords.items()))
    return inspect.getsource(fn)


def row_key(row: Row, protocol: Protocol = DEFAULT_PROTOCOL) -> str:
    """12 hex digits identifying what decides ``row``'s results: the protocol, its settings and recipe
    (source), the source of the refimpl modules it calls and of the measurement, and the versions of
    torch and transformers. A row of the table with another key is measured again."""
    import transformers

    recipes = [row.apply, measure_row, kv_bytes_per_token, masks.sparsity_of, Context.statistics, Context.importance]
    if row.combination or row.apply in (_gptq, _mlp_channels_gptq, _sparsegpt_gptq):
        recipes += [_gptq, _sparsegpt, _mlp_channels, _restore_zeros]
    parts = {
        "row": [row.id, row.settings, row.kv_bits],
        "protocol": dataclasses.asdict(protocol),
        "sink_weight": SINK_WEIGHT,
        "recipes": [_recipe_source(fn) for fn in recipes],
        "modules": {m: _module_digest(m) for m in sorted(set(row.modules + _COMMON_MODULES))},
        "versions": [torch.__version__, transformers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --- the table: CSV, Markdown, provenance ---------------------------------------------------------


def _columns() -> list[tuple[str, type, str]]:
    return [
        ("model", str, "the model (alias, folder or hub id)"),
        ("row", str, "row id (ROWS)"),
        ("method", str, "taxonomy id(s) of the method(s) applied, '+'-joined"),
        ("family", str, "baseline, quantization, pruning, distillation, architecture, or a combination"),
        ("settings", str, "the chapter's recommended settings"),
        ("key", str, "hash of what decides the results (protocol, recipe, refimpl sources, versions)"),
        ("status", str, "ok, or skipped (see reason)"),
        ("reason", str, "why a row was skipped"),
        ("weight_bytes", int, "bytes of the weights as stored (measured)"),
        ("weight_fraction", float, "weight_bytes / the dense model's"),
        ("zero_fraction", float, "fraction of exactly-zero weights in the decoder layers' linear layers"),
        ("kv_bytes_per_token", float, "KV-cache bytes per token of one 256-token block (packed if quantized)"),
        *[(f"ppl_{name}", float, f"perplexity on the {name} evaluation blocks") for name in data.CORPORA],
        ("prefill_tokens_per_s", float, "prefill throughput (64-token prompt), this machine"),
        ("decode_tokens_per_s", float, "greedy decode throughput (8 tokens after 32), this machine"),
        ("prefill_speedup", float, "dense median time / this row's, timed in alternation"),
        ("decode_speedup", float, "dense median time / this row's, timed in alternation"),
        ("apply_s", float, "seconds to apply the method (training included, calibration capture not)"),
        ("calibration_s", float, "seconds to capture the calibration data the row uses"),
        ("needs_calibration", bool, "needs calibration data"),
        ("calibration_data", str, "which calibration data"),
        ("needs_training", bool, "needs training"),
        ("training_data", str, "which training"),
        ("needs_kernel", str, "the kernel that would turn the method into speed"),
        ("evaluated", str, "what the measured model stores and computes"),
        ("notes", str, "details of this run"),
        ("device", str, "the device measured on"),
        ("commit", str, "git commit of the code (+dirty if it had uncommitted changes)"),
        ("measured_at", str, "UTC time of the measurement"),
    ]


COLUMNS = _columns()
_TYPES = {name: kind for name, kind, _ in COLUMNS}


def _parse(name: str, text: str) -> Any:
    kind = _TYPES.get(name, str)
    if text == "" and kind is not str:
        return None
    if kind is bool:
        return text == "true"
    return kind(text)


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of an effects CSV, typed (numbers as numbers, booleans as booleans, empty as None)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"model", "row", "settings", "key", "status"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not an effects table: it lacks the columns {sorted(missing)}")
        return [{name: _parse(name, text) for name, text in record.items()} for record in reader]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[name for name, _, _ in COLUMNS], lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({name: _format(record.get(name)) for name, _, _ in COLUMNS})
    _atomic_write(path, buffer.getvalue())


def _cell(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _text(value: str) -> str:
    """A string as a Markdown table cell: its ``|`` escaped."""
    return value.replace("|", "\\|")


def markdown(records: list[dict[str, Any]], title: str = "") -> str:
    """The table as Markdown: the measured rows, then the needs, then the skipped rows with reasons."""
    lines = [f"# {title}", ""] if title else []
    ok = [r for r in records if r["status"] == "ok"]
    corpora = [c for c in data.CORPORA]
    head = (["row", "method", "MiB", "× dense"] + [f"ppl {c}" for c in corpora]
            + ["KV B/token", "zeros", "prefill tok/s", "decode tok/s", "apply s", "calibration s"])
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in ok:
        speed = [f"{_cell(r.get(f'{phase}_tokens_per_s'), '.1f')}"
                 + (f" ({r[f'{phase}_speedup']:.2f}×)" if r.get(f"{phase}_speedup") is not None else "")
                 for phase in ("prefill", "decode")]
        cells = ([r["row"], r["method"], _cell(r["weight_bytes"] / 2**20, ".1f"), _cell(r["weight_fraction"], ".2f")]
                 + [_cell(r.get(f"ppl_{c}"), ".2f") for c in corpora]
                 + [_cell(r["kv_bytes_per_token"], ",.0f"), _cell(r["zero_fraction"], ".1%")] + speed
                 + [_cell(r["apply_s"], ".1f"), _cell(r["calibration_s"], ".1f")])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| row | settings | calibration | training | kernel for speed | measured as |",
              "|---|---|---|---|---|---|"]
    for r in ok:
        lines.append("| " + " | ".join(_text(cell) for cell in (
            r["row"], r["settings"], r["calibration_data"] or "—", r["training_data"] or "—", r["needs_kernel"],
            r["evaluated"])) + " |")
    skipped = [r for r in records if r["status"] != "ok"]
    if skipped:
        lines += ["", "Not measured:", ""] + [f"- `{r['row']}`: {r['reason']}" for r in skipped]
    notes = [r for r in ok if r.get("notes")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- `{r['row']}`: {r['notes']}" for r in notes]
    return "\n".join(lines) + "\n"


def table_stem(model_name: str) -> str:
    """The file name stem of a model's table: a local folder's name, or the alias or hub id with
    ``/`` as ``--``."""
    name = os.fspath(model_name).rstrip("/")
    if os.path.isdir(name):
        name = os.path.basename(os.path.abspath(name))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-.")
    if not stem:
        raise ValueError(f"model name {model_name!r} gives no usable file name")
    return stem


def _git() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def machine(device: torch.device) -> dict[str, Any]:
    """The machine a table was measured on: CPU, its vector units as PyTorch sees them, cores, GPU."""
    info = {"cpu": runtime.cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def check_out(out: str | os.PathLike) -> Path:
    """The output folder, created if needed; ``ValueError`` if it is a file or cannot be written."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"out must be a folder path, got {out!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out must be a folder, but {path} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"out folder {path} cannot be created: {exc}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"out folder {path} is not writable")
    return path


def _load(model: str | os.PathLike | tuple[nn.Module, Any], device: str | torch.device | None,
          model_name: str | None) -> tuple[nn.Module, Any, str]:
    if isinstance(model, tuple):
        if len(model) != 2 or not isinstance(model[0], nn.Module):
            raise TypeError("model must be a name or path, or a (model, tokenizer) pair")
        if device is not None and runtime.resolve_device(device) != evaluate.model_device(model[0]):
            raise ValueError(f"device {device!r} differs from the given model's ({evaluate.model_device(model[0])})")
        name = model_name or getattr(getattr(model[0], "config", None), "_name_or_path", "") or "model"
        return model[0].eval(), model[1], name
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name or path, or a (model, tokenizer) pair, got {type(model).__name__}")
    from refimpl.models import load_model

    loaded, tokenizer = load_model(model, device=runtime.resolve_device("cpu" if device is None else device))
    return loaded, tokenizer, model_name or os.fspath(model)


def run_effects(out: str | os.PathLike, model: str | os.PathLike | tuple[nn.Module, Any] = "smollm2-135m",
                methods: Sequence[str] | str | None = None, device: str | torch.device | None = None,
                train: bool = False, model_name: str | None = None, protocol: Protocol = DEFAULT_PROTOCOL,
                threads: int | None = 2, command: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure the rows of ``methods`` (default: all) on ``model`` and write ``<out>/<model>.csv``,
    ``.md`` and ``.json``, after every row. Rows already in the CSV with the same model, row, settings
    and key are kept as they are (:func:`row_key`).

    Args:
        model: a shipped alias, a local folder or a hub id (:func:`refimpl.models.load_model`), or a
            ``(model, tokenizer)`` pair (not modified).
        device: where to load a named model (default ``"cpu"``); for a given model, its device.
        train: train what a row needs and the cache does not hold (the distilled student).
        model_name: the name written to the table (default: ``model``, or a given model's config name).
        threads: CPU threads (:func:`refimpl.runtime.setup`, with seed 0).

    Returns:
        the table's rows (all of them, not only those measured now).
    """
    rows = select_rows(methods)  # every argument checked before anything is loaded or written
    if not isinstance(protocol, Protocol):
        raise TypeError(f"protocol must be a Protocol, got {type(protocol).__name__}")
    if device is not None:
        runtime.resolve_device(device)
    out_dir = check_out(out)
    runtime.setup(seed=0, threads=threads, progress=runtime.progress_enabled())
    base, tokenizer, name = _load(model, device, model_name)
    stem = table_stem(name)
    csv_path, md_path, json_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "json"))
    records = read_table(csv_path) if csv_path.exists() else []
    provenance = json.loads(json_path.read_text()) if json_path.exists() else {}
    resolved = evaluate.model_device(base)
    import transformers

    git = _git()
    commit = "" if git["commit"] is None else git["commit"][:12] + ("+dirty" if git["dirty"] else "")
    run = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": list(sys.argv if command is None else command), "git": git, "measured": [], "kept": [],
           "skipped": [], "seconds": {}}
    provenance.update({
        "model": name, "device": str(resolved), "machine": machine(resolved), "torch": torch.__version__,
        "transformers": transformers.__version__, "protocol": dataclasses.asdict(protocol),
        "columns": {col: description for col, _, description in COLUMNS},
    })
    provenance.setdefault("runs", []).append(run)

    def write() -> None:
        order = {row_id: i for i, row_id in enumerate(ROW_IDS)}
        records.sort(key=lambda r: (order.get(r["row"], len(order)), r["row"]))
        write_csv(csv_path, records)
        _atomic_write(md_path, markdown(records, f"Effects of every method on {name}"))
        _atomic_write(json_path, json.dumps(provenance, indent=1) + "\n")

    ctx = Context(base, tokenizer, name, protocol, train)
    ctx.keep_for_reuse = {key for row in rows for key in row.reuses}
    for row in progress(rows, desc="effects", total=len(rows)):
        key = row_key(row, protocol)
        done = next((r for r in records if r["model"] == name and r["row"] == row.id and r["settings"] == row.settings
                     and r["key"] == key and r["status"] == "ok"), None)
        if done is not None:
            run["kept"].append(row.id)
            continue
        start = time.perf_counter()
        values = measure_row(row, ctx)
        run["seconds"][row.id] = round(time.perf_counter() - start, 1)
        values.update(model=name, key=key, device=str(resolved), commit=commit,
                      measured_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        values = {column: values.get(column, "" if kind is str else None) for column, kind, _ in COLUMNS}
        records[:] = [r for r in records if not (r["model"] == name and r["row"] == row.id)] + [values]
        run["skipped" if values["status"] != "ok" else "measured"].append(row.id)
        if runtime.progress_enabled():
            print(_summary(values), file=sys.stderr, flush=True)
        write()
    write()
    ctx.release()
    return records


def _summary(values: dict[str, Any]) -> str:
    if values["status"] != "ok":
        return f"[effects] {values['row']}: skipped ({values['reason']})"
    ppl = "/".join(f"{values[f'ppl_{c}']:.2f}" for c in data.CORPORA)
    return (f"[effects] {values['row']}: ppl {ppl}, {values['weight_bytes'] / 2**20:.1f} MiB, "
            f"apply {values['apply_s']:.1f} s + calibration {values['calibration_s']:.1f} s")


# --- checking a committed table -----------------------------------------------------------------


@dataclass
class RowCheck:
    """One recomputed row against the table: the values compared and what differs."""

    row: str
    key_matches: bool  # False: the code or versions changed since the table was written
    compared: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # column: (table, recomputed)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def check_table(table: str | os.PathLike, model: str | os.PathLike | tuple[nn.Module, Any] | None = None,
                rows: Sequence[str] | None = None, device: str | torch.device | None = None,
                model_name: str | None = None) -> list[RowCheck]:
    """Recompute ``rows`` of a written table (default: :data:`DEFAULT_CHECK_ROWS`, those of them the table
    has) and compare: perplexities within the tolerance of the row's kind (:attr:`Row.tolerance`, the
    book's rule for what a figure holds on another machine, :mod:`refimpl.reproducibility`), weight and
    KV-cache bytes exactly, the zero fraction to 1e-4; timings are not compared. The protocol is read
    from the table's JSON beside it.

    Args:
        model: default: load the table's model by name; or a name, path or ``(model, tokenizer)`` pair.
    """
    table = Path(table)
    if not table.is_file():
        raise ValueError(f"table {table} does not exist")
    records = read_table(table)
    provenance_path = table.with_suffix(".json")
    protocol = DEFAULT_PROTOCOL
    if provenance_path.is_file():
        protocol = Protocol.from_dict(json.loads(provenance_path.read_text()).get("protocol", {}))
    measured = {r["row"]: r for r in records if r["status"] == "ok"}
    names = {r["model"] for r in records}
    if len(names) != 1:
        raise ValueError(f"table {table} must hold one model's rows, found {sorted(names)}")
    table_model = names.pop()
    wanted = list(rows) if rows is not None else [r for r in DEFAULT_CHECK_ROWS if r in measured]
    unknown = [r for r in wanted if r not in ROW_IDS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}: valid row ids are {list(ROW_IDS)}")
    missing = [r for r in wanted if r not in measured]
    if missing:
        raise ValueError(f"rows {missing} are not measured in {table} (its rows: {sorted(measured)})")
    if not wanted:
        raise ValueError(f"{table} has none of the rows {list(DEFAULT_CHECK_ROWS)}: name rows to check")
    runtime.setup(seed=0, threads=2, progress=runtime.progress_enabled())
    base, tokenizer, name = _load(table_model if model is None else model, device, model_name or table_model)
    ctx = Context(base, tokenizer, name, protocol, train=False)
    checks = []
    for row_id in progress(wanted, desc="check", total=len(wanted)):
        row = next(r for r in ROWS if r.id == row_id)
        stored = measured[row_id]
        values = measure_row(row, ctx, timing=False)
        check = RowCheck(row_id, key_matches=stored["key"] == row_key(row, protocol))
        if values["status"] != "ok":
            check.mismatches.append(f"status: {values['status']} ({values['reason']})")
            checks.append(check)
            continue
        for column in [f"ppl_{c}" for c in data.CORPORA] + ["weight_bytes", "kv_bytes_per_token", "zero_fraction"]:
            old, new = stored.get(column), values[column]
            check.compared[column] = (old, new)
            if column.startswith("ppl_"):
                same = old is not None and reproducibility.values_agree(row.tolerance, old, new)
            elif column == "zero_fraction":
                same = old is not None and abs(old - new) <= 1e-4
            else:
                same = old == new
            if not same:
                beyond = f" (beyond the {row.tolerance!r} tolerance)" if column.startswith("ppl_") else ""
                check.mismatches.append(f"{column}: table {old!r}, recomputed {new!r}{beyond}")
        checks.append(check)
    ctx.release()
    return checks


def format_checks(checks: list[RowCheck]) -> str:
    lines = []
    for check in checks:
        state = "ok" if check.ok else "DIFFERS"
        key = "" if check.key_matches else " (the code or library versions changed since the table was written)"
        lines.append(f"{check.row}: {state}{key}")
        lines += [f"    {m}" for m in check.mismatches]
        if check.ok:
            lines += [f"    {column}: {new!r}" for column, (_, new) in check.compared.items()]
    return "\n".join(lines)


# --- the command line -----------------------------------------------------------------------------


def list_rows() -> str:
    """The registry as text: every row with its family, methods, settings and needs; then the
    taxonomy's implemented methods that are not rows, with the reason."""
    lines = []
    for row in ROWS:
        needs = [f"calibration: {row.calibration}" if row.calibration else "",
                 f"training: {row.training}" if row.training else "", f"kernel: {row.kernel}"]
        lines.append(f"{row.id:<32} {row.family:<26} {row.method}\n    {row.settings}\n    "
                     + "; ".join(n for n in needs if n))
    lines.append("\nnot rows:")
    lines += [f"  {method_id:<28} {reason}" for method_id, reason in NOT_A_ROW.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m refimpl effects --model NAME --out DIR [--methods a,b] [--device D] [--train]
    [--threads N] [--list] [--check TABLE.csv]``."""
    parser = argparse.ArgumentParser(prog="python -m refimpl effects", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="shipped alias, local folder or hub id")
    parser.add_argument("--out", help="folder for <model>.csv, .md and .json (required unless --list or --check)")
    parser.add_argument("--methods", help="comma-separated row ids, taxonomy ids or families (default: all)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--train", action="store_true", help="train what a row needs and the cache lacks")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--check", metavar="TABLE", help="recompute a sample of TABLE's rows (--methods: which) "
                        "and compare; exit status 1 if they differ")
    args = parser.parse_args(argv)
    if args.list:
        print(list_rows())
        return 0
    command = [sys.argv[0]] + list(argv) if argv is not None else None
    try:
        runtime.resolve_device(args.device)
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive int, got {args.threads}")
        if args.check:
            rows = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
            checks = check_table(args.check, rows=rows, device=args.device)
            print(format_checks(checks))
            return 0 if all(c.ok for c in checks) else 1
        if not args.out:
            parser.error("--out is required (a folder for the table)")
        select_rows(args.methods)
        check_out(args.out)
    except ValueError as exc:
        parser.error(str(exc))
    run_effects(args.out, args.model, args.methods, args.device, args.train, threads=args.threads, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
