r"""LLM.int8(): vector-wise int8 matrix multiplication with a mixed-precision decomposition.

Int8 weights halve the memory of a 16-bit model, but quantizing the *activations* of a large model to
int8 fails: a few feature dimensions (columns of the hidden states) carry values up to 20x larger than
the rest, and one scale per token row must then stretch over them. LLM.int8() keeps those few
**outlier dimensions** — every column holding a value of magnitude at least :math:`\alpha = 6` — in
floating point and multiplies the other 99.9 % in int8, with one absmax scale per row of
:math:`X` and per column of :math:`W` (Dettmers, Lewis, Belkada, Zettlemoyer 2022, "LLM.int8(): 8-bit
Matrix Multiplication for Transformers at Scale", arXiv:2208.07339, §3).

Absmax quantization (§2.1) maps a vector to codes :math:`\lfloor 127\,x / \lVert x \rVert_\infty \rceil`.
With hidden states :math:`X \in \mathbb{R}^{s \times h}`, weights :math:`W \in \mathbb{R}^{h \times o}`
(``nn.Linear`` stores :math:`W^\top`, ``[out, in]``) and :math:`c_x = 127 / \lVert X_{i,:} \rVert_\infty`,
:math:`c_w = 127 / \lVert W_{:,j} \rVert_\infty`, vector-wise quantization (Eq. 7) denormalizes the
int32 accumulator by an outer product:

.. math:: C_{f16} \approx \frac{1}{c_{x} \otimes c_{w}}\, C_{i32} = S \cdot X_{i8} W_{i8}
          = \frac{\lVert X_{i,:}\rVert_\infty \lVert W_{:,j}\rVert_\infty}{127^2}\, C_{i32}.

The mixed-precision decomposition (Eq. 8) splits the feature dimensions by the outlier set :math:`O`
(:math:`X^h` is column :math:`h` of :math:`X`, :math:`W^h` row :math:`h` of :math:`W`):

.. math:: C_{f16} \approx \sum_{h \in O} X^h_{f16} W^h_{f16} + S_{f16} \cdot \sum_{h \notin O} X^h_{i8} W^h_{i8}.

Here "f16" is the input's precision (float32 in the book), and the row scales of :math:`X_{i8}` are
absmax values over the non-outlier columns, as Eq. 8 reads. bitsandbytes rounds :math:`X` and
:math:`W` to float16 before quantizing, and its row absmax still counts the values below the threshold
in outlier columns (so its scales are coarser for tokens where an outlier column is not extreme).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refimpl import anatomy, calibration
from refimpl._rollback import restores_on_error
from refimpl._validation import all_finite, check_linear_input
from refimpl.quantization import uniform

OUTLIER_THRESHOLD = 6.0  # alpha, §3.2
_EXACT_CHUNK = 2**24 // 128**2  # int8 products summed exactly in float32 (int8_matmul)


def check_threshold(threshold: float) -> None:
    """``threshold`` (alpha) must be a finite number >= 0; 0 disables the decomposition."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0 \
            or math.isinf(threshold):
        raise ValueError(f"threshold must be a finite number >= 0 (0 disables the decomposition), got {threshold!r}")


# --- primitives ---------------------------------------------------------------------------------


