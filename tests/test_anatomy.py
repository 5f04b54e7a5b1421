"""refimpl.anatomy: the decoder layers, the linear layers a method compresses and their names, building
and swapping layers, and the attention sizes of a config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from refimpl import anatomy

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_decoder_layers_are_the_models_blocks(tiny_llama):
    assert anatomy.decoder_layers(tiny_llama) is tiny_llama.model.layers


@pytest.mark.parametrize("model", [nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))])
def test_models_without_decoder_layers_are_rejected(model):
    with pytest.raises(TypeError, match="model.model.layers"):
        anatomy.decoder_layers(model)


def test_a_decoder_without_layers_is_rejected(tiny_llama):
    tiny_llama.model.layers = nn.ModuleList()
    with pytest.raises(TypeError, match="model.model.layers"):
        anatomy.decoder_layers(tiny_llama)


def test_layer_output_is_the_hidden_states_alone_or_first():
    hidden = torch.ones(1, 2, 3)
    assert anatomy.layer_output(hidden) is hidden
    assert anatomy.layer_output((hidden, None)) is hidden


def test_linears_of_a_layer_by_relative_name_in_module_order(tiny_llama):
    layer = tiny_llama.model.layers[1]
    linears = anatomy.linears(layer)
    assert tuple(linears) == PROJECTIONS
    assert linears["mlp.up_proj"] is layer.mlp.up_proj
    assert tuple(anatomy.linears(layer, skip=("self_attn",))) == PROJECTIONS[4:]


def test_compressed_linears_are_every_projection_by_full_name_but_the_output_layer(tiny_llama):
    names = [anatomy.layer_name(i, name) for i in range(2) for name in PROJECTIONS]
    assert list(anatomy.compressed_linears(tiny_llama)) == names
    assert list(anatomy.compressed_linears(tiny_llama, skip=())) == names + ["lm_head"]
    assert list(anatomy.compressed_linears(tiny_llama, skip=("mlp", "lm_head"))) == [
        anatomy.layer_name(i, name) for i in range(2) for name in PROJECTIONS[:4]]


def test_layer_name_is_the_name_the_model_gives_the_module(tiny_llama):
    modules = dict(tiny_llama.named_modules())
    assert modules[anatomy.layer_name(1, "mlp.down_proj")] is tiny_llama.model.layers[1].mlp.down_proj
    assert anatomy.layer_name(3, "self_attn.q_proj") == "model.layers.3.self_attn.q_proj"


def test_linears_validate():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        anatomy.linears("model")
    with pytest.raises(ValueError, match="skip must be a tuple"):
        anatomy.linears(nn.Linear(2, 2), skip="lm_head")  # a string would skip every name with an l, m, ...
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        anatomy.compressed_linears(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        anatomy.compressed_linears(nn.Sequential(nn.Linear(2, 2)), skip=("0",))


@pytest.mark.parametrize("index, name, match", [
    (-1, "mlp.up_proj", "index must be a non-negative int"),
    (True, "mlp.up_proj", "index must be a non-negative int"),
    (0, "", "name must be a non-empty module name"),
    (0, None, "name must be a non-empty module name"),
])
def test_layer_name_validates(index, name, match):
    with pytest.raises(ValueError, match=match):
        anatomy.layer_name(index, name)


def test_linear_from_weight_copies_weight_and_bias():
    weight, bias = torch.randn(3, 5), torch.randn(3)
    linear = anatomy.linear_from_weight(weight, bias)
    assert (linear.in_features, linear.out_features) == (5, 3)
    assert torch.equal(linear.weight, weight) and torch.equal(linear.bias, bias)
    assert linear.weight.data_ptr() != weight.data_ptr() and linear.weight.requires_grad
    assert anatomy.linear_from_weight(weight).bias is None
    assert anatomy.linear_from_weight(weight, dtype=torch.bfloat16).weight.dtype == torch.bfloat16


@pytest.mark.parametrize("weight, bias, match", [
    (torch.randn(5), None, "weight must be a 2-D floating-point tensor"),
    (torch.ones(3, 5, dtype=torch.long), None, "weight must be a 2-D floating-point tensor"),
    (torch.randn(3, 5), torch.randn(5), r"bias must be None or a tensor \[3\]"),
])
def test_linear_from_weight_validates(weight, bias, match):
    with pytest.raises(ValueError, match=match):
        anatomy.linear_from_weight(weight, bias)


def test_swap_linears_puts_modules_in_place_by_name(tiny_llama):
    up, head = nn.Linear(64, 128), nn.Linear(64, 128)
    assert anatomy.swap_linears(tiny_llama, {"model.layers.1.mlp.up_proj": up, "lm_head": head}) is tiny_llama
    assert tiny_llama.model.layers[1].mlp.up_proj is up and tiny_llama.lm_head is head


def test_swap_linears_looks_up_every_name_first(tiny_llama):
    before = tiny_llama.model.layers[0].mlp.up_proj
    with pytest.raises(AttributeError, match="no_such_proj"):
        anatomy.swap_linears(tiny_llama, {"model.layers.0.mlp.up_proj": nn.Linear(64, 128),
                                          "model.layers.1.mlp.no_such_proj": nn.Linear(64, 128)})
    assert tiny_llama.model.layers[0].mlp.up_proj is before


@pytest.mark.parametrize("replacements", [[("lm_head", nn.Linear(2, 2))], {"lm_head": torch.zeros(2, 2)}])
def test_swap_linears_validates(tiny_llama, replacements):
    with pytest.raises(TypeError, match="replacements must be a dict"):
        anatomy.swap_linears(tiny_llama, replacements)


def test_attention_shape_of_a_grouped_query_model(tiny_llama):
    assert anatomy.attention_shape(tiny_llama.config) == anatomy.AttentionShape(
        n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16)


def test_attention_shape_defaults_and_errors():
    from transformers import GPT2Config

    shape = anatomy.attention_shape(GPT2Config(n_layer=2, n_head=4, n_embd=64))
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim) == (2, 4, 4, 16)
    with pytest.raises(ValueError, match="config must describe a decoder"):
        anatomy.attention_shape(object())
