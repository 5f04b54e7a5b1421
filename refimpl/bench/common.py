"""What every benchmark section shares: the device, the model, the timer, and the two ways a kernel
can fail a section, wrong or unavailable.

A section records a kernel as skipped, with the reason, only when this device or torch build lacks it
(:func:`unavailable_reason`: a missing kernel, backend, GPU feature or compiler); any other error is
a bug of the benchmark and stops the run. A kernel that runs is checked against a reference before
it is timed (:func:`checked_timing`): a fast wrong answer is not a result.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any, Callable

import torch
from torch import nn

from refimpl import runtime
from refimpl.runtime import time_calls

#: SmolLM2-135M's architecture (the Hugging Face config of ``HuggingFaceTB/SmolLM2-135M``).
SMOLLM2_135M_CONFIG: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)

#: What ``--quick`` changes: two layers and a small vocabulary (a CPU run of seconds).
QUICK_OVERRIDES: dict[str, Any] = dict(num_hidden_layers=2, vocab_size=1024)


# --- set-up -------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """The benchmark device, a CPU or CUDA device (:func:`refimpl.runtime.resolve_device`; ``None``
    picks CUDA if available): ``ValueError`` naming the device for anything else."""
    resolved = runtime.resolve_device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return resolved


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what inference uses there), float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: how the results name a dtype."""
    return str(dtype).removeprefix("torch.")


def build_model(device: torch.device, quick: bool = False, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` with SmolLM2-135M's config (``quick``: 2 layers, vocabulary 1024) and
    random weights, in eval mode, in :func:`compute_dtype` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(SMOLLM2_135M_CONFIG, **(QUICK_OVERRIDES if quick else {}))
    # No end-of-sequence token: generate() must produce exactly the tokens asked for.
    llama_config = LlamaConfig(**config, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config)
    return model.to(compute_dtype(device)).eval()


# --- timing -------------------------------------------------------------------------------------


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 2,
                max_inner: int = 100) -> float:
    """Median seconds per call of ``fn()`` (:func:`refimpl.runtime.time_calls`): after ``warmup``
    untimed calls, each of the ``repeats`` timed repeats runs ``fn`` often enough to last about 10 ms,
    at most ``max_inner`` times, between two device synchronizations."""
    if not callable(fn):
        raise TypeError("fn must be callable")
    return statistics.median(time_calls(lambda _: fn(), device, repeats, warmup, min_repeat_s=0.01,
                                        max_inner=max_inner))


# --- wrong or unavailable -----------------------------------------------------------------------


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """``||out - reference|| / ||reference||`` (Frobenius, in float32)."""
    out, reference = out.float(), reference.float()
    return ((out - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def check_close(name: str, out: torch.Tensor, reference: torch.Tensor, tolerance: float) -> float:
    """The :func:`relative_error` of ``out``; ``AssertionError`` naming the kernel ``name`` when it is
    not finite or exceeds ``tolerance``."""
    error = relative_error(out, reference)
    if not math.isfinite(error) or error > tolerance:
        raise AssertionError(f"{name}: relative error {error:.3g} against the reference exceeds {tolerance}")
    return error


#: What torch's errors say when this device or build lacks a kernel, a backend, a GPU feature or a
#: compiler (each operator words it its own way), searched in ``"<type name>: <message>"``.
_UNAVAILABLE = re.compile(r"could not run|not implemented|not supported|no kernel|no available kernel|"
                          r"only supported|supports only|requires|sm_?\d|compute capability|cuda capability|"
                          r"backend|architecture|is only available|compiler|compileerror|triton|cudagraph|"
                          r"inductor", re.IGNORECASE)


def unavailable_reason(exc: BaseException) -> str | None:
    """Why ``exc`` means that this device or torch build cannot run a kernel (``NotImplementedError``,
    or a ``RuntimeError`` about a missing kernel, backend, GPU feature or compiler, torch.compile's
    included): ``"<type>: <message>"``, the message cut to 300 characters. ``None`` for any other error,
    which must not be hidden, and for running out of memory, which is no missing kernel."""
    # Unsupported is a graph break under torch.compile(fullgraph=True): a bug of the traced code.
    if isinstance(exc, (torch._dynamo.exc.Unsupported, torch.OutOfMemoryError)):
        return None
    name = type(exc).__name__
    if isinstance(exc, NotImplementedError) or (isinstance(exc, RuntimeError)
                                                and _UNAVAILABLE.search(f"{name}: {exc}")):
        return f"{name}: {str(exc)[:300]}"
    return None


def attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, reason)`` when ``fn`` fails because the device lacks the kernel
    (:func:`unavailable_reason`; any other error propagates)."""
    try:
        return fn(), None
    except (NotImplementedError, RuntimeError) as exc:
        reason = unavailable_reason(exc)
        if reason is None:
            raise
        return None, reason


def checked_timing(name: str, run: Callable[[], torch.Tensor], reference: torch.Tensor,
                   device: torch.device) -> dict[str, Any] | str:
    """Run a kernel once and check it against ``reference`` (:func:`check_close`, 2 %), then time it:
    ``{"ms", "relative_error"}``; the skip reason instead if the device cannot run it."""
    out, reason = attempt(run)
    if reason is not None:
        return reason
    error = check_close(name, out, reference, 2e-2)
    return {"ms": 1e3 * median_time(run, device, repeats=7, warmup=3), "relative_error": error}
