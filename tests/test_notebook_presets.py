"""Notebooks 01-03 as a person uses them: the "quick" preset, parameters cells papermill parses without a warning,
and saves that stay clean in git (nbstripout as the clean filter that `make venv` installs)."""
import io
import json
import logging
import shutil
import subprocess
import tokenize

import nbformat
import pytest

from tests.test_notebooks import ROOT, execute_notebook, notebook_of, parameter_names, smoke_run
from zsadlib.studies import presets

NAMES = sorted(presets.PAPER)
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def parameters_cell(name):
    notebook = nbformat.read(notebook_of(name), as_version=4)
    return next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))


def cell_values(name) -> dict:
    import ast

    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(parameters_cell(name).source).body}


def test_resolve_keeps_explicit_values_and_fills_paper_defaults():
    paper = dict(presets.PAPER["02_prompt_learning"])
    assert presets.resolve("02_prompt_learning", "paper", **paper) == paper
    quick = presets.resolve("02_prompt_learning", "quick", **paper)
    assert quick == presets.QUICK["02_prompt_learning"] and list(quick) == list(paper)  # in the order given
    explicit = presets.resolve("02_prompt_learning", "quick", **dict(paper, epochs=3, lr=0.01))
    assert explicit["epochs"] == 3 and explicit["lr"] == 0.01 and explicit["backbone"] == "tiny"
    # a changed value is explicit even under "paper"; True is not the int 1 (and 518.0 is the paper's 518)
    assert presets.resolve("01_feature_extraction", "paper", **dict(presets.PAPER["01_feature_extraction"],
                                                                    image_size=240))["image_size"] == 240
    assert presets.resolve("03_dual_branch_inference", "quick", **dict(presets.PAPER["03_dual_branch_inference"],
                                                                       image_size=518.0))["image_size"] == 126
    assert not presets._same(True, 1) and presets._same(None, None)
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        presets.resolve("01_feature_extraction", "fast", **presets.PAPER["01_feature_extraction"])
    with pytest.raises(ValueError, match="pass the current value of"):
        presets.resolve("01_feature_extraction", "quick", backbone="tiny")
    with pytest.raises(ValueError, match="no presets for notebook"):
        presets.resolve("99_nope", "quick")


def test_quick_preset_is_small_and_its_size_interpolates():
    tiny = json.loads((ROOT / "zsadlib" / "model_configs" / "tiny.json").read_text())
    native = tiny["vision_cfg"]["image_size"]
    for name in NAMES:
        quick = presets.QUICK[name]
        assert set(quick) == set(presets.PAPER[name])
        assert quick["backbone"] == "tiny" and quick["image_size"] % 14 == 0 and native % quick["image_size"] != 0
        count = quick.get("images_per_class") or quick.get("max_per_class")
        assert count is not None and count <= 4 and quick.get("epochs", 1) == 1


@pytest.mark.parametrize("name", NAMES)
def test_parameters_cell_holds_the_paper_values_and_parses_without_warnings(name, caplog):
    from papermill.translators import PythonTranslator

    values = cell_values(name)
    assert values["preset"] == "paper"
    assert {k: values[k] for k in presets.PAPER[name]} == presets.PAPER[name], "presets.PAPER and the cell differ"
    cell = parameters_cell(name)
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(cell.source).readline)
                if t.type == tokenize.COMMENT]
    assert not [c for c in comments if "=" in c], f"{name}: '=' inside a comment of the parameters cell"
    with caplog.at_level(logging.WARNING):
        inspected = PythonTranslator.inspect(cell)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert [p.name for p in inspected] == list(values) and set(values) == parameter_names(notebook_of(name))
    intro = nbformat.read(notebook_of(name), as_version=4).cells[0]
    assert intro.cell_type == "markdown" and 'preset = "quick"' in intro.source and "-p preset quick" in intro.source


@pytest.mark.notebook
@pytest.mark.parametrize("name", NAMES)
def test_quick_preset_runs_the_notebook(name, tmp_path, synthetic_root):
    """The harness's runner (which fails on papermill's parameter warnings) with only preset "quick" set."""
    notebook = notebook_of(name)
    output_dir = tmp_path / "out"
    run = smoke_run(name, {"preset": "quick", "device": "cpu"}, synthetic_root)
    execute_notebook(notebook, tmp_path / f"{name}.out.ipynb", dict(run.parameters, output_dir=str(output_dir)))
    metrics = json.loads((output_dir / "metrics.json").read_text())
    quick = presets.QUICK[name]
    assert metrics["backbone"]["random_weights"] is True and metrics["backbone"]["image_size"] == quick["image_size"]
    classes = quick.get("classes") or quick.get("eval_classes")
    assert sorted(metrics.get("classes") or metrics["eval"]["classes"]) == sorted(classes)
    assert sorted(p.name for p in output_dir.glob("*.png")), "no figures written"


