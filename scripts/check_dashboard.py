"""Check the training dashboard in a real browser: start ``python -m course_lib.monitor`` on
a run's folder, open it in headless Chromium, and find every rank's loss series in the
rendered page.

    .venv/bin/python scripts/check_dashboard.py                 # makes a 2-rank run first
    .venv/bin/python scripts/check_dashboard.py runs/two        # a run made with --report-to tensorboard
    .venv/bin/python scripts/check_dashboard.py runs/two --screenshot docs/dashboard.png

It passes when TensorBoard's ``train_loss`` chart, as the browser rendered it, lists the
series ``global`` and ``rankR-HOST`` for every rank in ``metrics.jsonl``, each at the run's
last reported step with the loss ``metrics.jsonl`` holds for it (TensorBoard shows 4-5
digits: compared to 1e-3 relative). Exit status 0: passed; 1: not found before
``--timeout``; 2: bad input; 3: no Chromium (install Debian's: ``apt-get install
chromium``; the test suite skips then).

The browser is driven over Chromium's DevTools protocol on a pipe (``--remote-debugging-
pipe``: JSON messages ending in a NUL byte on file descriptors 3 and 4, no extra package),
reading the page every second until the series are there. ``--dump-dom`` with a
``--virtual-time-budget`` is not used: TensorBoard draws a chart only when an
IntersectionObserver says it is on screen, and under virtual time the chart was there in
only 10 of 17 tries here (budgets of 5 to 60 s).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The flags of a headless Chromium run as root in a container, with nothing from outside.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
NO_BROWSER = 3

# Each scalar card of TensorBoard's Time Series page: its tag, the header of its data table
# and the table's rows (a colour cell, run, smoothed, value, step, relative time).
CARDS_JS = """JSON.stringify(Array.from(document.querySelectorAll('scalar-card')).map(card => ({
  tag: (card.querySelector('tb-truncated-path.tag') || {title: null}).title,
  header: Array.from(card.querySelectorAll('tb-data-table-header-cell'))
               .map(c => c.innerText.trim()),
  rows: Array.from(card.querySelectorAll('tb-data-table-content-row')).map(
    r => Array.from(r.querySelectorAll('tb-data-table-content-cell'))
              .map(c => c.innerText.trim()))})))"""


def find_browser(name: str | None = None) -> str | None:
    """The path of Chromium (or ``name``), or None when none is installed."""
    for candidate in [name] if name else BROWSERS:
        path = shutil.which(candidate)
        if path:
            return path
    return None


def expected_series(run_dir: Path) -> dict[str, tuple[int, float]]:
    """run name -> (last iteration, train loss there) from ``metrics.jsonl``: ``global``
    from the train records, ``rankR-HOST`` from the per-rank records."""
    from course_lib import metrics
    from course_lib.fine_tune.callbacks import run_name

    series = {}
    for r in metrics.read(run_dir):
        if r["split"] == "train":
            series["global"] = (r["iteration"], r["loss"])
        elif r["split"] == "rank":
            series[run_name(r["rank"], r["host"])] = (r["iteration"], r["loss"])
    return series


def start_monitor(run_dir: Path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """``python -m course_lib.monitor RUN_DIR --port 0`` in the background; returns the
    process and the URL it printed. Raises RuntimeError when it prints none in time."""
    proc = subprocess.Popen([sys.executable, "-m", "course_lib.monitor", str(run_dir),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],
                     daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if " at http" in line:
            return proc, line.split(" at ")[1].split()[0]
    proc.kill()
    raise RuntimeError(f"the monitor printed no URL: {proc.stderr.read()[-2000:]}")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, path: str, width: int = 1700, height: int = 1040):
        self.profile = tempfile.mkdtemp(prefix="course-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()

        def child_fds():  # Chromium reads commands on fd 3, writes answers on fd 4
            os.dup2(cmd_r, 3)
            os.dup2(resp_w, 4)

        # Without LD_PRELOAD: the OpenBLAS that scripts/test.sh preloads for MLX makes
        # Chromium's GPU process fail ("GPU process isn't usable. Goodbye.").
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        self.log = open(Path(self.profile) / "chromium.log", "w+")
        self.proc = subprocess.Popen(
            [path, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "--remote-debugging-pipe", "about:blank"],
            preexec_fn=child_fds, close_fds=False, env=env, stdout=self.log, stderr=self.log)
        os.close(cmd_r)
        os.close(resp_w)
        self._buffer, self._id, self.size = b"", 0, (width, height)
        self.session = None

    def call(self, method: str, timeout: float = 30, **params):
        """Send one command (to the page once :meth:`open` attached one); its result."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._id:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._resp_r], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {method} in {timeout} s")
            chunk = os.read(self._resp_r, 1 << 20)
            if not chunk:
                self.log.seek(0)
                raise RuntimeError("Chromium exited: " + self.log.read()[-2000:])
            self._buffer += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        width, height = self.size
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._cmd_w)
        os.close(self._resp_r)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def shown_series(cards: list[dict], tag: str) -> dict[str, tuple[int, float]]:
    """run -> (step, value) in the data table of the card for ``tag``."""
    shown = {}
    for card in cards:
        if card["tag"] != tag or "Run" not in card["header"]:
            continue
        col = {name: i for i, name in enumerate(card["header"])}
        for row in card["rows"]:
            try:
                shown[row[col["Run"]]] = (int(row[col["Step"]].replace(",", "")),
                                          float(row[col["Value"]].replace(",", "")))
            except (KeyError, IndexError, ValueError):
                continue
    return shown


