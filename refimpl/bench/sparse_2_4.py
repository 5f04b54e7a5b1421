"""The ``sparse_2_4`` section: a ``Linear`` with a 2:4 semi-structured sparse weight
(``torch.sparse.to_sparse_semi_structured``, CUDA fp16/bf16 only) against the dense one, with both of
torch's kernel paths, cuSPARSELt and CUTLASS (:mod:`refimpl.bench`). The weight is pruned by
:func:`refimpl.pruning.masks.nm_mask`, the 2:4 mask of chapter 05, on its magnitudes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from refimpl.bench.common import attempt, checked_timing, compute_dtype, dtype_name, median_time
from refimpl.pruning.masks import nm_mask

#: torch's two kernel paths for semi-structured sparse matmuls: ``SparseSemiStructuredTensor._FORCE_CUTLASS``
#: picks the class ``to_sparse_semi_structured`` returns.
SPARSE_BACKENDS = {"cusparselt": False, "cutlass": True}


def sparse_unavailable(device: torch.device) -> str | None:
    """Why ``device`` has no 2:4 sparse kernels (not CUDA, a GPU before Ampere, a torch without
    ``to_sparse_semi_structured``), or ``None``: checked before any weight is built."""
    if device.type != "cuda":
        return "2:4 semi-structured sparse kernels (cuSPARSELt / CUTLASS) exist for CUDA only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"2:4 sparse tensor cores need compute capability >= 8.0, got {torch.cuda.get_device_capability(device)}"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


def to_sparse(weight: torch.Tensor, backend: str) -> tuple[torch.Tensor | None, str | None]:
    """``weight`` in the semi-structured sparse format of ``backend`` (a key of :data:`SPARSE_BACKENDS`),
    or ``(None, reason)`` when this torch build or device lacks that backend."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"backend must be one of {list(SPARSE_BACKENDS)}, got {backend!r}")
    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = SPARSE_BACKENDS[backend]
    try:
        return attempt(lambda: to_sparse_semi_structured(weight))
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous


@torch.inference_mode()
def bench_sparse_2_4(device: torch.device, quick: bool) -> dict[str, Any]:
    """Dense ``F.linear`` against the same 2:4-pruned weight in semi-structured sparse form, with each of
    torch's backends (:data:`SPARSE_BACKENDS`)."""
    reason = sparse_unavailable(device)
    if reason:
        return {"skipped": reason}
    dtype = compute_dtype(device)
    shapes = ((1536, 576),) if quick else ((1536, 576), (8192, 8192))
    rows = (16,) if quick else (16, 4096)
    entries = []
    for out_features, in_features in shapes:
        generator = torch.Generator().manual_seed(out_features)
        weight = torch.randn(out_features, in_features, generator=generator)
        weight = (weight * nm_mask(weight.abs(), (2, 4))).to(device, dtype)  # the 2 largest of every 4 inputs
        sparse = {backend: to_sparse(weight, backend) for backend in SPARSE_BACKENDS}
        for n in rows:
            x = torch.randn(n, in_features, generator=generator).to(device, dtype)
            dense_ms = 1e3 * median_time(lambda: F.linear(x, weight), device, repeats=7, warmup=3)
            entry: dict[str, Any] = {"out_features": out_features, "in_features": in_features, "tokens": n,
                                     "dense_ms": dense_ms}
            for backend, (matrix, skipped) in sparse.items():
                if matrix is None:
                    entry[backend] = {"skipped": skipped}
                    continue
                timing = checked_timing(f"2:4 sparse ({backend}) {out_features}x{in_features}",
                                        lambda: F.linear(x, matrix), F.linear(x, weight), device)
                if isinstance(timing, str):
                    entry[backend] = {"skipped": timing}
                    continue
                entry[backend] = {"class": type(matrix).__name__, "sparse_ms": timing["ms"],
                                  "dense_over_sparse": dense_ms / timing["ms"], "relative_error": timing["relative_error"]}
            entries.append(entry)
    return {"dtype": dtype_name(dtype), "backends": list(SPARSE_BACKENDS), "shapes": entries}
