"""Evaluation engine: per-class table equals the metrics of the maps computed directly; outputs; precision."""
import csv
import json
import warnings

import numpy as np
import pytest
import torch

from zsadlib import metrics
from zsadlib.data import collate_samples, open_dataset
from zsadlib.evaluate import autocast, evaluate, run_method
from zsadlib.methods import build_method

from .conftest import TINY_SIZE


@pytest.fixture(scope="module")
def winclip_tiny(tiny_backbone):
    return build_method("winclip", backbone=tiny_backbone)


@pytest.fixture(scope="module")
def small_dataset(synthetic_root):
    dataset = open_dataset("synthetic", synthetic_root, classes=["carpet", "bottle", "widget2"], image_size=TINY_SIZE)
    return dataset.subset(max_per_class=4, seed=0)


def test_evaluate_matches_direct_metrics_and_writes_outputs(winclip_tiny, small_dataset, tmp_path):
    # one batch, as the reference below: batching moves maps by ~1e-7, which linear200's grid can amplify
    result = evaluate(winclip_tiny, small_dataset, out_dir=tmp_path, batch_size=len(small_dataset), progress=False)
    # plain reference: every map in memory, metrics computed in one call
    batch = collate_samples([small_dataset[i] for i in range(len(small_dataset))])
    output = run_method(winclip_tiny, batch.images, batch.class_names)
    expected = metrics.compute_table(batch.labels, output.scores, batch.masks, output.maps, batch.class_names)
    assert list(result.table.index) == list(expected.index)
    np.testing.assert_allclose(result.table.to_numpy(), expected.to_numpy(), atol=1e-6, equal_nan=True)

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert set(summary["metrics"]) == set(metrics.METRIC_KEYS)
    assert sorted(summary["per_class"]) == ["bottle", "carpet", "widget2"]
    assert summary["random_weights"] is True and "mean nothing" in summary["note"]
    assert summary["method"]["config"]["image_size"] == TINY_SIZE
    assert summary["preprocessing"]["image_size"] == TINY_SIZE
    assert summary["versions"]["torch"] and summary["run"]["seed"] == 0
    assert summary["dataset"]["images"] == len(small_dataset)
    with open(tmp_path / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(small_dataset)
    np.testing.assert_allclose([float(r["score"]) for r in rows], output.scores.numpy(), atol=1e-6)


def test_batch_size_does_not_change_results(winclip_tiny, small_dataset):
    one = evaluate(winclip_tiny, small_dataset, batch_size=1, progress=False)
    many = evaluate(winclip_tiny, small_dataset, batch_size=5, progress=False)
    np.testing.assert_allclose(one.scores, many.scores, atol=1e-5)
    np.testing.assert_allclose(one.table.to_numpy(), many.table.to_numpy(), atol=1e-4, equal_nan=True)


def test_reduced_precision_stays_close(winclip_tiny, small_dataset):
    batch = collate_samples([small_dataset[i] for i in range(4)])
    full = run_method(winclip_tiny, batch.images, batch.class_names, precision="fp32")
    half = run_method(winclip_tiny, batch.images, batch.class_names, precision="bf16")
    assert half.maps.dtype == torch.float32
    assert (full.maps - half.maps).abs().max() < 0.05
    assert (full.scores - half.scores).abs().max() < 0.05
    assert not torch.equal(full.maps, half.maps)  # the switch really changes the arithmetic


def test_precision_switch_errors():
    with pytest.raises(ValueError, match="precision"):
        with autocast(torch.device("cpu"), "fp8"):
            pass
    with pytest.raises(ValueError, match="needs CUDA"):
        with autocast(torch.device("cpu"), "fp16"):
            pass


def test_image_size_mismatch_is_clear(winclip_tiny, synthetic_root):
    dataset = open_dataset("synthetic", synthetic_root, classes=["carpet"], image_size=224)
    with pytest.raises(ValueError, match="image_size=112"):
        evaluate(winclip_tiny, dataset, progress=False)


def test_image_label_only_dataset_gives_nan_pixel_metrics(winclip_tiny, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in ("good", "bad"):
        (tmp_path / "parts" / folder).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "parts" / folder / f"{i}.png")
    dataset = open_dataset("folder", tmp_path / "parts", image_size=TINY_SIZE)
    with warnings.catch_warnings():  # pixel metrics are left out by design: no UndefinedMetricWarning
        warnings.simplefilter("error", metrics.UndefinedMetricWarning)
        result = evaluate(winclip_tiny, dataset, progress=False)
    assert result.metrics["pixel_auroc"] is None and result.metrics["aupro_linear200"] is None
    assert result.metrics["image_auroc"] is not None
    assert result.summary["dataset"]["metric_levels"] == ["image"]


def test_build_method_records_the_backbone_it_was_given_and_falls_back_to_tiny(tiny_backbone):
    from zsadlib.methods import build_method_or_tiny

    method = build_method("april_gan", backbone=tiny_backbone)  # paper: bicubic_antialias; this backbone: bilinear
    assert method.config.pos_embed_resize == tiny_backbone.info["pos_embed_resize"] == "bilinear"
    said = []
    fallback = build_method_or_tiny("winclip", device="cpu", announce=said.append)  # offline: no laion weights
    assert fallback.backbone.info["random_weights"] and fallback.backbone.image_size == 238
    assert len(said) == 1 and "laion400m_e31" in said[0] and "mean nothing" in said[0]


@pytest.mark.parametrize("name", ["anomalyclip", "crane"])
def test_learned_text_is_encoded_once_per_evaluation(name, tiny_backbone, small_dataset, monkeypatch):
    """Frozen prompts at inference: the text tower runs once for the whole evaluation (batches of 2), again only
    after the learned parameters change, and every call while training (gradients on)."""
    method = build_method(name, backbone=tiny_backbone)
    calls = []
    encode = method.text.encode
    monkeypatch.setattr(method.text, "encode", lambda *args, **kwargs: calls.append(1) or encode(*args, **kwargs))
    first = evaluate(method, small_dataset, batch_size=2, progress=False)
    assert len(calls) == 1 and len(small_dataset) > 2
    evaluate(method, small_dataset, batch_size=2, progress=False)
    assert len(calls) == 1
    with torch.no_grad():
        method.text.context.copy_(torch.randn(method.text.context.shape, generator=torch.Generator().manual_seed(1)))
    changed = evaluate(method, small_dataset, batch_size=2, progress=False)  # (in place, as optimisers and loads do)
    assert len(calls) == 2
    assert np.abs(first.scores - changed.scores).max() > 1e-3
    images = torch.stack([small_dataset[i].image for i in range(2)])
    for _ in range(2):
        method.training_loss(images, None, torch.tensor([0, 1]), ["a", "b"])
    assert len(calls) == 4
    run_method(method, images, precision="bf16")  # the cached text is full precision: bf16 reuses it
    assert len(calls) == 4
