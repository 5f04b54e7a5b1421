"""The recipes of the effects table: each applies one method, at the settings its chapter recommends, to
a fresh copy of the model, by calling that chapter's ``refimpl`` functions, and returns what it produced
(:class:`~refimpl.effects.context.Applied`). Nothing here re-implements a method: what a chapter and a
recipe share (MQA's uptraining, QAT's distillation from the float model, the distilled student) lives
in the method's module, and both call it.

A combination's recipe receives the model of the row it starts from (``Row.starts_from``) and applies
its own step. The rows' settings (:mod:`refimpl.effects.registry`) quote the constants defined here.
"""

from __future__ import annotations

import torch
from torch import nn

from refimpl import anatomy, data, training
from refimpl.attention import gqa
from refimpl.distillation import cache
from refimpl.effects.context import Applied, Context, RowSkipped
from refimpl.effects.table import table_stem
from refimpl.pruning import magnitude, sparsegpt, structured, wanda
from refimpl.quantization import (activation, awq, formats, gptq, llm_int8, packed, qat, smoothquant, uniform,
                                  zeroquant)

GROUP = 64  # the group size of every 4-bit and 3-bit row (the model's own 4-bit grid uses 32: chapter 00)
SPARSITY = 0.5  # the unstructured and 2:4 pruning rows
MLP_KEPT = 2 / 3  # llm-pruner: the fraction of MLP channels kept, rounded to whole groups of GROUP
LAYERS_REMOVED = 1 / 10  # shortgpt: the fraction of layers removed
STUDENT_LAYERS = 16 / 30  # chapter 06's student keeps 16 of SmolLM2's 30 layers
RECOVERY = training.TrainConfig(steps=4, lr=1e-3, warmup_steps=1)  # LoRA recovery after llm-pruner
RECOVERY_RANK = 8
RECOVERY_SEQ_LEN = 128
QAT_BITS = 3


def dense(model: nn.Module, ctx: Context) -> Applied:
    return Applied(model)


def unchanged(model: nn.Module, ctx: Context) -> Applied:
    """The model as it comes (a row that changes only how it is run, e.g. a quantized KV cache)."""
    return Applied(model)


def rtn(model: nn.Module, ctx: Context, bits: int, group_size: int | None) -> Applied:
    return Applied(packed.pack_model(model, uniform.Grid(bits, symmetric=False, group_size=group_size)))


def nf4(model: nn.Module, ctx: Context) -> Applied:
    return Applied(packed.pack_model_code_book(model, formats.NF4_CODE, GROUP, double_quant=True))


def gptq_w4(model: nn.Module, ctx: Context) -> Applied:
    """GPTQ 4-bit in groups of 64 as the paper runs it, packed: act-order, each layer calibrated on the
    outputs of the already quantized layers before it (on ``model``: the unmodified one, or a
    combination's first step)."""
    return Applied(gptq.quantize_model_gptq(model, ctx.calibration_tokens("ptq"),
                                            uniform.Grid(4, symmetric=False, group_size=GROUP), act_order=True,
                                            pack=True))


def awq_w4(model: nn.Module, ctx: Context) -> Applied:
    """AWQ 4-bit in groups of 64 with the authors' defaults: 20 exponents, then the clipping search; on
    statistics of the float model, as their code calibrates every layer on float activations (its scale
    search scores a whole block's output, refimpl's each layer's: a departure)."""
    return Applied(awq.quantize_model_awq(model, None, uniform.Grid(4, symmetric=False, group_size=GROUP),
                                          statistics=ctx.statistics("ptq"), n_grid=20, clip=True, pack=True))


def llm_int8_(model: nn.Module, ctx: Context) -> Applied:
    return Applied(llm_int8.quantize_model_int8(model))


def smoothquant_w8a8(model: nn.Module, ctx: Context) -> Applied:
    smoothed = smoothquant.smooth_model(model, None, 0.8, smooth_down_proj=True, statistics=ctx.statistics("ptq"))
    stored = packed.packed_size(smoothed, uniform.Grid(8))  # the int8 weights as stored
    return Applied(activation.quantize_model_w8a8(smoothed, act_grid=uniform.Grid(8, per="tensor")),
                   stored_bytes=stored)


def zeroquant_w8a8(model: nn.Module, ctx: Context) -> Applied:
    weight_grid = uniform.Grid(8, group_size=GROUP)
    stored = packed.packed_size(model, weight_grid)  # the int8 weights as stored
    return Applied(zeroquant.quantize_model_zeroquant(model, weight_grid, uniform.Grid(8, per="token")),
                   stored_bytes=stored)


def llm_qat(model: nn.Module, ctx: Context) -> Applied:
    """Chapter 04: QAT at 3 bits in groups of 64, distilled from the float model on real calibration text
    (:data:`refimpl.quantization.qat.DISTILLATION`); only the quantized layers' latent weights train,
    where the chapter trains every parameter."""
    steps = qat.DISTILLATION.steps
    text = torch.cat([data.token_blocks(ctx.tokenizer, data.load_text(name, "calibration"),
                                        qat.DISTILLATION_SEQ_LEN, steps) for name in data.CORPORA])  # [2 steps, L]
    model.requires_grad_(False)  # only the latent weights of the quantized layers train (chapter 04: all)
    student = qat.prepare_qat(model, uniform.Grid(QAT_BITS, symmetric=False, group_size=GROUP))
    qat.distill_from_float(student, ctx.base, qat.interleaved_batches(text, steps))
    return Applied(qat.convert_qat(student, pack=True))


def magnitude_(model: nn.Module, ctx: Context, nm: tuple[int, int] | None) -> Applied:
    return Applied(magnitude.prune_model_magnitude(model, SPARSITY, nm=nm))


