"""Packed low-bit storage: the representation behind every memory figure in the book.

Simulated ("fake") quantization keeps float32 tensors and shows what rounding does to quality; it
saves no memory. :class:`QuantizedLinear` stores what a deployed model stores — the integer codes of
its weight, packed densely into bytes (two 4-bit codes per byte, four 2-bit codes, eight 3-bit codes
in three bytes), plus one float16 scale (and zero-point) per channel or group — and dequantizes in
``forward``. :func:`refimpl.evaluate.model_bytes` measures its buffers, so the bytes of a quantized
model are counted from what it really holds.

:class:`CodeBookLinear` does the same for the 4-bit code-book formats (NF4, FP4) of
:mod:`refimpl.quantization.formats`, with QLoRA's double quantization of the block scales.

The module swap follows gpt-fast: primitives (:func:`pack_codes`, :func:`unpack_codes`), a module
built from an ``nn.Linear`` (:meth:`QuantizedLinear.from_linear`), and a swap over a model
(:func:`pack_model` and :func:`pack_model_code_book`, through :func:`refimpl.anatomy.swap_linears`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refimpl import anatomy
from refimpl._rollback import restores_on_error
from refimpl._validation import check_linear_input
from refimpl.quantization import formats, uniform


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (each ``< 2**bits``) into a dense little-endian bit stream.

    Returns:
        ``UInt8Tensor[ceil(codes.numel() * bits / 8)]``.
    """
    uniform.check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point():
        raise TypeError("codes must be an integer tensor")
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for {bits} bits")
    if 8 % bits == 0:  # 2, 4, 8 bits: whole codes per byte, the first in the lowest bits
        per_byte = 8 // bits
        shifts = bits * torch.arange(per_byte, dtype=torch.int32, device=flat.device)
        padded = F.pad(flat, (0, (-flat.numel()) % per_byte)).view(-1, per_byte)  # [n_bytes, per_byte]
        return (padded << shifts).sum(dim=1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # [n * bits] bits, lowest first
    stream = F.pad(stream, (0, (-stream.numel()) % 8))  # [8 * n_bytes]
    weights = 2 ** torch.arange(8, dtype=torch.int32, device=flat.device)
    return (stream.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)  # [n_bytes]


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes of the stream, as ``int32[n]``."""
    uniform.check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a uint8 tensor from pack_codes()")
    if not isinstance(n, int) or n < 0 or n * bits > packed.numel() * 8:
        raise ValueError(f"n must be an int in [0, {packed.numel() * 8 // bits}], got {n!r}")
    arange = lambda k: torch.arange(k, dtype=torch.int32, device=packed.device)  # noqa: E731
    if 8 % bits == 0:
        per_byte = 8 // bits
        codes = (packed.to(torch.int32)[:, None] >> (bits * arange(per_byte))) & (2**bits - 1)  # [n_bytes, per_byte]
        return codes.reshape(-1)[:n]
    stream = (packed.to(torch.int32)[:, None] >> arange(8)) & 1  # [n_bytes, 8] bits, lowest first
    codes = stream.reshape(-1)[: n * bits].view(n, bits)  # [n, bits]
    return (codes * 2 ** arange(bits)).sum(dim=1)


class QuantizedLinear(torch.nn.Module):
    r"""A linear layer holding packed weight codes on a ``grid`` (``grid.bits`` bits each, stored as
    ``code - grid.qmin``: a symmetric grid on its narrow or full range, or an asymmetric one) and float16
    scales (and zero-points, asymmetric only); ``forward`` dequantizes the weight and runs an ordinary
    matrix product.

    An optional float16 ``input_scale`` :math:`s` (one per input feature) stores a weight quantized as
    :math:`Q(W\,\mathrm{diag}(s))`, as AWQ produces it: ``forward`` computes
    :math:`Q(W\,\mathrm{diag}(s))\,(x / s)`. (A deployed model folds :math:`1/s` into the operation
    that produces :math:`x`; storing it costs two bytes per input feature.)"""

    def __init__(self, in_features: int, out_features: int, grid: uniform.Grid, bias: bool,
                 input_scale: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.grid = in_features, out_features, grid
        if grid.granularity == "tensor":
            n_scales = 1
        elif grid.granularity == "channel":
            n_scales = out_features
        else:
            n_scales = out_features * (in_features // grid.group_size)
        n_bytes = -(-in_features * out_features * grid.bits // 8)
        self.register_buffer("packed", torch.zeros(n_bytes, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(n_scales, dtype=uniform.WEIGHT_SCALE_DTYPE))
        # Symmetric codes need no zero-point: none is stored.
        self.register_buffer("zero_point", None if grid.symmetric else torch.zeros(n_scales, dtype=torch.uint8))
        self.register_buffer("input_scale", torch.ones(in_features, dtype=uniform.WEIGHT_SCALE_DTYPE)
                             if input_scale else None)
        self.register_buffer("bias", None)
        if bias:
            self.bias = torch.zeros(out_features)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, grid: uniform.Grid, qparams: uniform.QParams | None = None,
                    input_scale: torch.Tensor | None = None, weight: torch.Tensor | None = None
                    ) -> "QuantizedLinear":
        r"""Quantize ``linear``'s weight onto ``grid`` (per tensor, channel or group) into a new packed
        module; ``linear`` is unchanged.

        Without ``qparams`` the weight is rounded to nearest. With ``qparams`` (the scales a method such
        as GPTQ chose on ``grid``) the weight must already lie on them — it holds dequantized values —
        and its codes are read off exactly; a weight off them raises ``ValueError``. With
        ``input_scale`` :math:`s` the weight is taken to be :math:`\hat W\,\mathrm{diag}(s)^{-1}`
        (AWQ's simulated form) and :math:`\hat W` is what is packed. ``weight`` replaces
        ``linear.weight`` as the values to pack (a method's float32 result, when the model computes in
        a lower precision that would move the values off the grid).
        """
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        uniform.check_grid("grid", grid, uniform.WEIGHT_GRANULARITIES)
        if weight is None:
            weight = linear.weight
        if not isinstance(weight, torch.Tensor) or weight.shape != linear.weight.shape:
            raise ValueError(f"weight must be a tensor of shape {tuple(linear.weight.shape)}")
        weight = weight.detach().float()  # [out, in]
        if input_scale is not None:
            if not isinstance(input_scale, torch.Tensor) or input_scale.shape != (linear.in_features,):
                raise ValueError(f"input_scale must be a tensor of shape [{linear.in_features}]")
            input_scale = input_scale.to(uniform.WEIGHT_SCALE_DTYPE)
            if not (torch.isfinite(input_scale) & (input_scale > 0)).all():
                raise ValueError("input_scale must be positive and finite in float16")
            weight = weight * input_scale.float()  # [out, in]: W diag(s)
        given_qparams = qparams is not None
        if qparams is None:
            qparams = uniform.compute_qparams(weight, grid, scale_dtype=uniform.WEIGHT_SCALE_DTYPE)
        else:
            if qparams.grid != grid:
                raise ValueError(f"qparams were made for another grid ({qparams.grid}) than grid ({grid})")
            if not torch.equal(qparams.scale, qparams.scale.to(uniform.WEIGHT_SCALE_DTYPE).float()):
                raise ValueError("qparams.scale must be representable in float16, the dtype stored")
        codes = uniform.quantize(weight, qparams)
        if given_qparams:
            off_grid = (uniform.dequantize(codes, qparams, weight.shape) - weight).abs().reshape(codes.shape)
            if (off_grid > 1e-3 * qparams.scale).any():  # a thousandth of the group's own step
                raise ValueError(f"the weight is not on the grid of qparams (off by up to {off_grid.max():.3g})")
        module = cls(linear.in_features, linear.out_features, grid, bias=linear.bias is not None,
                     input_scale=input_scale is not None).to(weight.device)
        # codes shifted to [0, qmax - qmin], within [0, 2^bits - 1]: [0, 2^bits - 2] on a symmetric grid's
        # narrow range (one code unused), [0, 2^bits - 1] on the full range and on an asymmetric grid
        module.packed.copy_(pack_codes(codes - grid.qmin, grid.bits))
        module.scale.copy_(qparams.scale.reshape(-1))
        if not grid.symmetric:
            module.zero_point.copy_(qparams.zero_point.reshape(-1))
        if input_scale is not None:
            module.input_scale.copy_(input_scale)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def qparams(self) -> uniform.QParams:
        """The stored quantization parameters, in the shape :func:`uniform.dequantize` expects."""
        view = {"tensor": (1, 1), "channel": (self.out_features, 1)}.get(
            self.grid.granularity, (self.out_features, self.in_features // (self.grid.group_size or 1), 1))
        scale = self.scale.float().view(view)
        zero_point = torch.zeros_like(scale) if self.grid.symmetric else self.zero_point.float().view(view)
        return uniform.QParams(scale, zero_point, self.grid)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` this module computes with (float32), input scale included."""
        qparams = self.qparams()
        codes = unpack_codes(self.packed, self.grid.bits, self.in_features * self.out_features) + self.grid.qmin
        grouped_shape = uniform.grouped(torch.empty(self.out_features, self.in_features, device="meta"),
                                        self.grid).shape
        weight = uniform.dequantize(codes.view(grouped_shape), qparams, (self.out_features, self.in_features))
        return weight if self.input_scale is None else weight / self.input_scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input("x", x, self.in_features)
        weight = self.dequantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        grid = self.grid
        size = grid.granularity if grid.granularity != "group" else f"group {grid.group_size}"
        kind = "asymmetric" if not grid.symmetric else "symmetric" if grid.narrow_range else "symmetric full range"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={grid.bits}, "
                f"{kind}, {size}"
                + (", input_scale" if self.input_scale is not None else ""))


class CodeBookLinear(torch.nn.Module):
    """A linear layer holding its weight in a 4-bit code-book format (NF4 or FP4,
    :mod:`refimpl.quantization.formats`): packed 4-bit codes, two per byte, and one absmax per block
    of ``blocksize`` weights — float32, or with ``double_quant`` 8-bit codes of the absmax values plus
    one float32 scale per 256 of them and a float32 offset (QLoRA's double quantization)."""

    def __init__(self, in_features: int, out_features: int, code: torch.Tensor, blocksize: int,
                 double_quant: bool, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.blocksize = in_features, out_features, blocksize
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("code", code.clone())  # float32[16], 64 bytes per layer
        self.register_buffer("packed", torch.zeros(-(-n // 2), dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8))
            self.register_buffer("absmax_scale", torch.zeros(-(-n_blocks // formats.DOUBLE_QUANT_BLOCKSIZE)))
            self.register_buffer("absmax_offset", torch.zeros(()))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks))
        self.register_buffer("bias", None)
        if bias:
            self.bias = torch.zeros(out_features)

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, code: torch.Tensor = formats.NF4_CODE, blocksize: int = 64,
                    double_quant: bool = True) -> "CodeBookLinear":
        """Quantize ``linear``'s weight block-wise onto ``code``; ``linear`` is unchanged."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        codes, absmax = formats.quantize_blockwise(linear.weight, code, blocksize)
        module = cls(linear.in_features, linear.out_features, code, blocksize, double_quant,
                     bias=linear.bias is not None).to(linear.weight.device)
        module.packed.copy_(pack_codes(codes, 4))
        if double_quant:
            absmax_codes, absmax_scale, offset = formats.double_quantize(absmax)
            module.absmax.copy_(absmax_codes)
            module.absmax_scale.copy_(absmax_scale)
            module.absmax_offset.copy_(offset)
        else:
            module.absmax.copy_(absmax)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` this module computes with (float32)."""
        absmax = self.absmax
        if self.double_quant:
            absmax = formats.double_dequantize(self.absmax, self.absmax_scale, self.absmax_offset)
        codes = unpack_codes(self.packed, 4, self.in_features * self.out_features).to(torch.uint8)
        return formats.dequantize_blockwise(codes, absmax, self.code, self.blocksize,
                                            (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input("x", x, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}")


@torch.no_grad()
@restores_on_error("model")
def pack_model(model: torch.nn.Module, grid: uniform.Grid, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Replace every linear layer of ``model`` (except ``skip``) by a round-to-nearest
    :class:`QuantizedLinear` on ``grid``, in place. Every layer is quantized before the first one is swapped, and
    any error leaves the model as it was (a copy of its tensors is held during the call).

    Returns:
        ``model``, modified in place.
    """
    linears = anatomy.compressed_linears(model, skip)
    return anatomy.swap_linears(model, {name: QuantizedLinear.from_linear(m, grid) for name, m in linears.items()})


@torch.no_grad()
def packed_size(model: torch.nn.Module, grid: uniform.Grid, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """The bytes :func:`pack_model` would leave ``model`` with on ``grid``, measured without changing ``model``.

    A packed layer's buffers depend only on its shape (and whether it has a bias), so one layer of
    each distinct shape is packed for real and its :func:`refimpl.evaluate.model_bytes` counted once
    per layer of that shape; the tensors that stay unquantized are counted as they are.
    """
    from refimpl.evaluate import model_bytes

    linears = anatomy.compressed_linears(model, skip)
    by_shape: dict[tuple[int, int, bool], list[torch.nn.Linear]] = {}
    for linear in linears.values():
        by_shape.setdefault((linear.in_features, linear.out_features, linear.bias is not None), []).append(linear)
    quantized = sum(len(group) * model_bytes(QuantizedLinear.from_linear(group[0], grid)) for group in by_shape.values())
    # Storage that disappears with the replaced layers: their tensors, unless another module keeps them
    # (a tied output layer shares its weight with the embedding).
    replaced_ids = {id(m) for m in linears.values()}
    kept = {t.data_ptr() for m in model.modules() if id(m) not in replaced_ids
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}
    gone = {t.data_ptr(): t.numel() * t.element_size() for m in linears.values() for t in (m.weight, m.bias)
            if t is not None and t.data_ptr() not in kept}
    return model_bytes(model) - sum(gone.values()) + quantized


@torch.no_grad()
@restores_on_error("model")
def pack_model_code_book(model: torch.nn.Module, code: torch.Tensor = formats.NF4_CODE, blocksize: int = 64,
                         double_quant: bool = True, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Replace every linear layer of ``model`` (except ``skip``) by a :class:`CodeBookLinear` (NF4 by
    default, with double quantization), in place; any error leaves the model as it was (a copy of its
    tensors is held during the call).

    Returns:
        ``model``, modified in place.
    """
    linears = anatomy.compressed_linears(model, skip)
    return anatomy.swap_linears(model, {name: CodeBookLinear.from_linear(linear, code, blocksize, double_quant)
                                        for name, linear in linears.items()})
