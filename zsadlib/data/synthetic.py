"""A small procedural anomaly-detection dataset in the MVTec AD layout.

Seven categories, textures and objects, each with several defect kinds whose pixel masks are
*exact*: a mask pixel is set if and only if the defect changed that pixel (every changed pixel
differs from the defect-free render by at least ``MIN_DELTA`` grey levels in some channel).
Class names mix common English words (single CLIP tokens) and one made-up name ("widget2"),
so that class-name filtering has something to filter.

Everything is a deterministic function of ``seed``: each image has its own random stream
derived from ``(seed, category, split, defect, index)``, so the same seed gives byte-identical
PNG files, and one sample can be re-rendered alone with :func:`render_sample`.

Layout written by :func:`generate` (see ``data/README.md``)::

    <out>/<class>/train/good/000.png
    <out>/<class>/test/good/000.png
    <out>/<class>/test/<defect>/000.png
    <out>/<class>/ground_truth/<defect>/000_mask.png    (0/255, 8-bit grey)
    <out>/meta.json                                     (reference index, train + test)
    <out>/synthetic.json                                (generation parameters)
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .base import DatasetError, Record
from .meta_json import write_meta_json

__all__ = [
    "CATEGORIES",
    "DEFAULT_ROOT",
    "GENERATOR_VERSION",
    "MIN_DELTA",
    "SyntheticSample",
    "render_sample",
    "generate",
    "ensure_synthetic",
]

#: Default location: ``data/synthetic`` in the repository (git-ignored).
DEFAULT_ROOT: Path = Path(__file__).resolve().parents[2] / "data" / "synthetic"
#: Bumped whenever the rendering changes, so ``ensure_synthetic`` regenerates stale trees.
GENERATOR_VERSION = 1
#: Minimum change (grey levels, max over channels) of every defect pixel.
MIN_DELTA = 12
_MARKER = "synthetic.json"

F32 = np.float32


@dataclass(frozen=True)
class Category:
    kind: str  # "texture" or "object"
    defects: tuple[str, ...]


#: name -> category; textures first, then objects. "widget2" is deliberately not a word.
CATEGORIES: dict[str, Category] = {
    "carpet": Category("texture", ("hole", "stain", "scratch")),
    "grid": Category("texture", ("crack", "hole", "scratch")),
    "wood": Category("texture", ("scratch", "hole", "stain", "crack")),
    "bottle": Category("object", ("crack", "stain", "missing_part")),
    "screw": Category("object", ("scratch", "stain", "missing_part")),
    "pill": Category("object", ("crack", "stain", "hole")),
    "widget2": Category("object", ("hole", "scratch", "missing_part")),
}


@dataclass
class SyntheticSample:
    """One rendered example. good, image: uint8 ``[S, S, 3]``; mask: bool ``[S, S]``.

    ``image`` equals ``good`` outside ``mask`` and differs from it (by >= MIN_DELTA in some
    channel) at every mask pixel; for normal samples ``image is good`` and the mask is empty.
    """

    good: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    category: str
    defect: str


# --------------------------------------------------------------------------------------------
# small vectorised drawing helpers (float32 images [S, S, 3] in 0..255)
# --------------------------------------------------------------------------------------------


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:s, 0:s].astype(F32)
    return yy, xx


def _rotate(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, theta: float):
    """Coordinates (u along the direction theta, v across), centred at (cy, cx)."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    return dx * c + dy * s, -dx * s + dy * c


def _seg_dist(yy, xx, p0, p1) -> np.ndarray:
    """Distance of every pixel to the segment p0-p1 (points as (y, x))."""
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    l2 = max(dy * dy + dx * dx, 1e-6)
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / l2, 0.0, 1.0)
    return np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))


def _polyline_dist(yy, xx, pts) -> np.ndarray:
    d = np.full(yy.shape, np.inf, dtype=F32)
    for a, b in zip(pts[:-1], pts[1:]):
        d = np.minimum(d, _seg_dist(yy, xx, a, b))
    return d


def _colour(base, jitter: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(base, F32) + rng.uniform(-jitter, jitter, 3).astype(F32), 0, 255)


