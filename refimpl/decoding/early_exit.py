r"""Confident adaptive language modeling: each token leaves the decoder at the first confident layer.

Schuster et al. 2022, "Confident Adaptive Language Modeling" (CALM, NeurIPS 2022, arXiv:2207.07061).
Some next tokens are easy, and an intermediate layer already predicts them. CALM runs the decoder
layer by layer for each generated token :math:`t`; after layer :math:`i` it maps the hidden state
:math:`d_t^i` through the model's *shared* final norm and output head, computes a confidence
:math:`c_t^i`, and exits if

.. math:: c_t^i \ge \lambda_i(t),

predicting :math:`y_{t+1} = \arg\max \mathrm{softmax}(W_\text{out}\, \mathrm{norm}(d_t^i))`.
Confidence measures (the paper's "local confidence measures"):

- **softmax response**: the top-1 minus the top-2 probability of the intermediate prediction,
  :math:`c_t^i = p_{(1)} - p_{(2)}` (:func:`softmax_response`; costs one output projection per test);
- **hidden-state saturation**: the cosine similarity of consecutive layers' states,
  :math:`c_t^i = \cos(d_t^{i-1}, d_t^i)`, with :math:`d_t^0` the embedding (:func:`hidden_state_saturation`);
- the paper's third measure, a trained **early-exit classifier**, needs training and is out of scope.

Exits are tested after layer ``min_layer`` and every ``layer_interval`` layers after it; the last
layer always ends the pass. The threshold is one :math:`\lambda`, one :math:`\lambda_i` per layer,
or the paper's **decaying threshold**, which relaxes with the position :math:`t` of the token among
the :math:`N` to generate, with temperature :math:`\tau` (4 in the paper). We use the form of the
authors' released code (T5X ``position_adjusted_threshold``),
:math:`\lambda(t) = \lambda\,\big(\tfrac{9}{10} + \tfrac{1}{10} e^{-\tau t / N}\big)`, which keeps
:math:`\lambda(0) = \lambda` and :math:`\lambda = 0 \Rightarrow \lambda(t) = 0`.

**State propagation.** A token that exits at layer :math:`i` has no state in layers
:math:`i+1 .. L`, yet later tokens that run deeper attend to its keys and values there. CALM copies
the exit state upwards: :math:`d_t^j := d_t^i` for :math:`j > i`, and each skipped layer computes
only its own key and value from it, :math:`k_t^j = R_t W_K^j \mathrm{RMSNorm}_j(d_t^i)`,
:math:`v_t^j = W_V^j \mathrm{RMSNorm}_j(d_t^i)` (:meth:`LayerwiseDecoder.propagate_state`; no query,
attention or MLP). The prompt but its last token is prefilled through every layer, as CALM's
encoder is run in full; every generated token, the first included, is decided by an exit.

**Calibration** (the paper's "calibrating local early exits from global constraints", with
Learn-then-Test, Angelopoulos et al. 2021, arXiv:2110.01052): we want *textual consistency* with
the full model, :math:`\Pr\big(\mathbb{E}[\mathcal{D}(Y_\text{early}, Y_\text{full})] \le \delta\big)
\ge 1 - \epsilon`, over the draw of the calibration prompts. Here :math:`\mathcal{D}` is the
fraction of generated positions whose greedy token differs from the full model's
(:func:`token_inconsistency`), one loss in :math:`[0, 1]` per prompt. For each candidate
:math:`\lambda_j` of a descending grid, the null hypothesis :math:`H_j: R(\lambda_j) > \delta` gets a
p-value from the empirical risk :math:`\hat R_j` of :math:`n` prompts — Hoeffding,
:math:`p = e^{-2n(\delta - \hat R)_+^2}`, or Hoeffding–Bentkus (Bates et al. 2021, arXiv:2101.02703),
:math:`p = \min\big(e^{-n\,h_1(\hat R \wedge \delta,\, \delta)},\ e\,\Pr[\mathrm{Bin}(n, \delta) \le
\lceil n \hat R\rceil]\big)` with :math:`h_1(a, b) = a \log\frac{a}{b} + (1-a)\log\frac{1-a}{1-b}`.
Fixed-sequence testing rejects :math:`H_1, H_2, \dots` while :math:`p_j \le \epsilon` and returns
the last rejected :math:`\lambda_j`, the smallest certified threshold (none: run the full model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from refimpl import runtime
from refimpl._validation import (check_choice, check_fraction, check_logits, check_non_negative_int,
                                 check_positive_int, check_positive_number, check_token_ids)
from refimpl.anatomy import attention_shape
from refimpl.attention.decoder import Decoder, rms_norm
from refimpl.attention.kv_cache import KVCache, ModelKVCache, apply_rope
from refimpl.decoding.generate import check_prompt, check_stop_tokens

CONFIDENCE_MEASURES = ("softmax_response", "hidden_state_saturation")
P_VALUES = ("hoeffding", "hoeffding_bentkus")
DEFAULT_THRESHOLDS = tuple(i / 20 for i in range(20, -1, -1))  # 1.0, 0.95, ..., 0.0

# --- confidence measures and the threshold --------------------------------------------------------


def softmax_response(logits: torch.Tensor) -> torch.Tensor:
    """``[...]``: the top-1 minus the top-2 probability of ``softmax(logits [..., V])``, in [0, 1]."""
    top2 = logits.float().softmax(-1).topk(2, dim=-1).values  # [..., 2]
    return top2[..., 0] - top2[..., 1]


def hidden_state_saturation(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``[...]``: the cosine similarity of two layers' hidden states ``[..., hidden]``, in [-1, 1]."""
    return F.cosine_similarity(previous.float(), current.float(), dim=-1)


