"""How every row of the effects table is measured: the protocol (the chapters' settings), shrunk by
the tests for tiny models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Protocol:
    """The evaluation, calibration and timing settings every row is measured with."""

    eval_seq_len: int = 256  # the standard evaluation blocks ...
    eval_n_blocks: int = 8  # ... of which the quantization and pruning chapters score
    eval_use: int = 2  # the first 2 per corpus
    ptq_calibration: tuple[int, int] = (512, 4)  # (tokens, blocks) per corpus: chapter 03
    pruning_calibration: tuple[int, int] = (512, 3)  # chapter 05
    importance_tokens: int = 256  # chapter 05: structure importance on one block of this many per corpus
    prefill_tokens: int = 64  # chapter 05's speed protocol
    decode_prompt: int = 32
    decode_tokens: int = 8
    timing_rounds: int = 3
    timing_warmup_rounds: int = 1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Protocol":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"protocol has unknown fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


DEFAULT_PROTOCOL = Protocol()
