"""Measuring one row: make its model from a fresh copy of the unmodified one (:func:`make`), then
measure bytes, perplexity, KV-cache bytes, zeros and speed (:func:`measure_row`).

Rows are independent: every row starts from a fresh copy with the random seeds reset, so a row
recomputed alone gives the figures of a full run. A combination continues from the model of the row it
starts from; when that row was made earlier in the run and kept (``Context.keep``), a copy is used, and
the combination is charged the seconds that making it took.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from refimpl import data, evaluate, runtime
from refimpl._rollback import private_copy
from refimpl._validation import check_token_ids, vocabulary_size
from refimpl.effects.context import Context, Made, RowSkipped
from refimpl.pruning import masks

if TYPE_CHECKING:
    from refimpl.effects.registry import Row


def make(row: "Row", ctx: Context) -> Made:
    """The model of ``row``: its recipe applied to a fresh copy of ``ctx.base`` (or to the model of the row
    it starts from), with the seconds it took, the calibration it used and its notes. Raises
    :class:`RowSkipped` when a recipe cannot run here."""
    if row.id in ctx.kept:
        kept = ctx.kept[row.id]
        return dataclasses.replace(kept, model=copy.deepcopy(kept.model))
    start = make(row.starts_from, ctx) if row.starts_from is not None else Made(copy.deepcopy(ctx.base))
    with ctx.account() as account, private_copy(start.model):  # no caller holds the copy: no rollback snapshot
        begin = time.perf_counter()
        applied = row.apply(start.model, ctx)
        elapsed = time.perf_counter() - begin
    own_s = applied.recorded_s if applied.recorded_s is not None else elapsed - account.capture_s
    made = Made(applied.model, apply_s=start.apply_s + own_s,
                own_calibration_s=start.own_calibration_s + account.own_calibration_s,
                shared=start.shared | account.shared, notes=start.notes + applied.notes,
                stored_bytes=applied.stored_bytes)
    if row.id in ctx.keep:
        ctx.kept[row.id] = dataclasses.replace(made, model=copy.deepcopy(made.model))
    return made


@torch.inference_mode()
def kv_bytes_per_token(model: nn.Module, block: torch.Tensor, kv_bits: int | None = None) -> float:
    """Bytes per token of the KV cache ``model`` builds over ``block [1, L]``: as float tensors
    (:func:`refimpl.evaluate.cache_bytes`) or packed to ``kv_bits`` (KIVI, :func:`kv_cache.pack_cache`)."""
    check_token_ids("block", block, vocabulary_size(model))
    with runtime.eval_mode(model):
        cache = model(block.to(runtime.model_device(model)), use_cache=True).past_key_values
    if kv_bits is None:
        nbytes = evaluate.cache_bytes(cache)
    else:
        from refimpl.quantization import kv_cache

        nbytes = kv_cache.pack_cache(cache, kv_bits)[1]
    return nbytes / block.shape[1]


def _speed(model: nn.Module, ctx: Context) -> dict[str, float]:
    """Prefill and decode throughput of ``model`` and its speed-up over the unmodified model, timed in
    alternation with it (:func:`refimpl.evaluate.side_by_side`)."""
    p = ctx.protocol
    prompt = ctx.eval_blocks[data.CORPORA[0]][:1, :p.prefill_tokens]  # [1, prefill_tokens]
    contestants = {"dense": ctx.base, "row": model}
    prefill = evaluate.side_by_side(
        contestants, lambda m: evaluate.prefill_latency(m, prompt, repeats=1, warmup=0),
        rounds=p.timing_rounds, warmup_rounds=p.timing_warmup_rounds)
    decode = evaluate.side_by_side(
        contestants, lambda m: evaluate.decode_latency(m, prompt[:, :p.decode_prompt], n_tokens=p.decode_tokens,
                                                       repeats=1, warmup=0),
        rounds=p.timing_rounds, warmup_rounds=p.timing_warmup_rounds)
    return dict(prefill_tokens_per_s=prefill["row"].tokens_per_s, decode_tokens_per_s=decode["row"].tokens_per_s,
                prefill_speedup=prefill["dense"].median_s / prefill["row"].median_s,
                decode_speedup=decode["dense"].median_s / decode["row"].median_s)


def measure_row(row: "Row", ctx: Context, timing: bool = True, paired: bool = True) -> dict[str, Any]:
    """Make ``row``'s model (:func:`make`) and measure it (without the speed columns when ``timing`` is
    False, without the ratio to the unmodified model — which needs that model's NLL, one more
    evaluation — when ``paired`` is False). Returns the row's values (see
    :data:`refimpl.effects.table.COLUMNS`); a recipe that raises :class:`RowSkipped` gives
    ``status="skipped"`` and its reason."""
    ctx.begin_row()
    values: dict[str, Any] = {"row": row.id, "method": row.method, "family": row.family, "settings": row.settings,
                              "status": "ok", "reason": ""}
    try:
        made = make(row, ctx)
    except RowSkipped as skipped:
        values.update(status="skipped", reason=str(skipped))
        return values
    model = made.model.eval()
    reference_nll = ctx.reference_nll if paired else None  # the unmodified model's, scored outside the row's context
    with row.during(model):
        for name, blocks in ctx.eval_blocks.items():
            nll = evaluate.block_nll(model, blocks)  # [blocks]
            ppl = evaluate.perplexity_interval(nll)
            values.update({f"ppl_{name}": ppl.estimate, f"ppl_{name}_low": ppl.low, f"ppl_{name}_high": ppl.high,
                           f"block_nll_{name}": tuple(nll.tolist())})
            if reference_nll is not None:
                ratio = evaluate.paired_ratio(nll, reference_nll[name])
                values.update({f"ratio_{name}": ratio.estimate, f"ratio_{name}_low": ratio.low,
                               f"ratio_{name}_high": ratio.high})
        if timing:
            values.update(_speed(model, ctx))
    weight_bytes = made.stored_bytes if made.stored_bytes is not None else evaluate.model_bytes(model)
    values.update(
        weight_bytes=weight_bytes,
        weight_fraction=weight_bytes / evaluate.model_bytes(ctx.base),
        zero_fraction=masks.sparsity_of(model),
        kv_bytes_per_token=kv_bytes_per_token(model, ctx.eval_blocks[data.CORPORA[-1]][:1], row.kv_bits),
        apply_s=made.apply_s, calibration_s=ctx.calibration_s(made),
        needs_calibration=bool(row.calibration), calibration_data=row.calibration,
        needs_training=bool(row.training), training_data=row.training,
        needs_kernel=row.kernel, evaluated=row.evaluated, notes="; ".join(made.notes))
    del model, made
    gc.collect()
    return values
