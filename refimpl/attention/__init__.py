"""Attention and its memory: the architectural optimizations of decoding (chapter on architecture).

- :mod:`refimpl.attention.kv_cache`: an explicit, preallocated KV cache (``update``, ``truncate``,
  measured bytes) with sliding-window attention and StreamingLLM attention sinks; RoPE; causal
  attention through the cache.
- :mod:`refimpl.attention.decoder`: a readable Llama forward over a Hugging Face model's own weights
  that decodes with that cache.
- :mod:`refimpl.attention.gqa`: grouped-query attention (MHA, GQA, MQA) — the attention core, and
  converting a model's key/value heads by mean-pooling (GQA uptraining's start) or repeating them.
- :mod:`refimpl.attention.flash`: FlashAttention's tiled forward with the online softmax, its HBM
  access count (Theorem 2), and a context manager that makes a Hugging Face model use it.
- :mod:`refimpl.attention.paged`: PagedAttention — a block allocator with reference counts, block
  tables, copy-on-write forks, attention through the block table, and serving memory arithmetic.
"""
