"""Sweep specs: what to run (a notebook or a zsadlib entry point), with which parameter sets, and where.

A spec file (YAML)::

    notebook: ../notebooks/02_prompt_learning.ipynb   # or  entry: zsadlib.reproduce:learn_and_evaluate
    out: runs/prompt_lr                                # relative paths are relative to the spec file
    parameters: {backbone: tiny, pretrained: null, epochs: 1}   # shared by every run
    grid:                                              # every combination ...
      method: [anomalyclip, crane]
      lr: [0.001, 0.0001]
    runs:                                              # ... plus these sets (each over `parameters`)
      - {method: vip2clip, lr: 0.001}
    resources: {num_cpus: 1, num_gpus: 0}              # per run (the Ray engine's request)
    max_retries: 2                                     # reruns of a run whose worker died
    output_parameter: output_dir                       # the notebook parameter that takes the run folder

Each run gets the folder ``OUT/<run-id>``: a readable slug of its own parameters (those of ``grid``/``runs``)
and the first 10 hex digits of a SHA-256 over the notebook's bytes (the entry point's name) and all its
parameters, so an edited notebook or a changed parameter is a new run and an unchanged one is found again.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

SLUG_CHARS = 60  # the readable part of a run id


class SweepError(ValueError):
    """A bad sweep spec or option (one line, names the file or key at fault)."""


@dataclass(frozen=True)
class Run:
    """One execution: ``target`` is a notebook path or ``"module:function"``; ``parameters`` its keyword
    arguments (JSON-able literals); ``name`` an optional readable prefix of the run id."""

    target: str
    parameters: Mapping[str, Any]
    name: str | None = None
    slug_keys: tuple[str, ...] | None = None  # parameters shown in the slug (default: all)

    @property
    def is_notebook(self) -> bool:
        return self.target.endswith(".ipynb")

    @property
    def run_id(self) -> str:
        return run_id(self)


@dataclass
class SweepSpec:
    """A parsed spec: the runs, the output folder and the per-run resources."""

    runs: list[Run]
    out: Path
    num_cpus: float = 1
    num_gpus: float = 0
    max_retries: int = 2
    output_parameter: str = "output_dir"
    kernel_name: str = "python3"
    source: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _slug_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_slug_value(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}-{_slug_value(v)}" for k, v in sorted(value.items()))
    return str(value)


def slug(text: str) -> str:
    """Lower-case letters, digits, ``.``, ``-`` and ``_`` only, at most SLUG_CHARS characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._=-]+", "-", text).replace("=", "-").strip("-.").lower()
    return cleaned[:SLUG_CHARS].rstrip("-.") or "run"


def target_fingerprint(target: str) -> bytes:
    """What the run id hashes of the target: a notebook's bytes, an entry point's name."""
    if target.endswith(".ipynb"):
        path = Path(target)
        if not path.is_file():
            raise SweepError(f"notebook {target} does not exist")
        return path.read_bytes()
    return target.encode()


def run_id(run: Run) -> str:
    """``<slug>-<hash10>``, e.g. ``02_prompt_learning-method-crane-lr-0.001-3f9a0c12de``."""
    keys = run.slug_keys if run.slug_keys is not None else tuple(sorted(run.parameters))
    stem = run.name or (Path(run.target).stem if run.is_notebook else run.target.rsplit(":", 1)[-1])
    readable = "-".join([stem] + [f"{k}-{_slug_value(run.parameters[k])}" for k in keys if k in run.parameters])
    digest = hashlib.sha256(target_fingerprint(run.target))
    digest.update(json.dumps(dict(run.parameters), sort_keys=True, default=str).encode())
    return f"{slug(readable)}-{digest.hexdigest()[:10]}"


