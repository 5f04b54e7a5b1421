r"""Quantization-aware training (QAT): train the model *through* its quantizer.

Post-training quantization rounds a trained model once. QAT keeps a full-precision **latent** weight
:math:`W` and computes every forward pass with its quantized value :math:`\hat W = Q(W)`, so that the
loss sees the rounding and training moves :math:`W` to where rounding hurts least. Rounding has zero
gradient almost everywhere; the **straight-through estimator** (STE; Bengio, Léonard, Courville 2013,
arXiv:1308.3432) passes the gradient of :math:`\hat W` to :math:`W` as if :math:`Q` were the identity:

.. math:: \frac{\partial L}{\partial W} := \frac{\partial L}{\partial \hat W}.

The grid is :mod:`refimpl.quantization.uniform`'s. By default its scales follow the latent weights
(recomputed from their range at every step, like RTN's); with ``learnable_scale=True`` they are
parameters trained by gradient descent as in **LSQ** (Esser et al. 2020, "Learned Step Size
Quantization", arXiv:1902.08153, Eq. 1-3): with step size :math:`s`,

.. math:: \hat w = \big(\mathrm{clamp}(\lfloor w/s \rceil + z,\, q_\text{min},\, q_\text{max}) - z\big)\, s,

the rounding passed straight through, so that :math:`\partial \hat w / \partial s = -w/s + \lfloor w/s \rceil`
inside the range and :math:`q_\text{min} - z` or :math:`q_\text{max} - z` outside it, and the gradient
of :math:`s` scaled by :math:`g = 1/\sqrt{N q_\text{max}}` (the paper's :math:`N` is the weights of the
layer; here, with one scale per group or channel, the weights sharing the scale). LSQ trained with SGD;
Adam normalises each parameter's update, which cancels a constant gradient scale except through its
:math:`\epsilon`. Here the step sizes start from the RTN grid (so step 0 computes exactly what RTN does)
and zero-points stay fixed.
Inputs can be fake-quantized too (``a_bits``, per token, dynamic), and so can the KV cache.

**LLM-QAT's KV cache** (§2.3): the keys and values a layer caches are rounded in every training
forward pass, so that the model learns to attend to a quantized cache. With ``kv_bits`` (or
:func:`quantize_kv_projections` on any model) the outputs of ``k_proj`` and ``v_proj`` are
fake-quantized per token, symmetric MinMax with a dynamic range, the rounding passed straight through:

.. math:: \hat K_{t,:} = Q_b(X_t W_K^\top),\quad \hat V_{t,:} = Q_b(X_t W_V^\top),\quad
          \frac{\partial L}{\partial K} := \frac{\partial L}{\partial \hat K},

one scale per token over all key-value heads of the layer, as in the authors' released code (which
rounds ``k_proj``'s and ``v_proj``'s outputs the same way). Keys are therefore quantized *before* the
rotary embedding: a cache that stores them must apply RoPE when it reads them (as KVQuant's pre-RoPE
keys do), while a plain cache of rotated keys (:mod:`refimpl.quantization.kv_cache`, quantized after
RoPE, keys per channel as KIVI does) holds other values. The post-training quantizer of
:func:`refimpl.quantization.kv_cache.kv_quantization` passes gradients straight through as well, so
training inside it is QAT of that scheme instead.

:func:`prepare_qat` swaps :class:`FakeQuantLinear` in for the linear layers, :func:`convert_qat`
swaps the trained result back to plain (or packed) layers. **LLM-QAT** (Liu et al. 2023, "LLM-QAT:
Data-Free Quantization Aware Training for Large Language Models", arXiv:2305.17888) trains without
the original data: the float model writes its own training text (:func:`self_generated_blocks`), and
the quantized student is distilled from the float model's logits
(:func:`refimpl.distillation.losses.forward_kl`) with the training loop of :mod:`refimpl.training`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refimpl import anatomy, training
from refimpl._rollback import restores_on_error
from refimpl._validation import all_finite, check_linear_input, check_logits, check_non_negative_int, check_positive_int
from refimpl.distillation.losses import forward_kl
from refimpl.quantization import packed, uniform
from refimpl.quantization.activation import ActivationQuantizedLinear, straight_through

GRANULARITIES = ("channel", "group")
#: The projections whose outputs a layer caches, by name within a decoder layer (Llama-style models).
KV_PROJECTIONS = ("self_attn.k_proj", "self_attn.v_proj")

#: The book's budget for QAT by distillation (chapter 04 and the effects table's ``llm-qat-w3g64`` row):
#: 7 AdamW steps at a learning rate of 3e-4 after one warm-up step, on batches of 2 sequences of 128 tokens.
DISTILLATION = training.TrainConfig(steps=7, lr=3e-4, warmup_steps=1)
DISTILLATION_SEQ_LEN = 128


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor`` backward (LSQ's gradient scale)."""
    return (x - x * factor).detach() + x * factor


