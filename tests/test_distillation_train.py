"""refimpl.distillation.train: every trainer lowers its loss and is deterministic, offline top-k equals
online distillation when k is the vocabulary, sequence-level KD trains on the teacher's greedy text,
on-policy distillation counts only the generated tokens, and bad arguments get errors that name them
before the student changes."""

from __future__ import annotations

import pytest
import torch

from tiny import make_tiny_llama
from refimpl.distillation import losses
from refimpl.distillation import train as kd
from refimpl.distillation.student import layer_subset_student
from refimpl.training import TrainConfig

VOCAB = 128


@pytest.fixture
def teacher():
    # a larger init scale gives peaked next-token distributions, so there is something to learn
    return make_tiny_llama(0, num_hidden_layers=4, initializer_range=0.2)


def _tokens(shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _student(teacher):
    return layer_subset_student(teacher, n_layers=2)


TRAINERS = {  # trainer -> (data shape, its own required arguments)
    kd.distill_online: ((4, 16), {}),
    kd.distill_offline_topk: ((4, 16), {"top_k": 8}),
    kd.distill_sequence_level: ((4, 6), {"max_new_tokens": 10}),
    kd.distill_on_policy: ((4, 10), {"prompt_len": 6}),
}


def _on_policy_jsd(student, teacher, prompts, new_tokens):
    """JSD(0.5) between teacher and student on the generated tokens of fixed-seed student samples."""
    sequences, generated = kd.generate_continuations(student, prompts, new_tokens, do_sample=True, seed=123)
    with torch.no_grad():
        return losses.distillation_loss(student(sequences).logits, teacher(sequences).logits,
                                        kd.next_token_labels(sequences, generated), "jsd").item()


@pytest.mark.parametrize("trainer", list(TRAINERS), ids=lambda trainer: trainer.__name__)
def test_each_trainer_lowers_its_loss_and_is_deterministic(teacher, trainer):
    shape, options = TRAINERS[trainer]
    data = _tokens(shape)
    config = TrainConfig(steps=8, lr=3e-3, seed=1)
    students = [_student(teacher), _student(teacher)]
    on_policy = trainer is kd.distill_on_policy
    before = _on_policy_jsd(students[0], teacher, data[:, :6], 4) if on_policy else None
    runs = [trainer(student, teacher, data, config, batch_size=4, **options).losses for student in students]
    assert runs[0] == runs[1]  # same seed, same losses, bit for bit
    losses_ = runs[0]
    assert len(losses_) == 8 and all(torch.isfinite(torch.tensor(losses_)))
    if on_policy:  # fresh samples at every step: measure on fixed-seed samples before and after
        assert _on_policy_jsd(students[0], teacher, data[:, :6], 4) < 0.8 * before
    else:  # one batch, seen at every step
        assert losses_[-1] < 0.5 * losses_[0]


def test_training_changes_the_student_only(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _student(teacher)
    teacher.train()
    kd.distill_online(student, teacher, _tokens((2, 8)), TrainConfig(steps=2, lr=1e-2))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert teacher.training and not student.training  # modes restored
    assert not torch.equal(student.lm_head.weight, teacher.lm_head.weight)


def test_online_alpha_mixes_in_cross_entropy_on_the_data(teacher, monkeypatch):
    seen = []
    real = losses.distillation_loss

    def spy(student_logits, teacher_logits, labels, kind, alpha, temperature, beta):
        seen.append((labels.clone(), kind, alpha, temperature, beta))
        return real(student_logits, teacher_logits, labels, kind, alpha, temperature, beta)

    monkeypatch.setattr(losses, "distillation_loss", spy)
    data = _tokens((2, 8))
    kd.distill_online(_student(teacher), teacher, data, TrainConfig(steps=1), loss="reverse_kl", alpha=0.25,
                      temperature=2.0, beta=0.3)
    labels, kind, alpha, temperature, beta = seen[0]
    assert torch.equal(labels[:, :-1], data[:, 1:]) and (labels[:, -1] == -100).all()  # next tokens
    assert (kind, alpha, temperature, beta) == ("reverse_kl", 0.25, 2.0, 0.3)


def test_offline_top_k_of_the_whole_vocabulary_is_online_distillation(teacher):
    data = _tokens((4, 12), seed=2)
    config = TrainConfig(steps=4, lr=3e-3)
    for kind in losses.KINDS:
        online = kd.distill_online(_student(teacher), teacher, data, config, loss=kind, temperature=2.0,
                                   batch_size=2).losses
        offline = kd.distill_offline_topk(_student(teacher), teacher, data, config, top_k=VOCAB, loss=kind,
                                          temperature=2.0, batch_size=2).losses
        torch.testing.assert_close(torch.tensor(offline), torch.tensor(online), rtol=1e-2, atol=1e-4)


def test_teacher_topk_stores_what_it_measures(teacher):
    data = _tokens((3, 10), seed=3)
    targets = kd.teacher_topk(teacher, data, k=5, batch_size=2)
    assert targets.log_probs.shape == (3, 10, 5) and targets.indices.dtype == torch.int32
    assert targets.nbytes == 3 * 10 * (5 * 2 + 5 * 4 + 4)  # float16 + int32 per token, float32 remainder
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(data).logits, -1)
    top = log_p.topk(5, -1)
    assert torch.equal(targets.indices.long(), top.indices)
    torch.testing.assert_close(targets.log_probs.float(), top.values, rtol=1e-3, atol=1e-3)
    rest = torch.log1p(-top.values.exp().sum(-1))
    torch.testing.assert_close(targets.rest_log_prob, rest, rtol=1e-4, atol=1e-5)
    # a precomputed SparseTeacher trains without the teacher model
    config = TrainConfig(steps=3, lr=3e-3)
    given = kd.distill_offline_topk(_student(teacher), targets, data, config).losses
    computed = kd.distill_offline_topk(_student(teacher), teacher, data, config, top_k=5).losses
    assert given == pytest.approx(computed, rel=1e-5)  # the teacher ran in other batch sizes: rounding only


def test_continuations_are_seeded_and_masked_after_the_first_end_token(teacher):
    prompts = _tokens((3, 4), seed=4)
    state = torch.random.get_rng_state()
    a, generated = kd.generate_continuations(teacher, prompts, 8, do_sample=True, seed=5, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    b, _ = kd.generate_continuations(teacher, prompts, 8, do_sample=True, seed=5, batch_size=2)
    c, _ = kd.generate_continuations(teacher, prompts, 8, do_sample=True, seed=6, batch_size=2)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(a[:, :4], prompts)
    greedy, _ = kd.generate_continuations(teacher, prompts, 8)
    with torch.no_grad():
        assert torch.equal(greedy[:, 4], teacher(prompts).logits[:, -1].argmax(-1))
    # make the greedy token at the third generated position of row 0 the end-of-sequence token
    teacher.generation_config.eos_token_id = int(greedy[0, 6])
    teacher.generation_config.pad_token_id = 0
    ended, generated = kd.generate_continuations(teacher, prompts, 8)
    first_end = (ended[0, 4:] == greedy[0, 6]).nonzero()[0].item() + 4
    assert generated[0, 4:first_end + 1].all() and not generated[0, first_end + 1:].any()
    assert not generated[:, :4].any()


def test_sequence_level_kd_trains_on_the_teachers_greedy_text_only(teacher, monkeypatch):
    prompts = _tokens((2, 5), seed=6)
    sequences, generated = kd.generate_continuations(teacher, prompts, 7)
    captured = []
    real = kd.train

    def spy(student, batches, loss_fn, config, desc):
        captured.extend(batches)
        return real(student, batches, loss_fn, config, desc)

    monkeypatch.setattr(kd, "train", spy)
    kd.distill_sequence_level(_student(teacher), teacher, prompts, TrainConfig(steps=1), max_new_tokens=7)
    tokens, labels = captured[0]
    assert torch.equal(tokens, sequences)
    assert torch.equal(labels, kd.next_token_labels(sequences, generated))
    assert generated[:, 5:].all()  # no end-of-sequence token in this run
    assert (labels[:, :4] == -100).all() and torch.equal(labels[:, 4:-1], sequences[:, 5:])


def test_on_policy_counts_only_the_students_generated_tokens(teacher, monkeypatch):
    data = _tokens((2, 12), seed=7)
    prompt_len = 5
    seen = []
    real = losses.distillation_loss

    def spy(student_logits, teacher_logits, labels, kind, alpha, temperature, beta):
        seen.append((labels.clone(), kind, alpha))
        return real(student_logits, teacher_logits, labels, kind, alpha, temperature, beta)

    monkeypatch.setattr(losses, "distillation_loss", spy)
    teacher.generation_config.eos_token_id = None  # every sampled token counts
    kd.distill_on_policy(_student(teacher), teacher, data, TrainConfig(steps=3, lr=1e-3), prompt_len=prompt_len,
                         batch_size=2)
    for labels, kind, alpha in seen:
        assert (kind, alpha) == ("jsd", 1.0)
        counted = labels != -100
        assert not counted[:, :prompt_len - 1].any() and counted[:, prompt_len - 1:-1].all()
        assert not torch.equal(labels[:, prompt_len - 1:-1], data[:, prompt_len:])  # the student's samples

    seen.clear()  # λ = 0: the dataset's continuations
    kd.distill_on_policy(_student(teacher), teacher, data, TrainConfig(steps=1), prompt_len=prompt_len,
                         student_fraction=0.0, batch_size=2)
    assert torch.equal(seen[0][0][:, prompt_len - 1:-1], data[:, prompt_len:])
    assert (seen[0][0][:, :prompt_len - 1] == -100).all()


def test_on_policy_mixes_student_and_dataset_batches_by_lambda(teacher, monkeypatch):
    calls = []
    real = kd.generate_continuations

    def spy(*args, **kwargs):
        calls.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kd, "generate_continuations", spy)
    data = _tokens((2, 10), seed=8)
    config = TrainConfig(steps=20, lr=1e-4, seed=3)
    first = kd.distill_on_policy(_student(teacher), teacher, data, config, prompt_len=4,
                                 student_fraction=0.5).losses
    n_sampled = len(calls)
    assert 3 <= n_sampled <= 17 and len(set(calls)) == n_sampled  # about half, each with its own seed
    assert kd.distill_on_policy(_student(teacher), teacher, data, config, prompt_len=4,
                                student_fraction=0.5).losses == first
    assert calls[:n_sampled] == calls[n_sampled:]


ONLINE, OFFLINE = kd.distill_online, kd.distill_offline_topk
SEQUENCE, ON_POLICY = kd.distill_sequence_level, kd.distill_on_policy
REQUIRED = {ONLINE: {}, OFFLINE: {"top_k": 4}, SEQUENCE: {"max_new_tokens": 2}, ON_POLICY: {"prompt_len": 2}}


@pytest.mark.parametrize("trainer, kwargs, error, message", [
    (ONLINE, dict(loss="kl"), ValueError, "loss must be one of"),
    (ONLINE, dict(alpha=1.5), ValueError, "alpha must be a number in"),
    (ONLINE, dict(beta=1.0), ValueError, "beta must be a number in the open interval"),
    (ONLINE, dict(temperature=0.0), ValueError, "temperature must be a positive"),
    (ONLINE, dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    (ONLINE, dict(config=None), TypeError, "config must be a TrainConfig"),
    (ONLINE, dict(config=TrainConfig(steps=2, warmup_steps=2)), ValueError, "warmup_steps"),
    (OFFLINE, dict(top_k=None), ValueError, "top_k .* is needed when teacher is a model"),
    (OFFLINE, dict(top_k=0), ValueError, "top_k must be a positive int"),
    (OFFLINE, dict(top_k=VOCAB + 1), ValueError, "top_k must be at most"),
    (OFFLINE, dict(alpha=-0.1), ValueError, "alpha must be a number in"),
    (OFFLINE, dict(temperature=float("inf")), ValueError, "temperature must be a positive"),
    (SEQUENCE, dict(max_new_tokens=0), ValueError, "max_new_tokens must be a positive int"),
    (SEQUENCE, dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    (SEQUENCE, dict(loss="forward_kl"), TypeError, "unexpected keyword argument 'loss'"),  # cross-entropy only
    (ON_POLICY, dict(prompt_len=8), ValueError, "prompt_len must be an int in"),
    (ON_POLICY, dict(prompt_len=0), ValueError, "prompt_len must be an int in"),
    (ON_POLICY, dict(student_fraction=1.2), ValueError, "student_fraction must be a number"),
    (ON_POLICY, dict(sample_temperature=-1.0), ValueError, "sample_temperature must be a positive"),
    (ON_POLICY, dict(loss="kl"), ValueError, "loss must be one of"),
    (ON_POLICY, dict(beta=0.0), ValueError, "beta must be a number in the open interval"),
    (ON_POLICY, dict(alpha=0.5), TypeError, "unexpected keyword argument 'alpha'"),  # GKD has no hard loss
], ids=lambda value: value.__name__ if callable(value) else None)
def test_bad_arguments_are_named_and_leave_the_student_untouched(teacher, trainer, kwargs, error, message):
    student = _student(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kwargs = {"config": TrainConfig(steps=1), **REQUIRED[trainer], **kwargs}
    with pytest.raises(error, match=message):
        trainer(student, teacher, _tokens((2, 8)), **kwargs)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("trainer", list(REQUIRED), ids=lambda trainer: trainer.__name__)
def test_bad_models_and_data(teacher, trainer):
    student, config, options = _student(teacher), TrainConfig(steps=1), REQUIRED[trainer]
    param = "prompts" if trainer is SEQUENCE else "blocks"
    with pytest.raises(TypeError, match=f"{param} must be a LongTensor"):
        trainer(student, teacher, _tokens((2, 8)).int(), config, **options)
    with pytest.raises(ValueError, match=rf"{param} must hold token ids in \[0, 128\)"):
        trainer(student, teacher, _tokens((2, 8)) + VOCAB, config, **options)
    with pytest.raises(ValueError, match="student and teacher must be different"):
        trainer(teacher, teacher, _tokens((2, 8)), config, **options)
    with pytest.raises(ValueError, match="share a vocabulary"):
        trainer(make_tiny_llama(vocab_size=64), teacher, _tokens((2, 8)) % 64, config, **options)
    with pytest.raises(TypeError, match="student must be a Hugging Face causal LM"):
        trainer(torch.nn.Linear(2, 2), teacher, _tokens((2, 8)), config, **options)
    if trainer is not OFFLINE:  # stored top-k targets stand in for the teacher in offline distillation only
        with pytest.raises(TypeError, match="teacher must be a Hugging Face causal LM"):
            trainer(student, kd.teacher_topk(teacher, _tokens((2, 8)), k=4), _tokens((2, 8)), config, **options)


def test_stored_targets_must_fit_the_blocks_and_their_helpers_check_arguments(teacher):
    student, config = _student(teacher), TrainConfig(steps=1)
    targets = kd.teacher_topk(teacher, _tokens((2, 8)), k=4)
    with pytest.raises(ValueError, match="must cover blocks"):
        kd.distill_offline_topk(student, targets, _tokens((2, 8)), config, temperature=2.0)
    with pytest.raises(ValueError, match="must cover blocks"):
        kd.distill_offline_topk(student, targets, _tokens((3, 8)), config)
    with pytest.raises(ValueError, match="top_k must be None when teacher is already a SparseTeacher"):
        kd.distill_offline_topk(student, targets, _tokens((2, 8)), config, top_k=4)
    with pytest.raises(ValueError, match="k must be at most"):
        kd.teacher_topk(teacher, _tokens((2, 8)), k=VOCAB + 1)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        kd.generate_continuations(teacher, _tokens((2, 3)), 0)


@pytest.mark.slow
def test_smollm2_student_learns_from_its_teacher_online_and_offline(smollm2):
    from refimpl import data as corpora

    model, tokenizer = smollm2
    blocks = corpora.token_blocks(tokenizer, corpora.load_text("shakespeare", "calibration"), seq_len=32, n_blocks=2)
    config = TrainConfig(steps=2, lr=1e-4)
    online = kd.distill_online(layer_subset_student(model, n_layers=10), model, blocks, config, batch_size=2)
    assert online.losses[-1] < online.losses[0]
    targets = kd.teacher_topk(model, blocks, k=64)
    assert targets.nbytes * 100 < blocks.numel() * model.config.vocab_size * 4  # vs float32 logits
    offline = kd.distill_offline_topk(layer_subset_student(model, n_layers=10), targets, blocks, config,
                                      batch_size=2)
    assert offline.losses[-1] < offline.losses[0]


def test_eos_ids_reads_none_one_or_several_end_tokens(teacher):
    for eos, expected in ((None, []), (5, [5]), ([5, 7], [5, 7])):
        teacher.generation_config.eos_token_id = eos
        assert kd.eos_ids(teacher) == expected
