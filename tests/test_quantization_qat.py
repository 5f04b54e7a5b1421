"""refimpl.quantization.qat: fake quantization starts at RTN and passes gradients straight through,
LSQ step sizes learn, QAT by distillation lowers the loss, conversion back reproduces the trained
model (float or packed), LLM-QAT's self-generated text, LLM-QAT's KV cache (per token, on the grid,
trained through its rounding, kept by conversion), the KV cache of kv_cache.kv_quantization trains
through its rounding, and validation leaves the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from refimpl import anatomy, models, training
from refimpl.distillation.losses import forward_kl
from refimpl.quantization import activation, kv_cache, packed, qat, uniform


def _blocks(seed=0, n=4, length=16):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _grid(bits, group_size=32):
    return uniform.Grid(bits, symmetric=False, group_size=group_size)


@pytest.mark.parametrize("learnable_scale", [False, True])
def test_starts_at_rtn_and_passes_gradients_straight_through(learnable_scale):
    torch.manual_seed(0)
    linear = nn.Linear(128, 16, bias=False)
    grid = uniform.Grid(3, symmetric=False, group_size=32)
    layer = qat.FakeQuantLinear(linear, grid, learnable_scale=learnable_scale)
    rtn = uniform.fake_quantize(linear.weight.detach(), grid, uniform.WEIGHT_SCALE_DTYPE)
    torch.testing.assert_close(layer.quantized_weight(), rtn, rtol=0, atol=1e-6)
    x = torch.randn(5, 128, requires_grad=True)
    layer(x).pow(2).sum().backward()
    # STE: dL/dW equals dL/dW_hat = 2 (x W_hat^T)^T x inside the range
    expected = 2 * (x @ rtn.T).T @ x
    inside = layer.weight.grad != 0
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(layer.weight.grad[inside], expected.detach()[inside], rtol=1e-4, atol=1e-4)
    assert x.grad is not None
    if learnable_scale:
        assert layer.scale.grad is not None and layer.scale.grad.abs().sum() > 0


def test_lsq_step_size_gradient_is_eq3_with_clipped_weights():
    """dL/ds = g * sum_i c_i * (round(v_i) - v_i inside the range, q_min - z or q_max - z outside), with
    v = w / s and g = 1 / sqrt(N q_max); clipped weights get no gradient (Esser et al. 2020, Eq. 3)."""
    linear = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)))
    layer = qat.FakeQuantLinear(linear, uniform.Grid(3, symmetric=False), learnable_scale=True)
    with torch.no_grad():
        layer.scale.mul_(0.6)  # a finer grid than the range needs: some weights now clip
    c = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    (layer.quantized_weight() * c).sum().backward()
    s, z = layer.qparams().scale, layer.zero_point  # [2, 1]: the stored (float16) step sizes
    qmin, qmax = layer.grid.qmin, layer.grid.qmax
    v = layer.weight.detach() / s
    codes = torch.round(v) + z
    inside = (codes >= qmin) & (codes <= qmax)
    assert (~inside).any() and inside.any()
    slope = torch.where(inside, torch.round(v) - v, torch.where(codes < qmin, qmin - z, qmax - z))
    expected = (c * slope).sum(dim=1, keepdim=True) / (8 * qmax) ** 0.5
    torch.testing.assert_close(layer.scale.grad, expected)
    assert torch.equal(layer.weight.grad[~inside], torch.zeros(int((~inside).sum())))
    torch.testing.assert_close(layer.weight.grad[inside], c[inside])


def test_conversion_gives_back_the_original_dtype():
    linear = nn.Linear(64, 8).to(torch.bfloat16)
    model = nn.Sequential(linear)
    qat.prepare_qat(model, _grid(4))
    qat.convert_qat(model)
    assert isinstance(model[0], nn.Linear) and model[0].weight.dtype == torch.bfloat16


def _distill(student, teacher, blocks, steps, lr=1e-3):
    return qat.distill_from_float(student, teacher, [blocks], training.TrainConfig(steps=steps, lr=lr))


def test_distillation_from_the_float_model_is_forward_kl_on_the_shared_loop(tiny_llama):
    """LLM-QAT's objective: the same updates as the training loop with forward KL to the teacher."""
    teacher = copy.deepcopy(tiny_llama)
    students = [qat.prepare_qat(copy.deepcopy(tiny_llama), _grid(3)) for _ in range(2)]
    batches = qat.interleaved_batches(_blocks(n=4), 2)
    config = training.TrainConfig(steps=3, lr=1e-3)
    log = qat.distill_from_float(students[0], teacher, batches, config)

    def loss(m, batch):
        with torch.no_grad():
            target = teacher(batch).logits
        return forward_kl(m(batch).logits, target)

    reference = training.train(students[1], batches, loss, config)
    assert log.losses == reference.losses
    for a, b in zip(students[0].parameters(), students[1].parameters()):
        assert torch.equal(a, b)
    teacher.train()  # left in the mode it came in
    qat.distill_from_float(students[0], teacher, batches, training.TrainConfig(steps=1, lr=1e-3))
    assert teacher.training


