"""refimpl.distillation.step_by_step: the teacher's output splits into (rationale, label) at the last
answer marker, the two tasks' batches count exactly the target tokens, the loss is
L_label + lambda * L_rationale by hand, lambda = 0 is label-only training step for step, training lowers
both losses deterministically, and bad arguments get errors that name them."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tiny import CharTokenizer, make_tiny_llama, save_tiny_model_folder
from refimpl.distillation import step_by_step as sbs
from refimpl.distillation import train as kd
from refimpl.training import TrainConfig, train

VOCAB = 128
END = 3  # a stand-in end-of-turn token of the character tokenizer


def _encode(text: str) -> list[int]:
    return CharTokenizer(VOCAB)(text)["input_ids"]


def _prompt(text: str) -> list[int]:
    return [1] + _encode(text) + [2]  # [1] ... [2]: a stand-in chat template


def _target(text: str) -> list[int]:
    return _encode(text) + [END]


INPUTS = ["capital of ab?", "capital of cde?", "capital of f?", "capital of gh?", "capital of ijk?"]
OUTPUTS = [sbs.Rationale(f"the capital of {x[11:-1]} is {x[11:-1].upper()}", x[11:-1].upper()) for x in INPUTS]


def _batches(batch_size: int = 5) -> list[sbs.MultiTaskBatch]:
    return sbs.multitask_batches(INPUTS, OUTPUTS, _prompt, _target, pad_id=0, batch_size=batch_size)


# --- parsing --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, rationale, label", [
    ("France is in Europe. Its capital is Paris. Answer: Paris", "France is in Europe. Its capital is Paris.", "Paris"),
    ("Reasoning.\nAnswer: Paris.\nMore text after it", "Reasoning.", "Paris"),  # first line, final stop dropped
    ("it is not the answer: Sydney. ANSWER: Canberra", "it is not the answer: Sydney.", "Canberra"),  # last marker
    ("Because.  answer:   'New Delhi'  ", "Because.", "New Delhi"),  # case-insensitive, quotes and spaces
])
def test_parse_splits_at_the_last_marker(text, rationale, label):
    assert sbs.parse_rationale(text) == sbs.Rationale(rationale, label)


def test_parse_with_another_marker():
    assert sbs.parse_rationale("Two and two. So the answer is 4.", marker="So the answer is") == \
        sbs.Rationale("Two and two.", "4")


@pytest.mark.parametrize("text, message", [
    ("The capital of France is Paris.", "no answer marker"),
    ("Answer: Paris", "no rationale"),
    ("   Answer: Paris", "no rationale"),
    ("Because. Answer:", "no label"),
    ("Because. Answer: .\nParis", "no label"),  # the label is the first line only
])
def test_parse_rejects_outputs_that_cannot_train_both_tasks(text, message):
    with pytest.raises(ValueError, match=f"text has {message}"):
        sbs.parse_rationale(text)


def test_parse_rationales_marks_unusable_outputs_none():
    parsed = sbs.parse_rationales(["Why. Answer: A", "no marker", "Answer: B", "So. answer: C"])
    assert parsed == [sbs.Rationale("Why.", "A"), None, None, sbs.Rationale("So.", "C")]


def test_parse_argument_errors():
    with pytest.raises(TypeError, match="text must be a str"):
        sbs.parse_rationale(None)
    for marker in ("", "  ", None):
        with pytest.raises(ValueError, match="marker must be a non-empty str"):
            sbs.parse_rationale("Why. Answer: A", marker=marker)
    with pytest.raises(TypeError, match="texts must be a sequence of str"):
        sbs.parse_rationales("Why. Answer: A")


# --- batches --------------------------------------------------------------------------------------------

def test_task_batch_counts_exactly_the_target_tokens():
    prompts, targets = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]]
    batch = sbs.task_batch(prompts, targets, pad_id=0)
    assert batch.tokens.tolist() == [[5, 6, 7, 10, 11, 0], [8, 9, 12, 13, 14, 15]]
    assert batch.target_mask.tolist() == [[False, False, False, True, True, False],
                                          [False, False, True, True, True, True]]
    # labels[t] is the target token at t + 1 (the logits at t predict it), -100 elsewhere
    assert batch.labels.tolist() == [[-100, -100, 10, 11, -100, -100], [-100, 12, 13, 14, 15, -100]]
    assert (batch.labels != -100).sum() == sum(map(len, targets))


def test_multitask_batches_pair_the_two_tasks_on_the_same_examples():
    batches = _batches(batch_size=2)
    assert len(batches) == 3 and batches[-1].label.tokens.shape[0] == 1  # 5 examples: 2 + 2 + 1
    for b, x, y in zip(batches, INPUTS[::2], OUTPUTS[::2]):  # the first row of each batch
        for task, prefix, text in ((b.label, sbs.LABEL_PREFIX, y.label), (b.rationale, sbs.RATIONALE_PREFIX, y.rationale)):
            row, mask = task.tokens[0], task.target_mask[0]
            assert row[~mask][:len(_prompt(prefix + x))].tolist() == _prompt(prefix + x)  # prompt with prefix
            assert row[mask].tolist() == _target(text)  # the target and its end token, nothing else
    # the rationale task's prompts differ from the label task's only by the prefix
    assert not torch.equal(batches[0].label.tokens[:, :5], batches[0].rationale.tokens[:, :5])


# --- the loss -------------------------------------------------------------------------------------------

def _hand_task_loss(model, batch) -> torch.Tensor:
    """Mean of -log q(target token | prefix) over every target token, written out."""
    with torch.no_grad():
        log_q = torch.log_softmax(model(batch.tokens).logits, dim=-1)  # [B, T, vocab]
    terms = []
    for row in range(batch.tokens.shape[0]):
        for t in range(1, batch.tokens.shape[1]):
            if batch.target_mask[row, t]:
                terms.append(-log_q[row, t - 1, batch.tokens[row, t]])
    return torch.stack(terms).mean()


def test_loss_is_label_plus_lambda_rationale_by_hand():
    model = make_tiny_llama(1)
    batch = _batches()[0]
    expected_label, expected_rationale = _hand_task_loss(model, batch.label), _hand_task_loss(model, batch.rationale)
    with torch.no_grad():
        loss = sbs.step_by_step_loss(model, batch, rationale_weight=0.3)
    torch.testing.assert_close(loss.label, expected_label)
    torch.testing.assert_close(loss.rationale, expected_rationale)
    torch.testing.assert_close(loss.total, expected_label + 0.3 * expected_rationale)
    assert not torch.isclose(expected_label, expected_rationale)  # the two terms are different numbers


def test_lambda_zero_is_label_only_training():
    batches, config = _batches(batch_size=2), TrainConfig(steps=5, lr=3e-3, seed=2)
    students = [make_tiny_llama(1), make_tiny_llama(1)]
    log = sbs.distill_step_by_step(students[0], batches, config, rationale_weight=0)
    label_only = train(students[1], [b.label for b in batches], sbs.task_loss, config)
    assert log.losses == label_only.losses == log.label_losses  # step for step, bit for bit
    assert all(math.isnan(v) for v in log.rationale_losses)
    assert all(torch.equal(a, b) for a, b in zip(students[0].parameters(), students[1].parameters()))


def test_training_lowers_both_losses_deterministically():
    batches, config = _batches(), TrainConfig(steps=30, lr=1e-2, seed=1)
    logs = [sbs.distill_step_by_step(make_tiny_llama(1), batches, config, rationale_weight=1.0) for _ in range(2)]
    log = logs[0]
    assert logs[0].losses == logs[1].losses
    assert len(log.label_losses) == len(log.rationale_losses) == 30
    assert log.label_losses[-1] < 0.5 * log.label_losses[0]
    assert log.rationale_losses[-1] < 0.5 * log.rationale_losses[0]
    torch.testing.assert_close(torch.tensor(log.losses), torch.tensor(log.label_losses) +
                               torch.tensor(log.rationale_losses))
    assert log.seconds > 0


def test_only_step_by_step_learns_the_rationale_task():
    batches, config = _batches(), TrainConfig(steps=30, lr=1e-2, seed=1)
    rationale_loss = {}
    for weight in (0.0, 1.0):
        student = make_tiny_llama(1)
        sbs.distill_step_by_step(student, batches, config, rationale_weight=weight)
        with torch.no_grad():
            rationale_loss[weight] = sbs.task_loss(student, batches[0].rationale).item()
    assert rationale_loss[1.0] < 0.5 * rationale_loss[0.0]


# --- the teacher's texts --------------------------------------------------------------------------------

def test_generate_texts_keeps_the_order_of_prompts_of_different_lengths(tmp_path):
    model, tokenizer = save_tiny_model_folder(tmp_path)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13]]
    texts = sbs.generate_texts(model, tokenizer, prompts, max_new_tokens=4)
    for prompt, text in zip(prompts, texts):
        sequences, generated = kd.generate_continuations(model, torch.tensor([prompt]), 4)
        assert text == tokenizer.decode(sequences[0][generated[0]], skip_special_tokens=True).strip()
    assert len(set(texts)) > 1


def test_greedy_matches_is_what_greedy_decoding_writes():
    model = make_tiny_llama(2)
    prompts = [[5, 6, 7], [8, 9]]
    written = []
    for prompt in prompts:  # the greedy continuations, one prompt at a time
        sequences, generated = kd.generate_continuations(model, torch.tensor([prompt]), 4)
        written.append(sequences[0][generated[0]].tolist())
    batch = sbs.task_batch(prompts, written, pad_id=0)  # rows of different lengths, padded
    assert sbs.greedy_matches(model, batch).tolist() == [True, True]
    wrong = [written[0], written[1][:-1] + [(written[1][-1] + 1) % VOCAB]]  # the last token of row 2 differs
    assert sbs.greedy_matches(model, sbs.task_batch(prompts, wrong, pad_id=0)).tolist() == [True, False]
    with pytest.raises(TypeError, match="batch must be a TaskBatch"):
        sbs.greedy_matches(model, _batches()[0])


# --- errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, targets, pad_id, message", [
    ([[1, 2]], [[3], [4]], 0, "prompts and targets must have the same length"),
    ([[1, 2]], [[]], 0, "targets must hold non-empty lists"),
    ([[]], [[3]], 0, "prompts must hold non-empty lists"),
    ([[1, -2]], [[3]], 0, "prompts must hold non-empty lists of non-negative int"),
    ([], [], 0, "prompts must be a non-empty sequence"),
    ([[1, 2]], [[3]], -1, "pad_id must be a non-negative int"),
])
def test_task_batch_errors(prompts, targets, pad_id, message):
    with pytest.raises(ValueError, match=message):
        sbs.task_batch(prompts, targets, pad_id)


def test_multitask_batches_errors():
    with pytest.raises(ValueError, match="outputs must hold one Rationale per input"):
        sbs.multitask_batches(INPUTS, OUTPUTS[:-1] + [None], _prompt, _target, pad_id=0)
    with pytest.raises(ValueError, match="outputs must hold one Rationale per input"):
        sbs.multitask_batches(INPUTS, OUTPUTS[:-1], _prompt, _target, pad_id=0)
    with pytest.raises(ValueError, match="label_prefix and rationale_prefix must be two different"):
        sbs.multitask_batches(INPUTS, OUTPUTS, _prompt, _target, pad_id=0, label_prefix="x", rationale_prefix="x")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        sbs.multitask_batches(INPUTS, OUTPUTS, _prompt, _target, pad_id=0, batch_size=0)
    with pytest.raises(ValueError, match="inputs must be a non-empty sequence of str"):
        sbs.multitask_batches([], [], _prompt, _target, pad_id=0)
    with pytest.raises(TypeError, match="prompt and target must be callables"):
        sbs.multitask_batches(INPUTS, OUTPUTS, "chat", _target, pad_id=0)


@pytest.mark.parametrize("weight", [-0.5, math.nan, math.inf, True, "1"])
def test_rationale_weight_errors_leave_the_student_untouched(weight):
    student = make_tiny_llama(1)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match="rationale_weight"):
        sbs.distill_step_by_step(student, _batches(), TrainConfig(steps=1), rationale_weight=weight)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_training_argument_errors():
    student = make_tiny_llama(1)
    with pytest.raises(ValueError, match="batches must be a non-empty sequence of MultiTaskBatch"):
        sbs.distill_step_by_step(student, [], TrainConfig(steps=1))
    with pytest.raises(ValueError, match="batches must be a non-empty sequence of MultiTaskBatch"):
        sbs.distill_step_by_step(student, [_batches()[0].label], TrainConfig(steps=1))
    with pytest.raises(ValueError, match="below the student's vocabulary size 64"):
        sbs.distill_step_by_step(make_tiny_llama(1, vocab_size=64), _batches(), TrainConfig(steps=1))
    with pytest.raises(TypeError, match="student must be a Hugging Face causal LM"):
        sbs.distill_step_by_step(torch.nn.Linear(2, 2), _batches(), TrainConfig(steps=1))
    with pytest.raises(TypeError, match="batch must be a MultiTaskBatch"):
        sbs.step_by_step_loss(student, _batches()[0].label)
    with pytest.raises(TypeError, match="batch must be a TaskBatch"):
        sbs.task_loss(student, _batches()[0])
