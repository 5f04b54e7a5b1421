"""refimpl.runtime: the pinned CPU instruction set, seeds, threads and progress bars."""

from __future__ import annotations

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
    finally:
        torch.set_num_threads(threads)
        os.environ["REFIMPL_PROGRESS"] = "0"


@pytest.mark.parametrize("kwargs, match", [({"seed": 1.5}, "seed"), ({"threads": 0}, "threads"),
                                           ({"threads": True}, "threads")])
def test_setup_rejects_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        runtime.setup(**kwargs)
