"""zsad report: executed notebooks to self-contained HTML (figures inline, widget state saved)."""
import json
import logging
import os
import re

import nbformat
import pytest

from zsadlib.cli import main
from zsadlib.report import WIDGET_STATE, build_reports, execute_notebook, find_notebooks, render_html

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
INLINE_IMAGE = re.compile(r'<img[^>]+src="data:image/png;base64,')


def tiny_notebook(path, with_outputs=False):
    parameters = nbformat.v4.new_code_cell('title = "untitled"\noutput_dir = "."')
    parameters.metadata["tags"] = ["parameters"]
    cells = [nbformat.v4.new_markdown_cell("# A tiny report"), parameters,
             nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\n\nplt.plot([0, 1], [1, 0])\nplt.title(title)"),
             nbformat.v4.new_code_cell('import ipywidgets\n\nipywidgets.IntSlider(value=3, description="knob")')]
    if with_outputs:
        cells[2].execution_count = 1
        cells[2].outputs = [nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(notebook, path)
    return path


def test_stored_outputs_render_inline_without_a_kernel(tmp_path):
    source = tiny_notebook(tmp_path / "done.ipynb", with_outputs=True)
    html = render_html(source, tmp_path / "html" / "done.html").read_text()
    assert len(INLINE_IMAGE.findall(html)) == 1 and PNG in html
    assert f'<script type="{WIDGET_STATE}">' not in html  # no widget state stored, none written
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "cli")]) == 0
    assert INLINE_IMAGE.search((tmp_path / "cli" / "done.html").read_text())


def test_unrun_notebooks_and_bad_paths_are_one_line_errors(tmp_path, capsys):
    tiny_notebook(tmp_path / "a_done.ipynb", with_outputs=True)
    tiny_notebook(tmp_path / "b_never_run.ipynb")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    tiny_notebook(tmp_path / ".ipynb_checkpoints" / "a_done-checkpoint.ipynb", with_outputs=True)
    assert [p.name for p in find_notebooks([tmp_path])] == ["a_done.ipynb", "b_never_run.ipynb"]
    with pytest.raises(ValueError, match="b_never_run.ipynb: has no outputs"):
        build_reports([tmp_path], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written
    with pytest.raises(FileNotFoundError, match="missing.ipynb"):
        find_notebooks([tmp_path / "missing.ipynb"])
    assert main(["report", str(tmp_path / "a_done.ipynb"), "--preset", "quick", "--out", str(tmp_path / "o")]) == 2
    assert "add --execute" in capsys.readouterr().err
    # a preset only for notebooks that declare one (others would run at their full defaults): nothing runs
    with pytest.raises(ValueError, match="b_never_run.ipynb: has no 'preset' parameter"):
        build_reports([tmp_path / "b_never_run.ipynb"], tmp_path / "out", execute=True, preset="quick")
    assert not (tmp_path / "out").exists()


@pytest.mark.notebook
def test_executed_notebook_keeps_its_figures_and_widget_state(tmp_path, caplog):
    source = tiny_notebook(tmp_path / "tiny.ipynb")
    backend = os.environ.get("MPLBACKEND")  # Agg in the tests: the kernel must still draw inline figures
    with caplog.at_level(logging.WARNING, logger="papermill"):
        executed = execute_notebook(source, tmp_path / "run" / "tiny.ipynb",
                                    {"title": "hello report", "not_a_parameter": 1}, progress=False)
    assert not caplog.records and os.environ.get("MPLBACKEND") == backend
    notebook = nbformat.read(executed, as_version=4)
    injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'title = "hello report"' in injected[0].source
    assert "not_a_parameter" not in injected[0].source
    state = notebook.metadata["widgets"][WIDGET_STATE]["state"]
    slider = [m for m in state.values() if m["model_name"] == "IntSliderModel"]
    assert len(slider) == 1 and slider[0]["state"]["value"] == 3 and slider[0]["state"]["description"] == "knob"

    html = render_html(executed, tmp_path / "tiny.html").read_text()
    assert len(INLINE_IMAGE.findall(html)) == 1  # the plot, inline: no file beside the page
    script = re.search(rf'<script type="{re.escape(WIDGET_STATE)}">\s*(.*?)\s*</script>', html, re.S)
    assert script, "widget state not embedded"
    embedded = json.loads(script.group(1))["state"]
    assert embedded == state  # the whole stored state, so a reader's page draws the slider without a kernel
    assert "application/vnd.jupyter.widget-view+json" in html
