"""``zsad sweep collect OUT``: every finished run's metrics.json as one tidy table.

results.csv has one row per run x class x metric: ``run_id``, the run's parameters (one column each; lists and
mappings as JSON text), ``section`` (where in metrics.json the metrics sit: ``""`` for evaluate's own file,
``after`` / ``before`` for notebook 02, ...), ``class_name`` (``mean`` for the macro mean), ``metric`` and
``value`` (a fraction, as metrics.json stores it). runs.csv has one row per run folder: its status, seconds and
error. Both are written under a temporary name and renamed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from ..checkpoint import atomic_write
from ..metrics import METRIC_KEYS
from .execute import METRICS_FILE, read_status

RESULT_COLUMNS = ("run_id", "section", "class_name", "metric", "value")


def metric_rows(metrics: Any, path: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """(section, class_name, metric, value) of every metric leaf of a metrics.json.

    >>> list(metric_rows({"metrics": {"image_auroc": 0.5}, "per_class": {"a": {"image_auroc": 0.25}}}))
    [{'section': '', 'class_name': 'mean', 'metric': 'image_auroc', 'value': 0.5}, \
{'section': '', 'class_name': 'a', 'metric': 'image_auroc', 'value': 0.25}]
    """
    if not isinstance(metrics, dict):
        return
    for key, value in metrics.items():
        if key in METRIC_KEYS and (value is None or isinstance(value, (int, float))) and not isinstance(value, bool):
            parts = list(path)
            class_name = "mean"
            if "per_class" in parts:
                index = parts.index("per_class")
                class_name = parts[index + 1] if index + 1 < len(parts) else "mean"
                del parts[index:index + 2]
            parts = [p for p in parts if p not in ("metrics", "mean")]
            yield {"section": "/".join(parts), "class_name": class_name, "metric": key,
                   "value": float("nan") if value is None else float(value)}
        elif isinstance(value, dict):
            yield from metric_rows(value, path + (str(key),))


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def collect(out: str | Path, write: bool = True):
    """(results, runs) DataFrames of the sweep folder ``out``; with ``write``, also OUT/results.csv and
    OUT/runs.csv. Only finished runs (run.json status ``done``) contribute results."""
    import pandas as pd

    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"sweep folder {out} does not exist")
    rows, runs = [], []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        status = read_status(folder)
        if status is None:
            continue
        parameters = {key: _cell(value) for key, value in status.get("parameters", {}).items()}
        runs.append({"run_id": folder.name, "status": status.get("status"), "seconds": status.get("seconds"),
                     "error": status.get("error"), **parameters})
        if status.get("status") != "done":
            continue
        metrics = json.loads((folder / METRICS_FILE).read_text())
        for row in metric_rows(metrics):
            rows.append({**parameters, "run_id": folder.name, **row})
    parameter_columns = sorted({key for run in runs for key in run} - {"run_id", "status", "seconds", "error"})
    clash = set(parameter_columns) & set(RESULT_COLUMNS)
    if clash:
        raise ValueError(f"{out}: parameters named like result columns: {sorted(clash)}")
    results = pd.DataFrame(rows, columns=["run_id", *parameter_columns, *RESULT_COLUMNS[1:]])
    table = pd.DataFrame(runs, columns=["run_id", "status", "seconds", "error", *parameter_columns])
    if write:
        atomic_write(out / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
        atomic_write(out / "runs.csv", lambda tmp: table.to_csv(tmp, index=False))
    return results, table
