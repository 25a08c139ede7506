"""Tests of zsadlib.metrics against scikit-learn and the plain loop implementations in plain_metrics.py."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_metrics import (plain_aupro_linear200, plain_aupro_mvtec, plain_pro_curve_mvtec,  # noqa: E402
                           plain_trapezoid)

from zsadlib import metrics as M  # noqa: E402
from zsadlib.metrics import UndefinedMetricWarning  # noqa: E402

TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def blob_masks(rng: np.random.Generator, n: int, h: int, w: int, p_normal: float = 0.3) -> np.ndarray:
    """[n,h,w] bool: each image normal with probability p_normal, else 1-3 ellipses / rectangles,
    plus now and then two squares that touch only diagonally (one region under 8-connectivity)."""
    masks = np.zeros((n, h, w), dtype=bool)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        if rng.random() < p_normal:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            ry, rx = rng.integers(1, max(2, h // 5)), rng.integers(1, max(2, w // 5))
            if rng.random() < 0.5:
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            else:
                masks[i, cy : cy + ry, cx : cx + rx] = True
        if rng.random() < 0.5:
            y0, x0 = rng.integers(0, h - 6), rng.integers(0, w - 6)
            masks[i, y0 : y0 + 3, x0 : x0 + 3] = True
            masks[i, y0 + 3 : y0 + 6, x0 + 3 : x0 + 6] = True
    return masks


def smooth_maps(rng: np.random.Generator, masks: np.ndarray, levels: int | None = None,
                dtype=np.float32) -> np.ndarray:
    """[n,h,w] maps: smoothed noise plus a bump on the defects; quantised to `levels` values (ties)."""
    noise = rng.standard_normal(masks.shape)
    maps = ndimage.gaussian_filter(noise, sigma=(0, 1.5, 1.5)) + 0.8 * ndimage.gaussian_filter(
        masks.astype(float), sigma=(0, 1.0, 1.0)
    )
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    if levels:
        maps = np.round(maps * (levels - 1)) / (levels - 1)
    return maps.astype(dtype)


def make_set(seed: int, n: int = 8, h: int = 24, w: int = 24, levels: int | None = None):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, n, h, w)
    masks[0] = False  # at least one normal image
    if not masks.any():
        masks[1, 3:8, 3:8] = True
    maps = smooth_maps(rng, masks, levels)
    return masks, maps


def test_test_data_is_demanding():
    # the sets used below hold normal images, images with several regions, diagonal-only contacts
    # and (quantised) ties, so the comparisons with the plain loops exercise those cases
    n_regions, diagonal_merges = [], 0
    for seed in range(4):
        masks, maps = make_set(seed, n=6, h=20, w=20, levels=7)
        for m in masks:
            n8 = ndimage.label(m, structure=np.ones((3, 3)))[1]
            n4 = ndimage.label(m)[1]
            n_regions.append(n8)
            diagonal_merges += n4 > n8
        assert np.unique(maps).size <= 7
    assert 0 in n_regions and max(n_regions) >= 2 and diagonal_merges > 0


def sk_f1_max(y, s) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(f1.max())


# ---------------------------------------------------------------------------------------------
# AUPRO against the plain loops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("levels", [None, 16])
def test_aupro_linear200_matches_plain(seed, levels):
    masks, maps = make_set(seed, levels=levels)
    ours = M.aupro(masks, maps, "linear200", chunk_pixels=1000)
    assert ours == pytest.approx(plain_aupro_linear200(masks, maps), abs=TOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aupro_linear200_scores_exactly_on_thresholds(dtype):
    # every score is one of the 200 thresholds, so "> threshold" vs ">= threshold" matters
    masks, _ = make_set(12, n=6, h=20, w=20)
    grid = M.linear200_thresholds(0.0, 1.0, dtype)
    rng = np.random.default_rng(12)
    idx = np.clip(rng.integers(0, 200, masks.shape) + 40 * masks, 0, len(grid) - 1)
    maps = grid[idx].astype(dtype)
    maps[0, 0, 0], maps[0, 0, 1] = 0.0, 1.0  # global min and max as in the grid
    ours = M.aupro(masks, maps, "linear200")
    assert ours == pytest.approx(plain_aupro_linear200(masks, maps), abs=TOL)


def test_aupro_linear200_matches_the_reference_relabelling_at_every_threshold():
    # the released reference code relabels the regions at every threshold; zsadlib labels them once
    masks, maps = make_set(7, n=4, h=16, w=16)
    assert M.aupro(masks, maps, "linear200") == pytest.approx(
        plain_aupro_linear200(masks, maps, relabel_each_threshold=True), abs=TOL
    )


def test_aupro_linear200_drops_a_threshold_exactly_at_max_fpr():
    # 10 normal pixels with scores 0.1 .. 1.0 (FPR steps of exactly 1/10) and 10 anomalous pixels in two
    # regions; on the 200-step grid of [0, 1] the thresholds 0.7 .. 0.795 give FPR 3/10 == 0.3 exactly, so
    # keeping FPR <= 0.3 instead of < 0.3 adds those points and moves the normalised area
    masks = np.zeros((1, 4, 5), dtype=bool)
    masks[0, :2, :2] = True
    masks[0, 2:, 3:] = True
    masks[0, 0, 4] = masks[0, 1, 4] = True
    normal = np.arange(1, 11, dtype=np.float64) / 10
    anomalous = np.array([0.0, 0.35, 0.55, 0.65, 0.72, 0.75, 0.78, 0.85, 0.93, 0.97])
    maps = np.zeros(masks.shape)
    maps[~masks] = normal
    maps[masks] = anomalous
    grid = M.linear200_thresholds(maps.min(), maps.max(), np.float64)
    fprs = np.array([(normal > t).sum() / normal.size for t in grid])
    assert (fprs == 0.3).sum() >= 2  # the case under test: grid points exactly on max_fpr
    strict = plain_aupro_linear200(masks, maps)
    assert strict != pytest.approx(plain_aupro_linear200(masks, maps, expect_fpr=np.nextafter(0.3, 1.0)), abs=1e-3)
    assert M.aupro(masks, maps, "linear200") == pytest.approx(strict, abs=1e-12)
    with pytest.warns(UndefinedMetricWarning, match="no image labels"):
        assert M.compute(None, None, masks, maps)["aupro_linear200"] == pytest.approx(strict, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("levels", [None, 7, 64])
def test_aupro_mvtec_matches_plain(seed, levels):
    masks, maps = make_set(seed, n=6, h=20, w=20, levels=levels)
    ours = M.aupro(masks, maps, "mvtec", chunk_pixels=1000)
    assert ours == pytest.approx(plain_aupro_mvtec(masks, maps), abs=TOL)


@pytest.mark.parametrize("max_fpr", [0.01, 0.05, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("levels", [None, 9])
def test_aupro_mvtec_max_fpr(max_fpr, levels):
    masks, maps = make_set(11, n=6, h=20, w=20, levels=levels)
    ours = M.aupro(masks, maps, "mvtec", max_fpr=max_fpr)
    assert ours == pytest.approx(plain_aupro_mvtec(masks, maps, max_fpr), abs=TOL)


def test_aupro_mvtec_limit_exactly_on_a_curve_point():
    # 10 normal pixels: FPR steps of 0.1, so 0.3 is a point of the curve (no interpolation needed)
    masks = np.zeros((1, 1, 12), dtype=bool)
    masks[0, 0, 10:] = True
    maps = np.arange(12, dtype=np.float64)[None, None, ::-1].copy() / 11
    maps[0, 0, 11] = 0.95  # one defect pixel scores high, one low
    for max_fpr in (0.3, 0.35):
        assert M.aupro(masks, maps, "mvtec", max_fpr=max_fpr) == pytest.approx(
            plain_aupro_mvtec(masks, maps, max_fpr), abs=1e-12
        )


def test_aupro_mvtec_cut_inside_a_block_of_normal_pixels_tied_with_a_defect_score():
    # normal pixels both strictly between and equal to the anomalous scores, cut at many max_fpr values, so the
    # cut falls inside a tied block (the interpolated branch of the exact area)
    masks, maps = make_set(13, n=6, h=20, w=20)
    rng = np.random.default_rng(13)
    levels = np.round(maps * 8) / 8
    tied = rng.random(maps.shape) < 0.5
    maps = np.where(masks | tied, levels, maps).astype(np.float32)
    fprs, pros = plain_pro_curve_mvtec(masks, maps)
    for max_fpr in np.linspace(0.03, 0.93, 16):
        assert M.aupro(masks, maps, "mvtec", max_fpr=max_fpr) == pytest.approx(
            plain_trapezoid(fprs, pros, max_fpr) / max_fpr, abs=TOL), max_fpr


def test_linear200_in_small_chunks_of_anomalous_pixels(monkeypatch):
    # the per-region histogram is accumulated over chunks of anomalous pixels (millions at full size)
    masks, maps = make_set(3)
    whole = M.aupro(masks, maps, "linear200")
    monkeypatch.setattr(M, "DEFAULT_CHUNK_PIXELS", 7)
    assert M.aupro(masks, maps, "linear200", chunk_pixels=1000) == pytest.approx(whole, abs=1e-12)
    assert whole == pytest.approx(plain_aupro_linear200(masks, maps), abs=TOL)


def test_regions_use_8_connectivity():
    # a 1-pixel and a 3-pixel blob touching diagonally: one region of 4 pixels under 8-connectivity
    # (PRO 1/4 when only the corner is detected); 4-connectivity would give two regions (PRO 1/2)
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 1, 1] = masks[0, 1, 2] = masks[0, 2, 1] = True  # touches (0,0) only diagonally
    maps = np.zeros((1, 6, 6), dtype=np.float32)
    maps[0, 0, 0] = 1.0  # only the single corner pixel is detected
    ours = M.aupro(masks, maps, "mvtec", max_fpr=0.3)
    # 8-connectivity: one region of 4 pixels, PRO = 1/4 at FPR 0; then everything at FPR 1
    assert ours == pytest.approx(plain_aupro_mvtec(masks, maps), abs=1e-12)
    one_region = 0.25 + (1 - 0.25) * 0.3 / 2  # mean height of the segment (0, .25)-(1, 1) up to 0.3
    assert ours == pytest.approx(one_region, abs=1e-12)


def test_perfect_map_gives_aupro_one():
    masks, _ = make_set(5)
    maps = masks.astype(np.float32) * 0.5 + 0.25
    assert M.aupro(masks, maps, "mvtec") == pytest.approx(1.0, abs=1e-12)
    out = full_compute(masks.any((1, 2)), maps.max((1, 2)), masks, maps, aupro_variants=("mvtec",))
    assert out["pixel_auroc"] == 1.0 and out["aupro_mvtec"] == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# AUROC / AP / F1-max against scikit-learn
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("levels", [None, 2, 5, 40])
def test_image_metrics_match_sklearn(seed, levels):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    s = rng.random(400) + 0.4 * y
    if levels:
        s = np.round(s * (levels - 1)) / (levels - 1)  # heavy ties, within and across classes
    got = M.binary_metrics(y, s)
    assert got["auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert got["ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert got["f1_max"] == pytest.approx(sk_f1_max(y, s), abs=TOL)
    assert M.auroc(y, s) == got["auroc"]
    assert M.average_precision(y, s) == got["ap"]
    assert M.f1_max(y, s) == got["f1_max"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("levels", [None, 3, 32])
def test_pixel_metrics_match_sklearn(seed, levels):
    masks, maps = make_set(seed, n=10, h=32, w=32, levels=levels)
    y, s = masks.ravel(), maps.ravel()
    got = M.pixel_metrics(masks, maps, chunk_pixels=2000)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert got["pixel_f1_max"] == pytest.approx(sk_f1_max(y, s), abs=TOL)


def test_f1_max_edge_values():
    assert M.f1_max([0, 1], [1.0, 0.0]) == pytest.approx(2 / 3)  # best: predict both anomalous
    assert M.f1_max([0, 1, 1], [0.5, 0.5, 0.5]) == pytest.approx(0.8)
    assert M.auroc([0, 1, 1], [0.5, 0.5, 0.5]) == 0.5


def test_one_class_warns_and_names_the_undefined_metrics():
    for call, keys in ((M.binary_metrics, "auroc, ap, f1_max"), (M.auroc, "auroc"), (M.average_precision, "ap"),
                       (M.f1_max, "f1_max")):
        with pytest.warns(UndefinedMetricWarning, match=rf"NaN: {keys} \(only one class present \(0 negative, 3 "):
            out = call([1, 1, 1], [0.1, 0.5, 0.9])
        values = out.values() if isinstance(out, dict) else [out]
        assert all(math.isnan(v) for v in values)


def test_labels_must_be_binary():
    with pytest.raises(ValueError):
        M.auroc([0, 2], [0.1, 0.2])


def test_nan_scores_raise():
    with pytest.raises(ValueError):
        M.auroc([0, 1], [0.1, float("nan")])


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------


def full_compute(labels, scores, masks, maps, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these sets are all well-defined
        return M.compute(labels, scores, masks, maps, **kw)


@pytest.mark.parametrize("levels", [None, 6])
def test_compute_every_key_matches_sklearn_and_the_plain_loops(levels):
    # each key of compute() against an independent implementation (scikit-learn / plain_metrics), so a key
    # computed from the wrong statistic (image AP from the AUROC, F1 from the pixel set, ...) shows up
    masks, maps = make_set(2, n=30, h=14, w=14, levels=levels)
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, len(masks))  # not the masks' labels, so the image keys see other data
    scores = rng.random(labels.size) + 0.3 * labels
    if levels:
        scores = np.round(scores * 3) / 3
    out = full_compute(labels, scores, masks, maps)
    assert tuple(out) == M.METRIC_KEYS
    expected = {
        "image_auroc": roc_auc_score(labels, scores),
        "image_ap": average_precision_score(labels, scores),
        "image_f1_max": sk_f1_max(labels, scores),
        "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
        "pixel_ap": average_precision_score(masks.ravel(), maps.ravel()),
        "pixel_f1_max": sk_f1_max(masks.ravel(), maps.ravel()),
        "aupro_mvtec": plain_aupro_mvtec(masks, maps),
        "aupro_linear200": plain_aupro_linear200(masks, maps),
    }
    assert set(expected) == set(M.METRIC_KEYS)
    # the keys differ from each other here, so a swapped key cannot pass by coincidence
    assert len({round(v, 6) for v in expected.values()}) == len(expected)
    for key, want in expected.items():
        assert out[key] == pytest.approx(want, abs=TOL), key


def test_compute_keys_and_variant_selection():
    masks, maps = make_set(2)
    out = full_compute(masks.any((1, 2)), maps.max((1, 2)), masks, maps)
    assert tuple(out) == M.METRIC_KEYS
    only = M.compute(masks.any((1, 2)), maps.max((1, 2)), masks, maps, aupro_variants=("mvtec",))
    assert "aupro_linear200" not in only and only["aupro_mvtec"] == out["aupro_mvtec"]


def test_permuting_images_changes_nothing():
    masks, maps = make_set(3, levels=20)
    labels, scores = masks.any((1, 2)).astype(int), maps.max((1, 2))
    perm = np.random.default_rng(0).permutation(len(masks))
    a = full_compute(labels, scores, masks, maps)
    b = full_compute(labels[perm], scores[perm], masks[perm], maps[perm])
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-12), k


def test_chunk_size_changes_nothing():
    masks, maps = make_set(4, levels=12)
    labels, scores = masks.any((1, 2)), maps.max((1, 2))
    a = full_compute(labels, scores, masks, maps, chunk_pixels=1)
    b = full_compute(labels, scores, masks, maps, chunk_pixels=10**9)
    assert a == pytest.approx(b, abs=1e-12)


def test_torch_and_numpy_inputs_agree():
    masks, maps = make_set(6)
    labels, scores = masks.any((1, 2)).astype(np.int64), maps.max((1, 2))
    a = full_compute(labels, scores, masks, maps)
    b = full_compute(torch.from_numpy(labels), torch.from_numpy(scores), torch.from_numpy(masks),
                     torch.from_numpy(maps))
    assert a == b
    c = full_compute(labels.tolist(), scores.tolist(), masks.astype(np.uint8), maps[:, None])  # lists, uint8, [N,1,H,W]
    assert c == pytest.approx(a, abs=1e-12)


def test_float32_and_float64_inputs_agree():
    masks, maps32 = make_set(8)
    maps64 = maps32.astype(np.float64)
    labels = masks.any((1, 2))
    a = full_compute(labels, maps32.max((1, 2)), masks, maps32)
    b = full_compute(labels, maps64.max((1, 2)), masks, maps64)
    assert a == pytest.approx(b, abs=TOL)
    # and the float64 linear200 grid is the reference's float64 grid
    assert b["aupro_linear200"] == pytest.approx(plain_aupro_linear200(masks, maps64), abs=TOL)


def test_linear200_grid_replicates_arange():
    for lo, hi in [(0.0, 1.0), (0.1234567, 0.98765), (-3.0, 7.5), (0.2, 0.2000305)]:
        for dt in (np.float32, np.float64):
            lo_t, hi_t = dt(lo), dt(hi)
            want = np.arange(lo_t, hi_t, (hi_t - lo_t) / 200)
            got = M.linear200_thresholds(lo, hi, dt)
            assert got.dtype == want.dtype and np.array_equal(got, want)
            assert len(got) in (200, 201)


# ---------------------------------------------------------------------------------------------
# undefined metrics: NaN and one warning
# ---------------------------------------------------------------------------------------------


def test_only_normal_images():
    masks = np.zeros((4, 10, 10), dtype=bool)
    maps = np.random.default_rng(0).random((4, 10, 10)).astype(np.float32)
    with pytest.warns(UndefinedMetricWarning) as rec:
        out = M.compute(np.zeros(4), maps.max((1, 2)), masks, maps)
    assert len(rec) == 1
    assert all(math.isnan(v) for v in out.values())


def test_only_anomalous_images():
    masks, maps = make_set(1)
    keep = masks.any((1, 2))
    masks, maps = masks[keep], maps[keep]
    with pytest.warns(UndefinedMetricWarning, match="image_auroc") as rec:
        out = M.compute(np.ones(len(masks)), maps.max((1, 2)), masks, maps)
    assert len(rec) == 1
    assert all(math.isnan(out[k]) for k in M.IMAGE_KEYS)
    assert not any(math.isnan(out[k]) for k in M.PIXEL_KEYS + ("aupro_mvtec", "aupro_linear200"))


def test_masks_none():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 0, 1])
    with pytest.warns(UndefinedMetricWarning, match="no masks") as rec:
        out = M.compute(labels, rng.random(4), None, None)
    assert len(rec) == 1
    assert not math.isnan(out["image_auroc"])
    assert all(math.isnan(out[k]) for k in M.PIXEL_KEYS + ("aupro_mvtec", "aupro_linear200"))


def test_no_anomalous_pixels_and_no_normal_pixels():
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    for masks in (np.zeros((3, 8, 8), bool), np.ones((3, 8, 8), bool)):
        with pytest.warns(UndefinedMetricWarning):
            assert math.isnan(M.aupro(masks, maps, "mvtec"))
        with pytest.warns(UndefinedMetricWarning):
            assert math.isnan(M.aupro(masks, maps, "linear200"))
        with pytest.warns(UndefinedMetricWarning) as rec:
            out = M.pixel_metrics(masks, maps)
        assert len(rec) == 1 and all(math.isnan(v) for v in out.values())


def test_linear200_undefined_cases():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :2] = True
    with pytest.warns(UndefinedMetricWarning, match="constant"):
        assert math.isnan(M.aupro(masks, np.full((1, 4, 4), 0.5, np.float32), "linear200"))
    # a binary perfect map: every kept threshold has FPR 0, so the FPR range is empty
    with pytest.warns(UndefinedMetricWarning, match="same FPR"):
        assert math.isnan(M.aupro(masks, masks.astype(np.float32), "linear200"))


def test_compute_table_nan_class_and_mean():
    rng = np.random.default_rng(0)
    m1, p1 = make_set(0)
    m2, p2 = make_set(1)
    m3 = np.zeros((5, 24, 24), bool)  # a class with no anomalous pixels at all
    p3 = smooth_maps(rng, m3)
    masks, maps = np.concatenate([m1, m2, m3]), np.concatenate([p1, p2, p3])
    labels = masks.any((1, 2)).astype(int)
    names = ["a"] * len(m1) + ["b"] * len(m2) + ["c"] * len(m3)
    scores = maps.max((1, 2))
    with pytest.warns(UndefinedMetricWarning, match="c:") as rec:
        df = M.compute_table(labels, scores, masks, maps, names)
    assert len(rec) == 1
    assert list(df.index) == ["a", "b", "c", "mean"]
    a = full_compute(labels[: len(m1)], scores[: len(m1)], m1, p1)
    b = full_compute(labels[len(m1) : len(m1) + len(m2)], scores[len(m1) : len(m1) + len(m2)], m2, p2)
    for key in M.METRIC_KEYS:
        assert math.isnan(df.loc["c", key])
        assert df.loc["a", key] == pytest.approx(a[key], abs=1e-12)
        assert df.loc["mean", key] == pytest.approx((a[key] + b[key]) / 2, abs=1e-12)
    assert df.attrs["nan_classes"]["aupro_mvtec"] == ["c"]
    js = M.table_to_dict(df)
    assert sorted(js["per_class"]) == ["a", "b", "c"]  # the mean row is not a class
    assert js["per_class"]["a"] == {k: float(df.loc["a", k]) for k in M.METRIC_KEYS}
    assert js["per_class"]["c"]["pixel_auroc"] is None
    assert M.table_to_dict(df.drop(index="mean"))["mean"] == {}
    import pandas as pd

    plain_table = M.table_to_dict(pd.DataFrame({"pixel_auroc": [0.5]}, index=["a"]))  # no attrs, no mean row
    assert plain_table == {"per_class": {"a": {"pixel_auroc": 0.5}}, "mean": {}, "nan_classes": {}}
    with pytest.raises(ValueError, match='^a class may not be called "mean"$'):
        M.compute_table(labels, scores, masks, maps, ["mean"] * len(labels))
    assert js["mean"]["pixel_auroc"] == pytest.approx(df.loc["mean", "pixel_auroc"])
    assert js["nan_classes"]["image_auroc"] == ["c"]
    pct = M.format_percent(df)
    assert pct.loc["a", "pixel_auroc"] == round(100 * df.loc["a", "pixel_auroc"], 1)
    assert M.format_percent({"x": 0.12345, "y": float("nan")}, 2)["x"] == 12.35


def test_compute_table_interleaved_classes_and_all_nan_column():
    masks, maps = make_set(9, n=10)
    labels = np.ones(10, int)  # every image "anomalous": image metrics undefined for every class
    names = ["x", "y"] * 5
    with pytest.warns(UndefinedMetricWarning):
        df = M.compute_table(labels, maps.max((1, 2)), masks, maps, names, aupro_variants=("mvtec",))
    assert list(df.index) == ["x", "y", "mean"]
    assert math.isnan(df.loc["mean", "image_auroc"])
    with pytest.warns(UndefinedMetricWarning):
        x = M.compute(labels[0::2], maps[0::2].max((1, 2)), masks[0::2], maps[0::2], aupro_variants=("mvtec",))
    assert df.loc["x", "aupro_mvtec"] == pytest.approx(x["aupro_mvtec"], abs=1e-12)


def test_private_auc_is_sklearn_auc():
    from sklearn.metrics import auc

    rng = np.random.default_rng(0)
    x = np.sort(rng.random(50))
    y = rng.random(50)
    assert M._auc(x, y) == auc(x, y)
    assert M._auc(x[::-1], y[::-1]) == auc(x[::-1], y[::-1])
    x[10] = x[11]  # a repeated x (two kept thresholds with the same FPR) is still monotonic
    assert M._auc(x, y) == auc(x, y)


def test_torch_code_path_agrees(monkeypatch):
    # the GPU code path (torch.sort / torch.searchsorted / torch indexing), exercised on CPU tensors
    masks, maps = make_set(10, levels=30)
    labels, scores = masks.any((1, 2)), maps.max((1, 2))
    a = full_compute(labels, scores, masks, maps, chunk_pixels=1500)
    monkeypatch.setattr(M, "_TORCH_ONLY", True)
    b = full_compute(labels, scores, masks, maps, chunk_pixels=1500)
    assert a == pytest.approx(b, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# input forms, user errors and the reasons named in warnings (gaps found by `make mutants`)
# ---------------------------------------------------------------------------------------------


def small_set():
    """labels [4], scores [4], masks [4,6,6] (two defective images), maps [4,6,6] float32."""
    masks = np.zeros((4, 6, 6), bool)
    masks[2, 1:4, 2:5] = True
    masks[3, :2, :2] = masks[3, 4:, 3:] = True  # two regions
    maps = smooth_maps(np.random.default_rng(11), masks)
    return masks.any((1, 2)).astype(int), maps.max((1, 2)), masks, maps


def _with_inf(maps):
    maps = maps.copy()
    maps[0, 0, 0] = np.inf
    return maps


_LABELS, _SCORES, _MASKS, _MAPS = small_set()
_EMPTY = np.zeros((0, 6, 6), np.float32)


@pytest.mark.parametrize("call, match", [
    (lambda: M.aupro(_MASKS, _MAPS, max_fpr=0.0), r"^max_fpr must be in \(0, 1\]$"),
    (lambda: M.aupro(_MASKS, _MAPS, max_fpr=1.5), r"^max_fpr must be in \(0, 1\]$"),
    (lambda: M.aupro(_MASKS, _MAPS, "pro"), r"^unknown AUPRO variant 'pro'"),
    (lambda: M.pixel_metrics(_MASKS, _with_inf(_MAPS)), r"^scores/maps contain NaN or inf$"),
    (lambda: M.pixel_metrics(_MASKS[:, :, :5], _MAPS),
     r"^masks and maps must both be \[N,H,W\]; got \(4, 6, 5\) and \(4, 6, 6\)$"),
    (lambda: M.pixel_metrics(_EMPTY, _EMPTY), r"^no images$"),
    (lambda: M.auroc([0, 1, 1], [0.1, 0.2]), r"^labels \(3\) and scores \(2\) differ in length$"),
    (lambda: M.auroc([0, 2], [0.1, 0.2]), r"^labels must be 0/1$"),
    (lambda: M.auroc([0, 1], [0.1, np.inf]), r"^scores contain NaN or inf$"),
    (lambda: M.compute(_LABELS, _SCORES, None, None, aupro_variants=("pro",)), r"^unknown AUPRO variants \['pro'\]"),
    (lambda: M.compute_table(_LABELS, _SCORES, None, None, "abab", levels=("image", "x")),
     r"^unknown metric levels \['x'\]"),
    (lambda: M.compute([], [], _EMPTY, _EMPTY), r"^no images$"),
    (lambda: M._auc(np.array([0.0, 0.5, 0.2]), np.ones(3)), r"^x is neither increasing nor decreasing$"),
])
def test_user_errors_name_the_fault(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("short", ["labels", "scores", "masks", "maps"])
def test_compute_refuses_inputs_of_different_lengths(short):
    # a shorter input would otherwise silently drop images (or fail later with a message naming another input)
    args = dict(labels=_LABELS, scores=_SCORES, masks=_MASKS, maps=_MAPS)
    args[short] = args[short][:3]
    with pytest.raises(ValueError, match=r"^length mismatch: \w+ has \d items but \w+ has \d$") as err:
        M.compute(**args)
    assert f"{short} has 3" in str(err.value)


@pytest.mark.parametrize("long", ["class_names", "labels", "scores", "masks", "maps"])
def test_compute_table_refuses_inputs_of_different_lengths(long):
    args = dict(labels=_LABELS, scores=_SCORES, masks=_MASKS, maps=_MAPS, class_names=["a", "b"] * 2)
    args[long] = np.concatenate([np.asarray(args[long]), np.asarray(args[long])[:1]])
    with pytest.raises(ValueError, match=r"^length mismatch: "):
        M.compute_table(**args)


def test_undefined_warnings_name_the_metrics_and_the_reason():
    labels, scores, masks, maps = _LABELS, _SCORES, _MASKS, _MAPS
    pixel = r"pixel_auroc, pixel_ap, pixel_f1_max"
    cases = [
        (lambda: M.pixel_metrics(np.zeros_like(masks), maps), rf"{pixel} \(no anomalous pixel\)$"),
        (lambda: M.pixel_metrics(np.ones_like(masks), maps), rf"{pixel} \(no normal pixel\)$"),
        (lambda: M.aupro(masks, np.full_like(maps, 0.5), "linear200"), r"aupro_linear200 \(constant maps \(min == max\)\)$"),
        (lambda: M.aupro(masks, masks.astype(np.float32), "linear200"), r"aupro_linear200 \(all linear200 thresholds "),
        (lambda: M.compute(None, scores, masks, maps), r"image_auroc, image_ap, image_f1_max \(no image labels or scores"),
        (lambda: M.compute(labels, scores, None, maps), rf"{pixel}, aupro_mvtec, aupro_linear200 \(no masks\)$"),
        (lambda: M.compute(labels, scores, masks, None), rf"{pixel}, aupro_mvtec, aupro_linear200 \(no maps\)$"),
    ]
    for call, match in cases:
        with pytest.warns(UndefinedMetricWarning, match=match) as rec:
            call()
        assert len(rec) == 1
    full = full_compute(labels, scores, masks, maps)
    with pytest.warns(UndefinedMetricWarning):
        no_labels = M.compute(None, scores, masks, maps)
    assert {k: no_labels[k] for k in M.PIXEL_KEYS} == {k: full[k] for k in M.PIXEL_KEYS}
    with pytest.warns(UndefinedMetricWarning):
        no_masks = M.compute(labels, scores, None, maps)
    assert {k: no_masks[k] for k in M.IMAGE_KEYS} == {k: full[k] for k in M.IMAGE_KEYS}


def test_half_precision_and_read_only_inputs():
    # half types are upcast (the same values in float32 give the same metrics); read-only arrays are
    # used without a copy and without torch's "not writable" warning (full_compute turns warnings into errors)
    labels, scores, masks, maps = _LABELS, _SCORES, _MASKS, _MAPS
    maps16 = maps.astype(np.float16)
    want = full_compute(labels, scores, masks, maps16.astype(np.float32))
    assert full_compute(labels, scores, masks, maps16) == want
    assert full_compute(labels, scores, masks, torch.from_numpy(maps16)) == want
    bf16 = torch.from_numpy(maps).to(torch.bfloat16)
    assert full_compute(labels, scores, masks, bf16) == full_compute(labels, scores, masks, bf16.float())
    frozen = [np.array(x) for x in (labels, scores, masks, maps)]
    for x in frozen:
        x.flags.writeable = False
    assert full_compute(*frozen) == full_compute(labels, scores, masks, maps)


def test_column_and_channel_shaped_inputs():
    labels, scores, masks, maps = _LABELS, _SCORES, _MASKS, _MAPS
    want = M.binary_metrics(labels, scores)
    assert M.binary_metrics(labels, scores[:, None]) == want  # scores [N,1]
    assert M.binary_metrics(labels[:, None], scores) == want  # labels [N,1]
    want = M.pixel_metrics(masks, maps)
    assert M.pixel_metrics(masks[:, None], maps) == want  # masks [N,1,H,W]
    assert M.pixel_metrics(masks[:, None], maps[:, None]) == want


def test_float64_scores_are_not_rounded_to_float32():
    scores = np.array([1.0, 1.0 + 1e-12, 0.5])  # equal in float32
    labels = np.array([0, 1, 0])
    assert M.auroc(labels, scores) == roc_auc_score(labels, scores) == 1.0
    assert M.auroc(labels, scores.astype(np.float32)) == 0.75  # a tie: half a pair


def test_integer_scores_are_exact():
    # 2**24 and 2**24 + 1 are one float32 value: integer scores must not be rounded to float32
    labels, scores = np.array([1, 0]), np.array([16777216, 16777217])
    assert M.auroc(labels, scores) == roc_auc_score(labels, scores) == 0.0
    assert M.binary_metrics(labels, torch.tensor(scores))["ap"] == average_precision_score(labels, scores)


def test_non_square_images_in_chunks():
    for h, w in ((20, 12), (12, 20)):
        masks, maps = make_set(12, n=6, h=h, w=w, levels=20)
        for chunk in (1, 500, None):
            out = M.pixel_metrics(masks, maps, chunk_pixels=chunk)
            assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
            assert out["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_aupro_default_is_mvtec_at_fpr_0_3():
    masks, maps = make_set(13, levels=10)
    assert M.aupro(masks, maps) == pytest.approx(plain_aupro_mvtec(masks, maps, 0.3), abs=TOL)


def test_sorted_flat_without_a_buffer():
    x = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    before = x.copy()
    out = M._sorted_flat(torch.from_numpy(x))
    assert out.dtype == torch.float32 and np.array_equal(out.numpy(), np.sort(x, axis=None))
    assert np.array_equal(x, before)


def test_aupro_linear200_with_exactly_two_kept_thresholds():
    # grid 0, 0.005, ..., 0.995: only the two top thresholds have FPR < 0.3 (0.2 and 0.1), so the area
    # is one trapezoid over the normalised FPR range [0, 1]
    maps = np.zeros((1, 10, 10), np.float32)
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 0, :4] = True
    flat = maps.reshape(-1)
    flat[:4] = [1.0, 1.0, 0.9925, 0.5]  # anomalous pixels: covered 2/4, 3/4 at the two top thresholds
    flat[4:14] = 0.999  # 10 normal pixels above both
    flat[14:24] = 0.9925  # 10 above the second highest only
    flat[24:50] = 0.987  # 26 above the third highest only: FPR 46 / 96 there
    assert M.aupro(masks, maps, "linear200") == pytest.approx(plain_aupro_linear200(masks, maps), abs=1e-12)
    assert M.aupro(masks, maps, "linear200") == pytest.approx((0.5 + 0.75) / 2, abs=1e-12)


def test_compute_table_levels_and_single_image_classes():
    labels, scores, masks, maps = _LABELS, _SCORES, _MASKS, _MAPS
    names = ["a", "b", "b", "c"]  # classes of one image each around a class of two
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a level left out gives NaN without a warning
        image = M.compute_table(labels, scores, None, None, names[:1] + ["a"] * 3, levels=("image",))
        pixel = M.compute_table(None, None, masks, maps, ["x"] * 4, levels=("pixel",))
    full = full_compute(labels, scores, masks, maps)
    for key in M.METRIC_KEYS:
        assert (image.loc["a", key] == full[key]) if key in M.IMAGE_KEYS else math.isnan(image.loc["a", key])
        assert math.isnan(pixel.loc["x", key]) if key in M.IMAGE_KEYS else (pixel.loc["x", key] == full[key])
    with pytest.warns(UndefinedMetricWarning, match=r"a: pixel_auroc"):  # image 0 has no anomalous pixel
        df = M.compute_table(labels, scores, masks, maps, names, levels=("pixel",))
    assert df.loc["b", "aupro_mvtec"] == full_compute(labels[1:3], scores[1:3], masks[1:3], maps[1:3])["aupro_mvtec"]
    assert df.loc["c", "pixel_auroc"] == M.pixel_metrics(masks[3:], maps[3:])["pixel_auroc"]
