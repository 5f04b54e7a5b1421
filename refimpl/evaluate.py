"""How every chapter measures a model: quality (perplexity), size (bytes stored) and speed.

Perplexity protocol
    The evaluation text is cut into non-overlapping blocks of ``seq_len`` tokens
    (:func:`refimpl.data.token_blocks`). Each block is scored on its own, from an empty context, and
    every token after the first is predicted from the tokens before it in the block. With
    :math:`N` predicted tokens in all,

    .. math:: \\mathrm{PPL} = \\exp\\Big(-\\frac{1}{N} \\sum_{b} \\sum_{t=2}^{L} \\log p_\\theta(x_{b,t} \\mid x_{b,<t})\\Big),

    the exponential of the mean token negative log-likelihood (NLL). Non-overlapping blocks give each
    token a context of 0 to ``seq_len - 1`` tokens, so the figure is higher than a sliding-window
    evaluation would give; it is the same protocol for every method, which is what comparisons need.

Size
    :func:`model_bytes` adds up the bytes of the tensors the model actually holds (parameters and
    buffers, each shared storage counted once, so tied embeddings count once). Packed quantized
    modules that store int8 or two-4-bit-codes-per-byte buffers are measured the same way.

Speed
    Prefill is one forward pass over a prompt; decode is the per-token loop that follows, one token
    per step with a KV cache. Both are timed after warm-up runs, repeated, and summarised by the
    median. Timings are only comparable within one run on one machine.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from refimpl.runtime import progress


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters") from None


def _check_blocks(blocks: torch.Tensor, min_len: int = 2) -> None:
    if not isinstance(blocks, torch.Tensor):
        raise TypeError(f"blocks must be a torch.Tensor, got {type(blocks).__name__}")
    if blocks.dtype != torch.long:
        raise TypeError(f"blocks must hold token ids (torch.long), got {blocks.dtype}")
    if blocks.dim() != 2:
        raise ValueError(f"blocks must have shape [n_blocks, seq_len], got {tuple(blocks.shape)}")
    if blocks.numel() == 0:
        raise ValueError("blocks is empty: nothing to evaluate")
    if blocks.shape[1] < min_len:
        raise ValueError(f"blocks must hold at least {min_len} tokens per block, got {blocks.shape[1]}")


def _check_positive(param: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{param} must be a positive int, got {value!r}")


# --- quality ------------------------------------------------------------------------------------


@torch.inference_mode()
def mean_nll(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) over all predicted tokens of ``blocks``.

    Args:
        model: a causal LM returning ``.logits`` of shape ``[batch, seq_len, vocab]``.
        blocks: ``LongTensor[n_blocks, seq_len]`` of token ids, ``seq_len >= 2``.
        batch_size: blocks per forward pass.
    """
    _check_blocks(blocks)
    _check_positive("batch_size", batch_size)
    device = _model_device(model)
    total_nll, total_tokens = 0.0, 0
    batches = blocks.split(batch_size)
    for batch in progress(batches, desc="perplexity", total=len(batches)):
        batch = batch.to(device)  # [b, L]
        logits = model(batch).logits  # [b, L, vocab]
        # Position t predicts token t+1: drop the last logit and the first target.
        pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [b*(L-1), vocab]
        target = batch[:, 1:].reshape(-1)  # [b*(L-1)]
        total_nll += F.cross_entropy(pred, target, reduction="sum").double().item()
        total_tokens += target.numel()
    return total_nll / total_tokens


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity of ``model`` on ``blocks``: ``exp(mean_nll)`` (see the module docstring)."""
    return math.exp(mean_nll(model, blocks, batch_size))


# --- size ---------------------------------------------------------------------------------------


def _unique_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen, tensors = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), t.device)
        if key in seen:
            continue
        seen.add(key)
        tensors.append(t)
    return tensors


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of all tensors the model holds (parameters and buffers), shared storage counted once."""
    return sum(t.untyped_storage().nbytes() for t in _unique_tensors(model))


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters, shared (tied) parameters counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def kv_cache_bytes(config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a full KV cache by the formula 2 · layers · kv_heads · head_dim · seq_len · batch · bytes.

    The 2 counts keys and values; ``config`` is a Hugging Face config of a decoder with (grouped-query)
    attention, e.g. SmolLM2's (30 layers, 3 KV heads of dimension 64).
    """
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element_bytes = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * seq_len * batch_size * element_bytes


def cache_bytes(past_key_values) -> int:
    """Bytes of the key and value tensors a Hugging Face cache object actually holds."""
    layers = getattr(past_key_values, "layers", None)
    if layers is not None:  # transformers >= 4.56: Cache.layers[i].keys / .values
        pairs = [(layer.keys, layer.values) for layer in layers]
    else:  # legacy format: a tuple of (key, value) per layer
        pairs = list(past_key_values)
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if t is not None)


# --- speed --------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Repeated measurements of one operation: seconds per repeat and the tokens each processed."""

    times_s: list[float]
    tokens: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int, desc: str) -> list[float]:
    _check_positive("repeats", repeats)
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in progress(range(repeats), desc=desc, total=repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def prefill_latency(model: torch.nn.Module, input_ids: torch.Tensor, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time one forward pass over the prompt ``input_ids`` (``[batch, prompt_len]``), cache included."""
    _check_blocks(input_ids, min_len=1)
    device = _model_device(model)
    ids = input_ids.to(device)
    times = _timed(lambda: model(ids, use_cache=True), device, repeats, warmup, "prefill")
    return Timing(times, tokens=ids.numel())


@torch.inference_mode()
def decode_latency(
    model: torch.nn.Module, input_ids: torch.Tensor, n_tokens: int = 32, repeats: int = 3, warmup: int = 1
) -> Timing:
    """Time greedy decoding of ``n_tokens`` new tokens per sequence after the prompt ``input_ids``.

    Each repeat runs the (untimed) prefill of the prompt, then times the ``n_tokens`` single-token
    forward passes that reuse the model's KV cache. ``tokens`` counts new tokens over the batch.
    """
    _check_blocks(input_ids, min_len=1)
    _check_positive("n_tokens", n_tokens)
    device = _model_device(model)
    ids = input_ids.to(device)

    def prefill():
        out = model(ids, use_cache=True)
        return out.logits[:, -1:].argmax(-1), out.past_key_values  # [b, 1], cache

    def decode(state):
        token, cache = state
        for _ in range(n_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            token, cache = out.logits[:, -1:].argmax(-1), out.past_key_values

    _check_positive("repeats", repeats)
    for _ in range(warmup):
        decode(prefill())
    times = []
    for _ in progress(range(repeats), desc="decode", total=repeats):
        state = prefill()
        _sync(device)
        start = time.perf_counter()
        decode(state)
        _sync(device)
        times.append(time.perf_counter() - start)
    return Timing(times, tokens=n_tokens * ids.shape[0])


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field_name} not found in /proc/self/status")


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, peak_bytes)``: the peak memory the call added.

    On CUDA this is PyTorch's peak allocated device memory during the call, above what was allocated
    before it. On CPU (Linux) it is the peak resident set size of the process (``VmHWM``, reset
    through ``/proc/self/clear_refs`` before the call) above the resident size before the call: it
    counts every allocation, not only tensors, and memory the allocator keeps after freeing.
    """
    if not callable(fn):
        raise TypeError("fn must be callable")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device}")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    before = _rss_bytes("VmRSS")
    result = fn()
    return result, max(0, _rss_bytes("VmHWM") - before)


def matmul_flops(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> float:
    """Measured arithmetic throughput of ``device`` in FLOP/s: the median time of a square
    ``size`` x ``size`` matrix product (2·size³ floating-point operations), current thread setting."""
    _check_positive("size", size)
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = _timed(lambda: a @ b, device, repeats, warmup=1, desc="matmul")
    return 2 * size**3 / statistics.median(times)


def memory_bandwidth(size_mib: int = 256, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Measured read bandwidth of ``device`` memory in bytes/s: the median time to sum a float32
    tensor of ``size_mib`` MiB (far larger than the caches), with the current thread setting."""
    _check_positive("size_mib", size_mib)
    device = torch.device(device)
    x = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32, device=device)
    times = _timed(lambda: x.sum(), device, repeats, warmup=1, desc="bandwidth")
    return x.numel() * x.element_size() / statistics.median(times)
