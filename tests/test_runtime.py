"""refimpl.runtime: the pinned CPU instruction set, seeds, threads and progress bars."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from refimpl import runtime


def test_pin_cpu_isa_keeps_a_cap_the_environment_already_sets(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    for name in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    runtime.pin_cpu_isa()
    assert os.environ["ATEN_CPU_CAPABILITY"] == "default"
    assert os.environ["MKL_ENABLE_INSTRUCTIONS"] == "AVX2" and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_setup_caps_a_fresh_process_at_avx2():
    env = {k: v for k, v in os.environ.items() if k not in runtime.CPU_ISA}
    code = ("import torch; from refimpl import runtime; runtime.setup(seed=0, threads=1); "
            "torch.ones(4).sum(); print(torch.backends.cpu.get_cpu_capability())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert not out.stdout.strip().startswith("AVX512"), out.stdout
    assert "already chose" not in out.stderr


def test_setup_warns_when_the_kernels_were_chosen_before_it():
    env = {k: v for k, v in os.environ.items() if k not in runtime.CPU_ISA}
    code = ("import torch; torch.ones(4).sum(); "
            "from refimpl import runtime; runtime.setup(seed=0, threads=1)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    if subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                      env=env, capture_output=True, text=True, check=True).stdout.startswith("AVX512"):
        assert "already chose" in out.stderr
    else:
        assert "already chose" not in out.stderr


def test_setup_seeds_and_fixes_threads():
    threads = torch.get_num_threads()
    try:
        runtime.setup(seed=3, threads=1, progress=False)
        first = torch.rand(3)
        runtime.setup(seed=3, threads=1, progress=False)
        assert torch.equal(first, torch.rand(3)) and torch.get_num_threads() == 1
        assert not runtime.progress_enabled()
        assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() >= logging.ERROR  # quiet
    finally:
        torch.set_num_threads(threads)
        os.environ["REFIMPL_PROGRESS"] = "0"


@pytest.mark.parametrize("kwargs, match", [({"seed": 1.5}, "seed"), ({"threads": 0}, "threads"),
                                           ({"threads": True}, "threads")])
def test_setup_rejects_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        runtime.setup(**kwargs)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "meta", 3])
def test_resolve_device_names_what_it_rejects(device):
    with pytest.raises(ValueError, match="device"):
        runtime.resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_is_rejected():
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.resolve_device("cuda")
    assert runtime.resolve_device(None) == torch.device("cpu")


def test_cpu_device_and_its_name():
    assert runtime.resolve_device("cpu") == runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")
    name = runtime.device_name(torch.device("cpu"))
    assert name.startswith("cpu (") and runtime.cpu_name() in name
    runtime.synchronize(torch.device("cpu"))  # nothing to wait for


def test_progress_bar_counts_what_it_is_told(monkeypatch, capsys):
    monkeypatch.setenv("REFIMPL_PROGRESS", "1")
    with runtime.progress_bar(5, desc="rounds") as bar:
        bar.update(3)
        bar.update(2)
        assert bar.n == 5
    assert "rounds" in capsys.readouterr().err
    monkeypatch.setenv("REFIMPL_PROGRESS", "0")
    with runtime.progress_bar(5, desc="silent") as bar:
        bar.update(5)
    assert capsys.readouterr().err == ""
