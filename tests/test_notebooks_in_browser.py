"""Every chapter, opened in JupyterLab in headless Chromium, shows its stored results.

Skips where Chromium is not installed (Debian: apt-get install chromium)."""

import shutil

import pytest
from conftest import PY, REPO, run

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None
                                and shutil.which("chromium-browser") is None,
                                reason="Chromium is not installed (apt-get install chromium)")
SCRIPT = REPO / "scripts" / "check_notebooks_in_browser.py"


@pytest.mark.slow
def test_every_chapter_renders_its_outputs():
    proc = run([PY, SCRIPT], check=False, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASS") == len(list((REPO / "notebooks").glob("[0-9]*.ipynb")))


def test_the_check_fails_on_a_widget_that_did_not_render(tmp_path):
    """A stored ipywidgets progress bar without its widget state (what chapter 4 once had)
    shows its text form, HBox(children=...), and the check says so."""
    import nbformat

    notebook = tmp_path / "widget_check.ipynb"
    widget = nbformat.v4.new_output(
        "display_data", data={"text/plain": "HBox(children=(IntProgress(value=0, max=10),))",
                              "application/vnd.jupyter.widget-view+json": {
                                  "model_id": "0" * 32, "version_major": 2, "version_minor": 0}})
    cell = nbformat.v4.new_code_cell("progress()", execution_count=1, outputs=[widget])
    nb = nbformat.v4.new_notebook(cells=[cell], metadata={"kernelspec": {
        "name": "course-mlx", "display_name": "Python (course-mlx)", "language": "python"}})
    nbformat.write(nb, notebook)
    proc = run([PY, SCRIPT, notebook], check=False, timeout=600)
    assert proc.returncode == 1 and "the page shows 'HBox(children='" in proc.stdout


def test_the_check_fails_on_a_page_without_a_stored_figure(tmp_path):
    """A page that shows another picture than the one the notebook stores fails, even one of
    the same size (whose PNG header is the same)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_in_browser", SCRIPT)
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    import nbformat

    header = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"        # the same for every figure of one size
    stored, stale = header + "Q" * 200, header + "R" * 200
    cell = nbformat.v4.new_code_cell("plot()", execution_count=1, outputs=[nbformat.v4.new_output(
        "display_data", data={"image/png": stored, "text/plain": "<Figure>"})])
    notebook = tmp_path / "figure.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), notebook)
    want = checker.expected(notebook)
    page = '<div class="jp-Notebook"><img src="data:image/png;base64,{}"></div>'
    assert checker.check(page.format(stored), want) == []
    assert checker.check(page.format(stale), want) == ["1 stored figure(s) not on the page"]
