"""refimpl.decoding.static: gpt-fast's fixed-shape greedy step gives the decoder's own tokens and
logits' argmax, eager and traced as one graph (what the CUDA run compiles), and checks its arguments."""

from __future__ import annotations

import pytest
import torch

from refimpl.attention.decoder import Decoder
from refimpl.decoding.static import StaticDecodeStep, greedy_decoder, greedy_static, prefill


def _greedy_both(step, tiny_llama, prompt_len=5, n_new=6):
    decoder = Decoder.from_hf(tiny_llama)
    cache = decoder.new_cache(batch_size=1, max_len=prompt_len + n_new)
    prompt = torch.randint(0, 128, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = greedy_decoder(decoder, cache, prompt, n_new)
        static = step(decoder, cache)
        tokens = greedy_static(static, decoder, cache, prompt, n_new)
    return reference, tokens


def test_static_step_matches_decoder(tiny_llama):
    reference, tokens = _greedy_both(StaticDecodeStep, tiny_llama)
    assert reference.shape == (1, 6) and torch.equal(tokens, reference)


def test_static_step_traces_as_one_graph(tiny_llama):
    """What the CUDA run compiles: the static step must trace without a graph break (fullgraph)."""
    torch._dynamo.reset()
    reference, tokens = _greedy_both(
        lambda d, c: torch.compile(StaticDecodeStep(d, c), backend="eager", fullgraph=True), tiny_llama)
    assert torch.equal(tokens, reference)


def test_prefill_then_static_step_give_the_decoders_tokens(tiny_llama):
    decoder = Decoder.from_hf(tiny_llama)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = decoder.new_cache(batch_size=1, max_len=10)
        decoder(ids[:, :6], cache)
        expected = decoder(ids[:, 6:], cache, logits_to_keep=1).argmax(-1)
        first = prefill(decoder, cache, ids[:, :6])  # empties the cache filled above, then fills it again
        assert cache.length == 6 and torch.equal(first, decoder(ids[:, :6], logits_to_keep=1).argmax(-1))
        token = StaticDecodeStep(decoder, cache)(ids[:, 6:], torch.tensor([6]))
    assert torch.equal(token, expected)


def test_static_step_and_greedy_loops_check_their_arguments(tiny_llama):
    decoder = Decoder.from_hf(tiny_llama)
    cache = decoder.new_cache(batch_size=1, max_len=6)
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="decoder must be a Decoder"):
        StaticDecodeStep(tiny_llama, cache)
    with pytest.raises(ValueError, match="sliding window"):
        StaticDecodeStep(decoder, decoder.new_cache(batch_size=1, max_len=6, window=2))
    step = StaticDecodeStep(decoder, cache)
    with pytest.raises(ValueError, match="n_new"):
        greedy_decoder(decoder, cache, prompt, 0)
    with pytest.raises(ValueError, match="n_new"):
        greedy_static(step, decoder, cache, prompt, 0)
    with pytest.raises(TypeError, match="step"):
        greedy_static("step", decoder, cache, prompt, 2)
    with pytest.raises(ValueError, match="cache slots"):  # positions 4..6 would be written; the cache has 6
        greedy_static(step, decoder, cache, prompt, 4)
