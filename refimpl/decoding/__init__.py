"""Decoding: how tokens are produced, and how to produce them with fewer target-model passes.

- :mod:`refimpl.decoding.generate`: the generation loop with a KV cache — greedy, temperature,
  top-k and top-p sampling, stop tokens, seeded.
- :mod:`refimpl.decoding.static`: gpt-fast's fixed-shape greedy step over a static KV cache (attention
  over every slot under a mask), which ``torch.compile`` can replay as one CUDA graph.
- :mod:`refimpl.decoding.speculative`: speculative decoding (draft proposes, target verifies in one
  pass, rejection sampling keeps the target's distribution), its acceptance arithmetic, and drafts:
  any smaller model, the target's own first layers (self-speculative), a quantized copy, or n-gram
  lookup in the text itself.
- :mod:`refimpl.decoding.early_exit`: CALM, each generated token leaves the decoder at the first
  layer whose confidence (softmax response, hidden-state saturation) reaches a threshold, with the
  skipped layers' keys and values propagated from the exit state, and the threshold calibrated by
  Learn-then-Test against the full model's output.
"""
