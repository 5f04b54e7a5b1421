r"""The effects table: every method of the book applied to one model and measured the same way.

Run ``python -m refimpl effects --model smollm2-135m --out results/effects`` (``--methods a,b,...``
for some rows, ``--device cuda``, ``--train`` to train what is not cached, ``--list`` for the rows,
``--check TABLE.csv`` to recompute a sample of a written table). Each row of the registry applies one
method — or a combination — at its chapter's settings, run as its paper runs it (calibration layer by
layer where the paper does so, on more text than a chapter can afford), to a fresh copy of the same
model, by calling the chapter's ``refimpl`` functions, and measures:

- **weight bytes** actually stored (:func:`refimpl.evaluate.model_bytes` of the model the row evaluates:
  real packed codes and scales where refimpl has a packed format; :func:`refimpl.quantization.packed.packed_size`
  of the weight grid where the row evaluates a simulated model — the W8A8 rows);
- **perplexity** on both corpora (:data:`refimpl.data.CORPORA`): 16 blocks of 512 tokens spread over each
  evaluation split (:func:`refimpl.data.spread_blocks`), with its 95 % block-bootstrap interval, and the
  **ratio to the dense model** on the same blocks with its paired interval
  (:func:`refimpl.evaluate.paired_ratio`): two rows are ranked only where the intervals say so;
- **KV-cache bytes per token** of one 512-token block (packed where the row quantizes the cache), and the
  measured fraction of zero weights in the decoder layers;
- **prefill and decode throughput** on this machine (chapter 05's protocol: prefill of 64 tokens, 8 greedy
  tokens after a 32-token prompt, here in 3 rounds), each timed in alternation with the dense model
  (:func:`refimpl.evaluate.side_by_side`), so that the speed-up over dense survives a change in the
  machine's load. The speed is that of the model the row measures, as refimpl stores and computes it:
  packed layers dequantize their weights on every call and W8A8 is simulated in float32, so without
  the low-bit kernel the ``needs_kernel`` column names, quantization costs time here instead of saving it;
- **cost**: wall-clock seconds to apply the method (training included) and, separately, to capture the
  calibration data it uses (captured once and shared by the rows that use them, but every such row is
  charged their full time);
- **what it needs**: calibration data, training, and the kernel that would turn it into speed.

The package, in the order a row goes through it:

- :mod:`~refimpl.effects.protocol`: how every row is measured (:class:`Protocol`);
- :mod:`~refimpl.effects.registry`: the registry (:data:`ROWS`, declared with keywords; a combination names
  the row it starts from) and :data:`NOT_A_ROW`, the implemented methods that are not a row and why;
- :mod:`~refimpl.effects.recipes`: what each row does to the model, by calling the method modules;
- :mod:`~refimpl.effects.context`: what a recipe sees (the model, shared calibration) and returns;
- :mod:`~refimpl.effects.measure`: making a row's model and measuring it;
- :mod:`~refimpl.effects.key`: the hash of what decides a row's results, derived from the code it reaches;
- :mod:`~refimpl.effects.table`: columns, CSV and Markdown;
- :mod:`~refimpl.effects.run`, :mod:`~refimpl.effects.check`, :mod:`~refimpl.effects.cli`: running a
  table, recomputing rows of a committed one, the command line.

Speculative decoding, whose effect is speed at unchanged output, is measured in chapter 08 and is not
part of this table yet.
"""
