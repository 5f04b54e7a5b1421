r"""GPU benchmarks of the kernels and the decode loop, against the memory-bandwidth roofline.

Run ``python -m refimpl.bench --out results.json [--device cuda|cpu] [--quick]``. It builds a
Hugging Face ``LlamaForCausalLM`` with SmolLM2-135M's shapes and *random* weights (no model file is
needed: speed does not depend on the values), measures five things on one device and writes them as
JSON, with the device name, the torch and transformers versions and the date.

Why a roofline. Decoding one token of one sequence multiplies every weight matrix by a single vector:
about 2 FLOPs per weight, but every weight has to come from memory once per step. Batch-1 decoding is
therefore bound by memory bandwidth, not arithmetic, and its best possible speed is

.. math:: \text{tokens/s} \le \frac{\text{memory bandwidth (bytes/s)}}{\text{weight bytes}}

(the KV cache of a short context adds little and is left out). The benchmark measures both numbers on
the same device and reports every decoder's speed as a fraction of that bound.

Sections (each records ``{"skipped": reason}`` where the device cannot run it; any other error stops
the run, after the sections done so far have been written):

``bandwidth``
    Read bandwidth (:func:`refimpl.evaluate.memory_bandwidth`: the sum of a large float32 tensor,
    which reads every byte once, as decoding reads the weights), device-to-device copy bandwidth for
    reference, the model's weight bytes (:func:`refimpl.evaluate.model_bytes`, tied embedding once) and
    the roofline ``read bandwidth / weight bytes``.
``decode``
    Greedy decoding of ``n_new`` tokens after a short prompt: refimpl's :class:`Decoder` with its
    preallocated :class:`ModelKVCache` (eager); a static-shape step over the same weights and cache
    buffers (:class:`StaticDecodeStep`: always attends over all ``max_len`` slots under a mask, so every
    step has the same shapes), eager and under ``torch.compile`` (``mode="reduce-overhead"``, i.e. CUDA
    graphs, on CUDA); and Hugging Face ``generate``. Decode speed excludes the prompt's prefill; for
    ``generate``, which cannot be split, it is ``(n_new - 1) / (t(n_new) - t(1))``.
``attention``
    ``scaled_dot_product_attention`` forward (causal, SmolLM2's 9 heads of 64) with the FlashAttention
    backend against the math backend (which materializes the ``L x L`` score matrix) across sequence
    lengths: time, ratio, and on CUDA the peak memory.
``sparse_2_4``
    A ``Linear`` with a 2:4 semi-structured sparse weight (``torch.sparse.to_sparse_semi_structured``,
    CUDA fp16/bf16 only) against the dense one, with both of torch's kernel paths (cuSPARSELt and
    CUTLASS), at SmolLM2's MLP shape and at 8192 x 8192, for a few tokens and for many.
``weight_only``
    Weight-only quantized matmul kernels against the dense one: int8 per-channel
    (``torch._weight_int8pack_mm``) and packed int4 in groups (``torch._weight_int4pack_mm``, the
    "tinygemm" kernel), each checked against its dequantized weights first.

Timings are medians of repeats after warm-up, CUDA-synchronized, with ``time.perf_counter``; a fast
kernel is run several times per repeat so that a repeat lasts about 10 ms. They are comparable only
within one run on one device.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from refimpl import runtime
from refimpl._validation import check_non_negative_int, check_positive_int, check_token_ids, vocabulary_size
from refimpl.attention import gqa
from refimpl.attention.decoder import Decoder
from refimpl.attention.kv_cache import KVCache, ModelKVCache, apply_rope
from refimpl.evaluate import memory_bandwidth, model_bytes, peak_memory
from refimpl.quantization import llm_int8
from refimpl.runtime import progress, synchronize

#: SmolLM2-135M's architecture (the Hugging Face config of ``HuggingFaceTB/SmolLM2-135M``).
SMOLLM2_135M_CONFIG: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)

#: What ``--quick`` changes: two layers and a small vocabulary (a CPU run of seconds).
QUICK_OVERRIDES: dict[str, Any] = dict(num_hidden_layers=2, vocab_size=1024)

SECTIONS = ("bandwidth", "decode", "attention", "sparse_2_4", "weight_only")


# --- set-up -------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """The benchmark device, a CPU or CUDA device (:func:`refimpl.runtime.resolve_device`; ``None``
    picks CUDA if available): ``ValueError`` naming the device for anything else."""
    resolved = runtime.resolve_device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return resolved


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what inference uses there), float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(device: torch.device, quick: bool = False, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` with SmolLM2-135M's config (``quick``: 2 layers, vocabulary 1024) and
    random weights, in eval mode, in :func:`compute_dtype` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(SMOLLM2_135M_CONFIG, **(QUICK_OVERRIDES if quick else {}))
    # No end-of-sequence token: generate() must produce exactly the tokens asked for.
    llama_config = LlamaConfig(**config, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config)
    return model.to(compute_dtype(device)).eval()


# --- timing -------------------------------------------------------------------------------------


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 2,
                min_repeat_s: float = 0.01, max_inner: int = 100) -> float:
    """Median seconds per call of ``fn()``.

    After ``warmup`` untimed calls, one timed call estimates the cost; each of the ``repeats`` timed
    repeats then runs ``fn`` often enough (at most ``max_inner`` times) to last about
    ``min_repeat_s``, between two device synchronizations, and counts the mean per call.
    """
    if not callable(fn):
        raise TypeError("fn must be callable")
    check_positive_int("repeats", repeats)
    check_non_negative_int("warmup", warmup)
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    estimate = time.perf_counter() - start
    inner = max(1, min(max_inner, int(min_repeat_s / max(estimate, 1e-9))))
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """``||out - reference|| / ||reference||`` (Frobenius, in float32)."""
    out, reference = out.float(), reference.float()
    return ((out - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def _check_close(name: str, out: torch.Tensor, reference: torch.Tensor, tolerance: float) -> float:
    error = relative_error(out, reference)
    if not math.isfinite(error) or error > tolerance:
        raise AssertionError(f"{name}: relative error {error:.3g} against the reference exceeds {tolerance}")
    return error


_DEVICE_SUPPORT = re.compile(r"could not run|not implemented|not supported|no kernel|only supported|"
                             r"supports only|requires|sm_?\d|compute capability|backend|architecture|"
                             r"is only available", re.IGNORECASE)


def _support_failure(exc: BaseException) -> str | None:
    if isinstance(exc, NotImplementedError) or (isinstance(exc, RuntimeError) and _DEVICE_SUPPORT.search(str(exc))):
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, reason)`` when ``fn`` fails because the device lacks the kernel
    (any other error propagates)."""
    try:
        return fn(), None
    except (NotImplementedError, RuntimeError) as exc:
        reason = _support_failure(exc)
        if reason is None:
            raise
        return None, reason


