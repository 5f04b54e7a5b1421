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

Uncertainty
    A perplexity measured on a few thousand tokens varies with which text was drawn.
    :func:`perplexity_interval` gives a perplexity's 95 % interval and :func:`paired_ratio` the ratio of
    two models' perplexities on the same blocks with its interval, both by resampling whole blocks
    (a block bootstrap). A comparison claims an order only where the ratio's interval excludes 1.
    :func:`perplexities` returns :class:`Scores`, which keep every block's loss, so that two models
    scored on the same blocks compare in one call (``scores.ratio(reference)``).

Size
    :func:`model_bytes` adds up the bytes of the tensors the model actually holds (parameters and
    buffers, each shared storage counted once, so tied embeddings count once). Packed quantized
    modules that store int8 or two-4-bit-codes-per-byte buffers are measured the same way.

Speed
    Prefill is one forward pass over a prompt; decode is the per-token loop that follows, one token
    per step with a KV cache. Both are timed after warm-up runs, repeated, and summarised by the
    median (:func:`refimpl.runtime.time_calls`, the timer the GPU benchmarks use too). Timings are
    only comparable within one run on one machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from refimpl._validation import (all_finite, as_device, check_non_negative_int, check_positive_int, check_token_ids,
                                 vocabulary_size)
from refimpl.anatomy import attention_shape
from refimpl.runtime import eval_mode, model_device, progress, time_calls


# --- quality ------------------------------------------------------------------------------------