def decaying_threshold(threshold: float, t: int, max_new_tokens: int, temperature: float = 4.0) -> float:
    """CALM's decaying threshold in the released code's form: :math:`\\lambda (9/10 + e^{-\\tau t/N}/10)`
    for token ``t`` of ``N = max_new_tokens``."""
    check_fraction("threshold", threshold)
    check_non_negative_int("t", t)
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_number("temperature", temperature)
    return threshold * (0.9 + 0.1 * math.exp(-temperature * t / max_new_tokens))


# --- the decoder, one layer at a time -------------------------------------------------------------


class LayerwiseDecoder(Decoder):
    """:class:`~refimpl.attention.decoder.Decoder`, whose steps CALM runs one at a time: :meth:`embed`
    gives :math:`d^0`, :meth:`block` ``(i, ...)`` :math:`d^{i+1}` from :math:`d^i`, :meth:`head` the
    logits of any :math:`d^i` (the shared final norm and output head), plus the state propagation of a
    skipped layer (the model's weights are shared, not copied, and never modified)."""

    @classmethod
    def over(cls, model: nn.Module | Decoder) -> LayerwiseDecoder:
        """The layerwise decoder over a Hugging Face Llama, or over a Decoder's model and layers."""
        if isinstance(model, cls):
            return model
        if isinstance(model, Decoder):
            return cls(model.model, model.layers)
        return cls(model)

    def propagate_state(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> None:
        """Write into ``cache`` the key and value that the ``i``-th layer run computes from the copied
        exit state ``h [b, t, hidden]`` (its query, attention and MLP are skipped)."""
        layer = self.model.model.layers[self.layers[i]]
        x = rms_norm(h, layer.input_layernorm.weight, self.model.config.rms_norm_eps)
        shape, (b, t, _) = attention_shape(self.model.config), x.shape
        k = layer.self_attn.k_proj(x).view(b, t, shape.n_kv_heads, shape.head_dim).transpose(1, 2)  # [b, kv, t, d]
        v = layer.self_attn.v_proj(x).view(b, t, shape.n_kv_heads, shape.head_dim).transpose(1, 2)
        cache.update(positions, apply_rope(k, positions, self.inv_freq), v)  # keys stored after RoPE


# --- per-token early exit -------------------------------------------------------------------------


@dataclass
class EarlyExitResult:
    """``sequences [1, t + n]`` (prompt and continuation, as from
    :func:`~refimpl.decoding.generate.generate`); ``exit_layers[k]``: how many layers generated token
    ``k`` ran (1 .. ``num_layers``; state propagation's key/value projections not counted); ``cache``:
    the KV cache afterwards, propagated entries included."""

    sequences: torch.Tensor
    num_layers: int
    cache: ModelKVCache
    exit_layers: list[int]

    @property
    def new_tokens(self) -> int:
        return len(self.exit_layers)

    @property
    def mean_layers(self) -> float:
        """Layers run per generated token, on average (NaN if none was generated)."""
        return sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else float("nan")


def _check_exit_arguments(n_layers: int, threshold: float | Sequence[float] | None, confidence: str, min_layer: int,
                          layer_interval: int, threshold_decay: float | None) -> tuple[float, ...] | None:
    """The per-layer thresholds :math:`\\lambda_1 .. \\lambda_{L-1}` (``None``: never exit)."""
    check_choice("confidence", confidence, CONFIDENCE_MEASURES)
    if not isinstance(min_layer, int) or isinstance(min_layer, bool) or not 1 <= min_layer <= n_layers:
        raise ValueError(f"min_layer must be an int in [1, {n_layers}] (the model's layers), got {min_layer!r}")
    check_positive_int("layer_interval", layer_interval)
    if threshold_decay is not None:
        check_positive_number("threshold_decay", threshold_decay)
    if threshold is None:
        return None
    if isinstance(threshold, Sequence) and not isinstance(threshold, (str, bytes)):
        if len(threshold) != n_layers - 1:
            raise ValueError(f"threshold must hold one value per layer that can exit ({n_layers - 1}), "
                             f"got {len(threshold)}")
        for value in threshold:
            check_fraction("threshold", value)
        return tuple(float(v) for v in threshold)
    check_fraction("threshold", threshold)
    return (float(threshold),) * (n_layers - 1)


@torch.no_grad()
def early_exit_generate(model: nn.Module | Decoder, input_ids: torch.Tensor, max_new_tokens: int,
                        threshold: float | Sequence[float] | None = 0.9, confidence: str = "softmax_response",
                        min_layer: int = 1, layer_interval: int = 1, threshold_decay: float | None = None,
                        stop_tokens: Iterable[int] = ()) -> EarlyExitResult:
    """Greedy decoding of one prompt with CALM's per-token early exit (module docstring).

    Args:
        model: a Hugging Face Llama causal LM or a :class:`~refimpl.attention.decoder.Decoder` (its
            layers are the ones run); read only, never modified.
        input_ids: ``LongTensor[1, t]``, one prompt.
        max_new_tokens: the most tokens added.
        threshold: :math:`\\lambda` in [0, 1], or one :math:`\\lambda_i` per layer ``1 .. L-1``;
            ``None`` never exits (the full model).
        confidence: ``"softmax_response"`` or ``"hidden_state_saturation"``.
        min_layer: the first layer (1-based) after which a token may exit; ``L`` never exits.
        layer_interval: test again every this many layers after ``min_layer``.
        threshold_decay: the temperature :math:`\\tau` of the decaying threshold (:func:`decaying_threshold`,
            ``N = max_new_tokens``); ``None`` keeps the threshold constant.
        stop_tokens: generation ends after one of these (it is kept).

    A lower threshold exits each token no later *for the same cache*; over a sequence the mean number
    of layers usually falls with it, but need not monotonically: an earlier exit changes the
    propagated states and the text that later tokens see.
    """
    decoder = LayerwiseDecoder.over(model)
    n_layers = len(decoder.layers)
    lambdas = _check_exit_arguments(n_layers, threshold, confidence, min_layer, layer_interval, threshold_decay)
    check_prompt(input_ids, batch_size=1, vocab_size=decoder.vocab_size)
    check_non_negative_int("max_new_tokens", max_new_tokens)
    stop = check_stop_tokens(stop_tokens)
    exit_tests = set(range(min_layer, n_layers, layer_interval)) if lambdas is not None else set()
    prompt_len = input_ids.shape[1]
    cache = decoder.new_cache(1, prompt_len + max_new_tokens)
    result = EarlyExitResult(input_ids, n_layers, cache, [])
    if max_new_tokens == 0:
        return result
    if prompt_len > 1:  # prefill all but the last prompt token through every layer
        h = decoder.embed(input_ids[:, :-1])  # [1, t - 1, hidden]
        positions = torch.arange(prompt_len - 1, device=input_ids.device)
        for i in range(n_layers):
            h = decoder.block(i, h, positions, cache[i])
    token = input_ids[:, -1:]  # [1, 1]
    for t in runtime.progress(range(max_new_tokens), desc="early exit"):
        positions = torch.tensor([cache.length], device=input_ids.device)
        h, logits = decoder.embed(token), None  # d_t^0: [1, 1, hidden]
        for i in range(n_layers):
            previous, h = h, decoder.block(i, h, positions, cache[i])  # d_t^i, d_t^{i+1}
            layer, logits = i + 1, None
            if layer not in exit_tests:
                continue
            if confidence == "softmax_response":
                logits = decoder.head(h)  # [1, 1, V]: the shared head on the intermediate state
                c = softmax_response(logits[0, -1])
            else:
                c = hidden_state_saturation(previous[0, -1], h[0, -1])
            lam = lambdas[i] if threshold_decay is None else \
                decaying_threshold(lambdas[i], t, max_new_tokens, threshold_decay)
            if c.item() >= lam:
                break  # exit: d_t^layer is the final state of token t
        for j in range(layer, n_layers):  # state propagation: d_t^j := d_t^layer for the skipped layers
            decoder.propagate_state(j, h, positions, cache[j])
        logits = decoder.head(h) if logits is None else logits
        check_logits("the logits of model", logits)
        token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1], greedy
        result.sequences = torch.cat([result.sequences, token], dim=1)
        result.exit_layers.append(layer)
        if token.item() in stop:
            break
    return result


