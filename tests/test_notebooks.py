"""Notebook harness: every notebook under notebooks/ runs through papermill with smoke parameters.

Each run's metrics.json is compared with tests/notebooks/expected/<name>.json (numeric leaves, explicit
tolerances). ``pytest --regen-notebook-expected`` rewrites those files from the current run.

A notebook may have several smoke runs: keys ``"<notebook>@<variant>"`` in smoke_params.json (e.g.
``"02_prompt_learning@crane"``) run the same notebook with other parameters.
"""
import ast
import json
import math
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
HARNESS = Path(__file__).parent / "notebooks"
SMOKE = json.loads((HARNESS / "smoke_params.json").read_text())
# leaves that legitimately change between runs or machines (paths, timings, versions)
IGNORED_KEYS = ("weights_path", "root", "seconds", "versions", "device", "output_dir")


def notebook_of(run: str) -> Path:
    """The notebook a smoke run executes: ``"02_prompt_learning@crane"`` -> notebooks/02_prompt_learning.ipynb."""
    return ROOT / "notebooks" / f"{run.split('@')[0]}.ipynb"


def parameter_names(notebook_path: Path) -> set[str]:
    notebook = nbformat.read(notebook_path, as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{notebook_path.name}: needs exactly one cell tagged 'parameters'"
    names = set()
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign), f"{notebook_path.name}: parameters cell holds assignments only"
        ast.literal_eval(node.value)  # literals only
        names.update(t.id for t in node.targets)
    return names


def flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}/"))
        return out
    if isinstance(value, list):
        out = {}
        for index, item in enumerate(value):
            out.update(flatten(item, f"{prefix}{index}/"))
        return out
    return {prefix.rstrip("/"): value}


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in flatten(metrics).items() if not any(part in k for part in IGNORED_KEYS)}


def test_every_notebook_has_smoke_parameters_and_no_stored_outputs():
    assert NOTEBOOKS, "no notebooks found"
    assert {run.split("@")[0] for run in SMOKE} == {p.stem for p in NOTEBOOKS}, \
        "each notebook needs smoke parameters (none skipped)"
    assert all(notebook_of(run).exists() for run in SMOKE), "a smoke run names a notebook that does not exist"
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} is stored with outputs"
                definitions = [n for n in ast.walk(ast.parse(cell.source))
                               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
                assert not definitions, f"{path.name}: functions and classes belong in zsadlib"


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_smoke_parameters_are_known(name):
    unknown = set(SMOKE[name]) - parameter_names(notebook_of(name))
    assert not unknown, f"{name}: unknown parameters {sorted(unknown)}"


@pytest.mark.notebook
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_notebook_runs_and_matches_expected(name, tmp_path, synthetic_root, request):
    import papermill

    notebook = notebook_of(name)
    unknown = set(SMOKE[name]) - parameter_names(notebook)
    assert not unknown, f"{name}: unknown parameters {sorted(unknown)}"
    output_dir = tmp_path / "out"
    # every dataset-root parameter points at the session's synthetic set
    roots = {key: str(synthetic_root) for key in parameter_names(notebook) if key.endswith("root")}
    parameters = dict(SMOKE[name], output_dir=str(output_dir), **roots)
    assert set(parameters) <= parameter_names(notebook)
    papermill.execute_notebook(str(notebook), str(tmp_path / f"{notebook.stem}.out.ipynb"), parameters=parameters,
                               kernel_name="python3", cwd=str(notebook.parent), progress_bar=False)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["backbone"]["random_weights"] is True and "mean nothing" in metrics["note"]
    expected_path = HARNESS / "expected" / f"{name}.json"
    if request.config.getoption("--regen-notebook-expected") or not expected_path.exists():
        if not request.config.getoption("--regen-notebook-expected"):
            pytest.fail(f"no expected values for {name}: run pytest --regen-notebook-expected")
        expected_path.write_text(json.dumps({"tolerance": {"abs": 2e-3},
                                             "values": comparable(metrics)}, indent=2, sort_keys=True))
        return
    expected = json.loads(expected_path.read_text())
    tolerance = expected["tolerance"]["abs"]
    actual = comparable(metrics)
    assert sorted(actual) == sorted(expected["values"]), "metrics.json keys changed"
    for key, want in expected["values"].items():
        got = actual[key]
        if isinstance(want, (int, float)) and not isinstance(want, bool) and want is not None:
            assert got is not None and math.isclose(got, want, abs_tol=tolerance), f"{name}: {key} = {got} != {want}"
        else:
            assert got == want, f"{name}: {key} = {got!r} != {want!r}"
