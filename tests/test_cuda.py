"""The CUDA code paths of refimpl.models, refimpl.evaluate and its timer (refimpl.runtime.time_calls,
which the GPU benchmarks of refimpl.bench use too), on a tiny random model.

Skipped where no CUDA device exists (as in CI); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from refimpl import evaluate, runtime
from refimpl.models import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_load_model_on_cuda(tiny_model_folder):
    folder, _, _ = tiny_model_folder
    model, _ = load_model(str(folder), device="cuda", dtype=torch.bfloat16)
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_device_map_passes_through(tiny_model_folder):
    folder, _, _ = tiny_model_folder
    model, _ = load_model(str(folder), device_map="auto")
    assert next(model.parameters()).device.type == "cuda"


def test_perplexity_on_cuda_matches_cpu(tiny_model_folder):
    folder, cpu_model, _ = tiny_model_folder
    cuda_model, _ = load_model(str(folder), device="cuda")
    blocks = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    # TF32 matmuls may be on by default on some set-ups; compare at a tolerance that allows them.
    assert evaluate.perplexity(cuda_model, blocks) == pytest.approx(evaluate.perplexity(cpu_model, blocks), rel=1e-3)


def test_timings_and_cache_on_cuda(tiny_model_folder):
    folder, _, _ = tiny_model_folder
    model, _ = load_model(str(folder), device="cuda")
    ids = torch.randint(0, 128, (2, 16))
    assert evaluate.prefill_latency(model, ids, repeats=2).tokens == 32
    assert evaluate.decode_latency(model, ids, n_tokens=4, repeats=2).tokens == 8
    with torch.inference_mode():
        cache = model(ids.cuda(), use_cache=True).past_key_values
    assert evaluate.cache_bytes(cache) == evaluate.kv_cache_bytes(model.config, seq_len=16, batch_size=2)


def test_peak_memory_on_cuda():
    size = 256 * 2**20
    _, peak = evaluate.peak_memory(lambda: torch.ones(size // 4, device="cuda").sum(), device="cuda")
    assert size <= peak < 2 * size


def test_bandwidth_and_flops_on_cuda():
    assert evaluate.memory_bandwidth(size_mib=512, repeats=3, device="cuda") > 2e11  # > 200 GB/s
    assert evaluate.matmul_flops(size=4096, repeats=3, dtype=torch.bfloat16, device="cuda") > 1e13


def test_timer_waits_for_the_kernels():
    """Kernels run asynchronously: without the device synchronization, each call would time its launch
    only (microseconds) instead of reading 1 GiB, which takes over 50 us even at 20 TB/s."""
    x = torch.ones(2**28, device="cuda")  # 1 GiB of float32
    times = runtime.time_calls(lambda _: x.sum(), x.device, repeats=3, warmup=1, min_repeat_s=0.01, max_inner=100)
    assert min(times) > x.numel() * x.element_size() / 20e12