class FakeQuantLinear(nn.Module):
    """A linear layer that trains a latent float weight and computes with its quantized value.

    ``weight`` is the latent :math:`W` (a trainable copy of the original layer's weight); ``forward``
    uses :math:`Q(W)` on ``grid`` (per channel or group) with the straight-through estimator, and with
    ``a_bits`` also rounds its input per token (symmetric, dynamic). ``learnable_scale`` makes the step
    sizes parameters (LSQ, initialised from RTN's grid).
    """

    def __init__(self, linear: nn.Linear, grid: uniform.Grid, learnable_scale: bool = False,
                 a_bits: int | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        uniform.check_grid("grid", grid, GRANULARITIES)
        if grid.group_size is not None and linear.in_features % grid.group_size:
            raise ValueError(f"group_size {grid.group_size} must divide in_features ({linear.in_features})")
        if a_bits is not None:
            uniform.check_bits(a_bits)
        if not isinstance(learnable_scale, bool):
            raise TypeError(f"learnable_scale must be a bool, got {type(learnable_scale).__name__}")
        if not all_finite(linear.weight):
            raise ValueError("linear.weight holds NaN or Inf values; quantization needs finite weights")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.grid, self.a_bits = grid, a_bits
        self.weight = nn.Parameter(linear.weight.detach().float().clone())  # the latent W, [out, in]
        self.dtype = linear.weight.dtype  # what convert_qat gives back
        self.bias = linear.bias
        self.scale: nn.Parameter | None = None
        if learnable_scale:
            qparams = self._dynamic_qparams()
            self.scale = nn.Parameter(qparams.scale.clone())  # [out, 1] or [out, n_groups, 1]
            self.register_buffer("zero_point", qparams.zero_point.clone())

    def _dynamic_qparams(self) -> uniform.QParams:
        return uniform.compute_qparams(self.weight.detach(), self.grid, uniform.WEIGHT_SCALE_DTYPE)

    def _stored_scale(self) -> torch.Tensor:
        """The learned step sizes as a packed layer stores them (float16, at least its smallest
        subnormal), with the rounding passed straight through so that training computes exactly what
        the converted layer computes."""
        tiny = torch.nextafter(torch.zeros((), dtype=uniform.WEIGHT_SCALE_DTYPE),
                               torch.ones((), dtype=uniform.WEIGHT_SCALE_DTYPE)).item()
        scale = self.scale.clamp_min(tiny)
        return scale + (scale.to(uniform.WEIGHT_SCALE_DTYPE).float().clamp_min(tiny) - scale).detach()

    def qparams(self) -> uniform.QParams:
        """The grid :math:`Q` uses now: the learned step sizes, or the grid of the current latent
        weight's range."""
        if self.scale is None:
            return self._dynamic_qparams()
        return uniform.QParams(self._stored_scale().detach(), self.zero_point, self.grid)

    def quantized_weight(self) -> torch.Tensor:
        """:math:`Q(W)` ``[out, in]``, differentiable with respect to ``weight`` (and ``scale``)."""
        if self.scale is None:
            qp = self._dynamic_qparams()
            w_hat = uniform.dequantize(uniform.quantize(self.weight, qp), qp, self.weight.shape)
            return straight_through(self.weight, w_hat)
        qmin, qmax = self.grid.qmin, self.grid.qmax
        grouped = uniform.grouped(self.weight, self.grid)  # [out, (n_groups,) g]
        step = _scale_gradient(self._stored_scale(), 1 / math.sqrt(grouped.shape[-1] * qmax))
        codes = torch.clamp(_round_ste(grouped / step) + self.zero_point, qmin, qmax)
        return ((codes - self.zero_point) * step).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input("x", x, self.in_features)
        if self.a_bits is not None:
            x = straight_through(x, uniform.fake_quantize(x.detach(), uniform.Grid(self.a_bits, per="token")))
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        g = self.grid
        grid = f"int{g.bits} per {g.granularity}" + (f" of {g.group_size}" if g.group_size else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={grid}, "
                f"learnable_scale={self.scale is not None}, a_bits={self.a_bits}")


def kv_grid(bits: int) -> uniform.Grid:
    """LLM-QAT's grid of the KV cache: ``bits`` bits, symmetric, one scale per token (dynamic)."""
    return uniform.Grid(bits, symmetric=True, per="token")


class QuantizedKVProjection(nn.Module):
    """``projection`` (``k_proj`` or ``v_proj``: any module, float, fake-quantized or packed) whose output,
    the keys or values of every token ``[..., kv_heads * head_dim]``, is fake-quantized on
    :func:`kv_grid` with the straight-through estimator (module docstring)."""

    def __init__(self, projection: nn.Module, bits: int):
        super().__init__()
        if not isinstance(projection, nn.Module) or not isinstance(getattr(projection, "in_features", None), int):
            raise TypeError(f"projection must be a linear layer (a module with in_features), got {type(projection).__name__}")
        uniform.check_bits(bits)
        self.projection, self.bits, self.in_features = projection, bits, projection.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input("x", x, self.in_features)
        kv = self.projection(x)  # [batch, seq, kv_heads * head_dim]
        return straight_through(kv, uniform.fake_quantize(kv.detach(), kv_grid(self.bits)))

    def extra_repr(self) -> str:
        return f"kv=int{self.bits} per token, symmetric"


def _kv_projections(model: nn.Module, kv_bits: int | None) -> dict[str, nn.Module]:
    """``k_proj`` and ``v_proj`` of every decoder layer by full name, after checking ``kv_bits``; raises
    ``ValueError`` naming ``kv_bits`` when bits are outside [2, 8] or a layer lacks a projection or
    already quantizes its output."""
    if not isinstance(kv_bits, int) or isinstance(kv_bits, bool) or not uniform.MIN_BITS <= kv_bits <= uniform.MAX_BITS:
        raise ValueError(f"kv_bits must be an int in [{uniform.MIN_BITS}, {uniform.MAX_BITS}], got {kv_bits!r}")
    projections = {}
    for index, layer in enumerate(anatomy.decoder_layers(model)):
        modules = dict(layer.named_modules())
        for name in KV_PROJECTIONS:
            projection = modules.get(name)
            if projection is None or isinstance(projection, QuantizedKVProjection):
                state = "has no" if projection is None else "already quantizes the output of"
                raise ValueError(f"kv_bits: decoder layer {index} {state} {name} "
                                 f"(the projections of the KV cache: {KV_PROJECTIONS})")
            projections[anatomy.layer_name(index, name)] = projection
    return projections


@restores_on_error("model")
def quantize_kv_projections(model: nn.Module, kv_bits: int) -> nn.Module:
    """Wrap ``k_proj`` and ``v_proj`` of every decoder layer of ``model`` in a :class:`QuantizedKVProjection`,
    in place: LLM-QAT's quantized KV cache, trainable (what :func:`prepare_qat` does with ``kv_bits``)
    or applied to a trained model. Raises ``ValueError`` naming ``kv_bits`` for bits outside [2, 8] and
    for a model whose layers lack the projections or already quantize them, before changing anything.

    Returns:
        ``model``.
    """
    projections = _kv_projections(model, kv_bits)
    return anatomy.swap_linears(model, {name: QuantizedKVProjection(p, kv_bits) for name, p in projections.items()})


@restores_on_error("model")
def prepare_qat(model: nn.Module, grid: uniform.Grid, learnable_scale: bool = False, a_bits: int | None = None,
                skip: tuple[str, ...] = ("lm_head",), kv_bits: int | None = None) -> nn.Module:
    """Replace every linear layer of ``model`` (except ``skip``) by a :class:`FakeQuantLinear` on ``grid``
    (per channel or group), in place; with ``kv_bits``, also round the keys and values the attention
    caches (:func:`quantize_kv_projections`, LLM-QAT §2.3). All replacements are built before the first
    is swapped in, and any error leaves the model as it was (a copy of its tensors is held during the
    call). The other parameters (embeddings, norms) keep their ``requires_grad``; freeze them to train
    only the quantized layers. :func:`convert_qat` keeps the KV quantization.

    Returns:
        ``model``.
    """
    if kv_bits is not None:
        _kv_projections(model, kv_bits)  # checked before anything changes
    linears = anatomy.compressed_linears(model, skip)
    replacements = {}
    for name, linear in linears.items():
        try:
            replacements[name] = FakeQuantLinear(linear, grid, learnable_scale, a_bits)
        except ValueError as exc:
            raise ValueError(f"layer {name}: {exc}") from None
    anatomy.swap_linears(model, replacements)
    return model if kv_bits is None else quantize_kv_projections(model, kv_bits)


@torch.no_grad()
@restores_on_error("model")
def convert_qat(model: nn.Module, pack: bool = False) -> nn.Module:
    """Replace every :class:`FakeQuantLinear` by what it computes, in place: an ``nn.Linear`` holding
    :math:`Q(W)` (wrapped in an input-quantizing
    :class:`~refimpl.quantization.activation.ActivationQuantizedLinear` when it had ``a_bits``), or with
    ``pack=True`` a :class:`~refimpl.quantization.packed.QuantizedLinear` storing the codes.

    Returns:
        ``model``. An error leaves it as it was (a copy of its tensors is held during the call).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    if not layers:
        raise ValueError("model has no FakeQuantLinear layer (prepare_qat first)")
    if pack and any(m.a_bits is not None for m in layers.values()):
        raise ValueError("pack=True stores weights only; layers trained with a_bits quantize their inputs too")
    replacements = {}
    for name, m in layers.items():
        qparams = m.qparams()
        linear = anatomy.linear_from_weight(uniform.dequantize(uniform.quantize(m.weight, qparams), qparams,
                                                               m.weight.shape), m.bias, m.dtype)
        if pack:
            replacements[name] = packed.QuantizedLinear.from_linear(linear, m.grid, qparams=qparams)
        elif m.a_bits is not None:
            replacements[name] = ActivationQuantizedLinear(linear, weight_grid=None,
                                                           act_grid=uniform.Grid(m.a_bits, per="token"))
        else:
            replacements[name] = linear
    return anatomy.swap_linears(model, replacements)


@torch.no_grad()
def self_generated_blocks(model: nn.Module, n_blocks: int, seq_len: int, greedy_tokens: int = 4, seed: int = 0,
                          batch_size: int = 32) -> torch.Tensor:
    """LLM-QAT's data-free training text (§2.1): each sequence starts from a token drawn uniformly from
    the vocabulary; the model then picks its top-1 token for the next ``greedy_tokens`` positions and
    samples the rest from its own next-token distribution. Seeded; uses the KV cache. Sequences are
    generated ``batch_size`` at a time: a decoding step reads all weights whatever the batch, so large
    batches are nearly free on a CPU.

    Returns:
        ``LongTensor[n_blocks, seq_len]`` of token ids, on the model's device.
    """
    check_positive_int("n_blocks", n_blocks)
    check_positive_int("seq_len", seq_len)
    check_non_negative_int("greedy_tokens", greedy_tokens)
    check_non_negative_int("seed", seed)
    check_positive_int("batch_size", batch_size)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    blocks = []
    try:
        for start in range(0, n_blocks, batch_size):
            n = min(batch_size, n_blocks - start)
            tokens = torch.randint(0, vocab, (n, 1), generator=generator)  # [n, 1], the random first token
            cache, step_input = None, tokens
            for position in range(1, seq_len):
                out = model(step_input.to(device), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[:, -1].float().cpu()  # [n, vocab]
                check_logits("the logits of model", logits)  # greedy decoding would pick a NaN
                if position <= greedy_tokens:
                    next_token = logits.argmax(dim=-1, keepdim=True)
                else:
                    next_token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
                tokens = torch.cat([tokens, next_token], dim=1)
                step_input = next_token
            blocks.append(tokens)
    finally:
        model.train(was_training)
    return torch.cat(blocks).to(device)


def interleaved_batches(blocks: torch.Tensor, n_batches: int) -> list[torch.Tensor]:
    """``blocks [N, L]`` dealt into ``n_batches`` batches, block ``i`` into batch ``i % n_batches``: with the
    blocks of several corpora concatenated, every batch holds some of each.

    Returns:
        a list of ``n_batches`` tensors ``[N / n_batches, L]``.
    """
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2:
        raise ValueError(f"blocks must be a 2-d tensor [N, L] of token ids, got {getattr(blocks, 'shape', blocks)!r}")
    check_positive_int("n_batches", n_batches)
    if blocks.shape[0] % n_batches:
        raise ValueError(f"n_batches ({n_batches}) must divide the number of blocks ({blocks.shape[0]})")
    return [blocks[i::n_batches] for i in range(n_batches)]


def distill_from_float(model: nn.Module, teacher: nn.Module, batches: list[torch.Tensor],
                       config: training.TrainConfig = DISTILLATION, desc: str = "QAT") -> training.TrainLog:
    r"""LLM-QAT's objective (§2.2): train ``model`` (after :func:`prepare_qat`) to reproduce the float
    ``teacher``, by the forward KL divergence from the teacher's next-token distribution to the
    quantized model's at every position, :math:`\mathrm{KL}(p_T \,\|\, p_S)`
    (:func:`refimpl.distillation.losses.forward_kl`), with the training loop of :mod:`refimpl.training`.
    Trains every parameter of ``model`` that requires a gradient, in place; the teacher runs in eval
    mode without gradients.

    Args:
        batches: token ids ``[B, L]``, step ``t`` uses ``batches[t % len(batches)]``
            (:func:`interleaved_batches`, :func:`self_generated_blocks`).

    Returns:
        the :class:`~refimpl.training.TrainLog`. An error leaves ``model`` as it was.
    """
    if not any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("model has no FakeQuantLinear layer (prepare_qat first)")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    device = next(model.parameters()).device

    def loss(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device)
        with torch.no_grad():
            teacher_logits = teacher(batch).logits  # [B, L, vocab]
        return forward_kl(student(batch).logits, teacher_logits)

    was_training = teacher.training
    teacher.eval()
    try:
        return training.train(model, batches, loss, config, desc=desc)
    finally:
        teacher.train(was_training)
