"""How every row of the effects table is measured: the protocol, shrunk by the tests for tiny models.

The table is the book's authoritative measurement: each corpus is scored on 16 blocks of 512 tokens
spread over its evaluation split (8,176 predicted tokens), where the chapters' live evaluations score
fewer; calibration uses 16 blocks of 512 tokens per corpus, more than the chapters can afford.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Protocol:
    """The evaluation, calibration and timing settings every row is measured with."""

    eval_seq_len: int = 512  # evaluation blocks of this many tokens ...
    eval_n_blocks: int = 16  # ... this many per corpus, spread over its evaluation split (data.spread_blocks)
    ptq_calibration: tuple[int, int] = (512, 16)  # (tokens, blocks) per corpus: 32 x 512 in all (the papers: 128 x 2048)
    pruning_calibration: tuple[int, int] = (512, 16)  # the same for SparseGPT and Wanda
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
