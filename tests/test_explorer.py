"""The dual-branch explorer: widgets drive a pure render of precomputed maps, headless."""
import numpy as np
import pytest
import torch

from zsadlib.viz import Explorer, ExplorerItem, ExplorerState, explorer_map, heatmap_overlay, render_explorer


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
    shown = first.figure.axes[2].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(shown), heatmap_overlay(items[1].image, first.amap, vmin=0.0,
                                                                     vmax=float(first.amap.max())))
    assert "1.png" in first.title and "w=0.25" in first.title


def test_widgets_drive_the_state_headless():
    pytest.importorskip("ipywidgets")
    items = make_items()
    explorer = Explorer(items, layers=(6, 12, 18, 24))
    assert explorer.renders == 1
    explorer.widgets["branch"].value = "query"
    explorer.widgets["layer"].value = 3
    np.testing.assert_array_equal(explorer.view.amap, items[0].layer_maps["query"][3].numpy())
    explorer.widgets["class_name"].value = "pcb1"
    assert explorer.widgets["image_index"].max == 1
    explorer.widgets["image_index"].value = 1
    assert explorer.view.score == pytest.approx(items[4].scores["query"])
    explorer.widgets["branch"].value = "fused"
    explorer.widgets["fusion_weight"].value = 1.0
    np.testing.assert_array_equal(explorer.view.amap, items[4].layer_maps["enhanced"][3].numpy())
    # one render per change, and sliders only report on release
    assert explorer.renders == 7
    assert explorer.widgets["fusion_weight"].continuous_update is False
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
