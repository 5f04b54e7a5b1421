"""Knowledge distillation: the losses (:mod:`refimpl.distillation.losses`), shared with
quantization-aware training, which distils a quantized student from its float teacher."""
