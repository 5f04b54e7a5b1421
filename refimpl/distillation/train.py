r"""Knowledge distillation of a causal language model: one trainer, four ways to use the teacher.

:func:`distill` trains a student (e.g. :func:`refimpl.distillation.student.layer_subset_student`) with the
shared loop of :mod:`refimpl.training`; only the loss and where its tokens come from change with ``mode``:

- ``"online"`` — **white-box** distillation (Hinton, Vinyals, Dean 2015, arXiv:1503.02531, §2): the
  teacher runs on every batch (without gradients) and the student matches its next-token distribution
  at every position, :math:`\alpha\,\tau^2 D(p_T, q_\theta) + (1-\alpha)\,\mathrm{CE}`
  (:func:`refimpl.distillation.losses.distillation_loss`; :math:`D` is forward KL, reverse KL as in
  MiniLLM, Gu et al. 2024, arXiv:2306.08543, or GKD's JSD(β)).
- ``"offline"`` — the same loss, but the teacher runs once before training and only its top-:math:`k`
  next-token probabilities are stored (:func:`teacher_topk`, float16 values and int32 token ids, with
  its measured bytes), so that training no longer needs the teacher; the loss compares the top-:math:`k`
  tokens and one remainder bucket (:class:`~refimpl.distillation.losses.SparseTeacher`).
- ``"sequence"`` — **black-box**, sequence-level distillation (Kim and Rush 2016, "Sequence-Level
  Knowledge Distillation", arXiv:1606.07947, §3.2): only the teacher's *text* is used. The teacher
  continues every prompt once, greedily (beam search of width 1 approximating the mode
  :math:`\hat y \approx \arg\max_y p_T(y \mid x)`, ending at its end-of-sequence token), and the
  student is trained with ordinary next-token cross-entropy on :math:`\hat y`, i.e.
  :math:`-\log q_\theta(\hat y \mid x)`.
- ``"on_policy"`` — **GKD** (Agarwal et al. 2024, "On-Policy Distillation of Language Models",
  arXiv:2306.13649, Algorithm 1): at each step, with probability :math:`\lambda` (``student_fraction``)
  the student samples continuations of the batch's prompts and the teacher scores them token by token;
  otherwise the dataset's own continuations are used. The loss, JSD(β) by default, counts only the
  continuation tokens (the prompt is input), and no gradient flows through the sampling. Training on
  its own samples addresses the train/inference mismatch of the other modes (exposure bias): the
  student learns what the teacher would do in the states the student itself reaches.

:func:`cached_student` saves a trained student in refimpl's cache (``<cache>/students/<name>-<hash>``)
with the recipe it was made by; the hash covers the recipe and the training tokens, so a changed
recipe trains a new student and an unchanged one is loaded, not retrained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from refimpl import anatomy, data
from refimpl._validation import (check_causal_lm, check_choice, check_finite, check_non_negative_int,
                                 check_positive_int, check_token_ids)
from refimpl.distillation import losses
from refimpl.distillation.losses import IGNORE_INDEX, SparseTeacher
from refimpl.distillation.student import StudentSpec, layer_subset_student
from refimpl.evaluate import eval_mode, model_device
from refimpl.pruning import structured
from refimpl.runtime import cache_dir
from refimpl.training import TrainConfig, TrainLog, train

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: The ways :func:`distill` uses the teacher.
MODES = ("online", "offline", "sequence", "on_policy")
#: Each mode's default divergence (``"sequence"`` trains with cross-entropy on the teacher's text).
DEFAULT_LOSS = {"online": "forward_kl", "offline": "forward_kl", "sequence": None, "on_policy": "jsd"}
#: The keyword arguments of :func:`distill` that only some modes use.
MODE_OPTIONS = {"top_k": ("offline",), "max_new_tokens": ("sequence",), "prompt_len": ("on_policy",),
                "student_fraction": ("on_policy",), "sample_temperature": ("on_policy",)}


@torch.no_grad()
def teacher_topk(teacher: nn.Module, blocks: torch.Tensor, k: int, temperature: float = 1.0,
                 batch_size: int = 8) -> SparseTeacher:
    """Run the teacher once over ``blocks`` and keep, at every position, its ``k`` most likely next
    tokens at ``temperature`` (float16 log-probabilities, int32 ids) and the log of the remaining mass —
    what offline distillation stores instead of the full logits (``SparseTeacher.nbytes`` measures it;
    the full float32 logits would take ``4 * vocab`` bytes per position).

    Args:
        blocks: ``LongTensor[n, seq_len]``.
        k: tokens kept per position, from 1 to the vocabulary size.
        batch_size: sequences per teacher forward pass.

    Returns:
        a :class:`SparseTeacher` with tensors ``[n, seq_len, k]`` and ``[n, seq_len]``, on the CPU.
    """
    check_causal_lm("teacher", teacher)
    check_token_ids("blocks", blocks, teacher.config.vocab_size, "teacher")
    check_positive_int("k", k)
    check_positive_int("batch_size", batch_size)
    if k > teacher.config.vocab_size:
        raise ValueError(f"k must be at most the vocabulary size {teacher.config.vocab_size}, got {k}")
    device = model_device(teacher)
    parts = []
    with eval_mode(teacher):
        for batch in blocks.split(batch_size):
            logits = teacher(batch.to(device)).logits  # [b, seq_len, vocab]
            parts.append(SparseTeacher.from_logits(logits, k, temperature).to("cpu"))
    return SparseTeacher(torch.cat([p.log_probs for p in parts]), torch.cat([p.indices for p in parts]),
                         torch.cat([p.rest_log_prob for p in parts]), parts[0].temperature)


def check_teacher_student(student: Any, teacher: Any) -> None:
    """Both causal language models, two different objects, one vocabulary; else a clear error."""
    check_causal_lm("student", student)
    check_causal_lm("teacher", teacher)
    if teacher is student:
        raise ValueError("student and teacher must be different models")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"student and teacher must share a vocabulary, got {student.config.vocab_size} "
                         f"and {teacher.config.vocab_size} tokens")


def _eos_ids(model: nn.Module) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def generate_continuations(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                           temperature: float = 1.0, seed: int = 0,
                           batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue every prompt with the model's Hugging Face ``generate`` (KV cache), greedily or by
    sampling from its full next-token distribution at ``temperature`` (top-k and top-p off).

    Sampling is seeded: the global PyTorch generator is forked (the caller's random state is left as it
    was), seeded with ``seed`` and used for all batches in order, so the same arguments give the same
    tokens. A sequence stops at an end-of-sequence token (the model's ``generation_config``); what
    follows is padding.

    Args:
        prompts: ``LongTensor[n, P]``, all of the same length (no padding).
        max_new_tokens: tokens appended to each prompt, ``N``.
        do_sample: sample (True) or pick the most likely token (False).
        temperature: sampling temperature, > 0 (unused when greedy).
        seed: seed of the sampling.
        batch_size: prompts per ``generate`` call.

    Returns:
        ``(sequences, generated)``: ``LongTensor[n, P + N]`` on the model's device, and
        ``BoolTensor[n, P + N]``, true at the generated tokens up to and including the first
        end-of-sequence token — the tokens a loss on the continuation counts.
    """
    check_causal_lm("model", model)
    check_token_ids("prompts", prompts, model.config.vocab_size)
    check_positive_int("max_new_tokens", max_new_tokens)
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
    losses._check_temperature(temperature)
    check_non_negative_int("seed", seed)
    check_positive_int("batch_size", batch_size)
    from transformers import GenerationConfig

    device = model_device(model)
    eos = _eos_ids(model)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else eos[0] if eos else 0
    sampling = dict(temperature=float(temperature), top_k=0, top_p=1.0) if do_sample else {}
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                                  eos_token_id=eos or None, **sampling)
    prompt_len, total = prompts.shape[1], prompts.shape[1] + max_new_tokens
    rng_devices = [device] if device.type == "cuda" else []
    sequences = []
    with eval_mode(model), torch.random.fork_rng(devices=rng_devices, device_type=device.type):
        torch.manual_seed(seed)
        for batch in prompts.split(batch_size):
            batch = batch.to(device)
            out = model.generate(batch, attention_mask=torch.ones_like(batch), generation_config=generation)
            sequences.append(F.pad(out, (0, total - out.shape[1]), value=pad))  # all stopped early: pad to P + N
    sequences = torch.cat(sequences)  # [n, P + N]
    generated = torch.zeros_like(sequences, dtype=torch.bool)
    generated[:, prompt_len:] = True
    if eos:
        is_eos = torch.isin(sequences[:, prompt_len:], torch.tensor(eos, device=device))  # [n, N]
        after_first_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        generated[:, prompt_len:] &= ~after_first_eos
    return sequences, generated


