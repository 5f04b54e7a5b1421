"""Peer check: refimpl's compression methods against a production library, llmcompressor.

Each method is applied twice to fresh copies of SmolLM2-135M-Instruct — by refimpl and by llmcompressor,
with the settings matched as far as the two libraries allow (:func:`settings` lists them side by side,
and what could not be matched) — on the same calibration blocks, and both results are scored on the
same evaluation blocks. What comes out is, per method and corpus, each side's perplexity with its 95 %
interval and the perplexity ratio refimpl / llmcompressor with a paired block-bootstrap interval: a
ratio whose interval includes 1 says that the two implementations are indistinguishable at this
evaluation size. Each compression is timed (wall seconds), the two libraries alternated method by method.

Runs in the optional peer environment, not the main one (llmcompressor pins an older transformers):

    bash scripts/make_peers_env.sh
    .venv-peers/bin/python scripts/peers.py            # all methods -> results/peers/llmcompressor.json
    .venv-peers/bin/python scripts/peers.py --quick    # smoke test  -> results/peers/llmcompressor-quick.json

On a busy machine, run it as ``nice -n 19 env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE ...``, and
read its seconds as measured under that load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from refimpl import data, evaluate, models, runtime  # noqa: E402
from refimpl.effects.run import git_state  # noqa: E402
from refimpl.pruning import sparsegpt, wanda  # noqa: E402
from refimpl.quantization import activation, awq, gptq, smoothquant, uniform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
SEQ_LEN = 512
CALIBRATION_BLOCKS = 16  # per corpus: 2 corpora -> 32 calibration samples of SEQ_LEN tokens
EVALUATION_BLOCKS = 16  # per corpus
QUICK = {"calibration_blocks": 2, "evaluation_blocks": 4, "methods": ("gptq", "wanda")}
CONFIDENCE = 0.95
RESAMPLES = 10_000
BATCH_SIZE = 8  # blocks per forward pass, both libraries

GROUP = 64  # refimpl.effects.recipes.GROUP: SmolLM2's own Q4_1 grid uses groups of 32 (chapter 00)
SPARSITY = 0.5  # refimpl.effects.recipes.SPARSITY
SMOOTHQUANT_ALPHA = 0.8  # refimpl.effects.recipes.smoothquant_w8a8
AWQ_GRID = 20  # both libraries' default grid size (the effects row uses 10 to save time)
BLOCK_SIZE = 128  # GPTQ / SparseGPT lazy-update block, both defaults
DAMP = 0.01  # GPTQ / SparseGPT dampening, both defaults

METHODS = ("gptq", "awq", "smoothquant", "smoothquant-row", "sparsegpt", "wanda")


# --- settings, side by side ---------------------------------------------------------------------

W4_UNMATCHED = (
    "group parameters: both take the group's min and max widened to include 0, round the scale to float16 "
    "and the zero-point to an integer; refimpl computes the zero-point from the rounded scale, "
    "compressed-tensors from the unrounded one (a zero-point can differ by one step)",
)


def settings(method: str) -> dict[str, Any]:
    """What each library is asked to do for ``method``, in plain words and numbers, and every setting
    that could not be matched (``unmatched``), with the reason. The recipe functions below build
    exactly these; the test of the peer environment checks the two against each other."""
    calibration = {"samples": "the protocol's calibration blocks (the same tensor for both libraries)",
                   "pipeline": "sequential: decoder layer by decoder layer, each calibrated on the outputs "
                               "of the already compressed layers before it"}
    quant_w4 = {"bits": 4, "symmetric": False, "group_size": GROUP, "scale_dtype": "float16",
                "zero_point": "rounded to an integer", "skip": ["lm_head"]}
    if method == "gptq":
        return {
            "refimpl": {"call": "gptq.quantize_model_gptq(model, blocks, uniform.Grid(4, symmetric=False, "
                                f"group_size={GROUP}), act_order=True)",
                        **quant_w4, "act_order": "static groups (scales from the original weights), columns "
                                                 "by decreasing diag(H)", "block_size": BLOCK_SIZE, "damp": DAMP,
                        **calibration},
            "llmcompressor": {"call": "GPTQModifier(config_groups={'group_0': QuantizationScheme(targets=['Linear'], "
                                      f"weights=QuantizationArgs(num_bits=4, type='int', symmetric=False, "
                                      f"strategy='group', group_size={GROUP}, actorder='static', "
                                      "scale_dtype=torch.float16))}, ignore=['lm_head'], "
                                      f"block_size={BLOCK_SIZE}, dampening_frac={DAMP})",
                              **quant_w4, "act_order": "'static' (= 'weight'): group scales from the original "
                                                       "weights, columns by decreasing diag(H)",
                              "block_size": BLOCK_SIZE, "damp": DAMP, "observer": "minmax", **calibration},
            "unmatched": [
                "q/k/v and gate/up: refimpl runs one column loop over the stacked weights of the layers that "
                "share an input, llmcompressor one per layer; GPTQ treats every row on its own, so the result "
                "is the same up to floating-point order",
                *W4_UNMATCHED,
            ],
        }
    if method == "awq":
        return {
            "refimpl": {"call": "awq.quantize_model_awq(model, blocks, uniform.Grid(4, symmetric=False, "
                                f"group_size={GROUP}), n_grid={AWQ_GRID})",
                        **quant_w4, "scales": "s = mean|x|^alpha, alpha in {0, 1/n, ..., (n-1)/n}",
                        "objective": "summed output error of the linear layers that share the scale",
                        "scaled_sets": ["q,k,v", "o (scale kept as input_scale)", "gate,up",
                                        "down (scale kept as input_scale)"],
                        "clipping_search": False, **calibration},
            "llmcompressor": {"call": f"[AWQModifier(duo_scaling=False, n_grid={AWQ_GRID}), QuantizationModifier("
                                      "config_groups={'group_0': QuantizationScheme(targets=['Linear'], "
                                      "weights=QuantizationArgs(num_bits=4, type='int', symmetric=False, "
                                      f"strategy='group', group_size={GROUP}, scale_dtype=torch.float16))}}, "
                                      "ignore=['lm_head'])]",
                              **quant_w4, "scales": "s = mean|x|^alpha, alpha in {0, 1/(n-1), ..., 1}",
                              "objective": "mean squared error of the output of the module holding the layers "
                                           "(the attention block for q,k,v and o; the MLP for gate,up and down)",
                              "scaled_sets": ["q,k,v", "gate,up", "down (folded into up_proj's rows)"],
                              "clipping_search": False, "observer": "minmax", **calibration},
            "unmatched": [
                "o_proj: llmcompressor skips the v_proj -> o_proj pair under grouped-query attention (v_proj has "
                "192 outputs, o_proj 576 inputs; the AWQ authors skip it too) and rounds o_proj to nearest; "
                "refimpl scales o_proj anyway and stores the scale beside the layer",
                "search objective: per-layer output error (refimpl) against the enclosing module's output MSE "
                "(llmcompressor), which also sees the attention scores and the SiLU gate",
                "alpha grid: refimpl's 20 points stop at 0.95, llmcompressor's 20 reach 1.0",
                *W4_UNMATCHED,
            ],
        }
    if method in ("smoothquant", "smoothquant-row"):
        row = method == "smoothquant-row"
        smoothed = ["input_layernorm -> q,k,v", "post_attention_layernorm -> gate,up"]
        unmatched = [
            "llmcompressor's preset W8A8 scheme (what its SmoothQuant examples use) is per-channel int8 weights "
            "with dynamic per-token int8 activations; here its activations are set to one scale per tensor, "
            "dynamic, as in refimpl's effects row (refimpl's per-token variant would be act_grid=Grid(8, "
            "per='token'))",
            "the effects row's activation ranges are dynamic per tensor (quantize_model_w8a8's static=False), "
            "not static calibrated ranges; both sides here are dynamic",
            "activation statistic: refimpl uses max|x| per channel (the paper), llmcompressor the range max - min "
            "per channel, and it doubles max|W| in the factor (a constant that rescales all factors alike)",
            "int8 range: refimpl's symmetric grid is -127..127 with scale absmax/127, compressed-tensors' "
            "-128..127 with scale absmax/127.5",
            "calibration: refimpl takes every factor from the unmodified model; llmcompressor's sequential "
            "pipeline takes a layer's statistics from the outputs of the layers before it as already modified",
            "llmcompressor's SmoothQuant examples follow it with GPTQ; both sides here round the weights to nearest",
        ]
        if row:
            unmatched.insert(0, "down_proj: refimpl's effects row also smooths down_proj's input (smooth_down_proj="
                             "True, folded into up_proj's rows, with factors from down_proj's input act(gate)*up); "
                             "llmcompressor measures a mapping's activations at the output of the layer that "
                             "absorbs the factors, which for up_proj is not down_proj's input, so it cannot "
                             "compute these factors and keeps its default mappings: this pair compares the "
                             "effects row with llmcompressor's own SmoothQuant, not like with like")
        return {
            "refimpl": {"call": f"smoothquant.smooth_model(model, blocks, {SMOOTHQUANT_ALPHA}, smooth_down_proj={row})"
                                "; activation.quantize_model_w8a8(smoothed, act_grid=uniform.Grid(8, per='tensor'))",
                        "alpha": SMOOTHQUANT_ALPHA,
                        "smoothed": smoothed + (["up_proj -> down_proj"] if row else []),
                        "activation_statistic": "max |x| per channel",
                        "weights": "int8, symmetric, per output channel, round to nearest (range -127..127)",
                        "activations": "int8, symmetric, one scale per tensor, dynamic (computed on every "
                                       "forward pass)", "skip": ["lm_head"],
                        "samples": calibration["samples"],
                        "pipeline": "factors from the unmodified model's activations"},
            "llmcompressor": {"call": f"[SmoothQuantModifier(smoothing_strength={SMOOTHQUANT_ALPHA}), "
                                      "QuantizationModifier(config_groups={'group_0': QuantizationScheme("
                                      "targets=['Linear'], weights=QuantizationArgs(num_bits=8, type='int', "
                                      "symmetric=True, strategy='channel'), input_activations=QuantizationArgs("
                                      "num_bits=8, type='int', symmetric=True, strategy='tensor', dynamic=True))}, "
                                      "ignore=['lm_head'])]",
                              "alpha": SMOOTHQUANT_ALPHA,
                              "smoothed": smoothed + ["(its default Llama mappings)"],
                              "activation_statistic": "max x - min x per channel",
                              "weights": "int8, symmetric, per output channel, round to nearest (range "
                                         "-128..127, scale absmax / 127.5)",
                              "activations": "int8, symmetric, one scale per tensor, dynamic",
                              "skip": ["lm_head"], **calibration},
            "unmatched": unmatched,
        }
    if method in ("sparsegpt", "wanda"):
        common = {"sparsity": SPARSITY, "pattern": "unstructured", "skip": ["lm_head"], **calibration}
        if method == "sparsegpt":
            return {
                "refimpl": {"call": f"sparsegpt.prune_model_sparsegpt(model, blocks, {SPARSITY})", **common,
                            "mask": f"chosen every {BLOCK_SIZE} columns over all rows of the block (adaptive "
                                    "mask selection)", "block_size": BLOCK_SIZE, "damp": DAMP},
                "llmcompressor": {"call": f"SparseGPTModifier(sparsity={SPARSITY}, mask_structure='0:0', "
                                          f"block_size={BLOCK_SIZE}, dampening_frac={DAMP}, ignore=['re:.*lm_head'])",
                                  **common, "mask": f"chosen every {BLOCK_SIZE} columns over all rows of the block",
                                  "block_size": BLOCK_SIZE, "damp": DAMP},
                "unmatched": [],
            }
        return {
            "refimpl": {"call": f"wanda.prune_model_wanda(model, blocks, {SPARSITY})", **common,
                        "score": "|W| * ||x||_2 per input channel, compared within each output row"},
            "llmcompressor": {"call": f"WandaPruningModifier(sparsity={SPARSITY}, mask_structure='0:0', "
                                      "ignore=['re:.*lm_head'])", **common,
                              "score": "|W| * ||x||_2 per input channel, compared within each output row"},
            "unmatched": [],
        }
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# --- refimpl's side -----------------------------------------------------------------------------


def apply_refimpl(method: str, model: torch.nn.Module, blocks: torch.Tensor) -> torch.nn.Module:
    """``method`` by refimpl, calibrated on token ``blocks`` layer by layer (sequential), in place."""
    w4 = uniform.Grid(4, symmetric=False, group_size=GROUP)
    if method == "gptq":
        return gptq.quantize_model_gptq(model, blocks, w4, block_size=BLOCK_SIZE, damp=DAMP, act_order=True,
                                        batch_size=BATCH_SIZE)
    if method == "awq":
        return awq.quantize_model_awq(model, blocks, w4, n_grid=AWQ_GRID, batch_size=BATCH_SIZE)
    if method in ("smoothquant", "smoothquant-row"):  # -row: the effects row, which also smooths down_proj
        smoothed = smoothquant.smooth_model(model, blocks, SMOOTHQUANT_ALPHA, batch_size=BATCH_SIZE,
                                            smooth_down_proj=method == "smoothquant-row")
        return activation.quantize_model_w8a8(smoothed, act_grid=uniform.Grid(8, per="tensor"))
    if method == "sparsegpt":
        return sparsegpt.prune_model_sparsegpt(model, blocks, SPARSITY, block_size=BLOCK_SIZE, damp=DAMP,
                                               batch_size=BATCH_SIZE)
    if method == "wanda":
        return wanda.prune_model_wanda(model, blocks, SPARSITY, batch_size=BATCH_SIZE)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# --- llmcompressor's side -----------------------------------------------------------------------


def llmcompressor_recipe(method: str) -> list[Any]:
    """The llmcompressor modifiers for ``method`` (see :func:`settings`)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    def w4(actorder: str | None = None) -> dict[str, QuantizationScheme]:
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=GROUP,
                                   actorder=actorder, scale_dtype=torch.float16)
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}

    if method == "gptq":
        return [GPTQModifier(config_groups=w4("static"), ignore=["lm_head"], block_size=BLOCK_SIZE,
                             dampening_frac=DAMP)]
    if method == "awq":
        return [AWQModifier(duo_scaling=False, n_grid=AWQ_GRID),
                QuantizationModifier(config_groups=w4(), ignore=["lm_head"])]
    if method in ("smoothquant", "smoothquant-row"):
        # Its default Llama mappings: norm -> q,k,v and norm -> gate,up. An up_proj -> down_proj mapping
        # would take its factors from up_proj's output, which is not down_proj's input (act(gate) * up).
        w8a8 = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
            input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor",
                                               dynamic=True))
        return [SmoothQuantModifier(smoothing_strength=SMOOTHQUANT_ALPHA),
                QuantizationModifier(config_groups={"group_0": w8a8}, ignore=["lm_head"])]
    if method == "sparsegpt":
        return [SparseGPTModifier(sparsity=SPARSITY, mask_structure="0:0", block_size=BLOCK_SIZE,
                                  dampening_frac=DAMP, ignore=["re:.*lm_head"])]
    if method == "wanda":
        return [WandaPruningModifier(sparsity=SPARSITY, mask_structure="0:0", ignore=["re:.*lm_head"])]
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@contextlib.contextmanager
def cpu_pin_memory() -> Iterator[None]:
    """Pinning a CPU tensor as a no-op, for the duration of one llmcompressor call, on a machine
    without an accelerator.

    llmcompressor's AWQ pins its cached activations (``IntermediatesCache.pin_memory``) so that they
    copy to a GPU faster; without an accelerator ``Tensor.pin_memory`` raises. Pinning only changes
    how host memory is allocated, never a value, so returning the tensor itself computes the same. The
    patch is undone on exit, so refimpl's side never runs under it.
    """
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.pin_memory = original


