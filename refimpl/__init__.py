"""refimpl: from-scratch reference implementations of LLM inference optimizations.

The package mirrors the book's chapters (see ``taxonomy/taxonomy.yaml``):

- :mod:`refimpl.models` loads SmolLM2-135M-Instruct (shipped offline) or any Hugging Face causal LM;
- :mod:`refimpl.data` provides the two shipped corpora and fixed-length token blocks;
- :mod:`refimpl.evaluate` measures quality (perplexity), size (bytes actually stored) and speed;
- :mod:`refimpl.anatomy` names the parts of a decoder that methods read and replace (its layers, the
  linear layers a method compresses, attention sizes);
- :mod:`refimpl.runtime` makes runs deterministic (seeds, threads) and owns the progress bars;
- :mod:`refimpl.taxonomy` loads and validates the survey's taxonomy.

Method packages (quantization, pruning, distillation, attention, decoding) are added chapter by
chapter. Importing :mod:`refimpl` itself is cheap: submodules are imported on demand.
"""

__version__ = "0.1.0"
