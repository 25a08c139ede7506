"""Figures: heatmap overlays, map grids, per-class metric plots (matplotlib + seaborn).

All functions take plain arrays/tensors and return arrays or matplotlib Figures; nothing here computes
anomaly scores. Images may be normalised tensors [3, H, W] (they are de-normalised with the OpenAI mean/std),
float arrays in [0, 1] or uint8 [H, W, 3].
"""
from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from .data.transforms import denormalize

__all__ = ["to_uint8_image", "colorize", "heatmap_overlay", "save_map_png", "save_overlay", "RANDOM_WEIGHTS_LABEL",
           "UNTRAINED_PROMPTS_LABEL", "figure_label", "shared_scale", "add_colorbar", "plot_maps", "plot_layer_grid",
           "plot_layer_maps", "plot_class_metrics", "plot_loss_curves", "ExplorerItem", "ExplorerState", "ExplorerView",
           "explorer_map", "explorer_scale", "render_explorer", "Explorer"]


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


def _as_array(value: Any) -> np.ndarray:
    return value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)


def colorize(amap: Any, vmin: float | None = 0.0, vmax: float | None = 1.0, cmap: str = "jet") -> np.ndarray:
    """Anomaly map [H, W] -> uint8 RGB [H, W, 3] through a colormap (values clipped to [vmin, vmax];
    None means the map's own min / max)."""
    values = _as_array(amap)
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
    values = _as_array(amap)
    scaled = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    path = Path(path)
    Image.fromarray((scaled * 255 + 0.5).astype(np.uint8), mode="L").save(path)
    return path


def save_overlay(path: str | Path, image: Any, amap: Any, **kwargs) -> Path:
    path = Path(path)
    Image.fromarray(heatmap_overlay(image, amap, **kwargs)).save(path)
    return path


RANDOM_WEIGHTS_LABEL = "random weights: meaningless"  # the one wording of every figure and table made with them
UNTRAINED_PROMPTS_LABEL = "untrained prompts"


def figure_label(backbone_info: dict, trained: bool | None = None) -> str:
    """The suffix of every figure title of a run: ``" [random weights: meaningless]"`` for random (tiny) weights,
    ``" [untrained prompts]"`` when ``trained`` is False, else ``""``."""
    if backbone_info.get("random_weights"):
        return f" [{RANDOM_WEIGHTS_LABEL}]"
    return f" [{UNTRAINED_PROMPTS_LABEL}]" if trained is False else ""


def shared_scale(maps: Sequence[Any], vmin: float | None = None, vmax: float | None = None) -> tuple[float, float]:
    """One colour scale for several maps: the given ends, or the min / max over all of them (never empty)."""
    arrays = [_as_array(m) for m in maps]
    low = min(float(a.min()) for a in arrays) if vmin is None else float(vmin)
    high = max(float(a.max()) for a in arrays) if vmax is None else float(vmax)
    return low, high if high > low else low + 1e-6


