"""Executed notebooks as HTML reports a reader opens without a kernel (``zsad report``, ``make report``).

Each notebook is rendered by nbconvert's :class:`~nbconvert.HTMLExporter` (JupyterLab template): figures are inline
``data:image/png`` URIs and markdown images are embedded (``embed_images``), so one .html file holds everything.
Widgets: a notebook executed here (papermill, i.e. nbclient with ``store_widget_state=True``) keeps every widget's
state in ``metadata.widgets["application/vnd.jupyter.widget-state+json"]``; the exporter writes that state into
the page, and the page loads the widgets' HTML manager (from a CDN, as nbconvert does) to draw them. The explorer's
map is a PNG in its Image widget, so it is in that state too. A notebook saved from JupyterLab keeps
widget state only with "Save Widget State Automatically" (Settings menu).

    zsad report outputs/run1/02_prompt_learning.ipynb --out reports            # already executed notebooks
    zsad report notebooks --execute --preset quick --out reports                 # run them first (papermill)
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["WIDGET_STATE", "find_notebooks", "is_executed", "execute_notebook", "render_html", "build_reports"]

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"  # the metadata.widgets key nbclient and JupyterLab write


def find_notebooks(paths: Iterable[str | Path]) -> list[Path]:
    """.ipynb files named, and those under named folders (recursively, without .ipynb_checkpoints), in a stable
    order; a missing path is an error naming it."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found.extend(p for p in sorted(entry.rglob("*.ipynb")) if ".ipynb_checkpoints" not in p.parts)
        elif entry.suffix == ".ipynb" and entry.is_file():
            found.append(entry)
        else:
            raise FileNotFoundError(f"{entry}: not a notebook (.ipynb) or a folder of notebooks")
    if not found:
        raise FileNotFoundError(f"no notebooks (.ipynb) in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def is_executed(notebook) -> bool:
    """Whether any code cell of a notebook (an nbformat node) has run: an execution count or an output."""
    return any(cell.cell_type == "code" and (cell.get("execution_count") is not None or cell.get("outputs"))
               for cell in notebook.cells)


def execute_notebook(path: str | Path, executed_path: str | Path, parameters: dict | None = None,
                     kernel_name: str = "python3", progress: bool = True) -> Path:
    """Run a notebook with papermill (the sweep runner: in the notebook's folder, so its relative paths work,
    failing on a parameters cell papermill cannot read); nbclient keeps widget state (``store_widget_state``).

    ``parameters`` the notebook does not declare are left out (e.g. ``preset`` for a notebook without one)."""
    from .sweep.execute import execute_notebook as run_notebook

    path, executed_path = Path(path), Path(executed_path)
    declared = _declared(path)
    executed_path.parent.mkdir(parents=True, exist_ok=True)
    with _inline_figures():
        run_notebook(path, executed_path, {k: v for k, v in (parameters or {}).items() if k in declared},
                     cwd=path.resolve().parent, kernel_name=kernel_name, progress=progress)
    return executed_path


@contextmanager
def _inline_figures():
    """The kernel inherits this process's environment: an ``MPLBACKEND`` set here (``Agg`` in a headless shell or
    a test run) would replace the kernel's inline backend and leave every figure out of the report."""
    saved = os.environ.pop("MPLBACKEND", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MPLBACKEND"] = saved


def render_html(notebook_path: str | Path, html_path: str | Path) -> Path:
    """One self-contained HTML page (figures inline, widget state embedded) of an executed notebook."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook_path, html_path = Path(notebook_path), Path(html_path)
    notebook = _executed(notebook_path)
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(notebook, resources={"metadata": {"name": notebook_path.stem,
                                                                            "path": str(notebook_path.parent)}})
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(body, encoding="utf-8")
    return html_path


def build_reports(paths: Sequence[str | Path], out: str | Path, execute: bool = False, preset: str | None = None,
                  progress: bool = True) -> list[Path]:
    """HTML reports of notebooks into ``out`` (``<name>.html``).

    execute: run each notebook first (papermill) into ``out/<name>.ipynb``, with ``preset`` when given and its
    ``output_dir`` set to ``out/<name>`` (figures and metrics.json beside the report); otherwise each notebook
    must already hold outputs."""
    out = Path(out)
    notebooks = find_notebooks(paths)
    for path in notebooks:  # check them all before running or writing anything
        if not execute:
            _executed(path)
        elif preset is not None and "preset" not in _declared(path):
            raise ValueError(f"{path}: has no 'preset' parameter; run it with its own parameters and pass the "
                             "executed notebook")
    pages = []
    for path in notebooks:
        source = path
        if execute:
            parameters = {"output_dir": str((out / path.stem).resolve())}
            if preset is not None:
                parameters["preset"] = preset
            source = execute_notebook(path, out / f"{path.stem}.ipynb", parameters, progress=progress)
        pages.append(render_html(source, out / f"{path.stem}.html"))
    return pages


def _executed(path: Path):
    """The notebook at ``path``; one-line error when it was never run."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    if not is_executed(notebook):
        raise ValueError(f"{path}: has no outputs (never run); run it first or pass --execute")
    return notebook


def _declared(path: Path) -> dict:
    """The parameters a notebook's ``parameters`` cell declares (papermill's reading of it)."""
    import papermill

    return papermill.inspect_notebook(str(path))
