"""Regression checks of the notebooks: every notebook at its smoke parameters, compared with the stored
expectations (tests/notebooks/expected/<run>.json) key by key.

``make regress`` (``python -m zsadlib.sweep.regress``) runs them all as one sweep and prints a table of what moved;
tests/test_notebooks.py runs each through the same :func:`smoke_run` and :func:`compare`.

Tolerance of a numeric leaf: ``|got - want| <= max(rel * |want|, abs)``, stored per key in the expected file (new
keys get :func:`default_tolerance`); every other leaf must be equal. Metrics of the tiny model are small (pixel AP
~0.004), so an absolute tolerance would hide real changes; 2e-3 relative leaves room for float summation order only
(an equivalent rewrite of the dense attention moved ViP2-CLIP's pixel AP by 9e-4 relative). The linear200 AUPRO
puts its 200 thresholds between the global min and max of the maps, so float noise moves all of them: 2e-2 (the
same rewrite moved it by 8e-3). Values that are float noise by design get an absolute tolerance.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from pathlib import Path
from typing import Any

from .spec import Run

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
HARNESS = ROOT / "tests" / "notebooks"
# leaves that legitimately change between runs or machines (paths, timings, versions); and differences of two
# compared leaves (notebook 04's delta_points = variant - default): a difference of two values within their
# relative tolerance has no relative tolerance of its own
IGNORED_KEYS = ("weights_path", "root", "seconds", "versions", "device", "output_dir", "delta_points")
REL_TOLERANCE = 2e-3
LINEAR200_REL_TOLERANCE = 2e-2
ABS_FLOOR = 1e-6
NOISE_KEYS = ("max_abs_diff",)  # e.g. original_path_max_abs_diff: float noise, asserted small by the notebook


def smoke_parameters_file(harness: Path = HARNESS) -> dict[str, dict[str, Any]]:
    return json.loads((Path(harness) / "smoke_params.json").read_text())


def notebook_of(run: str, notebook_dir: Path = NOTEBOOK_DIR) -> Path:
    """The notebook a smoke run executes: ``"02_prompt_learning@crane"`` -> notebooks/02_prompt_learning.ipynb."""
    return Path(notebook_dir) / f"{run.split('@')[0]}.ipynb"


def parameter_names(notebook_path: Path) -> set[str]:
    """The names the notebook's one ``parameters`` cell assigns (literals only; raises ValueError otherwise)."""
    import nbformat

    notebook = nbformat.read(notebook_path, as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{notebook_path.name}: needs exactly one cell tagged 'parameters'")
    names = set()
    for node in ast.parse(cells[0].source).body:
        if not isinstance(node, ast.Assign):
            raise ValueError(f"{notebook_path.name}: parameters cell holds assignments only")
        ast.literal_eval(node.value)  # literals only
        names.update(t.id for t in node.targets)
    return names


def smoke_run(name: str, smoke: dict[str, Any], data_root: str | Path, notebook_dir: Path = NOTEBOOK_DIR) -> Run:
    """The sweep run of smoke run ``name``: its parameters, every ``*root`` parameter at ``data_root``."""
    notebook = notebook_of(name, notebook_dir)
    names = parameter_names(notebook)
    unknown = set(smoke) - names
    if unknown:
        raise ValueError(f"{name}: unknown parameters {sorted(unknown)}")
    roots = {key: str(data_root) for key in names if key.endswith("root")}
    return Run(str(notebook), {**smoke, **roots}, name=name.replace("@", "-"), slug_keys=())


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
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


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def default_tolerance(key: str) -> dict:
    if any(part in key for part in NOISE_KEYS):
        return {"rel": 0.0, "abs": 1e-5}
    if key.endswith("aupro_linear200"):
        return {"rel": LINEAR200_REL_TOLERANCE, "abs": ABS_FLOOR}
    return {"rel": REL_TOLERANCE, "abs": ABS_FLOOR}


def within(got: Any, want: float, tolerance: dict) -> bool:
    return got is not None and abs(got - want) <= max(tolerance["rel"] * abs(want), tolerance["abs"])


def moved_report(name: str, old: dict, new: dict) -> list[str]:
    """Lines saying what changed between two expected-value dicts: keys added / removed, values moved (by how
    much, absolute and relative)."""
    lines = [f"{name}: new key {k} = {new[k]!r}" for k in sorted(set(new) - set(old))]
    lines += [f"{name}: removed key {k} (was {old[k]!r})" for k in sorted(set(old) - set(new))]
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        if is_number(a) and is_number(b):
            if a != b:
                rel = abs(b - a) / abs(a) if a else math.inf
                lines.append(f"{name}: {key} moved {a!r} -> {b!r} (by {b - a:+.3g}, {rel:.3g} relative)")
        elif a != b:
            lines.append(f"{name}: {key} changed {a!r} -> {b!r}")
    return lines


def compare(actual: dict, expected: dict) -> list[dict[str, Any]]:
    """Every difference between a run's comparable leaves and its expected file: rows of key, expected, got,
    tolerance and what is wrong ("missing", "new key", "moved", "changed"); empty when it matches."""
    tolerances, values = expected.get("tolerance", {}), expected["values"]
    problems = [{"key": k, "expected": None, "got": actual[k], "tolerance": None, "problem": "new key"}
                for k in sorted(set(actual) - set(values))]
    for key, want in values.items():
        if key not in actual:
            problems.append({"key": key, "expected": want, "got": None, "tolerance": None, "problem": "missing"})
            continue
        got = actual[key]
        if is_number(want):
            tolerance = tolerances.get(key) or default_tolerance(key)
            if not (is_number(got) and within(got, want, tolerance)):
                problems.append({"key": key, "expected": want, "got": got, "tolerance": tolerance,
                                 "problem": "moved"})
        elif got != want:
            problems.append({"key": key, "expected": want, "got": got, "tolerance": None, "problem": "changed"})
    return problems


def regenerate(expected_path: Path, name: str, actual: dict) -> list[str]:
    """Rewrite an expected file from ``actual`` (keeping stored per-key tolerances); the lines of what moved."""
    old = json.loads(expected_path.read_text()) if expected_path.exists() else {"values": {}, "tolerance": {}}
    old_tolerance = old.get("tolerance", {})
    tolerance = {key: old_tolerance[key] if isinstance(old_tolerance.get(key), dict) else default_tolerance(key)
                 for key, value in actual.items() if is_number(value)}
    expected_path.write_text(json.dumps({"tolerance": tolerance, "values": actual}, indent=2, sort_keys=True))
    return moved_report(name, old.get("values", {}), actual) or [f"{name}: nothing moved"]


def format_problems(rows: list[dict[str, Any]]) -> str:
    """The table ``make regress`` prints: run, key, expected, got, difference (absolute and relative), problem."""
    import pandas as pd

    def difference(row):
        if is_number(row["expected"]) and is_number(row["got"]):
            delta = row["got"] - row["expected"]
            rel = abs(delta) / abs(row["expected"]) if row["expected"] else math.inf
            return f"{delta:+.3g} ({rel:.3g} rel)"
        return ""

    table = pd.DataFrame([{**row, "difference": difference(row)} for row in rows],
                         columns=["run", "key", "expected", "got", "difference", "problem"])
    return table.to_string(index=False)


def regress(out: str | Path, engine: str = "local", jobs: int | None = None, address: str | None = None,
            names: list[str] | None = None, progress: bool = True, data_root: str | Path | None = None,
            harness: Path = HARNESS, notebook_dir: Path = NOTEBOOK_DIR) -> list[dict[str, Any]]:
    """Run the smoke runs of ``harness``/smoke_params.json (all, or ``names``) as one sweep in ``out`` (on the
    synthetic set ``data_root``, default generated in ``out/synthetic``) and compare each with
    ``harness``/expected/<run>.json; returns the rows of what moved (a failed run or a missing expected file is
    one row)."""
    from ..data.synthetic import ensure_synthetic
    from .engines import run_sweep
    from .execute import METRICS_FILE

    out = Path(out)
    smoke = smoke_parameters_file(harness)
    names = sorted(names or smoke)
    if data_root is None:
        data_root = ensure_synthetic(out / "synthetic", progress=progress, reuse_existing=True)
    runs = {name: smoke_run(name, smoke[name], data_root, notebook_dir) for name in names}
    result = run_sweep(list(runs.values()), out=out / "runs", engine=engine, jobs=jobs, address=address,
                       progress=progress)
    records = {record["run_id"]: record for record in result.records}
    rows: list[dict[str, Any]] = []
    for name, run in runs.items():
        record = records[run.run_id]
        if record.get("status") != "done":
            rows.append({"run": name, "key": "", "expected": None, "got": None, "problem": record.get("error")})
            continue
        expected_path = Path(harness) / "expected" / f"{name}.json"
        if not expected_path.exists():
            rows.append({"run": name, "key": "", "expected": None, "got": None, "problem": "no expected file"})
            continue
        metrics = json.loads((out / "runs" / run.run_id / METRICS_FILE).read_text())
        rows += [{"run": name, **row} for row in compare(comparable(metrics), json.loads(expected_path.read_text()))]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zsadlib.sweep.regress",
                                     description="every notebook at its smoke parameters against its expected file")
    parser.add_argument("--out", default="outputs/regress", help="sweep folder (finished runs are reused)")
    parser.add_argument("--engine", default="local", choices=["local", "ray"])
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--address", default=None)
    parser.add_argument("names", nargs="*", help="smoke runs to check (default: all)")
    args = parser.parse_args(argv)
    rows = regress(args.out, engine=args.engine, jobs=args.jobs, address=args.address, names=args.names or None)
    if not rows:
        print("regress: every notebook matches its expected values")
        return 0
    print(format_problems(rows))
    print(f"regress: {len(rows)} differences in {len({row['run'] for row in rows})} runs")
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
