r"""Number formats beyond uniform integers: 4-bit code books (NF4, FP4) and FP8 (E4M3, E5M2).

**Code-book formats.** A 4-bit code indexes one of 16 values of a code book :math:`c \in [-1, 1]`;
a block of ``blocksize`` consecutive weights shares one absmax scale :math:`a`, and each weight is
stored as the index of the nearest code-book value to :math:`w / a` (Dettmers et al. 2023, QLoRA, §3):

.. math:: q_i = \arg\min_j |w_i / a - c_j|, \qquad \hat w_i = a\, c_{q_i}.

- **NF4** (4-bit NormalFloat): the code book holds quantiles of a standard normal distribution, so
  that for normally distributed weights each code is used about equally often — information-
  theoretically optimal for that distribution. QLoRA builds it asymmetrically so that 0 is exact: 8
  quantiles for the positive half, 7 for the negative half, and 0, normalised to :math:`[-1, 1]`
  (:func:`normal_float_code_book`). The format is defined by the float32 table published with QLoRA
  and used by bitsandbytes (:data:`NF4_CODE`); recomputing the quantiles reproduces it to within one
  float32 rounding step.
- **FP4**: a 4-bit float with a sign bit, 2 exponent bits and 1 mantissa bit, in the variant
  bitsandbytes uses (:func:`fp4_code_book`).
- **Double quantization** (QLoRA): the block scales :math:`a` are quantized too, with an 8-bit
  code book in blocks of 256 (:func:`double_quantize`).

**FP8.** Two 8-bit floating-point formats (Micikevicius et al. 2022): E4M3 (4 exponent bits, 3
mantissa bits, bias 7, largest value 448, no infinities) for weights and activations, and E5M2 (5
exponent bits, 2 mantissa bits, bias 15, largest value 57,344) for gradients. :func:`fp8_round`
rounds float32 values to the nearest representable FP8 value, ties to even, from the bit layout alone.
"""

from __future__ import annotations

import torch

from refimpl._validation import all_finite, check_choice, check_positive_int

#: The NF4 code book as published with QLoRA and used by bitsandbytes (float32, ascending).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)

FP8_FORMATS = {
    # name: (exponent bits, mantissa bits, bias, largest finite value)
    "e4m3": (4, 3, 7, 448.0),
    "e5m2": (5, 2, 15, 57344.0),
}


def normal_float_code_book(offset: float = 0.9677083) -> torch.Tensor:
    """NF4 recomputed from its definition (QLoRA, §3 and Appendix E): quantiles of N(0, 1) at
    ``linspace(offset, 0.5, 9)`` (positive half, 8 values) and ``linspace(offset, 0.5, 8)`` (negative
    half, 7 values), plus an exact 0, divided by the largest magnitude. ``offset`` keeps the outermost
    quantile finite. Returns ``float32[16]``, ascending."""
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must be in (0.5, 1), got {offset!r}")
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.abs().max()).float()


def fp4_code_book() -> torch.Tensor:
    """The FP4 code book indexed by the 4-bit code ``s e1 e0 m`` (sign, 2 exponent bits, 1 mantissa
    bit) in bitsandbytes' variant: exponent fields 1, 2, 3 give magnitudes 8, 4, 2 times
    :math:`(1 + m/2)`, field 0 gives the subnormal values 0 and 1/16; the book is divided by its
    largest magnitude (12). Returns ``float32[16]`` in code order (not sorted)."""
    values = []
    for code in range(16):
        sign = -1.0 if code & 0b1000 else 1.0
        exponent, mantissa = (code >> 1) & 0b11, code & 1
        magnitude = 0.0625 * mantissa if exponent == 0 else 2.0 ** (4 - exponent) * (1 + mantissa / 2)
        values.append(sign * magnitude / 12.0)
    return torch.tensor(values, dtype=torch.float32)


def dynamic_code_book() -> torch.Tensor:
    r"""The signed 8-bit *dynamic* code book (Dettmers 2015, "8-bit approximations"; the default of
    bitsandbytes' block-wise 8-bit quantization), used by double quantization.

    Besides the sign, a code holds a decimal exponent :math:`e \in \{0, \dots, 6\}` and a linear
    fraction whose resolution grows with the magnitude: magnitude decade :math:`10^{e-6}` is split into
    :math:`2^e` equal steps of :math:`[0.1, 1]`, represented by their midpoints. With 0 and 1 that
    makes :math:`2 \cdot 127 + 2 = 256` values. Returns ``float32[256]``, ascending."""
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)  # 2^e equal steps
        midpoints = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (exponent - 6)).tolist()
        values += midpoints + [-m for m in midpoints]
    return torch.tensor(sorted(values), dtype=torch.float32)


#: Absmax values per second-level scale in double quantization (QLoRA §3: blocksize 256).
DOUBLE_QUANT_BLOCKSIZE = 256