def test_interleaved_batches_deal_blocks_in_turn():
    blocks = torch.arange(12).reshape(6, 2)  # [6, 2]
    batches = qat.interleaved_batches(blocks, 3)
    assert [b[:, 0].tolist() for b in batches] == [[0, 6], [2, 8], [4, 10]]
    with pytest.raises(ValueError, match="n_batches"):
        qat.interleaved_batches(blocks, 4)
    with pytest.raises(ValueError, match="n_batches"):
        qat.interleaved_batches(blocks, 0)
    with pytest.raises(ValueError, match="blocks"):
        qat.interleaved_batches(torch.arange(6), 2)


def test_distillation_checks_its_arguments_first(tiny_llama):
    teacher = copy.deepcopy(tiny_llama)
    with pytest.raises(ValueError, match="prepare_qat"):
        qat.distill_from_float(tiny_llama, teacher, [_blocks()])
    student = qat.prepare_qat(tiny_llama, _grid(3))
    with pytest.raises(TypeError, match="teacher"):
        qat.distill_from_float(student, "teacher", [_blocks()])


@pytest.mark.parametrize("learnable_scale, a_bits", [(False, None), (True, None), (False, 8)])
def test_qat_lowers_the_distillation_loss_and_converts_to_what_it_trained(tiny_llama, learnable_scale, a_bits):
    teacher = copy.deepcopy(tiny_llama)
    student = qat.prepare_qat(tiny_llama, _grid(2), learnable_scale=learnable_scale, a_bits=a_bits)
    scales = [m.scale.detach().clone() for m in student.modules() if isinstance(m, qat.FakeQuantLinear) and m.scale is not None]
    blocks = _blocks()
    log = _distill(student, teacher, blocks, steps=30, lr=3e-3)
    assert log.losses[-1] < 0.7 * log.losses[0]
    if learnable_scale:
        after = [m.scale for m in student.modules() if isinstance(m, qat.FakeQuantLinear)]
        assert any(not torch.equal(a, b) for a, b in zip(after, scales))
    with torch.no_grad():
        trained = student(blocks).logits
        converted = qat.convert_qat(copy.deepcopy(student))
        torch.testing.assert_close(converted(blocks).logits, trained, rtol=1e-5, atol=1e-5)
        kinds = {type(m) for m in converted.modules()}
        assert qat.FakeQuantLinear not in kinds
        assert (activation.ActivationQuantizedLinear in kinds) == (a_bits is not None)
        if a_bits is None:
            stored = qat.convert_qat(copy.deepcopy(student), pack=True)
            assert any(isinstance(m, packed.QuantizedLinear) for m in stored.modules())
            torch.testing.assert_close(stored(blocks).logits, converted(blocks).logits, rtol=1e-5, atol=1e-5)


