"""viz: overlays and map PNGs hold the values they are given; the per-class plot has one bar per value."""
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from zsadlib.data.transforms import ImageTransform
from zsadlib.viz import (RANDOM_WEIGHTS_LABEL, colorize, figure_label, heatmap_overlay, plot_class_metrics,
                         plot_layer_grid, plot_maps, save_map_png, shared_scale, to_uint8_image)


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


def test_class_plot_legend_covers_no_bar_and_the_saved_title_is_whole(tmp_path):
    """The legend sits outside the axes and a long title survives savefig (constrained layout)."""
    table = pd.DataFrame({"image_auroc": [0.99, 0.98], "pixel_auroc": [0.97, 0.99], "aupro_mvtec": [0.95, 0.96]},
                         index=["carpet", "mean"])
    title = "anomalyclip zero-shot after learning [random weights: meaningless] " * 2
    figure = plot_class_metrics(table, title=title)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legend = figure.axes[0].get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in figure.axes[0].patches if p.get_height() > 0]
    assert len(bars) == 6 and not any(legend.overlaps(bar) for bar in bars)
    figure.savefig(tmp_path / "per_class.png", dpi=50)
    box = figure.axes[0].title.get_window_extent(renderer)
    width, height = figure.bbox.width, figure.bbox.height
    assert 0 <= box.x0 and box.x1 <= width and box.y1 <= height, "title cut off"


def test_map_grid_uses_one_stated_scale_for_every_map():
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    low_map, high_map = np.full((8, 8), 0.2, np.float32), np.linspace(0.2, 0.6, 64, dtype=np.float32).reshape(8, 8)
    figure = plot_maps([image], [[low_map, high_map]], ["a", "b"], vmin=None, vmax=None, title="t [x]")
    shown = [ax.images[0].get_array() for ax in figure.axes[1:3]]
    np.testing.assert_array_equal(np.asarray(shown[0]), heatmap_overlay(image, low_map, vmin=0.2, vmax=0.6))
    np.testing.assert_array_equal(np.asarray(shown[1]), heatmap_overlay(image, high_map, vmin=0.2, vmax=0.6))
    colorbar = figure.axes[-1]
    assert colorbar.get_ylim() == pytest.approx((0.2, 0.6)) and "0.2 to 0.6" in colorbar.get_ylabel()
    assert figure.get_suptitle() == "t [x]" and [ax.get_title() for ax in figure.axes[1:3]] == ["a", "b"]
    assert shared_scale([low_map], 0.0, 1.0) == (0.0, 1.0)


def test_layer_grid_has_a_row_per_path_and_a_column_per_layer():
    images = [np.zeros((4, 4, 3), np.uint8)] * 2
    maps = [[[np.full((4, 4), 0.1 * (i + p + l), np.float32) for l in range(3)] for p in range(2)] for i in range(2)]
    figure = plot_layer_grid(images, maps, ["plain", "vv"], ["layer 6", "layer 12", "layer 18"])
    grid = [ax for ax in figure.axes if ax.images]
    assert len(grid) == 4 * (1 + 3)  # (2 images x 2 paths) rows of image + 3 layers
    assert [ax.get_ylabel() for ax in grid[::4]] == ["image 1: plain", "image 1: vv", "image 2: plain", "image 2: vv"]
    assert all(ax.title.get_fontsize() >= 9 for ax in grid)


def test_one_random_weights_label():
    assert figure_label({"random_weights": True}) == f" [{RANDOM_WEIGHTS_LABEL}]"
    assert figure_label({"random_weights": True}, trained=False) == f" [{RANDOM_WEIGHTS_LABEL}]"
    assert figure_label({"random_weights": False}, trained=False) == " [untrained prompts]"
    assert figure_label({"random_weights": False}) == "" == figure_label({}, trained=True)
