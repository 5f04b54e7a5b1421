"""refimpl.lora: adapters start as the identity update, train only A and B, merge and unmerge exactly
(float base) or into a float layer (quantized base), and validate their arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from refimpl import lora, training
from refimpl.quantization import packed, uniform


def test_a_new_adapter_changes_nothing_and_only_it_trains(tiny_llama):
    blocks = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny_llama(blocks).logits
    lora.add_lora(tiny_llama, r=4, alpha=8)
    adapters = [m for m in tiny_llama.modules() if isinstance(m, lora.LoRALinear)]
    assert len(adapters) == 2 * 7
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(blocks).logits, before)
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(lora.lora_parameters(tiny_llama)) == len(trainable)


def _fine_tune(model, blocks, steps=8):
    def loss(m, batch):
        return m(batch, labels=batch).loss
    return training.train(model, [blocks], loss, training.TrainConfig(steps=steps, lr=1e-2))


def test_merge_unmerge_and_merge_lora_compute_the_same_function(tiny_llama):
    blocks = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    lora.add_lora(tiny_llama, r=4)
    log = _fine_tune(tiny_llama, blocks)
    assert log.losses[-1] < log.losses[0]
    with torch.no_grad():
        adapted = tiny_llama(blocks).logits
        layer = tiny_llama.model.layers[0].self_attn.q_proj
        original = layer.base.weight.clone()
        layer.merge()
        torch.testing.assert_close(layer.base.weight, original + layer.delta_weight())
        layer.unmerge()
        torch.testing.assert_close(layer.base.weight, original, rtol=0, atol=1e-6)
        lora.merge_lora(tiny_llama)
        assert not any(isinstance(m, lora.LoRALinear) for m in tiny_llama.modules())
        torch.testing.assert_close(tiny_llama(blocks).logits, adapted, rtol=1e-4, atol=1e-4)


def test_adapters_on_a_quantized_base_merge_into_float_layers():
    from tiny import make_tiny_llama

    blocks = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    model = packed.pack_model(make_tiny_llama(), uniform.Grid(4, symmetric=False, group_size=64))
    lora.add_lora(model, r=2)
    _fine_tune(model, blocks, steps=3)
    with torch.no_grad():
        adapted = model(blocks).logits
        lora.merge_lora(model)
        torch.testing.assert_close(model(blocks).logits, adapted, rtol=1e-4, atol=1e-4)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)
    with pytest.raises(ValueError, match="no LoRALinear"):
        lora.merge_lora(model)


def test_validation_leaves_the_model_untouched(tiny_llama):
    names = [n for n, _ in tiny_llama.named_modules()]
    with pytest.raises(ValueError, match="k_proj: r \\(40\\)"):  # q_proj (64 wide) passes, k_proj (32) does not
        lora.add_lora(tiny_llama, r=40)
    with pytest.raises(ValueError, match="alpha"):
        lora.add_lora(tiny_llama, alpha=0)
    with pytest.raises(ValueError, match="no layer named"):
        lora.add_lora(tiny_llama, targets=("nope",))
    with pytest.raises(ValueError, match="targets"):
        lora.add_lora(tiny_llama, targets="q_proj")
    assert [n for n, _ in tiny_llama.named_modules()] == names
    assert all(p.requires_grad for p in tiny_llama.parameters())
    lora.add_lora(tiny_llama)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(tiny_llama)
    with pytest.raises(TypeError, match="base"):
        lora.LoRALinear(nn.ReLU())
    with pytest.raises(TypeError, match="quantized one"):
        lora.LoRALinear(packed.QuantizedLinear.from_linear(nn.Linear(64, 8), uniform.Grid(4, False, 64))).merge()