def test_self_generated_blocks_follow_llm_qat(tiny_llama):
    blocks = qat.self_generated_blocks(tiny_llama, n_blocks=5, seq_len=12, greedy_tokens=3, seed=1, batch_size=2)
    assert blocks.shape == (5, 12) and blocks.dtype == torch.long
    assert torch.equal(blocks, qat.self_generated_blocks(tiny_llama, 5, 12, 3, seed=1, batch_size=2))
    assert not torch.equal(blocks, qat.self_generated_blocks(tiny_llama, 5, 12, 3, seed=2, batch_size=2))
    with torch.no_grad():
        logits = tiny_llama(blocks).logits  # [5, 12, vocab]
    greedy = logits[:, :3].argmax(dim=-1)  # the predictions for positions 1..3
    assert torch.equal(blocks[:, 1:4], greedy)
    assert not torch.equal(blocks[:, 4:], logits[:, 3:-1].argmax(dim=-1))  # the rest is sampled


def test_the_kv_cache_trains_through_its_rounding(tiny_llama):
    blocks = _blocks(length=40)
    with kv_cache.kv_quantization(tiny_llama, 4, key_group_size=8):
        tiny_llama(blocks, labels=blocks).loss.backward()
    grad = tiny_llama.model.layers[0].self_attn.k_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_kv_fake_quantization_at_high_bits_is_close_to_float(tiny_llama):
    blocks = _blocks(length=40)
    with torch.no_grad():
        reference = tiny_llama(blocks).logits
        errors = {bits: (qat.quantize_kv_projections(copy.deepcopy(tiny_llama), bits)(blocks).logits - reference).abs().max()
                  for bits in (8, 2)}
    assert errors[8] < 2e-2 * reference.abs().max()
    assert errors[2] > 10 * errors[8]  # and low bits are not


def test_kv_projection_passes_gradients_straight_through():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    wrapped = qat.QuantizedKVProjection(copy.deepcopy(linear), bits=3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    c = torch.randn(2, 5, 8)
    kv_hat = wrapped(x)
    assert not torch.allclose(kv_hat, linear(x))  # rounded ...
    (kv_hat * c).sum().backward()
    (linear(x_ref) * c).sum().backward()  # ... with the gradient of the identity (STE)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(wrapped.projection.weight.grad, linear.weight.grad)


def _on_token_grid(x: torch.Tensor, bits: int) -> bool:
    """Every row of ``x [..., features]`` is an integer multiple of its own symmetric step absmax / qmax."""
    step = x.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)
    codes = x / step
    return bool(torch.allclose(codes, codes.round(), atol=1e-3))


