"""Errors that leave the model whole (issue 23, part 5), for every public function of refimpl.

1. A function that changes the caller's model in place and fails half-way — activations that overflow
   in a later layer, training that diverges after its first step, a module swap that fails — leaves
   the model bit for bit as it was, with the same module objects (:mod:`refimpl._rollback`).
2. Custom layers refuse integer inputs and inputs of the wrong width, as ``nn.Linear`` does.
3. Token ids outside the vocabulary (or of the wrong dtype or shape) are refused up front, naming the
   argument, by every function that takes them.
4. NaN or Inf scores are refused instead of being ranked first (and kept).
5. ``load_model(device="cuda")`` without CUDA fails before loading anything.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
import re
from typing import Any, Callable

import pytest
import torch
from torch import nn

import refimpl
from tiny import make_tiny_llama
from refimpl import _rollback, anatomy, calibration, evaluate, lora, models, tradeoffs, training
from refimpl.attention import gqa
from refimpl.attention.decoder import Decoder
from refimpl.decoding.generate import Sampling, generate
from refimpl.decoding.speculative import ModelDraft, PromptLookupDraft, speculative_generate
from refimpl.distillation import losses
from refimpl.distillation import step_by_step as sbs
from refimpl.distillation import cache
from refimpl.distillation import train as kd
from refimpl.distillation.student import StudentSpec, layer_subset_student
from refimpl.pruning import magnitude, masks, sparsegpt, structured, wanda
from refimpl.quantization import (activation, awq, gptq, lkd, llm_int8, packed, qat, qlora, smoothquant,
                                  uniform, zeroquant)
from refimpl.training import TrainConfig

VOCAB = 128  # make_tiny_llama's
BLOCKS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
G4 = uniform.Grid(4, symmetric=False, group_size=32)  # the weight grid of the quantizing cases
DIVERGES = TrainConfig(steps=3, lr=1e30)  # step 0 is finite, step 1 is not: training fails with the model changed


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- what "whole" means --------------------------------------------------------------------------


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call must leave as it was: the module objects by name and their classes and
    modes, every parameter's and buffer's bytes, ``requires_grad`` and gradient, and the config."""
    def raw(t: torch.Tensor | None) -> torch.Tensor | None:  # bytes, so that NaN equals NaN
        return None if t is None else t.detach().clone().contiguous().view(-1).view(torch.uint8)

    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {"modules": dict(model.named_modules(remove_duplicate=False)),
            "classes": {name: type(m) for name, m in model.named_modules(remove_duplicate=False)},
            "training": {name: m.training for name, m in model.named_modules(remove_duplicate=False)},
            "tensors": {name: (t, t.dtype, t.shape, raw(t), t.requires_grad, raw(t.grad)) for name, t in tensors},
            "config": copy.deepcopy(vars(model.config)) if hasattr(model, "config") else None}


