"""Figures: heatmap overlays, map grids, per-class metric plots (matplotlib + seaborn).

All functions take plain arrays/tensors and return arrays or matplotlib Figures; nothing here computes
anomaly scores. Images may be normalised tensors [3, H, W] (they are de-normalised with the OpenAI mean/std),
float arrays in [0, 1] or uint8 [H, W, 3].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .data.transforms import denormalize  # noqa: E402

__all__ = ["to_uint8_image", "colorize", "heatmap_overlay", "save_map_png", "save_overlay", "plot_maps",
           "plot_class_metrics"]


def to_uint8_image(image: Any, normalized: bool = True) -> np.ndarray:
    """[3, H, W] tensor or [H, W, 3] array / PIL image -> uint8 [H, W, 3].

    A [3, H, W] tensor is taken as normalised with the OpenAI mean/std (what the dataset transforms give)
    unless ``normalized=False`` (values in [0, 1]). Values cannot tell the two apart, so there is no guessing.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 3 and tensor.shape[0] == 3:
            if normalized:
                tensor = denormalize(tensor)
            array = tensor.clamp(0, 1).permute(1, 2, 0).numpy()
            return (array * 255 + 0.5).astype(np.uint8)
        image = tensor.numpy()
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array if array.ndim == 3 else np.repeat(array[..., None], 3, axis=-1)
    array = np.clip(array.astype(np.float32), 0, 1)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return (array * 255 + 0.5).astype(np.uint8)


def colorize(amap: Any, vmin: float | None = 0.0, vmax: float | None = 1.0, cmap: str = "jet") -> np.ndarray:
    """Anomaly map [H, W] -> uint8 RGB [H, W, 3] through a colormap (values clipped to [vmin, vmax];
    None means the map's own min / max)."""
    values = amap.detach().float().cpu().numpy() if isinstance(amap, torch.Tensor) else np.asarray(amap, np.float32)
    low = float(values.min()) if vmin is None else vmin
    high = float(values.max()) if vmax is None else vmax
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0, 1)
    rgba = matplotlib.colormaps[cmap](scaled)
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def heatmap_overlay(image: Any, amap: Any, alpha: float = 0.5, vmin: float | None = 0.0, vmax: float | None = 1.0,
                    cmap: str = "jet") -> np.ndarray:
    """Blend a colorized map over an image of the same size -> uint8 [H, W, 3]."""
    base = to_uint8_image(image)
    heat = colorize(amap, vmin=vmin, vmax=vmax, cmap=cmap)
    if heat.shape[:2] != base.shape[:2]:
        raise ValueError(f"map {heat.shape[:2]} and image {base.shape[:2]} differ in size")
    blended = (1 - alpha) * base.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def save_map_png(path: str | Path, amap: Any, vmin: float = 0.0, vmax: float = 1.0) -> Path:
    """Save a map as an 8-bit grayscale PNG (value v -> round(255 * (v - vmin) / (vmax - vmin)))."""
    values = amap.detach().float().cpu().numpy() if isinstance(amap, torch.Tensor) else np.asarray(amap, np.float32)
    scaled = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    path = Path(path)
    Image.fromarray((scaled * 255 + 0.5).astype(np.uint8), mode="L").save(path)
    return path


def save_overlay(path: str | Path, image: Any, amap: Any, **kwargs) -> Path:
    path = Path(path)
    Image.fromarray(heatmap_overlay(image, amap, **kwargs)).save(path)
    return path


def plot_maps(images: Sequence[Any], maps: Sequence[Sequence[Any]], column_titles: Sequence[str],
              row_titles: Sequence[str] | None = None, masks: Sequence[Any] | None = None,
              vmin: float | None = 0.0, vmax: float | None = 1.0, cell_inches: float = 2.2):
    """A grid: one row per image (image, [mask], then one overlay per map).

    images: n images; maps: n rows of m maps each; column_titles: m titles for the maps.
    """
    n, m = len(images), len(column_titles)
    extra = 2 if masks is not None else 1
    fig, axes = plt.subplots(n, m + extra, figsize=(cell_inches * (m + extra), cell_inches * n), squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(to_uint8_image(images[row]))
        axes[row, 0].set_title("image" if row == 0 else "")
        if masks is not None:
            mask = masks[row]
            mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            axes[row, 1].imshow(mask, cmap="gray", vmin=0, vmax=1)
            axes[row, 1].set_title("mask" if row == 0 else "")
        for col in range(m):
            axes[row, col + extra].imshow(heatmap_overlay(images[row], maps[row][col], vmin=vmin, vmax=vmax))
            if row == 0:
                axes[row, col + extra].set_title(column_titles[col], fontsize=9)
        if row_titles is not None:
            axes[row, 0].set_ylabel(row_titles[row], fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_class_metrics(table, metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "aupro_mvtec"),
                       title: str = ""):
    """Grouped bar plot (seaborn) of per-class metrics in percent from a metrics table (with a "mean" row)."""
    import pandas as pd
    import seaborn as sns

    present = [m for m in metrics if m in table.columns]
    long = (table[present] * 100).reset_index(names="class").melt(id_vars="class", var_name="metric",
                                                                   value_name="percent")
    long = long.dropna()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(table.index) + 2), 3.6))
    if len(long):
        sns.barplot(data=long, x="class", y="percent", hue="metric", ax=ax)
    ax.set_ylim(0, 100)
    ax.set_xlabel("")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    del pd
    return fig
