"""Open every chapter in JupyterLab, in a real (headless) browser, the way a reader who opens
a chapter without running it sees it, and check what is on the page.

    .venv/bin/python scripts/check_notebooks_in_browser.py [NOTEBOOK ...] [--screenshots DIR]

For each notebook (default: all of notebooks/*.ipynb) it starts JupyterLab on localhost
(its own settings folder: cells rendered all at once rather than as they scroll into view),
loads the notebook's page in Debian's headless Chromium, and reads the rendered page: it
fails when the page shows ``HBox(children=`` (a widget that did not render),
``Traceback``, or fewer images than the notebook stores plots, or a stored figure that is
not among them, or when one of the first
three stored text outputs (their first line) is missing. Exit status 0 when every notebook passes, 1 otherwise, 2 when Chromium or
JupyterLab is missing. ``tests/test_notebooks_in_browser.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars"]


def browser() -> str | None:
    """The Chromium executable, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root: Path, settings: Path, port: int, token: str) -> subprocess.Popen:
    """JupyterLab on 127.0.0.1:``port`` serving the folder ``root``, rendering every cell
    at once."""
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
           "--ip=127.0.0.1", f"--IdentityProvider.token={token}", "--allow-root",
           f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={settings}",
           f"--LabApp.workspaces_dir={settings / 'workspaces'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("JupyterLab exited at start") from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("JupyterLab did not answer within 60 s")


def render(chrome: str, url: str, profile: Path, screenshot: Path | None,
           budget_ms: int = 40000) -> str:
    """The page's DOM after ``budget_ms`` of (virtual) time, as Chromium rendered it."""
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--virtual-time-budget={budget_ms}", "--window-size=1280,2000"]
    # The browser gets no LD_PRELOAD: the course's test command preloads OpenBLAS, and
    # Chromium started with it renders nothing.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if screenshot is not None:
        subprocess.run([chrome, *flags, f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=180, env=env)
    proc = subprocess.run([chrome, *flags, "--dump-dom", url], capture_output=True, text=True,
                          timeout=180, env=env)
    return proc.stdout


def expected(notebook: Path) -> dict:
    """What a reader must see: the stored plots (80 characters from the middle of each PNG's
    base64, past the header that every figure of one size shares, which the page's
    ``<img src="data:image/png;base64,...">`` must carry), and a few stored text lines."""
    nb = json.loads(notebook.read_text())
    plots, lines, pictures = 0, [], []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data:  # shown as the picture: its text/plain is not on the page
                plots += 1
                png = "".join(data["image/png"]).replace("\n", "")
                pictures.append(png[len(png) // 2:len(png) // 2 + 80])  # past the header
                continue
            text = "".join(out.get("text", "") or data.get("text/plain", "")).strip().splitlines()
            if text and len(lines) < 3 and len(text[0]) > 20:
                lines.append(text[0][:60])
    return {"plots": plots, "lines": lines, "pictures": pictures}


def check(dom: str, want: dict) -> list[str]:
    """What is wrong with the rendered page ``dom`` for a notebook expecting ``want``."""
    text = re.sub(r"<[^>]+>", " ", dom)
    text = (text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
            .replace("&quot;", '"').replace("&#39;", "'"))
    problems = []
    if "jp-Notebook" not in dom:
        problems.append("no notebook on the page (JupyterLab did not render it)")
    for marker in ("HBox(children=", "Traceback"):
        if marker in text:
            problems.append(f"the page shows {marker!r}")
    images = len(re.findall(r'<img[^>]+src="data:image/png', dom))
    if images < want["plots"]:
        problems.append(f"{images} plots on the page, {want['plots']} stored")
    shown = sum(p in dom for p in want.get("pictures", []))
    if shown < len(want.get("pictures", [])):
        problems.append(f"{len(want['pictures']) - shown} stored figure(s) not on the page")
    squashed = " ".join(text.split())
    for line in want["lines"]:
        if " ".join(line.split()) not in squashed:
            problems.append(f"stored output missing from the page: {line!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebooks", nargs="*", type=Path)
    p.add_argument("--screenshots", type=Path, help="save a PNG of each page here")
    a = p.parse_args(argv)
    chrome = browser()
    if chrome is None:
        print("no Chromium: install Debian's chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None:
        print("no JupyterLab in this environment: bash scripts/setup.sh", file=sys.stderr)
        return 2
    notebooks = [nb.resolve() for nb in a.notebooks] or sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    roots = {nb.parent for nb in notebooks}
    if len(roots) != 1:
        print("give notebooks of one folder at a time", file=sys.stderr)
        return 2
    if a.screenshots:
        a.screenshots.mkdir(parents=True, exist_ok=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        port, token = free_port(), secrets.token_hex(16)
        lab = start_lab(roots.pop(), Path(tmp) / "settings", port, token)
        try:
            for nb in notebooks:
                url = f"http://127.0.0.1:{port}/lab/tree/{nb.name}?token={token}&reset"
                shot = a.screenshots / f"{nb.stem}.png" if a.screenshots else None
                dom = render(chrome, url, Path(tmp) / f"profile-{nb.stem}", shot)
                problems = check(dom, expected(nb))
                failed += bool(problems)
                print(f"{'PASS' if not problems else 'FAIL'}  {nb.name}"
                      + "".join(f"\n      {m}" for m in problems), flush=True)
        finally:
            lab.terminate()
            lab.wait(timeout=30)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    sys.exit(main())