def _assert_whole(model: nn.Module, before: dict[str, Any]) -> None:
    after = _state(model)
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][name] is m for name, m in before["modules"].items()), "a module was replaced"
    assert after["classes"] == before["classes"] and after["training"] == before["training"]
    assert after["config"] == before["config"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (tensor, dtype, shape, data, requires_grad, grad) in before["tensors"].items():
        now = after["tensors"][name]
        assert now[0] is tensor and (now[1], now[2]) == (dtype, shape), name
        assert torch.equal(now[3], data), f"{name} changed"
        assert now[4] == requires_grad, f"{name}.requires_grad changed"
        assert (grad is None and now[5] is None) or torch.equal(now[5], grad), f"{name}.grad changed"


def _overflowing() -> nn.Module:
    """Layer 1's MLP inputs overflow to Inf: a method calibrated layer by layer fails there, after it
    has rewritten layer 0."""
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(3e38)
    return model


def _nan_in_layer_1() -> nn.Module:
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    return model


def _packed_layer_1() -> nn.Module:
    """Layer 1's value projection is packed (no ``.weight``): a conversion fails there, after layer 0."""
    model = make_tiny_llama()
    attn = model.model.layers[1].self_attn
    attn.v_proj = packed.QuantizedLinear.from_linear(attn.v_proj, uniform.Grid(8, symmetric=False))
    return model


def _importance(model: nn.Module, nan: bool = False) -> structured.Importance:
    """Random scores of ``model``'s structures; with ``nan``, the first of every kind is NaN."""
    c, g = model.config, torch.Generator().manual_seed(0)
    shapes = [(c.num_hidden_layers, c.num_attention_heads), (c.num_hidden_layers, c.num_key_value_heads),
              (c.num_hidden_layers, c.intermediate_size), (c.num_hidden_layers,)]
    scores = [torch.rand(shape, generator=g) for shape in shapes]
    if nan:
        scores = [s.index_fill(-1, torch.tensor([0]), float("nan")) for s in scores]
    return structured.Importance(*scores)


def _encode(text: str) -> list[int]:
    return [ord(ch) % VOCAB for ch in text]


def _step_by_step_batches() -> list[sbs.MultiTaskBatch]:
    return sbs.multitask_batches(["ab?", "cd?"], [sbs.Rationale("because", "A"), sbs.Rationale("since", "B")],
                                 _encode, _encode, pad_id=0)


def _quantized_copy(model: nn.Module) -> nn.Module:
    return qat.prepare_qat(copy.deepcopy(model), G4)


# --- 1. a failure half-way leaves the model whole ------------------------------------------------

# name -> () -> (the model that must stay whole, the call that fails, the error it raises)
Case = Callable[[], tuple[nn.Module, Callable[[], Any], type[BaseException]]]


def _case(make_model: Callable[[], nn.Module], call: Callable[[nn.Module], Any],
          error: type[BaseException] = ValueError) -> Case:
    def make():
        model = make_model()
        return model, lambda: call(model), error
    return make


def _lkd_case() -> tuple[nn.Module, Callable[[], Any], type[BaseException]]:
    teacher = make_tiny_llama()
    student = _quantized_copy(teacher)  # layer 0 is trained before the loss diverges
    return student, lambda: lkd.layerwise_distill(student, teacher, BLOCKS, TrainConfig(steps=3, lr=1e30)), FloatingPointError


def _distill_case(trainer: Callable[..., training.TrainLog], **options: Any) -> Case:
    def make():
        student, teacher = make_tiny_llama(1), make_tiny_llama(0)
        return student, lambda: trainer(student, teacher, BLOCKS[:, :8], DIVERGES, batch_size=1,
                                        **options), FloatingPointError
    return make


def _merge_case() -> tuple[nn.Module, Callable[[], Any], type[BaseException]]:
    model = lora.add_lora(make_tiny_llama(), r=4)
    model.model.layers[1].mlp.down_proj.lora_B = nn.Parameter(torch.ones(1, 1))  # layer 1's cannot be merged
    return model, lambda: lora.merge_lora(model), RuntimeError


FAILS_HALF_WAY: dict[str, Case] = {
    # calibrated layer by layer: layer 1 overflows after layer 0 was rewritten
    "gptq": _case(_overflowing, lambda m: gptq.quantize_model_gptq(m, BLOCKS, G4)),
    "gptq-pack": _case(_overflowing, lambda m: gptq.quantize_model_gptq(m, BLOCKS, G4, pack=True)),
    "awq": _case(_overflowing, lambda m: awq.quantize_model_awq(m, BLOCKS, G4, clip=True)),
    "awq-pack": _case(_overflowing, lambda m: awq.quantize_model_awq(m, BLOCKS, G4, pack=True)),
    "wanda": _case(_overflowing, lambda m: wanda.prune_model_wanda(m, BLOCKS, 0.5)),
    "wanda-2:4": _case(_overflowing, lambda m: wanda.prune_model_wanda(m, BLOCKS, 0.0, nm=(2, 4))),
    "sparsegpt": _case(_overflowing, lambda m: sparsegpt.prune_model_sparsegpt(m, BLOCKS, 0.5)),
    "smoothquant": _case(_overflowing, lambda m: smoothquant.smooth_model(m, BLOCKS)),
    "w8a8-static": _case(_overflowing, lambda m: activation.quantize_model_w8a8(
        m, BLOCKS, act_grid=uniform.Grid(8, per="tensor"), static=True)),
    # trained: the loss diverges at step 1, after step 0 changed the model
    "zeroquant-lkd": _lkd_case,
    "train": _case(make_tiny_llama, lambda m: training.train(m, list(BLOCKS.split(1)), training.next_token_loss,
                                                             DIVERGES), FloatingPointError),
    "qat-train": _case(lambda: qat.prepare_qat(make_tiny_llama(), G4),
                       lambda m: training.train(m, list(BLOCKS.split(1)), training.next_token_loss, DIVERGES),
                       FloatingPointError),
    "distill-online": _distill_case(kd.distill_online),
    "distill-offline": _distill_case(kd.distill_offline_topk, top_k=4),
    "distill-sequence": _distill_case(kd.distill_sequence_level, max_new_tokens=2),
    "distill-on-policy": _distill_case(kd.distill_on_policy, prompt_len=4),
    "distill-step-by-step": _case(lambda: make_tiny_llama(1), lambda m: sbs.distill_step_by_step(
        m, _step_by_step_batches(), DIVERGES), FloatingPointError),
    "llm-pruner-recover": _case(make_tiny_llama, lambda m: structured.recover(m, BLOCKS, DIVERGES, r=4, batch_size=1),
                                FloatingPointError),
    # converted layer by layer: layer 1 cannot be, after layer 0 was
    "gqa-convert": _case(_packed_layer_1, lambda m: gqa.convert_kv_heads(m, 1), AttributeError),
    "gqa-expand": _case(_packed_layer_1, lambda m: gqa.expand_kv_heads(m, 4), AttributeError),
    "merge-lora": _merge_case,  # every merged layer is built before the first swap
    "swap-linears": _case(make_tiny_llama, lambda m: anatomy.swap_linears(m, {
        "model.layers.0.mlp.up_proj": nn.Linear(64, 128), "model.layers.1.mlp.no_such_proj": nn.Linear(64, 128)}),
        AttributeError),
    # NaN scores: refused before anything changes (they were ranked first and kept)
    "prune-structured": _case(make_tiny_llama, lambda m: structured.prune_structured(
        m, _importance(m, nan=True), intermediate_size=64, heads_per_group=1)),
    # checked before the first change, a bad weight in layer 1 included
    "rtn": _case(_nan_in_layer_1, lambda m: uniform.quantize_model_rtn(m, G4)),
    "magnitude": _case(_nan_in_layer_1, lambda m: magnitude.prune_model_magnitude(m, 0.5)),
    "pack": _case(_nan_in_layer_1, lambda m: packed.pack_model(m, G4)),
    "nf4": _case(_nan_in_layer_1, lambda m: packed.pack_model_code_book(m)),
    "llm-int8": _case(_nan_in_layer_1, lambda m: llm_int8.quantize_model_int8(m)),
    "w8a8": _case(_nan_in_layer_1, lambda m: activation.quantize_model_w8a8(m)),
    "zeroquant": _case(_nan_in_layer_1, lambda m: zeroquant.quantize_model_zeroquant(m)),
    "prepare-qat": _case(_nan_in_layer_1, lambda m: qat.prepare_qat(m, G4)),
    "convert-qat": _case(lambda: qat.prepare_qat(make_tiny_llama(), G4, a_bits=8),
                         lambda m: qat.convert_qat(m, pack=True)),
    "add-lora": _case(make_tiny_llama, lambda m: lora.add_lora(m, r=100)),
    "prepare-qlora": _case(make_tiny_llama, lambda m: qlora.prepare_qlora(m, r=100)),
    "keep-layers": _case(make_tiny_llama, lambda m: structured.keep_layers(m, [0, 2])),
}


@pytest.mark.parametrize("make", FAILS_HALF_WAY.values(), ids=FAILS_HALF_WAY.keys())
def test_a_failure_half_way_leaves_the_model_whole(make):
    model, call, error = make()
    before = _state(model)
    with pytest.raises(error):
        call()
    _assert_whole(model, before)


@pytest.fixture
def swaps_then_fail(monkeypatch):
    """Call it to make ``anatomy.swap_linears`` swap, then fail: every module swap of refimpl goes through it."""
    swap = anatomy.swap_linears

    def failing(model, replacements):
        swap(model, replacements)
        raise RuntimeError("injected failure after a module swap")

    return lambda: monkeypatch.setattr(anatomy, "swap_linears", failing)


SWAPS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Any]]] = {
    "pack": (make_tiny_llama, lambda m: packed.pack_model(m, G4)),
    "nf4": (make_tiny_llama, lambda m: packed.pack_model_code_book(m)),
    "llm-int8": (make_tiny_llama, lambda m: llm_int8.quantize_model_int8(m)),
    "w8a8": (make_tiny_llama, lambda m: activation.quantize_model_w8a8(m)),
    "zeroquant": (make_tiny_llama, lambda m: zeroquant.quantize_model_zeroquant(m)),
    "gptq-pack": (make_tiny_llama, lambda m: gptq.quantize_model_gptq(m, BLOCKS, G4, pack=True)),
    "awq-pack": (make_tiny_llama, lambda m: awq.quantize_model_awq(m, BLOCKS, G4, pack=True)),
    "prepare-qat": (make_tiny_llama, lambda m: qat.prepare_qat(m, G4)),
    "prepare-qat-kv": (make_tiny_llama, lambda m: qat.prepare_qat(m, G4, kv_bits=4)),
    "quantize-kv-projections": (make_tiny_llama, lambda m: qat.quantize_kv_projections(m, 4)),
    "convert-qat": (lambda: qat.prepare_qat(make_tiny_llama(), G4), lambda m: qat.convert_qat(m)),
    "add-lora": (make_tiny_llama, lambda m: lora.add_lora(m, r=4)),
    "merge-lora": (lambda: lora.add_lora(make_tiny_llama(), r=4), lambda m: lora.merge_lora(m)),
    "prepare-qlora": (make_tiny_llama, lambda m: qlora.prepare_qlora(m, r=4)),
    "prune-structured": (make_tiny_llama, lambda m: structured.prune_structured(m, _importance(m),
                                                                                 intermediate_size=64)),
}


