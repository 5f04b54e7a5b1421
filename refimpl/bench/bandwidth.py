"""The ``bandwidth`` section: read and copy bandwidth, the model's weight bytes, and the roofline of
batch-1 decoding, ``read bandwidth / weight bytes`` tokens/s (:mod:`refimpl.bench`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refimpl.bench.common import median_time
from refimpl.evaluate import memory_bandwidth, model_bytes


def copy_bandwidth(size_mib: int, device: torch.device, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth in bytes/s: bytes read plus bytes written per ``copy_``."""
    src = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, repeats=repeats, warmup=1, max_inner=1)
    return 2 * src.numel() * src.element_size() / seconds


def bench_bandwidth(model: nn.Module, device: torch.device, quick: bool) -> dict[str, Any]:
    """Read and copy bandwidth, the model's weight bytes and the batch-1 decode roofline."""
    size_mib = 64 if quick else (1024 if device.type == "cuda" else 512)
    read = memory_bandwidth(size_mib=size_mib, repeats=5, device=device)  # bytes/s
    copy = copy_bandwidth(size_mib, device)
    weights = model_bytes(model)
    return {
        "buffer_mib": size_mib,
        "read_gb_s": read / 1e9,
        "copy_gb_s": copy / 1e9,
        "weight_bytes": weights,
        "roofline_tokens_per_s": read / weights,
        "note": "roofline = read bandwidth / weight bytes: batch-1 decoding reads every weight once per token",
    }
