"""Knowledge distillation (chapter 06): train a small student to imitate a large teacher.

- :mod:`refimpl.distillation.losses` — the token-level divergences between teacher and student
  next-token distributions (forward KL of Hinton et al., reverse KL of MiniLLM, GKD's generalized JSD),
  temperature, Hinton's mix with cross-entropy on hard labels, masks, and sparse (top-k) teachers for
  offline distillation. Quantization-aware training (chapter 04) distils a quantized student from its
  float teacher with the same losses.
- :mod:`refimpl.distillation.student` — a student made from the teacher by keeping a subset of its
  decoder layers (same tokenizer, copied weights, a config and KV cache that fit).
- :mod:`refimpl.distillation.train` — four trainers on the shared loop of :mod:`refimpl.training`:
  white-box distillation online (``distill_online``) or offline from stored top-k teacher
  probabilities (``distill_offline_topk``), black-box sequence-level distillation on teacher-generated
  text (``distill_sequence_level``), and on-policy distillation on the student's own samples, GKD
  (``distill_on_policy``).
- :mod:`refimpl.distillation.cache` — trained students saved in refimpl's cache under a hash of their
  recipe, and the book's student recipe (chapters 06 and 08).
- :mod:`refimpl.distillation.minillm` — MiniLLM's sequence-level reverse KL on the student's own
  (teacher-mixed) samples, optimised by policy gradient with the paper's variance reductions
  (single-step decomposition, teacher-mixed sampling, length normalization) and the PT loss.
"""