# ---------------------------------------------------------------------------------------------------------------
# clean saves: the git filter
# ---------------------------------------------------------------------------------------------------------------
def nbstripout(paths) -> None:
    """Strip files in place the way git's clean filter does, with the keys `make venv` configures (one process)."""
    keys = next(line.split(":=", 1)[1].strip() for line in (ROOT / "Makefile").read_text().splitlines()
                if line.startswith("NBSTRIPOUT_KEYS"))
    subprocess.run([str(VENV_PYTHON), "-m", "nbstripout", "--extra-keys", keys, *map(str, paths)],
                   capture_output=True, text=True, check=True)


def with_outputs(text: str) -> str:
    """The notebook as JupyterLab saves it after Run All: outputs, counts, kernel version, widget state."""
    notebook = nbformat.reads(text, as_version=4)
    for count, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
        cell.execution_count = count + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n"),
                        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=",
                                                                     "text/plain": "<Figure>"})]
        cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    notebook.metadata.language_info["version"] = "3.11.7"
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                                  "version_minor": 0}}
    return nbformat.writes(notebook)


needs_git = pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None or
                               not VENV_PYTHON.exists(), reason="needs git, make and the .venv of `make venv`")


@needs_git
def test_stored_notebooks_are_in_the_form_the_filter_and_jupyterlab_write(tmp_path):
    kernel = json.loads((ROOT / ".venv" / "share" / "jupyter" / "kernels" / "python3" / "kernel.json").read_text())
    copies = {}
    for name in NAMES:
        text = notebook_of(name).read_text()
        copies[tmp_path / f"{name}.ipynb"] = copies[tmp_path / f"{name}.saved.ipynb"] = text
        (tmp_path / f"{name}.ipynb").write_text(text)
        (tmp_path / f"{name}.saved.ipynb").write_text(with_outputs(text))
        metadata = json.loads(text)["metadata"]  # what JupyterLab writes for the kernel `make venv` installs
        assert metadata["kernelspec"] == {"display_name": kernel["display_name"], "language": "python",
                                          "name": "python3"}
        assert metadata["language_info"]["pygments_lexer"] == "ipython3"
    nbstripout(copies)
    for path, text in copies.items():  # a clean notebook is a fixed point; a save after Run All strips back to it
        assert path.read_text() == text, f"{path.name}: git would store something else"


@needs_git
def test_a_notebook_saved_with_outputs_stays_clean_in_git(tmp_path):
    """A repository set up by the Makefile's git-filter target (what `make venv` runs): the committed notebook holds
    no outputs, and saving it again with outputs leaves `git status` clean."""
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    shutil.copy(ROOT / ".gitattributes", repo / ".gitattributes")
    stamp = ROOT / ".venv" / ".zsadlib-installed"
    for _ in range(2):  # idempotent: twice leaves one line per attribute
        subprocess.run(["make", "--no-print-directory", "-C", str(repo), "-f", str(ROOT / "Makefile"), "-o", str(stamp),
                        f"VENV={ROOT / '.venv'}", f"STAMP={stamp}", "git-filter"], check=True, capture_output=True)
    assert (repo / ".gitattributes").read_text() == (ROOT / ".gitattributes").read_text()
    assert "nbstripout" in git("config", "filter.nbstripout.clean")
    clean = notebook_of(NAMES[0]).read_text()
    (repo / "nb.ipynb").write_text(with_outputs(clean))
    git("add", ".gitattributes", "nb.ipynb")
    git("commit", "-q", "-m", "a notebook saved after Run All")
    stored = git("show", "HEAD:nb.ipynb")
    assert stored == clean
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in json.loads(stored)["cells"])
    # saved again after another Run All: git sees no change (git status may list the file until the next
    # `git add`, which finds nothing to commit: the index only remembers the size of the file on disk)
    (repo / "nb.ipynb").write_text(with_outputs(clean).replace("hello", "hello again"))
    assert git("diff", "--stat") == ""
    git("add", "nb.ipynb")
    assert git("status", "--porcelain") == "" and git("diff", "--cached", "--stat") == ""


@needs_git
def test_make_notebooks_clean_strips_only_the_saved_notebooks(tmp_path):
    """`make notebooks-clean` (run by `make test`) strips a notebook saved with outputs, so the harness's
    no-stored-outputs check passes, and leaves clean notebooks untouched (JupyterLab sees no change on disk)."""
    (tmp_path / "notebooks").mkdir()
    clean = notebook_of(NAMES[1]).read_text()
    (tmp_path / "notebooks" / "saved.ipynb").write_text(with_outputs(clean))
    untouched = tmp_path / "notebooks" / "clean.ipynb"
    untouched.write_text(clean)
    before = untouched.stat().st_mtime_ns
    stamp = ROOT / ".venv" / ".zsadlib-installed"
    result = subprocess.run(["make", "--no-print-directory", "-C", str(tmp_path), "-f", str(ROOT / "Makefile"),
                             "-o", str(stamp), "-o", "git-filter", f"VENV={ROOT / '.venv'}", f"STAMP={stamp}",
                             "notebooks-clean"], check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "stripped outputs from notebooks/saved.ipynb"
    assert (tmp_path / "notebooks" / "saved.ipynb").read_text() == clean
    assert untouched.stat().st_mtime_ns == before