def _check_code_book(code: torch.Tensor) -> None:
    if not isinstance(code, torch.Tensor) or code.shape not in ((16,), (256,)) or code.dtype != torch.float32:
        raise ValueError("code must be a float32 tensor of 16 or 256 values (a 4-bit or 8-bit code book)")


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor = NF4_CODE, blocksize: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax quantization of ``x`` (flattened) onto a 4-bit (16 values) or 8-bit (256
    values) code book.

    Each block of ``blocksize`` consecutive values (the last one may be shorter) is divided by its
    absmax :math:`a` and every value mapped to the nearest code-book entry; a value exactly halfway
    between two entries takes the lower one.

    Returns:
        ``(codes, absmax)``: ``uint8[x.numel()]`` code-book indices and ``float32[n_blocks]``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        raise TypeError("x must be a non-empty floating-point tensor")
    if not all_finite(x):
        raise ValueError("x holds NaN or Inf values; quantization needs finite inputs")
    _check_code_book(code)
    check_positive_int("blocksize", blocksize)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, (-n) % blocksize))  # zeros leave every absmax unchanged
    blocks = padded.view(-1, blocksize)  # [n_blocks, blocksize]
    absmax = blocks.abs().amax(dim=1)  # [n_blocks]
    scaled = (blocks * (1.0 / absmax.clamp_min(1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    order = torch.argsort(code)  # code-book indices by value
    sorted_code = code.to(flat.device)[order.to(flat.device)]
    midpoints = (sorted_code[1:] + sorted_code[:-1]) / 2  # decision boundaries between neighbours
    nearest = torch.bucketize(scaled, midpoints)  # position in sorted_code; ties go to the lower value
    return order.to(flat.device)[nearest].to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor = NF4_CODE,
                         blocksize: int = 64, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``absmax[block] * code[codes]`` (float32), reshaped
    to ``shape`` if given."""
    _check_code_book(code)
    check_positive_int("blocksize", blocksize)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError("codes must be a uint8 tensor from quantize_blockwise()")
    n = codes.numel()
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"absmax holds {absmax.numel()} scales, but {n} codes in blocks of {blocksize} need "
                         f"{-(-n // blocksize)}")
    values = code.to(codes.device)[codes.reshape(-1).long()]  # [n]
    scales = absmax.float().repeat_interleave(blocksize)[:n]  # [n]
    out = values * scales
    return out.reshape(shape) if shape is not None else out


def double_quantize(absmax: torch.Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""QLoRA's double quantization (§3): quantize the first-level float32 block scales ``absmax``
    themselves, block-wise with the 8-bit :func:`dynamic_code_book`, after subtracting their mean
    (they are all positive, so centring them uses the signed code book fully).

    For 4-bit weights in blocks of 64 this cuts the scales' memory from :math:`32/64 = 0.5` to
    :math:`8/64 + 32/(64 \cdot 256) \approx 0.127` bits per parameter.

    Returns:
        ``(codes, scales, offset)``: ``uint8[n]``, ``float32[ceil(n / blocksize)]``, float32 scalar.
    """
    if not isinstance(absmax, torch.Tensor) or absmax.dim() != 1 or absmax.dtype != torch.float32:
        raise TypeError("absmax must be a 1-D float32 tensor of block scales")
    offset = absmax.mean()
    codes, scales = quantize_blockwise(absmax - offset, dynamic_code_book(), blocksize)
    return codes, scales, offset


def double_dequantize(codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = DOUBLE_QUANT_BLOCKSIZE) -> torch.Tensor:
    """Inverse of :func:`double_quantize`: the first-level block scales, ``float32[n]``."""
    return dequantize_blockwise(codes, scales, dynamic_code_book(), blocksize) + offset


def fp8_round(x: torch.Tensor, fmt: str = "e4m3", saturate: bool = False) -> torch.Tensor:
    r"""Round float32 ``x`` to the nearest value representable in FP8 ``fmt`` (ties to even), as float32.

    A value with exponent :math:`e = \lfloor \log_2 |x| \rfloor` (at least the smallest normal
    exponent :math:`1 - \text{bias}`, below which values are subnormal) lies on a grid of step
    :math:`2^{e - m}` for :math:`m` mantissa bits; rounding to that grid is exact in float32.

    Args:
        x: values to round.
        fmt: ``"e4m3"`` or ``"e5m2"``.
        saturate: clamp values that round beyond the largest finite value to it; otherwise such
            values raise ``ValueError`` (the format cannot hold them).
    """
    check_choice("fmt", fmt, tuple(FP8_FORMATS))
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if not all_finite(x):
        raise ValueError("x holds NaN or Inf values")
    _, mantissa_bits, bias, largest = FP8_FORMATS[fmt]
    x32 = x.float()
    magnitude = x32.abs()
    exponent = torch.floor(torch.log2(magnitude.clamp_min(torch.finfo(torch.float32).tiny)))
    exponent = exponent.clamp_min(1 - bias)  # subnormals share the smallest normal exponent's step
    step = torch.exp2(exponent - mantissa_bits)
    rounded = torch.round(x32 / step) * step
    too_large = rounded.abs() > largest
    if too_large.any():
        if not saturate:
            raise ValueError(f"x holds values beyond the {fmt.upper()} range (largest {largest:g}); "
                             "pass saturate=True to clamp them")
        rounded = rounded.clamp(-largest, largest)
    return rounded
