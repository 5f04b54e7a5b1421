"""refimpl.bench: the GPU benchmarks, run in --quick mode on the CPU (its CUDA-only sections must
record why they were skipped), both command lines, and the helpers of its sections: the 2:4 weight,
int4 groups, the timer, and which errors mean an unavailable kernel. (The static decode step it times
is tested in tests/test_decoding_static.py.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from refimpl import __main__ as cli
from refimpl.bench import common, run, sparse_2_4, weight_only
from refimpl.pruning.masks import nm_mask


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
    returned = run.main(["--quick", "--device", "cpu", "--out", str(out)])
    return returned, json.loads(out.read_text())


def test_quick_cpu_run_writes_every_section(quick_cpu_results):
    returned, results = quick_cpu_results
    assert results == json.loads(json.dumps(returned))
    for key in ("device", "torch", "transformers", "date", "command"):
        assert isinstance(results[key], (str, list)) and results[key], key
    assert results["quick"] is True and results["complete"] is True
    assert results["torch"] == torch.__version__
    assert results["command"][1:] == ["--quick", "--device", "cpu", "--out", results["command"][-1]]
    for section in run.SECTIONS:
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
    model = common.build_model(torch.device("cpu"), quick=True)
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads) == (576, 1536, 9, 3)
    assert config.num_hidden_layers == 2 and config.vocab_size == 1024
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device_is_rejected(device, tmp_path, capsys):
    with pytest.raises(ValueError, match=device):
        run.run_benchmarks(tmp_path / "out.json", device=device, quick=True)
    with pytest.raises(SystemExit):
        run.main(["--device", device, "--out", str(tmp_path / "out.json")])
    assert device in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        run.run_benchmarks(tmp_path / "out.json", device="cuda", quick=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
@pytest.mark.parametrize("backend", list(sparse_2_4.SPARSE_BACKENDS))
def test_sparse_backend_unavailable_is_a_reason_and_the_flag_is_restored(backend):
    from torch.sparse import SparseSemiStructuredTensor

    before = SparseSemiStructuredTensor._FORCE_CUTLASS
    weight = torch.randn(64, 64)
    matrix, reason = sparse_2_4.to_sparse((weight * nm_mask(weight.abs(), (2, 4))).half(), backend)
    assert matrix is None and "RuntimeError" in reason
    assert SparseSemiStructuredTensor._FORCE_CUTLASS == before


def test_int4_groups_round_trip():
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    codes, scales, zeros = weight_only.quantize_int4_groups(weight, group_size=32)
    assert codes.dtype == torch.int32 and codes.min() >= 0 and codes.max() <= 15
    dequantized = weight_only.dequantize_int4_groups(codes, scales, zeros, group_size=32)
    # Rounding to the nearest of 16 levels: at most half a step off.
    step = scales.repeat_interleave(32, dim=1)
    assert ((dequantized - weight).abs() <= step / 2 + 1e-6).all()


def test_median_time_is_positive():
    assert common.median_time(lambda: torch.ones(10).sum(), torch.device("cpu"), repeats=3, warmup=1) > 0


def test_median_time_rejects_non_callables():
    with pytest.raises(TypeError, match="fn"):
        common.median_time("not a function", torch.device("cpu"))


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize("exc", [
    NotImplementedError("aten::_weight_int4pack_mm is not implemented for the CPU backend"),
    RuntimeError("sparse_semi_structured_mad_op : Supported only on GPUs with compute capability 8.x"),
    RuntimeError("No available kernel. Aborting execution."),
    torch._inductor.exc.InvalidCxxCompiler(),
    torch._inductor.exc.CppCompileError(["g++"], "fatal error: Python.h: No such file or directory"),
], ids=["not-implemented", "capability", "sdpa-backend", "no-compiler", "compile-error"])
def test_a_missing_kernel_or_compiler_is_a_reason(exc):
    reason = common.unavailable_reason(exc)
    assert reason.startswith(f"{type(exc).__name__}: ") and len(reason) <= len(type(exc).__name__) + 2 + 300
    assert common.attempt(lambda: _raise(exc)) == (None, reason)


@pytest.mark.parametrize("exc", [
    RuntimeError("The size of tensor a (4) must match the size of tensor b (5) at non-singleton dimension 1"),
    ValueError("weight requires a 2-D tensor"),  # not a RuntimeError: a bug of the benchmark
    torch.OutOfMemoryError("CUDA out of memory. The kernel requires 2.00 GiB"),
    torch._dynamo.exc.Unsupported("not supported: a data-dependent branch"),  # a graph break
], ids=["shape-bug", "value-error", "out-of-memory", "graph-break"])
def test_other_errors_are_not_hidden(exc):
    assert common.unavailable_reason(exc) is None
    with pytest.raises(type(exc)):
        common.attempt(lambda: _raise(exc))


def test_attempt_returns_the_result():
    assert common.attempt(lambda: 42) == (42, None)


def test_both_command_lines_reach_the_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0 and "--quick" in capsys.readouterr().out
    module = subprocess.run([sys.executable, "-m", "refimpl.bench", "--help"], capture_output=True, text=True,
                            check=True)
    assert "--quick" in module.stdout