# --- calibration: Learn-then-Test -----------------------------------------------------------------


def token_inconsistency(early: torch.Tensor, full: torch.Tensor) -> float:
    """:math:`\\mathcal{D}(Y_\\text{early}, Y_\\text{full})`: the fraction of the positions of the longer
    of two generated token sequences ``[n]`` where they differ (a missing token differs), in [0, 1]."""
    for name, x in (("early", early), ("full", full)):
        if not isinstance(x, torch.Tensor) or x.dim() != 1:
            raise TypeError(f"{name} must be a 1-D tensor of generated token ids")
    n, m = max(len(early), len(full)), min(len(early), len(full))
    return 0.0 if n == 0 else 1.0 - int((early[:m] == full[:m]).sum()) / n


def _check_risk(risk: float, n: int, delta: float) -> None:
    check_fraction("risk", risk)
    check_positive_int("n", n)
    check_fraction("delta", delta, open_interval=True)


def hoeffding_p_value(risk: float, n: int, delta: float) -> float:
    """:math:`e^{-2n(\\delta - \\hat R)_+^2}`: p-value of :math:`H: R > \\delta` from the mean
    ``risk`` :math:`\\hat R` of ``n`` i.i.d. losses in [0, 1] (Hoeffding's inequality)."""
    _check_risk(risk, n, delta)
    return math.exp(-2 * n * max(delta - risk, 0.0) ** 2)


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """:math:`\\Pr[\\mathrm{Bin}(n, p) \\le k]`, summed in log space."""
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
                 + (n - i) * math.log1p(-p) for i in range(min(k, n) + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in log_terms))


