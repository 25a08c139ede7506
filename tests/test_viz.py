"""viz: overlays and map PNGs hold the values they are given; the per-class plot has one bar per value."""
import matplotlib
import numpy as np
import pandas as pd
import torch
from PIL import Image

from zsadlib.data.transforms import ImageTransform
from zsadlib.viz import colorize, heatmap_overlay, plot_class_metrics, save_map_png, to_uint8_image


def test_colorize_uses_the_colormap_endpoints():
    amap = np.array([[0.0, 1.0], [0.5, 2.0]], dtype=np.float32)
    rgb = colorize(amap, vmin=0, vmax=1, cmap="jet")
    jet = matplotlib.colormaps["jet"]
    assert tuple(rgb[0, 0]) == tuple((np.array(jet(0.0)[:3]) * 255 + 0.5).astype(np.uint8))
    assert tuple(rgb[0, 1]) == tuple(rgb[1, 1])  # clipped at vmax


def test_overlay_alpha_extremes_and_normalised_input():
    image = np.full((4, 5, 3), 200, dtype=np.uint8)
    amap = torch.rand(4, 5)
    assert np.array_equal(heatmap_overlay(image, amap, alpha=0.0), image)
    assert np.array_equal(heatmap_overlay(image, amap, alpha=1.0), colorize(amap))
    normalised = ImageTransform(8)(Image.fromarray(np.full((8, 8, 3), 128, np.uint8)))
    assert np.abs(to_uint8_image(normalised).astype(int) - 128).max() <= 1


def test_map_png_round_trip(tmp_path):
    amap = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    path = save_map_png(tmp_path / "m.png", amap)
    back = np.asarray(Image.open(path)).astype(np.float32) / 255
    assert np.abs(back - amap).max() <= 0.5 / 255 + 1e-6


def test_class_plot_has_one_bar_per_value():
    table = pd.DataFrame({"image_auroc": [0.9, 0.8, 0.85], "pixel_auroc": [0.7, np.nan, 0.7]},
                         index=["a", "b", "mean"])
    figure = plot_class_metrics(table, metrics=("image_auroc", "pixel_auroc"))
    heights = sorted(round(p.get_height(), 6) for p in figure.axes[0].patches if p.get_height() > 0)
    assert heights == sorted([90.0, 80.0, 85.0, 70.0, 70.0])