def next_token_labels(tokens: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
    """Labels aligned with the logits of ``tokens`` ``[B, T]``: ``labels[:, t] = tokens[:, t + 1]`` where
    that token is a target (``counted[:, t + 1]``, all by default), ``-100`` elsewhere and at the last
    position, which predicts beyond the sequence."""
    labels = torch.full_like(tokens, IGNORE_INDEX)  # [B, T]
    targets = tokens[:, 1:] if counted is None else torch.where(counted[:, 1:], tokens[:, 1:], IGNORE_INDEX)
    labels[:, :-1] = targets
    return labels


def _check_mode_options(mode: str, options: Mapping[str, Any]) -> None:
    for name, value in options.items():
        if value is not None and mode not in MODE_OPTIONS[name]:
            raise ValueError(f"{name} applies to mode {' / '.join(MODE_OPTIONS[name])} only, not to mode {mode!r}")


def distill(student: nn.Module, teacher: nn.Module | SparseTeacher, data: torch.Tensor, mode: str = "online",
            loss: str | None = None, *, config: TrainConfig, alpha: float = 1.0, temperature: float = 1.0,
            beta: float = 0.5, top_k: int | None = None, max_new_tokens: int | None = None,
            prompt_len: int | None = None, student_fraction: float | None = None,
            sample_temperature: float | None = None, batch_size: int = 8, desc: str | None = None) -> TrainLog:
    """Distil ``teacher`` into ``student`` in place with :func:`refimpl.training.train` (module docstring).

    Args:
        student: the Hugging Face causal LM to train; its parameters that require gradients train.
        teacher: a causal LM with the student's vocabulary (never trained; run in eval mode without
            gradients). For ``"offline"`` also a :class:`SparseTeacher` from :func:`teacher_topk` over
            ``data``, at ``temperature``.
        data: ``LongTensor[n, T]`` token blocks (``"online"``, ``"offline"``), prompts (``"sequence"``),
            or prompts followed by the dataset's continuations (``"on_policy"``, see ``prompt_len``).
        mode: ``"online"``, ``"offline"``, ``"sequence"`` or ``"on_policy"``.
        loss: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``; ``None`` takes the mode's default
            (:data:`DEFAULT_LOSS`). ``"sequence"`` trains with cross-entropy and takes no loss.
        config: steps, learning rate, schedule, clipping and seed (:class:`~refimpl.training.TrainConfig`).
        alpha: ``"online"``/``"offline"``: weight of the soft loss against cross-entropy on the data's
            next tokens (Hinton et al.); other modes need the default 1.
        temperature: :math:`\\tau` of the soft loss.
        beta: JSD(β)'s β, in (0, 1).
        top_k: ``"offline"``: teacher tokens stored per position (needed when ``teacher`` is a model).
        max_new_tokens: ``"sequence"``: tokens the teacher appends to every prompt (greedy decoding).
        prompt_len: ``"on_policy"``: the first ``prompt_len`` tokens of every row of ``data`` are the
            prompt, the rest the dataset's continuation, whose length the student's samples take.
        student_fraction: ``"on_policy"``: GKD's λ, the probability that a step trains on the student's
            own samples (default 1: purely on-policy).
        sample_temperature: ``"on_policy"``: the student's sampling temperature (default 1).
        batch_size: sequences per step; step ``t`` uses the ``t % n_batches``-th slice of ``data``.
        desc: progress-bar label.

    Returns:
        the :class:`~refimpl.training.TrainLog`. Arguments are checked before the student changes; a
        non-finite loss stops training at its step (``FloatingPointError``), and any error leaves the
        student as it was (:func:`refimpl.training.train` restores it).
    """
    check_choice("mode", mode, MODES)
    _check_mode_options(mode, {"top_k": top_k, "max_new_tokens": max_new_tokens, "prompt_len": prompt_len,
                               "student_fraction": student_fraction, "sample_temperature": sample_temperature})
    if mode == "sequence":
        if loss is not None:
            raise ValueError(f"loss must be None for mode 'sequence' (cross-entropy on the teacher's text), "
                             f"got {loss!r}")
    else:
        loss = DEFAULT_LOSS[mode] if loss is None else loss
        check_choice("loss", loss, losses.KINDS)
    losses._check_fraction("alpha", alpha, open_interval=False)
    if mode not in ("online", "offline") and alpha != 1:
        raise ValueError(f"alpha applies to modes 'online' and 'offline' only; mode {mode!r} needs alpha=1")
    losses._check_temperature(temperature)
    losses._check_fraction("beta", beta, open_interval=True)
    check_positive_int("batch_size", batch_size)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    check_causal_lm("student", student)
    if isinstance(teacher, SparseTeacher):
        if mode != "offline":
            raise TypeError(f"teacher may be a SparseTeacher in mode 'offline' only, not {mode!r}")
        if top_k is not None:
            raise ValueError("top_k must be None when teacher is already a SparseTeacher")
    else:
        check_teacher_student(student, teacher)
    check_token_ids("data", data, student.config.vocab_size, "student")
    n, seq_len = data.shape
    if mode == "offline" and not isinstance(teacher, SparseTeacher):
        if top_k is None:
            raise ValueError("mode 'offline' needs top_k (tokens kept per position) or a SparseTeacher as teacher")
        check_positive_int("top_k", top_k)
        if top_k > teacher.config.vocab_size:
            raise ValueError(f"top_k must be at most the vocabulary size {teacher.config.vocab_size}, got {top_k}")
    if mode == "sequence":
        if max_new_tokens is None:
            raise ValueError("mode 'sequence' needs max_new_tokens")
        check_positive_int("max_new_tokens", max_new_tokens)
    if mode == "on_policy":
        if not isinstance(prompt_len, int) or isinstance(prompt_len, bool) or not 1 <= prompt_len < seq_len:
            raise ValueError(f"mode 'on_policy' needs prompt_len, an int in [1, {seq_len}), got {prompt_len!r}")
        student_fraction = 1.0 if student_fraction is None else student_fraction
        losses._check_fraction("student_fraction", student_fraction, open_interval=False)
        sample_temperature = 1.0 if sample_temperature is None else sample_temperature
        losses._check_temperature(sample_temperature)

    device = model_device(student)
    starts = range(0, n, batch_size)
    if mode == "offline":
        targets = teacher if isinstance(teacher, SparseTeacher) \
            else teacher_topk(teacher, data, top_k, temperature, batch_size)  # the teacher's only run
        if targets.log_probs.shape[:2] != data.shape or targets.temperature != temperature:
            raise ValueError(f"the SparseTeacher must cover data {tuple(data.shape)} at temperature {temperature}, "
                             f"got positions {tuple(targets.log_probs.shape[:2])} at {targets.temperature}")
        batches = [(data[i:i + batch_size], targets[i:i + batch_size]) for i in starts]

        def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, SparseTeacher]) -> torch.Tensor:
            tokens, sparse = batch[0].to(device), batch[1].to(device)  # [B, T], [B, T, k]
            return losses.distillation_loss(model(tokens).logits, sparse, next_token_labels(tokens), loss, alpha,
                                            temperature, beta)

    elif mode == "online":
        batches = [data[i:i + batch_size] for i in starts]

        def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens.to(device)  # [B, T]
            with torch.no_grad():
                teacher_logits = teacher(tokens).logits  # [B, T, vocab]
            return losses.distillation_loss(model(tokens).logits, teacher_logits, next_token_labels(tokens), loss,
                                            alpha, temperature, beta)

    elif mode == "sequence":
        sequences, generated = generate_continuations(teacher, data, max_new_tokens, do_sample=False)  # [n, P + N]
        labels = next_token_labels(sequences, generated)  # the continuation's tokens only
        batches = [(sequences[i:i + batch_size], labels[i:i + batch_size]) for i in starts]

        def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            tokens, labels = batch[0].to(device), batch[1].to(device)  # [B, P + N] each
            logits = model(tokens).logits  # [B, P + N, vocab]
            return losses.target_cross_entropy(logits, labels)

    else:  # on_policy
        batches = [data[i:i + batch_size] for i in starts]
        coin = torch.Generator().manual_seed(config.seed)  # λ draws and sampling seeds, one stream

        def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens.to(device)  # [B, T]: prompt, then the dataset's continuation
            if torch.rand((), generator=coin).item() < student_fraction:  # on-policy: the student's own samples
                seed = int(torch.randint(2**31 - 1, (), generator=coin))
                tokens, generated = generate_continuations(model, tokens[:, :prompt_len], seq_len - prompt_len,
                                                           do_sample=True, temperature=sample_temperature,
                                                           seed=seed, batch_size=len(tokens))
            else:  # the dataset's continuation
                generated = torch.zeros_like(tokens, dtype=torch.bool)
                generated[:, prompt_len:] = True
            with torch.no_grad():
                teacher_logits = teacher(tokens).logits  # [B, T, vocab]
            return losses.distillation_loss(model(tokens).logits, teacher_logits, next_token_labels(tokens, generated),
                                            loss, 1.0, temperature, beta)

    with contextlib.nullcontext() if isinstance(teacher, SparseTeacher) else eval_mode(teacher):
        return train(student, batches, loss_fn, config, desc=desc or f"distil ({mode})")


