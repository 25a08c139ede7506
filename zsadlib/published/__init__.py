"""Published zero-shot numbers of the methods in this suite, as data.

One CSV per source paper in this folder (``*.csv``, installed as package data), one row per number:

* ``method``: a zsadlib method name (``winclip``, ``april_gan``, ``anomalyclip``, ``adaclip``, ``crane``,
  ``crane_plus``, ``vip2clip``, ``genclip``) or a documented baseline not in the registry (:data:`BASELINES`,
  empty today);
* ``dataset``: a :data:`zsadlib.data.DATASET_KINDS` name (``mvtec``, ``visa``, ``ksdd``, ``isic``, ...);
* ``metric``: a key of :func:`zsadlib.metrics.compute` (``image_auroc``, ``image_ap``, ``image_f1_max``,
  ``pixel_auroc``, ``pixel_ap``, ``pixel_f1_max``, ``aupro_linear200``, ``aupro_mvtec``). The seed papers'
  AUPRO columns come from the 200-threshold code and are stored as ``aupro_linear200``;
* ``value``: percent, exactly as printed (float);
* ``source``: paper and table, e.g. ``"Crane (arXiv 2504.11055) Table 1"``.

A method/dataset/metric can have several rows, one per source: papers re-run or copy each other's baselines
and the numbers differ (pick one with ``source=``). Nothing is invented: a number not found in a paper is
absent. What is missing, the transcription checks and the known inconsistencies of the papers are listed
in ``README.md`` beside this file.

Example::

    from zsadlib.published import load_published
    df = load_published(method="crane", dataset="mvtec")        # every source, every metric
    df.pivot_table(index="dataset", columns="metric", values="value")
"""

from __future__ import annotations

from importlib import resources
from typing import Iterable

__all__ = ["BASELINES", "COLUMNS", "csv_files", "load_published"]

#: The columns of every CSV and of :func:`load_published`'s result, in this order.
COLUMNS: tuple[str, ...] = ("method", "dataset", "metric", "value", "source")

#: Methods in the tables that zsadlib does not implement: name -> paper (AdaCLIP was one until it joined the registry).
BASELINES: dict[str, str] = {}


def csv_files() -> list:
    """The packaged CSV files (importlib.resources Traversables), sorted by name."""
    folder = resources.files(__name__)
    return sorted((p for p in folder.iterdir() if p.name.endswith(".csv")), key=lambda p: p.name)


def _as_set(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    return {value} if isinstance(value, str) else set(value)


def load_published(
    method: str | Iterable[str] | None = None,
    dataset: str | Iterable[str] | None = None,
    metric: str | Iterable[str] | None = None,
    source: str | None = None,
):
    """The published numbers as a pandas DataFrame with columns :data:`COLUMNS`.

    Each filter is a name or a list of names (None keeps all); ``source`` keeps the rows whose source
    contains that text (case-insensitive), e.g. ``source="Crane"``. Rows keep the files' order (files by
    name); the index is reset. ``value`` is float, in percent as printed.
    """
    import pandas as pd

    frames = []
    for path in csv_files():
        with path.open("r", encoding="utf-8") as handle:
            frame = pd.read_csv(handle, dtype={"value": float}, keep_default_na=False)
        if tuple(frame.columns) != COLUMNS:
            raise ValueError(f"zsadlib/published/{path.name}: columns {list(frame.columns)}, expected {list(COLUMNS)}")
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    for column, wanted in (("method", _as_set(method)), ("dataset", _as_set(dataset)), ("metric", _as_set(metric))):
        if wanted is not None:
            df = df[df[column].isin(wanted)]
    if source is not None:
        df = df[df["source"].str.contains(source, case=False, regex=False)]
    return df.reset_index(drop=True)
