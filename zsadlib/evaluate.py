"""Evaluation engine: run a method over a dataset, score it per class, write metrics.json and scores.csv.

Memory stays flat as the dataset grows: the anomaly maps and masks of every image are written to
disk-backed arrays (``numpy.memmap``, float32 maps, bool masks) as batches come out of the method, and the
metric kernels read them back a class at a time (chunked). Nothing holds a list of full-resolution maps.

Typical use::

    from zsadlib.data import open_dataset
    from zsadlib.methods import build_method
    from zsadlib.evaluate import evaluate

    method = build_method("winclip")                         # paper defaults, real weights
    dataset = open_dataset("mvtec", "/data/mvtec", image_size=method.config.image_size)
    result = evaluate(method, dataset, out_dir="runs/winclip_mvtec")
    print(result.table)                                      # per-class rows + "mean", in percent
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import metrics as metrics_module
from .checkpoint import atomic_write
from .data import AnomalyDataset, collate_samples, metric_levels
from .methods.base import AnomalyMethod, MethodOutput
from .runtime import PRECISIONS, Precision, autocast, compiled  # noqa: F401 - importable from here as before
from .utils import json_safe, package_versions

__all__ = ["Precision", "autocast", "run_method", "evaluate", "EvaluationResult", "PRECISIONS", "format_table"]


def run_method(
    method: AnomalyMethod,
    images: torch.Tensor,
    class_names: list[str] | None = None,
    precision: Precision = "fp32",
) -> MethodOutput:
    """One batch through a method without gradients, maps and scores returned as float32.

    images: [B, 3, S, S]. Returns MethodOutput with scores [B] and maps [B, S, S] (float32, method's device).
    """
    device = method.backbone.device
    with torch.inference_mode(), autocast(device, precision):
        output = method(images.to(device), class_names)
    return MethodOutput(scores=output.scores.float(), maps=output.maps.float(), extras=output.extras)


@dataclass
class EvaluationResult:
    """table: per-class metrics in [0, 1] with a final "mean" row (pandas DataFrame);
    metrics: the ``mean`` row as a dict; out_dir: where metrics.json and scores.csv were written (or None);
    summary: the full metrics.json content."""

    table: Any
    metrics: dict[str, float | None]
    summary: dict[str, Any]
    out_dir: Path | None = None
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kept_maps: dict[int, np.ndarray] = field(default_factory=dict)

    def percent_table(self, decimals: int = 1):
        return metrics_module.format_percent(self.table, decimals)




def evaluate(
    method: AnomalyMethod,
    dataset: AnomalyDataset,
    out_dir: str | Path | None = None,
    batch_size: int = 8,
    precision: Precision = "fp32",
    num_workers: int = 0,
    aupro_variants: tuple[str, ...] = metrics_module.AUPRO_VARIANTS,
    progress: bool = True,
    seed: int = 0,
    extra_info: dict[str, Any] | None = None,
    work_dir: str | Path | None = None,
    keep_maps_for: Sequence[int] = (),
    compile: bool | str = False,
) -> EvaluationResult:
    """Run ``method`` over ``dataset``, compute per-class metrics and the macro mean.

    Writes (when ``out_dir`` is given) ``metrics.json`` (metrics, per-class rows, method config, backbone and
    weights checksum, preprocessing, package versions, seed, dataset) and ``scores.csv`` (one row per image:
    path, class, defect, label, score).

    Args:
        method: a built method (its backbone's image size must match the dataset's).
        dataset: from :func:`zsadlib.data.open_dataset`.
        out_dir: output folder, created if missing; None writes nothing.
        batch_size, num_workers: DataLoader settings.
        precision: "fp32" (default), "bf16" or "fp16" (CUDA) autocast.
        aupro_variants: which AUPRO definitions to compute.
        progress: tqdm bars for the inference and the metric step.
        seed: recorded (and used to seed torch) for the record.
        extra_info: merged into metrics.json (e.g. the CLI's arguments).
        work_dir: where the disk-backed maps live during the run (default: ``out_dir``, else the system temp
            folder), in a hidden ``.zsad-eval-<pid>-*`` folder that is deleted at the end, on errors and on
            SIGINT/SIGTERM (in the CLI); one left by a SIGKILL is deleted by the next evaluation there.
        keep_maps_for: dataset indices whose maps are returned in ``result.kept_maps`` (for figures; keep it
            short, these stay in memory).
        compile: ``torch.compile`` the method for this evaluation (True or a mode of
            :data:`zsadlib.runtime.COMPILE_MODES`); results equal the uncompiled ones up to float rounding.
    """
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset!r} is empty")
    if dataset.image_size != method.backbone.image_size:
        raise ValueError(
            f"dataset image_size {dataset.image_size} != backbone image_size {method.backbone.image_size}; "
            f"open the dataset with image_size={method.backbone.image_size}"
        )
    torch.manual_seed(seed)
    size = dataset.image_size
    count = len(dataset)
    started = time.time()
    if work_dir is None and out_dir is not None:  # work files live beside the results, not in the system temp
        work_dir = Path(out_dir)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(work_dir)
    scratch = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=work_dir))
    try:
        maps = np.lib.format.open_memmap(scratch / "maps.npy", mode="w+", dtype=np.float32, shape=(count, size, size))
        masks = None
        if dataset.has_masks:
            masks = np.lib.format.open_memmap(scratch / "masks.npy", mode="w+", dtype=bool, shape=(count, size, size))
        scores = np.zeros(count, dtype=np.float64)
        labels = np.zeros(count, dtype=np.int64)
        class_names: list[str] = []
        rows: list[dict[str, Any]] = []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=collate_samples)
        position = 0
        bar = tqdm(total=count, desc=f"{method.name}: inference", unit="img", disable=not progress)
        runner = compiled(method, compile)
        for batch in loader:
            output = run_method(runner, batch.images, batch.class_names, precision=precision)
            n = len(batch)
            maps[position:position + n] = output.maps.detach().cpu().numpy()
            if masks is not None:
                masks[position:position + n] = batch.masks.numpy()
            scores[position:position + n] = output.scores.detach().cpu().double().numpy()
            labels[position:position + n] = batch.labels.numpy()
            class_names.extend(batch.class_names)
            for i in range(n):
                rows.append({"path": batch.paths[i], "class_name": batch.class_names[i],
                             "defect": batch.defects[i], "label": int(batch.labels[i]),
                             "score": float(scores[position + i])})
            position += n
            bar.update(n)
        bar.close()
        inference_seconds = time.time() - started
        maps.flush()
        kept_maps = {int(i): np.array(maps[int(i)]) for i in keep_maps_for}
        # a set without normal images (ISIC, ColonDB, ...) or without masks (HeadCT, ...) leaves that level out
        levels = metric_levels(dataset) or metrics_module.LEVELS
        table = metrics_module.compute_table(labels, scores, masks, maps, class_names,
                                             aupro_variants=aupro_variants, progress=progress, levels=levels)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table_dict = metrics_module.table_to_dict(table)
    backbone_info = dict(method.backbone.info)
    summary = {
        "metrics": table_dict["mean"],
        "per_class": table_dict["per_class"],
        "nan_classes": table_dict["nan_classes"],
        "method": method.describe(dataset.class_names),
        "backbone": backbone_info,
        "weights_sha256": backbone_info.get("weights_sha256"),
        "random_weights": bool(backbone_info.get("random_weights")),
        "note": (
            "TINY/RANDOM WEIGHTS: these numbers mean nothing (smoke run)" if backbone_info.get("random_weights")
            else "pretrained weights"
        ),
        "preprocessing": _describe_preprocessing(dataset),
        "dataset": {"kind": dataset.kind, "root": str(dataset.root), "split": dataset.split,
                    "classes": list(dataset.class_names), "images": count,
                    "anomalous": int(labels.sum()), "has_masks": bool(dataset.has_masks),
                    "metric_levels": list(levels)},
        "run": {"batch_size": batch_size, "precision": precision, "seed": seed, "compile": compile,
                "device": str(method.backbone.device), "inference_seconds": round(inference_seconds, 3),
                "total_seconds": round(time.time() - started, 3)},
        "aupro_variants": list(aupro_variants),
        "versions": package_versions(),
    }
    if extra_info:
        summary["extra"] = extra_info
    summary = json_safe(summary)
    out_path = None
    if out_dir is not None:
        out_path = Path(out_dir)
        out_path.mkdir(parents=True, exist_ok=True)
        atomic_write(out_path / "metrics.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))

        def write_scores(tmp: Path) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["path", "class_name", "defect", "label", "score"])
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(out_path / "scores.csv", write_scores)
    return EvaluationResult(table=table, metrics=table_dict["mean"], summary=summary, out_dir=out_path,
                            scores=scores, labels=labels, kept_maps=kept_maps)


WORK_PREFIX = ".zsad-eval-"  # + pid + "-" + random: the folder of one run's disk-backed maps and masks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_work_dirs(folder: str | Path | None = None) -> list[Path]:
    """Delete the work folders that killed evaluations left in ``folder`` (default: the system temp folder):
    those whose process no longer runs. Returns what was deleted."""
    folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    removed = []
    for path in folder.glob(f"{WORK_PREFIX}*"):
        pid = path.name[len(WORK_PREFIX):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _describe_preprocessing(dataset: AnomalyDataset) -> dict[str, Any]:
    described: dict[str, Any] = {"image_size": dataset.image_size}
    for key, transform in (("image", dataset.transform), ("mask", dataset.mask_transform)):
        if transform is None:
            described[key] = None
        elif hasattr(transform, "to_dict"):
            described[key] = transform.to_dict()
        else:
            described[key] = repr(transform)
    return described


def format_table(table, decimals: int = 1) -> str:
    """Per-class table in percent as plain text (for the CLI)."""
    percent = metrics_module.format_percent(table, decimals)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (percent + 0.0).to_string(na_rep="-")  # + 0.0 turns -0.0 into 0.0