@torch.inference_mode()
def block_nll(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token negative log-likelihood (nats) of each block, scored on its own.

    The model is evaluated in eval mode and returned in the mode it came in.

    Args:
        model: a causal LM returning ``.logits`` of shape ``[batch, seq_len, vocab]``.
        blocks: ``LongTensor[n_blocks, seq_len]`` of token ids, ``seq_len >= 2``.
        batch_size: blocks per forward pass.

    Returns:
        ``DoubleTensor[n_blocks]`` (on the CPU).
    """
    check_token_ids("blocks", blocks, vocabulary_size(model), min_len=2)
    check_positive_int("batch_size", batch_size)
    device = model_device(model)
    nll = []
    batches = blocks.split(batch_size)
    with eval_mode(model):
        for batch in progress(batches, desc="perplexity", total=len(batches)):
            batch = batch.to(device)  # [b, L]
            logits = model(batch).logits  # [b, L, vocab]
            # Position t predicts token t+1: drop the last logit and the first target.
            pred = logits[:, :-1].flatten(0, 1).float()  # [b*(L-1), vocab]
            target = batch[:, 1:].flatten()  # [b*(L-1)]
            token_nll = F.cross_entropy(pred, target, reduction="none").view(batch.shape[0], -1)  # [b, L-1]
            nll.append(token_nll.double().mean(dim=1).cpu())
    return torch.cat(nll)


def mean_nll(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) over all predicted tokens of ``blocks``
    (every block predicts the same number of tokens, so this is the mean of :func:`block_nll`)."""
    return block_nll(model, blocks, batch_size).mean().item()


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity of ``model`` on ``blocks``: ``exp(mean_nll)`` (see the module docstring)."""
    return math.exp(mean_nll(model, blocks, batch_size))


class Scores(Mapping[str, float]):
    """Perplexity per named set of blocks — a read-only mapping ``name -> perplexity``, printed like a
    dict — that keeps each block's mean NLL, so that two models scored on the same blocks compare with
    a paired interval (:meth:`ratio`)."""

    def __init__(self, block_nll: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(block_nll, Mapping) or not block_nll:
            raise ValueError("block_nll must be a non-empty mapping of name -> per-block NLLs [n_blocks]")
        for name, nll in block_nll.items():
            if not isinstance(nll, torch.Tensor) or nll.dim() != 1 or nll.numel() == 0 or not nll.is_floating_point():
                raise ValueError(f"block_nll[{name!r}] must be a non-empty 1-D floating-point tensor (block_nll)")
        self.block_nll = {name: nll.detach().double().cpu() for name, nll in block_nll.items()}

    def __getitem__(self, name: str) -> float:
        return math.exp(self.block_nll[name].mean().item())

    def __iter__(self):
        return iter(self.block_nll)

    def __len__(self) -> int:
        return len(self.block_nll)

    def __repr__(self) -> str:
        return repr(dict(self))

    def interval(self, confidence: float = 0.95) -> dict[str, Interval]:
        """Each perplexity with its block-bootstrap interval (:func:`perplexity_interval`)."""
        return {name: perplexity_interval(nll, confidence) for name, nll in self.block_nll.items()}

    def ratio(self, reference: "Scores", confidence: float = 0.95) -> dict[str, Interval]:
        """This model's perplexity / ``reference``'s on each set of blocks, with the paired interval of
        :func:`paired_ratio`: an interval below 1 says this model is better on that set."""
        if not isinstance(reference, Scores) or list(reference) != list(self):
            raise ValueError(f"reference must be the Scores of another model on the same sets {list(self)}")
        return {name: paired_ratio(nll, reference.block_nll[name], confidence) for name, nll in self.block_nll.items()}


def perplexities(model: torch.nn.Module, blocks: Mapping[str, torch.Tensor], batch_size: int = 8) -> Scores:
    """:func:`perplexity` on each named set of blocks (the chapters use one per corpus), in order, as
    :class:`Scores` (which also keeps every block's NLL for intervals and paired comparisons)."""
    if not isinstance(blocks, Mapping) or not blocks:
        raise ValueError("blocks must be a non-empty mapping of name -> LongTensor[n_blocks, seq_len]")
    return Scores({name: block_nll(model, named, batch_size) for name, named in blocks.items()})


# --- uncertainty --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval ``[low, high]`` (``confidence``, e.g. 0.95)."""

    estimate: float
    low: float
    high: float
    confidence: float

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval: e.g. a ratio whose interval excludes 1 says which
        of the two is better at this confidence; one that includes 1 says they are indistinguishable."""
        return not self.low <= value <= self.high

    def __format__(self, spec: str) -> str:
        """``format(interval, ".2f")`` gives ``"1.21 [1.17, 1.25]"``."""
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def _check_block_nll(param: str, nll: torch.Tensor) -> None:
    if not isinstance(nll, torch.Tensor) or nll.dim() != 1 or nll.numel() < 2 or not nll.is_floating_point():
        raise ValueError(f"{param} must be a 1-D floating-point tensor of at least 2 per-block NLLs (block_nll)")
    if not all_finite(nll):
        raise ValueError(f"{param} holds NaN or Inf values")


def _bootstrap(per_block: torch.Tensor, confidence: float, n_resamples: int, seed: int) -> Interval:
    """exp of the mean of ``per_block`` and the percentile interval of exp of the mean over resamples of
    the blocks (with replacement, as many as there are)."""
    if not isinstance(confidence, float) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")
    check_positive_int("n_resamples", n_resamples)
    check_non_negative_int("seed", seed)
    generator = torch.Generator().manual_seed(seed)  # the CPU generator: the same draws on every machine
    values = per_block.detach().double().cpu()
    picks = torch.randint(len(values), (n_resamples, len(values)), generator=generator)  # [resamples, blocks]
    means = values[picks].mean(dim=1)  # [resamples]
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(math.exp(values.mean().item()), math.exp(low), math.exp(high), confidence)


def perplexity_interval(nll: torch.Tensor, confidence: float = 0.95, n_resamples: int = 10_000,
                        seed: int = 0) -> Interval:
    """Perplexity ``exp(mean nll)`` with a ``confidence`` interval from a block bootstrap.

    The blocks of text are resampled, not the tokens: the tokens of one block share a document and a
    context, so their losses are correlated, and resampling tokens as if independent would make the
    interval too narrow. Blocks cut far apart in the text (:func:`refimpl.data.spread_blocks`) are
    close to independent. The interval is the percentile interval of the resampled perplexities;
    with few blocks (under ~10) it is rough and tends to be too narrow.

    Args:
        nll: ``[n_blocks]`` mean NLL of each block (:func:`block_nll`; every block predicts the same
            number of tokens, so their mean is the mean over tokens).
        confidence: e.g. 0.95.
        n_resamples: bootstrap resamples.
        seed: seed of the resampling (a fixed seed gives the same interval on every machine).
    """
    _check_block_nll("nll", nll)
    return _bootstrap(nll, confidence, n_resamples, seed)


def paired_ratio(nll: torch.Tensor, reference_nll: torch.Tensor, confidence: float = 0.95,
                 n_resamples: int = 10_000, seed: int = 0) -> Interval:
    r"""Perplexity ratio of a model to a reference scored on the same blocks, with a paired block-bootstrap
    ``confidence`` interval.

    .. math:: r = \frac{\mathrm{PPL}}{\mathrm{PPL}_\mathrm{ref}} = \exp\Big(\frac{1}{B}\sum_b (\ell_b - \ell^\mathrm{ref}_b)\Big),

    with :math:`\ell_b` the mean NLL of block :math:`b`. Each resample draws the same blocks for both
    models (the per-block differences are resampled), so the difficulty the two share cancels: a ratio
    is known far more precisely than either perplexity. An interval that excludes 1 says which model is
    better at this confidence; one that includes 1 says they are indistinguishable at this evaluation
    size. See :func:`perplexity_interval` for why blocks, not tokens, are resampled.

    Args:
        nll, reference_nll: ``[n_blocks]`` per-block mean NLLs (:func:`block_nll`) of the model and the
            reference on the same blocks, in the same order.
    """
    _check_block_nll("nll", nll)
    _check_block_nll("reference_nll", reference_nll)
    if nll.shape != reference_nll.shape:
        raise ValueError(f"nll and reference_nll must score the same blocks, got {len(nll)} and "
                         f"{len(reference_nll)} blocks")
    return _bootstrap(nll.double() - reference_nll.double(), confidence, n_resamples, seed)


def rounded(values: Mapping[str, float], digits: int = 2) -> dict[str, float]:
    """``values`` rounded to ``digits`` decimals for printing: the precision at which the chapters'
    stored outputs are compared (a perplexity to 2 decimals), so that floating-point noise below it
    does not change them."""
    check_non_negative_int("digits", digits)
    if not isinstance(values, Mapping):
        raise TypeError(f"values must be a mapping of name -> number, got {type(values).__name__}")
    return {name: round(value, digits) for name, value in values.items()}


def format_intervals(intervals: Mapping[str, Interval], spec: str = ".3f") -> str:
    """Named intervals on one line, ``"shakespeare 0.721 [0.629, 0.832]  docstrings 0.675 [0.632, 0.724]"``:
    how the chapters print a comparison per corpus (:meth:`Scores.ratio`)."""
    if not isinstance(intervals, Mapping) or not all(isinstance(i, Interval) for i in intervals.values()):
        raise TypeError("intervals must be a mapping of name -> Interval (e.g. Scores.ratio's)")
    return "  ".join(f"{name} {interval:{spec}}" for name, interval in intervals.items())


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
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


def kv_cache_bytes(config: Any, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a full KV cache by the formula 2 · layers · kv_heads · head_dim · seq_len · batch · bytes.

    The 2 counts keys and values; ``config`` is a Hugging Face config of a decoder with (grouped-query)
    attention, e.g. SmolLM2's (30 layers, 3 KV heads of dimension 64).
    """
    check_positive_int("seq_len", seq_len)
    check_positive_int("batch_size", batch_size)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    shape = attention_shape(config)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    return 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * seq_len * batch_size * element_bytes


def cache_bytes(past_key_values: Any) -> int:
    """Bytes of the key and value tensors a Hugging Face cache object (``Cache.layers[i].keys`` and
    ``.values``, transformers >= 4.56) actually holds."""
    layers = getattr(past_key_values, "layers", None)
    if layers is None:
        raise TypeError(f"past_key_values must be a transformers Cache, got {type(past_key_values).__name__}")
    tensors = [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def pareto_frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names of the Pareto-optimal points of ``{name: (size, loss)}`` (smaller is better in both):
    those that no other point dominates — is at most as large and at most as bad, and differs — by size.

    The trade-off plots of the book (perplexity against measured bytes) mark these points."""
    if not isinstance(points, dict) or not points:
        raise ValueError("points must be a non-empty dict {name: (size, loss)}")
    for name, value in points.items():
        if (not isinstance(value, tuple) or len(value) != 2
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
            raise ValueError(f"points[{name!r}] must be a (size, loss) pair of finite numbers, got {value!r}")
    front = [a for a, (size_a, loss_a) in points.items()
             if not any(size_b <= size_a and loss_b <= loss_a and (size_b, loss_b) != (size_a, loss_a)
                        for size_b, loss_b in points.values())]
    return sorted(front, key=lambda name: points[name])


# --- speed --------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Repeated measurements of one operation: seconds per repeat and the tokens each processed."""

    times_s: list[float]
    tokens: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s


@torch.inference_mode()
def prefill_latency(model: torch.nn.Module, input_ids: torch.Tensor, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time one forward pass over the prompt ``input_ids`` (``[batch, prompt_len]``), cache included."""
    check_token_ids("input_ids", input_ids, vocabulary_size(model))
    device = model_device(model)
    ids = input_ids.to(device)
    with eval_mode(model):
        times = time_calls(lambda _: model(ids, use_cache=True), device, repeats, warmup, desc="prefill")
    return Timing(times, tokens=ids.numel())


@torch.inference_mode()
def decode_latency(
    model: torch.nn.Module, input_ids: torch.Tensor, n_tokens: int = 32, repeats: int = 3, warmup: int = 1
) -> Timing:
    """Time greedy decoding of ``n_tokens`` new tokens per sequence after the prompt ``input_ids``.

    Each repeat runs the (untimed) prefill of the prompt, then times the ``n_tokens`` single-token
    forward passes that reuse the model's KV cache. ``tokens`` counts new tokens over the batch.
    """
    check_token_ids("input_ids", input_ids, vocabulary_size(model))
    check_positive_int("n_tokens", n_tokens)
    device = model_device(model)
    ids = input_ids.to(device)

    def prefill():
        out = model(ids, use_cache=True)
        return out.logits[:, -1:].argmax(-1), out.past_key_values  # [b, 1], cache

    def decode(state):
        token, cache = state
        for _ in range(n_tokens):
            out = model(token, past_key_values=cache, use_cache=True)  # one new token per sequence
            token, cache = out.logits[:, -1:].argmax(-1), out.past_key_values

    with eval_mode(model):
        times = time_calls(decode, device, repeats, warmup, prepare=prefill, desc="decode")
    return Timing(times, tokens=n_tokens * ids.shape[0])


def side_by_side(
    models: dict[str, torch.nn.Module], measure: Callable[[torch.nn.Module], Timing], rounds: int = 3,
    warmup_rounds: int = 1,
) -> dict[str, Timing]:
    """Time several models with the same ``measure`` in alternation: ``warmup_rounds`` untimed rounds,
    then ``rounds`` rounds that each measure every model once, in order. A change in the machine's load
    during the comparison then affects all models alike, so ratios of the medians stay meaningful.

    Args:
        models: name -> model.
        measure: e.g. ``lambda m: decode_latency(m, ids, repeats=1, warmup=0)``.
        rounds: timed rounds.
        warmup_rounds: untimed rounds first (0 when every model has already run, and a round is long).

    Returns:
        name -> :class:`Timing` holding the times of all rounds.
    """
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict of name -> model")
    if not callable(measure):
        raise TypeError("measure must be callable")
    check_positive_int("rounds", rounds)
    check_non_negative_int("warmup_rounds", warmup_rounds)
    for _ in range(warmup_rounds):
        for model in models.values():
            measure(model)
    timings: dict[str, list[Timing]] = {name: [] for name in models}
    for _ in progress(range(rounds), desc="side by side", total=rounds):
        for name, model in models.items():
            timings[name].append(measure(model))
    return {name: Timing([t for timing in runs for t in timing.times_s], tokens=runs[0].tokens)
            for name, runs in timings.items()}


def _release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the measurement may then undercount reused memory


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
    counts every allocation, not only tensors. Freed memory that the C allocator still holds would
    be reused without growing the resident size, so it is handed back to the system first
    (``malloc_trim``, where the C library has it).
    """
    if not callable(fn):
        raise TypeError("fn must be callable")
    device = as_device("device", device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device}")
    gc.collect()
    _release_free_heap()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    before = _rss_bytes("VmRSS")
    result = fn()
    return result, max(0, _rss_bytes("VmHWM") - before)


def matmul_flops(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> float:
    """Measured arithmetic throughput of ``device`` in FLOP/s: the median time of a square
    ``size`` x ``size`` matrix product (2·size³ floating-point operations), current thread setting."""
    check_positive_int("size", size)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = as_device("device", device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = time_calls(lambda _: a @ b, device, repeats, warmup=1, desc="matmul")
    return 2 * size**3 / statistics.median(times)


def memory_bandwidth(size_mib: int = 256, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Measured read bandwidth of ``device`` memory in bytes/s: the median time to sum a float32
    tensor of ``size_mib`` MiB (far larger than the caches), with the current thread setting."""
    check_positive_int("size_mib", size_mib)
    device = as_device("device", device)
    x = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32, device=device)
    times = time_calls(lambda _: x.sum(), device, repeats, warmup=1, desc="bandwidth")
    return x.numel() * x.element_size() / statistics.median(times)
