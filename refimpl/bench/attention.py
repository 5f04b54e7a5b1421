"""The ``attention`` section: ``scaled_dot_product_attention`` forward, causal, with the FlashAttention
backend against the math backend (which materializes the ``L x L`` score matrix), across sequence
lengths: time, ratio, and on CUDA the peak memory (:mod:`refimpl.bench`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from refimpl.bench.common import SMOLLM2_135M_CONFIG, attempt, check_close, compute_dtype, dtype_name, median_time
from refimpl.evaluate import peak_memory
from refimpl.runtime import progress


@torch.inference_mode()
def bench_attention(device: torch.device, quick: bool) -> dict[str, Any]:
    """SDPA forward, FlashAttention backend against the math backend, across sequence lengths."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = compute_dtype(device)
    heads, head_dim = SMOLLM2_135M_CONFIG["num_attention_heads"], 64
    lengths = (128, 256) if quick else ((1024, 2048, 4096, 8192, 16384) if device.type == "cuda"
                                        else (512, 1024, 2048))
    entries = []
    for length in progress(lengths, desc="attention", total=len(lengths)):
        generator = torch.Generator().manual_seed(length)
        q, k, v = (torch.randn(1, heads, length, head_dim, generator=generator).to(device, dtype) for _ in range(3))
        entry: dict[str, Any] = {"seq_len": length}
        outputs = {}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            try:
                output, reason = attempt(run)
            except torch.OutOfMemoryError as exc:
                entry[name] = {"skipped": f"out of memory: {str(exc)[:200]}"}
                continue
            if reason is not None:
                entry[name] = {"skipped": f"backend unavailable: {reason}"}
                continue
            timing = {"ms": 1e3 * median_time(run, device, repeats=5, warmup=1)}
            if device.type == "cuda":  # the peak of one more run, with the first run's output freed
                del output
                torch.cuda.empty_cache()
                output, peak = peak_memory(run, device)
                timing["peak_mib"] = peak / 2**20
            outputs[name] = output
            entry[name] = timing
        if "flash" in outputs and "math" in outputs:
            entry["relative_error_flash_vs_math"] = check_close(f"SDPA flash vs math at {length}", outputs["flash"],
                                                                outputs["math"], 2e-2)
        if "ms" in entry.get("flash", {}) and "ms" in entry.get("math", {}):
            entry["math_over_flash"] = entry["math"]["ms"] / entry["flash"]["ms"]
        entries.append(entry)
        del outputs, q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"batch": 1, "heads": heads, "head_dim": head_dim, "causal": True, "dtype": dtype_name(dtype),
            "lengths": entries}
