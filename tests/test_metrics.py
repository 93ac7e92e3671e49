"""course_lib.metrics: metrics.jsonl's writer and its one reader, with one rule for the end."""

import json
import math
import re

import pytest

from course_lib import atomic, metrics

RECORDS = [{"iteration": 1, "split": "train", "loss": 2.5, "world_size": 2},
           {"iteration": 1, "split": "rank", "rank": 0, "host": "a", "step_seconds": 0.1},
           {"iteration": 2, "split": "valid", "loss": 2.25, "world_size": 2}]


def _write(tmp_path, text: str):
    path = tmp_path / metrics.FILE
    path.write_text(text, encoding="utf-8")
    return path


def _lines(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_folder_or_file_give_the_same_records(tmp_path):
    path = _write(tmp_path, _lines(RECORDS))
    assert metrics.read(path) == metrics.read(tmp_path) == RECORDS
    assert metrics.read(str(tmp_path)) == RECORDS


def test_a_half_written_last_line_is_left_out(tmp_path):
    whole = _lines(RECORDS)
    _write(tmp_path, whole + '{"iteration": 3, "split": "tr')
    assert metrics.read(tmp_path) == RECORDS
    # cut inside a nested object: the text ends in "}" and still is not a record
    _write(tmp_path, whole + '{"iteration": 3, "step": {"a": 1}')
    assert metrics.read(tmp_path) == RECORDS


def test_every_cut_of_a_file_reads_as_the_records_written_whole(tmp_path):
    """A live run's file, read at every byte: the records whose JSON is all there."""
    text = _lines(RECORDS)
    ends = [text.index("\n", text.index(json.dumps(r))) for r in RECORDS]  # each one's "}"+1
    for cut in range(len(text) + 1):
        _write(tmp_path, text[:cut])
        assert metrics.read(tmp_path) == [r for r, end in zip(RECORDS, ends) if cut >= end]


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    _write(tmp_path, _lines(RECORDS).rstrip("\n"))
    assert metrics.read(tmp_path) == RECORDS


def test_a_bad_line_elsewhere_names_the_file_and_line(tmp_path):
    lines = _lines(RECORDS).splitlines(keepends=True)
    path = _write(tmp_path, lines[0] + '{"iteration": 1, "spl\n' + "".join(lines[1:]))
    line_2 = "^" + re.escape(f"{path}:2: ")
    with pytest.raises(ValueError, match=line_2 + r"not valid JSON \(.* at column \d+\)$"):
        metrics.read(path)
    # a line that ends in its newline is whole: bad, even when it is the last one
    _write(tmp_path, lines[0] + "oops\n")
    with pytest.raises(ValueError, match=line_2 + "not valid JSON"):
        metrics.read(tmp_path)
    _write(tmp_path, lines[0] + "[1, 2]\n" + lines[1])
    with pytest.raises(ValueError, match=line_2 + "expected a JSON object, got list$"):
        metrics.read(path)
    path.write_bytes(lines[0].encode() + b'{"host": "\xff"}\n')
    with pytest.raises(ValueError, match=line_2 + "not UTF-8 text"):
        metrics.read(path)


def test_blank_lines_are_skipped(tmp_path):
    lines = _lines(RECORDS).splitlines(keepends=True)
    _write(tmp_path, "\n" + lines[0] + "  \n" + "".join(lines[1:]) + "\n")
    assert metrics.read(tmp_path) == RECORDS


def test_a_missing_file_raises_unless_missing_ok(tmp_path):
    with pytest.raises(FileNotFoundError):
        metrics.read(tmp_path)  # a folder without the file
    with pytest.raises(FileNotFoundError):
        metrics.read(tmp_path / metrics.FILE)
    assert metrics.read(tmp_path, missing_ok=True) == []
    assert metrics.read(tmp_path / "not-yet" / metrics.FILE, missing_ok=True) == []
    assert metrics.read(tmp_path / "not-yet", missing_ok=True) == []  # a run's folder, later


def test_append_writes_nan_as_null_and_reads_back(tmp_path):
    path = tmp_path / metrics.FILE
    metrics.append(path, {"iteration": 1, "loss": math.nan, "ranks": {"0": math.nan}})
    metrics.append(path, RECORDS[0])
    assert "NaN" not in path.read_text() and path.read_text().endswith("\n")
    assert metrics.read(path) == [{"iteration": 1, "loss": None, "ranks": {"0": None}},
                                  RECORDS[0]]


def test_append_failure_is_a_write_error_naming_the_file(tmp_path):
    path = tmp_path / "no-such-folder" / metrics.FILE
    with pytest.raises(atomic.WriteError, match="^" + re.escape(f"cannot write {path}: ")):
        metrics.append(path, RECORDS[0])


def test_start_afresh_or_keep_the_records_up_to_the_resumed_iteration(tmp_path):
    path = _write(tmp_path, _lines(RECORDS) + '{"iteration": 3, "sp')  # a kill cut it
    assert metrics.start(path, resume_from=1) == RECORDS[:2]
    assert metrics.read(path) == RECORDS[:2] and path.read_text().endswith("}\n")
    assert metrics.start(path) == [] and path.read_text() == ""
    path.unlink()
    assert metrics.start(path, resume_from=4) == [] and not path.exists()
