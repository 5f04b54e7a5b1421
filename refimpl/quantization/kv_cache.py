r"""KV-cache quantization (KIVI): keys per channel, values per token, recent tokens in full precision.

In decoding every layer keeps the keys and values of all past tokens; with long contexts or large
batches this cache, not the weights, fills the memory and the bytes read per step. KIVI (Liu et al.
2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv:2402.02750) observes
that keys have a few fixed *channels* of large magnitude for every token, while values have no
outlier channels and their error matters per token. So keys are quantized **per channel** — one
scale and zero-point per channel and group of :math:`G` tokens — and values **per token**, both
asymmetric and without calibration, with the shared quantizer (:mod:`refimpl.quantization.uniform`)
on keys as cached, i.e. after the rotary embedding. Keys that do not fill a group yet, and recent
tokens of the residual window :math:`R`, stay in full precision.

With :math:`Q_b` the asymmetric :math:`b`-bit quantizer, one head with :math:`K, V \in \mathbb{R}^{l \times d}`
stores its first :math:`n_K` keys and :math:`n_V` values as

.. math:: \hat K_{[gG:(g+1)G],\,c} = Q_b\big(K_{[gG:(g+1)G],\,c}\big), \quad
          \hat V_{t,\,:} = Q_b\big(V_{t,\,:}\big), \quad
          n_K = l - (l \bmod \max(R, G)), \quad n_V = \max(l - R,\, 0):

the state of KIVI's cache after :math:`l` tokens (``R`` is 0 or a multiple of ``G``: keys leave the
window ``R`` at a time, so 0 to ``R - 1`` of them are exact; values leave it one at a time). Scales
(float16) and zero-points (:math:`b` bits) add :math:`(2 + b/8)/G` bytes per key, :math:`(2 + b/8)/d`
per value.

Kept different from the paper for one shared quantizer: each range is widened to include 0 (KIVI's
plain min-max is finer for a channel far from 0), zero-points are integers (KIVI stores a float
minimum), and a token's values are not split into channel groups.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from refimpl import models
from refimpl._validation import check_non_negative_int, check_positive_int
from refimpl.quantization import packed, uniform
from refimpl.quantization.activation import straight_through


def _check_scheme(bits: int, key_group_size: int, residual: int) -> None:
    uniform.check_bits(bits)
    check_positive_int("key_group_size", key_group_size)
    check_non_negative_int("residual", residual)
    if residual % key_group_size:
        raise ValueError(f"residual must be 0 or a multiple of key_group_size ({key_group_size}): keys leave "
                         f"the full-precision window a whole group at a time, got {residual}")


def _check_kv(x: torch.Tensor, param: str) -> None:
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        raise ValueError(f"{param} must have shape [batch, kv_heads, seq, head_dim], got {tuple(x.shape)}")
    uniform.check_input(x, param)


def _key_grid(bits: int, group_size: int) -> uniform.Grid:
    """Keys: asymmetric, per channel in groups of ``group_size`` tokens (a row of the keys transposed)."""
    return uniform.Grid(bits, symmetric=False, group_size=group_size)


def _value_grid(bits: int) -> uniform.Grid:
    """Values: asymmetric, per token."""
    return uniform.Grid(bits, symmetric=False, per="token")


def split_points(seq_len: int, key_group_size: int, residual: int) -> tuple[int, int]:
    """``(n_K, n_V)``: how many leading tokens have quantized keys and values (module docstring)."""
    return seq_len - seq_len % max(residual, key_group_size), max(seq_len - residual, 0)


# --- primitives: codes and parameters of the quantized part -----------------------------------


def _codes(x: torch.Tensor, grid: uniform.Grid) -> tuple[torch.Tensor, uniform.QParams]:
    """Codes and float16-rounded parameters of keys (``grid`` in groups of tokens per channel) or of
    values (``grid`` per token), ``x`` of shape ``[b, h, n, d]``."""
    if grid.group_size:
        x = x.transpose(-1, -2)  # [b, h, d, n]: a channel's tokens on the last dim
    qparams = uniform.compute_qparams(x, grid, scale_dtype=torch.float16)
    return uniform.quantize(x, qparams), qparams  # keys [b*h*d, n/G, G], values [b*h*n, d]


def _dequantized(codes: torch.Tensor, qparams: uniform.QParams, shape: tuple[int, ...]) -> torch.Tensor:
    """Real values ``[b, h, n, d]`` of the codes of :func:`_codes`."""
    b, h, n, d = shape
    if qparams.grid.group_size:
        return uniform.dequantize(codes, qparams, (b, h, d, n)).transpose(-1, -2)  # keys back to [b, h, n, d]
    return uniform.dequantize(codes, qparams, shape)


def _fake_quantize(x: torch.Tensor, grid: uniform.Grid, n: int) -> torch.Tensor:
    if n == 0:
        return x.clone()
    codes, qparams = _codes(x[:, :, :n], grid)
    x_hat = _dequantized(codes, qparams, (*x.shape[:2], n, x.shape[3])).to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled():  # trainable through the rounding (QAT of the cache)
        x_hat = straight_through(x[:, :, :n], x_hat)
    return torch.cat([x_hat, x[:, :, n:]], dim=2)  # the last seq - n tokens stay exact


def quantize_keys(k: torch.Tensor, bits: int, group_size: int = 32, residual: int = 0) -> torch.Tensor:
    """Fake-quantized keys ``[batch, kv_heads, seq, head_dim]`` (post-RoPE, as cached): per channel over
    groups of ``group_size`` tokens; the last ``seq mod max(residual, group_size)`` tokens stay exact."""
    _check_kv(k, "k")
    _check_scheme(bits, group_size, residual)
    return _fake_quantize(k, _key_grid(bits, group_size), split_points(k.shape[2], group_size, residual)[0])


def quantize_values(v: torch.Tensor, bits: int, residual: int = 0) -> torch.Tensor:
    """Fake-quantized values ``[batch, kv_heads, seq, head_dim]``: per token; the last ``residual``
    tokens stay exact."""
    _check_kv(v, "v")
    uniform.check_bits(bits)
    check_non_negative_int("residual", residual)
    return _fake_quantize(v, _value_grid(bits), split_points(v.shape[2], 1, residual)[1])


# --- the effect on a model: attention computed with a quantized cache --------------------------


def _quantized_kv_attention(module, query, key, value, attention_mask, *, attention_fn, bits, key_group_size,
                            residual, **kwargs):
    key = quantize_keys(key, bits, key_group_size, residual)  # [b, kv_heads, l, d], before GQA repeats
    value = quantize_values(value, bits, residual)
    return attention_fn(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def kv_quantization(model: Any, bits: int, key_group_size: int = 32, residual: int = 0) -> Iterator[Any]:
    """Within the block every attention layer of the Hugging Face ``model`` attends to KIVI-quantized
    keys and values (post-RoPE, after the cache update, before GQA repeats); on exit, also on an
    exception, the previous attention implementation is back (an ``eager`` model runs SDPA inside).

    The whole sequence is fake-quantized at each call, so a decode step sees the state a KIVI cache
    stores after that step (KIVI attends just before it moves a full window into the quantized part).
    In one forward over a block (perplexity) each query sees the quantized keys and values of all
    earlier tokens, with two small differences from decoding: a key group's scale also depends on
    the later tokens of its group, and KIVI's prefill attends to exact keys. ``residual=0`` by
    default: in the book's short blocks, KIVI's ``R = 128`` would hide most of the error. When the
    model is trained inside the block, gradients pass the rounding straight through (QAT of the cache,
    :mod:`refimpl.quantization.qat`).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _check_scheme(bits, key_group_size, residual)
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face PreTrainedModel, got {type(model).__name__}")
    previous = model.config._attn_implementation
    name = f"refimpl_kv_int{bits}_g{key_group_size}_r{residual}_{previous}"
    attention_fn = functools.partial(_quantized_kv_attention,
                                     attention_fn=ALL_ATTENTION_FUNCTIONS.get(previous, sdpa_attention_forward),
                                     bits=bits, key_group_size=key_group_size, residual=residual)
    with models.attention_implementation(model, name, attention_fn):
        yield model