def add_colorbar(fig, axes, vmin: float, vmax: float, label: str = "anomaly map", cmap: str = "jet"):
    """A colorbar for overlays drawn with :func:`heatmap_overlay` (its colours at alpha 1) beside ``axes``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=cmap)
    bar = fig.colorbar(mappable, ax=axes, shrink=0.9, fraction=0.04, pad=0.02)
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    return bar


def plot_maps(images: Sequence[Any], maps: Sequence[Sequence[Any]], column_titles: Sequence[str],
              row_titles: Sequence[str] | None = None, masks: Sequence[Any] | None = None,
              vmin: float | None = 0.0, vmax: float | None = 1.0, cell_inches: float = 2.2, title: str = "",
              colorbar: bool = True):
    """A grid: one row per image (image, [mask], then one overlay per map), one colour scale for every map.

    images: n images; maps: n rows of m maps each; column_titles: m titles for the maps. ``vmin`` / ``vmax``: the
    colour scale; None = the min / max over all the figure's maps (one scale, stated on the colorbar).
    ``title``: the figure's title (e.g. :func:`figure_label`), kept out of the narrow column titles.
    """
    n, m = len(images), len(column_titles)
    extra = 2 if masks is not None else 1
    low, high = shared_scale([amap for row in maps for amap in row], vmin, vmax)
    fig, axes = plt.subplots(n, m + extra, figsize=(cell_inches * (m + extra) + (0.9 if colorbar else 0),
                                                    cell_inches * n + (0.4 if title else 0)),
                             squeeze=False, layout="constrained")
    for row in range(n):
        axes[row, 0].imshow(to_uint8_image(images[row]))
        axes[row, 0].set_title("image" if row == 0 else "", fontsize=10)
        if masks is not None:
            mask = masks[row]
            mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            axes[row, 1].imshow(mask, cmap="gray", vmin=0, vmax=1)
            axes[row, 1].set_title("mask" if row == 0 else "", fontsize=10)
        for col in range(m):
            axes[row, col + extra].imshow(heatmap_overlay(images[row], maps[row][col], vmin=low, vmax=high))
            if row == 0:
                axes[row, col + extra].set_title(column_titles[col], fontsize=10)
        if row_titles is not None:
            axes[row, 0].set_ylabel(row_titles[row], fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if colorbar:
        add_colorbar(fig, axes, low, high, label=f"map value (one scale, {low:.3g} to {high:.3g})")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_layer_grid(images: Sequence[Any], maps: Sequence[Sequence[Sequence[Any]]], row_names: Sequence[str],
                    layer_names: Sequence[str], masks: Sequence[Any] | None = None, vmin: float | None = None,
                    vmax: float | None = None, title: str = "", cell_inches: float = 1.7):
    """Per-layer maps that stay readable in a notebook panel: one row per (image, path) and one column per layer,
    rather than every (path, layer) side by side.

    maps[i][r][l]: map [S, S] of image i, path / branch ``row_names[r]``, layer ``layer_names[l]``.
    """
    rows = [(i, r) for i in range(len(images)) for r in range(len(row_names))]
    return plot_maps([images[i] for i, _ in rows], [list(maps[i][r]) for i, r in rows], list(layer_names),
                     row_titles=[f"image {i + 1}: {row_names[r]}" if len(images) > 1 else row_names[r]
                                 for i, r in rows],
                     masks=[masks[i] for i, _ in rows] if masks is not None else None,
                     vmin=vmin, vmax=vmax, cell_inches=cell_inches, title=title)


def plot_layer_maps(method, images: Sequence[Any], output, masks: Sequence[Any] | None = None, label: str = ""):
    """Per-layer maps of one method output: every ``extras`` entry whose name contains "layer_maps" ([B, L, S, S],
    e.g. ``layer_maps`` and ViP2-CLIP's ``layer_maps_before_fgp``), one row per (image, entry), one column per layer,
    on the fixed 0..1 scale of layer probabilities.

    Columns are named by ``extras["entries"]`` (Crane's per-entry names) or the method's ``layers``.
    """
    keys = [key for key, value in output.extras.items()
            if "layer_maps" in key and isinstance(value, torch.Tensor) and value.ndim == 4]
    if not keys:
        raise ValueError(f"{method.name} returns no per-layer maps in extras")
    count = output.extras[keys[0]].shape[1]
    names = list(output.extras.get("entries") or [f"L{layer}" for layer in getattr(method, "layers", range(count))])
    row_names = [key.replace("layer_maps", "").strip("_").replace("_", " ") or method.name for key in keys]
    maps = [[[output.extras[key][i, j] for j in range(count)] for key in keys] for i in range(len(images))]
    return plot_layer_grid(images, maps, row_names, names, masks=masks, vmin=0.0, vmax=1.0,
                           title=f"{method.name}: per-layer maps{label}")


def plot_class_metrics(table, metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "aupro_mvtec"),
                       title: str = ""):
    """Grouped bar plot (seaborn) of per-class metrics in percent from a metrics table (with a "mean" row).

    The legend sits outside the axes (it never covers a bar) and the layout is constrained, so the title and
    the legend survive ``savefig`` at any size.
    """
    import seaborn as sns

    present = [m for m in metrics if m in table.columns]
    long = (table[present] * 100).reset_index(names="class").melt(id_vars="class", var_name="metric",
                                                                   value_name="percent")
    long = long.dropna()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(table.index) + 2) + 1.6, 3.6), layout="constrained")
    if len(long):
        sns.barplot(data=long, x="class", y="percent", hue="metric", ax=ax)
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8, title_fontsize=9)
    ax.set_ylim(0, 100)
    ax.set_xlabel("")
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10, wrap=True)  # a long title wraps instead of running off the figure
    ax.tick_params(axis="x", rotation=30)
    return fig


def plot_loss_curves(log_path: str | Path, title: str = ""):
    """Loss per step from a training run's ``log.jsonl`` (total and each named part), with the epoch mean."""
    import pandas as pd

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    frame = pd.DataFrame([{"step": r["step"], "epoch": r.get("epoch", 0), "loss": r["loss"],
                           **{f"{k}": v for k, v in (r.get("parts") or {}).items()}} for r in records])
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for column in [c for c in frame.columns if c not in ("step", "epoch")]:
        ax.plot(frame["step"], frame[column], label=column, linewidth=1.6 if column == "loss" else 0.9,
                alpha=1.0 if column == "loss" else 0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# the dual-branch explorer: state + a pure render function (+ thin ipywidgets wiring)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ExplorerItem:
    """One precomputed image: image [3, S, S] (normalised), mask [S, S] or None, and per branch
    ``layer_maps[branch]`` [L, S, S] (each layer's contribution, already blurred: blur is linear, so any
    weighted sum of them equals the blurred weighted sum) and ``scores[branch]`` (float)."""

    class_name: str
    path: str
    image: torch.Tensor
    mask: torch.Tensor | None
    layer_maps: dict[str, torch.Tensor]
    scores: dict[str, float]
    label: int = 0


@dataclass
class ExplorerState:
    """What the widgets select. ``layer`` is an index into the tapped layers, or None for all layers combined."""

    class_name: str
    image_index: int = 0
    layer: int | None = None
    branch: str = "fused"  # "fused" | one of the item's branches (e.g. "enhanced", "query")
    fusion_weight: float = 0.5  # weight of the first branch in "fused"


@dataclass
class ExplorerView:
    """What :func:`render_explorer` computed: the map shown [S, S], its score, and the figure."""

    amap: np.ndarray
    score: float
    title: str
    figure: Any
    scale: tuple[float, float] = (0.0, 1.0)  # the colour scale (vmin, vmax) of the overlay


def explorer_map(item: ExplorerItem, state: ExplorerState, combine: str = "sum") -> tuple[np.ndarray, float]:
    """The map [S, S] and score selected by ``state`` (pure; no model call).

    ``fused`` = w * first branch + (1 - w) * second branch, for maps and scores alike.
    """
    branches = list(item.layer_maps)

    def one(branch: str) -> tuple[torch.Tensor, float]:
        maps = item.layer_maps[branch]
        chosen = maps if state.layer is None else maps[state.layer:state.layer + 1]
        combined = chosen.sum(0) if combine == "sum" else chosen.mean(0)
        return combined, float(item.scores[branch])

    if state.branch == "fused":
        if len(branches) != 2:
            raise ValueError(f"'fused' needs two branches, item has {branches}")
        (first, s1), (second, s2) = one(branches[0]), one(branches[1])
        w = float(state.fusion_weight)
        return (w * first + (1 - w) * second).cpu().numpy(), w * s1 + (1 - w) * s2
    if state.branch not in item.layer_maps:
        raise ValueError(f"unknown branch {state.branch!r}; available: {branches + ['fused']}")
    amap, score = one(state.branch)
    return amap.cpu().numpy(), score


def explorer_scale(item: ExplorerItem, state: ExplorerState, combine: str = "sum") -> tuple[float, float]:
    """The colour scale of an item at the state's layer choice: the min / max over its single-branch maps, shared
    by every branch and every fusion weight (a fused map lies pointwise between the two branch maps), so moving
    the weight slider changes colours only where the maps change."""
    return shared_scale([explorer_map(item, dataclasses.replace(state, branch=branch), combine=combine)[0]
                         for branch in item.layer_maps])


def render_explorer(items: Sequence[ExplorerItem], state: ExplorerState, layers: Sequence[int] = (),
                    combine: str = "sum", vmin: float | None = None, vmax: float | None = None) -> ExplorerView:
    """Pure render: the selected image, its mask and the overlay of the selected map, with a colorbar. No model
    call. ``vmin`` / ``vmax``: a fixed colour scale; None = :func:`explorer_scale`."""
    candidates = [item for item in items if item.class_name == state.class_name]
    if not candidates:
        raise ValueError(f"no images of class {state.class_name!r}")
    item = candidates[min(state.image_index, len(candidates) - 1)]
    amap, score = explorer_map(item, state, combine=combine)
    layer_name = "all layers" if state.layer is None else f"layer {layers[state.layer] if layers else state.layer}"
    branch = state.branch + (f" (w={state.fusion_weight:.2f})" if state.branch == "fused" else "")
    title = f"{item.class_name} · {Path(item.path).name} · {branch} · {layer_name} · score {score:.3f}"
    auto_low, auto_high = explorer_scale(item, state, combine) if vmin is None or vmax is None else (vmin, vmax)
    low, high = auto_low if vmin is None else vmin, auto_high if vmax is None else vmax
    # a bare Figure (not pyplot): the explorer shows it as a PNG in its Image widget, and the inline backend must
    # not show it a second time at the end of the cell
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(to_uint8_image(item.image))
    axes[0].set_title("image", fontsize=10)
    mask = item.mask if item.mask is not None else torch.zeros(item.image.shape[-2:])
    axes[1].imshow(mask.cpu().numpy(), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("mask", fontsize=10)
    axes[2].imshow(heatmap_overlay(item.image, amap, vmin=low, vmax=high))
    axes[2].set_title("map", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    add_colorbar(fig, axes[2], low, high, label="map (scale shared by branches and weights)")
    fig.suptitle(title, fontsize=10)
    return ExplorerView(amap=amap, score=score, title=title, figure=fig, scale=(low, high))


ALL_LAYERS = -1  # the layer dropdown's value for "all layers" (ExplorerState.layer None)


class Explorer:
    """ipywidgets front end: dropdowns for class / branch / layer, sliders (``continuous_update=False``, so a
    drag renders once on release) for the image and the fusion weight. Every change only re-renders the
    precomputed maps through :func:`render_explorer`; nothing re-runs the model.

    Headless use (tests): set ``explorer.widgets[name].value`` and read ``explorer.view``. The layer dropdown's
    "all layers" entry has the value :data:`ALL_LAYERS`; the weight slider is disabled on single-branch views.
    """

    def __init__(self, items: Sequence[ExplorerItem], layers: Sequence[int], combine: str = "sum", dpi: int = 90):
        import ipywidgets as widgets

        if not items:
            raise ValueError("the explorer needs at least one precomputed image")
        self.items = list(items)
        self.layers = list(layers)
        self.combine = combine
        self.dpi = dpi
        classes = sorted({item.class_name for item in self.items})
        branches = ["fused", *self.items[0].layer_maps]
        self.state = ExplorerState(class_name=classes[0])
        self.widgets = {
            "class_name": widgets.Dropdown(options=classes, value=classes[0], description="class"),
            "image_index": widgets.IntSlider(min=0, max=self._count(classes[0]) - 1, value=0,
                                             description="image", continuous_update=False),
            # ipywidgets shows a None value as no selection (a blank box): "all layers" is the index ALL_LAYERS
            "layer": widgets.Dropdown(options=[("all layers", ALL_LAYERS)]
                                      + [(f"layer {l}", i) for i, l in enumerate(self.layers)],
                                      value=ALL_LAYERS, description="layer"),
            "branch": widgets.Dropdown(options=branches, value="fused", description="branch"),
            "fusion_weight": widgets.FloatSlider(min=0.0, max=1.0, step=0.05, value=0.5, description="weight",
                                                 continuous_update=False),
        }
        # the view is a PNG in an Image widget, not a figure in an Output widget: no clear_output / capture
        # messages (a headless run through papermill hung, now and then, on the Output widget's), and the
        # picture is plain widget state, so a saved notebook or an HTML report shows it whatever the backend
        self.image = widgets.Image(format="png")
        self.renders = 0
        self.view: ExplorerView | None = None
        for name, widget in self.widgets.items():
            widget.observe(self._on_change(name), names="value")
        self.box = widgets.VBox([widgets.HBox(list(self.widgets.values())[:3]),
                                 widgets.HBox(list(self.widgets.values())[3:]), self.image])
        self.render()

    def _count(self, class_name: str) -> int:
        return sum(item.class_name == class_name for item in self.items)

    def _on_change(self, name: str):
        def handler(change):
            value = None if name == "layer" and change["new"] == ALL_LAYERS else change["new"]
            setattr(self.state, name, value)
            if name == "branch":  # the weight only acts on the fused view
                self.widgets["fusion_weight"].disabled = value != "fused"
            if name == "class_name":
                slider = self.widgets["image_index"]
                slider.max = self._count(change["new"]) - 1
                self.state.image_index = min(self.state.image_index, slider.max)
            self.render()
        return handler

    def render(self) -> ExplorerView:
        self.view = render_explorer(self.items, self.state, self.layers, combine=self.combine)
        self.renders += 1
        buffer = io.BytesIO()
        self.view.figure.savefig(buffer, format="png", dpi=self.dpi)
        self.image.value = buffer.getvalue()
        return self.view

    def _ipython_display_(self):  # pragma: no cover - notebook display
        from IPython.display import display

        display(self.box)
