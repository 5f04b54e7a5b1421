r"""Trained students in refimpl's cache, and the book's student recipe.

A :class:`StudentRecipe` says how a student is made: which teacher layers it keeps
(:class:`~refimpl.distillation.student.StudentSpec`) and which trainer of :mod:`refimpl.distillation.train`
trains it, with what settings. :func:`cached_student` saves the student a recipe makes in
``<cache>/students/<name>-<digest>`` with the recipe and its training log; the digest
(:func:`student_digest`) covers the recipe and the training tokens, so a changed recipe trains a new
student and an unchanged one is loaded, not retrained.

:func:`influence_student_recipe` is the book's student: made in chapter 06, reused as a draft model in
chapter 08 and as a row of the effects table.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from refimpl import anatomy
from refimpl import data as corpora
from refimpl._validation import check_causal_lm, check_choice, check_finite, check_positive_int, check_token_ids
from refimpl.distillation import losses, train
from refimpl.distillation.student import StudentSpec, layer_subset_student
from refimpl.runtime import model_device
from refimpl.pruning import structured
from refimpl.runtime import cache_dir
from refimpl.training import TrainConfig, TrainLog

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: The trainer each recipe ``mode`` names; the names are part of the saved recipe (and of its digest).
TRAINERS: dict[str, Callable[..., TrainLog]] = {
    "online": train.distill_online,
    "offline": train.distill_offline_topk,
    "sequence": train.distill_sequence_level,
    "on_policy": train.distill_on_policy,
}


def _keywords(trainer: Callable[..., TrainLog]) -> dict[str, inspect.Parameter]:
    """The keyword-only arguments of ``trainer`` a recipe sets (``desc`` is the cache's)."""
    return {name: p for name, p in inspect.signature(trainer).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "desc"}


@dataclass(frozen=True)
class StudentRecipe:
    """How a saved student is made: which teacher layers it keeps (:class:`StudentSpec`), how it is
    trained (``mode`` names the trainer in :data:`TRAINERS`; ``config``, ``loss`` and the trainer's other
    keyword arguments in ``options``; ``loss=None`` takes the trainer's default) and a description of the
    training data for readers of the saved record. Its :meth:`to_dict` (with refimpl's version) and the
    training tokens are what the folder's hash covers."""

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
        check_choice("mode", self.mode, tuple(TRAINERS))
        name, keywords = self.trainer.__name__, _keywords(self.trainer)
        settable = [keyword for keyword in keywords if keyword != "loss"]
        if not isinstance(self.options, Mapping) or not set(self.options) <= set(settable):
            raise ValueError(f"options must be a mapping with keys among {settable} (the keyword arguments of "
                             f"{name}), got {self.options!r}")
        missing = [k for k, p in keywords.items() if p.default is inspect.Parameter.empty and k not in self.options]
        if missing:
            raise ValueError(f"options must set {missing}, which {name} needs")
        if self.loss is not None:
            if "loss" not in keywords:
                raise ValueError(f"loss must be None for mode {self.mode!r} ({name} takes no loss), got {self.loss!r}")
            check_choice("loss", self.loss, losses.KINDS)
        try:
            json.dumps(dict(self.options))
        except TypeError:
            raise ValueError(f"options must hold JSON values (numbers, strings, None), got {self.options!r}") from None

    @property
    def trainer(self) -> Callable[..., TrainLog]:
        """The function of :mod:`refimpl.distillation.train` that ``mode`` names."""
        return TRAINERS[self.mode]

    def keywords(self) -> dict[str, Any]:
        """The keyword arguments :attr:`trainer` gets: ``options``, and ``loss`` unless it is None."""
        return dict(self.options) if self.loss is None else {**self.options, "loss": self.loss}

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


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"name must be a non-empty str of letters, digits, '.', '_' or '-', got {name!r}")


def student_folder(recipe: StudentRecipe, data: torch.Tensor, name: str = "student") -> Path:
    """Where :func:`cached_student` keeps the student ``recipe`` makes from ``data``:
    ``<cache>/students/<name>-<digest>``. It holds a finished student when ``student.json`` is there."""
    _check_name(name)
    return cache_dir() / "students" / f"{name}-{student_digest(recipe, data)}"


def cached_student(recipe: StudentRecipe, teacher: "PreTrainedModel", data: torch.Tensor, name: str = "student",
                   tokenizer: "PreTrainedTokenizerBase | None" = None) -> tuple["PreTrainedModel", dict[str, Any]]:
    """The student ``recipe`` describes, from ``<cache>/students/<name>-<digest>`` when it was saved
    there before, else made now (:func:`~refimpl.distillation.student.layer_subset_student` of
    ``teacher``, then the recipe's trainer on ``data``) and saved with ``save_pretrained`` —
    deterministically, so a missing folder is re-created with the same weights. Folders are written
    under a temporary name and renamed when complete.

    Args:
        recipe: how the student is made; ``teacher`` must be the model ``recipe.spec.teacher`` names
            (only the name enters the hash).
        teacher: the teacher model; also fixes the loaded student's device and dtype.
        data: the training tokens of the recipe's trainer (they enter the hash).
        name: the folder's prefix (letters, digits, ``.``, ``_``, ``-``).
        tokenizer: saved next to the student when given, so that
            :func:`refimpl.models.load_model` can load the folder.

    Returns:
        ``(student, record)``: the student in eval mode, and the saved ``student.json`` (the recipe,
        its digest and the training log: losses, seconds) with the ``folder`` it is in.
    """
    _check_name(name)
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
    log = recipe.trainer(student, teacher, data, recipe.config, desc=f"distil {name}", **recipe.keywords())
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
    importance_blocks = torch.cat([corpora.token_blocks(tokenizer, corpora.load_text(name, "calibration"),
                                                        seq_len=256, n_blocks=1)
                                   for name in corpora.CORPORA]).to(device)  # [2, 256]
    block_influence = structured.activation_importance(teacher, importance_blocks).layers  # [layers]
    check_finite("the block influence of teacher's layers", block_influence)  # argsort would rank a NaN first
    keep = tuple(sorted(block_influence.argsort(descending=True)[:n_layers].tolist()))
    train_blocks = torch.cat([corpora.token_blocks(tokenizer, corpora.load_text(name, "calibration"),
                                                   seq_len=128, n_blocks=8) for name in corpora.CORPORA])  # [16, 128]
    train_blocks = train_blocks[torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(0))]
    recipe = StudentRecipe(StudentSpec(teacher_name, keep), TrainConfig(steps=8, lr=5e-4, warmup_steps=2),
                           data="calibration split, 8 blocks of 128 tokens per corpus, shuffled", mode="online",
                           loss="forward_kl", options={"batch_size": 2})
    return recipe, train_blocks.to(device)
