"""course_lib.data: conversion, validation, split, length filter, CLI, download."""

import json
import os
from pathlib import Path

import pytest
from conftest import PY, REPO, run

from course_lib import atomic, data

RAW = REPO / "data-sets" / "raw" / "dolly-pirate-sample.jsonl"
GOOD = {"instruction": "Name a sea.", "context": "", "response": "Arr, the Caribbean!",
        "category": "open_qa"}


def _write(tmp_path, lines, name="raw.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_dolly_row_becomes_chat_record_with_context_in_user_turn():
    row = {"instruction": " Summarise. ", "context": "Ships sail.", "response": "Arr.",
           "category": "summarization"}
    assert data.to_chat_record(row) == {"messages": [
        {"role": "user", "content": "Summarise.\n\nShips sail."},
        {"role": "assistant", "content": "Arr."}]}
    assert data.to_chat_record(GOOD)["messages"][0]["content"] == "Name a sea."


@pytest.mark.parametrize("row", [
    {"text": "Arr, matey."},
    {"prompt": "Hi", "completion": "Ahoy"},
    {"messages": [{"role": "system", "content": "Be a pirate."},
                  {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]},
])
def test_mlx_lm_layouts_pass_through_unchanged(tmp_path, row):
    result = data.read_records(_write(tmp_path, [json.dumps(row)] * 3))
    assert result.records == [row] * 3 and result.fmt == data.row_format(row)


BAD_ROWS = {
    "not json": ('{"instruction": "x",', "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object, got list"),
    "missing field": (json.dumps({k: v for k, v in GOOD.items() if k != "context"}),
                      "missing field 'context'"),
    "non-string field": (json.dumps({**GOOD, "response": 42}),
                         "field 'response' must be a string, got int"),
    "empty field": (json.dumps({**GOOD, "instruction": "  "}), "field 'instruction' is empty"),
    "blank line": ("", "blank line"),
    "unknown layout": (json.dumps({"question": "?"}), "no known fields"),
    "mixed layout": (json.dumps({"text": "hello"}), "row is in text layout but the file started in dolly"),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_each_bad_row_raises_naming_file_and_line(tmp_path, kind):
    line, reason = BAD_ROWS[kind]
    path = _write(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), line, json.dumps(GOOD)])
    with pytest.raises(data.DataError) as err:
        data.read_records(path)
    assert f"{path}:3: {reason}" in str(err.value)
    skipped = data.read_records(path, skip_invalid=True)
    assert len(skipped.records) == 3 and len(skipped.skipped) == 1
    assert skipped.skipped[0].startswith(f"{path}:3: {reason}")


def test_empty_and_missing_files_raise(tmp_path):
    empty = _write(tmp_path, [])
    with pytest.raises(data.DataError, match="the file is empty"):
        data.read_records(empty)
    with pytest.raises(data.DataError, match="no such file"):
        data.read_records(tmp_path / "absent.jsonl")
    only_bad = _write(tmp_path, ["{oops"], "bad.jsonl")
    with pytest.raises(data.DataError, match=r"no valid rows \(1 skipped\)"):
        data.read_records(only_bad, skip_invalid=True)


def test_split_is_80_20_seeded_and_disjoint():
    rows = [{"text": str(i)} for i in range(400)]
    train, valid, test = data.split_records(rows, seed=7)
    assert (len(train), len(valid), len(test)) == (320, 80, 0)
    assert sorted(train + valid, key=lambda r: int(r["text"])) == rows
    assert data.split_records(rows, seed=7) == (train, valid, test)
    assert data.split_records(rows, seed=8)[1] != valid
    train, valid, test = data.split_records(rows, 0.1, 0.1, seed=7)
    assert (len(train), len(valid), len(test)) == (320, 40, 40)
    with pytest.raises(ValueError, match="--valid-fraction must be in"):
        data.split_records(rows, valid_fraction=1.5)


def test_length_filter_drops_whole_rows_never_truncates(tiny_model):
    tokenizer = data.load_tokenizer(str(tiny_model))
    records = data.read_records(RAW).records
    kept, dropped, lengths = data.filter_by_tokens(records, tokenizer, 256)
    assert len(kept) + len(dropped) == len(records) and dropped
    assert all(data.token_length(r, tokenizer) <= 256 for r in kept)
    assert all(data.token_length(r, tokenizer) > 256 for r in dropped)
    assert all(r in records for r in kept)  # unchanged rows, not shortened ones
    assert max(lengths) > 256


def test_cli_writes_splits_and_reports(tmp_path):
    proc = run([PY, "-m", "course_lib.data", RAW, tmp_path, "--seed", "0"])
    assert "wrote 320 train, 80 valid, 0 test rows" in proc.stdout
    train = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(train) == 320 and "messages" in json.loads(train[0])
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "train.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask


def test_shipped_splits_are_what_the_cli_makes(tmp_path, smollm2):
    """data-sets/pirate is reproducible from the raw sample with the README's command."""
    shipped = REPO / "data-sets" / "pirate"
    args = json.loads((shipped / "prepare.json").read_text())["args"]
    run([PY, "-m", "course_lib.data", RAW, tmp_path, *args])
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / name).read_text() == (shipped / name).read_text()


def test_cli_bad_row_exits_2_and_keeps_earlier_outputs(tmp_path):
    out = tmp_path / "out"
    run([PY, "-m", "course_lib.data", RAW, out])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = _write(tmp_path, [json.dumps(GOOD)] * 5 + ['{"instruction": 1}'])
    proc = run([PY, "-m", "course_lib.data", bad, out], check=False)
    assert proc.returncode == 2
    assert f"{bad}:6: field 'instruction' must be a string" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_skip_invalid_counts_skipped_rows(tmp_path):
    bad = _write(tmp_path, [json.dumps(GOOD)] * 10 + ["not json", json.dumps({**GOOD, "response": ""})])
    proc = run([PY, "-m", "course_lib.data", bad, tmp_path / "out", "--skip-invalid"])
    assert "2 skipped as invalid" in proc.stdout
    assert f"{bad}:11: not valid JSON" in proc.stderr


def test_cli_max_tokens_needs_tokenizer(tmp_path):
    proc = run([PY, "-m", "course_lib.data", RAW, tmp_path, "--max-tokens", "100"], check=False)
    assert proc.returncode == 2 and "--max-tokens needs --tokenizer" in proc.stderr


def test_offline_download_fails_with_advice_not_a_traceback(tmp_path):
    # This machine has no route to the Hub (as on a laptop offline); the real code runs.
    proc = run([PY, "-m", "course_lib.data", "--download", tmp_path], check=False, timeout=300)
    assert proc.returncode == 2
    assert "could not download databricks-dolly-15k-arr.jsonl" in proc.stderr
    assert "You are probably offline" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "train.jsonl"
    target.write_text('{"text": "old"}\n')

    with pytest.raises(TypeError):  # json cannot encode the 2nd row: fails mid-write
        atomic.write_jsonl(target, [{"text": "new"}, {"text": object()}])
    assert target.read_text() == '{"text": "old"}\n'
    assert os.listdir(tmp_path) == ["train.jsonl"]
