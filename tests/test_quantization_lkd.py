"""refimpl.quantization.lkd: ZeroQuant's layer-by-layer distillation lowers every layer's error against
its float twin below round-to-nearest's, trains one layer at a time on the float model's hidden states
(Eq. 4) or on the quantized layers' (the variant), leaves the teacher alone, and checks its arguments
before it changes anything."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from refimpl import anatomy, calibration, training
from refimpl.quantization import lkd, qat, uniform

BLOCKS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
GRID = uniform.Grid(2, symmetric=False, group_size=32)
CONFIG = training.TrainConfig(steps=30, lr=1e-3)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _student(teacher):
    student = qat.prepare_qat(copy.deepcopy(teacher), GRID)
    student.requires_grad_(False)
    for m in student.modules():  # train the latent weights only
        if isinstance(m, qat.FakeQuantLinear):
            m.weight.requires_grad_(True)
    return student


@torch.no_grad()
def _layer_errors(student, teacher, inputs="float"):
    """Each decoder layer's MSE against its float twin, on the inputs of Eq. 4 (the float model's hidden
    states) or on the student's own."""
    states = calibration.first_layer_inputs(teacher, BLOCKS, 2)
    errors = []
    for layer, teacher_layer in zip(anatomy.decoder_layers(student), anatomy.decoder_layers(teacher)):
        targets = [anatomy.layer_output(teacher_layer(h, **kw)) for h, kw in states]
        outputs = [anatomy.layer_output(layer(h, **kw)) for h, kw in states]
        errors.append(sum(F.mse_loss(o, t, reduction="sum").item() for o, t in zip(outputs, targets))
                      / sum(t.numel() for t in targets))
        states = [(t if inputs == "float" else o, kw) for (_, kw), t, o in zip(states, targets, outputs)]
    return errors


@pytest.mark.parametrize("inputs", lkd.INPUTS)
def test_lkd_lowers_every_layers_error_below_rtn(tiny_llama, inputs):
    teacher_weights = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    student = _student(tiny_llama)
    rtn_errors = _layer_errors(student, tiny_llama, inputs)  # the latent weights start at RTN
    result = lkd.layerwise_distill(student, tiny_llama, BLOCKS, CONFIG, inputs=inputs)
    before, after = zip(*result)
    # "before": the RTN layer on the same inputs (with inputs="quantized", those of the trained layers before it)
    n_same = len(rtn_errors) if inputs == "float" else 1
    assert before[:n_same] == pytest.approx(rtn_errors[:n_same], rel=1e-5)
    assert after == pytest.approx(_layer_errors(student, tiny_llama, inputs), rel=1e-5)
    assert all(a < 0.7 * b for b, a in result), result
    assert all(torch.equal(p, teacher_weights[n]) for n, p in tiny_llama.named_parameters())  # teacher untouched
    assert all(p.grad is None or not p.requires_grad for p in tiny_llama.parameters())
    converted = qat.convert_qat(copy.deepcopy(student))  # the trained weights are on the grid:
    for m in converted.modules():  # at most 2^bits values in every group
        if isinstance(m, torch.nn.Linear) and m is not converted.lm_head:
            groups = m.weight.reshape(-1, GRID.group_size)  # [out * in / 32, 32]
            assert max(len(g.unique()) for g in groups) <= 2**GRID.bits


def test_the_inputs_of_eq4_are_the_float_models(tiny_llama):
    """Layer 1 learns on the float layer 0's output (Eq. 4): the result does not depend on what layer 0
    of the student became; with inputs="quantized" it does."""
    results = {}
    for inputs in lkd.INPUTS:
        for tweak in (False, True):
            student = _student(tiny_llama)
            if tweak:  # another quantized layer 0: freeze it at a different grid point
                layer0 = anatomy.decoder_layers(student)[0]
                with torch.no_grad():
                    layer0.mlp.down_proj.weight.mul_(1.5)
            results[inputs, tweak] = lkd.layerwise_distill(student, tiny_llama, BLOCKS,
                                                           training.TrainConfig(steps=3, lr=1e-3), inputs=inputs)[1]
    assert results["float", False] == results["float", True]
    assert results["quantized", False] != results["quantized", True]


def test_one_layer_trains_at_a_time(tiny_llama, monkeypatch):
    student = _student(tiny_llama)
    layers = anatomy.decoder_layers(student)
    trained = []
    train = training.train

    def spy(model, batches, loss_fn, config, desc="train"):
        others = {n: p.clone() for n, p in student.named_parameters()
                  if not any(p is q for q in model.parameters())}
        log = train(model, batches, loss_fn, config, desc)
        trained.append(next(i for i, layer in enumerate(layers) if layer is model))
        assert all(torch.equal(p, others[n]) for n, p in student.named_parameters() if n in others), \
            "a parameter outside the layer being trained changed"
        return log

    monkeypatch.setattr(lkd.training, "train", spy)
    before = [copy.deepcopy(layer.state_dict()) for layer in layers]
    lkd.layerwise_distill(student, tiny_llama, BLOCKS, training.TrainConfig(steps=2, lr=1e-3))
    assert trained == list(range(len(layers)))
    for layer, state in zip(layers, before):  # and every layer did change
        assert any(not torch.equal(v, layer.state_dict()[k]) for k, v in state.items())


def test_validation_names_the_parameter_and_leaves_the_model_unchanged(tiny_llama):
    from tiny import make_tiny_llama

    student = _student(tiny_llama)
    weights = {n: p.clone() for n, p in student.named_parameters()}
    names = [n for n, _ in student.named_modules()]
    with pytest.raises(ValueError, match="prepare_qat first"):
        lkd.layerwise_distill(copy.deepcopy(tiny_llama), tiny_llama, BLOCKS)
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        lkd.layerwise_distill(student, "float model", BLOCKS)
    with pytest.raises(ValueError, match="steps"):
        lkd.layerwise_distill(student, tiny_llama, BLOCKS, training.TrainConfig(steps=0))
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        lkd.layerwise_distill(student, tiny_llama, BLOCKS, config={"steps": 3})
    with pytest.raises(ValueError, match="inputs must be one of"):
        lkd.layerwise_distill(student, tiny_llama, BLOCKS, inputs="teacher")
    with pytest.raises(ValueError, match="teacher has 3 decoder layers, model 2"):
        lkd.layerwise_distill(student, make_tiny_llama(num_hidden_layers=3), BLOCKS)
    with pytest.raises(ValueError, match="batch_size"):
        lkd.layerwise_distill(student, tiny_llama, BLOCKS, batch_size=0)
    with pytest.raises(ValueError, match="blocks must hold token ids"):
        lkd.layerwise_distill(student, tiny_llama, BLOCKS + 128)
    frozen = copy.deepcopy(student).requires_grad_(False)
    with pytest.raises(ValueError, match="decoder layer 0 has no parameter that requires a gradient"):
        lkd.layerwise_distill(frozen, tiny_llama, BLOCKS)
    with pytest.raises(FloatingPointError, match="at step"):  # fails in layer 0's training
        lkd.layerwise_distill(student, tiny_llama, BLOCKS, training.TrainConfig(steps=3, lr=1e30))
    assert [n for n, _ in student.named_modules()] == names
    assert all(torch.equal(p, weights[n]) for n, p in student.named_parameters())
