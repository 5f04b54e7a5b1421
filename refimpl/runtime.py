"""Run-time settings shared by every chapter: determinism, devices, timing and progress bars.

Every notebook starts with :func:`setup`, which fixes the random seeds and the number of CPU threads
(floating-point sums depend on how work is split between threads, so a fixed thread count makes a
run repeat itself digit for digit on one machine), and switches progress bars off, because their
text (rates, elapsed times) would differ between runs and fail the notebook validation. Another
machine still adds in another order (its vector units, its BLAS); what the stored figures hold
across machines is the rule of :mod:`refimpl.reproducibility`. Scripts and tests keep progress bars
on unless the environment variable ``REFIMPL_PROGRESS`` is ``0``.

The model helpers every family needs live here too: :func:`model_device` (where a model's
parameters are) and :func:`eval_mode` (dropout off for a measurement or a teacher's forward pass,
then the mode the model came in).

:func:`time_calls` is the one timer of the package: the speed measurements of
:mod:`refimpl.evaluate` and the GPU benchmarks of :mod:`refimpl.bench` both use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from refimpl._validation import check_non_negative_int, check_positive_int

T = TypeVar("T")

_PROGRESS_ENV = "REFIMPL_PROGRESS"


def cache_dir() -> Path:
    """refimpl's user cache directory: ``$REFIMPL_CACHE`` if set, else ``$XDG_CACHE_HOME/refimpl``
    (default ``~/.cache/refimpl``). Converted models and extracted corpora are kept there."""
    if os.environ.get("REFIMPL_CACHE"):
        return Path(os.environ["REFIMPL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "refimpl"


def setup(seed: int = 0, threads: int | None = 2, progress: bool = False) -> None:
    """Seed Python and PyTorch, fix the CPU thread count and choose whether progress bars show.

    Args:
        seed: seed for :mod:`random` and :mod:`torch` (CPU and CUDA).
        threads: number of intra-op CPU threads; ``None`` leaves PyTorch's default.
        progress: show tqdm progress bars in refimpl's long loops.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if threads is not None:
        torch.set_num_threads(threads)
    os.environ[_PROGRESS_ENV] = "1" if progress else "0"
    # Library chatter on stderr would otherwise become part of a notebook's stored outputs.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # bitsandbytes warns, on CPUs with AVX-512 BF16 only, that an optional hub-downloaded kernel is missing.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; ``None`` picks CUDA if available, else the CPU.

    Raises ``ValueError`` naming the device if it is not one (``"tpu"``, ``"cuda:x"``), is CUDA where
    none is available or beyond the devices there are, holds no data (``"meta"``), or cannot allocate.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but CUDA is not available here "
                             f"(torch {torch.__version__}); use 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "meta":
        raise ValueError(f"device {device!r} holds no data: measure on 'cpu' or a GPU")
    elif resolved.type != "cpu":
        try:
            torch.empty(1, device=resolved)
        except Exception as exc:  # noqa: BLE001 - any failure means the device cannot be used
            raise ValueError(f"device {device!r} cannot be used here: {exc}") from None
    return resolved


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters") from None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) inside the block, then back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``"cpu (<processor>)"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()})"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA kernels run asynchronously, so a timer must wait for
    them before it reads the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(run: Callable[[Any], Any], device: torch.device, repeats: int, warmup: int,
               prepare: Callable[[], Any] = lambda: None, desc: str | None = None, min_repeat_s: float = 0.0,
               max_inner: int = 1) -> list[float]:
    """Seconds per call of ``run(prepare())`` in each of ``repeats`` timed repeats.

    ``warmup`` untimed calls come first. Each repeat calls ``prepare()`` untimed, then times ``run`` on
    its result between two :func:`synchronize` calls, with ``time.perf_counter``. With
    ``min_repeat_s > 0`` one more timed call estimates the cost, and every repeat then calls ``run``
    (on the same prepared state) often enough to last about ``min_repeat_s``, at most ``max_inner``
    times, and counts the mean per call: a fast kernel outlasts the timer's resolution that way.
    ``desc`` names a progress bar over the repeats (none when ``None``).
    """
    if not callable(run) or not callable(prepare):
        raise TypeError("run and prepare must be callable")
    check_positive_int("repeats", repeats)
    check_non_negative_int("warmup", warmup)
    check_positive_int("max_inner", max_inner)
    if not isinstance(min_repeat_s, (int, float)) or isinstance(min_repeat_s, bool) or not min_repeat_s >= 0:
        raise ValueError(f"min_repeat_s must be a number >= 0, got {min_repeat_s!r}")
    for _ in range(warmup):
        run(prepare())
    inner = 1
    if min_repeat_s > 0:
        state = prepare()
        synchronize(device)
        start = time.perf_counter()
        run(state)
        synchronize(device)
        estimate = time.perf_counter() - start
        inner = max(1, min(max_inner, int(min_repeat_s / max(estimate, 1e-9))))
    times = []
    for _ in range(repeats) if desc is None else progress(range(repeats), desc=desc, total=repeats):
        state = prepare()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            run(state)
        synchronize(device)
        times.append((time.perf_counter() - start) / inner)
    return times


def progress_enabled() -> bool:
    """Whether refimpl's loops show progress bars (environment variable ``REFIMPL_PROGRESS``)."""
    return os.environ.get(_PROGRESS_ENV, "1") != "0"


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm progress bar unless progress bars are switched off."""
    if not progress_enabled():
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=False)


def progress_bar(total: int, desc: str) -> Any:
    """A progress bar advanced by hand, ``bar.update(n)``, for loops whose steps do unequal work (a
    round of speculative decoding writes one token or several); a context manager. Silent when
    progress bars are off."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not progress_enabled())