def wanda_(model: nn.Module, ctx: Context, nm: tuple[int, int] | None) -> Applied:
    """Wanda as its paper's code runs it: each layer on the outputs of the already pruned layers."""
    return Applied(wanda.prune_model_wanda(model, ctx.calibration_tokens("pruning"), SPARSITY, nm=nm))


def sparsegpt_(model: nn.Module, ctx: Context, nm: tuple[int, int] | None) -> Applied:
    """SparseGPT as its paper runs it: each layer on the outputs of the already pruned layers."""
    return Applied(sparsegpt.prune_model_sparsegpt(model, ctx.calibration_tokens("pruning"), SPARSITY, nm=nm))


def mlp_channels(model: nn.Module, ctx: Context, recover: bool) -> Applied:
    """Chapter 05: keep 2/3 of the MLP channels by Taylor importance, in whole groups of 64 so that the
    4-bit rows can quantize the result; then, if ``recover``, LoRA recovery."""
    total = model.config.intermediate_size
    keep = GROUP * max(1, round(total * MLP_KEPT / GROUP))
    structured.prune_structured(model, ctx.importance("taylor"), intermediate_size=keep)
    if recover:
        seq_len, n_blocks = ctx.protocol.pruning_calibration
        text = torch.cat([b.reshape(-1, RECOVERY_SEQ_LEN) for b in ctx.calibration_blocks(seq_len, n_blocks).values()])
        structured.recover(model, text, RECOVERY, r=RECOVERY_RANK, batch_size=2)
    return Applied(model, notes=(f"{keep} of {total} MLP channels kept",))


def depth(model: nn.Module, ctx: Context) -> Applied:
    n_layers = model.config.num_hidden_layers
    keep = n_layers - max(1, round(n_layers * LAYERS_REMOVED))
    pruned = structured.prune_structured(model, ctx.importance("activation"), n_layers=keep)
    return Applied(pruned, notes=(f"{keep} of {n_layers} layers kept",))


def kv_group(model: nn.Module, ctx: Context) -> Applied:
    n_kv = anatomy.attention_shape(model.config).n_kv_heads
    if n_kv < 2:
        raise RowSkipped(f"the model has {n_kv} key-value group: none can be removed")
    pruned = structured.prune_structured(model, ctx.importance("activation"), n_kv_heads=n_kv - 1)
    return Applied(pruned, notes=(f"{n_kv - 1} of {n_kv} key-value groups kept",))


def student_name(model_name: str) -> str:
    """The cache name of a model's distilled student (``smollm2-kd``: chapter 06's name for SmolLM2's)."""
    return "smollm2-kd" if model_name == "smollm2-135m" else f"{table_stem(model_name)}-kd"


def student(model: nn.Module, ctx: Context) -> Applied:
    """Chapter 06's distilled student: from the cache, or trained now when the run allows training."""
    n_layers = max(1, round(model.config.num_hidden_layers * STUDENT_LAYERS))  # SmolLM2: 16 of 30
    recipe, blocks = ctx.calibrate(lambda: cache.influence_student_recipe(
        model, ctx.tokenizer, ctx.model_name, n_layers=n_layers))
    name = student_name(ctx.model_name)
    folder = cache.student_folder(recipe, blocks, name)
    cached = (folder / "student.json").is_file()
    if not cached and not ctx.train:
        raise RowSkipped(f"needs training ({recipe.config.steps} distillation steps; chapter 06 measured about 35 s "
                         f"on a 2-core CPU): the student is not in the cache ({folder}); run chapter 06 or pass --train")
    tokenizer = ctx.tokenizer if hasattr(ctx.tokenizer, "save_pretrained") else None  # saved beside it, if it can be
    made, record = cache.cached_student(recipe, model, blocks, name=name, tokenizer=tokenizer)
    how = "loaded from the cache, apply_s is its recorded training time" if cached else "trained now"
    return Applied(made, recorded_s=float(record["seconds"]),
                   notes=(f"{n_layers} of {model.config.num_hidden_layers} layers; {how}",))


def mqa(model: nn.Module, ctx: Context) -> Applied:
    """Chapter 07: mean-pool the key-value heads into one, then the book's uptraining of the k/v projections."""
    gqa.convert_kv_heads(model, 1)
    config, batches = gqa.uptraining_recipe(ctx.tokenizer)
    gqa.uptrain(model, batches, config)
    return Applied(model)


@torch.no_grad()
def _restore_zeros(model: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """Set the weights a pruning removed (``keep`` False) back to zero in the packed layers of a model
    quantized after pruning: zero is a point of every asymmetric grid, so the codes stay on the
    quantizer's grid (:meth:`QuantizedLinear.from_linear` checks it)."""
    replacements = {}
    for name, kept in keep.items():
        layer = model.get_submodule(name)
        weight = layer.dequantized_weight() * kept  # [out, in]
        replacements[name] = packed.QuantizedLinear.from_linear(
            anatomy.linear_from_weight(weight, layer.bias), layer.grid, qparams=layer.qparams(), weight=weight)
    anatomy.swap_linears(model, replacements)


def gptq_w4_keeping_zeros(model: nn.Module, ctx: Context) -> Applied:
    """GPTQ 4-bit calibrated on a pruned model; the pruned weights stay zero (GPTQ's updates would
    otherwise fill them)."""
    keep = {name: linear.weight != 0 for name, linear in anatomy.compressed_linears(model).items()}
    quantized = gptq_w4(model, ctx).model
    _restore_zeros(quantized, keep)
    return Applied(quantized)