# --- memory: the packed cache -----------------------------------------------------------------


@dataclass
class QuantizedKV:
    """One layer's cache as stored: packed ``bits``-bit codes, float16 scales, ``bits``-bit zero-points
    (packed too) of the quantized tokens, and the full-precision residual keys and values."""

    bits: int
    key_group_size: int
    residual: int
    shape: tuple[int, int, int, int]  # [batch, kv_heads, seq, head_dim] of k and v
    key_codes: torch.Tensor  # uint8[ceil(b*h*n_K*d * bits / 8)]
    key_scale: torch.Tensor  # float16[b*h*d * n_K/G]
    key_zero_point: torch.Tensor  # uint8, packed bits-bit integers
    value_codes: torch.Tensor  # uint8[ceil(b*h*n_V*d * bits / 8)]
    value_scale: torch.Tensor  # float16[b*h*n_V]
    value_zero_point: torch.Tensor  # uint8, packed bits-bit integers
    key_residual: torch.Tensor  # [b, h, seq - n_K, d], original dtype
    value_residual: torch.Tensor  # [b, h, seq - n_V, d], original dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (``element_size * numel`` summed), measured, not computed."""
        return sum(t.element_size() * t.numel() for t in vars(self).values() if isinstance(t, torch.Tensor))

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_hat, v_hat)``, equal to :func:`quantize_keys` and :func:`quantize_values` of the input."""
        n_k, n_v = split_points(self.shape[2], self.key_group_size, self.residual)
        return (self._unpack(self.key_codes, self.key_scale, self.key_zero_point, self.key_residual, n_k,
                             _key_grid(self.bits, self.key_group_size)),
                self._unpack(self.value_codes, self.value_scale, self.value_zero_point, self.value_residual, n_v,
                             _value_grid(self.bits)))

    def _unpack(self, codes, scale, zero_point, residual, n, grid: uniform.Grid) -> torch.Tensor:
        if n == 0:
            return residual.clone()
        b, h, _, d = self.shape
        g = grid.group_size
        grouped = (b * h * d, n // g, g) if g else (b * h * n, d)  # as _codes made
        view = (*grouped[:-1], 1)  # one scale per channel group or per token
        qparams = uniform.QParams(scale.float().view(view),
                                  packed.unpack_codes(zero_point, self.bits, scale.numel()).float().view(view), grid)
        codes = packed.unpack_codes(codes, self.bits, math.prod(grouped)).view(grouped)
        return torch.cat([_dequantized(codes, qparams, (b, h, n, d)).to(residual.dtype), residual], dim=2)


def _pack(x: torch.Tensor, grid: uniform.Grid, n: int) -> tuple[torch.Tensor, ...]:
    """Packed codes, float16 scales and packed zero-points of the first ``n`` tokens of ``x``."""
    if n == 0:
        return tuple(torch.zeros(0, dtype=t, device=x.device) for t in (torch.uint8, torch.float16, torch.uint8))
    codes, qparams = _codes(x[:, :, :n], grid)
    zero_point = qparams.zero_point.reshape(-1).to(torch.int32)  # integers in [0, 2^bits - 1]
    return (packed.pack_codes(codes, grid.bits), qparams.scale.reshape(-1).half(),
            packed.pack_codes(zero_point, grid.bits))


def pack_kv(k: torch.Tensor, v: torch.Tensor, bits: int, key_group_size: int = 32, residual: int = 0) -> QuantizedKV:
    """Quantize and pack one layer's keys and values ``[batch, kv_heads, seq, head_dim]`` (KIVI scheme)."""
    _check_kv(k, "k")
    _check_kv(v, "v")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    _check_scheme(bits, key_group_size, residual)
    n_k, n_v = split_points(k.shape[2], key_group_size, residual)
    return QuantizedKV(bits, key_group_size, residual, tuple(k.shape), *_pack(k, _key_grid(bits, key_group_size), n_k),
                       *_pack(v, _value_grid(bits), n_v), k[:, :, n_k:].clone(), v[:, :, n_v:].clone())


def pack_cache(past_key_values: Any, bits: int, key_group_size: int = 32,
               residual: int = 0) -> tuple[list[QuantizedKV], int]:
    """Pack every layer of a transformers cache (``.layers[i].keys`` / ``.values``): the packed layers
    and their total bytes, to set against :func:`refimpl.evaluate.cache_bytes` of the same cache."""
    layers = getattr(past_key_values, "layers", None)
    if layers is None:
        raise TypeError(f"past_key_values must be a transformers Cache, got {type(past_key_values).__name__}")
    packed_layers = [pack_kv(layer.keys, layer.values, bits, key_group_size, residual) for layer in layers]
    return packed_layers, sum(layer.nbytes for layer in packed_layers)