def expand(target: str, parameters: Mapping[str, Any] | None = None, grid: Mapping[str, Sequence] | None = None,
           sets: Sequence[Mapping[str, Any]] | None = None, name: str | None = None) -> list[Run]:
    """The runs of a spec: every combination of ``grid`` (in key order) then every set of ``sets``, each over the
    shared ``parameters``; one run of ``parameters`` alone when both are empty. Duplicates (same run id) once.

    >>> [r.parameters for r in expand("m:f", {"a": 0}, grid={"b": [1, 2]}, sets=[{"b": 3, "c": 4}])]
    [{'a': 0, 'b': 1}, {'a': 0, 'b': 2}, {'a': 0, 'b': 3, 'c': 4}]
    """
    base = dict(parameters or {})
    grid = dict(grid or {})
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise SweepError(f"grid.{key} must be a non-empty list, got {values!r}")
    variants: list[dict[str, Any]] = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] \
        if grid else []
    for index, item in enumerate(sets or []):
        if not isinstance(item, Mapping):
            raise SweepError(f"runs[{index}] must be a mapping of parameters, got {item!r}")
        variants.append(dict(item))
    if not variants:
        variants = [{}]
    runs, seen = [], set()
    for variant in variants:
        run = Run(target, {**base, **variant}, name=name, slug_keys=tuple(variant))
        if run.run_id not in seen:
            seen.add(run.run_id)
            runs.append(run)
    return runs


SPEC_KEYS = {"notebook", "entry", "out", "parameters", "grid", "runs", "resources", "max_retries",
             "output_parameter", "kernel_name", "name"}


def parse_spec(content: Mapping[str, Any], base_dir: str | Path = ".", source: str | Path | None = None) -> SweepSpec:
    """A :class:`SweepSpec` from the spec's mapping; relative paths are taken from ``base_dir``."""
    where = str(source or "spec")
    if not isinstance(content, Mapping):
        raise SweepError(f"{where}: a sweep spec is a mapping (notebook/entry, out, grid, runs, ...)")
    unknown = set(content) - SPEC_KEYS
    if unknown:
        raise SweepError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(SPEC_KEYS)})")
    if bool(content.get("notebook")) == bool(content.get("entry")):
        raise SweepError(f"{where}: name exactly one of 'notebook' (a .ipynb path) or 'entry' (module:function)")
    base_dir = Path(base_dir)
    if content.get("notebook"):
        notebook = Path(content["notebook"])
        target = str((notebook if notebook.is_absolute() else base_dir / notebook).resolve())
        if not target.endswith(".ipynb") or not Path(target).is_file():
            raise SweepError(f"{where}: notebook {content['notebook']} is not a .ipynb file")
    else:
        target = str(content["entry"])
        if ":" not in target:
            raise SweepError(f"{where}: entry {target!r} must read module:function")
    if not content.get("out"):
        raise SweepError(f"{where}: 'out' (the output folder) is missing")
    out = Path(content["out"])
    resources = dict(content.get("resources") or {})
    unknown = set(resources) - {"num_cpus", "num_gpus"}
    if unknown:
        raise SweepError(f"{where}: unknown resources {sorted(unknown)} (known: num_cpus, num_gpus)")
    for key, value in (("grid", content.get("grid")), ("parameters", content.get("parameters"))):
        if value is not None and not isinstance(value, Mapping):
            raise SweepError(f"{where}: '{key}' must be a mapping")
    if content.get("runs") is not None and not isinstance(content.get("runs"), list):
        raise SweepError(f"{where}: 'runs' must be a list of parameter mappings")
    runs = expand(target, content.get("parameters"), content.get("grid"), content.get("runs"),
                  name=content.get("name"))
    output_parameter = str(content.get("output_parameter", "output_dir"))
    for run in runs:
        if output_parameter in run.parameters:
            raise SweepError(f"{where}: '{output_parameter}' is set by the sweep (OUT/<run-id>); remove it")
    return SweepSpec(runs=runs, out=(out if out.is_absolute() else base_dir / out).resolve(),
                     num_cpus=float(resources.get("num_cpus", 1)), num_gpus=float(resources.get("num_gpus", 0)),
                     max_retries=int(content.get("max_retries", 2)), output_parameter=output_parameter,
                     kernel_name=str(content.get("kernel_name", "python3")),
                     source=Path(source) if source else None)


def load_spec(path: str | Path) -> SweepSpec:
    """Read a YAML spec file; relative paths in it are relative to the file's folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep spec {path} does not exist")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SweepError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    return parse_spec(content, base_dir=path.parent, source=path)
