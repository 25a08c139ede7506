"""Heatmaps for arbitrary user images: any size or format the data readers accept.

Each image is read (16-bit, grayscale, RGBA and palette images are converted as documented in
``data/README.md``; unreadable files raise a ``DatasetError`` naming the file), transformed like the
benchmarks, scored, and its map resized back to the file's own size for the outputs.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import atomic_write
from .data import DatasetError, read_image
from .data._scan import list_images
from .data.base import IMAGE_EXTENSIONS
from .data.transforms import ImageTransform
from .evaluate import run_method
from .methods.base import AnomalyMethod
from .viz import save_map_png, save_overlay

__all__ = ["collect_images", "predict_images", "write_predictions", "Prediction"]


@dataclass
class Prediction:
    """path: the input file; score: image anomaly score; amap: [H, W] float32 map at the file's own size;
    image: the decoded RGB image (as read, for the overlay)."""

    path: Path
    score: float
    amap: np.ndarray
    image: object = None


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files and folders (their image files, sorted, not recursive) -> image paths.

    Raises DatasetError naming a missing path or a folder with no images.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = list_images(path)  # sorted, hidden files (e.g. macOS ._*) skipped
            if not found:
                raise DatasetError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {path}")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise DatasetError(f"no such file or folder: {path}")
    if not paths:
        raise DatasetError("no input images given")
    return paths


def predict_images(
    method: AnomalyMethod,
    paths: Sequence[str | Path],
    class_name: str | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    progress: bool = True,
) -> Iterable[Prediction]:
    """Yield a :class:`Prediction` per image, in input order (batched internally)."""
    transform = ImageTransform(method.backbone.image_size)
    paths = [Path(p) for p in paths]
    bar = tqdm(total=len(paths), desc=f"{method.name}: predict", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = [read_image(p) for p in chunk]
        sizes = [(im.size[1], im.size[0]) for im in images]
        batch = torch.stack([transform(im) for im in images])
        names = [class_name or "object"] * len(chunk)
        output = run_method(method, batch, names, precision=precision)
        for i, path in enumerate(chunk):
            amap = F.interpolate(output.maps[i][None, None], size=sizes[i], mode="bilinear", align_corners=False)
            yield Prediction(path=path, score=float(output.scores[i]), amap=amap[0, 0].cpu().numpy(), image=images[i])
        bar.update(len(chunk))
    bar.close()


def write_predictions(predictions: Iterable[Prediction], out_dir: str | Path, save_npy: bool = False) -> Path:
    """Write ``<stem>_map.png``, ``<stem>_overlay.png`` (and ``<stem>_map.npy``) per image and ``scores.csv``.

    Returns the path of scores.csv. Every input gets its own output stem: its file stem, or, when an earlier
    input already took that name (``a.png`` and ``a.jpg``, the same name in two folders, or ``a.png``, ``a.jpg``
    and ``a_2.png``), the first free ``<stem>_2``, ``<stem>_3``, ... (in input order, so the same inputs always
    get the same names). scores.csv maps each input path to its stem.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    rows = []
    for prediction in predictions:
        stem = _unique_stem(prediction.path.stem, used)
        save_map_png(out / f"{stem}_map.png", prediction.amap)
        image = prediction.image if prediction.image is not None else read_image(prediction.path)
        save_overlay(out / f"{stem}_overlay.png", image, prediction.amap)
        if save_npy:
            np.save(out / f"{stem}_map.npy", prediction.amap.astype(np.float32))
        rows.append({"path": str(prediction.path), "output_stem": stem, "score": prediction.score,
                     "map_max": float(prediction.amap.max())})
    scores_path = out / "scores.csv"

    def write_scores(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "output_stem", "score", "map_max"])
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(scores_path, write_scores)
    return scores_path


def _unique_stem(stem: str, used: set[str]) -> str:
    """``stem``, or the first ``stem_N`` (N = 2, 3, ...) not in ``used`` (case-insensitively: a.png and A.png
    would overwrite each other on macOS and Windows); the choice is added to ``used``."""
    candidate, number = stem, 1
    while candidate.lower() in used:
        number += 1
        candidate = f"{stem}_{number}"
    used.add(candidate.lower())
    return candidate

