"""Evaluation metrics for zero-shot anomaly detection, exact and lean.

Metrics (all values are fractions in [0, 1], never percent):

* image level: AUROC, AP (average precision), F1-max, from image labels [N] and image scores [N];
* pixel level: AUROC, AP, F1-max over all pixels of all images, from masks [N,H,W] and maps [N,H,W];
* AUPRO, the area under the per-region-overlap (PRO) curve, in two variants.

Definitions. AUROC equals ``sklearn.metrics.roc_auc_score`` and AP equals
``sklearn.metrics.average_precision_score`` (thresholds at the distinct score values, ties counted
as sklearn counts them). F1-max is the maximum over the precision-recall curve of 2PR/(P+R) (0 where
P+R = 0); at a threshold t this is 2 TP / (TP + FP + #positives).

The two AUPRO variants (papers mix them up, and the numbers differ by several points):

``"mvtec"`` -- the MVTec AD evaluation definition. Ground-truth regions are the connected components
    of each mask (8-connectivity, per image). At every distinct anomaly score t, a pixel is predicted
    anomalous when its score is >= t; FPR(t) is the fraction of all normal pixels (of all images)
    predicted anomalous, and PRO(t) is the mean over all regions (of all images together) of the
    fraction of the region's pixels predicted anomalous. The exact curve (0, 0), (FPR, PRO) at every
    distinct score, (1, 1) is integrated with the trapezoid rule from FPR 0 to ``max_fpr`` (the PRO at
    exactly ``max_fpr`` linearly interpolated) and divided by ``max_fpr``.

``"linear200"`` -- what the seed papers' code reports (AnomalyCLIP / APRIL-GAN ``cal_pro_score``,
    derived from CFLOW-AD). 200 thresholds ``np.arange(min, max, (max - min) / 200)`` over the global
    min and max of the maps, computed exactly as that code does (under NumPy 2 this grid is float64
    even for float32 maps); at each, a pixel is anomalous when its score is > threshold; PRO = mean
    over all regions (8-connectivity, all images) of the covered fraction, FPR over all normal
    pixels. Only the points with FPR < ``max_fpr`` are kept, their FPRs are min-max normalised to
    [0, 1] and the area is the trapezoid rule as in ``sklearn.metrics.auc``.
    Oddities: the area is not normalised by ``max_fpr`` but stretched over the FPR range of the kept
    grid points, which depends on where the 200 score-space thresholds happen to fall (a curve whose
    grid jumps from FPR 0.05 to 0.4 is stretched from [0, 0.05] to [0, 1]); with coarse or quantised
    maps it can differ from "mvtec" by tens of points; the strict ``>`` differs from ">=" in "mvtec".

How it is computed (exact, no per-threshold or per-region loop, inputs never copied whole):

* Pass 1 (chunks of images): global min / max; for each defective image, inside the bounding box of
  its mask, the regions (``scipy.ndimage.label``, 3x3 structure) and the anomalous pixels' scores
  and global region ids. Anomalous pixels are usually a small fraction of all pixels.
* The anomalous scores are sorted once; their D distinct values u_0 < ... < u_{D-1} carry a pixel
  count and a PRO weight sum (each anomalous pixel weighs 1 / (#regions * its region's size)).
* Pass 2 (chunks of 2^22..2^25 pixels): each chunk of all pixels is copied into one reusable buffer
  and sorted (numpy's vectorised sort on CPU, ``torch.sort`` on GPU); binary searches of the D
  values and of the linear200 thresholds into it count, per chunk, the pixels below / above each.
  The anomalous pixels' own contribution is known and subtracted, so normal pixels are never
  gathered.
* This gives the normal pixels binned against the u values ("strictly between u_{j-1} and u_j" or
  "equal to u_{j-1}"), from which follow exactly, ties handled as sklearn does: pixel AUROC
  (Mann-Whitney, ties count one half), AP and F1-max (TP and FP at every distinct anomalous score),
  and the "mvtec" AUPRO: between two consecutive distinct anomalous scores the PRO is flat and a block
  of normal pixels tied with an anomalous score is one straight segment, so the exact trapezoid area
  of the full curve, cut at ``max_fpr`` with interpolation, is a sum over the 2D+1 bins.
* "linear200": per-region histograms of each anomalous pixel's threshold bin (``bincount`` over
  ``region * (T+1) + bin``); suffix sums give every threshold's covered count per region; the
  counted pixels above each threshold minus the anomalous ones give the FPR.

Memory: one chunk buffer (at most 2^25 values, or 32 per distinct anomalous score) plus about 50
bytes per anomalous pixel. Everything of the size of the anomalous pixels or smaller is numpy on
CPU; the per-pixel sort runs on the maps' device (numpy input: CPU, no copy).

Undefined metrics (one class only, no anomalous region, no normal pixel, constant maps, ...) are NaN
and reported with a single :class:`UndefinedMetricWarning` per call.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

__all__ = [
    "AUPRO_VARIANTS",
    "DEFAULT_CHUNK_PIXELS",
    "IMAGE_KEYS",
    "LEVELS",
    "METRIC_KEYS",
    "PIXEL_KEYS",
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "binary_metrics",
    "compute",
    "compute_table",
    "f1_max",
    "format_percent",
    "linear200_thresholds",
    "pixel_metrics",
    "table_to_dict",
]

AUPRO_VARIANTS = ("mvtec", "linear200")
IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max")
METRIC_KEYS = IMAGE_KEYS + PIXEL_KEYS + tuple(f"aupro_{v}" for v in AUPRO_VARIANTS)
LEVELS = ("image", "pixel")  # compute_table(levels=...): image keys; pixel keys and AUPRO
DEFAULT_CHUNK_PIXELS = 1 << 22  # pass 1 (regions): about 16 images of 518 x 518 per chunk
DEFAULT_SORT_CHUNK_PIXELS = 1 << 25  # pass 2 (sorting): about 125 images of 518 x 518 per chunk
LINEAR_STEPS = 200

_NAN = float("nan")


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given data (e.g. only one class) and was set to NaN."""


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _as_tensor(x: Any) -> torch.Tensor:
    """numpy / list / tensor -> tensor, without copying numpy arrays (CPU) or tensors (any device)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    arr = np.asarray(x)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    arr = np.ascontiguousarray(arr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # we never write to inputs
        return torch.from_numpy(arr)


_TORCH_ONLY = False  # tests set this to run the GPU code path (torch ops) on CPU tensors


def _numpy_path(t: torch.Tensor) -> bool:
    """Whether per-pixel work on t runs through numpy (CPU tensors) rather than torch (GPU)."""
    return t.device.type == "cpu" and not _TORCH_ONLY


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores are compared in float64 if given in float64, else in float32 (half types upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _minmax(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a tensor as Python floats; raises on NaN/inf (NaN propagates into min/max)."""
    if _numpy_path(t):
        a = t.numpy()
        lo, hi = float(a.min()), float(a.max())  # numpy's SIMD reductions beat torch.aminmax on CPU
    else:
        lo, hi = (float(v) for v in torch.aminmax(t))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("scores/maps contain NaN or inf")
    return lo, hi