def apply_llmcompressor(method: str, model: torch.nn.Module, blocks: torch.Tensor) -> torch.nn.Module:
    """``method`` by llmcompressor's ``oneshot``, calibrated on the same token ``blocks`` (in their order,
    all of full length, as llmcompressor wants) with its sequential pipeline, in place."""
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    samples = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in blocks]

    def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([sample[key] for sample in batch]) for key in batch[0]}

    loader = DataLoader(samples, batch_size=BATCH_SIZE, shuffle=False, collate_fn=collate)
    with cpu_pin_memory():
        return oneshot(model=model, dataset=loader, recipe=llmcompressor_recipe(method), pipeline="sequential",
                       num_calibration_samples=len(blocks), max_seq_length=blocks.shape[1])


# --- measurement --------------------------------------------------------------------------------


def calibration_blocks(tokenizer: Any, n_blocks: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """``n_blocks`` blocks of ``seq_len`` tokens of each corpus's calibration split, corpus after corpus:
    ``LongTensor[len(data.CORPORA) * n_blocks, seq_len]``."""
    return torch.cat([data.token_blocks(tokenizer, data.load_text(name, "calibration"), seq_len, n_blocks)
                      for name in data.CORPORA])


def evaluation_blocks(tokenizer: Any, n_blocks: int, seq_len: int = SEQ_LEN) -> dict[str, torch.Tensor]:
    """``n_blocks`` blocks of ``seq_len`` tokens of each corpus's evaluation split, spread evenly over the
    split (:func:`refimpl.data.spread_blocks`: blocks far apart are close to independent, which the block
    bootstrap of the intervals assumes)."""
    return {name: data.spread_blocks(tokenizer, data.load_text(name, "evaluation"), seq_len, n_blocks)
            for name in data.CORPORA}


def _interval(interval: evaluate.Interval) -> dict[str, float]:
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high}


