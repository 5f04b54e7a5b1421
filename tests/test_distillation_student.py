"""refimpl.distillation.student: layer-subset students copy the kept layers exactly, compute what the
teacher computes without the dropped layers, run Hugging Face forward/generate/save with the KV cache,
leave the teacher alone, and reject bad layer lists."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tiny import make_tiny_llama
from refimpl import anatomy
from refimpl.distillation import student as st


def _teacher(layers=5):
    return make_tiny_llama(0, num_hidden_layers=layers, initializer_range=0.2)


def _tokens(shape=(2, 7), seed=0):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_evenly_spaced_keeps_the_first_and_the_last_layer():
    assert st.evenly_spaced(30, 10) == (0, 3, 6, 10, 13, 16, 19, 23, 26, 29)
    assert st.evenly_spaced(5, 3) == (0, 2, 4)
    assert st.evenly_spaced(5, 5) == (0, 1, 2, 3, 4)
    assert st.evenly_spaced(5, 2) == (0, 4) and st.evenly_spaced(5, 1) == (0,)
    with pytest.raises(ValueError, match="n_layers must be at most"):
        st.evenly_spaced(5, 6)


def test_kept_layers_are_copies_of_the_teachers_and_the_config_follows():
    teacher = _teacher()
    before = copy.deepcopy(teacher.state_dict())
    student = st.layer_subset_student(teacher, keep=[0, 2, 4])
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 5
    teacher_layers, student_layers = anatomy.decoder_layers(teacher), anatomy.decoder_layers(student)
    for new, old in enumerate((0, 2, 4)):
        assert student_layers[new].self_attn.layer_idx == new
        for (name, a), (_, b) in zip(student_layers[new].named_parameters(), teacher_layers[old].named_parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name  # equal values, own storage
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert student.lm_head.weight is student.get_input_embeddings().weight  # tied as in the teacher
    assert all(p.requires_grad for p in student.parameters()) and not student.training
    # training the student leaves the teacher as it was
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert [layer.self_attn.layer_idx for layer in teacher_layers] == [0, 1, 2, 3, 4]


def test_the_student_is_the_teacher_without_its_dropped_layers():
    teacher = _teacher()
    tokens = _tokens()
    student = st.layer_subset_student(teacher, n_layers=3)  # layers 0, 2, 4
    skipping = copy.deepcopy(teacher)
    for i in (1, 3):  # a dropped layer passes its input through
        anatomy.decoder_layers(skipping)[i].register_forward_hook(lambda module, args, output: args[0])
    with torch.no_grad():
        torch.testing.assert_close(student(tokens).logits, skipping(tokens).logits)
        assert not torch.allclose(student(tokens).logits, teacher(tokens).logits)
    everything = st.layer_subset_student(teacher, keep=range(5))
    with torch.no_grad():
        torch.testing.assert_close(everything(tokens).logits, teacher(tokens).logits, rtol=0, atol=0)


def test_generate_with_the_kv_cache_matches_recomputation(tmp_path):
    student = st.layer_subset_student(_teacher(), keep=[1, 4])  # layer_idx 4 would overflow a 2-layer cache
    prompt = _tokens((2, 5), seed=1)
    out = student.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                           pad_token_id=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = student(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(out, tokens)
    student.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, student(tokens).logits)


def test_layer_types_are_cut_to_the_kept_layers():
    teacher = _teacher(4)
    teacher.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    student = st.layer_subset_student(teacher, keep=[1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert len(teacher.config.layer_types) == 4


def test_spec():
    spec = st.StudentSpec("smollm2-135m", [0, 3, 29])
    assert spec.keep == (0, 3, 29)
    assert st.StudentSpec.evenly_spaced("smollm2-135m", 30, 3) == spec.__class__("smollm2-135m", (0, 14, 29))
    with pytest.raises(ValueError, match="teacher must be a non-empty str"):
        st.StudentSpec("", (0,))
    with pytest.raises(ValueError, match="keep must be strictly increasing"):
        st.StudentSpec("t", (2, 1))


@pytest.mark.parametrize("keep, message", [
    ([], "keep must be a non-empty sequence"),
    ([0, 5], r"keep must hold non-negative layer indices, below the model's 5 layers"),
    ([-1, 2], "keep must hold non-negative"),
    ([0, 2, 2], "keep must be strictly increasing"),
    ([3, 1], "keep must be strictly increasing"),
    ([0, 1.0], "keep must hold ints"),
    ("01", "keep must be a non-empty sequence"),
])
def test_bad_keep_is_rejected_and_the_teacher_untouched(keep, message):
    teacher = _teacher()
    with pytest.raises(ValueError, match=message):
        st.layer_subset_student(teacher, keep=keep)
    assert teacher.config.num_hidden_layers == 5 and len(anatomy.decoder_layers(teacher)) == 5


def test_other_bad_arguments():
    teacher = _teacher()
    with pytest.raises(ValueError, match="exactly one of keep"):
        st.layer_subset_student(teacher)
    with pytest.raises(ValueError, match="exactly one of keep"):
        st.layer_subset_student(teacher, keep=[0], n_layers=1)
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        st.layer_subset_student(teacher, n_layers=0)
    with pytest.raises(TypeError, match="Hugging Face decoder"):
        st.layer_subset_student(nn.Linear(2, 2), keep=[0])


@pytest.mark.slow
def test_a_smollm2_student(smollm2):
    model, tokenizer = smollm2
    student = st.layer_subset_student(model, n_layers=10)
    assert student.config.num_hidden_layers == 10 and model.config.num_hidden_layers == 30
    n_teacher = sum(p.numel() for p in model.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert 0.3 < n_student / n_teacher < 0.5  # tied embeddings (28 M) are a large share of 135 M
    prompt = torch.tensor([tokenizer("The quick brown fox")["input_ids"]])
    out = student.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 4)
