"""refimpl.effects: the effects table. Fast tests run every row on a tiny random Llama with a shrunken
protocol; the slow test recomputes a sample of the committed table on the real model."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from tiny import CharTokenizer, make_tiny_llama
from refimpl import data, reproducibility, taxonomy, tradeoffs
from refimpl.effects import check, cli, context, key, measure, protocol, registry, run, table

TINY = protocol.Protocol(eval_seq_len=32, eval_n_blocks=4, ptq_calibration=(64, 2),
                        pruning_calibration=(64, 2), importance_tokens=32, prefill_tokens=16, decode_prompt=8,
                        decode_tokens=2, timing_rounds=1, timing_warmup_rounds=0)
COMMITTED = Path(__file__).resolve().parent.parent / "results" / "effects"
NEED_STUDENT = ("kd-student", "kd-student+gptq-w4g64")  # skipped when the student is not cached


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """refimpl's cache in a temporary folder (no student of a tiny model lands in the user's), with the
    corpora read once from the real cache first."""
    for name in data.CORPORA:
        for split in data.SPLITS:
            data.load_text(name, split)  # kept in memory for the rest of the session
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("REFIMPL_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(), CharTokenizer()


@pytest.fixture(scope="module")
def full_run(tiny, cache, tmp_path_factory):
    """Every row on the tiny model, once: (out folder, returned records, the model's state before, and
    the functions each row called: {row id: {(file, qualified name)}}, recorded by a profiler)."""
    out = tmp_path_factory.mktemp("effects")
    before = {name: t.clone() for name, t in tiny[0].state_dict().items()}
    calls: dict[str, set[tuple[str, str]]] = {}

    def profiled(row, ctx, *args, **kwargs):
        called = calls.setdefault(row.id, set())

        def profile(frame, event, arg):
            if event == "call":
                called.add((frame.f_code.co_filename, frame.f_code.co_qualname))

        sys.setprofile(profile)
        try:
            return measure.measure_row(row, ctx, *args, **kwargs)
        finally:
            sys.setprofile(None)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "measure_row", profiled)
        records = run.run_effects(out, tiny, model_name="tiny-llama", protocol=TINY, command=["test"])
    return out, records, before, calls


def _by_row(records):
    return {r["row"]: r for r in records}


# --- the registry -----------------------------------------------------------------------------


def test_registry_covers_every_implemented_method():
    methods = taxonomy.load().methods
    implemented = {m.id for m in methods if m.status == "implemented"}
    in_rows = {m for row in registry.ROWS for m in row.methods}
    assert in_rows <= implemented, f"rows name methods that are not implemented: {in_rows - implemented}"
    assert not in_rows & set(registry.NOT_A_ROW), "a method is both a row and listed as not a row"
    missing = implemented - in_rows - set(registry.NOT_A_ROW)
    assert not missing, f"implemented methods neither in a row nor in NOT_A_ROW: {sorted(missing)}"
    assert set(registry.NOT_A_ROW) <= {m.id for m in methods}, "NOT_A_ROW names a method the taxonomy lacks"
    assert len(set(registry.ROW_IDS)) == len(registry.ROWS)
    assert registry.ROWS[0].id == "dense"
    for row in registry.ROWS:
        assert all(part in registry.FAMILIES for part in row.family.split("+")), row.id
        assert row.settings and row.evaluated and row.kernel, row.id
        assert row.combination == ("+" in row.family), row.id
    assert set(registry.DEFAULT_CHECK_ROWS) <= set(registry.ROW_IDS)
    for i, row in enumerate(registry.ROWS):
        if row.starts_from is not None:
            assert row.starts_from in registry.ROWS[:i], f"{row.id} starts from a row that does not come before it"


def test_a_reused_step_is_made_once(tiny, cache):
    model, tokenizer = tiny
    ctx = context.Context(model, tokenizer, "tiny-llama", TINY)
    ctx.keep = {"sparsegpt-50"}
    by_row = {row.id: row for row in registry.ROWS}
    alone = measure.measure_row(by_row["sparsegpt-50"], ctx, timing=False)
    assert set(ctx.kept) == {"sparsegpt-50"}
    joint = measure.measure_row(by_row["sparsegpt-50+gptq-w4g64"], ctx, timing=False)
    assert joint["apply_s"] > alone["apply_s"]
    assert joint["calibration_s"] == alone["calibration_s"] == 0.0  # both calibrate layer by layer inside the method
    fresh = context.Context(model, tokenizer, "tiny-llama", TINY)  # nothing kept: made again, the same result
    assert measure.measure_row(by_row["sparsegpt-50+gptq-w4g64"], fresh, timing=False)["ppl_shakespeare"] == \
        joint["ppl_shakespeare"]
    assert fresh.kept == {}


def test_list_names_every_row_and_every_excluded_method(capsys):
    assert cli.main(["--list"]) == 0
    listed = capsys.readouterr().out
    for row_id in registry.ROW_IDS:
        assert row_id in listed
    for method_id in registry.NOT_A_ROW:
        assert method_id in listed
    from refimpl import __main__ as commands

    assert commands.main(["effects", "--list"]) == 0
    assert "gptq-w4g64" in capsys.readouterr().out
    assert commands.main(["nonsense"]) == 2
    assert "effects" in capsys.readouterr().err


def test_select_rows_by_row_taxonomy_id_or_family():
    ids = lambda methods: [r.id for r in registry.select_rows(methods)]  # noqa: E731
    assert ids(None) == list(registry.ROW_IDS)
    assert ids("gptq") == ["dense", "gptq-w4g64"]  # a taxonomy id selects single-method rows only
    assert ids("magnitude-pruning") == ["dense", "magnitude-50", "magnitude-2of4"]
    assert ids(["architecture", "mqa+kv-int8"]) == ["dense", "mqa", "mqa+kv-int8"]
    assert ids("sparsegpt-50+gptq-w4g64,rtn-w8") == ["dense", "rtn-w8", "sparsegpt-50+gptq-w4g64"]


@pytest.mark.parametrize("methods", ["foo", "gptq,nonsense", ""])
def test_unknown_method_names_the_valid_ones(methods, tmp_path, capsys):
    with pytest.raises(ValueError, match="gptq-w4g64" if methods else "empty"):
        registry.select_rows(methods)
    with pytest.raises(SystemExit):
        cli.main(["--methods", methods, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "valid row ids" in err or "empty" in err
    assert not (tmp_path / "out").exists()  # nothing written before the arguments are checked


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "meta"])
def test_bad_device_is_rejected(device, tmp_path, capsys):
    with pytest.raises(ValueError, match="device"):
        run.run_effects(tmp_path / "out", "smollm2-135m", device=device)
    with pytest.raises(SystemExit):
        cli.main(["--device", device, "--out", str(tmp_path / "out")])
    assert device in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_out_is_rejected(tmp_path, tiny, capsys):
    a_file = tmp_path / "table.csv"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file"):
        run.run_effects(a_file, tiny, methods="dense", protocol=TINY)
    with pytest.raises(SystemExit):
        cli.main(["--out", str(a_file)])
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot be created"):
        run.check_out(a_file / "below")
    with pytest.raises(SystemExit):
        cli.main([])  # --out is required
    assert "--out is required" in capsys.readouterr().err


# --- a whole run on a tiny model ----------------------------------------------------------------


def test_every_row_runs_and_the_files_are_written(full_run):
    out, records = full_run[:2]
    assert [r["row"] for r in records] == list(registry.ROW_IDS)
    csv_path, md_path, json_path = (out / f"tiny-llama.{ext}" for ext in ("csv", "md", "json"))
    with open(csv_path, newline="") as f:
        header = next(csv.reader(f))
    assert header == [name for name, _, _ in table.COLUMNS]
    assert table.read_table(csv_path) == records
    by_row = _by_row(records)
    for row_id, r in by_row.items():
        if row_id in NEED_STUDENT:
            continue
        assert r["status"] == "ok", (row_id, r["reason"])
        assert r["model"] == "tiny-llama" and r["device"] == "cpu" and r["key"]
        assert isinstance(r["weight_bytes"], int) and r["weight_bytes"] > 0
        for column in ("kv_bytes_per_token", "prefill_tokens_per_s", "decode_tokens_per_s", "prefill_speedup",
                       "decode_speedup", *(f"ppl_{c}" for c in data.CORPORA)):
            assert math.isfinite(r[column]) and r[column] > 0, (row_id, column)
        assert r["apply_s"] >= 0 and r["calibration_s"] >= 0
        assert r["needs_calibration"] == bool(r["calibration_data"])
        assert r["needs_training"] == bool(r["training_data"])
    markdown = md_path.read_text()
    for block in markdown.split("\n\n"):  # every line of a table has the header's number of cells
        lines = [line for line in block.splitlines() if line.startswith("|")]
        cells = {len(re.findall(r"(?<!\\)\|", line)) for line in lines}
        assert len(cells) <= 1, block
    assert "\\|w\\|" in markdown  # a | inside a cell is escaped
    for row_id in by_row:
        assert f"`{row_id}`" in markdown if row_id in NEED_STUDENT else f"| {row_id} |" in markdown
    provenance = json.loads(json_path.read_text())
    assert provenance["model"] == "tiny-llama" and provenance["torch"] == torch.__version__
    assert provenance["protocol"] == {k: list(v) if isinstance(v, tuple) else v
                                      for k, v in vars(TINY).items()}
    assert provenance["machine"]["cpu"] and provenance["transformers"]
    last_run = provenance["runs"][-1]
    assert last_run["command"] == ["test"] and last_run["date"] and "commit" in last_run["git"]
    assert last_run["skipped"] == list(NEED_STUDENT) and len(last_run["measured"]) == len(registry.ROWS) - len(NEED_STUDENT)


def test_the_given_model_is_not_modified(tiny, full_run):
    before = full_run[2]
    after = tiny[0].state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert tiny[0].config.num_key_value_heads == 2 and tiny[0].config.num_hidden_layers == 2


def test_the_student_needing_training_is_skipped_with_the_reason(full_run):
    for row in NEED_STUDENT:
        student = _by_row(full_run[1])[row]
        assert student["status"] == "skipped" and "--train" in student["reason"] and "cache" in student["reason"]
        assert student["weight_bytes"] is None


def test_measured_effects_have_the_expected_direction(full_run):
    by_row = _by_row(full_run[1])
    dense = by_row["dense"]
    assert dense["weight_fraction"] == 1.0
    assert by_row["rtn-w4g64"]["weight_bytes"] < by_row["rtn-w8"]["weight_bytes"] < dense["weight_bytes"]
    assert by_row["llm-qat-w3g64"]["weight_bytes"] < by_row["rtn-w4g64"]["weight_bytes"]
    assert by_row["gptq-w4g64"]["weight_bytes"] == by_row["rtn-w4g64"]["weight_bytes"]  # the same packed layout
    for row_id in ("magnitude-2of4", "wanda-2of4", "sparsegpt-2of4"):
        assert by_row[row_id]["zero_fraction"] == pytest.approx(0.5, abs=0.01)
        assert by_row[row_id]["weight_bytes"] == dense["weight_bytes"]  # zeros stored densely
    for row_id in ("llm-pruner-mlp", "shortgpt-depth", "head-pruning-kv-group"):
        assert by_row[row_id]["weight_bytes"] < dense["weight_bytes"]
    assert by_row["mqa"]["kv_bytes_per_token"] == dense["kv_bytes_per_token"] / 2  # 2 key-value heads -> 1
    assert by_row["kv-int8"]["kv_bytes_per_token"] < dense["kv_bytes_per_token"] / 3  # int8 codes + scales
    assert by_row["kv-int8"]["weight_bytes"] == dense["weight_bytes"]
    assert by_row["dense"]["calibration_s"] == 0 and by_row["awq-w4g64"]["calibration_s"] > 0
    assert by_row["gptq-w4g64"]["calibration_s"] == 0  # calibrated layer by layer inside the method
    for c in data.CORPORA:
        assert dense[f"ratio_{c}"] == dense[f"ratio_{c}_low"] == dense[f"ratio_{c}_high"] == 1.0
        for r in by_row.values():
            if r["status"] == "ok":
                assert r[f"ppl_{c}_low"] <= r[f"ppl_{c}"] <= r[f"ppl_{c}_high"], r["row"]
                assert r[f"ratio_{c}_low"] <= r[f"ratio_{c}"] <= r[f"ratio_{c}_high"], r["row"]
                assert r[f"ratio_{c}"] == pytest.approx(r[f"ppl_{c}"] / dense[f"ppl_{c}"]), r["row"]
    written = _by_row(table.read_table(full_run[0] / "tiny-llama.csv"))  # per-block losses survive the CSV
    assert written["rtn-w4g64"]["block_nll_docstrings"] == by_row["rtn-w4g64"]["block_nll_docstrings"]
    assert tradeoffs.compare(written["rtn-w4g64"], written["dense"]).estimate == pytest.approx(
        tradeoffs.quality_ratio(written["rtn-w4g64"], written["dense"]))


def test_combinations_run(full_run):
    by_row = _by_row(full_run[1])
    joint = by_row["sparsegpt-50+gptq-w4g64"]
    assert joint["weight_bytes"] == by_row["gptq-w4g64"]["weight_bytes"]
    assert joint["zero_fraction"] >= by_row["sparsegpt-50"]["zero_fraction"] - 1e-9  # pruned weights stay zero
    assert joint["apply_s"] > by_row["sparsegpt-50"]["apply_s"]  # it pays for the pruning it reuses
    pruned_quantized = by_row["llm-pruner-mlp-lora+gptq-w4g64"]
    assert pruned_quantized["weight_bytes"] < min(by_row["llm-pruner-mlp-lora"]["weight_bytes"],
                                                  by_row["gptq-w4g64"]["weight_bytes"])
    mqa_int8 = by_row["mqa+kv-int8"]
    assert mqa_int8["weight_bytes"] == by_row["mqa"]["weight_bytes"]
    assert mqa_int8["kv_bytes_per_token"] < by_row["mqa"]["kv_bytes_per_token"] / 3
    assert mqa_int8["ppl_docstrings"] == pytest.approx(by_row["mqa"]["ppl_docstrings"], rel=0.05)


def test_a_second_run_skips_what_is_done(full_run, tiny, monkeypatch):
    out, records = full_run[:2]

    def no_measurement(*args, **kwargs):
        raise AssertionError("a kept row was measured again")

    # nothing measured again (only the skipped student retried, which stops before any measurement);
    # not measure.measure_row: its source is part of every row's key
    for name in ("perplexities", "side_by_side", "prefill_latency", "decode_latency"):
        monkeypatch.setattr(measure.evaluate, name, no_measurement)
    again = run.run_effects(out, tiny, model_name="tiny-llama", protocol=TINY)
    assert [r for r in again if r["row"] not in NEED_STUDENT] == [r for r in records if r["row"] not in NEED_STUDENT]
    last_run = json.loads((out / "tiny-llama.json").read_text())["runs"][-1]
    assert last_run["measured"] == [] and last_run["skipped"] == list(NEED_STUDENT)
    assert last_run["kept"] == [r for r in registry.ROW_IDS if r not in NEED_STUDENT]


def test_a_changed_key_measures_the_row_again(full_run, tiny, tmp_path):
    out, records = full_run[:2]
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for path in out.iterdir():
        (copy_dir / path.name).write_bytes(path.read_bytes())
    table_csv = copy_dir / "tiny-llama.csv"
    stale = table.read_table(table_csv)
    next(r for r in stale if r["row"] == "rtn-w8")["key"] = "000000000000"
    table.write_csv(table_csv, stale)
    run.run_effects(copy_dir, tiny, methods="rtn-w8", model_name="tiny-llama", protocol=TINY)
    last_run = json.loads((copy_dir / "tiny-llama.json").read_text())["runs"][-1]
    assert last_run["measured"] == ["rtn-w8"] and last_run["kept"] == ["dense"]
    by_row = _by_row(table.read_table(table_csv))
    assert by_row["rtn-w8"]["key"] == key.row_key(registry.ROWS[1], TINY)
    assert by_row["rtn-w8"]["ppl_shakespeare"] == _by_row(records)["rtn-w8"]["ppl_shakespeare"]  # deterministic
    assert len(by_row) == len(registry.ROWS)  # the other by_row are kept


def test_the_key_follows_the_protocol_and_the_row():
    gptq = next(r for r in registry.ROWS if r.id == "gptq-w4g64")
    assert key.row_key(gptq) == key.row_key(gptq)
    assert key.row_key(gptq) != key.row_key(gptq, TINY)
    assert len({key.row_key(row) for row in registry.ROWS}) == len(registry.ROWS)


def _row(row_id):
    return next(r for r in registry.ROWS if r.id == row_id)


def test_editing_what_a_row_depends_on_changes_its_key(monkeypatch):
    gptq, rtn = _row("gptq-w4g64"), _row("rtn-w8")
    before = key.row_key(gptq)
    digests = {}  # one file of those the key covers edited at a time
    for module in sorted(key.dependencies(gptq).modules):
        with monkeypatch.context() as patch:
            patch.setattr(key, "_file_digest", lambda m, edited=module: "edited" if m == edited else "same")
            digests[module] = key.row_key(gptq)
    assert len(set(digests.values())) == len(digests)  # every file counts, each differently
    assert "refimpl.quantization.gptq" in digests and "refimpl.evaluate" in digests
    assert "refimpl.quantization.awq" not in key.dependencies(rtn).modules  # an AWQ edit keeps RTN's rows
    rtn_before = key.row_key(rtn)
    monkeypatch.setattr(key.recipes, "GROUP", 32)  # a constant of the recipes module: the rows that read it
    assert key.row_key(gptq) != before and key.row_key(rtn) == rtn_before
    combination = _row("sparsegpt-50+gptq-w4g64")
    assert {"gptq_w4", "sparsegpt_", "gptq_w4_keeping_zeros"} <= set(key.dependencies(combination).functions)


def test_the_key_covers_every_function_a_row_runs(full_run):
    """Every refimpl function a row called in the full run lies in a file its key hashes, or is a recipe
    function whose source its key hashes (a test of the rule in refimpl.effects.key). Calibration shared
    between rows runs in the first row that needs it, from refimpl.effects.context, whose files every
    key covers; a combination that continues from a kept row's copy covers that row's dependencies."""
    calls = full_run[3]
    root = Path(key.__file__).resolve().parents[1]
    recipes_file, rows_file = Path(key.recipes.__file__).resolve(), Path(registry.__file__).resolve()
    shared = key.dependencies(registry.ROWS[0]).modules
    assert {"refimpl.effects.context", "refimpl.calibration", "refimpl.pruning.structured"} <= shared
    for row in registry.ROWS:
        deps = key.dependencies(row)
        assert shared <= deps.modules, row.id
        if row.starts_from is not None:
            base = key.dependencies(row.starts_from)
            assert base.modules <= deps.modules and set(base.functions) <= set(deps.functions), row.id
        files = {Path(importlib.util.find_spec(m).origin).resolve() for m in deps.modules}
        assert calls[row.id], row.id
        for filename, qualname in calls[row.id]:
            path = Path(filename).resolve()
            if root not in path.parents:
                continue
            if path == recipes_file:
                assert qualname.split(".<locals>")[0] in deps.functions, (row.id, qualname)
            elif path == rows_file:
                assert qualname in ("Row.during", "Row.method"), (row.id, qualname)  # the context and the label
            else:
                assert path in files, (row.id, path, qualname)


def test_train_makes_the_student_and_the_cache_keeps_it(tiny, cache, tmp_path):
    records = run.run_effects(tmp_path, tiny, methods="kd-student", model_name="tiny-llama", protocol=TINY,
                                  train=True)
    student = _by_row(records)["kd-student"]
    assert student["status"] == "ok", student["reason"]
    assert "trained now" in student["notes"] and student["apply_s"] > 0
    assert student["weight_bytes"] < _by_row(records)["dense"]["weight_bytes"]
    assert list((cache / "students").glob("tiny-llama-kd-*/student.json"))
    (tmp_path / "tiny-llama.csv").unlink()
    again = _by_row(run.run_effects(tmp_path, tiny, methods="kd-student", model_name="tiny-llama",
                                        protocol=TINY))["kd-student"]
    assert again["status"] == "ok" and "loaded from the cache" in again["notes"]
    assert again["ppl_shakespeare"] == student["ppl_shakespeare"]
    assert again["apply_s"] == pytest.approx(student["apply_s"], rel=0.5)  # the recorded training time
    quantized = _by_row(run.run_effects(tmp_path, tiny, methods="kd-student+gptq-w4g64", model_name="tiny-llama",
                                            protocol=TINY))["kd-student+gptq-w4g64"]
    assert quantized["status"] == "ok", quantized["reason"]
    assert quantized["weight_bytes"] < again["weight_bytes"] and quantized["apply_s"] > again["apply_s"]


def test_check_table_recomputes_and_catches_a_difference(full_run, tiny, tmp_path):
    out = full_run[0]
    checks = check.check_table(out / "tiny-llama.csv", model=tiny)
    assert [c.row for c in checks] == list(registry.DEFAULT_CHECK_ROWS)
    assert all(c.ok and c.key_matches for c in checks), check.format_checks(checks)
    assert set(checks[0].compared) == {*(f"ppl_{c}" for c in data.CORPORA), "weight_bytes", "kv_bytes_per_token",
                                       "zero_fraction"}

    for path in out.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    table_csv = tmp_path / "tiny-llama.csv"
    records = table.read_table(table_csv)
    changed = next(r for r in records if r["row"] == "rtn-w4g64")
    kind = next(r for r in registry.ROWS if r.id == "rtn-w4g64").tolerance
    changed["ppl_docstrings"] *= 1 + 2 * reproducibility.TOLERANCES[kind].rtol  # more than another CPU moves it
    changed["weight_bytes"] += 1
    table.write_csv(table_csv, records)
    one = check.check_table(table_csv, model=tiny, rows=["rtn-w4g64"])[0]
    assert not one.ok and len(one.mismatches) == 2
    assert "ppl_docstrings" in check.format_checks([one]) and "DIFFERS" in check.format_checks([one])
    with pytest.raises(ValueError, match="not measured"):
        check.check_table(table_csv, model=tiny, rows=["kd-student"])
    with pytest.raises(ValueError, match="unknown rows"):
        check.check_table(table_csv, model=tiny, rows=["nope"])


def test_command_line_on_a_model_folder(tiny_model_folder, tmp_path, cache):
    folder, _, _ = tiny_model_folder
    out = tmp_path / "out"
    argv = ["--model", str(folder), "--out", str(out), "--methods", "rtn-w8", "--threads", "2"]
    assert cli.main(argv) == 0
    stem = table.table_stem(str(folder))
    records = table.read_table(out / f"{stem}.csv")
    assert [r["row"] for r in records] == ["dense", "rtn-w8"] and all(r["status"] == "ok" for r in records)
    provenance = json.loads((out / f"{stem}.json").read_text())
    assert provenance["runs"][-1]["command"][1:] == argv
    assert provenance["protocol"]["eval_seq_len"] == protocol.DEFAULT_PROTOCOL.eval_seq_len  # the default protocol
    assert "rtn-w8" in (out / f"{stem}.md").read_text()


# --- the committed table ------------------------------------------------------------------------


@pytest.mark.slow
def test_committed_table_recomputes_on_the_real_model(request):
    """A quantization and an architecture row of the committed table_csv, recomputed (chapter 09
    recomputes a pruning row, ``magnitude-50``, the same way)."""
    table_csv = COMMITTED / "smollm2-135m.csv"
    if not table_csv.is_file():
        pytest.skip(f"{table_csv} does not exist yet: make it with "
                    "`python -m refimpl effects --model smollm2-135m --out results/effects`")
    smollm2 = request.getfixturevalue("smollm2")  # loaded only when there is a table_csv to check
    checks = check.check_table(table_csv, model=smollm2, model_name="smollm2-135m", rows=["rtn-w4g64", "mqa"])
    assert all(c.ok for c in checks), check.format_checks(checks)


def test_rows_name_the_kind_of_their_perplexities():
    kinds = {row.id: row.tolerance for row in registry.ROWS}
    assert kinds["dense"] == "float" and kinds["rtn-w4g64"] == kinds["wanda-50"] == "grid"
    assert kinds["gptq-w4g64"] == kinds["sparsegpt-50"] == kinds["kd-student+gptq-w4g64"] == "sequential"
    assert kinds["kd-student"] == kinds["llm-pruner-mlp-lora"] == kinds["llm-qat-w3g64"] == "trained"
    assert kinds["zeroquant-w8a8"] == kinds["kv-int8"] == kinds["llm-int8"] == "activations"
    assert kinds["mqa"] == kinds["mqa+kv-int8"] == "long-training"
    assert set(kinds.values()) <= set(reproducibility.TOLERANCES)
