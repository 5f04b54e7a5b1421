r"""Speculative decoding: a cheap draft proposes, the target verifies several tokens in one pass.

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding"
(arXiv:2211.17192), and Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling" (arXiv:2302.01318). One *round*:

1. the draft proposes :math:`\gamma` tokens :math:`x_1, \dots, x_\gamma`, sampling
   :math:`x_i \sim q_i = q(\cdot \mid \text{prefix}, x_{<i})`;
2. the target runs **once** on the last accepted token and the :math:`\gamma` proposals, which gives
   its distributions :math:`p_1, \dots, p_{\gamma+1}` at every proposed position and one beyond;
3. for :math:`i = 1, \dots, \gamma`: accept :math:`x_i` with probability
   :math:`\min\big(1, p_i(x_i) / q_i(x_i)\big)`; at the first rejection, sample the replacement from
   the normalised residual :math:`p'_i = \max(0,\, p_i - q_i) / \sum \max(0,\, p_i - q_i)` and end
   the round; if all :math:`\gamma` are accepted, sample a *bonus* token from :math:`p_{\gamma+1}`.

Leviathan et al. Appendix A.1 (Chen et al. Theorem 1): every token produced this way is distributed
exactly as :math:`p` — the output is the target's, only cheaper. With greedy decoding :math:`p` and
:math:`q` are one-hot and the rule says: keep the proposals while they equal the target's argmax,
then take the target's argmax. Each round makes one target call and yields between 1 and
:math:`\gamma + 1` tokens. Rejected proposals were written into both models' KV caches and are rolled
back (:meth:`refimpl.attention.kv_cache.KVCache.truncate`).

**Acceptance arithmetic** (Leviathan et al. §3.3–3.4). The acceptance rate
:math:`\beta = \sum_v \min(p(v), q(v)) = 1 - \mathrm{TV}(p, q)` (Theorem 3.5) is the probability
that a proposal is accepted; :math:`\alpha = E[\beta]`. Assuming independent acceptances, a round yields

.. math:: E[\text{tokens per target call}] = \frac{1 - \alpha^{\gamma + 1}}{1 - \alpha} \quad \text{(Eq. 1)}

and, if a draft step costs :math:`c` target steps and verifying :math:`\gamma + 1` tokens costs what
one does, the wall-clock speed-up is :math:`\frac{1 - \alpha^{\gamma+1}}{(1 - \alpha)(\gamma c + 1)}`
(Theorem 3.8). On hardware where verifying costs :math:`r(\gamma) > 1` target steps, replace the
:math:`1` in the denominator by :math:`r(\gamma)`.

Drafts share one interface, :class:`Draft`: :class:`ModelDraft` wraps any causal LM of the same
tokenizer (a distilled student, the target's own first layers — self-speculative decoding, or a
quantized copy), :class:`PromptLookupDraft` copies continuations of earlier n-grams of the text and
costs no model call at all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from refimpl import runtime
from refimpl._validation import check_fraction, check_logits, check_non_negative_int, check_positive_int
from refimpl.attention.decoder import Decoder
from refimpl.attention.kv_cache import ModelKVCache
from refimpl.decoding.generate import Sampling, as_decoder, check_prompt, check_stop_tokens, make_generator


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """Leviathan et al. Eq. 1: :math:`(1 - \\alpha^{\\gamma+1}) / (1 - \\alpha)` tokens per target
    call for acceptance rate ``alpha`` in [0, 1] and ``gamma`` proposals (``gamma + 1`` at alpha = 1)."""
    check_fraction("alpha", alpha)
    check_non_negative_int("gamma", gamma)
    return float(gamma + 1) if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_speedup(alpha: float, gamma: int, cost_ratio: float, verify_ratio: float = 1.0) -> float:
    """Leviathan et al. Theorem 3.8, generalised: tokens per round over the round's cost in target
    steps, :math:`\\gamma c + r`, with ``cost_ratio`` :math:`c` (one draft step in target steps) and
    ``verify_ratio`` :math:`r` (one target pass over ``gamma + 1`` tokens in target steps; 1 in the paper)."""
    for name, value in (("cost_ratio", cost_ratio), ("verify_ratio", verify_ratio)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return expected_tokens_per_call(alpha, gamma) / (gamma * cost_ratio + verify_ratio)


def acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """:math:`\\beta = \\sum_v \\min(p(v), q(v))` over the last dimension of two distributions
    ``[..., V]``: the probability that a proposal drawn from ``q`` is accepted (Leviathan et al. Def. 3.1)."""
    if not isinstance(p, torch.Tensor) or not isinstance(q, torch.Tensor) or p.shape != q.shape or p.dim() == 0:
        raise ValueError("p and q must be tensors of the same shape [..., vocab]")
    return torch.minimum(p.float(), q.float()).sum(-1)


def greedy_rounds(agrees: torch.Tensor, gamma: int) -> list[tuple[int, int]]:
    """The ``(proposed, accepted)`` rounds of greedy speculative decoding of ``len(agrees)`` tokens,
    given ``agrees [n]``: whether the draft's argmax equals the target's at each position of the
    target's greedy output (the accepted prefix is always that output, so this decides every round
    exactly). A round starting at position ``i`` proposes ``min(gamma, n - 1 - i)`` tokens, accepts the
    run of agreements from ``i`` among them, and adds one token from the target."""
    if not isinstance(agrees, torch.Tensor) or agrees.dtype != torch.bool or agrees.dim() != 1:
        raise TypeError("agrees must be a 1-D BoolTensor")
    check_positive_int("gamma", gamma)
    flags, i, rounds = agrees.tolist(), 0, []
    while i < len(flags):
        proposed = min(gamma, len(flags) - 1 - i)
        accepted = 0
        while accepted < proposed and flags[i + accepted]:
            accepted += 1
        rounds.append((proposed, accepted))
        i += accepted + 1
    return rounds


def greedy_target_calls(agrees: torch.Tensor, gamma: int) -> int:
    """The number of target passes of :func:`greedy_rounds`."""
    return len(greedy_rounds(agrees, gamma))


def verify(draft_tokens: torch.Tensor, q: torch.Tensor, p: torch.Tensor, sampling: Sampling,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """Step 3 of the module docstring: how many proposals to accept, and the token that follows them.

    Args:
        draft_tokens: ``LongTensor[g]``, the proposals.
        q: ``[g, V]``, the draft's distribution at each proposal.
        p: ``[g + 1, V]``, the target's distribution at each proposal and after the last.
        sampling: the rule ``p`` and ``q`` come from (greedy takes argmaxes and draws no randomness
            that could change the result).
        generator: for the uniform draws and the resampling.

    Returns:
        ``(n_accepted, next_token)``: ``draft_tokens[:n_accepted]`` are kept and ``next_token`` is
        the residual sample at the first rejection, or the bonus token after ``g`` acceptances.
    """
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    g = draft_tokens.shape[0] if isinstance(draft_tokens, torch.Tensor) and draft_tokens.dim() == 1 else -1
    if g < 0 or draft_tokens.dtype != torch.long:
        raise TypeError("draft_tokens must be a 1-D LongTensor")
    if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.shape[0] != g:
        raise ValueError(f"q must have shape [g={g}, vocab], got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if not isinstance(p, torch.Tensor) or p.shape != (g + 1, q.shape[1]):
        raise ValueError(f"p must have shape [g + 1={g + 1}, vocab={q.shape[1]}], got "
                         f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
    for i in range(g):
        x = int(draft_tokens[i])
        ratio = (p[i, x] / q[i, x]).item() if q[i, x] > 0 else float("inf")
        accept = ratio >= 1 if sampling.greedy else torch.rand((), generator=generator, device=p.device).item() < min(1.0, ratio)
        if not accept:
            residual = (p[i] - q[i]).clamp(min=0)  # max(0, p - q)
            total = residual.sum()
            residual = residual / total if total > 0 else p[i]  # total = 0 only if p = q, where no rejection happens
            return i, int(sampling.sample(residual, generator))
    return g, int(sampling.sample(p[g], generator))


class Draft(ABC):
    """What speculative decoding needs from a draft: proposals with their distributions, and a
    rollback to the accepted text. A draft sees the whole token sequence at every call and keeps
    whatever state (a KV cache) it wants between calls."""

    @abstractmethod
    def reset(self, max_len: int) -> None:
        """Forget the previous sequence; sequences up to ``max_len`` tokens follow."""

    @abstractmethod
    def propose(self, tokens: torch.Tensor, gamma: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``gamma`` proposals continuing ``tokens [n]``: ``(LongTensor[g], q float32[g, V])``."""

    @abstractmethod
    def rollback(self, length: int) -> None:
        """The accepted sequence is now the first ``length`` tokens of the last ``tokens`` plus the
        proposals; anything the draft holds beyond them is discarded."""