def _checked_timing(name: str, run: Callable[[], torch.Tensor], reference: torch.Tensor,
                    device: torch.device) -> dict[str, Any] | str:
    """Run a kernel once and check it against ``reference``, then time it; the skip reason instead if
    the device cannot run it."""
    out, reason = _attempt(run)
    if reason is not None:
        return reason
    error = _check_close(name, out, reference, 2e-2)
    return {"ms": 1e3 * median_time(run, device, repeats=7, warmup=3), "relative_error": error}


# --- 1. bandwidth and roofline ------------------------------------------------------------------


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


# --- 2. decode ----------------------------------------------------------------------------------


class StaticDecodeStep(Decoder):
    """One greedy decode step of a Llama with fixed shapes, over a :class:`Decoder`'s weights and a
    :class:`ModelKVCache`'s buffers (the gpt-fast recipe that CUDA graphs need).

    It is the :class:`Decoder` with one method replaced, the attention: the new token's key and value
    are written in place at ``position``, and the query attends over all ``max_len`` slots of the cache,
    masked to slots ``<= position``. Unlike :meth:`Decoder.forward` through the cache (which attends
    over the first ``length`` slots, a growing shape, and keeps ``length`` as a Python int), nothing
    changes shape or Python state from step to step, so ``torch.compile`` traces it once and
    ``mode="reduce-overhead"`` can replay it as one CUDA graph. The cache's ``length`` bookkeeping is
    not updated: use it after a prefill through the decoder, then only through this step.
    """

    def __init__(self, decoder: Decoder, cache: ModelKVCache):
        if not isinstance(decoder, Decoder) or not isinstance(cache, ModelKVCache) or len(cache) != len(decoder.layers):
            raise TypeError("decoder must be a Decoder and cache a ModelKVCache with one layer per decoder layer")
        if any(layer.window is not None for layer in cache.layers):
            raise ValueError("StaticDecodeStep needs a cache without a sliding window")
        super().__init__(decoder.model, decoder.layers)
        self.cache = cache
        self.register_buffer("slots", torch.arange(cache[0].max_len, device=cache[0].k_cache.device),
                             persistent=False)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                scale: float, cache: KVCache) -> torch.Tensor:
        cache.k_cache[:, :, positions] = apply_rope(k, positions, self.inv_freq).to(cache.k_cache.dtype)
        cache.v_cache[:, :, positions] = v.to(cache.v_cache.dtype)
        scores = gqa.attention_scores(apply_rope(q, positions, self.inv_freq), cache.k_cache, scale)
        return gqa.attend(scores, cache.v_cache, self.slots[None, :] <= positions[:, None])  # [b, heads, 1, d]

    def forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The greedy next token ``[batch, 1]`` after ``token [batch, 1]`` at ``position`` (``LongTensor[1]``)."""
        return super().forward(token, self.cache, position, logits_to_keep=1).argmax(-1)


def _decoder_prefill(decoder: Decoder, cache: ModelKVCache, prompt: torch.Tensor) -> torch.Tensor:
    cache.truncate(0)
    return decoder(prompt, cache, logits_to_keep=1).argmax(-1)  # [b, 1]


def greedy_decoder(decoder: Decoder, cache: ModelKVCache, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """``n_new`` greedy tokens ``[batch, n_new]`` after ``prompt`` with :meth:`Decoder.forward` and its
    cache (the cache is reset first)."""
    token = _decoder_prefill(decoder, cache, prompt)
    tokens = [token]
    for _ in range(n_new - 1):
        token = decoder(token, cache, logits_to_keep=1).argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def greedy_static(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], decoder: Decoder,
                  cache: ModelKVCache, prompt: torch.Tensor, n_new: int, cudagraphs: bool = False) -> torch.Tensor:
    """Like :func:`greedy_decoder`, with the prefill through the decoder and every later token through
    ``step`` (a :class:`StaticDecodeStep`, compiled or not). ``cudagraphs``: mark a new step for CUDA
    graph trees before each call and copy the output out of the graph's memory."""
    token = _decoder_prefill(decoder, cache, prompt)
    position = torch.tensor([prompt.shape[1]], device=prompt.device)
    tokens = [token]
    for _ in range(n_new - 1):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        token = step(token, position)
        if cudagraphs:
            token = token.clone()
        position += 1
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def greedy_hf(model: nn.Module, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """``n_new`` greedy tokens from Hugging Face ``generate`` (its default dynamic cache)."""
    check_token_ids("prompt", prompt, vocabulary_size(model))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n_new,
                         min_new_tokens=n_new, pad_token_id=0)
    if out.shape[1] != prompt.shape[1] + n_new:
        raise AssertionError(f"generate returned {out.shape[1] - prompt.shape[1]} new tokens, expected {n_new}")
    return out[:, prompt.shape[1]:]


