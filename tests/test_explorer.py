"""The dual-branch explorer: widgets drive a pure render of precomputed maps, headless."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from zsadlib.viz import (ALL_LAYERS, Explorer, ExplorerItem, ExplorerState, explorer_map, explorer_scale,
                         heatmap_overlay, render_explorer)


def make_items():
    generator = torch.Generator().manual_seed(0)
    items = []
    for class_name, count in (("bottle", 3), ("pcb1", 2)):
        for i in range(count):
            items.append(ExplorerItem(
                class_name=class_name, path=f"/data/{class_name}/{i}.png",
                image=torch.randn(3, 16, 16, generator=generator), mask=torch.rand(16, 16, generator=generator) > 0.8,
                layer_maps={"enhanced": torch.rand(4, 16, 16, generator=generator),
                            "query": torch.rand(4, 16, 16, generator=generator)},
                scores={"enhanced": 0.9 - 0.1 * i, "query": 0.2 + 0.1 * i}, label=1))
    return items


def test_fusion_weight_extremes_give_the_single_branches():
    item = make_items()[0]
    for weight, branch in ((1.0, "enhanced"), (0.0, "query")):
        fused, score = explorer_map(item, ExplorerState("bottle", branch="fused", fusion_weight=weight))
        single, single_score = explorer_map(item, ExplorerState("bottle", branch=branch))
        np.testing.assert_array_equal(fused, single)
        assert score == single_score
    layer_two, _ = explorer_map(item, ExplorerState("bottle", branch="query", layer=2))
    np.testing.assert_array_equal(layer_two, item.layer_maps["query"][2].numpy())


def test_render_is_pure_and_shows_the_selected_map():
    items = make_items()
    state = ExplorerState("bottle", image_index=1, layer=None, branch="fused", fusion_weight=0.25)
    first = render_explorer(items, state, layers=(6, 12, 18, 24))
    second = render_explorer(items, state, layers=(6, 12, 18, 24))
    np.testing.assert_array_equal(first.amap, second.amap)
    expected = 0.25 * items[1].layer_maps["enhanced"].sum(0) + 0.75 * items[1].layer_maps["query"].sum(0)
    np.testing.assert_allclose(first.amap, expected.numpy(), rtol=1e-6)
    # one colour scale for both branches and every weight: the min / max over the two single-branch maps
    single = [items[1].layer_maps[b].sum(0) for b in ("enhanced", "query")]
    low, high = min(float(m.min()) for m in single), max(float(m.max()) for m in single)
    assert first.scale == pytest.approx((low, high))
    shown = first.figure.axes[2].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(shown), heatmap_overlay(items[1].image, first.amap, vmin=first.scale[0],
                                                                     vmax=first.scale[1]))
    assert "1.png" in first.title and "w=0.25" in first.title
    colorbar = first.figure.axes[3]  # the colorbar states the scale
    assert colorbar.get_ylim() == pytest.approx((low, high))


def test_every_fusion_weight_stays_inside_the_shared_scale():
    """The old per-map scale stretched each fused map to its own max (w = 0.9 all red); the shared scale holds
    every fused map, and a near-single-branch weight does not fill the scale."""
    item = make_items()[2]
    for layer in (None, 1):
        scale = explorer_scale(item, ExplorerState("bottle", layer=layer))
        for weight in np.linspace(0, 1, 11):
            view = render_explorer([item], ExplorerState("bottle", layer=layer, fusion_weight=float(weight)))
            assert view.scale == scale
            assert scale[0] - 1e-6 <= view.amap.min() and view.amap.max() <= scale[1] + 1e-6
    fused = render_explorer([item], ExplorerState("bottle", fusion_weight=0.5)).amap
    assert fused.max() < explorer_scale(item, ExplorerState("bottle"))[1] - 1e-3  # averaging two random maps lowers the peak: it no longer maps to red


def test_widgets_drive_the_state_headless():
    pytest.importorskip("ipywidgets")
    items = make_items()
    explorer = Explorer(items, layers=(6, 12, 18, 24))
    assert explorer.renders == 1
    layer = explorer.widgets["layer"]
    assert layer.label == "all layers" and layer.value == ALL_LAYERS and explorer.state.layer is None
    assert [label for label, _ in layer.options] == ["all layers", "layer 6", "layer 12", "layer 18", "layer 24"]
    assert "all layers" in explorer.view.title
    assert explorer.widgets["fusion_weight"].disabled is False
    explorer.widgets["branch"].value = "query"
    assert explorer.widgets["fusion_weight"].disabled is True  # the weight has no effect on one branch
    explorer.widgets["layer"].value = 3
    np.testing.assert_array_equal(explorer.view.amap, items[0].layer_maps["query"][3].numpy())
    explorer.widgets["class_name"].value = "pcb1"
    assert explorer.widgets["image_index"].max == 1
    explorer.widgets["image_index"].value = 1
    assert explorer.view.score == pytest.approx(items[4].scores["query"])
    explorer.widgets["branch"].value = "enhanced"
    assert explorer.widgets["fusion_weight"].disabled is True
    explorer.widgets["branch"].value = "fused"
    assert explorer.widgets["fusion_weight"].disabled is False
    explorer.widgets["fusion_weight"].value = 1.0
    np.testing.assert_array_equal(explorer.view.amap, items[4].layer_maps["enhanced"][3].numpy())
    # one render per change, and sliders only report on release
    assert explorer.renders == 8
    explorer.widgets["layer"].value = ALL_LAYERS
    assert explorer.state.layer is None and explorer.widgets["layer"].label == "all layers"
    np.testing.assert_array_equal(explorer.view.amap, items[4].layer_maps["enhanced"].sum(0).numpy())
    assert explorer.widgets["fusion_weight"].continuous_update is False
    # the view is the PNG of the rendered figure in an Image widget (plain widget state: reports show it)
    png = bytes(explorer.image.value)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and explorer.image.format == "png"
    width, height = Image.open(io.BytesIO(png)).size
    assert (width, height) == tuple(round(v * explorer.dpi) for v in explorer.view.figure.get_size_inches())
    assert explorer.box.children[-1] is explorer.image
    assert explorer.widgets["image_index"].continuous_update is False


def test_explorer_recombination_equals_the_method(tiny_backbone, synthetic_root):
    """Recombining stored per-layer maps (blur is linear) reproduces GenCLIP's own maps for any weight."""
    from zsadlib.data import open_dataset
    from zsadlib.studies.dual_branch import collect_branches, explorer_items, fusion_sweep
    from zsadlib.evaluate import run_method
    from zsadlib.methods import build_method

    from .conftest import TINY_SIZE

    data = open_dataset("synthetic", synthetic_root, classes=["bottle"], image_size=TINY_SIZE).subset(max_per_class=3)
    method = build_method("genclip", backbone=tiny_backbone)
    outputs = collect_branches(method, data, batch_size=2, progress=False)
    items = explorer_items(outputs, data, method.config.blur_sigma)
    for weight in (0.0, 0.3, 1.0):
        weighted = build_method("genclip", backbone=tiny_backbone, fusion_weight=weight)
        weighted.load_learned_state_dict(method.learned_state_dict())
        samples = [data[i] for i in range(len(data))]
        direct = run_method(weighted, torch.stack([s.image for s in samples]), [s.class_name for s in samples])
        for i, item in enumerate(items):
            amap, score = explorer_map(item, ExplorerState("bottle", branch="fused", fusion_weight=weight),
                                       combine=method.config.layer_fusion)
            np.testing.assert_allclose(amap, direct.maps[i].numpy(), atol=1e-5)
            assert score == pytest.approx(float(direct.scores[i]), abs=1e-6)
    sweep = fusion_sweep(outputs, (0.0, 1.0))
    assert list(sweep.index) == [0.0, 1.0]
