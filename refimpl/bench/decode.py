"""The ``decode`` section: greedy decode speed of refimpl's decoder (eager), of gpt-fast's static step
(:mod:`refimpl.decoding.static`) eager and under ``torch.compile``, and of Hugging Face ``generate``,
each as tokens/s and as a fraction of the bandwidth roofline (:mod:`refimpl.bench`)."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from refimpl._validation import check_token_ids, vocabulary_size
from refimpl.attention.decoder import Decoder
from refimpl.attention.kv_cache import ModelKVCache
from refimpl.bench.common import attempt, compute_dtype, dtype_name, median_time
from refimpl.decoding.static import StaticDecodeStep, greedy_decoder, greedy_static, prefill


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


def _timed_decode(run: Callable[[], torch.Tensor], prefill_only: Callable[[], Any], device: torch.device,
                  repeats: int) -> float:
    """Median seconds of ``run()`` minus its untimed ``prefill_only()`` share: time the whole run and the
    prefill alone, so that the decode loop is what is left."""
    full = median_time(run, device, repeats=repeats, warmup=1, max_inner=1)
    pre = median_time(prefill_only, device, repeats=repeats, warmup=1, max_inner=1)
    return full - pre


@torch.inference_mode()
def bench_decode(model: nn.Module, device: torch.device, quick: bool, roofline: float | None) -> dict[str, Any]:
    """Greedy decode speed of refimpl's decoder (eager; static step eager and compiled) and HF generate."""
    prompt_len, n_new, repeats = (8, 16, 3) if quick else (16, 64, 3)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=generator).to(device)
    decoder = Decoder.from_hf(model)
    cache = decoder.new_cache(batch_size=1, max_len=prompt_len + n_new)
    static_step = StaticDecodeStep(decoder, cache)
    prefill_only = lambda: prefill(decoder, cache, prompt)  # noqa: E731
    result: dict[str, Any] = {"prompt_tokens": prompt_len, "new_tokens": n_new, "batch": 1,
                              "dtype": dtype_name(compute_dtype(device))}

    reference = greedy_decoder(decoder, cache, prompt, n_new)
    seconds = _timed_decode(lambda: greedy_decoder(decoder, cache, prompt, n_new), prefill_only, device, repeats)
    result["refimpl_eager"] = _decode_entry(seconds, n_new - 1, roofline)

    tokens = greedy_static(static_step, decoder, cache, prompt, n_new)
    seconds = _timed_decode(lambda: greedy_static(static_step, decoder, cache, prompt, n_new), prefill_only,
                            device, repeats)
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
    run = lambda: greedy_static(compiled, decoder, cache, prompt, n_new, cudagraphs)  # noqa: E731
    start = time.perf_counter()
    tokens, reason = attempt(run)  # compiles; a missing compiler is the machine's limit, anything else a bug
    if reason is not None:
        return {"skipped": f"torch.compile failed: {reason}"}
    compile_s = time.perf_counter() - start
    entry = _decode_entry(_timed_decode(run, lambda: prefill(decoder, cache, prompt), device, repeats), n_new - 1,
                          roofline)
    entry.update(mode=mode, first_run_s=compile_s,
                 same_tokens_as_refimpl_eager=bool(torch.equal(tokens, reference)))
    return entry