def _decode_entry(seconds: float, n_tokens: int, roofline: float | None) -> dict[str, Any]:
    if not seconds > 0:
        raise AssertionError(f"decode time must be positive, got {seconds} s (timer too coarse or noisy)")
    entry = {"tokens": n_tokens, "ms_per_token": 1e3 * seconds / n_tokens, "tokens_per_s": n_tokens / seconds}
    if roofline:
        entry["fraction_of_roofline"] = entry["tokens_per_s"] / roofline
    return entry


def _timed_decode(run: Callable[[], torch.Tensor], prefill: Callable[[], Any], device: torch.device,
                  repeats: int) -> float:
    """Median seconds of ``run()`` minus its untimed ``prefill()`` share: time the whole run and the
    prefill alone, so that the decode loop is what is left."""
    full = median_time(run, device, repeats=repeats, warmup=1, max_inner=1)
    pre = median_time(prefill, device, repeats=repeats, warmup=1, max_inner=1)
    return full - pre


def compile_failure_reason(exc: BaseException) -> str | None:
    """Why ``torch.compile`` could not build a kernel on this machine (no C++/Triton compiler, an
    unsupported GPU), or ``None`` when ``exc`` is another error, which must not be hidden."""
    name = type(exc).__name__
    if isinstance(exc, torch._dynamo.exc.Unsupported):  # a graph break under fullgraph=True: a bug here
        return None
    text = f"{name}: {exc}"
    if name in ("BackendCompilerFailed", "InvalidCxxCompiler", "CppCompileError") or re.search(
            r"compiler|triton|cudagraph|cuda capability|not supported|inductor", text, re.IGNORECASE):
        return text[:500]
    return None


