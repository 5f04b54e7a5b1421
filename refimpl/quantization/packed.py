"""Packed low-bit storage: the representation behind every memory figure in the book.

Simulated ("fake") quantization keeps float32 tensors and shows what rounding does to quality; it
saves no memory. :class:`QuantizedLinear` stores what a deployed model stores — the integer codes of
its weight, packed densely into bytes (two 4-bit codes per byte, four 2-bit codes, eight 3-bit codes
in three bytes), plus one float16 scale (and zero-point) per channel or group — and dequantizes in
``forward``. :func:`refimpl.evaluate.model_bytes` measures its buffers, so the bytes of a quantized
model are counted from what it really holds.

The module swap follows gpt-fast: primitives (:func:`pack_codes`, :func:`unpack_codes`), a module
built from an ``nn.Linear`` (:meth:`QuantizedLinear.from_linear`), and a recursive swap over a model
(:func:`pack_model`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refimpl.quantization import uniform


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
    """A linear layer holding packed ``bits``-bit weight codes and float16 scales (and zero-points);
    ``forward`` dequantizes the weight and runs an ordinary matrix product."""

    def __init__(self, in_features: int, out_features: int, bits: int, symmetric: bool,
                 granularity: str, group_size: int | None, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, symmetric
        self.granularity, self.group_size = granularity, group_size
        if granularity == "tensor":
            n_scales = 1
        elif granularity == "channel":
            n_scales = out_features
        else:
            n_scales = out_features * (in_features // group_size)
        n_bytes = -(-in_features * out_features * bits // 8)
        self.register_buffer("packed", torch.zeros(n_bytes, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(n_scales, dtype=torch.float16))
        # Symmetric codes need no zero-point: none is stored.
        self.register_buffer("zero_point", None if symmetric else torch.zeros(n_scales, dtype=torch.uint8))
        self.register_buffer("bias", None)
        if bias:
            self.bias = torch.zeros(out_features)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, bits: int, symmetric: bool = False, granularity: str = "group",
                    group_size: int | None = 64) -> "QuantizedLinear":
        """Quantize ``linear``'s weight (round to nearest) into a new packed module; ``linear`` is unchanged."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        uniform.check_bits(bits)
        if granularity == "token":
            raise ValueError("granularity must be 'tensor', 'channel' or 'group' for weights, got 'token'")
        weight = linear.weight  # [out, in]
        qparams = uniform.compute_qparams(weight, bits, symmetric, granularity, group_size, scale_dtype=torch.float16)
        codes = uniform.quantize(weight, qparams) - qparams.qmin  # shifted to [0, 2^bits - 1]
        module = cls(linear.in_features, linear.out_features, bits, symmetric, granularity, group_size,
                     bias=linear.bias is not None).to(weight.device)
        module.packed.copy_(pack_codes(codes, bits))
        module.scale.copy_(qparams.scale.reshape(-1))
        if not symmetric:
            module.zero_point.copy_(qparams.zero_point.reshape(-1))
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def qparams(self) -> uniform.QParams:
        """The stored quantization parameters, in the shape :func:`uniform.dequantize` expects."""
        view = {"tensor": (1, 1), "channel": (self.out_features, 1)}.get(
            self.granularity, (self.out_features, self.in_features // (self.group_size or 1), 1))
        scale = self.scale.float().view(view)
        zero_point = torch.zeros_like(scale) if self.symmetric else self.zero_point.float().view(view)
        return uniform.QParams(scale, zero_point, self.bits, self.symmetric, self.granularity, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` this module computes with (float32)."""
        qparams = self.qparams()
        codes = unpack_codes(self.packed, self.bits, self.in_features * self.out_features) + qparams.qmin
        grouped_shape = uniform.grouped(torch.empty(self.out_features, self.in_features, device="meta"),
                                        self.granularity, self.group_size).shape
        return uniform.dequantize(codes.view(grouped_shape), qparams, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        size = self.granularity if self.granularity != "group" else f"group {self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}, {size}")


@torch.no_grad()
def pack_model(model: torch.nn.Module, bits: int, symmetric: bool = False, granularity: str = "group",
               group_size: int | None = 64, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Replace every linear layer of ``model`` (except ``skip``) by a :class:`QuantizedLinear`, in place.

    Every layer is quantized before the first one is swapped, so an error leaves the model untouched.

    Returns:
        ``model``, modified in place.
    """
    linears = uniform.quantizable_linears(model, skip)
    if not linears:
        raise ValueError("model has no nn.Linear layer to quantize (after skip)")
    replacements = {name: QuantizedLinear.from_linear(linear, bits, symmetric, granularity, group_size)
                    for name, linear in linears.items()}
    for name, module in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return model
