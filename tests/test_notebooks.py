"""Notebook harness: every notebook under notebooks/ runs through papermill with smoke parameters.

Each run's metrics.json is compared with tests/notebooks/expected/<name>.json: every numeric leaf within its own
tolerance ``|got - want| <= max(rel * |want|, abs)`` (stored per key in the file; new keys get
:func:`default_tolerance`), every other leaf exactly. ``pytest --regen-notebook-expected`` rewrites those files from
the current run, keeps the stored per-key tolerances, and prints every value that moved and by how much.

The smoke image size (126 px, a 9 x 9 grid) is not an exact divisor of the tiny model's native 336 px, so the
position-embedding resize really interpolates (bilinear and bicubic differ there), and notebook 03 fuses with a
weight other than 0.5, so a reversed fusion weight shows.

A notebook may have several smoke runs: keys ``"<notebook>@<variant>"`` in smoke_params.json (e.g.
``"02_prompt_learning@crane"``) run the same notebook with other parameters.
"""
import ast
import json

import nbformat
import pytest

from zsadlib.sweep.execute import execute_notebook
from zsadlib.sweep.regress import (HARNESS, LINEAR200_REL_TOLERANCE, ROOT, comparable, compare, default_tolerance,
                                   is_number, moved_report, notebook_of, parameter_names, regenerate, smoke_run,
                                   within)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SMOKE = json.loads((HARNESS / "smoke_params.json").read_text())


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
def test_notebook_runs_and_matches_expected(name, tmp_path, synthetic_root, request, capsys):
    notebook = notebook_of(name)
    unknown = set(SMOKE[name]) - parameter_names(notebook)
    assert not unknown, f"{name}: unknown parameters {sorted(unknown)}"
    output_dir = tmp_path / "out"
    # every dataset-root parameter points at the session's synthetic set (what make regress runs, too)
    run = smoke_run(name, SMOKE[name], synthetic_root)
    parameters = dict(run.parameters, output_dir=str(output_dir))
    assert set(parameters) <= parameter_names(notebook)
    execute_notebook(notebook, tmp_path / f"{notebook.stem}.out.ipynb", parameters)  # fails on papermill's
    metrics = json.loads((output_dir / "metrics.json").read_text())                   # parameter warnings
    assert metrics["backbone"]["random_weights"] is True and "mean nothing" in metrics["note"]
    expected_path = HARNESS / "expected" / f"{name}.json"
    regen = request.config.getoption("--regen-notebook-expected")
    actual = comparable(metrics)
    if regen or not expected_path.exists():
        if not regen:
            pytest.fail(f"no expected values for {name}: run pytest --regen-notebook-expected")
        lines = regenerate(expected_path, name, actual)
        with capsys.disabled():
            print("\n" + "\n".join(lines))
        return
    expected = json.loads(expected_path.read_text())
    assert sorted(actual) == sorted(expected["values"]), "metrics.json keys changed"
    problems = compare(actual, expected)
    assert not problems, "\n".join(f"{name}: {p['key']} = {p['got']!r} != {p['expected']!r} ({p['problem']}, "
                                    f"tolerance {p['tolerance']})" for p in problems)


def test_tolerances_are_per_key_and_relative():
    # a pixel AP of 0.004 may not move by 2e-3 (the old single absolute tolerance); a value of 100 may move by 0.05
    assert not within(0.006, 0.004, default_tolerance("after/pixel_ap"))
    assert within(0.004 * (1 + 1e-3), 0.004, default_tolerance("after/pixel_ap"))
    assert not within(0.004 * (1 + 3e-3), 0.004, default_tolerance("after/pixel_ap"))
    assert within(100.15, 100.0, default_tolerance("train/last_loss"))
    assert not within(100.3, 100.0, default_tolerance("train/last_loss"))
    assert not within(0.31, 0.3, default_tolerance("after/aupro_linear200"))
    assert within(0.0, 5e-7, default_tolerance("x")) and not within(1e-5, 0.0, default_tolerance("x"))
    assert within(3e-6, 0.0, default_tolerance("original_path_max_abs_diff"))
    assert not within(None, 0.5, default_tolerance("x"))
    report = moved_report("nb", {"a": 0.5, "b": 1, "c": "x", "gone": 1}, {"a": 0.55, "b": 1, "c": "y", "new": 2})
    assert report == ["nb: new key new = 2", "nb: removed key gone (was 1)",
                      "nb: a moved 0.5 -> 0.55 (by +0.05, 0.1 relative)", "nb: c changed 'x' -> 'y'"]
    for path in (HARNESS / "expected").glob("*.json"):  # every stored numeric leaf has its own tolerance
        stored = json.loads(path.read_text())
        numeric = {k for k, v in stored["values"].items() if is_number(v)}
        assert set(stored["tolerance"]) == numeric, path.name
        assert all(set(t) == {"rel", "abs"} and t["rel"] <= LINEAR200_REL_TOLERANCE and t["abs"] <= 1e-5
                   for t in stored["tolerance"].values())


def test_smoke_sizes_and_fusion_weight_can_see_the_bugs_they_are_for():
    tiny = json.loads((ROOT / "zsadlib" / "model_configs" / "tiny.json").read_text())
    native = tiny["vision_cfg"]["image_size"]
    for name, params in SMOKE.items():
        if "image_size" in params:
            size = params["image_size"]
            assert size % 14 == 0 and native % size != 0, f"{name}: {size} px divides the native {native} px"
    fusion = SMOKE["03_dual_branch_inference"]["fusion_weight"]
    assert fusion != 0.5 and fusion in SMOKE["03_dual_branch_inference"]["sweep_weights"]


def test_compare_lists_what_moved_and_what_is_missing():
    expected = {"tolerance": {"a": {"rel": 0.1, "abs": 0.0}}, "values": {"a": 1.0, "b": "x", "gone": 2.0}}
    assert compare({"a": 1.05, "b": "x", "gone": 2.0}, expected) == []
    problems = compare({"a": 1.2, "b": "y", "new": 1}, expected)
    assert [(p["key"], p["problem"]) for p in problems] == [("new", "new key"), ("a", "moved"), ("b", "changed"),
                                                            ("gone", "missing")]
    assert problems[1]["tolerance"] == {"rel": 0.1, "abs": 0.0}
    # keys without a stored tolerance get the default one (2e-3 relative)
    assert compare({"gone": 2.0 * (1 + 3e-3), "a": 1.0, "b": "x"}, expected)[0]["key"] == "gone"