@torch.inference_mode()
def bench_decode(model: nn.Module, device: torch.device, quick: bool, roofline: float | None) -> dict[str, Any]:
    """Greedy decode speed of refimpl's decoder (eager; static step eager and compiled) and HF generate."""
    prompt_len, n_new, repeats = (8, 16, 3) if quick else (16, 64, 3)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=generator).to(device)
    decoder = Decoder.from_hf(model)
    cache = decoder.new_cache(batch_size=1, max_len=prompt_len + n_new)
    static_step = StaticDecodeStep(decoder, cache)
    prefill = lambda: _decoder_prefill(decoder, cache, prompt)  # noqa: E731
    result: dict[str, Any] = {"prompt_tokens": prompt_len, "new_tokens": n_new, "batch": 1,
                              "dtype": str(compute_dtype(device)).removeprefix("torch.")}

    reference = greedy_decoder(decoder, cache, prompt, n_new)
    seconds = _timed_decode(lambda: greedy_decoder(decoder, cache, prompt, n_new), prefill, device, repeats)
    result["refimpl_eager"] = _decode_entry(seconds, n_new - 1, roofline)

    tokens = greedy_static(static_step, decoder, cache, prompt, n_new)
    seconds = _timed_decode(lambda: greedy_static(static_step, decoder, cache, prompt, n_new), prefill, device,
                            repeats)
    result["refimpl_static_eager"] = _decode_entry(seconds, n_new - 1, roofline)
    result["refimpl_static_eager"]["same_tokens_as_refimpl_eager"] = bool(torch.equal(tokens, reference))

    result["refimpl_static_compiled"] = _bench_compiled(static_step, decoder, cache, prompt, n_new, device,
                                                        repeats, roofline, reference, quick)

    hf_tokens = greedy_hf(model, prompt, n_new)
    full = median_time(lambda: greedy_hf(model, prompt, n_new), device, repeats=repeats, warmup=1, max_inner=1)
    one = median_time(lambda: greedy_hf(model, prompt, 1), device, repeats=repeats, warmup=1, max_inner=1)
    result["hf_generate"] = _decode_entry(full - one, n_new - 1, roofline)
    result["hf_generate"]["same_tokens_as_refimpl_eager"] = bool(torch.equal(hf_tokens, reference))
    result["note"] = ("decode excludes the prefill; tokens_per_s counts the new_tokens - 1 single-token steps "
                      "after the prefill's token; hf_generate's is (t(new_tokens) - t(1)) / (new_tokens - 1)")
    return result


def _bench_compiled(static_step: StaticDecodeStep, decoder: Decoder, cache: ModelKVCache, prompt: torch.Tensor,
                    n_new: int, device: torch.device, repeats: int, roofline: float | None,
                    reference: torch.Tensor, quick: bool) -> dict[str, Any]:
    if device.type == "cpu" and quick:
        return {"skipped": "torch.compile on CPU (Inductor's C++ build) takes longer than a --quick run; "
                           "run without --quick to time it"}
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    cudagraphs = device.type == "cuda"
    torch._dynamo.reset()
    compiled = torch.compile(static_step, mode=mode, fullgraph=True)
    start = time.perf_counter()
    try:
        tokens = greedy_static(compiled, decoder, cache, prompt, n_new, cudagraphs)  # compiles
    except Exception as exc:  # a missing compiler is the machine's limit; anything else is a bug
        reason = compile_failure_reason(exc)
        if reason is None:
            raise
        return {"skipped": f"torch.compile failed: {reason}"}
    compile_s = time.perf_counter() - start
    run = lambda: greedy_static(compiled, decoder, cache, prompt, n_new, cudagraphs)  # noqa: E731
    prefill = lambda: _decoder_prefill(decoder, cache, prompt)  # noqa: E731
    entry = _decode_entry(_timed_decode(run, prefill, device, repeats), n_new - 1, roofline)
    entry.update(mode=mode, first_run_s=compile_s,
                 same_tokens_as_refimpl_eager=bool(torch.equal(tokens, reference)))
    return entry


