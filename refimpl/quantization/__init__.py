"""Quantization: storing weights, activations or the KV cache in fewer bits (chapters 02-04).

- :mod:`refimpl.quantization.uniform`: affine (uniform) quantization — symmetric and asymmetric,
  2-8 bits, per-tensor / per-channel / per-group / per-token scales, static or dynamic ranges — and
  round-to-nearest (RTN) weight quantization of a whole model.
- :mod:`refimpl.quantization.formats`: 4-bit code books (NF4, FP4) with block-wise absmax scales,
  QLoRA's double quantization of those scales, and FP8 (E4M3, E5M2) rounding.
- :mod:`refimpl.quantization.packed`: real low-bit storage — codes packed into bytes plus scales —
  in ``QuantizedLinear`` (uniform grids) and ``CodeBookLinear`` (NF4/FP4), whose bytes
  :func:`refimpl.evaluate.model_bytes` measures.
- :mod:`refimpl.quantization.llm_int8`: LLM.int8(), vector-wise int8 matmul with outlier decomposition.
- :mod:`refimpl.quantization.activation`: weight-and-activation quantization (W8A8 and friends).
- :mod:`refimpl.quantization.smoothquant`: SmoothQuant, activation outliers migrated into the weights.
- :mod:`refimpl.quantization.zeroquant`: ZeroQuant, group-wise weights, per-token activations and
  layer-wise distillation.
- :mod:`refimpl.quantization.gptq`: GPTQ, second-order error compensation column by column.
- :mod:`refimpl.quantization.awq`: AWQ, activation-aware per-channel scaling found by a grid search.
- :mod:`refimpl.quantization.kv_cache`: KV-cache quantization, keys per channel and values per token.
"""
