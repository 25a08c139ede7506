"""Plain, slow reference implementations of the AUPRO definitions (for tests and bench only).

Written straight from the definitions in zsadlib/metrics.py, with Python loops over thresholds and
regions, so that the fast kernels can be checked against something obviously right. Not part of the
library. bench/bench_metrics.py imports this file by adding tests/ to sys.path.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
from skimage import measure
from sklearn.metrics import auc


def _regions(mask: np.ndarray):
    """Regions (8-connectivity, skimage's default for 2-D) of one [H,W] mask."""
    return measure.regionprops(measure.label(mask.astype(np.uint8), connectivity=2))


def plain_aupro_linear200(masks, amaps, max_step: int = 200, expect_fpr: float = 0.3,
                          relabel_each_threshold: bool = False) -> float:
    """The seed papers' AUPRO: a 200-step score grid, FPR < expect_fpr kept, FPR min-max normalised.

    masks [N,H,W] bool, amaps [N,H,W] float. With relabel_each_threshold the regions are recomputed
    at every threshold, as the released reference code does (same result, slower).
    """
    masks = np.asarray(masks).astype(bool)
    amaps = np.asarray(amaps)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    normal = ~masks
    n_normal = normal.sum()
    regions = None if relabel_each_threshold else [_regions(m) for m in masks]
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary = amaps > th
        overlaps = []
        for i, image_binary in enumerate(binary):
            image_regions = _regions(masks[i]) if relabel_each_threshold else regions[i]
            for region in image_regions:
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(image_binary[rows, cols].sum() / region.area)
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(binary, normal).sum() / n_normal)
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return auc(f, pros[keep])


def plain_pro_curve_mvtec(masks, amaps):
    """The exact MVTec PRO curve: (0,0), one (FPR, PRO) per distinct score (>= threshold), (1,1).

    masks [N,H,W] bool, amaps [N,H,W] float -> (fprs, pros), FPR ascending.
    """
    masks = np.asarray(masks).astype(bool)
    amaps = np.asarray(amaps)
    region_scores = []
    for amap, mask in zip(amaps, masks):
        for region in _regions(mask):
            region_scores.append(amap[region.coords[:, 0], region.coords[:, 1]])
    normal_scores = amaps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(amaps)[::-1]:
        fprs.append(np.sum(normal_scores >= t) / normal_scores.size)
        pros.append(np.mean([np.mean(scores >= t) for scores in region_scores]))
    fprs.append(1.0)
    pros.append(1.0)
    return np.array(fprs), np.array(pros)


def plain_trapezoid(x, y, x_max: float) -> float:
    """Trapezoid area of the curve (x ascending) from x[0] to x_max, y interpolated at x_max."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    area = 0.0
    if x_max not in x:
        i = bisect_right(x.tolist(), x_max)  # x[i-1] < x_max < x[i]
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        area += 0.5 * (y_at + y[i - 1]) * (x_max - x[i - 1])
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    area += float(np.sum(0.5 * (ys[1:] + ys[:-1]) * (xs[1:] - xs[:-1])))
    return area


def plain_aupro_mvtec(masks, amaps, max_fpr: float = 0.3) -> float:
    """MVTec AD AUPRO: exact PRO curve integrated to max_fpr, divided by max_fpr."""
    fprs, pros = plain_pro_curve_mvtec(masks, amaps)
    return plain_trapezoid(fprs, pros, max_fpr) / max_fpr