class ModelDraft(Draft):
    """A causal LM as the draft, decoding ``gamma`` tokens one at a time with its own KV cache.

    Args:
        model: a Hugging Face Llama causal LM sharing the target's tokenizer, or a
            :class:`~refimpl.attention.decoder.Decoder` (``Decoder.from_hf(target, layers=range(k))``
            is self-speculative decoding's early exit).
    """

    def __init__(self, model: nn.Module | Decoder):
        self.decoder = as_decoder(model)
        self.cache = None

    def reset(self, max_len: int) -> None:
        check_positive_int("max_len", max_len)
        self.cache = self.decoder.new_cache(1, max_len)

    @torch.no_grad()
    def propose(self, tokens: torch.Tensor, gamma: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            raise RuntimeError("call reset(max_len) before propose()")
        check_non_negative_int("gamma", gamma)
        if gamma == 0:
            return tokens[:0], torch.zeros(0, self.decoder.model.config.vocab_size, device=tokens.device)
        proposals, distributions = [], []
        new = tokens[self.cache.length:]  # [m >= 1]: what the cache has not seen yet
        for _ in range(gamma):
            logits = self.decoder(new[None], self.cache, logits_to_keep=1)[0, -1]  # [V]
            check_logits("the logits of the draft model", logits)
            q = sampling.probabilities(logits)
            x = sampling.sample(q, generator)
            proposals.append(x)
            distributions.append(q)
            new = x[None]  # the last proposal is never fed: verification may reject it
        return torch.stack(proposals), torch.stack(distributions)

    def rollback(self, length: int) -> None:
        if self.cache is None:
            raise RuntimeError("call reset(max_len) before rollback()")
        self.cache.truncate(min(length, self.cache.length))


class PromptLookupDraft(Draft):
    """Proposes what followed an earlier occurrence of the text's last n-gram (longest n first,
    ``max_ngram`` down to 1) — the most recent occurrence followed by ``gamma`` tokens, or else the
    earliest, which is followed by the most: no model, no cost; proposals are certain (one-hot :math:`q`), so
    each is accepted with probability :math:`p(x)`. It pays off where the output repeats its input —
    editing, extraction, code (prompt lookup decoding, Saxena 2023; the n-gram pool of lookahead
    decoding, Fu et al. 2024, arXiv:2402.02057, works the same way)."""

    def __init__(self, vocab_size: int, max_ngram: int = 3):
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("max_ngram", max_ngram)
        self.vocab_size, self.max_ngram = vocab_size, max_ngram

    def reset(self, max_len: int) -> None:
        check_positive_int("max_len", max_len)

    def propose(self, tokens: torch.Tensor, gamma: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_non_negative_int("gamma", gamma)
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"vocab_size ({self.vocab_size}) must exceed every token id (found {int(tokens.max())})")
        found = tokens[:0]
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            windows = tokens.unfold(0, n, 1)[:-1]  # [len - n, n]: every earlier n-gram
            hits = (windows == tokens[-n:]).all(-1).nonzero().view(-1)
            if hits.numel():
                full = hits[hits + n + gamma <= len(tokens)]  # matches followed by gamma tokens
                start = int(full[-1] if full.numel() else hits[0]) + n
                found = tokens[start:start + gamma]
                break
        q = torch.zeros(len(found), self.vocab_size, device=tokens.device)
        return found, q.scatter_(1, found[:, None], 1.0)

    def rollback(self, length: int) -> None:
        pass


@dataclass
class SpeculativeResult:
    """What :func:`speculative_generate` produced and how.

    ``sequences [1, t + n]`` as from :func:`~refimpl.decoding.generate.generate`; ``rounds``: one
    ``(proposed, accepted)`` pair per target call (in a round cut by a stop token, ``accepted`` counts
    the proposals kept before the stop); ``acceptance``: :math:`\\beta` of every proposal the
    target scored (the first rejected one included); ``cache``: the target's KV cache afterwards, which
    holds every token of ``sequences`` but the last (nothing if no round ran)."""

    sequences: torch.Tensor
    cache: ModelKVCache | None = None
    rounds: list[tuple[int, int]] = field(default_factory=list)
    acceptance: list[float] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(accepted + 1 for _, accepted in self.rounds)

    @property
    def target_calls(self) -> int:
        return len(self.rounds)

    @property
    def tokens_per_call(self) -> float:
        """Tokens produced per target call (stops and the length limit can cut the last round short)."""
        return self.new_tokens / self.target_calls if self.rounds else float("nan")

    @property
    def alpha(self) -> float:
        """The mean acceptance rate :math:`\\alpha` over the scored proposals (NaN if none)."""
        return sum(self.acceptance) / len(self.acceptance) if self.acceptance else float("nan")


@torch.no_grad()
def speculative_generate(target: nn.Module | Decoder, draft: Draft, input_ids: torch.Tensor, max_new_tokens: int,
                         gamma: int, sampling: Sampling = Sampling(), stop_tokens: Iterable[int] = (),
                         seed: int = 0) -> SpeculativeResult:
    """Continue one prompt by up to ``max_new_tokens`` tokens with speculative decoding.

    Args:
        target: the model whose output distribution is produced (Hugging Face Llama or Decoder).
        draft: the proposer (:class:`ModelDraft`, :class:`PromptLookupDraft`, ...).
        input_ids: ``LongTensor[1, t]``, one prompt.
        max_new_tokens: the most tokens added.
        gamma: proposals per round (fewer near the length limit).
        sampling: the decoding rule, for the target and the draft alike (default greedy).
        stop_tokens: generation ends after one of these (it is kept).
        seed: seeds the generator of every random draw.

    Returns:
        a :class:`SpeculativeResult`; with greedy ``sampling`` its ``sequences`` equal
        :func:`~refimpl.decoding.generate.generate`'s (up to floating-point ties between the target's
        one-token and many-token passes).
    """
    decoder = as_decoder(target)
    check_prompt(input_ids, batch_size=1, vocab_size=decoder.vocab_size, model_param="target")
    check_non_negative_int("max_new_tokens", max_new_tokens)
    check_positive_int("gamma", gamma)
    if not isinstance(draft, Draft):
        raise TypeError(f"draft must be a Draft, got {type(draft).__name__}")
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    stop = check_stop_tokens(stop_tokens)
    generator = make_generator(seed, input_ids.device)
    prompt_len = input_ids.shape[1]
    max_len = prompt_len + max_new_tokens + gamma  # a round writes its proposals before rolling back
    cache = decoder.new_cache(1, max_len)  # holds every accepted token but the last
    draft.reset(max_len)
    tokens, result = input_ids[0], SpeculativeResult(input_ids)
    with runtime.progress_bar(max_new_tokens, desc=f"speculative (gamma={gamma})") as bar:
        while (remaining := prompt_len + max_new_tokens - len(tokens)) > 0:  # each round writes >= 1 token
            proposals, q = draft.propose(tokens, min(gamma, remaining - 1), sampling, generator)  # [g], [g, V]
            g = len(proposals)
            logits = decoder(torch.cat([tokens[cache.length:], proposals])[None], cache, logits_to_keep=g + 1)[0]
            check_logits("the logits of target", logits)  # a NaN would be accepted or picked first
            p = sampling.probabilities(logits)  # [g + 1, V]
            if q.shape[1] != p.shape[1]:
                raise ValueError(f"draft proposes over {q.shape[1]} tokens, the target's vocabulary has {p.shape[1]}")
            accepted, next_token = verify(proposals, q, p, sampling, generator)
            result.acceptance += acceptance_rate(p[:min(accepted + 1, g)], q[:min(accepted + 1, g)]).tolist()
            new = torch.cat([proposals[:accepted], proposals.new_tensor([next_token])])
            cut = next((i + 1 for i, t in enumerate(new.tolist()) if t in stop), len(new))  # end at a stop token
            result.rounds.append((g, cut - 1))
            cache.truncate(len(tokens) + accepted)  # roll back the rejected proposals
            draft.rollback(len(tokens) + accepted)
            tokens = torch.cat([tokens, new[:cut]])
            bar.update(cut)
            if tokens[-1].item() in stop:
                break
    cache.truncate(min(cache.length, len(tokens) - 1))  # a stop inside the accepted proposals
    draft.rollback(len(tokens))
    result.sequences, result.cache = tokens[None], cache
    return result