def test_the_attention_sees_keys_and_values_on_the_grid(tiny_llama):
    """Values reach the attention on LLM-QAT's grid (per token, over all key-value heads); keys are on
    it before the rotary embedding (k_proj's output), as in LLM-QAT, not after."""
    bits, blocks = 3, _blocks(n=2, length=24)
    student = qat.prepare_qat(tiny_llama, _grid(4), kv_bits=bits)
    seen, projected = {}, {}
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def record(module, query, key, value, attention_mask, **kwargs):
        seen.setdefault("key", key.detach())  # [b, kv_heads, t, d], layer 0
        seen.setdefault("value", value.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    k_proj = anatomy.decoder_layers(student)[0].self_attn.k_proj
    assert isinstance(k_proj, qat.QuantizedKVProjection) and isinstance(k_proj.projection, qat.FakeQuantLinear)
    k_proj.register_forward_hook(lambda m, args, out: projected.setdefault("key", out.detach()))
    with torch.no_grad(), models.attention_implementation(student, "record_kv", record):
        student(blocks)
    b, h, t, d = seen["value"].shape
    as_cached = lambda x: x.transpose(1, 2).reshape(b, t, h * d)  # noqa: E731  [b, t, kv_heads * d], one row per token
    assert _on_token_grid(as_cached(seen["value"]), bits)
    assert _on_token_grid(projected["key"], bits)
    assert not _on_token_grid(as_cached(seen["key"]), bits)  # the rotary embedding moves keys off the grid
    with torch.no_grad():  # the plain projection's output is not on the grid
        assert not _on_token_grid(k_proj.projection(torch.randn(2, 5, k_proj.projection.in_features)), bits)


def test_kv_quantization_trains_and_survives_conversion(tiny_llama):
    teacher = copy.deepcopy(tiny_llama)
    student = qat.prepare_qat(tiny_llama, _grid(2), kv_bits=3)
    blocks = _blocks(length=24)
    log = _distill(student, teacher, blocks, steps=30, lr=3e-3)
    assert log.losses[-1] < 0.7 * log.losses[0]
    with torch.no_grad():
        trained = student(blocks).logits
        for pack in (False, True):
            converted = qat.convert_qat(copy.deepcopy(student), pack=pack)
            assert all(isinstance(layer.self_attn.v_proj, qat.QuantizedKVProjection)
                       for layer in anatomy.decoder_layers(converted))
            torch.testing.assert_close(converted(blocks).logits, trained, rtol=1e-5, atol=1e-5)


def test_kv_bits_validation_names_the_parameter_and_changes_nothing(tiny_llama):
    names = [n for n, _ in tiny_llama.named_modules()]
    for bad in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="kv_bits must be an int in \\[2, 8\\]"):
            qat.prepare_qat(tiny_llama, _grid(4), kv_bits=bad)
    with pytest.raises(ValueError, match="kv_bits must be an int"):
        qat.quantize_kv_projections(tiny_llama, None)
    assert [n for n, _ in tiny_llama.named_modules()] == names
    qat.quantize_kv_projections(tiny_llama, 4)
    names = [n for n, _ in tiny_llama.named_modules()]
    with pytest.raises(ValueError, match="kv_bits: decoder layer 0 already quantizes the output of self_attn.k_proj"):
        qat.prepare_qat(tiny_llama, _grid(4), kv_bits=4)
    assert [n for n, _ in tiny_llama.named_modules()] == names  # no FakeQuantLinear swapped in either
    mlp_only = nn.Module()
    mlp_only.model = nn.Module()
    mlp_only.model.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4))])
    with pytest.raises(ValueError, match="kv_bits: decoder layer 0 has no self_attn.k_proj"):
        qat.prepare_qat(mlp_only, _grid(2, 4), kv_bits=4)
    assert isinstance(mlp_only.model.layers[0][0], nn.Linear)


def test_validation_leaves_the_model_untouched(tiny_llama):
    names = [n for n, _ in tiny_llama.named_modules()]
    with pytest.raises(ValueError, match="group_size 48 must divide"):
        qat.prepare_qat(tiny_llama, _grid(4, 48))
    with pytest.raises(TypeError, match="grid must be a uniform.Grid"):
        qat.prepare_qat(tiny_llama, 4)
    with pytest.raises(ValueError, match="bits"):
        qat.prepare_qat(tiny_llama, _grid(4), a_bits=1)
    with pytest.raises(ValueError, match="grid must have a granularity in \\['channel', 'group'\\], got 'tensor'"):
        qat.prepare_qat(tiny_llama, uniform.Grid(4, symmetric=False, per="tensor"))
    with pytest.raises(TypeError, match="learnable_scale"):
        qat.prepare_qat(tiny_llama, _grid(4, 64), learnable_scale=1)
    assert [n for n, _ in tiny_llama.named_modules()] == names
    with pytest.raises(ValueError, match="prepare_qat first"):
        qat.convert_qat(tiny_llama)
    qat.prepare_qat(tiny_llama, _grid(4), a_bits=8)
    with pytest.raises(ValueError, match="pack=True"):
        qat.convert_qat(tiny_llama, pack=True)
    with pytest.raises(ValueError, match="n_blocks"):
        qat.self_generated_blocks(tiny_llama, 0, 8)