def missing(expected: dict, shown: dict) -> list[str]:
    """The expected series the page does not show as expected (empty: all there)."""
    wrong = []
    for run, (step, loss) in expected.items():
        got = shown.get(run)
        if got is None or got[0] != step or abs(got[1] - loss) > 1e-3 * abs(loss):
            wrong.append(f"{run}: expected step {step} loss {loss:.4f}, page shows {got}")
    return wrong


def make_run(folder: Path) -> None:
    """A 2-rank fine-tune of the tiny model under mpirun with --report-to tensorboard."""
    from course_lib.launch import child_env, fine_tune_command

    cmd = fine_tune_command(folder, ranks=2, args=[
        "--model", "tiny", "--iters", "40", "--steps-per-report", "2", "--steps-per-eval",
        "10", "--val-batches", "2", "--save-every", "1000", "--report-to", "tensorboard"])
    print("making a run:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=child_env())


def check(run_dir: Path, browser_path: str, timeout: float, screenshot: Path | None) -> int:
    expected = expected_series(run_dir)
    if len(expected) < 2:
        print(f"error: {run_dir}/metrics.jsonl has no train or per-rank records",
              file=sys.stderr)
        return 2
    monitor, url = start_monitor(run_dir)
    browser = Browser(browser_path)
    try:
        page = f"{url}?tagFilter=train_loss#timeseries"
        browser.open(page)
        tic = time.monotonic()
        deadline, wrong = tic + timeout, ["nothing read yet"]
        while time.monotonic() < deadline:
            time.sleep(1.0)
            wrong = missing(expected, shown_series(json.loads(
                browser.evaluate(CARDS_JS) or "[]"), "train_loss"))
            if not wrong:
                break
        if wrong:
            print(f"FAIL: {page} in Chromium does not show: " + "; ".join(wrong))
            return 1
        print(f"PASS: {page} in Chromium shows train_loss for " + ", ".join(
            f"{run} (step {s}: {v:.4f})" for run, (s, v) in expected.items())
            + f" ({time.monotonic() - tic:.0f} s after opening it)", flush=True)
        if screenshot:
            # Six charts, unsmoothed (TensorBoard's default smoothing, 0.6, bends a short
            # run's lines), every point in range, settings pane closed: TensorBoard keeps
            # these settings in the browser's localStorage.
            browser.evaluate("localStorage.setItem('_tb_global_settings', JSON.stringify("
                             "{scalarSmoothing: 0, ignoreOutliers: false, "
                             "timeSeriesSettingsPaneOpened: false}))")
            wanted = ["train_loss", "tokens_per_second", "peak_memory", "step_seconds",
                      "forward_backward_seconds", "all_reduce_wait_seconds"]
            browser.call("Page.navigate", url=f"{url}?tagFilter={'|'.join(wanted)}#timeseries")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                time.sleep(1.0)
                cards = json.loads(browser.evaluate(CARDS_JS) or "[]")
                if all(shown_series(cards, tag) for tag in wanted):
                    break
            time.sleep(2.0)  # let the charts finish drawing
            browser.screenshot(screenshot)
            print(f"screenshot: {screenshot}")
        return 0
    finally:
        browser.close()
        monitor.terminate()
        monitor.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", nargs="?", help="a run made with --report-to tensorboard "
                   "(default: make a 2-rank run of the tiny model in a temporary folder)")
    p.add_argument("--browser", help=f"the browser's command (default: the first of "
                   f"{', '.join(BROWSERS)} on PATH)")
    p.add_argument("--screenshot", type=Path, help="also save a PNG of the dashboard here")
    p.add_argument("--timeout", type=float, default=90,
                   help="seconds to wait for the page to show the series (default 90)")
    a = p.parse_args(argv)
    browser = find_browser(a.browser)
    if browser is None:
        print(f"no browser: none of {a.browser or ', '.join(BROWSERS)} is on PATH "
              "(Debian: apt-get install chromium)", file=sys.stderr)
        return NO_BROWSER
    if a.run_dir:
        run_dir = Path(a.run_dir)
        if not (run_dir / "metrics.jsonl").is_file():
            print(f"error: {run_dir} has no metrics.jsonl: give a fine-tune's --adapter-path",
                  file=sys.stderr)
            return 2
        return check(run_dir, browser, a.timeout, a.screenshot)
    with tempfile.TemporaryDirectory() as tmp:
        make_run(Path(tmp) / "run")
        return check(Path(tmp) / "run", browser, a.timeout, a.screenshot)


if __name__ == "__main__":
    sys.exit(main())