def _shade(intensity: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Grey-level map [S, S] in ~[0, 1] times an RGB colour -> [S, S, 3]."""
    return intensity[..., None] * colour[None, None, :]


def _noise(rng: np.random.Generator, s: int, sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, (s, s, 1)).astype(F32)


def _smooth_noise(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
    """Low-frequency noise [S, S] in ~[-1, 1]: a random coarse grid upsampled bilinearly."""
    g = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(F32)
    t = np.linspace(0, cells, s, dtype=F32)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]  # [S, cells+1]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


# --------------------------------------------------------------------------------------------
# defect-free renders: each returns (image [S,S,3] f32, object mask [S,S] bool, background)
# --------------------------------------------------------------------------------------------

Render = tuple[np.ndarray, np.ndarray, np.ndarray]


def _render_carpet(rng, s) -> Render:
    yy, xx = _grid(s)
    p = s / rng.uniform(20, 28)
    ph = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * xx / p + ph[0]) * np.sin(2 * np.pi * yy / p + ph[1])
    twill = np.sin(2 * np.pi * (xx + yy) / (p * 0.5))
    inten = 0.72 + 0.18 * weave + 0.06 * twill + 0.05 * _smooth_noise(rng, s, 8)
    img = _shade(inten, _colour((170, 70, 60), 25, rng)) + _noise(rng, s, 5)
    return img, np.ones((s, s), bool), img


def _render_grid(rng, s) -> Render:
    yy, xx = _grid(s)
    u, v = _rotate(yy, xx, s / 2, s / 2, np.deg2rad(rng.uniform(-6, 6)))
    p = s / rng.uniform(12, 16)
    off = rng.uniform(0, p, 2)
    du = np.abs(((u + off[0]) % p) - p / 2)
    dv = np.abs(((v + off[1]) % p) - p / 2)
    t = p * 0.14
    wire = np.clip(1.0 - np.minimum(du, dv) / t, 0.0, 1.0) ** 0.7
    bg = 0.18 + 0.04 * _smooth_noise(rng, s, 6)
    inten = bg + 0.62 * wire
    img = _shade(inten, _colour((215, 215, 205), 15, rng)) + _noise(rng, s, 4)
    return img, np.ones((s, s), bool), img


def _render_wood(rng, s) -> Render:
    yy, xx = _grid(s)
    u, v = _rotate(yy, xx, s / 2, s / 2, np.deg2rad(rng.uniform(-10, 10)))
    warp = 6 * np.sin(v / rng.uniform(18, 30) + rng.uniform(0, 6.3)) + 10 * _smooth_noise(rng, s, 4)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (u + warp) / rng.uniform(9, 15))
    dark, light = _colour((115, 70, 38), 12, rng), _colour((205, 155, 100), 12, rng)
    t = (rings**0.8)[..., None]
    img = dark * (1 - t) + light * t + _noise(rng, s, 4)
    return img, np.ones((s, s), bool), img


def _background(rng, s, level: float, jitter: float, tint=(1.0, 1.0, 1.0)) -> np.ndarray:
    yy, xx = _grid(s)
    r = np.hypot(yy - s / 2, xx - s / 2) / s
    inten = (level + rng.uniform(-jitter, jitter)) * (1.0 - 0.35 * r**2)
    return _shade(inten, np.asarray(tint, F32) * 255) + _noise(rng, s, 3)


def _render_bottle(rng, s) -> Render:
    yy, xx = _grid(s)
    cy, cx = s / 2 + rng.uniform(-8, 8, 2) * s / 256
    big_r = s * rng.uniform(0.34, 0.40)
    r = np.hypot(yy - cy, xx - cx) / big_r
    bg = _background(rng, s, 0.10, 0.03)
    glass = _colour((70, 110, 60), 20, rng)
    ring = (r <= 1.0) & (r >= 0.55)
    inner = r < 0.55
    shine = 0.55 + 0.45 * np.cos((r - 0.78) * np.pi / 0.46) ** 2
    img = bg.copy()
    img[ring] = _shade(shine, glass)[ring] * 1.4
    img[inner] = _shade(0.35 + 0.3 * (1 - r / 0.55), glass)[inner]
    img += _noise(rng, s, 3)
    return np.clip(img, 0, 255), r <= 1.0, bg


def _render_screw(rng, s) -> Render:
    yy, xx = _grid(s)
    theta = rng.uniform(0, 2 * np.pi)
    length, width = s * rng.uniform(0.48, 0.58), s * rng.uniform(0.07, 0.09)
    cy, cx = s / 2 + rng.uniform(-10, 10, 2) * s / 256
    # head centre sits -length/2 along the axis from the centre
    u, v = _rotate(yy, xx, cy, cx, theta)
    u = u + length / 2
    frac = np.clip(u / length, 0, 1)
    half = width / 2 * np.where(frac > 0.82, 1 - (frac - 0.82) / 0.18 * 0.9, 1.0)
    shaft = (u >= 0) & (u <= length) & (np.abs(v) <= half)
    head_r = width * 1.3
    head = np.hypot(u, v) <= head_r
    obj = shaft | head
    bg = _background(rng, s, 0.78, 0.05)
    metal = _colour((150, 150, 155), 15, rng)
    thread = 0.75 + 0.25 * np.sin(2 * np.pi * u / (width * 0.45) + v * 0.3)
    across = 1.0 - 0.5 * (v / np.maximum(half, 1e-3)) ** 2
    inten = np.where(head, 0.8 - 0.3 * (np.hypot(u, v) / head_r) ** 2, thread * across)
    slot = head & (np.abs(v) < width * 0.18) & (np.abs(u) < head_r * 0.75)
    inten = np.where(slot, 0.25, inten)
    img = np.where(obj[..., None], _shade(inten, metal), bg) + _noise(rng, s, 3)
    return np.clip(img, 0, 255), obj, bg


def _render_pill(rng, s) -> Render:
    yy, xx = _grid(s)
    theta = np.deg2rad(rng.uniform(-25, 25))
    cy, cx = s / 2 + rng.uniform(-8, 8, 2) * s / 256
    half_len, rad = s * rng.uniform(0.20, 0.25), s * rng.uniform(0.14, 0.17)
    c, sn = np.cos(theta), np.sin(theta)
    p0 = (cy - half_len * sn, cx - half_len * c)
    p1 = (cy + half_len * sn, cx + half_len * c)
    d = _seg_dist(yy, xx, p0, p1) / rad
    obj = d <= 1.0
    bg = _background(rng, s, 0.30, 0.04, tint=(0.75, 0.8, 1.0))
    white = _colour((235, 232, 222), 8, rng)
    inten = 0.78 + 0.22 * np.sqrt(np.clip(1 - d**2, 0, 1))
    img = np.where(obj[..., None], _shade(inten, white), bg)
    # a few red speckles printed on the pill (part of the normal appearance)
    ys, xs = np.nonzero(obj & (d < 0.8))
    pick = rng.integers(0, len(ys), 12)
    speck = np.zeros((s, s), bool)
    for k in pick:
        speck |= np.hypot(yy - ys[k], xx - xs[k]) <= rng.uniform(1.0, 2.2) * s / 256
    img[speck] = _colour((180, 60, 50), 20, rng)
    img += _noise(rng, s, 3)
    return np.clip(img, 0, 255), obj, bg


def _render_widget2(rng, s) -> Render:
    yy, xx = _grid(s)
    theta = np.deg2rad(rng.uniform(-12, 12))
    cy, cx = s / 2 + rng.uniform(-8, 8, 2) * s / 256
    half = s * rng.uniform(0.30, 0.34)
    u, v = _rotate(yy, xx, cy, cx, theta)
    plate = (np.abs(u) <= half) & (np.abs(v) <= half)
    hole_r, k = half * 0.13, half * 0.72
    holes = np.zeros((s, s), bool)
    for su in (-1, 1):
        for sv in (-1, 1):
            holes |= np.hypot(u - su * k, v - sv * k) <= hole_r
    obj = plate & ~holes
    bg = _background(rng, s, 0.50, 0.05)
    board = _colour((40, 120, 70), 15, rng)
    inten = np.full((s, s), 0.9, F32)
    chip = (np.abs(u) <= half * 0.35) & (np.abs(v) <= half * 0.25)
    inten = np.where(chip, 0.25, inten)
    traces = (np.abs(((v + half) % (half * 0.2)) - half * 0.1) < half * 0.025) & ~chip
    inten = np.where(traces & (np.abs(u) > half * 0.45), 1.25, inten)
    img = np.where(obj[..., None], _shade(inten, board), bg) + _noise(rng, s, 3)
    return np.clip(img, 0, 255), obj, bg


_RENDERERS: dict[str, Callable[[np.random.Generator, int], Render]] = {
    "carpet": _render_carpet,
    "grid": _render_grid,
    "wood": _render_wood,
    "bottle": _render_bottle,
    "screw": _render_screw,
    "pill": _render_pill,
    "widget2": _render_widget2,
}


# --------------------------------------------------------------------------------------------
# defects: each returns (region [S,S] bool, new image [S,S,3] f32 valid inside the region)
# --------------------------------------------------------------------------------------------


def _pick_point(rng, allowed: np.ndarray, margin: int) -> tuple[float, float]:
    s = allowed.shape[0]
    box = np.zeros_like(allowed)
    box[margin : s - margin, margin : s - margin] = True
    ys, xs = np.nonzero(allowed & box)
    if len(ys) == 0:
        ys, xs = np.nonzero(allowed)
    k = rng.integers(0, len(ys))
    return float(ys[k]), float(xs[k])


def _walk(rng, start, n: int, step: float, turn: float) -> list[tuple[float, float]]:
    pts = [start]
    ang = rng.uniform(0, 2 * np.pi)
    for _ in range(n):
        ang += rng.uniform(-turn, turn)
        y, x = pts[-1]
        pts.append((y + step * np.sin(ang), x + step * np.cos(ang)))
    return pts


def _defect_scratch(rng, img, obj, bg, sc):
    yy, xx = _grid(img.shape[0])
    start = _pick_point(rng, obj, int(20 * sc))
    pts = _walk(rng, start, int(rng.integers(2, 4)), rng.uniform(14, 30) * sc, np.deg2rad(25))
    region = (_polyline_dist(yy, xx, pts) <= rng.uniform(0.9, 1.8) * sc) & obj
    if rng.random() < 0.7:  # bright scratch
        new = img + (255 - img) * rng.uniform(0.55, 0.8)
    else:
        new = img * rng.uniform(0.25, 0.45)
    return region, new


def _defect_hole(rng, img, obj, bg, sc):
    s = img.shape[0]
    yy, xx = _grid(s)
    cy, cx = _pick_point(rng, obj, int(18 * sc))
    a, b = rng.uniform(5, 13, 2) * sc
    u, v = _rotate(yy, xx, cy, cx, rng.uniform(0, np.pi))
    rr = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    region = (rr <= 1.0) & obj
    inten = (0.04 + 0.12 * np.clip(rr, 0, 1))[..., None]
    new = inten * 255 + img * 0.08
    return region, new


def _defect_stain(rng, img, obj, bg, sc):
    s = img.shape[0]
    yy, xx = _grid(s)
    cy, cx = _pick_point(rng, obj, int(18 * sc))
    region = np.zeros((s, s), bool)
    for _ in range(int(rng.integers(3, 6))):
        oy, ox = rng.uniform(-9, 9, 2) * sc
        region |= np.hypot(yy - cy - oy, xx - cx - ox) <= rng.uniform(4, 10) * sc
    region &= obj
    palette = [(95, 60, 25), (150, 30, 40), (170, 160, 40), (40, 40, 120)]
    colour = np.asarray(palette[int(rng.integers(0, len(palette)))], F32)
    alpha = rng.uniform(0.55, 0.8)
    new = img * (1 - alpha) + colour * alpha
    return region, new


def _defect_crack(rng, img, obj, bg, sc):
    yy, xx = _grid(img.shape[0])
    start = _pick_point(rng, obj, int(20 * sc))
    pts = _walk(rng, start, int(rng.integers(8, 15)), rng.uniform(3, 5) * sc, np.deg2rad(40))
    if rng.random() < 0.5:  # a short branch
        j = int(rng.integers(1, len(pts) - 1))
        branch = _walk(rng, pts[j], int(rng.integers(3, 6)), 3.5 * sc, np.deg2rad(40))
        dist = np.minimum(_polyline_dist(yy, xx, pts), _polyline_dist(yy, xx, branch))
    else:
        dist = _polyline_dist(yy, xx, pts)
    region = (dist <= rng.uniform(0.8, 1.4) * sc) & obj
    return region, img * rng.uniform(0.15, 0.35)


def _defect_missing_part(rng, img, obj, bg, sc):
    s = img.shape[0]
    yy, xx = _grid(s)
    inner = obj.copy()  # 4-neighbour erosion, vectorised
    inner[1:] &= obj[:-1]
    inner[:-1] &= obj[1:]
    inner[:, 1:] &= obj[:, :-1]
    inner[:, :-1] &= obj[:, 1:]
    cy, cx = _pick_point(rng, obj & ~inner, 4)
    radius = np.sqrt(obj.sum()) * rng.uniform(0.12, 0.2)
    region = (np.hypot(yy - cy, xx - cx) <= radius) & obj
    return region, bg


_DEFECTS = {
    "scratch": _defect_scratch,
    "hole": _defect_hole,
    "stain": _defect_stain,
    "crack": _defect_crack,
    "missing_part": _defect_missing_part,
}


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _apply(good: np.ndarray, region: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Paste ``new`` into ``good`` (uint8) inside ``region``, forcing every region pixel to
    change by >= MIN_DELTA in some channel (pixels the defect barely changed are pushed by 60
    grey levels away from the nearer end of the range)."""
    new_u8 = _to_u8(new)
    delta = np.abs(new_u8.astype(np.int16) - good.astype(np.int16)).max(axis=-1)
    weak = region & (delta < MIN_DELTA)
    if weak.any():
        g = good[weak].astype(np.int16)
        push = np.where(g.mean(axis=-1, keepdims=True) < 128, 60, -60)
        new_u8[weak] = np.clip(g + push, 0, 255).astype(np.uint8)
    return np.where(region[..., None], new_u8, good)


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    words = [int(seed)] + [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def render_sample(
    category: str,
    defect: str = "good",
    index: int = 0,
    seed: int = 0,
    image_size: int = 256,
    split: str = "test",
    defect_scale: float = 1.0,
) -> SyntheticSample:
    """Render one sample exactly as :func:`generate` writes it.

    Returns the defect-free render (``good``), the final ``image`` and its exact ``mask``.
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; valid: {list(CATEGORIES)}")
    if defect != "good" and defect not in CATEGORIES[category].defects:
        raise ValueError(
            f"unknown defect {defect!r} for {category!r}; valid: {CATEGORIES[category].defects}"
        )
    s = int(image_size)
    if s < 32:
        raise ValueError(f"image_size must be >= 32, got {s}")
    rng = _rng(seed, category, split, defect, index)
    img, obj, bg = _RENDERERS[category](rng, s)
    good = _to_u8(img)
    if defect == "good":
        return SyntheticSample(good, good, np.zeros((s, s), bool), category, defect)
    if defect_scale <= 0:
        raise ValueError(f"defect_scale must be > 0, got {defect_scale}")
    # defect size scale; floored so thin defects survive small sizes; defect_scale > 1 makes every defect larger
    # (e.g. 3 for learning tests at 112 px, where the default defects are smaller than one 14 px patch)
    sc = max(s / 256.0, 0.5) * float(defect_scale)
    min_area = max(int(25 * sc * sc), 6)
    for _ in range(20):  # retry until the defect covers a visible area (deterministic)
        region, new = _DEFECTS[defect](rng, good.astype(F32), obj, bg, sc)
        if region.sum() >= min_area:
            break
    if not region.any():
        raise RuntimeError(f"synthetic {category}/{defect} #{index}: empty defect region")
    image = _apply(good, region, new)
    mask = (image != good).any(axis=-1)
    assert np.array_equal(mask, region), "synthetic defect mask must equal the altered pixels"
    return SyntheticSample(good, image, mask, category, defect)


# --------------------------------------------------------------------------------------------
# writing the tree
# --------------------------------------------------------------------------------------------


def _params(categories, n_train_good, n_test_good, n_test_defect_per_kind, image_size, seed,
            defect_scale=1.0) -> dict:
    return {
        "defect_scale": float(defect_scale),
        "generator": "zsadlib.data.synthetic",
        "version": GENERATOR_VERSION,
        "categories": list(categories),
        "n_train_good": int(n_train_good),
        "n_test_good": int(n_test_good),
        "n_test_defect_per_kind": int(n_test_defect_per_kind),
        "image_size": int(image_size),
        "seed": int(seed),
    }


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)  # fast, deterministic


def generate(
    out_dir: str | Path,
    categories: Sequence[str] | None = None,
    n_train_good: int = 10,
    n_test_good: int = 8,
    n_test_defect_per_kind: int = 4,
    image_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    defect_scale: float = 1.0,
) -> Path:
    """Write the synthetic dataset (MVTec AD layout + ``meta.json``) to ``out_dir``.

    With the defaults: 7 categories, 214 images of 256x256 plus 88 masks, about 3 s on
    one CPU core. ``out_dir`` must be absent, empty, or a previous synthetic tree (which is
    replaced). Returns ``out_dir``.
    """
    out = Path(out_dir)
    cats = list(CATEGORIES) if categories is None else list(categories)
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown or not cats:
        raise ValueError(f"unknown synthetic categories {unknown}; valid: {list(CATEGORIES)}")
    if out.exists():
        if not out.is_dir():
            raise DatasetError(f"cannot generate the synthetic dataset into {out}: not a folder")
        if any(out.iterdir()):
            if not (out / _MARKER).is_file():
                raise DatasetError(
                    f"refusing to overwrite {out}: not empty and not a generated synthetic dataset"
                )
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    jobs: list[tuple[str, str, str, int]] = []  # (category, split, defect, index)
    for c in cats:
        jobs += [(c, "train", "good", i) for i in range(n_train_good)]
        jobs += [(c, "test", "good", i) for i in range(n_test_good)]
        for d in CATEGORIES[c].defects:
            jobs += [(c, "test", d, i) for i in range(n_test_defect_per_kind)]

    records: dict[str, list[Record]] = {"train": [], "test": []}
    for c, split, d, i in tqdm(jobs, desc="synthetic dataset", disable=not progress):
        smp = render_sample(c, d, i, seed, image_size, split, defect_scale=defect_scale)
        img_path = out / c / split / d / f"{i:03d}.png"
        _save_png(smp.image, img_path)
        mask_path = None
        if d != "good":
            mask_path = out / c / "ground_truth" / d / f"{i:03d}_mask.png"
            _save_png(smp.mask.astype(np.uint8) * 255, mask_path)
        records[split].append(Record(img_path, mask_path, int(d != "good"), c, d))
    for recs in records.values():  # same order as scanning the tree (class, folder, file)
        recs.sort(key=lambda r: (r.class_name, r.defect, r.image_path.name))
    write_meta_json(records, out)
    params = _params(cats, n_train_good, n_test_good, n_test_defect_per_kind, image_size, seed, defect_scale)
    (out / _MARKER).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    return out


def ensure_synthetic(
    root: str | Path | None = None,
    categories: Sequence[str] | None = None,
    n_train_good: int = 10,
    n_test_good: int = 8,
    n_test_defect_per_kind: int = 4,
    image_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    defect_scale: float = 1.0,
    reuse_existing: bool = False,
) -> Path:
    """Return ``root`` (default :data:`DEFAULT_ROOT`), generating the dataset first when it is
    missing or was generated with other parameters / an older generator.

    Generation goes to a temporary sibling folder that is renamed into place, so an
    interrupted run never leaves a half-written tree and concurrent callers are safe. A
    non-empty ``root`` that is not a generated tree is never touched (DatasetError). ``reuse_existing`` keeps any
    tree made by this generator version whatever its parameters (notebooks and the demo use it, so a tree the user
    made with ``zsad data synth --size 512`` is not replaced).
    """
    root = Path(root) if root is not None else DEFAULT_ROOT
    cats = list(CATEGORIES) if categories is None else list(categories)
    want = _params(cats, n_train_good, n_test_good, n_test_defect_per_kind, image_size, seed, defect_scale)

    def current() -> bool:
        try:
            return json.loads((root / _MARKER).read_text(encoding="utf-8")) == want
        except (OSError, json.JSONDecodeError):
            return False

    if current() and (root / "meta.json").is_file():
        return root
    if reuse_existing and (root / "meta.json").is_file():  # any tree of this generator version (e.g. --size 512)
        try:
            if json.loads((root / _MARKER).read_text(encoding="utf-8")).get("version") == GENERATOR_VERSION:
                return root
        except (OSError, json.JSONDecodeError):
            pass
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not (root / _MARKER).is_file():
        raise DatasetError(
            f"refusing to overwrite {root}: not empty and not a generated synthetic dataset"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    generate(tmp, cats, n_train_good, n_test_good, n_test_defect_per_kind, image_size, seed, progress,
             defect_scale=defect_scale)
    try:
        if root.exists():
            shutil.rmtree(root)  # a stale generated tree (checked above)
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not current():  # lost a race to another process that wrote the same tree: fine
            raise
    return root
