"""Quantization: storing weights, activations or the KV cache in fewer bits (chapters 02-04).

- :mod:`refimpl.quantization.uniform`: affine (uniform) quantization — symmetric and asymmetric,
  2-8 bits, per-tensor / per-channel / per-group / per-token scales, static or dynamic ranges — and
  round-to-nearest (RTN) weight quantization of a whole model.
- :mod:`refimpl.quantization.packed`: real low-bit storage — codes packed into bytes plus scales —
  and the ``QuantizedLinear`` module whose bytes :func:`refimpl.evaluate.model_bytes` measures.
"""
