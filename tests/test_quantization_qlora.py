"""refimpl.quantization.qlora: an NF4 base with adapters starts as the NF4 model, trains only the
adapters, and its memory report counts what is stored, trained and kept by the optimizer."""

from __future__ import annotations

import copy

import torch

import pytest

from refimpl import lora, training
from refimpl.evaluate import model_bytes
from refimpl.quantization import packed, qlora


def test_qlora_trains_adapters_on_a_frozen_nf4_base(tiny_llama):
    blocks = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    float_bytes = model_bytes(tiny_llama)
    nf4 = packed.pack_model_code_book(copy.deepcopy(tiny_llama))
    model = qlora.prepare_qlora(tiny_llama, r=4, alpha=8)
    adapters = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
    assert len(adapters) == 14 and all(isinstance(m.base, packed.CodeBookLinear) for m in adapters)
    with torch.no_grad():
        torch.testing.assert_close(model(blocks).logits, nf4(blocks).logits)
    base = {n: b.clone() for n, b in model.named_buffers()}

    report = qlora.memory_report(model)
    expected = sum(4 * (m.in_features + m.out_features) for m in adapters)
    assert report.trainable_parameters == expected and report.trainable_bytes == 4 * expected
    assert report.optimizer_bytes is None and report.stored_bytes < 0.5 * float_bytes

    log = training.train(model, [blocks], lambda m, b: m(b, labels=b).loss, training.TrainConfig(steps=10, lr=1e-2))
    assert log.losses[-1] < log.losses[0]
    assert all(torch.equal(b, base[n]) for n, b in model.named_buffers())  # the NF4 base did not move
    after = qlora.memory_report(model, log.optimizer)
    n_tensors = 2 * len(adapters)
    assert after.optimizer_bytes == 2 * after.trainable_bytes + 4 * n_tensors  # two moments + a step count each


def test_bad_arguments_leave_the_model_unpacked(tiny_llama):
    names = {n: type(m) for n, m in tiny_llama.named_modules()}
    with pytest.raises(ValueError, match="r \\(40\\)"):
        qlora.prepare_qlora(tiny_llama, r=40)
    with pytest.raises(ValueError, match="no layer named"):
        qlora.prepare_qlora(tiny_llama, targets=("nope",))
    assert {n: type(m) for n, m in tiny_llama.named_modules()} == names


def test_merged_layers_keep_a_float_base_dtype():
    from tiny import make_tiny_llama

    model = lora.add_lora(make_tiny_llama().to(torch.bfloat16), r=2)
    lora.merge_lora(model)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