def _mask_numpy(t: torch.Tensor) -> np.ndarray:
    """A chunk of masks as a CPU numpy bool array (nonzero = anomalous, as skimage.measure.label)."""
    t = t if t.dtype == torch.bool else t != 0
    return t.cpu().numpy()


def _check_maps(masks: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes: masks and maps [N,H,W] (a singleton channel [N,1,H,W] is squeezed)."""
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks and maps must both be [N,H,W]; got {tuple(masks.shape)} and {tuple(maps.shape)}")
    if maps.shape[0] == 0:
        raise ValueError("no images")
    return masks, maps


def _chunks(n: int, pixels_per_item: int, chunk_pixels: int) -> list[tuple[int, int]]:
    """Split range(n) into [start, stop) pieces of about chunk_pixels pixels (at least one item)."""
    step = max(1, int(chunk_pixels) // max(1, pixels_per_item))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _warn_undefined(reasons: dict[str, str], where: str = "") -> None:
    """One UndefinedMetricWarning listing every NaN metric with its reason."""
    if not reasons:
        return
    by_reason: dict[str, list[str]] = {}
    for key, why in reasons.items():
        by_reason.setdefault(why, []).append(key)
    parts = [f"{', '.join(keys)} ({why})" for why, keys in by_reason.items()]
    warnings.warn(f"undefined metrics set to NaN{where}: " + "; ".join(parts), UndefinedMetricWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# sorting primitives: the only per-pixel work, on the maps' device (numpy's vectorised sort on
# CPU, ~20-40x faster there than torch.sort; torch on GPU). Everything of the size of the
# anomalous pixels or smaller is plain numpy on CPU.
# --------------------------------------------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array (free on CPU)."""
    return t.detach().cpu().numpy()


def _sorted_flat(t: torch.Tensor, buf: np.ndarray | None = None) -> torch.Tensor:
    """All values of t, flattened and sorted ascending -> [n]; t is not modified. On CPU the values
    are copied into buf (a reusable numpy array of at least t.numel() values of t's dtype, so that
    large allocations are not paid per chunk) and sorted there in place."""
    if _numpy_path(t):
        src = t.numpy()
        out = np.empty(src.size, dtype=src.dtype) if buf is None else buf[: src.size]
        np.copyto(out.reshape(src.shape), src)
        out.sort()
        return torch.from_numpy(out)
    return torch.sort(t.reshape(-1)).values


def _count_below(sorted_vals: torch.Tensor, q: np.ndarray, *, or_equal: bool) -> np.ndarray:
    """For each query q [M] (same dtype): how many of sorted_vals [n] are < q (or <= q) -> [M] int64."""
    if _numpy_path(sorted_vals):
        return np.searchsorted(sorted_vals.numpy(), q, side="right" if or_equal else "left").astype(np.int64)
    q_t = torch.from_numpy(q).to(sorted_vals.device)
    return _np(torch.searchsorted(sorted_vals, q_t, right=or_equal)).astype(np.int64)


def _round_down(q: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """q [M] as the largest values of `dtype` that are <= q, so that for every x of that dtype
    (x <= q) == (x <= result). Lets float32 maps be counted against the float64 linear200 grid
    (NumPy's arange gives float64 there) exactly, without upcasting the maps."""
    r = q.astype(dtype)
    too_big = r.astype(np.float64) > q
    r[too_big] = np.nextafter(r[too_big], dtype.type(-np.inf))
    return r


# --------------------------------------------------------------------------------------------
# rank statistics (exact AUROC / AP / F1-max and the "mvtec" AUPRO), numpy on CPU
# --------------------------------------------------------------------------------------------


def _distinct(pos_scores: np.ndarray, pos_weights: np.ndarray | None = None):
    """Distinct positive scores with their counts and (optionally) summed weights.

    pos_scores [P], pos_weights [P] float64 or None ->
    u [D] ascending distinct values, counts [D] int64, wsum [D] float64 or None.
    """
    if pos_weights is None:
        sv = np.sort(pos_scores)
    else:
        order = np.argsort(pos_scores)
        sv = pos_scores[order]
    starts = np.flatnonzero(np.concatenate([[True], sv[1:] != sv[:-1]]))
    u = sv[starts]
    counts = np.diff(np.append(starts, sv.size)).astype(np.int64)
    wsum = None if pos_weights is None else np.add.reduceat(pos_weights[order], starts)
    return u, counts, wsum


@dataclass
class _RankBins:
    """Negatives binned against the distinct positive scores u [D] (int64 arrays):

    lt [D+1]: negatives strictly between u[j-1] and u[j] (j = 0: below u[0]; j = D: above u[D-1]);
    eq [D+1]: negatives equal to u[j-1] (eq[0] = 0).
    """

    lt: np.ndarray
    eq: np.ndarray

    @classmethod
    def from_counts(cls, neg_lt: np.ndarray, neg_le: np.ndarray, n_neg: int) -> "_RankBins":
        """From #negatives < u[i] and <= u[i] (both [D]) and the number of negatives."""
        lt = np.append(neg_lt, n_neg) - np.concatenate([[0], neg_le])
        eq = np.concatenate([[0], neg_le - neg_lt])
        return cls(lt, eq)


def _suffix_sum(x: np.ndarray) -> np.ndarray:
    """[D] -> [D]: out[i] = x[i:].sum()."""
    return np.cumsum(x[::-1])[::-1]


def _rank_stats(counts: np.ndarray, bins: _RankBins) -> tuple[float, float, float]:
    """AUROC, AP, F1-max from positive counts per distinct value [D] and the negatives' bins."""
    cnt = counts.astype(np.float64)
    eq = bins.eq.astype(np.float64)
    neg_bin = bins.lt + eq  # [D+1]
    n_pos, n_neg = cnt.sum(), neg_bin.sum()
    tp_ge = _suffix_sum(cnt)  # [D] positives >= u[i]
    tp_above_bin = np.append(tp_ge, 0.0)  # [D+1] positives > every score of bin j
    # Mann-Whitney: each negative counts the positives above it plus half the positives tied with it.
    pairs = np.dot(neg_bin, tp_above_bin) + 0.5 * np.dot(eq[1:], cnt)
    fp_ge = _suffix_sum(neg_bin)[1:]  # [D] negatives >= u[i]
    ap = np.dot(cnt, tp_ge / (tp_ge + fp_ge)) / n_pos
    f1 = np.max(2.0 * tp_ge / (tp_ge + fp_ge + n_pos))
    return float(pairs / (n_pos * n_neg)), float(ap), float(f1)


def _mvtec_area(wsum: np.ndarray, bins: _RankBins, n_neg: int, max_fpr: float) -> float:
    """Exact MVTec AUPRO from the PRO weight per distinct anomalous score [D] and the normal pixels'
    bins against those scores.

    Walking down from the highest score, bin j first adds lt[j] normal pixels at the constant PRO
    a[j] (the PRO weight of the scores >= u[j]), then eq[j] normal pixels tied with u[j-1], which
    form one straight segment from a[j] up to a[j-1]. Vertical steps add no trapezoid area, so the
    area is a sum over bins; the bin crossing max_fpr is cut with linear interpolation.
    """
    a = np.append(_suffix_sum(wsum), 0.0)  # [D+1]
    a_prev = np.append(a[0], a[:-1])  # a[j-1] (eq[0] = 0, so its value at j = 0 is irrelevant)
    lt, eq = bins.lt.astype(np.float64), bins.eq.astype(np.float64)
    end = _suffix_sum(lt + eq)  # normal pixels at or above bin j, i.e. counted once bin j is done
    start = end - lt - eq
    limit = max_fpr * n_neg  # the cut, in normal-pixel counts
    done = end <= limit
    area = float(np.dot(lt[done], a[done]) + 0.5 * np.dot(eq[done], (a + a_prev)[done]))
    if not done.all():
        j = int(np.flatnonzero(~done)[-1])  # the highest bin not finished at the cut
        rest = limit - start[j]
        if rest <= lt[j]:
            area += a[j] * rest
        else:
            rest -= lt[j]
            y = a[j] + (a_prev[j] - a[j]) * rest / eq[j]
            area += a[j] * lt[j] + 0.5 * (a[j] + y) * rest
    return area / n_neg / max_fpr


# --------------------------------------------------------------------------------------------
# image-level (and generic binary) metrics
# --------------------------------------------------------------------------------------------


def _binary_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """labels [N] 0/1, scores [N] -> (bool [N], float [N]) numpy arrays."""
    s = _np(_as_tensor(scores)).reshape(-1)
    y = _np(_as_tensor(labels)).reshape(-1)
    if y.size != s.size:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be 0/1")
        y = y != 0
    # float64 and integer scores stay exact (float32 would tie integers above 2**24); other floats as float32
    s = s.astype(np.float64 if s.dtype == np.float64 or s.dtype.kind in "iub" else np.float32, copy=False)
    if s.size and not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return y, s


def _binary_metrics(labels: Any, scores: Any) -> tuple[tuple[float, float, float], str | None]:
    """(auroc, ap, f1_max), reason-if-undefined."""
    y, s = _binary_inputs(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return (_NAN, _NAN, _NAN), f"only one class present ({n_neg} negative, {n_pos} positive)"
    u, counts, _ = _distinct(s[y])
    neg = np.sort(s[~y])
    neg_lt = np.searchsorted(neg, u, side="left")
    neg_le = np.searchsorted(neg, u, side="right")
    return _rank_stats(counts, _RankBins.from_counts(neg_lt, neg_le, n_neg)), None


def binary_metrics(labels: Any, scores: Any) -> dict[str, float]:
    """Exact AUROC, AP and F1-max of scores [N] against 0/1 labels [N] -> {"auroc", "ap", "f1_max"}.

    NaN (with an UndefinedMetricWarning) when only one class is present.
    """
    (a, p, f), why = _binary_metrics(labels, scores)
    if why:
        _warn_undefined({"auroc": why, "ap": why, "f1_max": why})
    return {"auroc": a, "ap": p, "f1_max": f}


def auroc(labels: Any, scores: Any) -> float:
    """ROC AUC, equal to sklearn.metrics.roc_auc_score (ties count one half). labels [N], scores [N]."""
    (a, _, _), why = _binary_metrics(labels, scores)
    if why:
        _warn_undefined({"auroc": why})
    return a


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision, equal to sklearn.metrics.average_precision_score. labels [N], scores [N]."""
    (_, p, _), why = _binary_metrics(labels, scores)
    if why:
        _warn_undefined({"ap": why})
    return p


def f1_max(labels: Any, scores: Any) -> float:
    """Max over the precision-recall curve of 2PR/(P+R) (0 where P+R=0). labels [N], scores [N]."""
    (_, _, f), why = _binary_metrics(labels, scores)
    if why:
        _warn_undefined({"f1_max": why})
    return f


# --------------------------------------------------------------------------------------------
# pixel passes
# --------------------------------------------------------------------------------------------


@dataclass
class _Anomalous:
    """What pass 1 gathers (numpy): scores [Na] of the anomalous pixels (working dtype) in image /
    row-major order, comp [Na] int64 global region ids (or None), comp_sizes [K] int64, the number
    of normal pixels and the global min / max score."""

    scores: np.ndarray
    comp: np.ndarray | None
    comp_sizes: np.ndarray
    n_neg: int
    lo: float
    hi: float
    dtype: torch.dtype


_STRUCT_8 = np.ones((3, 3), dtype=bool)  # 8-connectivity (skimage.measure.label's default in 2-D)


def _bbox(mask: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of the True pixels of a [H,W] mask that has some."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _masked_values(t: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """t[mask] as numpy, for a [h,w] tensor view and a [h,w] numpy bool mask (numpy's boolean
    indexing on CPU: torch's is ~100x slower on strided views)."""
    if _numpy_path(t):
        return t.numpy()[mask]
    return _np(t[torch.from_numpy(mask).to(t.device)])


def _gather_anomalous(masks, maps, *, label_regions: bool, chunk_pixels: int, progress: bool) -> _Anomalous:
    """Pass 1: global min/max; per defective image, inside the mask's bounding box, the region labels
    and the anomalous pixels' scores. masks [N,H,W], maps [N,H,W] tensors."""
    n, h, w = maps.shape
    dtype = _work_dtype(maps.dtype)
    scores, comps, sizes = [], [], []
    n_pos, n_comp = 0, 0
    lo, hi = math.inf, -math.inf
    for a, b in tqdm(_chunks(n, h * w, chunk_pixels), desc="metrics: regions", disable=not progress, leave=False):
        s = maps[a:b].to(dtype)
        c_lo, c_hi = _minmax(s)
        lo, hi = min(lo, c_lo), max(hi, c_hi)
        m = _mask_numpy(masks[a:b])
        for i in np.flatnonzero(m.reshape(len(m), -1).any(axis=1)):
            rows, cols = _bbox(m[i])
            crop = m[i, rows, cols]
            n_pos += int(np.count_nonzero(crop))
            scores.append(_masked_values(s[i, rows, cols], crop))
            if label_regions:
                lab, k = ndimage.label(crop, structure=_STRUCT_8)
                sizes.append(np.bincount(lab.ravel(), minlength=k + 1)[1:])
                comps.append(lab[crop].astype(np.int64) + (n_comp - 1))
                n_comp += k
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    cat_scores = np.concatenate(scores) if scores else np.zeros(0, dtype=np_dtype)
    comp = None
    if label_regions:
        comp = np.concatenate(comps) if comps else np.zeros(0, dtype=np.int64)
    comp_sizes = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
    return _Anomalous(cat_scores, comp, comp_sizes, n * h * w - n_pos, lo, hi, dtype)


def linear200_thresholds(lo: float, hi: float, dtype: Any = np.float32, steps: int = LINEAR_STEPS) -> np.ndarray:
    """The "linear200" threshold grid, computed as the reference code does.

    ``np.arange(lo, hi, (hi - lo) / steps)`` on numpy scalars of the maps' dtype. This has ``steps``
    points from lo (inclusive) to hi (exclusive), or one more when float rounding of the step makes
    arange overshoot -- reproduced as is. Note that NumPy 2's arange returns float64 even for float32
    scalars; the reference then compares float32 maps with float64 thresholds, and so do we.
    Returns [T].
    """
    dt = np.dtype(dtype).type
    lo_t, hi_t = dt(lo), dt(hi)
    if hi_t <= lo_t:
        return np.zeros(0, dtype=np.float64)
    delta = (hi_t - lo_t) / steps
    return np.arange(lo_t, hi_t, delta)


@dataclass
class _Counts:
    """What pass 2 counts over all pixels (int64 numpy): below_u [D] (< u[i]), upto_u [D]
    (<= u[i]), above_grid [T] (> grid[t])."""

    below_u: np.ndarray | None = None
    upto_u: np.ndarray | None = None
    above_grid: np.ndarray | None = None


def _auto_chunk(chunk_pixels: int | None, n_distinct: int) -> int:
    """Default pass-2 chunk: 2^22 pixels when only thresholds are counted; with distinct anomalous
    scores to rank against, 2^25 or 32 per distinct score (each chunk costs two binary searches per
    distinct score, which would otherwise dominate its sort)."""
    if chunk_pixels is not None:
        return int(chunk_pixels)
    if n_distinct == 0:
        return DEFAULT_CHUNK_PIXELS
    return max(DEFAULT_SORT_CHUNK_PIXELS, 32 * n_distinct)


def _count_pass(maps, dtype: torch.dtype, u: np.ndarray | None, grid: np.ndarray | None, *,
                chunk_pixels: int, progress: bool) -> _Counts:
    """Pass 2: sort each chunk of pixels once, then count it below every u [D] / above every grid [T]."""
    n, h, w = maps.shape
    out = _Counts()
    np_dtype = np.dtype(np.float64 if dtype == torch.float64 else np.float32)
    if u is not None:
        out.below_u = np.zeros(u.size, dtype=np.int64)
        out.upto_u = np.zeros(u.size, dtype=np.int64)
    if grid is not None:
        out.above_grid = np.zeros(grid.size, dtype=np.int64)
        grid_bounds = _round_down(grid, np_dtype)
    chunks = _chunks(n, h * w, chunk_pixels)
    buf = None
    if _numpy_path(maps):
        # allocated through torch: numpy asks for transparent huge pages on large arrays, whose
        # first touch can stall for a long time on a fragmented machine
        buf = torch.empty(max(b - a for a, b in chunks) * h * w, dtype=dtype).numpy()
    for a, b in tqdm(chunks, desc="metrics: ranks", disable=not progress, leave=False):
        sv = _sorted_flat(maps[a:b].to(dtype), buf)
        if u is not None:
            out.below_u += _count_below(sv, u, or_equal=False)
            out.upto_u += _count_below(sv, u, or_equal=True)
        if grid is not None:
            out.above_grid += sv.numel() - _count_below(sv, grid_bounds, or_equal=True)
        del sv
    return out


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area under y(x) for monotonic x [M], as sklearn.metrics.auc computes it (without
    importing scikit-learn, which costs a second and ~100 MB on first use)."""
    dx = np.diff(x)
    direction = 1.0
    if np.any(dx < 0):
        if not np.all(dx <= 0):
            raise ValueError("x is neither increasing nor decreasing")
        direction = -1.0
    return float(direction * np.trapezoid(y, x))


def _linear200_area(grid: np.ndarray, counts: _Counts, anom: _Anomalous, max_fpr: float):
    """"linear200" AUPRO -> (value, reason-if-undefined).

    Each anomalous pixel's threshold bin (the number of thresholds below its score) is histogrammed
    per region; suffix sums give every threshold's covered count per region, with no loop over
    thresholds or regions.
    """
    t, k = grid.size, anom.comp_sizes.size
    per_region = np.zeros(k * (t + 1), dtype=np.int64)
    step = DEFAULT_CHUNK_PIXELS
    for a in range(0, anom.scores.size, step):
        bins = np.searchsorted(grid, anom.scores[a : a + step].astype(grid.dtype), side="left")
        per_region += np.bincount(anom.comp[a : a + step] * (t + 1) + bins, minlength=k * (t + 1))
    hist = per_region.reshape(k, t + 1)
    covered = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # [K, T] region pixels > threshold
    pro = (covered / anom.comp_sizes[:, None]).mean(axis=0)
    fpr = (counts.above_grid - covered.sum(axis=0)) / anom.n_neg
    keep = fpr < max_fpr
    if keep.sum() < 2:
        return _NAN, f"fewer than two linear200 thresholds with FPR < {max_fpr}"
    f = fpr[keep]
    span = f.max() - f.min()
    if span == 0:
        return _NAN, f"all linear200 thresholds with FPR < {max_fpr} have the same FPR"
    return _auc((f - f.min()) / span, pro[keep]), None


def _pixel_all(masks, maps, *, want_pixel: bool, variants: Sequence[str], max_fpr: float,
               chunk_pixels: int | None, progress: bool) -> tuple[dict[str, float], dict[str, str]]:
    """All requested pixel metrics with shared passes -> (values, reasons for NaNs)."""
    for v in variants:
        if v not in AUPRO_VARIANTS:
            raise ValueError(f"unknown AUPRO variant {v!r}; choose from {AUPRO_VARIANTS}")
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError("max_fpr must be in (0, 1]")
    masks, maps = _check_maps(_as_tensor(masks), _as_tensor(maps))
    pass1_chunk = chunk_pixels or DEFAULT_CHUNK_PIXELS
    anom = _gather_anomalous(masks, maps, label_regions=bool(variants), chunk_pixels=pass1_chunk, progress=progress)
    keys = (list(PIXEL_KEYS) if want_pixel else []) + [f"aupro_{v}" for v in variants]
    n_pos, n_neg = anom.scores.size, anom.n_neg
    if n_pos == 0 or n_neg == 0:
        why = "no anomalous pixel" if n_pos == 0 else "no normal pixel"
        return {k: _NAN for k in keys}, {k: why for k in keys}

    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    u = counts = wsum = None
    if want_pixel or "mvtec" in variants:
        weights = None
        if "mvtec" in variants:  # each anomalous pixel weighs 1 / (#regions * its region's size)
            weights = (1.0 / (anom.comp_sizes.size * anom.comp_sizes.astype(np.float64)))[anom.comp]
        u, counts, wsum = _distinct(anom.scores, weights)
        del weights
    grid = None
    if "linear200" in variants:
        grid = linear200_thresholds(anom.lo, anom.hi, np.float64 if anom.dtype == torch.float64 else np.float32)
        if not grid.size:
            grid = None
            values["aupro_linear200"], reasons["aupro_linear200"] = _NAN, "constant maps (min == max)"
    every = _count_pass(maps, anom.dtype, u, grid, chunk_pixels=_auto_chunk(chunk_pixels, 0 if u is None else u.size),
                        progress=progress)

    if u is not None:
        # remove the anomalous pixels from the counts: every one of them sits exactly on a u value
        cum = np.cumsum(counts)
        bins = _RankBins.from_counts(every.below_u - (cum - counts), every.upto_u - cum, n_neg)
        if want_pixel:
            values["pixel_auroc"], values["pixel_ap"], values["pixel_f1_max"] = _rank_stats(counts, bins)
        if "mvtec" in variants:
            values["aupro_mvtec"] = _mvtec_area(wsum, bins, n_neg, max_fpr)
    if grid is not None:
        values["aupro_linear200"], why = _linear200_area(grid, every, anom, max_fpr)
        if why:
            reasons["aupro_linear200"] = why
    return {k: values[k] for k in keys}, reasons


def aupro(masks: Any, maps: Any, variant: str = "mvtec", max_fpr: float = 0.3, *,
          chunk_pixels: int | None = None, progress: bool = False) -> float:
    """Area under the PRO curve; masks [N,H,W] bool, maps [N,H,W] float (numpy or torch).

    variant "mvtec" (MVTec AD definition, exact curve) or "linear200" (the seed papers' code);
    see the module docstring. NaN with an UndefinedMetricWarning when undefined. chunk_pixels
    bounds the pixels processed at once (default: automatic, see _auto_chunk); progress shows
    tqdm bars over the chunks.
    """
    if variant not in AUPRO_VARIANTS:
        raise ValueError(f"unknown AUPRO variant {variant!r}; choose from {AUPRO_VARIANTS}")
    values, reasons = _pixel_all(masks, maps, want_pixel=False, variants=(variant,), max_fpr=max_fpr,
                                 chunk_pixels=chunk_pixels, progress=progress)
    _warn_undefined(reasons)
    return values[f"aupro_{variant}"]


def pixel_metrics(masks: Any, maps: Any, *, chunk_pixels: int | None = None,
                  progress: bool = False) -> dict[str, float]:
    """Exact pixel AUROC / AP / F1-max over all pixels; masks [N,H,W], maps [N,H,W].

    Returns {"pixel_auroc", "pixel_ap", "pixel_f1_max"}; NaN (with a warning) without anomalous or
    without normal pixels.
    """
    values, reasons = _pixel_all(masks, maps, want_pixel=True, variants=(), max_fpr=0.3,
                                 chunk_pixels=chunk_pixels, progress=progress)
    _warn_undefined(reasons)
    return values


# --------------------------------------------------------------------------------------------
# all metrics of a set, and per-class tables
# --------------------------------------------------------------------------------------------


def _length(x) -> int | None:
    if x is None:
        return None
    shape = getattr(x, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else 1
    return len(x)


def _check_lengths(**arrays) -> None:
    """ValueError naming both lengths when the given (non-None) inputs differ in their first dimension; "no
    images" when they are all empty."""
    lengths = {name: _length(x) for name, x in arrays.items() if x is not None}
    if not lengths:
        return
    first_name, first = next(iter(lengths.items()))
    for name, n in lengths.items():
        if n != first:
            raise ValueError(f"length mismatch: {first_name} has {first} items but {name} has {n}")
    if first == 0:
        raise ValueError("no images")


def _compute(labels, scores, masks, maps, *, aupro_variants, max_fpr, chunk_pixels, progress, levels=LEVELS):
    """compute() without the warning -> (values, reasons)."""
    unknown = [v for v in aupro_variants if v not in AUPRO_VARIANTS]
    if unknown:
        raise ValueError(f"unknown AUPRO variants {unknown}; choose from {AUPRO_VARIANTS}")
    if not set(levels) <= set(LEVELS):
        raise ValueError(f"unknown metric levels {sorted(set(levels) - set(LEVELS))}; choose from {LEVELS}")
    # one row per image in every input: a shorter one would silently drop images
    _check_lengths(labels=labels, scores=scores, masks=masks, maps=maps)
    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    if "image" not in levels:  # left out on purpose (e.g. a set without normal images): NaN, no warning
        values.update({key: _NAN for key in IMAGE_KEYS})
    elif labels is None or scores is None:
        why = "no image labels or scores given"
        for key in IMAGE_KEYS:
            values[key], reasons[key] = _NAN, why
    else:
        (values["image_auroc"], values["image_ap"], values["image_f1_max"]), why = _binary_metrics(labels, scores)
        if why:
            reasons.update({key: why for key in IMAGE_KEYS})
    pixel_keys = list(PIXEL_KEYS) + [f"aupro_{v}" for v in aupro_variants]
    if "pixel" not in levels:  # left out on purpose (e.g. a set without masks): NaN, no warning
        values.update({key: _NAN for key in pixel_keys})
    elif masks is None or maps is None:
        why = "no masks" if masks is None else "no maps"
        for key in pixel_keys:
            values[key], reasons[key] = _NAN, why
    else:
        pv, pr = _pixel_all(masks, maps, want_pixel=True, variants=tuple(aupro_variants), max_fpr=max_fpr,
                            chunk_pixels=chunk_pixels, progress=progress)
        values.update(pv)
        reasons.update(pr)
    return {k: values[k] for k in list(IMAGE_KEYS) + pixel_keys}, reasons


def compute(labels: Any, scores: Any, masks: Any, maps: Any, *,
            aupro_variants: Sequence[str] = AUPRO_VARIANTS, max_fpr: float = 0.3,
            chunk_pixels: int | None = None, progress: bool = False) -> dict[str, float]:
    """Every metric of one set (usually one class).

    labels [N] 0/1, scores [N] float (or None), masks [N,H,W] bool or None (image-label-only sets),
    maps [N,H,W] float or None. Returns a dict with keys image_auroc, image_ap, image_f1_max,
    pixel_auroc, pixel_ap, pixel_f1_max and aupro_<variant> for each requested variant; values are
    fractions, NaN where undefined (one UndefinedMetricWarning lists them).
    """
    values, reasons = _compute(labels, scores, masks, maps, aupro_variants=aupro_variants, max_fpr=max_fpr,
                               chunk_pixels=chunk_pixels, progress=progress)
    _warn_undefined(reasons)
    return values


def _select(x, idx: np.ndarray):
    """Rows idx of x (a view when idx is a contiguous run)."""
    if x is None:
        return None
    t = _as_tensor(x)
    if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
        return t[int(idx[0]) : int(idx[0]) + idx.size]
    return t[torch.as_tensor(idx, device=t.device)]


def compute_table(labels: Any, scores: Any, masks: Any, maps: Any, class_names: Sequence[str], *,
                  aupro_variants: Sequence[str] = AUPRO_VARIANTS, max_fpr: float = 0.3,
                  chunk_pixels: int | None = None, progress: bool = False, levels: Sequence[str] = LEVELS):
    """Per-class metrics and their macro mean.

    labels [N], scores [N], masks [N,H,W] or None, maps [N,H,W] or None, class_names [N] (the class
    of each item). Returns a pandas DataFrame indexed by class (in order of first appearance) with
    a final "mean" row: the NaN-aware mean over classes (NaN only if every class is NaN). The
    classes that were NaN per metric are in ``df.attrs["nan_classes"]``; a single
    UndefinedMetricWarning lists them with reasons. See :func:`table_to_dict` for JSON. ``levels``: the
    metric levels to compute ("image", "pixel"); the keys of a level left out are NaN without a warning
    (for sets that cannot define them: no normal images, no masks).
    """
    import pandas as pd

    names = np.asarray([str(c) for c in class_names])
    _check_lengths(class_names=names, labels=labels, scores=scores, masks=masks, maps=maps)
    order = list(dict.fromkeys(names.tolist()))
    if "mean" in order:
        raise ValueError('a class may not be called "mean"')
    rows, notes = {}, []
    for cls in tqdm(order, desc="metrics: classes", disable=not progress, leave=False):
        idx = np.flatnonzero(names == cls)
        values, reasons = _compute(_select(labels, idx), _select(scores, idx), _select(masks, idx),
                                   _select(maps, idx), aupro_variants=aupro_variants, max_fpr=max_fpr,
                                   chunk_pixels=chunk_pixels, progress=False, levels=levels)
        rows[cls] = values
        if reasons:
            notes.append((cls, reasons))
    df = pd.DataFrame.from_dict(rows, orient="index")
    nan_classes = {col: [c for c in order if math.isnan(rows[c][col])] for col in df.columns}
    mean = {}
    for col in df.columns:
        vals = [rows[c][col] for c in order if not math.isnan(rows[c][col])]
        mean[col] = float(np.mean(vals)) if vals else _NAN
    df.loc["mean"] = pd.Series(mean)
    df.attrs["nan_classes"] = {k: v for k, v in nan_classes.items() if v}
    if notes:
        text = "; ".join(
            f"{cls}: " + ", ".join(f"{k} ({why})" for k, why in reasons.items()) for cls, reasons in notes
        )
        warnings.warn(f"undefined metrics set to NaN (left out of the class mean): {text}",
                      UndefinedMetricWarning, stacklevel=2)
    return df


def _none_if_nan(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def table_to_dict(df) -> dict[str, Any]:
    """JSON-friendly form of a compute_table result (NaN -> None).

    {"per_class": {class: {metric: value}}, "mean": {metric: value},
     "nan_classes": {metric: [classes]}}
    """
    per_class = {
        str(idx): {str(k): _none_if_nan(float(v)) for k, v in row.items()}
        for idx, row in df.iterrows()
        if idx != "mean"
    }
    mean = {str(k): _none_if_nan(float(v)) for k, v in df.loc["mean"].items()} if "mean" in df.index else {}
    return {"per_class": per_class, "mean": mean, "nan_classes": dict(df.attrs.get("nan_classes", {}))}


def format_percent(x: Any, decimals: int = 1) -> Any:
    """Fractions -> percent rounded for tables: a float, a dict of floats, or a DataFrame."""
    if hasattr(x, "map") and hasattr(x, "columns"):  # DataFrame
        return (x * 100.0).round(decimals)
    if isinstance(x, dict):
        return {k: format_percent(v, decimals) for k, v in x.items()}
    if x is None:
        return None
    v = float(x)
    return v if math.isnan(v) else round(100.0 * v, decimals)
