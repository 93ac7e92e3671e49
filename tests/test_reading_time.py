"""Each chapter states its reading time as scripts/reading_time.py measures it (prose words at
200 a minute, the stored run's wall time), and the notebooks' README tabulates the same."""

import importlib.util
import json
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "scripts" / "reading_time.py"
spec = importlib.util.spec_from_file_location("reading_time", SCRIPT)
reading = importlib.util.module_from_spec(spec)
sys.modules["reading_time"] = reading
spec.loader.exec_module(reading)
FIX = "run .venv/bin/python scripts/reading_time.py --write"


@pytest.mark.parametrize("path", reading.CHAPTERS, ids=lambda p: p.stem)
def test_each_chapter_states_its_measured_reading_time(path):
    first = "".join(reading.first_markdown(json.loads(path.read_text()))["source"])
    assert first.rstrip().endswith(reading.line(reading.measure(path))), FIX


def test_the_notebooks_readme_tabulates_them_and_the_series_total():
    rows = [reading.measure(p) for p in reading.CHAPTERS]
    assert reading.table(rows) in reading.README.read_text(), FIX


def test_words_exclude_code_math_and_the_line_itself():
    nb = {"cells": [
        {"cell_type": "markdown", "source": ["One two three $x^2 + 1$.\n```\nnot counted\n```\n",
                                             "\n*Reading time: about 1 minutes (3 words).*"]},
        {"cell_type": "code", "source": ["print('not prose')"], "metadata": {}}]}
    assert reading.prose_words(nb) == 3


def test_run_time_is_first_start_to_last_end_and_needs_timestamps():
    def cell(start, end):
        return {"cell_type": "code", "source": [], "metadata": {"execution": {
            "iopub.execute_input": start, "shell.execute_reply": end}}}
    nb = {"cells": [cell("2026-12-05T10:00:00Z", "2026-12-05T10:00:05Z"),
                    cell("2026-12-05T10:00:05Z", "2026-12-05T10:01:40.5Z")]}
    assert reading.run_seconds(nb) == 100.5
    assert reading.duration(100.5) == "about 2 minutes" and reading.duration(6.2) == "6 seconds"
    with pytest.raises(ValueError, match="nbconvert --execute"):
        reading.run_seconds({"cells": [{"cell_type": "code", "source": [], "metadata": {}}]})