def vectorwise_quantize(t: torch.Tensor, per: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit absmax codes of every row of ``t`` (``per="token"`` for activations ``[..., in]``,
    ``"channel"`` for a weight ``[out, in]``), with the shared quantizer of :mod:`uniform`.

    Returns:
        ``(codes int8[rows, last], scale float32[rows, 1])`` with ``scale = absmax / 127``, i.e. ``1 / c``.
    """
    # float32 scales, the dtype of bitsandbytes' SCB
    qparams = uniform.compute_qparams(t, uniform.Grid(8, per=per), scale_dtype=torch.float32)
    return uniform.quantize(t, qparams).to(torch.int8), qparams.scale


def int8_matmul(x_codes: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    """The int32 accumulator :math:`C_{i32} = X_{i8} W_{i8}`: ``int32[rows, out]`` from int8 codes
    ``x_codes [rows, in]`` and ``w_codes [out, in]``.

    Computed exactly with float32 matrix products over chunks of 1,024 input features: each product
    of two int8 codes has magnitude at most :math:`128^2 = 2^{14}`, so every partial sum of a chunk is
    an integer of magnitude at most :math:`2^{24}`, which float32 represents exactly — no rounding
    happens in any summation order. The chunks' int32 results are then added as integers. (An int8
    GEMM with int32 accumulation gives the same numbers; PyTorch's CPU one is far slower.)
    """
    if x_codes.dtype != torch.int8 or w_codes.dtype != torch.int8:
        raise TypeError(f"x_codes and w_codes must be int8, got {x_codes.dtype} and {w_codes.dtype}")
    if x_codes.dim() != 2 or w_codes.dim() != 2 or x_codes.shape[1] != w_codes.shape[1]:
        raise ValueError(f"x_codes [rows, in] and w_codes [out, in] must share in, got "
                         f"{tuple(x_codes.shape)} and {tuple(w_codes.shape)}")
    accumulator = torch.zeros(x_codes.shape[0], w_codes.shape[0], dtype=torch.int32, device=x_codes.device)
    for k in range(0, x_codes.shape[1], _EXACT_CHUNK):  # [rows, chunk] x [chunk, out], exact in float32
        chunk = slice(k, k + _EXACT_CHUNK)
        accumulator += (x_codes[:, chunk].float() @ w_codes[:, chunk].float().T).to(torch.int32)
    return accumulator


def outlier_dims(x: torch.Tensor, threshold: float = OUTLIER_THRESHOLD) -> torch.Tensor:
    """The outlier set :math:`O`: indices (sorted ``int64[|O|]``) of the feature dimensions (last
    dimension of ``x [..., in]``) holding at least one value with ``|x| >= threshold`` — the rule of
    bitsandbytes' ``int8_vectorwise_quant``. ``threshold = 0`` gives the empty set."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise TypeError("x must be a floating-point tensor [..., in_features]")
    check_threshold(threshold)
    if threshold == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    hits = (x.detach().reshape(-1, x.shape[-1]).abs() >= threshold).any(dim=0)  # [in]
    return hits.nonzero().view(-1)


# --- the layer ----------------------------------------------------------------------------------


class Int8Linear(torch.nn.Module):
    """A linear layer holding int8 weight codes ``[out, in]`` and one float32 scale per output
    channel (bitsandbytes' ``CB`` and ``SCB / 127``); ``forward`` runs the decomposition of Eq. 8.

    Like bitsandbytes' inference mode (``Linear8bitLt(has_fp16_weights=False)``) the layer keeps only
    the int8 weight, so the weight columns of the outlier dimensions are *dequantized* int8 values
    (the paper multiplies them with the original fp16 weights). The activations in those dimensions
    stay exact. ``threshold = 0`` disables the decomposition: every column goes through int8.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 threshold: float = OUTLIER_THRESHOLD):
        super().__init__()
        check_threshold(threshold)
        self.in_features, self.out_features, self.threshold = in_features, out_features, float(threshold)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, threshold: float = OUTLIER_THRESHOLD) -> "Int8Linear":
        """Quantize ``linear``'s weight per output channel into a new layer; ``linear`` is unchanged."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if not all_finite(linear.weight):
            raise ValueError("linear.weight holds NaN or Inf values; quantization needs finite weights")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold)
        module = module.to(linear.weight.device)
        codes, scale = vectorwise_quantize(linear.weight, "channel")  # [out, in], [out, 1]
        module.weight_codes.copy_(codes)
        module.weight_scale.copy_(scale.view(-1))
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """``float32[out, in]``: the codes times their channel scales."""
        return self.weight_codes.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input("x", x, self.in_features)
        rows = x.reshape(-1, self.in_features).float()  # [tokens, in]
        if rows.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        outliers = outlier_dims(rows, self.threshold)  # O
        regular = rows.index_fill(1, outliers, 0.0)  # X^h for h not in O (outlier columns zeroed)
        x_codes, x_scale = vectorwise_quantize(regular, "token")  # int8 [tokens, in], [tokens, 1]
        # S . sum_{h not in O} X_i8^h W_i8^h  (Eq. 7/8): S = outer product of the row and column scales
        out = int8_matmul(x_codes, self.weight_codes).float() * (x_scale * self.weight_scale[None, :])
        if outliers.numel():  # + sum_{h in O} X^h W^h, with the dequantized weight columns
            w_outlier = self.weight_codes[:, outliers].float() * self.weight_scale[:, None]  # [out, |O|]
            out = out + F.linear(rows[:, outliers], w_outlier)  # [tokens, |O|] x [out, |O|]^T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)  # [..., out]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")


# --- a whole model ------------------------------------------------------------------------------


@torch.no_grad()
@restores_on_error("model")
def quantize_model_int8(model: torch.nn.Module, threshold: float = OUTLIER_THRESHOLD,
                        skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Replace every linear layer of ``model`` (except ``skip``) by an :class:`Int8Linear`, in place.
    Every layer is quantized before the first one is swapped, and any error leaves the model as it was
    (a copy of its tensors is held during the call).

    Returns:
        ``model``, modified in place.
    """
    check_threshold(threshold)
    linears = anatomy.compressed_linears(model, skip)
    replacements = {}
    for name, linear in linears.items():
        try:
            replacements[name] = Int8Linear.from_linear(linear, threshold)
        except ValueError as exc:
            raise ValueError(f"layer {name}: {exc}") from None
    return anatomy.swap_linears(model, replacements)


@dataclass(frozen=True)
class OutlierStats:
    """One linear layer's inputs on the calibration tokens, against the threshold. (§4.1 of the paper
    calls a dimension an outlier *feature* when it exceeds 6 in at least 25 % of the layers and 6 % of
    the tokens; ``token_fraction`` is that token share, layer by layer.)"""

    name: str  # full module name, e.g. "model.layers.3.mlp.down_proj"
    in_features: int
    n_tokens: int
    dims: tuple[int, ...]  # the outlier set O
    token_fraction: float  # share of tokens (rows) holding at least one |x| >= threshold
    max_abs: float  # the largest input magnitude seen

    @property
    def n_dims(self) -> int:
        return len(self.dims)


def outlier_statistics(model: torch.nn.Module, blocks: torch.Tensor,
                       threshold: float = OUTLIER_THRESHOLD) -> list[OutlierStats]:
    """For every linear layer in the decoder blocks, the outlier dimensions of its inputs on
    ``blocks`` (``LongTensor[n_blocks, seq_len]``), in model order. The model is not modified."""
    check_threshold(threshold)
    names = {id(m): n for n, m in model.named_modules()}
    stats = []
    for capture in calibration.layerwise(model, blocks, modifies=False):
        for name, linear in capture.linears.items():
            x = capture.inputs[name]  # [n_tokens, in_features]
            dims = outlier_dims(x, threshold)
            rows_hit = (x.abs() >= threshold).any(dim=1) & (threshold > 0)  # [n_tokens]
            stats.append(OutlierStats(names[id(linear)], x.shape[1], x.shape[0], tuple(dims.tolist()),
                                      rows_hit.float().mean().item(), x.abs().max().item()))
    return stats
