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

import contextlib
import csv
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import metrics as metrics_module
from .data import AnomalyDataset, collate_samples
from .methods.base import AnomalyMethod, MethodOutput
from .utils import json_safe, package_versions

__all__ = ["Precision", "autocast", "run_method", "evaluate", "EvaluationResult", "PRECISIONS", "format_table"]

PRECISIONS = ("fp32", "bf16", "fp16")
Precision = str


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision = "fp32") -> Iterator[None]:
    """Reduced precision behind one switch: ``"fp32"`` (off), ``"bf16"`` (CPU and CUDA), ``"fp16"`` (CUDA)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        yield
        return
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs CUDA; on the CPU use 'bf16'")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


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
        work_dir: where the disk-backed maps live during the run (default: a temporary folder).
        keep_maps_for: dataset indices whose maps are returned in ``result.kept_maps`` (for figures; keep it
            short, these stay in memory).
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
    scratch = Path(tempfile.mkdtemp(prefix="zsad-eval-", dir=work_dir))
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
        for batch in loader:
            output = run_method(method, batch.images, batch.class_names, precision=precision)
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
        table = metrics_module.compute_table(labels, scores, masks, maps, class_names,
                                             aupro_variants=aupro_variants, progress=progress)
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
                    "anomalous": int(labels.sum()), "has_masks": bool(dataset.has_masks)},
        "run": {"batch_size": batch_size, "precision": precision, "seed": seed,
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
        (out_path / "metrics.json").write_text(json.dumps(summary, indent=2))
        with open(out_path / "scores.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "class_name", "defect", "label", "score"])
            writer.writeheader()
            writer.writerows(rows)
    return EvaluationResult(table=table, metrics=table_dict["mean"], summary=summary, out_dir=out_path,
                            scores=scores, labels=labels, kept_maps=kept_maps)


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