# --- 3. attention -------------------------------------------------------------------------------


def _is_unavailable_kernel(exc: RuntimeError) -> bool:
    return bool(re.search(r"no available kernel|not supported|not implemented", str(exc), re.IGNORECASE))


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
                outputs[name] = run()
            except RuntimeError as exc:
                if isinstance(exc, torch.OutOfMemoryError):
                    entry[name] = {"skipped": f"out of memory: {str(exc)[:200]}"}
                    continue
                if not _is_unavailable_kernel(exc):
                    raise
                entry[name] = {"skipped": f"backend unavailable: {str(exc)[:300]}"}
                continue
            timing = {"ms": 1e3 * median_time(run, device, repeats=5, warmup=1)}
            if device.type == "cuda":
                outputs.pop(name)
                torch.cuda.empty_cache()
                output, peak = peak_memory(run, device)
                outputs[name] = output
                timing["peak_mib"] = peak / 2**20
            entry[name] = timing
        if "flash" in outputs and "math" in outputs:
            entry["relative_error_flash_vs_math"] = _check_close(f"SDPA flash vs math at {length}", outputs["flash"],
                                                                 outputs["math"], 2e-2)
        if "ms" in entry.get("flash", {}) and "ms" in entry.get("math", {}):
            entry["math_over_flash"] = entry["math"]["ms"] / entry["flash"]["ms"]
        entries.append(entry)
        del outputs, q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"batch": 1, "heads": heads, "head_dim": head_dim, "causal": True,
            "dtype": str(dtype).removeprefix("torch."), "lengths": entries}