@pytest.mark.parametrize("make_model, call", SWAPS.values(), ids=SWAPS.keys())
def test_a_failure_after_a_module_swap_puts_the_same_modules_back(swaps_then_fail, make_model, call):
    model = make_model()
    swaps_then_fail()
    before = _state(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        call(model)
    _assert_whole(model, before)


def test_the_snapshot_restores_values_structure_flags_gradients_config_class_and_hooks(tiny_llama):
    layer = tiny_llama.model.layers[0]
    layer.mlp.up_proj.weight.grad = torch.ones_like(layer.mlp.up_proj.weight)
    seen = []
    handle = layer.mlp.register_forward_hook(lambda *args: seen.append(1))  # the caller's hook
    before = _state(tiny_llama)
    with pytest.raises(KeyError):
        with _rollback.restored_on_error(tiny_llama):
            with torch.no_grad():
                layer.mlp.up_proj.weight.mul_(2)
                layer.mlp.up_proj.weight.grad.add_(1)
                tiny_llama.model.embed_tokens.weight.data = torch.zeros(3, 3)  # new data, another shape
            layer.mlp.gate_proj.weight.requires_grad_(False)
            layer.mlp.down_proj = nn.Identity()
            layer.self_attn.extra = nn.Linear(2, 2)
            layer.self_attn.num_key_value_groups = 7
            tiny_llama.config.num_key_value_heads = 1
            tiny_llama.train()
            torch.nn.utils.parametrize.register_parametrization(layer.self_attn.q_proj, "weight", nn.Identity())
            layer.mlp.register_forward_hook(lambda *args: None)
            raise KeyError("fail")
    _assert_whole(tiny_llama, before)
    assert not hasattr(layer.self_attn, "extra") and layer.self_attn.num_key_value_groups == 2
    handle.remove()  # the caller's handle still reaches the hook: it is gone, and no other is left
    tiny_llama(BLOCKS)
    assert seen == [] and not layer.mlp._forward_hooks
    assert not _rollback._protected


def test_a_nested_call_or_a_private_copy_takes_no_snapshot_and_success_keeps_the_changes(tiny_llama, monkeypatch):
    snapshots, init = [], _rollback._Snapshot.__init__

    def counted(self, models):
        snapshots.append(models)
        init(self, models)

    monkeypatch.setattr(_rollback._Snapshot, "__init__", counted)
    structured.prune_structured(tiny_llama, _importance(tiny_llama), intermediate_size=64, n_layers=1)
    assert len(snapshots) == 1  # keep_layers and the swaps inside ran under prune_structured's snapshot
    assert tiny_llama.config.num_hidden_layers == 1 and tiny_llama.model.layers[0].mlp.up_proj.out_features == 64
    student = layer_subset_student(make_tiny_llama(), n_layers=1)  # keep_layers on a fresh copy: no snapshot
    assert len(snapshots) == 1 and student.config.num_hidden_layers == 1
    assert not _rollback._protected


# --- 2. custom layers refuse integer inputs and inputs of the wrong width ------------------------


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 32)


