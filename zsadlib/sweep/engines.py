"""Sweep engines: a local process pool (``concurrent.futures``, the default) or a Ray cluster.

Both skip the runs finished in ``OUT`` (resume), record a failed run in its folder and go on, and rerun a run
whose worker died (killed, out of memory, a crashed node) up to ``max_retries`` times. One tqdm bar counts runs,
with done / running / failed in its postfix.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from .execute import execute_run, is_finished, read_status, remove_stale, work_folders, write_failure
from .spec import Run, SweepError, SweepSpec

ENGINES = ("local", "ray")


@dataclass
class SweepResult:
    """records: one run.json content per run, in the spec's order (``skipped`` True for runs found done)."""

    out: Path
    records: list[dict[str, Any]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.get("status") == status for r in self.records)

    @property
    def executed(self) -> list[str]:
        return [r["run_id"] for r in self.records if r.get("status") == "done" and not r.get("skipped")]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") == "failed"]

    def summary(self) -> str:
        skipped = sum(bool(r.get("skipped")) for r in self.records)
        return (f"{len(self.records)} runs in {self.out}: {self.count('done')} done ({skipped} already finished), "
                f"{self.count('failed')} failed")


def machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _Progress:
    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = tqdm(total=total, initial=done, desc="sweep", unit="run", disable=not enabled)
        self.done, self.failed, self.running = done, 0, 0
        self.show()

    def finished(self, record: dict[str, Any]) -> None:
        if record.get("status") == "failed":
            self.failed += 1
        else:
            self.done += 1
        self.show(running=max(0, self.running - 1))
        self.bar.update(1)

    def show(self, running: int | None = None) -> None:
        """Redraw the counts when they changed."""
        counts = (self.done, self.running if running is None else running, self.failed)
        if getattr(self, "_shown", None) != counts:
            self._shown = counts
            self.running = counts[1]
            self.bar.set_postfix(done=self.done, running=self.running, failed=self.failed, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _watch_parent(parent: int) -> None:
    """A pool worker whose driver was killed exits (instead of running on, orphaned)."""
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.5)


def _worker_init(parent: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _died(out: Path, run: Run) -> bool:
    """Whether a worker died while executing ``run`` (it left its temporary folder); cleans it up."""
    dead = [path for path, pid, _ in work_folders(out, run.run_id) if path.name.startswith(".tmp~")]
    remove_stale(out, run.run_id)
    return bool(dead)


def _run_local(runs: list[Run], out: Path, jobs: int, max_retries: int, options: dict, progress: _Progress,
               results: dict[str, dict]) -> None:
    context = multiprocessing.get_context("spawn")  # torch is not fork-safe once its thread pool has run
    retries = {run.run_id: 0 for run in runs}
    pending = list(runs)
    while pending:
        broken: list[Run] = []
        with ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=context,
                                 initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(execute_run, run, str(out), **options): run for run in pending}
            waiting = set(futures)
            while waiting:
                finished, waiting = wait(waiting, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    run = futures[future]
                    try:
                        results[run.run_id] = future.result()
                    except BrokenProcessPool:
                        broken.append(run)
                        continue
                    except Exception as error:  # noqa: BLE001 - e.g. a parameter that does not pickle
                        results[run.run_id] = write_failure(out / run.run_id, run, error)
                    progress.finished(results[run.run_id])
                progress.show(running=sum(f.running() for f in waiting))
        pending = []
        for run in broken:
            if _died(out, run):
                retries[run.run_id] += 1
                if retries[run.run_id] > max_retries:
                    results[run.run_id] = write_failure(
                        out / run.run_id, run, f"its worker died {retries[run.run_id]} times (killed or crashed)")
                    progress.finished(results[run.run_id])
                    continue
            pending.append(run)


def _run_ray(runs: list[Run], out: Path, address: str | None, num_cpus: float, num_gpus: float,
             max_retries: int, options: dict, progress: _Progress, results: dict[str, dict]) -> None:
    try:
        import ray
    except ImportError:
        raise SweepError("--engine ray needs Ray: pip install 'zsadlib[distributed]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(execute_run)
        refs = {task.remote(run, str(out), **options): run for run in runs}
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // max(num_cpus, 1e-3)))
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=0.5)
            for ref in ready:
                run = refs[ref]
                try:
                    results[run.run_id] = ray.get(ref)
                except Exception as error:  # noqa: BLE001 - the worker died more than max_retries times
                    results[run.run_id] = write_failure(out / run.run_id, run, error)
                progress.finished(results[run.run_id])
            progress.show(running=min(len(waiting), slots))
    finally:
        if started_here:
            ray.shutdown()


def run_sweep(spec: SweepSpec | Sequence[Run], out: str | Path | None = None, engine: str = "local",
              jobs: int | None = None, address: str | None = None, progress: bool = True,
              max_retries: int | None = None) -> SweepResult:
    """Execute every run of ``spec`` (a :class:`SweepSpec` or a list of :class:`Run`) that is not finished in
    ``out`` (default: the spec's), on ``engine`` "local" (``jobs`` processes; default the machine's CPUs divided
    by the spec's ``num_cpus``) or "ray" (``address`` "auto", "ray://HOST:PORT", or None: the running Ray
    instance, else a new local one). Returns the run records in the spec's order."""
    if not isinstance(spec, SweepSpec):
        if out is None:
            raise SweepError("run_sweep: pass out= with a list of runs")
        spec = SweepSpec(runs=list(spec), out=Path(out))
    out = Path(out if out is not None else spec.out).resolve()
    if engine not in ENGINES:
        raise SweepError(f"--engine {engine}: unknown engine (known: {', '.join(ENGINES)})")
    if jobs is not None and jobs < 1:
        raise SweepError(f"--jobs must be at least 1, got {jobs}")
    if not spec.runs:
        raise SweepError("the sweep has no runs")
    ids = [run.run_id for run in spec.runs]
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    results = {run_id: {**read_status(out / run_id), "skipped": True}
               for run_id in ids if is_finished(out / run_id)}
    todo = [run for run in spec.runs if run.run_id not in results]
    retries = spec.max_retries if max_retries is None else max_retries
    bar = _Progress(len(ids), len(results), progress)
    try:
        if todo:
            jobs = jobs or max(1, int(machine_cpus() // max(spec.num_cpus, 1)))
            options = {"output_parameter": spec.output_parameter, "kernel_name": spec.kernel_name,
                       "threads": max(1, int(spec.num_cpus)) if engine == "ray" else max(1, machine_cpus() // jobs)}
            if engine == "local":
                _run_local(todo, out, jobs, retries, options, bar, results)
            else:
                _run_ray(todo, out, address, spec.num_cpus, spec.num_gpus, retries, options, bar, results)
    finally:
        bar.close()
        remove_stale(out)  # e.g. of the workers of a killed driver, which exit once they see it gone
    return SweepResult(out=out, records=[results[run_id] for run_id in ids])