# --- 4. 2:4 semi-structured sparsity ------------------------------------------------------------


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` with the 2 smallest-magnitude of every 4 consecutive inputs set to zero."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"weight must be 2-D with in_features a multiple of 4, got {tuple(weight.shape)}")
    groups = weight.reshape(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).reshape(weight.shape)


def _sparse_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "2:4 semi-structured sparse kernels (cuSPARSELt / CUTLASS) exist for CUDA only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"2:4 sparse tensor cores need compute capability >= 8.0, got {torch.cuda.get_device_capability(device)}"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


#: torch's two kernel paths for semi-structured sparse matmuls: ``SparseSemiStructuredTensor._FORCE_CUTLASS``
#: picks the class ``to_sparse_semi_structured`` returns.
SPARSE_BACKENDS = {"cusparselt": False, "cutlass": True}


def _to_sparse(weight: torch.Tensor, backend: str) -> tuple[torch.Tensor | None, str | None]:
    """``weight`` in the semi-structured sparse format of ``backend``, or ``(None, reason)`` when this
    torch build or device lacks that backend."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = SPARSE_BACKENDS[backend]
    try:
        return _attempt(lambda: to_sparse_semi_structured(weight))
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous


@torch.inference_mode()
def bench_sparse_2_4(device: torch.device, quick: bool) -> dict[str, Any]:
    """Dense ``F.linear`` against the same 2:4-pruned weight in semi-structured sparse form, with each of
    torch's backends (:data:`SPARSE_BACKENDS`)."""
    reason = _sparse_unavailable(device)
    if reason:
        return {"skipped": reason}
    dtype = compute_dtype(device)
    shapes = ((1536, 576),) if quick else ((1536, 576), (8192, 8192))
    rows = (16,) if quick else (16, 4096)
    entries = []
    for out_features, in_features in shapes:
        generator = torch.Generator().manual_seed(out_features)
        weight = prune_2_4(torch.randn(out_features, in_features, generator=generator)).to(device, dtype)
        sparse = {backend: _to_sparse(weight, backend) for backend in SPARSE_BACKENDS}
        for n in rows:
            x = torch.randn(n, in_features, generator=generator).to(device, dtype)
            dense_ms = 1e3 * median_time(lambda: F.linear(x, weight), device, repeats=7, warmup=3)
            entry: dict[str, Any] = {"out_features": out_features, "in_features": in_features, "tokens": n,
                                     "dense_ms": dense_ms}
            for backend, (matrix, skipped) in sparse.items():
                if matrix is None:
                    entry[backend] = {"skipped": skipped}
                    continue
                timing = _checked_timing(f"2:4 sparse ({backend}) {out_features}x{in_features}",
                                         lambda: F.linear(x, matrix), F.linear(x, weight), device)
                if isinstance(timing, str):
                    entry[backend] = {"skipped": timing}
                    continue
                entry[backend] = {"class": type(matrix).__name__, "sparse_ms": timing["ms"],
                                  "dense_over_sparse": dense_ms / timing["ms"], "relative_error": timing["relative_error"]}
            entries.append(entry)
    return {"dtype": str(dtype).removeprefix("torch."), "backends": list(SPARSE_BACKENDS), "shapes": entries}


# --- 5. weight-only int8 / int4 -----------------------------------------------------------------


def op_schema(name: str) -> str | None:
    """The ATen schema of ``aten::<name>`` (its real signature, read at run time), or ``None`` when this
    torch build lacks the operator."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return None
    try:
        return str(packet.default._schema)
    except (AttributeError, RuntimeError):
        return None


def _check_schema(name: str, expected: list[str]) -> str | None:
    """``None`` when ``aten::name`` exists with the argument types ``expected``; the reason otherwise.
    A different signature raises: it means this code must be adapted to the torch release."""
    schema = op_schema(name)
    if schema is None:
        return f"torch {torch.__version__} has no aten::{name}"
    arguments = [a.type for a in getattr(torch.ops.aten, name).default._schema.arguments]
    types = [str(t) for t in arguments]
    if types != expected:
        raise RuntimeError(f"aten::{name} has the signature {schema}; this benchmark calls it with argument "
                           f"types {expected} and must be adapted")
    return None


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups along the input dimension, tinygemm's convention: codes ``q`` in
    ``0..15`` (int32 ``[out, in]``), and per group a scale and a zero with
    ``weight ≈ (q - 8) * scale + zero``; ``scales`` and ``zeros`` are float32 ``[out, in / group_size]``."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} must be a multiple of group_size {group_size}")
    w = weight.float().reshape(out_features, -1, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15).clamp_min(1e-6)
    codes = ((w - low[..., None]) / scales[..., None]).round().clamp(0, 15)
    zeros = low + 8 * scales
    return codes.reshape(out_features, in_features).to(torch.int32), scales, zeros


def dequantize_int4_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """The float32 weight :func:`quantize_int4_groups` stands for."""
    out_features, in_features = codes.shape
    q = codes.float().reshape(out_features, -1, group_size)
    return ((q - 8) * scales[..., None] + zeros[..., None]).reshape(out_features, in_features)


def _int8_entry(weight: torch.Tensor, x: torch.Tensor, device: torch.device) -> dict[str, Any] | str:
    codes, scales = llm_int8.vectorwise_quantize(weight.float(), "channel")  # int8 [out, in], float32 [out, 1]
    scales = scales.view(-1)
    dequantized = (codes.float() * scales[:, None]).to(x.dtype)
    codes, scales = codes.to(device), scales.to(device, x.dtype)
    return _checked_timing("int8 weight-only matmul", lambda: torch._weight_int8pack_mm(x, codes, scales),
                           F.linear(x, dequantized.to(device)), device)


def _int4_entry(weight: torch.Tensor, x: torch.Tensor, device: torch.device, group_size: int,
                inner_k_tiles: int) -> dict[str, Any] | str:
    codes, scales, zeros = quantize_int4_groups(weight, group_size)
    dequantized = dequantize_int4_groups(codes, scales, zeros, group_size).to(x.dtype)
    # [in / group, out, 2]: the scale and the zero of every group of every output channel.
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(device, x.dtype)
    if device.type == "cuda":
        # Two codes per byte, the even input index in the high nibble.
        packed_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).to(device)
        packed, reason = _attempt(lambda: torch._convert_weight_to_int4pack(packed_bytes, inner_k_tiles))
        matmul = torch._weight_int4pack_mm
    else:
        packed, reason = _attempt(lambda: torch._convert_weight_to_int4pack_for_cpu(codes.to(device), inner_k_tiles))
        matmul = torch._weight_int4pack_mm_for_cpu
    if reason is not None:
        return reason
    entry = _checked_timing("int4 weight-only matmul", lambda: matmul(x, packed, group_size, scales_and_zeros),
                            F.linear(x, dequantized.to(device)), device)
    if isinstance(entry, dict):
        entry.update(group_size=group_size, inner_k_tiles=inner_k_tiles,
                     packed_bytes=packed.numel() * packed.element_size())
    return entry


@torch.inference_mode()
def bench_weight_only(device: torch.device, quick: bool) -> dict[str, Any]:
    """int8 per-channel and packed-int4 group-wise weight-only matmul against the dense one."""
    dtype = compute_dtype(device)
    int4_mm, int4_pack = (("_weight_int4pack_mm", "_convert_weight_to_int4pack") if device.type == "cuda" else
                          ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"))
    int8_missing = _check_schema("_weight_int8pack_mm", ["Tensor", "Tensor", "Tensor"])
    int4_missing = (_check_schema(int4_mm, ["Tensor", "Tensor", "int", "Tensor"])
                    or _check_schema(int4_pack, ["Tensor", "int"]))
    # (out, in, group size, inner k tiles): K must be a multiple of group size and of 16 * inner k tiles.
    shapes = ((1536, 576, 64, 2),) if quick else ((1536, 576, 64, 2), (8192, 8192, 128, 8))
    rows = (1,) if quick else (1, 16)
    entries = []
    for out_features, in_features, group_size, inner_k_tiles in shapes:
        generator = torch.Generator().manual_seed(out_features)
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        dense_weight = weight.to(device, dtype)
        for n in rows:
            x = torch.randn(n, in_features, generator=generator).to(device, dtype)
            dense_ms = 1e3 * median_time(lambda: F.linear(x, dense_weight), device, repeats=7, warmup=3)
            entry: dict[str, Any] = {"out_features": out_features, "in_features": in_features, "tokens": n,
                                     "dense_ms": dense_ms,
                                     "dense_bytes": dense_weight.numel() * dense_weight.element_size()}
            for name, missing, make in (
                    ("int8", int8_missing, lambda: _int8_entry(weight, x, device)),
                    ("int4", int4_missing, lambda: _int4_entry(weight, x, device, group_size, inner_k_tiles))):
                result = missing or make()
                if isinstance(result, str):
                    entry[name] = {"skipped": result}
                else:
                    result["dense_over_quantized"] = dense_ms / result["ms"]
                    entry[name] = result
            entries.append(entry)
    return {"dtype": str(dtype).removeprefix("torch."), "int8_op": op_schema("_weight_int8pack_mm"),
            "int4_op": op_schema(int4_mm), "shapes": entries}


# --- the run ------------------------------------------------------------------------------------


def run_benchmarks(out: str | os.PathLike, device: str | None = None, quick: bool = False,
                   command: list[str] | None = None) -> dict[str, Any]:
    """Run every section on ``device`` and write the results to the JSON file ``out``.

    The file is rewritten after each section, so a run that fails part-way keeps what it measured
    (``"complete": false``). Returns the results.
    """
    resolved = resolve_device(device)
    import transformers

    results: dict[str, Any] = {
        "device": runtime.device_name(resolved),
        "device_type": resolved.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if resolved.type == "cuda" else None,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv if command is None else command),
        "quick": bool(quick),
        "model": "random weights, SmolLM2-135M config" + (" with " + ", ".join(
            f"{k}={v}" for k, v in QUICK_OVERRIDES.items()) if quick else ""),
        "complete": False,
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        path.write_text(json.dumps(results, indent=2) + "\n")

    model = build_model(resolved, quick)
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "bandwidth": lambda: bench_bandwidth(model, resolved, quick),
        "decode": lambda: bench_decode(model, resolved, quick, results["bandwidth"].get("roofline_tokens_per_s")),
        "attention": lambda: bench_attention(resolved, quick),
        "sparse_2_4": lambda: bench_sparse_2_4(resolved, quick),
        "weight_only": lambda: bench_weight_only(resolved, quick),
    }
    for name in progress(SECTIONS, desc="bench", total=len(SECTIONS)):
        start = time.perf_counter()
        results[name] = sections[name]()
        results[name]["section_s"] = time.perf_counter() - start
        write()
    results["complete"] = True
    write()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: ``python -m refimpl.bench --out PATH.json [--device cuda|cpu] [--quick]``."""
    parser = argparse.ArgumentParser(prog="python -m refimpl.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and lengths (seconds on a CPU)")
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    command = [sys.argv[0]] + list(argv) if argv is not None else None
    return run_benchmarks(args.out, args.device, args.quick, command)


if __name__ == "__main__":
    main()
