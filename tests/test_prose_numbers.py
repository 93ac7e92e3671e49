"""Every number the chapters' and READMEs' prose states is carried by a stored output or a
results file (scripts/check_prose_numbers.py), and the check fails when one is not."""

import importlib.util
import json
import sys

import pytest
from conftest import PY, REPO, run

SCRIPT = REPO / "scripts" / "check_prose_numbers.py"
spec = importlib.util.spec_from_file_location("check_prose_numbers", SCRIPT)
prose = importlib.util.module_from_spec(spec)
sys.modules["check_prose_numbers"] = prose
spec.loader.exec_module(prose)


@pytest.mark.parametrize("path", prose.DEFAULT_FILES, ids=lambda p: p.name
                         if p.suffix == ".ipynb" else str(p.relative_to(REPO)))
def test_every_number_in_the_prose_is_carried_by_the_evidence(path):
    missing = prose.check(path)
    assert not missing, "\n".join(f"{c.where}: {c.text} in {c.sentence[:200]!r}"
                                  for c in missing)


def changed_copy(tmp_path, old, new):
    """Chapter 4 with one number of one markdown cell replaced."""
    src = REPO / "notebooks" / "04_distributed_lora.ipynb"
    nb = json.loads(src.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "markdown" and old in "".join(c["source"])]
    assert cells, f"chapter 4's prose no longer states {old!r}: pick another number"
    cells[0]["source"] = "".join(cells[0]["source"]).replace(old, new, 1)
    copy = tmp_path / src.name
    copy.write_text(json.dumps(nb))
    return copy


def stated_number(path):
    """A number with a unit that chapter 4's prose states and its outputs carry."""
    parts, evidence = prose.notebook_parts(path)
    for _, text in parts:
        for claim in prose.claims(text, ""):
            if prose.unit_after(claim.unit) and "." in claim.text:
                return claim
    raise AssertionError("chapter 4's prose states no decimal number with a unit")


def test_the_check_fails_on_a_chapter_with_one_number_changed(tmp_path):
    claim = stated_number(REPO / "notebooks" / "04_distributed_lora.ipynb")
    wrong = f"{claim.value * 7.31:.{len(claim.text.split('.')[1])}f}"
    copy = changed_copy(tmp_path, claim.text + claim.unit[:3], wrong + claim.unit[:3])
    proc = run([PY, SCRIPT, copy], check=False)
    assert proc.returncode == 1, proc.stdout
    assert f": {wrong} in" in proc.stdout and "FAIL" in proc.stdout


@pytest.mark.parametrize("prose_text, evidence, ok", [
    ("The wait took 0.129 s.", "wait 129 ms", True),           # units 10^3 apart
    ("The wait took 0.129 s.", "wait 0.131 s", False),         # beyond the stated precision
    ("It ran 1.43x faster.", "speed-up 1.4312x", True),
    ("It ran 1.43x faster.", "speed-up 1.43 s", False),        # a time is not a ratio
    ("Rank 0 trains about 4,900 tokens/s.", "4,873.2 tokens/s", True),   # two digits
    ("Rank 0 trains about 4,900 tokens/s.", "4,700 tokens/s", False),
    ("A share of 9% of the words.", "share 0.09", True),     # a percentage as a fraction
    ("Two runs on 2 ranks, LoRA rank 8, chapter 4's 80/20 split.", "", True),  # constants
    ("Amdahl (1967) showed it.", "", True),                    # a citation's year
    ("The loss fell to 1.83.", "loss 1.9", False),
    ("Losses 2.31, 2.05, 1.98 by step.", "2.31 1.98", False),   # a list's middle item is read
    ("The loss (2.31) fell.", "", False),                       # a number in parentheses too
    ("It trains about 4,950 tokens/s.", "4,910 tokens/s", False),  # to its last digit
    ("A step of $t$ seconds\ntook 13.7 s on $n$ ranks.", "", False),  # math ends at its line
    ("Hu et al. (2021) used rank 8 on 175B parameters.", "", True),  # a cited work's numbers
])
def test_what_counts_as_carried(prose_text, evidence, ok):
    carried = prose.numbers_in(evidence)
    missing = [c for c in prose.claims(prose_text, "cell") if not prose.found(c, carried)]
    assert (not missing) == ok, missing


def test_code_spans_links_and_the_reading_time_line_are_not_claims():
    text = ("Run `--iters 60` ([notes](https://x.org/v1.2/3)) and see $2(N-1)/N$.\n\n"
            "*Reading time: about 9 minutes (1,691 words at 200 a minute).*")
    assert prose.claims(text, "cell") == []
