"""refimpl.bench: the GPU benchmark script, run in --quick mode on the CPU (its CUDA-only sections
must record why they were skipped), and its static decode step checked against the decoder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from refimpl import bench
from refimpl.attention.decoder import Decoder


def _check_numbers(value, where: str) -> None:
    """Every number below ``value`` is finite and non-negative, every timing or rate positive."""
    if isinstance(value, dict):
        if "skipped" in value:
            assert isinstance(value["skipped"], str) and value["skipped"], where
        for key, item in value.items():
            _check_numbers(item, f"{where}.{key}")
            if key.endswith(("_ms", "_s", "_per_s", "_gb_s", "_bytes")) or key == "ms":
                assert isinstance(item, (int, float)) and item > 0, f"{where}.{key} = {item!r}"
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_numbers(item, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        assert math.isfinite(value) and value >= 0, f"{where} = {value!r}"


@pytest.fixture(scope="module")
def quick_cpu_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    returned = bench.main(["--quick", "--device", "cpu", "--out", str(out)])
    return returned, json.loads(out.read_text())


def test_quick_cpu_run_writes_every_section(quick_cpu_results):
    returned, results = quick_cpu_results
    assert results == json.loads(json.dumps(returned))
    for key in ("device", "torch", "transformers", "date", "command"):
        assert isinstance(results[key], (str, list)) and results[key], key
    assert results["quick"] is True and results["complete"] is True
    assert results["torch"] == torch.__version__
    assert results["command"][1:] == ["--quick", "--device", "cpu", "--out", results["command"][-1]]
    for section in bench.SECTIONS:
        assert isinstance(results[section], dict), section
        _check_numbers(results[section], section)
    # What a CPU can and cannot run.
    assert "CUDA" in results["sparse_2_4"]["skipped"]
    assert "skipped" in results["decode"]["refimpl_static_compiled"]
    for key in ("refimpl_eager", "refimpl_static_eager", "hf_generate"):
        assert results["decode"][key]["tokens_per_s"] > 0
    assert [e["seq_len"] for e in results["attention"]["lengths"]] == [128, 256]


def test_roofline_is_bandwidth_over_weight_bytes(quick_cpu_results):
    _, results = quick_cpu_results
    bandwidth = results["bandwidth"]
    assert bandwidth["roofline_tokens_per_s"] == pytest.approx(bandwidth["read_gb_s"] * 1e9 / bandwidth["weight_bytes"])
    decode = results["decode"]["refimpl_eager"]
    assert decode["fraction_of_roofline"] == pytest.approx(decode["tokens_per_s"] / bandwidth["roofline_tokens_per_s"])


def test_decoders_agree_on_cpu(quick_cpu_results):
    _, results = quick_cpu_results
    assert results["decode"]["refimpl_static_eager"]["same_tokens_as_refimpl_eager"] is True
    assert results["decode"]["hf_generate"]["same_tokens_as_refimpl_eager"] is True


def test_quick_model_has_smollm2_shapes():
    model = bench.build_model(torch.device("cpu"), quick=True)
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads) == (576, 1536, 9, 3)
    assert config.num_hidden_layers == 2 and config.vocab_size == 1024
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device_is_rejected(device, tmp_path, capsys):
    with pytest.raises(ValueError, match=device):
        bench.run_benchmarks(tmp_path / "out.json", device=device, quick=True)
    with pytest.raises(SystemExit):
        bench.main(["--device", device, "--out", str(tmp_path / "out.json")])
    assert device in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench.run_benchmarks(tmp_path / "out.json", device="cuda", quick=True)


def _greedy_both(step, tiny_llama, prompt_len=5, n_new=6):
    decoder = Decoder.from_hf(tiny_llama)
    cache = decoder.new_cache(batch_size=1, max_len=prompt_len + n_new)
    prompt = torch.randint(0, 128, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = bench.greedy_decoder(decoder, cache, prompt, n_new)
        static = step(decoder, cache)
        tokens = bench.greedy_static(static, decoder, cache, prompt, n_new)
    return reference, tokens


def test_static_step_matches_decoder(tiny_llama):
    reference, tokens = _greedy_both(bench.StaticDecodeStep, tiny_llama)
    assert torch.equal(tokens, reference)


def test_static_step_traces_as_one_graph(tiny_llama):
    """What the CUDA run compiles: the static step must trace without a graph break (fullgraph)."""
    torch._dynamo.reset()
    reference, tokens = _greedy_both(
        lambda d, c: torch.compile(bench.StaticDecodeStep(d, c), backend="eager", fullgraph=True), tiny_llama)
    assert torch.equal(tokens, reference)


def test_static_step_logits_equal_decoder_logits(tiny_llama):
    decoder = Decoder.from_hf(tiny_llama)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = decoder.new_cache(batch_size=1, max_len=10)
        decoder(ids[:, :6], cache)
        expected = decoder(ids[:, 6:], cache, logits_to_keep=1).argmax(-1)
        cache.truncate(0)
        decoder(ids[:, :6], cache)
        token = bench.StaticDecodeStep(decoder, cache)(ids[:, 6:], torch.tensor([6]))
    assert torch.equal(token, expected)


def test_prune_2_4_keeps_two_largest_of_four():
    weight = torch.tensor([[1.0, -4.0, 3.0, 0.5, 0.1, 0.2, -0.3, 0.4]])
    assert torch.equal(bench.prune_2_4(weight), torch.tensor([[0.0, -4.0, 3.0, 0.0, 0.0, 0.0, -0.3, 0.4]]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
@pytest.mark.parametrize("backend", list(bench.SPARSE_BACKENDS))
def test_sparse_backend_unavailable_is_a_reason_and_the_flag_is_restored(backend):
    from torch.sparse import SparseSemiStructuredTensor

    before = SparseSemiStructuredTensor._FORCE_CUTLASS
    matrix, reason = bench._to_sparse(bench.prune_2_4(torch.randn(64, 64)).half(), backend)
    assert matrix is None and "RuntimeError" in reason
    assert SparseSemiStructuredTensor._FORCE_CUTLASS == before


def test_int4_groups_round_trip():
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    codes, scales, zeros = bench.quantize_int4_groups(weight, group_size=32)
    assert codes.dtype == torch.int32 and codes.min() >= 0 and codes.max() <= 15
    dequantized = bench.dequantize_int4_groups(codes, scales, zeros, group_size=32)
    # Rounding to the nearest of 16 levels: at most half a step off.
    step = scales.repeat_interleave(32, dim=1)
    assert ((dequantized - weight).abs() <= step / 2 + 1e-6).all()


def test_median_time_is_positive():
    assert bench.median_time(lambda: torch.ones(10).sum(), torch.device("cpu"), repeats=3, warmup=1) > 0
