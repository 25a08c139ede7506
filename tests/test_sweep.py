"""zsadlib.sweep: spec expansion and run ids, the local and Ray engines, resume after a kill, failed runs,
collect's tidy table, and papermill's parameter warnings as errors."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from zsadlib.sweep import (NotebookParameterError, Run, SweepError, collect, execute_notebook, expand, load_spec,
                           parse_spec, run_sweep)

ROOT = Path(__file__).resolve().parents[1]

PARAMETERS = 'x = 1\nfail = False\nsleep = 0.0\nlog = ""\noutput_dir = "."\n'
BODY = """import json, os, time
from pathlib import Path
if log:
    with open(log, "a") as handle:
        handle.write(f"{x}\\n")
if fail:
    raise RuntimeError(f"run {x} fails on purpose")
time.sleep(sleep)
Path(output_dir, "figure.txt").write_text("a figure")
Path(output_dir, "metrics.json").write_text(json.dumps({
    "metrics": {"image_auroc": x / 10, "pixel_ap": None},
    "per_class": {"a": {"image_auroc": x / 20}, "b": {"image_auroc": x / 40}},
    "note": "not a metric", "n": x}))
"""


def tiny_notebook(path: Path, parameters: str = PARAMETERS) -> Path:
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    notebook.cells = [cell, nbformat.v4.new_code_cell(BODY)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


@pytest.fixture
def notebook(tmp_path):
    return tiny_notebook(tmp_path / "tiny.ipynb")


def write_spec(tmp_path, notebook, **content):
    import yaml

    spec = {"notebook": notebook.name, "out": "out", **content}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def kill_own_worker(output_dir):
    """A sweep entry point whose worker dies (SIGKILL) mid-run."""
    os.kill(os.getpid(), signal.SIGKILL)


def executions(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def test_grid_and_sets_expand_over_shared_parameters_and_ids_are_stable(tmp_path, notebook):
    runs = expand(str(notebook), {"sleep": 0.0}, grid={"x": [1, 2], "fail": [False, True]}, sets=[{"x": 9}])
    assert [dict(r.parameters) for r in runs] == [
        {"sleep": 0.0, "x": 1, "fail": False}, {"sleep": 0.0, "x": 1, "fail": True},
        {"sleep": 0.0, "x": 2, "fail": False}, {"sleep": 0.0, "x": 2, "fail": True}, {"sleep": 0.0, "x": 9}]
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == 5
    assert ids[1].startswith("tiny-x-1-fail-true-") and len(ids[1].rsplit("-", 1)[1]) == 10
    # the same run has the same id; a changed parameter or an edited notebook gives another
    assert Run(str(notebook), {"x": 1, "fail": True, "sleep": 0.0}, slug_keys=("x", "fail")).run_id == ids[1]
    assert Run(str(notebook), {"x": 1, "fail": True, "sleep": 0.5}, slug_keys=("x", "fail")).run_id != ids[1]
    tiny_notebook(notebook, PARAMETERS + "y = 2\n")
    assert expand(str(notebook), {"sleep": 0.0}, grid={"x": [1], "fail": [True]})[0].run_id != ids[1]
    # duplicates run once; no grid and no sets: one run
    assert len(expand(str(notebook), {}, grid={"x": [1]}, sets=[{"x": 1}])) == 1
    assert len(expand("zsadlib.reproduce:evaluate_target", {"a": 1})) == 1


def test_spec_file_paths_and_errors(tmp_path, notebook):
    spec = load_spec(write_spec(tmp_path, notebook, grid={"x": [1, 2]}, resources={"num_cpus": 2, "num_gpus": 1},
                                max_retries=5))
    assert spec.out == (tmp_path / "out").resolve() and len(spec.runs) == 2
    assert Path(spec.runs[0].target) == notebook.resolve()
    assert (spec.num_cpus, spec.num_gpus, spec.max_retries) == (2, 1, 5)
    bad = [({"out": "o"}, "exactly one of 'notebook'"), ({"notebook": notebook.name}, "'out'"),
           ({"notebook": notebook.name, "out": "o", "grdi": {}}, "unknown keys ['grdi']"),
           ({"notebook": notebook.name, "out": "o", "grid": {"x": 1}}, "grid.x must be a non-empty list"),
           ({"notebook": notebook.name, "out": "o", "parameters": {"output_dir": "x"}}, "set by the sweep"),
           ({"notebook": "missing.ipynb", "out": "o"}, "not a .ipynb file"),
           ({"entry": "nocolon", "out": "o"}, "module:function")]
    for content, message in bad:
        with pytest.raises(SweepError, match=re.escape(message)):
            parse_spec(content, base_dir=tmp_path)


def test_local_sweep_runs_resumes_records_failures_and_collects(tmp_path, notebook):
    log = tmp_path / "log.txt"
    spec = load_spec(write_spec(tmp_path, notebook, parameters={"log": str(log)}, grid={"x": [1, 2, 3]},
                                runs=[{"x": 4, "fail": True}]))
    result = run_sweep(spec, jobs=2, progress=False)
    assert (result.count("done"), result.count("failed")) == (3, 1)
    assert sorted(executions(log)) == [1, 2, 3, 4]
    for run in spec.runs[:3]:
        folder = spec.out / run.run_id
        assert {"metrics.json", "notebook.ipynb", "run.json", "figure.txt"} <= {p.name for p in folder.iterdir()}
        assert nbformat.read(folder / "notebook.ipynb", as_version=4).cells[-1].outputs is not None
    failed = spec.out / spec.runs[3].run_id
    error = json.loads((failed / "error.json").read_text())
    assert "fails on purpose" in error["message"] and "Traceback" in error["traceback"]
    assert json.loads((failed / "run.json").read_text())["status"] == "failed"
    assert not [p for p in spec.out.iterdir() if p.name.startswith(".")]  # no temporary folder left

    # rerun: finished runs are skipped, the failed one is tried again (and fails again)
    again = run_sweep(spec, jobs=2, progress=False)
    assert again.executed == [] and again.count("failed") == 1
    assert sorted(executions(log)) == [1, 2, 3, 4, 4]

    results, runs = collect(spec.out)
    assert (spec.out / "results.csv").is_file() and (spec.out / "runs.csv").is_file()
    assert len(results) == 3 * 4  # 3 runs x (mean image_auroc and pixel_ap, image_auroc of classes a and b)
    assert set(results.columns) >= {"run_id", "x", "log", "section", "class_name", "metric", "value"}
    row = results[(results.x == 2) & (results.class_name == "b")]
    assert row.value.tolist() == [2 / 40] and row.metric.tolist() == ["image_auroc"]
    assert results[(results.metric == "pixel_ap")].value.isna().all()
    assert sorted(runs.status) == ["done", "done", "done", "failed"]
    assert pd.read_csv(spec.out / "results.csv").shape == results.shape


def test_killed_sweep_rerun_completes_only_what_is_missing(tmp_path, notebook):
    log = tmp_path / "log.txt"
    path = write_spec(tmp_path, notebook, parameters={"log": str(log), "sleep": 3.0}, grid={"x": [1, 2, 3]})
    spec = load_spec(path)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "zsadlib.cli", "sweep", str(path), "--jobs", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        first = spec.out / spec.runs[0].run_id
        deadline = time.time() + 120
        while not (first / "run.json").exists():
            assert driver.poll() is None and time.time() < deadline, "the sweep ended before its first run finished"
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)  # the driver only: its worker notices and exits
        driver.wait()
        killed_at = executions(log)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert killed_at[0] == 1 and len(killed_at) <= 2
    finished_before = {p.name for p in spec.out.iterdir() if (p / "run.json").exists()}
    assert spec.runs[0].run_id in finished_before and len(finished_before) < 3

    result = run_sweep(load_spec(path), jobs=1, progress=False)
    assert result.count("done") == 3
    assert set(result.executed) == {r.run_id for r in spec.runs} - finished_before
    assert executions(log).count(1) == 1  # the finished run was not executed again
    assert sorted(set(executions(log))) == [1, 2, 3]
    assert not [p for p in spec.out.iterdir() if p.name.startswith(".")]


def test_a_killed_worker_is_retried_then_recorded(tmp_path, notebook):
    # the run SIGKILLs its own worker: the pool breaks, the run is retried max_retries times, then recorded as
    # failed, and the other run still finishes
    runs = expand("tests.test_sweep:kill_own_worker", {}) + expand(str(notebook), {"x": 5})
    result = run_sweep(runs, out=tmp_path / "out", jobs=1, progress=False, max_retries=1)
    assert [r["status"] for r in result.records] == ["failed", "done"]
    assert "died 2 times" in result.records[0]["error"]


def test_papermill_parameter_warnings_fail_the_run(tmp_path):
    commented = tiny_notebook(tmp_path / "commented.ipynb", PARAMETERS + "y = 2  # a value: y = 2 is fine\n")
    with pytest.raises(NotebookParameterError, match="Unable to parse line"):
        execute_notebook(commented, tmp_path / "a.ipynb", {"x": 2, "output_dir": str(tmp_path)})
    assert not (tmp_path / "metrics.json").exists()  # nothing ran
    plain = tiny_notebook(tmp_path / "plain.ipynb")
    with pytest.raises(NotebookParameterError, match="Passed unknown parameter: z"):
        execute_notebook(plain, tmp_path / "b.ipynb", {"z": 2, "output_dir": str(tmp_path)})
    execute_notebook(plain, tmp_path / "c.ipynb", {"x": 2, "output_dir": str(tmp_path)})
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 2
    # in a sweep, such a run is a failed run with the reason in error.json
    result = run_sweep(expand(str(commented), {"x": 3}), out=tmp_path / "out", jobs=1, progress=False)
    assert result.count("failed") == 1 and "Unable to parse line" in result.records[0]["error"]


def test_a_hung_cell_fails_after_the_cell_timeout(tmp_path, monkeypatch):
    import time

    hung = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x = 1")
    cell.metadata["tags"] = ["parameters"]
    hung.cells = [cell, nbformat.v4.new_code_cell("import time\ntime.sleep(600)")]
    hung.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(hung, tmp_path / "hung.ipynb")
    monkeypatch.setenv("ZSAD_CELL_TIMEOUT", "3")  # as `make test` sets it (with a longer limit)
    started = time.time()
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        execute_notebook(tmp_path / "hung.ipynb", tmp_path / "out.ipynb", {"x": 2})
    assert time.time() - started < 120


def test_cli_sweep_and_collect(tmp_path, notebook, capsys):
    from zsadlib.cli import main

    path = write_spec(tmp_path, notebook, grid={"x": [1, 2]})
    assert main(["sweep", str(path), "--jobs", "1", "--quiet"]) == 0
    assert "2 done" in capsys.readouterr().out
    assert main(["sweep", "collect", str(tmp_path / "out")]) == 0
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 2 * 4
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:
        main(["sweep", str(path), "--engine", "spark"])
    assert exit_code.value.code == 2


def test_ray_engine_on_a_local_instance(tmp_path, notebook):
    ray = pytest.importorskip("ray")
    log = tmp_path / "log.txt"
    spec = load_spec(write_spec(tmp_path, notebook, parameters={"log": str(log)}, grid={"x": [1, 2]},
                                runs=[{"x": 3, "fail": True}], resources={"num_cpus": 1}))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep(spec, engine="ray", progress=False)
        assert (result.count("done"), result.count("failed")) == (2, 1)
        again = run_sweep(spec, engine="ray", progress=False)
        assert again.executed == []
    finally:
        ray.shutdown()
    assert sorted(executions(log)) == [1, 2, 3, 3]
    results, _ = collect(spec.out)
    assert sorted(results[results.class_name == "mean"].query("metric == 'image_auroc'").value) == [0.1, 0.2]


def test_regress_runs_every_smoke_run_and_tables_what_moved(tmp_path, notebook):
    from zsadlib.sweep.regress import format_problems, regress

    harness, notebooks = tmp_path / "harness", tmp_path / "notebooks"
    (harness / "expected").mkdir(parents=True)
    notebooks.mkdir()
    tiny_notebook(notebooks / "tiny.ipynb")
    smoke = {"tiny": {"x": 2}, "tiny@moved": {"x": 3}, "tiny@new": {"x": 4}}
    (harness / "smoke_params.json").write_text(json.dumps(smoke))
    values = {"metrics/image_auroc": 0.2, "metrics/pixel_ap": None, "per_class/a/image_auroc": 0.1,
              "per_class/b/image_auroc": 0.05, "note": "not a metric", "n": 2}
    numeric = [k for k, v in values.items() if isinstance(v, (int, float))]
    for name, changes in (("tiny", {}), ("tiny@moved", {"n": 3, "note": "not a metric"})):
        stored = {**values, **changes}
        stored["metrics/image_auroc"] = 0.2  # x = 3 gives 0.3: moved
        tolerance = {k: {"rel": 2e-3, "abs": 1e-6} for k in numeric}
        (harness / "expected" / f"{name}.json").write_text(json.dumps({"tolerance": tolerance, "values": stored}))
    rows = regress(tmp_path / "out", jobs=2, progress=False, data_root=tmp_path, harness=harness,
                   notebook_dir=notebooks)
    assert {(r["run"], r["key"], r["problem"]) for r in rows} == {
        ("tiny@moved", "metrics/image_auroc", "moved"), ("tiny@moved", "per_class/a/image_auroc", "moved"),
        ("tiny@moved", "per_class/b/image_auroc", "moved"), ("tiny@new", "", "no expected file")}
    table = format_problems(rows)
    assert "metrics/image_auroc" in table and "+0.1 (0.5 rel)" in table


def test_the_readme_spec_parses_into_its_runs():
    import yaml

    readme = (ROOT / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = parse_spec(yaml.safe_load(block), base_dir=ROOT / "sweeps")  # as if saved as sweeps/<name>.yaml
    assert Path(spec.runs[0].target) == ROOT / "notebooks" / "02_prompt_learning.ipynb"
    assert [(r.parameters["method"], r.parameters["lr"]) for r in spec.runs] == [
        ("anomalyclip", 0.001), ("anomalyclip", 0.0001), ("crane", 0.001), ("crane", 0.0001), ("vip2clip", 0.001)]
    assert all(r.parameters["backbone"] == "tiny" for r in spec.runs) and spec.out == ROOT / "runs" / "prompt_lr"