def perplexity_interval(nll: torch.Tensor) -> dict[str, float]:
    """Perplexity of per-block NLLs ``nll`` with its block-bootstrap interval."""
    return _interval(evaluate.perplexity_interval(nll, confidence=CONFIDENCE, n_resamples=RESAMPLES, seed=0))


def ratio_interval(nll: torch.Tensor, reference_nll: torch.Tensor) -> dict[str, float]:
    """Perplexity ratio of ``nll``'s model to ``reference_nll``'s on the same blocks, with its paired
    block-bootstrap interval."""
    return _interval(evaluate.paired_ratio(nll, reference_nll, confidence=CONFIDENCE, n_resamples=RESAMPLES, seed=0))


def score(model: torch.nn.Module, blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: evaluate.block_nll(model, named, batch_size=BATCH_SIZE) for name, named in blocks.items()}


def timed(apply: Callable[[str, torch.nn.Module, torch.Tensor], torch.nn.Module], method: str,
          base: torch.nn.Module, blocks: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """``apply`` on a fresh copy of ``base`` (copied untimed), and its wall seconds."""
    out: list[torch.nn.Module] = []
    seconds = runtime.time_calls(lambda model: out.append(apply(method, model, blocks)), torch.device("cpu"),
                                 repeats=1, warmup=0, prepare=lambda: copy.deepcopy(base))[0]
    return out[0], seconds


def checks(method: str, model: torch.nn.Module, base: torch.nn.Module) -> dict[str, Any]:
    """What the compressed model holds, measured the same way for both sides: the fraction of exactly
    zero weights in the decoder layers' linear layers, whether the (tied) embedding and output layer were
    left alone, and for GPTQ the most distinct values in any group of GROUP inputs of a row (at most 16
    on a 4-bit grid with one scale and zero-point per group). The weights are those the model stores:
    llmcompressor's QuantizationModifier (AWQ, SmoothQuant) keeps float weights and rounds them on every
    forward pass, GPTQ and refimpl store the rounded ones."""
    weights = [m.weight.detach() for name, m in model.named_modules()
               if ".layers." in name and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]
    zeros = sum(int((w == 0).sum()) for w in weights)
    out: dict[str, Any] = {
        "decoder_linear_zero_fraction": zeros / sum(w.numel() for w in weights),
        "embedding_unchanged": bool(torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)),
        "output_layer_unchanged": bool(torch.equal(model.get_output_embeddings().weight,
                                                   base.get_output_embeddings().weight)),
    }
    if method == "gptq":
        out["max_distinct_values_per_group"] = max(
            int(models.distinct_values_per_block(w, GROUP).max()) for w in weights)
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "llmcompressor", "compressed-tensors")}