def hoeffding_bentkus_p_value(risk: float, n: int, delta: float) -> float:
    """The Hoeffding–Bentkus p-value of :math:`H: R > \\delta` (module docstring), capped at 1."""
    _check_risk(risk, n, delta)
    a = min(risk, delta)
    h1 = (a * math.log(a / delta) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - delta))
    bentkus = math.e * _binomial_cdf(math.ceil(n * risk), n, delta)
    return min(1.0, math.exp(-n * h1), bentkus)


@dataclass
class ThresholdCalibration:
    """The outcome of Learn-then-Test: ``threshold``, the smallest certified :math:`\\lambda` (``None``:
    none is, run the full model); per candidate of ``thresholds``, the empirical ``risks`` and the
    ``p_values``; ``n`` calibration prompts; ``delta``, ``epsilon``."""

    threshold: float | None
    thresholds: tuple[float, ...]
    risks: list[float]
    p_values: list[float]
    n: int
    delta: float
    epsilon: float


def _check_test_arguments(thresholds: Sequence[float], delta: float, epsilon: float,
                          p_value: str) -> tuple[float, ...]:
    """The arguments of Learn-then-Test, checked; returns the grid of candidate thresholds as a tuple."""
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence) or not thresholds:
        raise ValueError(f"thresholds must be a non-empty sequence, got {thresholds!r}")
    for value in thresholds:
        check_fraction("thresholds", value)
    if any(a <= b for a, b in zip(thresholds, thresholds[1:])):
        raise ValueError(f"thresholds must be strictly descending (fixed-sequence testing), got {list(thresholds)}")
    check_fraction("delta", delta, open_interval=True)
    check_fraction("epsilon", epsilon, open_interval=True)
    check_choice("p_value", p_value, P_VALUES)
    return tuple(float(v) for v in thresholds)