LAYERS: dict[str, Callable[[], nn.Module]] = {
    "ActivationQuantizedLinear": lambda: activation.ActivationQuantizedLinear(_linear()),
    "Int8Linear": lambda: llm_int8.Int8Linear.from_linear(_linear()),
    "QuantizedLinear": lambda: packed.QuantizedLinear.from_linear(_linear(), G4),
    "CodeBookLinear": lambda: packed.CodeBookLinear.from_linear(_linear()),
    "FakeQuantLinear": lambda: qat.FakeQuantLinear(_linear(), G4),
    "QuantizedKVProjection": lambda: qat.QuantizedKVProjection(_linear(), 4),
    "LoRALinear": lambda: lora.LoRALinear(_linear(), r=4),
    "LoRALinear-on-NF4": lambda: lora.LoRALinear(packed.CodeBookLinear.from_linear(_linear()), r=4),
}


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_custom_layers_refuse_integer_inputs_and_a_wrong_width(make):
    layer = make()
    assert layer(torch.randn(3, 64)).shape == (3, 32)
    for integers in (torch.randint(0, 5, (3, 64)), torch.ones(3, 64, dtype=torch.bool)):
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            layer(integers)
    with pytest.raises(ValueError, match=r"x must be a tensor \[\.\.\., 64\], got shape \(3, 63\)"):
        layer(torch.randn(3, 63))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[0.0] * 64])


