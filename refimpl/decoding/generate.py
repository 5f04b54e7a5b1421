r"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

A causal LM gives, at each step, logits :math:`z \in \mathbb{R}^{V}` for the next token. Decoding
turns them into a distribution and picks a token (Holtzman et al. 2020, "The Curious Case of Neural
Text Degeneration", arXiv:1904.09751, §3):

- **greedy**: :math:`x = \arg\max_i z_i` — the one-hot distribution on the argmax (``temperature=0``);
- **temperature** :math:`T`: :math:`p_i = \mathrm{softmax}(z / T)_i`; :math:`T < 1` sharpens,
  :math:`T > 1` flattens;
- **top-k**: keep the :math:`k` largest logits, renormalise (Fan et al. 2018, arXiv:1805.04833);
- **top-p** (nucleus, Holtzman et al. Eq. 2): keep the smallest set of most probable tokens whose
  probability reaches :math:`p`, renormalise.

Applied in that order (temperature, top-k, top-p), as Hugging Face's logits warpers do.
:meth:`Sampling.probabilities` returns the resulting distribution itself rather than only a token,
because speculative decoding (:mod:`refimpl.decoding.speculative`) compares the target's and the
draft's distributions.

:func:`generate` runs the loop of chapter 07 (:mod:`refimpl.attention.decoder`): prefill the prompt
into the cache once, then feed one token per step, keeping only the last position's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from refimpl import runtime
from refimpl._validation import check_logits, check_non_negative_int, check_positive_int, check_token_ids
from refimpl.attention.decoder import Decoder


@dataclass(frozen=True)
class Sampling:
    """A decoding rule: ``temperature=0`` is greedy; otherwise softmax at ``temperature``, then the
    ``top_k`` largest (``None``: all), then the nucleus of mass ``top_p`` (``None`` or 1: all)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None:
            check_positive_int("top_k", self.top_k)
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool)
                                       or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution ``float32[..., V]`` this rule samples from, for ``logits [..., V]``.

        Greedy gives the one-hot vector of the argmax (the first one on ties, as ``torch.argmax``)."""
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() == 0:
            raise TypeError("logits must be a floating-point tensor [..., vocab]")
        logits = logits.float()
        if self.greedy:
            return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]  # [..., 1], the k-th largest logit
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if self.top_p is not None and self.top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            mass_before = sorted_probs.cumsum(-1) - sorted_probs  # [..., V]: mass of the more probable tokens
            drop_sorted = mass_before >= self.top_p  # the nucleus already reached p without this token
            probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def sample(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token id per row of ``probs [..., V]`` (``LongTensor[...]``); greedy takes the argmax and
        draws no random number."""
        if self.greedy:
            return probs.argmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def as_decoder(model: nn.Module | Decoder) -> Decoder:
    """``model`` itself when it is a :class:`~refimpl.attention.decoder.Decoder`, else the decoder over
    the Hugging Face Llama ``model``'s weights."""
    return model if isinstance(model, Decoder) else Decoder.from_hf(model)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``: every sampled run is reproducible."""
    check_non_negative_int("seed", seed)
    return torch.Generator(device=device).manual_seed(seed)


def check_stop_tokens(stop_tokens: Iterable[int]) -> frozenset[int]:
    """``stop_tokens`` as a set after checking that it holds non-negative ints."""
    if isinstance(stop_tokens, (str, bytes, int)):
        raise TypeError(f"stop_tokens must be an iterable of token ids, got {stop_tokens!r}")
    stop = frozenset(stop_tokens)
    for token in stop:
        check_non_negative_int("stop_tokens", token)
    return stop


def check_prompt(input_ids: torch.Tensor, batch_size: int | None = None, vocab_size: int | None = None,
                 model_param: str = "model") -> None:
    """Raise unless ``input_ids`` is a non-empty ``LongTensor[batch, t]`` (of ``batch_size`` rows if
    given) of token ids in ``[0, vocab_size)``, the vocabulary of the model passed as ``model_param``."""
    check_token_ids("input_ids", input_ids, vocab_size, model_param)
    if batch_size is not None and input_ids.shape[0] != batch_size:
        raise ValueError(f"input_ids must hold {batch_size} sequence(s), got {input_ids.shape[0]}")


@torch.no_grad()
def generate(model: nn.Module | Decoder, input_ids: torch.Tensor, max_new_tokens: int,
             sampling: Sampling = Sampling(), stop_tokens: Iterable[int] = (), seed: int = 0,
             pad_token_id: int | None = None) -> torch.Tensor:
    """Continue each prompt of ``input_ids [batch, t]`` by up to ``max_new_tokens`` tokens.

    Args:
        model: a Hugging Face Llama causal LM or a :class:`~refimpl.attention.decoder.Decoder`.
        input_ids: prompts of equal length (no padding).
        max_new_tokens: the most tokens added per sequence.
        sampling: the decoding rule (default greedy).
        stop_tokens: a sequence ends after emitting one of these (it is kept).
        seed: seeds the sampler's generator (greedy draws nothing).
        pad_token_id: fills a sequence's positions after it stopped while others go on (default: the
            smallest of ``stop_tokens``).

    Returns:
        ``LongTensor[batch, t + n]``: prompt and continuation, ``n <= max_new_tokens`` (fewer when every
        sequence stopped early) — the layout of Hugging Face ``generate``.
    """
    decoder = as_decoder(model)
    check_prompt(input_ids, vocab_size=decoder.vocab_size)
    check_non_negative_int("max_new_tokens", max_new_tokens)
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    stop = check_stop_tokens(stop_tokens)
    if pad_token_id is None:
        pad_token_id = min(stop) if stop else 0
    check_non_negative_int("pad_token_id", pad_token_id)
    for name, ids in (("stop_tokens", stop), ("pad_token_id", {pad_token_id})):
        if decoder.vocab_size is not None and any(i >= decoder.vocab_size for i in ids):
            raise ValueError(f"{name} must be token ids below the model's vocabulary size {decoder.vocab_size}, "
                             f"got {sorted(ids)}")
    generator = make_generator(seed, input_ids.device)
    batch, prompt_len = input_ids.shape
    cache = decoder.new_cache(batch, prompt_len + max_new_tokens)
    sequences = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new = input_ids  # [b, t] for the prefill, then [b, 1]
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=input_ids.device)
    for _ in runtime.progress(range(max_new_tokens), desc="generate"):
        logits = decoder(new, cache, logits_to_keep=1)[:, -1]  # [b, V]
        check_logits("the logits of model", logits)  # greedy decoding would pick a NaN
        token = sampling.sample(sampling.probabilities(logits), generator)  # [b]
        token = token.masked_fill(finished, pad_token_id)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        if stop:
            finished |= torch.isin(token, stop_ids)
            if finished.all():
                break
        new = token[:, None]
    return sequences
