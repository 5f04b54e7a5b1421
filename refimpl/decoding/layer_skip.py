r"""Draft & Verify: self-speculative decoding with a draft that skips the target's own sublayers.

Zhang et al. 2023, "Draft & Verify: Lossless Large Language Model Acceleration via Self-Speculative
Decoding" (arXiv:2309.08168, ACL 2024). The draft is the target itself with some intermediate
sublayers skipped: each Llama layer has an attention and an MLP sublayer, and the draft skips a set
:math:`A` of attention sublayers and, independently, a set :math:`M` of MLP sublayers; a skipped
sublayer passes its residual stream through unchanged (:math:`h = x` instead of
:math:`h = x + W_O\,\mathrm{Attn}(\mathrm{RMSNorm}(x))`). No weights are added or copied, and the
target verifies the draft's proposals as in :mod:`refimpl.decoding.speculative`, so the output is
the target's. The early exit of LayerSkip is the special case :math:`A = M = \{k, \dots, L-1\}`.

**Which sublayers to skip** is a search over a binary vector :math:`z \in \{0,1\}^{2L}`, one bit per
attention sublayer (:math:`z_l`) and per MLP sublayer (:math:`z_{L+l}`), 1 for skipped, as in the
authors' released search code. The paper minimises the average inference time per verified token,

.. math:: z^* = \arg\min_z f(z), \qquad z \in \{0, 1\}^{2L},

measured by running self-speculative decoding on calibration prompts, and searches with Bayesian
optimization (a Gaussian-process surrogate of :math:`f` and an acquisition function pick the next
:math:`z` to try). On a shared CPU a measured time is noise, so :func:`select_skipped_layers` uses a
deterministic proxy for :math:`1/f`: the **predicted speed-up** of Leviathan et al.'s Theorem 3.8
(:func:`~refimpl.decoding.speculative.expected_speedup`) at a fixed :math:`\gamma`,

.. math:: S(z) = \frac{1 - \alpha(z)^{\gamma+1}}{(1 - \alpha(z))\,(\gamma\, c(z) + r)},

with :math:`\alpha(z)` the draft's **greedy acceptance** measured teacher-forced on the target's own
greedy continuations of the calibration prompts (the fraction of positions where the draft's argmax is
the target's: with greedy decoding exactly the proposals that verification accepts), and :math:`c(z)`
the **cost ratio**, the fraction of the target's per-token weight multiplications that the draft keeps
(:func:`cost_ratio`: parameters of the linear layers a token passes through, the output head included;
attention over the context and the norms are left out).

**Bayesian optimization** (:func:`bayesian_optimization`, written out here): a Gaussian process with
the RBF kernel on binary vectors, where the squared distance is the Hamming distance,
:math:`k(z, z') = \exp\!\big(-H(z, z') / 2\ell^2\big)`, over standardised objective values, with the
length scale :math:`\ell` chosen from a grid by the log marginal likelihood. Each iteration proposes
candidates (every one-bit flip of the best points so far, and random vectors) and evaluates the one of
highest **expected improvement** :math:`\mathrm{EI}(z) = (\mu - y^+)\,\Phi(u) + \sigma\,\varphi(u)`,
:math:`u = (\mu - y^+)/\sigma`. Draft & Verify's adaptive draft-exiting (stop drafting when the
draft's confidence falls below an adapted threshold) is not implemented: the draft proposes
:math:`\gamma` tokens, as :class:`~refimpl.decoding.speculative.ModelDraft` does.

Usage::

    from refimpl.decoding import speculative as spec
    selection = select_skipped_layers(model, prompts, max_new_tokens=32, gamma=4, n_iter=40)
    draft = LayerSkipDecoder.from_hf(model, selection.skip_attention, selection.skip_mlp)
    result = spec.speculative_generate(model, spec.ModelDraft(draft), prompt, 64, gamma=4)
    plt.plot(selection.search.best_so_far)  # the objective over the evaluations
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass

import torch
from torch import nn

from refimpl import runtime
from refimpl._validation import (check_fraction, check_layer_set, check_non_negative_int, check_positive_int,
                                 check_positive_number, check_token_ids)
from refimpl.anatomy import linears
from refimpl.attention.decoder import Decoder
from refimpl.attention.kv_cache import KVCache, ModelKVCache
from refimpl.decoding.generate import generate
from refimpl.decoding.speculative import expected_speedup

Layers = Sequence[int] | Set[int]  # layer indices, in any order

# --- the draft: the target's decoder with sublayers skipped ----------------------------------------


class SkipKVCache(ModelKVCache):
    """The draft's cache: one :class:`KVCache` per attention sublayer it runs (ModelKVCache's
    ``layers``, so ``length`` and ``truncate`` are theirs), looked up by layer run: ``cache[i]`` is
    ``None`` where layer run ``i`` skips its attention, which neither reads nor writes keys and values."""

    def __init__(self, layers: list[KVCache], attention_runs: tuple[bool, ...]):
        super().__init__(layers)
        self.attention_runs = attention_runs  # layer run i -> its slot in self.layers, or None
        self.slots = [sum(attention_runs[:i]) if runs else None for i, runs in enumerate(attention_runs)]

    def __getitem__(self, index: int) -> KVCache | None:
        slot = self.slots[index]
        return None if slot is None else self.layers[slot]

    def __len__(self) -> int:
        return len(self.slots)


class LayerSkipDecoder(Decoder):
    """The target's :class:`~refimpl.attention.decoder.Decoder` with the attention sublayers of the
    layers in ``skip_attention`` and the MLP sublayers of those in ``skip_mlp`` skipped (their residual
    passes through); a layer with both skipped is not run at all. The weights are the model's, shared,
    never modified. At least one attention sublayer must run: a draft without attention sees only its
    last token and has nothing to cache."""

    def __init__(self, model: nn.Module, skip_attention: Layers = (), skip_mlp: Layers = ()):
        super().__init__(model)  # checks the model; self.layers: all of them
        n_layers = len(self.layers)
        self.skip_attention = check_layer_set("skip_attention", skip_attention, n_layers)
        self.skip_mlp = check_layer_set("skip_mlp", skip_mlp, n_layers)
        if len(self.skip_attention) == n_layers:
            raise ValueError(f"skip_attention must leave at least one of the {n_layers} attention sublayers")
        self.layers = tuple(l for l in range(n_layers) if l not in self.skip_attention or l not in self.skip_mlp)
        self.attention_runs = tuple(l not in self.skip_attention for l in self.layers)

    @classmethod
    def from_hf(cls, model: nn.Module, skip_attention: Layers = (),  # type: ignore[override]
                skip_mlp: Layers = ()) -> LayerSkipDecoder:
        """The draft over ``model``'s weights (``model`` is not modified)."""
        return cls(model, skip_attention, skip_mlp)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, window: int | None = None,
                  sinks: int = 0) -> SkipKVCache:
        """An empty :class:`SkipKVCache`: caches for the attention sublayers run, nothing for the others."""
        caches = ModelKVCache.from_config(self.model.config, batch_size, max_len, dtype or self.model.dtype,
                                          self.model.device, window, sinks, n_layers=sum(self.attention_runs))
        return SkipKVCache(list(caches.layers), self.attention_runs)

    def block(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Layer run ``i`` on ``h [batch, t, hidden]``, each of its two sublayers run unless skipped."""
        layer = self.layers[i]
        if layer not in self.skip_attention:
            h = self.attention_sublayer(i, h, positions, cache)  # h = x + W_O Attn(RMSNorm(x))
        if layer not in self.skip_mlp:
            h = self.mlp_sublayer(i, h)  # y = h + MLP(RMSNorm(h))
        return h  # [b, t, hidden]

    def forward(self, input_ids: torch.Tensor, cache: ModelKVCache | None = None,
                positions: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """:meth:`Decoder.forward`, with ``cache`` from this draft's :meth:`new_cache`."""
        if cache is not None and getattr(cache, "attention_runs", None) != self.attention_runs:
            raise TypeError("cache must come from this draft's new_cache() (a SkipKVCache over the attention "
                            "sublayers it runs)")
        return super().forward(input_ids, cache, positions, logits_to_keep)


def skip_sets(z: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(skip_attention, skip_mlp)`` of the binary vector ``z [2L]`` (module docstring)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 1 or z.numel() % 2 or z.dtype != torch.bool:
        raise ValueError("z must be a BoolTensor [2L]: L attention bits, then L MLP bits")
    n_layers = z.numel() // 2
    return tuple(z[:n_layers].nonzero().view(-1).tolist()), tuple(z[n_layers:].nonzero().view(-1).tolist())


def sublayer_sizes(model: nn.Module) -> tuple[int, torch.Tensor]:
    """The parameters of the output head's and of each sublayer's linear layers: ``(head, sizes [2L])``,
    the attention sublayers' in ``sizes[:L]`` and the MLP sublayers' in ``sizes[L:]`` (the order of ``z``)."""
    size = lambda module: sum(m.weight.numel() for m in linears(module).values())  # noqa: E731
    layers = Decoder.from_hf(model).model.model.layers  # checks the model
    return size(model.lm_head), torch.tensor([size(layer.self_attn) for layer in layers]
                                             + [size(layer.mlp) for layer in layers], dtype=torch.float64)


def cost_ratio(model: nn.Module, skip_attention: Layers = (), skip_mlp: Layers = ()) -> float:
    """:math:`c`: the parameters of the linear layers a token passes through in the draft over those in
    the target (each weight is one multiply-add per token; the output head runs in both)."""
    draft = LayerSkipDecoder(model, skip_attention, skip_mlp)  # checks the arguments
    head, sizes = sublayer_sizes(model)  # [2L]
    n_layers = len(sizes) // 2
    skipped = [l for l in draft.skip_attention] + [n_layers + l for l in draft.skip_mlp]
    return float((head + sizes.sum() - sizes[skipped].sum()) / (head + sizes.sum()))


# --- the acceptance rate, teacher-forced on the target's greedy continuations ----------------------


@dataclass
class Calibration:
    """The target's greedy continuations of calibration prompts: ``sequences[k] [1, t_k + n]`` and
    ``target_tokens[k] [n]``, the target's argmax at each new position of a teacher-forced pass."""

    sequences: list[torch.Tensor]
    prompt_lengths: list[int]
    target_tokens: list[torch.Tensor]


@torch.no_grad()
def calibration_set(model: nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int) -> Calibration:
    """Continue each prompt (``LongTensor[1, t]``) greedily by ``max_new_tokens`` tokens with the target."""
    target = Decoder.from_hf(model)
    check_positive_int("max_new_tokens", max_new_tokens)
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty sequence of LongTensor[1, t] (the calibration set)")
    for k, prompt in enumerate(prompts):
        check_token_ids(f"prompts[{k}]", prompt, target.vocab_size)
        if prompt.shape[0] != 1:
            raise ValueError(f"prompts[{k}] must hold one sequence, LongTensor[1, t], got {prompt.shape[0]}")
    calibration = Calibration([], [], [])
    for prompt in runtime.progress(prompts, desc="calibration continuations"):
        sequence = generate(target, prompt, max_new_tokens)  # [1, t + n]
        t = prompt.shape[1]
        calibration.sequences.append(sequence)
        calibration.prompt_lengths.append(t)
        calibration.target_tokens.append(target(sequence)[0, t - 1:-1].argmax(-1))  # [n]
    return calibration


@torch.no_grad()
def greedy_acceptance(draft: Decoder, calibration: Calibration) -> float:
    """:math:`\\alpha`: the fraction of new positions of ``calibration`` where the draft's argmax,
    teacher-forced on the target's continuation, is the target's."""
    agree = total = 0
    for sequence, t, tokens in zip(calibration.sequences, calibration.prompt_lengths, calibration.target_tokens):
        agree += int((draft(sequence)[0, t - 1:-1].argmax(-1) == tokens).sum())  # draft logits [n, V]
        total += len(tokens)
    return agree / total


# --- Bayesian optimization over binary vectors -----------------------------------------------------


def hamming_rbf_kernel(a: torch.Tensor, b: torch.Tensor, length_scale: float) -> torch.Tensor:
    """:math:`k(z, z') = \\exp(-H(z, z') / 2\\ell^2)` between the rows of ``a [n, d]`` and ``b [m, d]``: ``[n, m]``."""
    hamming = (a[:, None, :] != b[None, :, :]).sum(-1).double()  # [n, m] = squared distance of binary vectors
    return torch.exp(-hamming / (2 * length_scale ** 2))


def gp_posterior(points: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                 length_scales: Sequence[float] = (1.0, 2.0, 4.0, 8.0), noise: float = 1e-4
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GP's posterior mean and standard deviation ``[m]`` at ``queries [m, d]`` given the
    evaluated ``points [n, d]`` and ``values [n]``, in the units of ``values``; the length scale is
    the one of ``length_scales`` with the highest log marginal likelihood of the standardised values."""
    scale = values.std() if len(values) > 1 and values.std() > 0 else values.new_tensor(1.0)
    y = ((values - values.mean()) / scale).double()  # standardised: prior mean 0, prior variance 1
    best = None
    for ell in length_scales:
        chol = torch.linalg.cholesky(hamming_rbf_kernel(points, points, ell) + noise * torch.eye(len(y), dtype=y.dtype))
        weights = torch.cholesky_solve(y[:, None], chol)[:, 0]  # (K + s^2 I)^-1 y
        log_likelihood = -0.5 * y @ weights - chol.diagonal().log().sum()  # - n/2 log 2 pi: the same for all
        if best is None or log_likelihood > best[0]:
            best = (log_likelihood, ell, chol, weights)
    _, ell, chol, weights = best
    cross = hamming_rbf_kernel(points, queries, ell)  # [n, m]
    mean = cross.T @ weights  # [m]
    variance = 1 - (cross * torch.cholesky_solve(cross, chol)).sum(0)  # [m]
    return values.mean() + scale * mean, scale * variance.clamp(min=1e-12).sqrt()


def expected_improvement(mean: torch.Tensor, std: torch.Tensor, best: float) -> torch.Tensor:
    """:math:`\\mathrm{EI} = (\\mu - y^+)\\,\\Phi(u) + \\sigma\\,\\varphi(u)`, :math:`u = (\\mu - y^+)/\\sigma`
    (maximisation), elementwise."""
    normal = torch.distributions.Normal(0.0, 1.0)
    u = (mean - best) / std
    return (mean - best) * normal.cdf(u) + std * normal.log_prob(u).exp()


@dataclass
class BayesOptResult:
    """``points [n, d]`` (bool) in the order evaluated and their ``values [n]``; ``best``, the first
    point of the highest ``value``; ``best_so_far [n]``, the running maximum (for a convergence plot)."""

    points: torch.Tensor
    values: torch.Tensor

    best = property(lambda self: self.points[int(self.values.argmax())])
    value = property(lambda self: float(self.values.max()))
    best_so_far = property(lambda self: self.values.cummax(0).values)


def bayesian_optimization(objective: Callable[[torch.Tensor], float], n_bits: int, n_iter: int, n_init: int = 8,
                          seed: int = 0, feasible: Callable[[torch.Tensor], bool] | None = None,
                          initial: Sequence[torch.Tensor] = (), n_random: int = 64) -> BayesOptResult:
    """Maximise ``objective`` over feasible ``BoolTensor[n_bits]`` with a GP and expected improvement.

    Evaluates ``initial`` and ``n_init`` random vectors (each bit set with a probability drawn per
    vector), then ``n_iter`` times the candidate of highest EI among every one-bit flip of the three
    best points and ``n_random`` random vectors, never a point twice. Deterministic for a ``seed``.
    """
    if not callable(objective):
        raise TypeError(f"objective must be callable, got {type(objective).__name__}")
    for name, value in (("n_bits", n_bits), ("n_random", n_random)):
        check_positive_int(name, value)
    for name, value in (("n_iter", n_iter), ("n_init", n_init), ("seed", seed)):
        check_non_negative_int(name, value)
    feasible = feasible or (lambda z: True)
    for k, z in enumerate(initial):
        if not isinstance(z, torch.Tensor) or z.dtype != torch.bool or z.shape != (n_bits,) or not feasible(z):
            raise ValueError(f"initial[{k}] must be a feasible BoolTensor[{n_bits}]")
    generator = torch.Generator().manual_seed(seed)
    seen: set[tuple[bool, ...]] = set()

    def fresh(candidates: torch.Tensor) -> torch.Tensor:  # [m, d] -> the feasible ones not yet evaluated
        keep = [z for z in candidates if tuple(z.tolist()) not in seen and feasible(z)]
        unique = {tuple(z.tolist()): z for z in keep}  # first occurrence of each, in order
        return torch.stack(list(unique.values())) if unique else candidates[:0]

    def random_vectors(n: int) -> torch.Tensor:
        rate = torch.rand(n, 1, generator=generator)  # the fraction of bits set, per vector
        return torch.rand(n, n_bits, generator=generator) < rate  # [n, d]

    points, values = [], []

    def evaluate(z: torch.Tensor) -> None:
        seen.add(tuple(z.tolist()))
        value = float(objective(z.clone()))
        if not math.isfinite(value):  # a NaN would never be the argmax, and would break the GP
            raise ValueError(f"objective must return finite values, got {value} at {z.int().tolist()}")
        points.append(z.clone())
        values.append(value)

    for z in initial:
        if tuple(z.tolist()) not in seen:
            evaluate(z)
    for z in fresh(random_vectors(4 * n_init + 16))[:n_init]:
        evaluate(z)
    if not points:
        raise ValueError("feasible rejected every initial and random vector")
    for _ in runtime.progress(range(n_iter), desc="Bayesian optimization"):
        z_evaluated, y = torch.stack(points), torch.tensor(values, dtype=torch.float64)  # [n, d], [n]
        parents = z_evaluated[y.argsort(descending=True, stable=True)[:3]]  # [<=3, d]
        flips = parents[:, None, :] ^ torch.eye(n_bits, dtype=torch.bool)  # [<=3, d, d]: one bit flipped each
        candidates = fresh(torch.cat([flips.reshape(-1, n_bits), random_vectors(n_random)]))  # [m, d]
        if len(candidates) == 0:
            break  # the neighbourhood is exhausted and random draws found nothing new
        mean, std = gp_posterior(z_evaluated, y, candidates)
        evaluate(candidates[int(expected_improvement(mean, std, float(y.max())).argmax())])
    return BayesOptResult(torch.stack(points), torch.tensor(values, dtype=torch.float64))


# --- the layer selection ---------------------------------------------------------------------------


@dataclass
class SkipSelection:
    """The chosen sublayers, their ``alpha``, ``cost_ratio`` and predicted ``speedup`` (the objective),
    and the ``search`` (every evaluated ``z`` and its speed-up)."""

    skip_attention: tuple[int, ...]
    skip_mlp: tuple[int, ...]
    speedup: float
    alpha: float
    cost_ratio: float
    search: BayesOptResult


def select_skipped_layers(model: nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int, gamma: int,
                          n_iter: int, n_init: int = 8, seed: int = 0, verify_ratio: float = 1.0,
                          min_cost_ratio: float = 0.0, max_cost_ratio: float = 1.0) -> SkipSelection:
    """Draft & Verify's layer selection (module docstring): Bayesian optimization of the predicted
    speed-up :math:`S(z)` at ``gamma`` proposals, with :math:`\\alpha(z)` teacher-forced on the target's
    greedy continuations of ``prompts`` (``max_new_tokens`` each) and ``verify_ratio`` :math:`r`.
    Only drafts whose cost ratio lies in ``[min_cost_ratio, max_cost_ratio]`` are considered (a narrow
    band compares acceptance at a fixed cost: where no draft is accepted often, :math:`S` is highest
    for the cheapest one); the search starts from
    skipping nothing (:math:`S = 1` when :math:`r = 1`) if that is allowed. ``model`` is only read."""
    check_positive_int("gamma", gamma)
    check_positive_number("verify_ratio", verify_ratio)
    check_fraction("min_cost_ratio", min_cost_ratio)
    check_fraction("max_cost_ratio", max_cost_ratio)
    if min_cost_ratio > max_cost_ratio:
        raise ValueError(f"min_cost_ratio ({min_cost_ratio}) must not exceed max_cost_ratio ({max_cost_ratio})")
    check_non_negative_int("n_iter", n_iter)
    check_non_negative_int("n_init", n_init)
    check_non_negative_int("seed", seed)
    calibration = calibration_set(model, prompts, max_new_tokens)  # checks model, prompts, max_new_tokens
    n_layers = model.config.num_hidden_layers
    found: dict[tuple[bool, ...], tuple[float, float]] = {}  # z -> (alpha, c)

    head, sizes = sublayer_sizes(model)  # [2L], in the order of z

    def cost(z: torch.Tensor) -> float:  # c(z), as cost_ratio computes it
        return float((head + sizes[~z].sum()) / (head + sizes.sum()))

    def feasible(z: torch.Tensor) -> bool:  # an attention sublayer runs, and the draft is cheap enough
        return not bool(z[:n_layers].all()) and min_cost_ratio <= cost(z) <= max_cost_ratio

    def predicted_speedup(z: torch.Tensor) -> float:  # S(z)
        alpha, c = greedy_acceptance(LayerSkipDecoder(model, *skip_sets(z)), calibration), cost(z)
        found[tuple(z.tolist())] = alpha, c
        return expected_speedup(alpha, gamma, cost_ratio=c, verify_ratio=verify_ratio)

    nothing = torch.zeros(2 * n_layers, dtype=torch.bool)
    search = bayesian_optimization(predicted_speedup, 2 * n_layers, n_iter, n_init, seed, feasible,
                                   initial=[nothing] if feasible(nothing) else [])
    alpha, c = found[tuple(search.best.tolist())]
    return SkipSelection(*skip_sets(search.best), search.value, alpha, c, search)
