"""One run of a sweep, as a worker executes it: papermill (or an entry point) into a temporary folder, then one
rename into ``OUT/<run-id>``. A run folder therefore exists only complete: ``run.json`` (status ``done`` or
``failed``, parameters, host, seconds), and ``metrics.json`` + figures + the executed notebook, or ``error.json``
(type, message, traceback) for a failed run. A worker killed mid-run leaves only a ``.tmp~<pid>~<host>~<run-id>``
folder, which the next sweep in that folder deletes.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import atomic_write
from ..utils import json_safe
from .spec import Run

RUN_FILE = "run.json"
ERROR_FILE = "error.json"
METRICS_FILE = "metrics.json"
NOTEBOOK_FILE = "notebook.ipynb"
TMP_PREFIX = ".tmp~"  # + pid ~ host ~ run id: a run being executed
OLD_PREFIX = ".old~"  # + pid ~ host ~ run id: a failed run's folder being replaced by its rerun
# papermill warnings that mean the parameters did not reach the notebook as meant: fail the run
PAPERMILL_FAILURES = ("Unable to parse line", "Passed unknown parameter")


class RunError(RuntimeError):
    """A run that did not produce what a run must (e.g. no metrics.json)."""


class NotebookParameterError(RunError):
    """papermill could not parse the parameters cell or was passed a parameter the notebook does not define."""


class _FailOnPapermillWarnings(logging.Handler):
    def __init__(self, notebook: str):
        super().__init__(level=logging.WARNING)
        self.notebook = notebook

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(marker in message for marker in PAPERMILL_FAILURES):
            raise NotebookParameterError(f"{self.notebook}: papermill: {message} (the parameters cell holds "
                                         f"literal assignments only, without '=' in comments, and names every "
                                         f"parameter passed)")


CELL_TIMEOUT_ENV = "ZSAD_CELL_TIMEOUT"  # seconds one cell may run (``make test`` sets it); unset: no limit


def execute_notebook(notebook: str | Path, output_notebook: str | Path, parameters: dict[str, Any],
                     cwd: str | Path | None = None, kernel_name: str = "python3", progress: bool = False,
                     cell_timeout: float | None = None):
    """papermill ``execute_notebook`` that raises :class:`NotebookParameterError`, before any cell runs, when
    papermill warns "Unable to parse line" (a parameters cell it cannot read, e.g. an ``=`` in a comment) or
    "Passed unknown parameter". ``cwd`` defaults to the notebook's folder. ``cell_timeout``: seconds a cell may run
    before the run fails (default: the ``ZSAD_CELL_TIMEOUT`` environment variable, else no limit), so that a hung
    kernel fails a test or a sweep run instead of stalling it. Returns the executed notebook."""
    import papermill

    if cell_timeout is None and os.environ.get(CELL_TIMEOUT_ENV):
        cell_timeout = float(os.environ[CELL_TIMEOUT_ENV])

    notebook = Path(notebook)
    handler = _FailOnPapermillWarnings(notebook.name)
    logger = logging.getLogger("papermill")
    logger.addHandler(handler)
    try:
        return papermill.execute_notebook(str(notebook), str(output_notebook), parameters=parameters,
                                          kernel_name=kernel_name, cwd=str(cwd or notebook.parent),
                                          progress_bar=progress, execution_timeout=cell_timeout)
    finally:
        logger.removeHandler(handler)


def resolve_entry(target: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function."""
    module_name, _, function_name = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise RunError(f"entry point {target!r} cannot be loaded: {error}") from None


def read_status(folder: Path) -> dict[str, Any] | None:
    """The run.json of a run folder, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_finished(folder: Path) -> bool:
    status = read_status(folder)
    return bool(status) and status.get("status") == "done"


def _host() -> str:
    return socket.gethostname().replace("~", "-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def work_folders(out: Path, run_id: str | None = None) -> list[tuple[Path, int, str]]:
    """The temporary folders under ``out`` (of ``run_id`` only, when given): (path, pid, host)."""
    found = []
    for prefix in (TMP_PREFIX, OLD_PREFIX):
        for path in Path(out).glob(f"{prefix}*"):
            parts = path.name[len(prefix):].split("~", 2)
            if len(parts) == 3 and parts[0].isdigit() and (run_id is None or parts[2] == run_id):
                found.append((path, int(parts[0]), parts[1]))
    return found


def remove_stale(out: Path, run_id: str | None = None) -> list[Path]:
    """Delete the temporary folders left by killed workers of this host (their process is gone)."""
    removed = []
    for path, pid, host in work_folders(out, run_id):
        if host == _host() and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _record(run: Run, **fields: Any) -> dict[str, Any]:
    from .. import __version__

    return json_safe({"run_id": run.run_id, "target": run.target, "parameters": dict(run.parameters),
                      "host": _host(), "pid": os.getpid(), "zsadlib": __version__, **fields})


def write_failure(folder: Path, run: Run, error: BaseException | str, started: float | None = None) -> dict:
    """error.json (type, message, traceback) and run.json (status failed) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(error, BaseException):
        detail = {"type": type(error).__name__, "message": str(error),
                  "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__))}
    else:
        detail = {"type": "WorkerDied", "message": str(error), "traceback": None}
    atomic_write(folder / ERROR_FILE, lambda tmp: tmp.write_text(json.dumps(detail, indent=2)))
    record = _record(run, status="failed", error=f"{detail['type']}: {detail['message']}",
                     seconds=round(time.time() - started, 3) if started else None)
    atomic_write(folder / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    return record


def publish(tmp: Path, final: Path) -> None:
    """Move a complete run folder into place: one rename. A failed run's old folder is moved aside first; a
    folder another worker finished meanwhile wins (ours is dropped)."""
    if final.exists():
        if is_finished(final):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = final.with_name(f"{OLD_PREFIX}{os.getpid()}~{_host()}~{final.name}")
        os.rename(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_finished(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def execute_run(run: Run, out: str | Path, output_parameter: str = "output_dir", kernel_name: str = "python3",
                threads: int | None = None) -> dict[str, Any]:
    """Execute ``run`` into ``OUT/<run-id>`` unless it is finished there; returns its run.json content (with
    ``"skipped": True`` when it was already done). Errors of the run are recorded in its folder, not raised."""
    out = Path(out)
    final = out / run.run_id
    status = read_status(final)
    if status and status.get("status") == "done":
        return {**status, "skipped": True}
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the kernel papermill starts inherits it
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{TMP_PREFIX}{os.getpid()}~{_host()}~{run.run_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    started = time.time()
    try:
        if run.is_notebook:
            parameters = {**run.parameters, output_parameter: str(tmp)}
            execute_notebook(run.target, tmp / NOTEBOOK_FILE, parameters, kernel_name=kernel_name)
        else:
            if threads:
                import torch

                torch.set_num_threads(threads)
            resolve_entry(run.target)(**{**run.parameters, output_parameter: str(tmp)})
        if not (tmp / METRICS_FILE).is_file():
            raise RunError(f"{run.target} wrote no {METRICS_FILE} into its {output_parameter}")
        record = _record(run, status="done", seconds=round(time.time() - started, 3))
        atomic_write(tmp / RUN_FILE, lambda path: path.write_text(json.dumps(record, indent=2)))
    except Exception as error:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        record = write_failure(tmp, run, error, started)
    publish(tmp, final)
    return read_status(final) or record
