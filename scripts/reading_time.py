"""Each chapter's reading time: its prose at 200 words a minute, plus the time its cells ran.

    .venv/bin/python scripts/reading_time.py           # the table
    .venv/bin/python scripts/reading_time.py --write   # write each chapter's line and the table

The words are those of the markdown cells (code cells, code blocks, outputs and math not
counted: a reader looks at them at their own pace; inline code such as `mpirun` is read as
words and counted). The run time is the wall time the stored outputs took: from the
first cell's start to the last cell's end, as Jupyter records them in each cell's metadata
(``metadata.execution``), so it is the time of the run whose outputs the chapter stores.

``--write`` puts the line ``*Reading time: about N minutes ... running it: ...*`` at the end
of each chapter's first markdown cell (replacing the one there) and the table between the
markers in ``notebooks/README.md``. ``tests/test_reading_time.py`` checks that both say what
this script measures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
README = REPO / "notebooks" / "README.md"
WORDS_PER_MINUTE = 200
LINE = re.compile(r"\n*\*Reading time: [^*]*\*\s*$")
BEGIN, END = "<!-- reading times: scripts/reading_time.py --write -->", "<!-- end reading times -->"


def prose_words(nb: dict) -> int:
    """Words of the markdown cells, without code, math, HTML and the reading-time line."""
    words = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        text = LINE.sub("", "".join(cell["source"]))
        text = re.sub(r"```.*?```|\$\$.*?\$\$|\$[^$\n]*\$|<[^>]+>", " ", text, flags=re.S)
        words += len(re.findall(r"[A-Za-z0-9][\w'’\-./]*", text))
    return words


def run_seconds(nb: dict) -> float:
    """Wall time of the stored run: first cell started to last cell finished, in seconds.

    Raises ValueError when no code cell carries Jupyter's execution timestamps."""
    times = []
    for cell in nb["cells"]:
        ex = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
            times.append((ex["iopub.execute_input"], ex["shell.execute_reply"]))
    if not times:
        raise ValueError("no cell has execution timestamps: re-execute the chapter with "
                         "jupyter nbconvert --execute")
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (parse(max(end for _, end in times)) - parse(min(start for start, _ in times))
            ).total_seconds()


def duration(seconds: float) -> str:
    """``6 seconds``, ``about 4 minutes``: what a reader plans by."""
    if seconds < 90:
        return f"{max(1, round(seconds))} seconds"
    return f"about {round(seconds / 60)} minutes"


def measure(path: Path) -> dict:
    nb = json.loads(path.read_text())
    words = prose_words(nb)
    return {"chapter": path.name, "words": words,
            "read_min": max(1, math.ceil(words / WORDS_PER_MINUTE)), "run_s": run_seconds(nb)}


def line(m: dict) -> str:
    return (f"*Reading time: about {m['read_min']} minutes ({m['words']:,} words at "
            f"{WORDS_PER_MINUTE} a minute); running it: {duration(m['run_s'])} on a 2-core "
            "laptop CPU.*")


def table(rows: list[dict]) -> str:
    out = [BEGIN, "", "| chapter | words | reading | running it here |", "| --- | --- | --- | --- |"]
    for m in rows:
        out.append(f"| `{m['chapter']}` | {m['words']:,} | {m['read_min']} min | "
                   f"{duration(m['run_s'])} |")
    total_read = sum(m["read_min"] for m in rows)
    total_run = sum(m["run_s"] for m in rows)
    out += [f"| all {len(rows)} | {sum(m['words'] for m in rows):,} | {total_read} min | "
            f"{duration(total_run)} |", "",
            f"The series: about {math.ceil((total_read * 60 + total_run) / 60)} minutes, reading "
            "and running.", "", END]
    return "\n".join(out)


def first_markdown(nb: dict) -> dict:
    return next(c for c in nb["cells"] if c["cell_type"] == "markdown")


def write(rows: list[dict]) -> None:
    for path, m in zip(CHAPTERS, rows):
        nb = json.loads(path.read_text())
        cell = first_markdown(nb)
        text = LINE.sub("", "".join(cell["source"])).rstrip("\n") + "\n\n" + line(m)
        cell["source"] = text.splitlines(keepends=True)
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    readme = README.read_text()
    if BEGIN in readme:
        head, rest = readme.split(BEGIN, 1)
        readme = head + table(rows) + rest.split(END, 1)[1]
    else:
        readme = readme.rstrip("\n") + "\n\n## Reading and running times\n\n" + table(rows) + "\n"
    README.write_text(readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true",
                   help="write each chapter's reading-time line and the notebooks' README table")
    args = p.parse_args(argv)
    rows = [measure(path) for path in CHAPTERS]
    if args.write:
        write(rows)
    print(table(rows).replace(BEGIN, "").replace(END, "").strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