def test_every_custom_layer_of_refimpl_is_checked_above():
    """Every refimpl ``nn.Module`` whose ``forward`` takes activations ``x`` is in :data:`LAYERS`."""
    layer_classes = set()
    for info in pkgutil.walk_packages(refimpl.__path__, "refimpl."):
        if info.name.endswith("__main__"):
            continue
        for _, cls in inspect.getmembers(importlib.import_module(info.name), inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__.startswith("refimpl.") \
                    and "x" in inspect.signature(cls.forward).parameters:
                layer_classes.add(cls.__name__)
    assert layer_classes == {name.split("-")[0] for name in LAYERS}


# --- 3. token ids are checked up front ------------------------------------------------------------


def _task_batch(tokens: torch.Tensor) -> sbs.TaskBatch:
    return sbs.TaskBatch(tokens, torch.ones_like(tokens, dtype=torch.bool), tokens)


def _step_by_step_batch(tokens: torch.Tensor) -> list[sbs.MultiTaskBatch]:
    return [sbs.MultiTaskBatch(_task_batch(tokens), _task_batch(tokens))]


# name -> (argument name, call with the token ids; the model is a fresh tiny Llama)
TAKES_TOKEN_IDS: dict[str, tuple[str, Callable[[nn.Module, torch.Tensor], Any]]] = {
    "perplexity": ("blocks", lambda m, ids: evaluate.perplexity(m, ids)),
    "prefill_latency": ("input_ids", lambda m, ids: evaluate.prefill_latency(m, ids, repeats=1, warmup=0)),
    "decode_latency": ("input_ids", lambda m, ids: evaluate.decode_latency(m, ids, 2, repeats=1, warmup=0)),
    "layerwise": ("blocks", lambda m, ids: next(calibration.layerwise(m, ids))),
    "input_statistics": ("blocks", lambda m, ids: calibration.input_statistics(m, ids)),
    "activation_absmax": ("blocks", lambda m, ids: activation.activation_absmax(m, ids)),
    "outlier_statistics": ("blocks", lambda m, ids: llm_int8.outlier_statistics(m, ids)),
    "gptq": ("blocks", lambda m, ids: gptq.quantize_model_gptq(m, ids, G4)),
    "awq": ("blocks", lambda m, ids: awq.quantize_model_awq(m, ids, G4)),
    "smoothquant": ("blocks", lambda m, ids: smoothquant.smooth_model(m, ids)),
    "w8a8-static": ("blocks", lambda m, ids: activation.quantize_model_w8a8(m, ids, act_grid=uniform.Grid(8, per="tensor"),
                                                                           static=True)),
    "wanda": ("blocks", lambda m, ids: wanda.prune_model_wanda(m, ids, 0.5)),
    "sparsegpt": ("blocks", lambda m, ids: sparsegpt.prune_model_sparsegpt(m, ids, 0.5)),
    "taylor_importance": ("blocks", lambda m, ids: structured.taylor_importance(m, ids)),
    "activation_importance": ("blocks", lambda m, ids: structured.activation_importance(m, ids)),
    "recover": ("blocks", lambda m, ids: structured.recover(m, ids, TrainConfig(steps=1))),
    "layerwise_distill": ("blocks", lambda m, ids: lkd.layerwise_distill(_quantized_copy(m), m, ids)),
    "next_token_loss": ("batch", lambda m, ids: training.next_token_loss(m, ids)),
    "generate": ("input_ids", lambda m, ids: generate(m, ids, 3)),
    "Decoder": ("input_ids", lambda m, ids: Decoder.from_hf(m)(ids)),
    "speculative_generate": ("input_ids", lambda m, ids: speculative_generate(
        m, PromptLookupDraft(VOCAB), ids[:1], 3, gamma=2)),
    "teacher_topk": ("blocks", lambda m, ids: kd.teacher_topk(m, ids, k=4)),
    "generate_continuations": ("prompts", lambda m, ids: kd.generate_continuations(m, ids, 2)),
    "distill_online": ("blocks", lambda m, ids: kd.distill_online(make_tiny_llama(1), m, ids, TrainConfig(steps=1))),
    "distill_sequence_level": ("prompts", lambda m, ids: kd.distill_sequence_level(
        make_tiny_llama(1), m, ids, TrainConfig(steps=1), max_new_tokens=2)),
    "task_loss": ("batch.tokens", lambda m, ids: sbs.task_loss(m, _task_batch(ids))),
    "greedy_matches": ("batch.tokens", lambda m, ids: sbs.greedy_matches(m, _task_batch(ids))),
    "distill_step_by_step": ("batches[0].label.tokens", lambda m, ids: sbs.distill_step_by_step(
        m, _step_by_step_batch(ids), TrainConfig(steps=1))),
}


def _outside_vocabulary(ids: torch.Tensor) -> torch.Tensor:
    return ids.index_fill(1, torch.tensor([3]), VOCAB)


@pytest.mark.parametrize("param, call", TAKES_TOKEN_IDS.values(), ids=TAKES_TOKEN_IDS.keys())
@pytest.mark.parametrize("bad, error, message", [
    (_outside_vocabulary, ValueError, r"must hold token ids in \[0, 128\), below the \w+'s vocabulary size 128, "
                                      r"got ids in \[\d+, 128\]"),
    (lambda ids: -ids - 1, ValueError, r"must hold token ids in \[0, 128\)"),
    (lambda ids: ids.float(), TypeError, r"must be a LongTensor of token ids \(torch.long\), got torch.float32"),
    (lambda ids: ids.int(), TypeError, r"must be a LongTensor of token ids \(torch.long\), got torch.int32"),
    (lambda ids: ids[0], ValueError, r"must have shape \[n_sequences, seq_len\], got \(\d+,\)"),
], ids=["outside-vocabulary", "negative", "float", "int32", "one-dimensional"])
def test_token_ids_are_checked_before_anything_runs(param, call, bad, error, message):
    model = make_tiny_llama()
    before = _state(model)
    with pytest.raises(error, match=re.escape(param) + " " + message):
        call(model, bad(BLOCKS))
    _assert_whole(model, before)


def test_token_ids_without_a_model_must_be_non_negative():
    recipe = cache.StudentRecipe(StudentSpec("tiny", (0,)), TrainConfig(steps=1), data="tokens")
    with pytest.raises(ValueError, match=r"data must hold non-negative token ids, got ids in \[-1, "):
        cache.student_digest(recipe, BLOCKS.index_fill(1, torch.tensor([3]), -1))


# --- 4. NaN and Inf scores are refused, not ranked first ------------------------------------------


@pytest.mark.parametrize("field", ["heads", "kv_heads", "channels", "layers"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_structured_pruning_refuses_non_finite_importance(tiny_llama, field, value):
    importance = _importance(tiny_llama)
    getattr(importance, field).view(-1)[1] = value
    before = _state(tiny_llama)
    with pytest.raises(ValueError, match=f"importance.{field} must be finite"):
        structured.prune_structured(tiny_llama, importance, intermediate_size=64, heads_per_group=1, n_layers=1)
    _assert_whole(tiny_llama, before)


@pytest.mark.parametrize("make_mask", [
    lambda s: masks.unstructured_mask(s, 0.5), lambda s: masks.unstructured_mask(s, 0.5, "layer"),
    lambda s: masks.nm_mask(s, (2, 4)), lambda s: masks.mask(s, 0.5, None)], ids=["row", "layer", "2:4", "mask"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_masks_refuse_non_finite_scores(make_mask, value):
    scores = torch.rand(4, 8)
    scores[1, 2] = value
    with pytest.raises(ValueError, match="scores must be finite, got NaN or Inf values"):
        make_mask(scores)


def test_awq_searches_refuse_non_finite_statistics_and_weights():
    torch.manual_seed(0)
    weight, x = torch.randn(8, 64), torch.randn(32, 64)
    stats = calibration.InputStatistics.from_inputs(x)
    awq.search_scales([weight], stats, G4)  # finite: fine
    bad_stats = calibration.InputStatistics.from_inputs(x.index_fill(1, torch.tensor([5]), float("inf")))
    with pytest.raises(ValueError, match="stats.mean_abs must be finite"):
        awq.search_scales([weight], bad_stats, G4)
    with pytest.raises(ValueError, match=r"weights\[1\] must be finite"):
        awq.search_scales([weight, weight.index_fill(0, torch.tensor([2]), float("nan"))], stats, G4)
    with pytest.raises(ValueError, match="gram must be finite"):
        awq.search_clipping(weight, bad_stats.gram, G4)
    with pytest.raises(ValueError, match="weight must be finite"):
        awq.search_clipping(weight.index_fill(0, torch.tensor([2]), float("nan")), stats.gram, G4)


def test_sparsegpt_refuses_non_finite_statistics(tiny_llama):
    stats = calibration.input_statistics(tiny_llama, BLOCKS)
    name = "model.layers.1.mlp.down_proj"
    stats[name] = calibration.InputStatistics(stats[name].gram.index_fill(0, torch.tensor([0]), float("nan")),
                                              stats[name].mean_abs, stats[name].absmax, stats[name].n_tokens,
                                              stats[name].first_gram)
    before = _state(tiny_llama)
    with pytest.raises(ValueError, match="hessian_matrix holds NaN or Inf"):
        sparsegpt.prune_model_sparsegpt(tiny_llama, None, 0.0, nm=(2, 4), statistics=stats)
    _assert_whole(tiny_llama, before)
    with pytest.raises(ValueError, match="hessian_matrix holds NaN or Inf"):
        sparsegpt.sparsegpt_copies(tiny_llama, [(2, 4)], stats)


def _nan_logits() -> nn.Module:
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    return model


GREEDY, SAMPLED = Sampling(), Sampling(temperature=1.0, top_k=5)


@pytest.mark.parametrize("call, message", [
    (lambda m: generate(m, BLOCKS[:, :4], 3, GREEDY), "the logits of model"),
    (lambda m: generate(m, BLOCKS[:, :4], 3, SAMPLED), "the logits of model"),
    (lambda m: speculative_generate(m, PromptLookupDraft(VOCAB), BLOCKS[:1, :4], 3, gamma=2), "the logits of target"),
    (lambda m: speculative_generate(make_tiny_llama(), ModelDraft(m), BLOCKS[:1, :4], 3, gamma=2),
     "the logits of the draft model"),
    (lambda m: qat.self_generated_blocks(m, 2, 4), "the logits of model"),
    (lambda m: kd.teacher_topk(m, BLOCKS, k=4), "logits"),
], ids=["generate-greedy", "generate-sampled", "speculative-target", "speculative-draft", "self-generated-blocks",
        "teacher-topk"])
def test_nan_logits_are_refused_instead_of_picked_first(call, message):
    with pytest.raises(ValueError, match=f"{message} must not hold NaN or \\+Inf values"):
        call(_nan_logits())


def test_minus_inf_logits_are_tokens_ruled_out():
    logits = torch.randn(2, 8)
    logits[:, 0] = -float("inf")
    assert 0 not in losses.SparseTeacher.from_logits(logits, k=7).indices


def test_the_trade_off_readers_refuse_non_finite_figures():
    dense = {"row": "dense", "status": "ok", "weight_bytes": 4.0, **{c: 10.0 for c in tradeoffs.PPL_COLUMNS}}
    rows = [dense, {**dense, "row": "nan", tradeoffs.PPL_COLUMNS[0]: float("nan")}]
    for read in (lambda: tradeoffs.front(rows, "weight_bytes"), lambda: tradeoffs.choose(rows, "weight_bytes", 2.0)):
        with pytest.raises(ValueError, match="row 'nan' needs positive finite"):
            read()
    with pytest.raises(ValueError, match="finite numbers"):
        evaluate.pareto_frontier({"a": (1.0, float("nan")), "b": (2.0, 1.0)})


# --- 5. a device that is not there fails before the model loads -----------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_model_checks_the_device_before_loading(tiny_model_folder, monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    path, _, _ = tiny_model_folder
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.load_model(path, device=device)
    with pytest.raises(ValueError, match="holds no data"):
        models.load_model(path, device="meta")