#: The keyword arguments of :func:`distill` a :class:`StudentRecipe` may set in ``options``.
RECIPE_OPTIONS = ("alpha", "temperature", "beta", "batch_size") + tuple(MODE_OPTIONS)


@dataclass(frozen=True)
class StudentRecipe:
    """How a saved student is made: which teacher layers it keeps (:class:`StudentSpec`), how
    :func:`distill` trains it (``mode``, ``loss``, ``config`` and the other keyword arguments in
    ``options``) and a description of the training data for readers of the saved record. Its
    :meth:`to_dict` (with refimpl's version) and the training tokens are what the folder's hash covers."""

    spec: StudentSpec
    config: TrainConfig
    data: str
    mode: str = "online"
    loss: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.spec, StudentSpec):
            raise TypeError(f"spec must be a StudentSpec, got {type(self.spec).__name__}")
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be a non-empty description of the training data, got {self.data!r}")
        check_choice("mode", self.mode, MODES)
        if not isinstance(self.options, Mapping) or not set(self.options) <= set(RECIPE_OPTIONS):
            raise ValueError(f"options must be a mapping with keys among {list(RECIPE_OPTIONS)}, got {self.options!r}")
        try:
            json.dumps(dict(self.options))
        except TypeError:
            raise ValueError(f"options must hold JSON values (numbers, strings, None), got {self.options!r}") from None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON-ready data, with the refimpl version that made it."""
        from refimpl import __version__

        return {"teacher": self.spec.teacher, "keep": list(self.spec.keep), "mode": self.mode, "loss": self.loss,
                "train_config": {**asdict(self.config), "betas": list(self.config.betas)}, "data": self.data,
                "options": dict(sorted(self.options.items())), "refimpl_version": __version__}


def student_digest(recipe: StudentRecipe, data: torch.Tensor) -> str:
    """16 hex digits of the SHA-256 of the recipe (:meth:`StudentRecipe.to_dict`) and the token ids of
    ``data``: the saved student's identity."""
    if not isinstance(recipe, StudentRecipe):
        raise TypeError(f"recipe must be a StudentRecipe, got {type(recipe).__name__}")
    check_token_ids("data", data)
    digest = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    digest.update(str(tuple(data.shape)).encode())
    digest.update(data.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def student_folder(recipe: StudentRecipe, data: torch.Tensor, name: str = "student") -> Path:
    """Where :func:`cached_student` keeps the student ``recipe`` makes from ``data``:
    ``<cache>/students/<name>-<digest>``. It holds a finished student when ``student.json`` is there."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"name must be a non-empty str of letters, digits, '.', '_' or '-', got {name!r}")
    return cache_dir() / "students" / f"{name}-{student_digest(recipe, data)}"


def cached_student(recipe: StudentRecipe, teacher: "PreTrainedModel", data: torch.Tensor, name: str = "student",
                   tokenizer: "PreTrainedTokenizerBase | None" = None) -> tuple["PreTrainedModel", dict[str, Any]]:
    """The student ``recipe`` describes, from ``<cache>/students/<name>-<digest>`` when it was saved
    there before, else made now (:func:`layer_subset_student` of ``teacher``, then :func:`distill` on
    ``data``) and saved with ``save_pretrained`` — deterministically, so a missing folder is re-created
    with the same weights. Folders are written under a temporary name and renamed when complete.

    Args:
        recipe: how the student is made; ``teacher`` must be the model ``recipe.spec.teacher`` names
            (only the name enters the hash).
        teacher: the teacher model; also fixes the loaded student's device and dtype.
        data: the training tokens for :func:`distill` (they enter the hash).
        name: the folder's prefix (letters, digits, ``.``, ``_``, ``-``).
        tokenizer: saved next to the student when given, so that
            :func:`refimpl.models.load_model` can load the folder.

    Returns:
        ``(student, record)``: the student in eval mode, and the saved ``student.json`` (the recipe,
        its digest and the training log: losses, seconds) with the ``folder`` it is in.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"name must be a non-empty str of letters, digits, '.', '_' or '-', got {name!r}")
    check_causal_lm("teacher", teacher)
    digest = student_digest(recipe, data)
    folder = student_folder(recipe, data, name)
    record_path = folder / "student.json"
    parameter = next(teacher.parameters())
    if record_path.is_file():
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(folder, dtype=parameter.dtype).to(parameter.device)
        return student.eval(), {**json.loads(record_path.read_text()), "folder": str(folder)}

    student = layer_subset_student(teacher, recipe.spec.keep)
    log = distill(student, teacher, data, recipe.mode, recipe.loss, config=recipe.config, desc=f"distil {name}",
                  **recipe.options)
    student.eval()
    record = {"name": name, "digest": digest, "recipe": recipe.to_dict(), "losses": log.losses,
              "seconds": log.seconds}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "student.json").write_text(json.dumps(record, indent=1))
        if folder.exists():  # a folder without its record is an interrupted write
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return student, {**record, "folder": str(folder)}