def run(methods: tuple[str, ...], n_calibration: int, n_evaluation: int, out: Path, argv: list[str]) -> dict:
    runtime.setup(seed=0, threads=None)
    started = time.perf_counter()
    base, tok = models.load_model(MODEL)
    calibration = calibration_blocks(tok, n_calibration)  # [2 * n_calibration, SEQ_LEN]
    evaluation = evaluation_blocks(tok, n_evaluation)
    dense = score(base, evaluation)
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_state(),
        "versions": _versions(),
        "machine": {"cpu": runtime.cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": list(os.getloadavg())},
        "model": MODEL,
        "protocol": {
            "calibration": f"{n_calibration} blocks of {SEQ_LEN} tokens per corpus ({len(calibration)} samples), "
                           "refimpl.data.token_blocks of each corpus's calibration split, the same tensor for both "
                           "libraries",
            "evaluation": f"{n_evaluation} blocks of {SEQ_LEN} tokens per corpus spread evenly over the evaluation "
                          "split (refimpl.data.spread_blocks); per-block mean NLL by refimpl.evaluate.block_nll "
                          "for both libraries' models",
            "intervals": f"{CONFIDENCE:.0%} block bootstrap, {RESAMPLES} resamples, seed 0 "
                         "(refimpl.evaluate.perplexity_interval; the ratios: refimpl.evaluate.paired_ratio, which "
                         "resamples the per-block NLL differences)",
            "timing": "wall seconds of each compression call on a fresh copy of the model (copy untimed), "
                      "refimpl.runtime.time_calls; the two libraries alternate, the first side swapping from "
                      "method to method",
        },
        "dense": {name: perplexity_interval(nll) for name, nll in dense.items()},
        "methods": {},
    }
    sides = {"refimpl": apply_refimpl, "llmcompressor": apply_llmcompressor}
    for index, method in enumerate(methods):
        order = ["refimpl", "llmcompressor"] if index % 2 == 0 else ["llmcompressor", "refimpl"]
        nll, seconds, held = {}, {}, {}
        for side in order:
            print(f"[peers] {method}: {side} ...", flush=True)
            model, seconds[side] = timed(sides[side], method, base, calibration)
            nll[side] = score(model, evaluation)
            held[side] = checks(method, model, base)
            del model
            print(f"[peers] {method}: {side} {seconds[side]:.1f} s, perplexity "
                  + ", ".join(f"{name} {math.exp(v.mean().item()):.3f}" for name, v in nll[side].items()), flush=True)
        result["methods"][method] = {
            "settings": settings(method),
            "order": order,
            "seconds": seconds,
            "checks": held,
            "perplexity": {name: {side: perplexity_interval(nll[side][name]) for side in sides} for name in evaluation},
            "ratio_refimpl_over_llmcompressor": {name: ratio_interval(nll["refimpl"][name], nll["llmcompressor"][name])
                                                 for name in evaluation},
            "ratio_to_dense": {name: {side: ratio_interval(nll[side][name], dense[name]) for side in sides}
                               for name in evaluation},
        }
        write(result, out)  # a partial file survives an interrupted run
    result["total_seconds"] = time.perf_counter() - started
    write(result, out)
    return result


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all; --quick: "
                             f"{','.join(QUICK['methods'])})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK['calibration_blocks']} calibration and {QUICK['evaluation_blocks']} "
                             "evaluation blocks per corpus")
    parser.add_argument("--out", default=None, help="JSON file (default results/peers/llmcompressor[-quick].json)")
    args = parser.parse_args(argv)
    methods = tuple(args.methods.split(",")) if args.methods else (QUICK["methods"] if args.quick else METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    n_calibration = QUICK["calibration_blocks"] if args.quick else CALIBRATION_BLOCKS
    n_evaluation = QUICK["evaluation_blocks"] if args.quick else EVALUATION_BLOCKS
    out = Path(args.out) if args.out else ROOT / "results" / "peers" / (
        "llmcompressor-quick.json" if args.quick else "llmcompressor.json")
    return run(methods, n_calibration, n_evaluation, out, ["scripts/peers.py", *argv])


if __name__ == "__main__":
    main()
