"""Pruning: removing weights, or whole heads, channels and layers (chapter 05).

- :mod:`refimpl.pruning.masks`: which weights to remove given their scores — per row, per layer, or
  N:M (2:4, 4:8) — shared by the three unstructured methods.
- :mod:`refimpl.pruning.magnitude`: magnitude pruning, the data-free baseline.
- :mod:`refimpl.pruning.wanda`: Wanda, weight magnitude times input activation norm, per output row.
- :mod:`refimpl.pruning.sparsegpt`: SparseGPT, mask selection with second-order weight reconstruction
  (the column loop of :mod:`refimpl.obs`, shared with GPTQ).
- :mod:`refimpl.pruning.structured`: structured pruning into a smaller dense model — attention heads
  (respecting grouped-query KV groups), MLP channels and whole layers — scored by first-order Taylor
  importance (LLM-Pruner) or by activations, and LoRA recovery fine-tuning.
"""