def influence_student_recipe(teacher: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", teacher_name: str,
                             n_layers: int = 16) -> tuple[StudentRecipe, torch.Tensor]:
    """The book's distilled student (chapter 06, reused as a draft model in chapter 08): its recipe
    and its training tokens, for :func:`cached_student`.

    The student keeps the ``n_layers`` teacher layers of highest block influence (ShortGPT's score,
    :func:`refimpl.pruning.structured.activation_importance`, on one 256-token calibration block per
    corpus) and is trained online with forward KL for 8 steps (learning rate 5e-4, 2 warm-up steps) on
    batches of two 128-token blocks: 8 calibration blocks per corpus, shuffled with seed 0.

    Returns:
        ``(recipe, train_blocks [16, 128])``.
    """
    check_causal_lm("teacher", teacher)
    check_positive_int("n_layers", n_layers)
    n_teacher = len(anatomy.decoder_layers(teacher))
    if n_layers > n_teacher:
        raise ValueError(f"n_layers must be at most the teacher's {n_teacher} layers, got {n_layers}")
    device = model_device(teacher)
    importance_blocks = torch.cat([data.token_blocks(tokenizer, data.load_text(name, "calibration"), seq_len=256,
                                                     n_blocks=1) for name in data.CORPORA]).to(device)  # [2, 256]
    block_influence = structured.activation_importance(teacher, importance_blocks).layers  # [layers]
    check_finite("the block influence of teacher's layers", block_influence)  # argsort would rank a NaN first
    keep = tuple(sorted(block_influence.argsort(descending=True)[:n_layers].tolist()))
    train_blocks = torch.cat([data.token_blocks(tokenizer, data.load_text(name, "calibration"), seq_len=128,
                                                n_blocks=8) for name in data.CORPORA])  # [16, 128]
    train_blocks = train_blocks[torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(0))]
    recipe = StudentRecipe(StudentSpec(teacher_name, keep), TrainConfig(steps=8, lr=5e-4, warmup_steps=2),
                           data="calibration split, 8 blocks of 128 tokens per corpus, shuffled", mode="online",
                           loss="forward_kl", options={"batch_size": 2})
    return recipe, train_blocks.to(device)
