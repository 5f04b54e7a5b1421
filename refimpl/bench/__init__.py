r"""GPU benchmarks of the kernels and the decode loop, against the memory-bandwidth roofline.

Run ``python -m refimpl.bench --out results.json [--device cuda|cpu] [--quick]`` (or ``python -m
refimpl bench ...``; :mod:`refimpl.bench.run`). It builds a Hugging Face ``LlamaForCausalLM`` with
SmolLM2-135M's shapes and *random* weights (no model file is needed: speed does not depend on the
values; :mod:`refimpl.bench.common`), measures five things on one device and writes them as JSON,
with the device name, the torch and transformers versions and the date.

Why a roofline. Decoding one token of one sequence multiplies every weight matrix by a single vector:
about 2 FLOPs per weight, but every weight has to come from memory once per step. Batch-1 decoding is
therefore bound by memory bandwidth, not arithmetic, and its best possible speed is

.. math:: \text{tokens/s} \le \frac{\text{memory bandwidth (bytes/s)}}{\text{weight bytes}}

(the KV cache of a short context adds little and is left out). The benchmark measures both numbers on
the same device and reports every decoder's speed as a fraction of that bound.

Sections, one module each (each records ``{"skipped": reason}`` where the device cannot run it, by
:func:`refimpl.bench.common.unavailable_reason`; any other error stops the run, after the sections
done so far have been written):

``bandwidth`` (:mod:`refimpl.bench.bandwidth`)
    Read bandwidth (:func:`refimpl.evaluate.memory_bandwidth`: the sum of a large float32 tensor,
    which reads every byte once, as decoding reads the weights), device-to-device copy bandwidth for
    reference, the model's weight bytes (:func:`refimpl.evaluate.model_bytes`, tied embedding once) and
    the roofline ``read bandwidth / weight bytes``.
``decode`` (:mod:`refimpl.bench.decode`)
    Greedy decoding of ``n_new`` tokens after a short prompt: refimpl's
    :class:`~refimpl.attention.decoder.Decoder` with its preallocated
    :class:`~refimpl.attention.kv_cache.ModelKVCache` (eager); gpt-fast's static-shape step over the
    same weights and cache buffers (:class:`refimpl.decoding.static.StaticDecodeStep`: always attends
    over all ``max_len`` slots under a mask, so every step has the same shapes), eager and under
    ``torch.compile`` (``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA); and Hugging Face
    ``generate``. Decode speed excludes the prompt's prefill; for ``generate``, which cannot be split,
    it is ``(n_new - 1) / (t(n_new) - t(1))``.
``attention`` (:mod:`refimpl.bench.attention`)
    ``scaled_dot_product_attention`` forward (causal, SmolLM2's 9 heads of 64) with the FlashAttention
    backend against the math backend (which materializes the ``L x L`` score matrix) across sequence
    lengths: time, ratio, and on CUDA the peak memory.
``sparse_2_4`` (:mod:`refimpl.bench.sparse_2_4`)
    A ``Linear`` with a 2:4 semi-structured sparse weight (``torch.sparse.to_sparse_semi_structured``,
    CUDA fp16/bf16 only) against the dense one, with both of torch's kernel paths (cuSPARSELt and
    CUTLASS), at SmolLM2's MLP shape and at 8192 x 8192, for a few tokens and for many.
``weight_only`` (:mod:`refimpl.bench.weight_only`)
    Weight-only quantized matmul kernels against the dense one: int8 per-channel
    (``torch._weight_int8pack_mm``) and packed int4 in groups (``torch._weight_int4pack_mm``, the
    "tinygemm" kernel), each checked against its dequantized weights first.

Timings are medians of repeats after warm-up, CUDA-synchronized, with ``time.perf_counter``; a fast
kernel is run several times per repeat so that a repeat lasts about 10 ms
(:func:`refimpl.bench.common.median_time`, over :func:`refimpl.runtime.time_calls`). They are
comparable only within one run on one device.
"""
