"""Every number the prose states, checked against what the cells print.

    .venv/bin/python scripts/check_prose_numbers.py [FILE ...]

nbval compares a chapter's outputs, not the sentences around them: a re-executed chapter keeps
text written for an earlier run. This check reads each markdown cell of a notebook (or a
Markdown file such as the README), takes every number it states, and looks for it in the
evidence: the notebook's stored outputs and code, and the ``benchmarks/results/*.json`` files
the text names. A Markdown file speaks for the whole course: its evidence is every chapter's
outputs, every results file and its own quoted code blocks. A number is found when some value
of the evidence, rounded to the precision the prose states it with (``1.43`` to two
decimals, ``about 4,900`` to two significant digits, ``18x`` to a whole number), equals it, in
the same class of unit (``0.129 s`` is ``129 ms``, ``13.5 MiB`` is 14,155,776 bytes), as a
percentage (``0.09`` is ``9%``), or as a bare number (a table's cell, a results field).

What the prose may state without evidence is one reviewed list, ``CONSTANTS`` below: the
numbers of the text itself (chapter and cell numbers, "2 ranks", "rank 8", "80/20"), each
with its reason. Numbers inside code spans, code blocks, links' targets and math are the
code's, not claims about a run, and are not read.

What it cannot do: a number of one significant digit ("2", "0.5") is found in almost any
evidence, and a stated number can match an unrelated stored value that happens to round to
it; so the check catches a sentence written for another run, not every wrong number. Where a
sentence states a run's numbers, the chapters print it from the values instead
(``IPython.display.Markdown``), and then there is nothing to drift.

Exit status 0 when every number is found, 1 otherwise (each missing number printed with its
file, cell and sentence), 2 on bad arguments. ``tests/test_prose_numbers.py`` runs it on the
six chapters, their exercise notebooks, the three READMEs and ``docs/WORKSHOP.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXERCISES = sorted((REPO / "notebooks" / "exercises").glob("[0-9][0-9]_*.ipynb"))
DEFAULT_FILES = CHAPTERS + EXERCISES + [  # the chapters, their exercises, the Markdown
    REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "notebooks" / "README.md",
    REPO / "docs" / "WORKSHOP.md"]

# A number as prose writes it: 4,900 or 4900 or 1.43 or 2.0e-3 or 2.0e-03, with an optional
# minus. Not part of a word or identifier (SmolLM2, ZeRO-3, 0.32.2, 2026-12-05 are skipped
# by the context rules below).
NUMBER = re.compile(r"(?<![\w.\-/])(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
                    r"(?![\w.]*\d)(?!-\w)")
APPROXIMATE = re.compile(r"(about|around|roughly|nearly|almost|over|under|some|~|≈|at least|"
                         r"at most|more than|less than|up to)\s*$", re.I)

# The text's own numbers: (pattern around the number, why it needs no evidence). The pattern
# is matched against the sentence with the number replaced by "#" ("Y#" for one that could be a
# year); keep this list short.
CONSTANTS: list[tuple[str, str]] = [
    (r"(et al\.?,?\s*\(?|\(|\w,\s+)Y#[),:;]", "a citation's year (Amdahl (1967), Hu et al. 2021)"),
    (r"et al\.?,?\s*\(?((19|20)\d\d|Y#)(?!\d)",
     "a number the sentence attributes to a cited work (Goyal et al. (2017): 8,192 on 256 GPUs)"),
    (r"\b(macOS|Python|MPI|mlx|MLX|mlx-lm|mlx_lm|Debian|Ubuntu|Homebrew|bash|version|"
     r"llama-cpp-python|gguf|TensorBoard|nbval|JupyterLab) #", "a version"),
    (r"\bdefault #", "an option's default, which --help prints"),
    (r"\b(exit status|exited|exits|exit code)\s#", "a process's exit status (2, 137, 255)"),
    (r"\b(chapters?|ch|cells?|sections?|steps? \d+ and|issue|part|lane|stage|stages|figure)\s*#",
     "a reference to a chapter, cell, section or figure"),
    (r"\bchapters? [\d, ]*(and|or|to) #", "a reference to chapters"),
    (r"#\s*(ranks?|processes|machines|hosts|laptops|Macs|GPUs?|nodes|workers|slots)\b",
     "the world size a sentence talks about"),
    (r"\b(rank|ranks|world size|-np|-n|np|N)\s*=?\s*#", "a rank or world size"),
    (r"\b(LoRA )?rank #", "the LoRA rank"),
    (r"#\s*/\s*[\dN]", "a split or fraction of the text (80/20, 1/N)"),
]


@dataclass
class Claim:
    """One number a markdown cell states."""

    where: str          # file, cell
    sentence: str
    text: str           # as written
    value: float
    tolerance: float    # half a unit of the last stated digit
    unit: str           # the text right after the number


def strip_code(markdown: str) -> str:
    """The prose of ``markdown`` without code blocks, code spans, math, link targets, HTML
    tags and list markers."""
    # The reading-time line and table: scripts/reading_time.py writes them from the stored
    # run, tests/test_reading_time.py checks them.
    text = re.sub(r"\*Reading time: [^*]*\*", " ", markdown)
    text = re.sub(r"<!-- reading times.*?<!-- end reading times -->", " ", text, flags=re.S)
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\$\$.*?\$\$|\$[^$\n]*\$", " ", text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = re.sub(r"https?://\S+", " ", text)
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"^\s*(\d+\.|[-*])\s+", " ", text, flags=re.M)
    text = re.sub(r"^(#+\s*)\d+\.", r"\1", text, flags=re.M)      # "## 2. Section"
    text = re.sub(r"\b\d{4}-\d{2}-\d{2}\b", " ", text)           # dates
    text = re.sub(r"[\w\-]+/[\w\-]+#\d+", " ", text)            # owner/repo#123
    return text


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.;:!?])(?<!et al\.)(?<!e\.g\.)(?<!i\.e\.)\s+(?=[A-Z(*])|\n\s*\n|\|", text)
            if s.strip()]


def precision(number: str, before: str) -> float:
    """Half a unit of the last digit ``number`` states; trailing zeros of a whole number
    count only when the prose does not say it is approximate."""
    plain = number.replace(",", "").lstrip("-")
    mantissa, _, exponent = plain.lower().partition("e")
    scale = 10.0 ** int(exponent) if exponent else 1.0
    if "." in mantissa:
        return 0.5 * 10.0 ** -len(mantissa.split(".")[1]) * scale
    zeros = len(mantissa) - len(mantissa.rstrip("0")) if mantissa.strip("0") else 0
    if zeros and APPROXIMATE.search(before):
        # "about 4,900": to its last non-zero digit; "about 2,000": to two significant
        # digits at most (not +-500).
        return 0.5 * 10.0 ** min(zeros, max(0, len(mantissa) - 2)) * scale
    return 0.5 * scale


def claims(markdown: str, where: str) -> list[Claim]:
    """The numbers ``markdown`` states that the constants list does not explain."""
    found = []
    for sentence in sentences(strip_code(markdown)):
        for m in NUMBER.finditer(sentence):
            text = m.group(1)
            # "#" stands for the number; "Y#" for one that could be a year (1900-2099).
            token = "Y#" if re.fullmatch(r"(19|20)\d\d", text) else "#"
            marked = sentence[:m.start(1)] + token + sentence[m.end(1):]
            if any(re.search(p, marked, re.I) for p, _ in CONSTANTS):
                continue
            value = float(text.replace(",", ""))
            found.append(Claim(where, sentence, text, value,
                               precision(text, sentence[:m.start(1)]),
                               sentence[m.end(1):m.end(1) + 12]))
    return found


# Units: the class a unit measures and its size in that class's base unit.
UNITS = {"ns": ("time", 1e-9), "us": ("time", 1e-6), "µs": ("time", 1e-6),
         "μs": ("time", 1e-6), "ms": ("time", 1e-3), "s": ("time", 1.0), "sec": ("time", 1.0),
         "second": ("time", 1.0), "seconds": ("time", 1.0), "min": ("time", 60.0),
         "minute": ("time", 60.0), "minutes": ("time", 60.0), "h": ("time", 3600.0),
         "hours": ("time", 3600.0), "B": ("bytes", 1.0), "byte": ("bytes", 1.0),
         "bytes": ("bytes", 1.0), "KB": ("bytes", 1e3), "kB": ("bytes", 1e3),
         "MB": ("bytes", 1e6), "GB": ("bytes", 1e9), "TB": ("bytes", 1e12),
         "KiB": ("bytes", 2.0 ** 10), "MiB": ("bytes", 2.0 ** 20), "GiB": ("bytes", 2.0 ** 30),
         "TiB": ("bytes", 2.0 ** 40), "%": ("fraction", 0.01), "x": ("ratio", 1.0),
         "×": ("ratio", 1.0), "k": ("count", 1e3), "thousand": ("count", 1e3),
         "M": ("count", 1e6), "million": ("count", 1e6), "billion": ("count", 1e9)}
UNIT = re.compile(r"\s?(" + "|".join(sorted(map(re.escape, UNITS), key=len, reverse=True))
                  + r")(?![A-Za-z0-9])")
# A JSON key's unit, from its name (step_s, wait_ms, peak_bytes, grad_mib).
KEY_UNITS = [(re.compile(p, re.I), u) for p, u in [
    (r"(_|^)(ms)$", "ms"), (r"(_|^)(us)$", "us"), (r"(_|^)(s|sec|secs|seconds)$", "s"),
    (r"bytes$", "B"), (r"(_|^)mib$", "MiB"), (r"(_|^)gib$", "GiB"), (r"(_|^)mb$", "MB"),
    (r"(_|^)gb$", "GB"), (r"(_|^)kib$", "KiB")]]

# Fields of a results file that describe the machine rather than the measurement (load
# averages, core counts): numbers the prose never cites, which would only match by chance.
IGNORED_KEYS = {"machine", "load_average", "loadavg", "uptime"}

Number = tuple  # (value, unit or ""): a number of the evidence as written


def unit_after(text: str) -> str:
    """The unit written at the start of ``text``, or ''."""
    m = UNIT.match(text)
    return m.group(1) if m else ""


def numbers_in(text: str) -> list[Number]:
    """Every number written in ``text`` (outputs, code), with the unit written after it."""
    out = []
    for m in re.finditer(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?", text):
        s = m.group(0).rstrip(",")
        try:
            out.append((float(s.replace(",", "")), unit_after(text[m.end():m.end() + 10])))
        except ValueError:
            continue
    return out


def json_numbers(path: Path) -> list[Number]:
    """Every number of a results file, with the unit its key names."""
    def unit_of(key: str) -> str:
        return next((u for p, u in KEY_UNITS if p.search(key)), "")

    def walk(x, key=""):
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            yield (float(x), unit_of(key))
        elif isinstance(x, dict):
            for k, v in x.items():
                if k not in IGNORED_KEYS:
                    yield from walk(v, str(k))
        elif isinstance(x, list):
            for v in x:
                yield from walk(v, key)
        elif isinstance(x, str):
            yield from numbers_in(x)
    return list(walk(json.loads(path.read_text())))


RESULTS = re.compile(r"(?:benchmarks/)?results/([\w\-]+\.json)")


def cited_results(text: str) -> list[Path]:
    return sorted({REPO / "benchmarks" / "results" / name for name in RESULTS.findall(text)
                   if (REPO / "benchmarks" / "results" / name).exists()})


def found(claim: Claim, evidence: list[Number]) -> bool:
    """Whether some number of ``evidence`` equals the claim to its stated precision: in the
    same class of unit (``0.129 s`` is ``129 ms``), or written without a unit (a table's
    column, a results file's field): then as it stands, for a percentage as a fraction, for
    ``333.5M`` as 333,500,000. A claim without a unit (a table's cell) matches a number as it
    stands, whatever the unit written or named beside it."""
    kind, size = UNITS.get(unit_after(claim.unit), ("", 1.0))
    target, tolerance = claim.value * size, claim.tolerance * size * 1.0001
    for value, unit in evidence:
        if unit:
            ekind, esize = UNITS[unit]
            if ekind == kind and abs(value * esize - target) <= tolerance:
                return True
        elif abs(value - claim.value) <= claim.tolerance * 1.0001 or (
                kind in ("fraction", "count") and abs(value - target) <= tolerance):
            return True
        if unit and not kind and abs(value - claim.value) <= claim.tolerance * 1.0001:
            return True     # a table's cell ("1.89" under "peak GB") and a field peak_gb
    return False


def notebook_parts(path: Path) -> tuple[list[tuple[str, str]], str]:
    """The markdown cells (where, text) of a notebook, and its evidence text: every code
    cell's source and stored text outputs."""
    nb = json.loads(path.read_text())
    markdown, evidence = [], []
    for i, cell in enumerate(nb["cells"]):
        src = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            markdown.append((f"{path.name} cell {i}", src))
            continue
        evidence.append(src)
        for out in cell.get("outputs", []):
            if "text" in out:
                evidence.append("".join(out["text"]))
            for kind, data in out.get("data", {}).items():
                if kind.startswith("text/") and kind != "text/html":
                    evidence.append("".join(data))
    return markdown, "\n".join(evidence)


def markdown_parts(path: Path) -> tuple[list[tuple[str, str]], str]:
    """A Markdown file's sections (where, text), cut at its headings (not at a ``#`` line
    inside a code block); its evidence is its own code blocks (printed output quoted in it)."""
    text = path.read_text()
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    parts, start, lines, fenced = [], 1, [], False
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,3} ", line) and lines:
            parts.append((f"{name} line {start}", "".join(lines)))
            start, lines = number, []
        lines.append(line)
    parts.append((f"{name} line {start}", "".join(lines)))
    quoted = "\n".join(re.findall(r"```.*?```", text, flags=re.S))
    return parts, quoted


def check(path: Path) -> list[Claim]:
    """The claims of ``path`` that no evidence carries."""
    if path.suffix == ".ipynb":
        parts, evidence_text = notebook_parts(path)
        all_text = evidence_text + "\n".join(t for _, t in parts)
        results = cited_results(all_text)
    else:
        # A README speaks for the whole course: its evidence is every chapter's outputs
        # and every stored results file.
        parts, evidence_text = markdown_parts(path)
        evidence_text += "\n".join(notebook_parts(nb)[1] for nb in CHAPTERS)
        results = sorted((REPO / "benchmarks" / "results").glob("*.json"))
    evidence = numbers_in(evidence_text)
    for file in results:
        evidence += json_numbers(file)
    missing = []
    for where, text in parts:
        missing += [c for c in claims(text, where) if not found(c, evidence)]
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="default: the chapters and READMEs")
    args = parser.parse_args(argv)
    files = [f.resolve() for f in args.files] or DEFAULT_FILES
    bad = [f for f in files if not f.exists()]
    if bad:
        parser.error(f"no such file: {bad[0]}")
    total = 0
    for path in files:
        missing = check(path)
        total += len(missing)
        name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        print(f"{'PASS' if not missing else 'FAIL'} {name}: "
              f"{len(missing)} number(s) the evidence does not carry")
        for c in missing:
            print(f"  {c.where}: {c.text} in \"{c.sentence[:160]}\"")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
