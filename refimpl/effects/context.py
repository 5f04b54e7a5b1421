"""What a recipe sees (:class:`Context`) and what it gives back (:class:`Applied`), and what making a
row's model cost (:class:`Made`).

The context holds the unmodified model, its tokenizer and the protocol, and the calibration data that
rows share: input statistics and importance scores are captured once per run on the unmodified model
and reused, but every row that uses one is charged its full time. Time is kept in an
:class:`Account` per recipe call, so that a recipe reports nothing through side effects: the seconds it
spent capturing calibration data are subtracted from its apply time and charged as calibration.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from refimpl import calibration, data, evaluate, runtime
from refimpl.effects.protocol import DEFAULT_PROTOCOL, Protocol


class RowSkipped(Exception):
    """Raised by a recipe that cannot run here (e.g. it needs training that was not allowed); the
    message is the reason written to the table."""


@dataclass(frozen=True)
class Applied:
    """What a recipe returns: the model to measure, and what only the recipe knows about it."""

    model: nn.Module
    stored_bytes: int | None = None  # the weights as stored, where the evaluated model simulates them (W8A8)
    recorded_s: float | None = None  # apply seconds recorded when it was made (a cached training), not now
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Made:
    """A row's model after its recipe (and the recipes of the rows it starts from), with the costs."""

    model: nn.Module
    apply_s: float = 0.0  # seconds of the method itself, training included, calibration excluded
    own_calibration_s: float = 0.0  # calibration captured for this model alone
    shared: frozenset[str] = frozenset()  # shared captures it used, each charged at its full time
    notes: tuple[str, ...] = ()
    stored_bytes: int | None = None


@dataclass
class Account:
    """The calibration one recipe call used and the seconds it spent capturing it."""

    shared: set[str] = field(default_factory=set)
    own_calibration_s: float = 0.0
    capture_s: float = 0.0  # wall-clock seconds spent capturing inside the call (not the method's time)


class Context:
    """What every recipe may use: the unmodified model (``base``, never changed), its tokenizer, the
    protocol, and the calibration data shared by the rows (:meth:`statistics`, :meth:`importance`)."""

    def __init__(self, model: nn.Module, tokenizer: Any, model_name: str, protocol: Protocol = DEFAULT_PROTOCOL,
                 train: bool = False):
        self.base, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.protocol, self.train = protocol, train
        self.device = runtime.model_device(model)
        self._shared: dict[str, tuple[Any, float]] = {}  # key: (value, seconds to capture it)
        self._accounts: list[Account] = []
        self.keep: set[str] = set()  # ids of the rows whose result a later row of the run starts from
        self.kept: dict[str, Made] = {}

    def begin_row(self) -> None:
        """Reset the random seeds: every row starts from the same state."""
        random.seed(0)
        torch.manual_seed(0)

    @contextlib.contextmanager
    def account(self) -> Iterator[Account]:
        """Within the block, calibration is charged to the yielded account."""
        self._accounts.append(Account())
        try:
            yield self._accounts[-1]
        finally:
            self._accounts.pop()

    def calibration_s(self, made: Made) -> float:
        """The seconds of calibration ``made`` used: its own captures, and the shared ones at full time."""
        return made.own_calibration_s + sum(self._shared[key][1] for key in made.shared)

    def release(self) -> None:
        """Forget the shared data and the kept models (memory)."""
        self._shared.clear()
        self.kept.clear()

    # Token blocks.
    @functools.cached_property
    def eval_blocks(self) -> dict[str, torch.Tensor]:
        """``eval_n_blocks`` blocks of ``eval_seq_len`` tokens spread over each corpus's evaluation split."""
        p = self.protocol
        return {name: data.spread_blocks(self.tokenizer, data.load_text(name, "evaluation"), p.eval_seq_len,
                                         p.eval_n_blocks) for name in data.CORPORA}

    @functools.cached_property
    def reference_nll(self) -> dict[str, torch.Tensor]:
        """The unmodified model's per-block NLL on :attr:`eval_blocks`: every row's perplexity ratio is
        paired with it (:func:`refimpl.evaluate.paired_ratio`)."""
        return {name: evaluate.block_nll(self.base, blocks) for name, blocks in self.eval_blocks.items()}

    def calibration_blocks(self, seq_len: int, n_blocks: int) -> dict[str, torch.Tensor]:
        """``n_blocks`` blocks of ``seq_len`` tokens from the calibration split of each corpus."""
        return {name: data.token_blocks(self.tokenizer, data.load_text(name, "calibration"), seq_len, n_blocks)
                for name in data.CORPORA}

    # Calibration, charged to the current account.
    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per run on the unmodified model and reused."""
        if key not in self._shared:
            start = time.perf_counter()
            value = make()
            seconds = time.perf_counter() - start
            self._shared[key] = (value, seconds)
            if self._accounts:
                self._accounts[-1].capture_s += seconds
        if self._accounts:
            self._accounts[-1].shared.add(key)
        return self._shared[key][0]

    def calibrate(self, make: Callable[[], Any]) -> Any:
        """``make()`` now, for this model only (calibration on a model the row changed)."""
        start = time.perf_counter()
        value = make()
        seconds = time.perf_counter() - start
        if self._accounts:
            self._accounts[-1].own_calibration_s += seconds
            self._accounts[-1].capture_s += seconds
        return value

    def calibration_tokens(self, which: str) -> torch.Tensor:
        """The post-training quantization (``"ptq"``) or pruning (``"pruning"``) calibration blocks of both
        corpora, ``[2 n_blocks, seq_len]``, for the methods that calibrate layer by layer on the model they
        change (the capture is then part of the method: its time counts as the method's)."""
        seq_len, n_blocks = self._calibration_size(which)
        return torch.cat(list(self.calibration_blocks(seq_len, n_blocks).values()))

    def _calibration_size(self, which: str) -> tuple[int, int]:
        return {"ptq": self.protocol.ptq_calibration, "pruning": self.protocol.pruning_calibration}[which]

    def statistics(self, which: str, model: nn.Module | None = None) -> dict[str, calibration.InputStatistics]:
        """Input statistics of every decoder linear layer on the post-training quantization (``"ptq"``) or
        pruning (``"pruning"``) calibration blocks of both corpora, combined: of the unmodified model (shared),
        or of ``model`` (a row's changed model, captured for that row)."""
        seq_len, n_blocks = self._calibration_size(which)

        def capture(m: nn.Module) -> dict[str, calibration.InputStatistics]:
            blocks = self.calibration_blocks(seq_len, n_blocks)
            return calibration.combine_statistics(*(calibration.input_statistics(m, b) for b in blocks.values()))

        if model is None:
            return self.shared(f"statistics-{which}", lambda: capture(self.base))
        return self.calibrate(lambda: capture(model))

    def importance(self, kind: str) -> Any:
        """Chapter 05's structure importance of the unmodified model (``"taylor"`` or ``"activation"``) on
        the first ``importance_tokens`` tokens of the first pruning calibration block of each corpus."""
        from refimpl.pruning import structured

        def make() -> Any:
            seq_len, n_blocks = self.protocol.pruning_calibration
            blocks = torch.cat([b[:1, :self.protocol.importance_tokens]
                                for b in self.calibration_blocks(seq_len, n_blocks).values()])  # [2, tokens]
            if kind == "taylor":
                return structured.taylor_importance(self.base, blocks, batch_size=2)
            return structured.activation_importance(self.base, blocks)

        return self.shared(f"importance-{kind}", make)
