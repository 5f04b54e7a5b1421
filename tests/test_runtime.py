"""refimpl.runtime: seeds, threads, devices and progress bars."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from refimpl import runtime


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


def test_time_calls_warms_up_then_times_each_prepared_state():
    states, runs = iter(range(100)), []
    times = runtime.time_calls(runs.append, torch.device("cpu"), repeats=3, warmup=2, prepare=lambda: next(states))
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert runs == [0, 1, 2, 3, 4]  # two warm-up calls, then one timed call per repeat, each on its own state


def test_time_calls_repeats_a_fast_call_to_last_min_repeat_s():
    runs = []
    times = runtime.time_calls(runs.append, torch.device("cpu"), repeats=2, warmup=0, min_repeat_s=0.5, max_inner=7)
    # One timed estimate, then max_inner calls per repeat: appending to a list takes far less than 0.5 s / 7.
    assert len(runs) == 1 + 2 * 7 and len(times) == 2


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(repeats=0), ValueError, "repeats"), (dict(warmup=-1), ValueError, "warmup"),
    (dict(max_inner=0), ValueError, "max_inner"), (dict(min_repeat_s=-1.0), ValueError, "min_repeat_s"),
    (dict(prepare=None), TypeError, "prepare"),
])
def test_time_calls_checks_its_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        runtime.time_calls(lambda _: None, torch.device("cpu"), **{"repeats": 1, "warmup": 0, **kwargs})
