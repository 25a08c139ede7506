"""Sweeps: many papermill runs of a notebook (or calls of a zsadlib entry point) over parameter sets, on a local
process pool or a Ray cluster, resumable and lossless.

    from zsadlib.sweep import load_spec, run_sweep, collect
    result = run_sweep(load_spec("sweeps/lr.yaml"), engine="local", jobs=2)   # or engine="ray", address="auto"
    results, runs = collect(result.out)     # results.csv: one row per run x class x metric

Modules: ``spec`` (spec files, grid expansion, run ids), ``execute`` (one run: papermill into a temporary folder,
then one rename), ``engines`` (local pool, Ray), ``collect`` (the tidy table), ``regress`` (notebooks against
their expected values: ``make regress``).
"""
from .collect import collect, metric_rows
from .engines import ENGINES, SweepResult, run_sweep
from .execute import NotebookParameterError, RunError, execute_notebook, execute_run, is_finished, read_status
from .spec import Run, SweepError, SweepSpec, expand, load_spec, parse_spec, run_id

__all__ = ["Run", "SweepSpec", "SweepError", "SweepResult", "RunError", "NotebookParameterError", "ENGINES",
           "expand", "load_spec", "parse_spec", "run_id", "run_sweep", "execute_run", "execute_notebook",
           "is_finished", "read_status", "collect", "metric_rows"]