def learn_then_test(losses: torch.Tensor, thresholds: Sequence[float], delta: float, epsilon: float,
                    p_value: str = "hoeffding_bentkus") -> ThresholdCalibration:
    """Fixed-sequence testing over ``thresholds`` (strictly descending) given ``losses [k, n]``: the loss
    in [0, 1] of each of ``n`` calibration prompts at each of the ``k`` candidates. Guarantees
    :math:`\\Pr(R(\\hat\\lambda) \\le \\delta) \\ge 1 - \\epsilon` for i.i.d. prompts."""
    grid = _check_test_arguments(thresholds, delta, epsilon, p_value)
    if not isinstance(losses, torch.Tensor) or not losses.is_floating_point() or losses.dim() != 2:
        raise TypeError("losses must be a floating-point tensor [candidates, calibration prompts]")
    if losses.shape[0] != len(grid) or losses.shape[1] == 0:
        raise ValueError(f"losses must have shape [{len(grid)} candidates, n >= 1 prompts], got {tuple(losses.shape)}")
    if not bool(((losses >= 0) & (losses <= 1)).all()):  # NaN fails too
        raise ValueError("losses must lie in [0, 1] (a bounded loss is what the p-values assume)")
    n = losses.shape[1]
    risks = losses.double().mean(1).clamp(0, 1).tolist()  # R^_j
    bound = hoeffding_p_value if p_value == "hoeffding" else hoeffding_bentkus_p_value
    p_values = [bound(r, n, delta) for r in risks]
    chosen = None
    for lam, p in zip(grid, p_values):  # reject H_j: R(lambda_j) > delta while p_j <= epsilon
        if p > epsilon:
            break
        chosen = lam
    return ThresholdCalibration(chosen, grid, risks, p_values, n, delta, epsilon)


def calibrate_threshold(model: nn.Module | Decoder, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                        delta: float, epsilon: float, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                        p_value: str = "hoeffding_bentkus", confidence: str = "softmax_response",
                        min_layer: int = 1, layer_interval: int = 1, threshold_decay: float | None = None,
                        stop_tokens: Iterable[int] = ()) -> ThresholdCalibration:
    """Choose :math:`\\lambda` for :func:`early_exit_generate` by Learn-then-Test on textual consistency
    with the full model's greedy output (:func:`token_inconsistency` per prompt). Each prompt
    (``LongTensor[1, t]``) is decoded once in full and once per candidate (every candidate is run, so
    that the risks of all can be plotted). The exit arguments are those of :func:`early_exit_generate`."""
    decoder = LayerwiseDecoder.over(model)
    grid = _check_test_arguments(thresholds, delta, epsilon, p_value)
    _check_exit_arguments(len(decoder.layers), grid[0], confidence, min_layer, layer_interval, threshold_decay)
    check_non_negative_int("max_new_tokens", max_new_tokens)
    check_stop_tokens(stop_tokens)
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty sequence of LongTensor[1, t] (the calibration set)")
    for i, prompt in enumerate(prompts):
        check_token_ids(f"prompts[{i}]", prompt, decoder.vocab_size)
        if prompt.shape[0] != 1:
            raise ValueError(f"prompts[{i}] must hold one sequence, LongTensor[1, t], got {prompt.shape[0]}")
    options = dict(confidence=confidence, min_layer=min_layer, layer_interval=layer_interval,
                   threshold_decay=threshold_decay, stop_tokens=stop_tokens)
    losses = torch.zeros(len(grid), len(prompts), dtype=torch.float64)  # [k, n]
    for m, prompt in enumerate(runtime.progress(prompts, desc="calibrate early exit")):
        full = early_exit_generate(decoder, prompt, max_new_tokens, threshold=None, **options)
        full_tokens = full.sequences[0, prompt.shape[1]:]
        for j, lam in enumerate(grid):
            early = early_exit_generate(decoder, prompt, max_new_tokens, threshold=lam, **options)
            losses[j, m] = token_inconsistency(early.sequences[0, prompt.shape[1]:], full_tokens)
    return learn_then_test(losses, grid, delta, epsilon, p_value)
