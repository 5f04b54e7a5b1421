"""The ``weight_only`` section: weight-only quantized matmul kernels against the dense one, int8 per
output channel (``torch._weight_int8pack_mm``) and packed int4 in groups (``torch._weight_int4pack_mm``,
the "tinygemm" kernel), each checked against its dequantized weights first (:mod:`refimpl.bench`).

The kernels are private ATen operators whose signatures change between torch releases: each is
called only after its schema, read at run time, is the one this code was written for."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from refimpl.bench.common import attempt, checked_timing, compute_dtype, dtype_name, median_time
from refimpl.quantization import llm_int8


def op_schema(name: str) -> str | None:
    """The ATen schema of ``aten::<name>`` (its real signature, read at run time), or ``None`` when this
    torch build lacks the operator."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return None
    try:
        return str(packet.default._schema)
    except (AttributeError, RuntimeError):
        return None


def _check_schema(name: str, expected: list[str]) -> str | None:
    """``None`` when ``aten::name`` exists with the argument types ``expected``; the reason otherwise.
    A different signature raises: it means this code must be adapted to the torch release."""
    schema = op_schema(name)
    if schema is None:
        return f"torch {torch.__version__} has no aten::{name}"
    arguments = [a.type for a in getattr(torch.ops.aten, name).default._schema.arguments]
    types = [str(t) for t in arguments]
    if types != expected:
        raise RuntimeError(f"aten::{name} has the signature {schema}; this benchmark calls it with argument "
                           f"types {expected} and must be adapted")
    return None


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups along the input dimension, tinygemm's convention: codes ``q`` in
    ``0..15`` (int32 ``[out, in]``), and per group a scale and a zero with
    ``weight ≈ (q - 8) * scale + zero``; ``scales`` and ``zeros`` are float32 ``[out, in / group_size]``."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} must be a multiple of group_size {group_size}")
    w = weight.float().reshape(out_features, -1, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15).clamp_min(1e-6)
    codes = ((w - low[..., None]) / scales[..., None]).round().clamp(0, 15)
    zeros = low + 8 * scales
    return codes.reshape(out_features, in_features).to(torch.int32), scales, zeros


def dequantize_int4_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """The float32 weight :func:`quantize_int4_groups` stands for."""
    out_features, in_features = codes.shape
    q = codes.float().reshape(out_features, -1, group_size)
    return ((q - 8) * scales[..., None] + zeros[..., None]).reshape(out_features, in_features)


def _int8_entry(weight: torch.Tensor, x: torch.Tensor, device: torch.device) -> dict[str, Any] | str:
    codes, scales = llm_int8.vectorwise_quantize(weight.float(), "channel")  # int8 [out, in], float32 [out, 1]
    scales = scales.view(-1)
    dequantized = (codes.float() * scales[:, None]).to(x.dtype)
    codes, scales = codes.to(device), scales.to(device, x.dtype)
    return checked_timing("int8 weight-only matmul", lambda: torch._weight_int8pack_mm(x, codes, scales),
                          F.linear(x, dequantized.to(device)), device)


def _int4_entry(weight: torch.Tensor, x: torch.Tensor, device: torch.device, group_size: int,
                inner_k_tiles: int) -> dict[str, Any] | str:
    codes, scales, zeros = quantize_int4_groups(weight, group_size)
    dequantized = dequantize_int4_groups(codes, scales, zeros, group_size).to(x.dtype)
    # [in / group, out, 2]: the scale and the zero of every group of every output channel.
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(device, x.dtype)
    if device.type == "cuda":
        # Two codes per byte, the even input index in the high nibble.
        packed_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).to(device)
        packed, reason = attempt(lambda: torch._convert_weight_to_int4pack(packed_bytes, inner_k_tiles))
        matmul = torch._weight_int4pack_mm
    else:
        packed, reason = attempt(lambda: torch._convert_weight_to_int4pack_for_cpu(codes.to(device), inner_k_tiles))
        matmul = torch._weight_int4pack_mm_for_cpu
    if reason is not None:
        return reason
    entry = checked_timing("int4 weight-only matmul", lambda: matmul(x, packed, group_size, scales_and_zeros),
                           F.linear(x, dequantized.to(device)), device)
    if isinstance(entry, dict):
        entry.update(group_size=group_size, inner_k_tiles=inner_k_tiles,
                     packed_bytes=packed.numel() * packed.element_size())
    return entry


@torch.inference_mode()
def bench_weight_only(device: torch.device, quick: bool) -> dict[str, Any]:
    """int8 per-channel and packed-int4 group-wise weight-only matmul against the dense one."""
    dtype = compute_dtype(device)
    int4_mm, int4_pack = (("_weight_int4pack_mm", "_convert_weight_to_int4pack") if device.type == "cuda" else
                          ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"))
    int8_missing = _check_schema("_weight_int8pack_mm", ["Tensor", "Tensor", "Tensor"])
    int4_missing = (_check_schema(int4_mm, ["Tensor", "Tensor", "int", "Tensor"])
                    or _check_schema(int4_pack, ["Tensor", "int"]))
    # (out, in, group size, inner k tiles): K must be a multiple of group size and of 16 * inner k tiles.
    shapes = ((1536, 576, 64, 2),) if quick else ((1536, 576, 64, 2), (8192, 8192, 128, 8))
    rows = (1,) if quick else (1, 16)
    entries = []
    for out_features, in_features, group_size, inner_k_tiles in shapes:
        generator = torch.Generator().manual_seed(out_features)
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        dense_weight = weight.to(device, dtype)
        for n in rows:
            x = torch.randn(n, in_features, generator=generator).to(device, dtype)
            dense_ms = 1e3 * median_time(lambda: F.linear(x, dense_weight), device, repeats=7, warmup=3)
            entry: dict[str, Any] = {"out_features": out_features, "in_features": in_features, "tokens": n,
                                     "dense_ms": dense_ms,
                                     "dense_bytes": dense_weight.numel() * dense_weight.element_size()}
            for name, missing, make in (
                    ("int8", int8_missing, lambda: _int8_entry(weight, x, device)),
                    ("int4", int4_missing, lambda: _int4_entry(weight, x, device, group_size, inner_k_tiles))):
                result = missing or make()
                if isinstance(result, str):
                    entry[name] = {"skipped": result}
                else:
                    result["dense_over_quantized"] = dense_ms / result["ms"]
                    entry[name] = result
            entries.append(entry)
    return {"dtype": dtype_name(dtype), "int8_op": op_schema("_weight_int8pack_mm"),
            "int4_op": op_schema(int4_mm), "shapes": entries}
