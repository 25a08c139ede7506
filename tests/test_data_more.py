"""The other datasets of the seed papers' tables (KSDD, DAGM, the medical sets): tiny trees in the layouts the
reference index scripts read -> records, labels, masks (paired by name), class names; test-only splits; metric levels
(image-only and all-anomalous sets evaluate cleanly, without an UndefinedMetricWarning)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from zsadlib import metrics
from zsadlib.data import (
    IMAGE_ONLY_KINDS,
    PIXEL_ONLY_KINDS,
    DatasetError,
    collate_samples,
    metric_levels,
    open_dataset,
)

from .conftest import TINY_SIZE
from .test_data import H, W, _img, _mask


def _records(ds):
    return [(r.class_name, r.defect, r.label, r.image_path.name, r.mask_path.name if r.mask_path else None)
            for r in ds.records]


def _check_masks_load(ds, boxes: dict[str, tuple[int, int, int, int]]):
    """Every anomalous sample's mask (original size) is exactly its box; normal samples' masks are empty."""
    raw = open_dataset(ds.kind, ds.root, transform=None)
    for i, rec in enumerate(raw.records):
        sample = raw[i]
        if not raw.has_masks:
            assert sample.mask is None
            continue
        want = np.zeros((H, W), bool)
        if rec.label:
            y0, y1, x0, x1 = boxes[rec.image_path.stem]
            want[y0:y1, x0:x1] = True
        assert np.array_equal(sample.mask.numpy(), want), rec.image_path


# --------------------------------------------------------------------------------------------
# KSDD (KolektorSDD in AdaCLIP's MVTec layout) and DAGM 2007
# --------------------------------------------------------------------------------------------


def test_ksdd_mvtec_layout(tmp_path):
    root = tmp_path / "sdd"
    cls = root / "electrical commutators"
    _img(cls / "train" / "good" / "kos01_Part0_0.png")
    _img(cls / "test" / "good" / "kos02_Part1_2.png")
    _img(cls / "test" / "defect" / "kos03_Part5_1.png")
    _img(cls / "test" / "defect" / "kos03_Part5_1_b.png")  # sorts before ..._1_mask: pairing by name matters
    _mask(cls / "ground_truth" / "defect" / "kos03_Part5_1_mask.png", (2, 5, 3, 9))
    _mask(cls / "ground_truth" / "defect" / "kos03_Part5_1_b_mask.png", (10, 20, 1, 4))
    ds = open_dataset("ksdd", root)
    assert ds.class_names == ["electrical commutators"] and ds.has_masks
    assert _records(ds) == [
        ("electrical commutators", "defect", 1, "kos03_Part5_1.png", "kos03_Part5_1_mask.png"),
        ("electrical commutators", "defect", 1, "kos03_Part5_1_b.png", "kos03_Part5_1_b_mask.png"),
        ("electrical commutators", "good", 0, "kos02_Part1_2.png", None),
    ]
    _check_masks_load(ds, {"kos03_Part5_1": (2, 5, 3, 9), "kos03_Part5_1_b": (10, 20, 1, 4)})
    assert [r.image_path.name for r in open_dataset("ksdd", root, split="train").records] == ["kos01_Part0_0.png"]
    assert metric_levels(ds) == ("image", "pixel")


def make_dagm(root: Path) -> Path:
    for k, split in ((1, "Test"), (1, "Train"), (2, "Test")):
        folder = root / f"Class{k}" / split
        _img(folder / "0001.PNG")
        _img(folder / "0002.PNG", colour=(10, 10, 10))
        _img(folder / "0003.PNG")
        _mask(folder / "Label" / "0002_label.PNG", (1, 4, 2, 6))
        (folder / "Label" / "Labels.txt").write_text("1\n")  # the shipped label list: ignored
    return root


def test_dagm_layout(tmp_path):
    root = make_dagm(tmp_path / "DAGM_KaggleUpload")
    ds = open_dataset("dagm", root)
    assert ds.class_names == ["Class1", "Class2"] and ds.has_masks
    assert [(c, d, lab, n, m) for c, d, lab, n, m in _records(ds) if c == "Class1"] == [
        ("Class1", "good", 0, "0001.PNG", None),
        ("Class1", "anomaly", 1, "0002.PNG", "0002_label.PNG"),
        ("Class1", "good", 0, "0003.PNG", None),
    ]
    assert all(r.image_path.parent.name == "Test" for r in ds.records)
    _check_masks_load(ds, {"0002": (1, 4, 2, 6)})
    train = open_dataset("dagm", root, split="train", classes="Class1")
    assert [r.image_path.parent.name for r in train.records] == ["Train"] * 3 and train.class_names == ["Class1"]
    assert open_dataset("dagm", root, split="Test").labels.tolist() == ds.labels.tolist()


def test_dagm_label_without_image_is_an_error(tmp_path):
    root = make_dagm(tmp_path / "dagm")
    _mask(root / "Class2" / "Test" / "Label" / "0009_label.PNG", (0, 2, 0, 2))
    with pytest.raises(DatasetError, match="0009_label.PNG has no image"):
        open_dataset("dagm", root)


# --------------------------------------------------------------------------------------------
# image-label-only medical sets: HeadCT, BrainMRI, Br35H
# --------------------------------------------------------------------------------------------


def test_headct_layout(tmp_path):
    root = tmp_path / "headct"
    _img(root / "brain" / "test" / "good" / "000.png")
    _img(root / "brain" / "test" / "good" / "001.png")
    _img(root / "brain" / "test" / "defect" / "100.png")
    ds = open_dataset("headct", root)
    assert ds.class_names == ["brain"] and not ds.has_masks
    assert _records(ds) == [("brain", "defect", 1, "100.png", None), ("brain", "good", 0, "000.png", None),
                            ("brain", "good", 0, "001.png", None)]
    _check_masks_load(ds, {})
    assert metric_levels(ds) == ("image",)


@pytest.mark.parametrize("kind, sub", [("brainmri", "brain_tumor_dataset"), ("br35h", ""), ("br35h", "brain")])
def test_brain_no_yes_layouts(tmp_path, kind, sub):
    root = tmp_path / kind
    folder = root / sub if sub else root
    _img(folder / "no" / "1 no.jpeg")
    _img(folder / "yes" / "Y1.jpg")
    _img(folder / "yes" / "Y2.JPG")
    (root / "meta.json").write_text("{}")  # an index left by the reference scripts is ignored
    ds = open_dataset(kind, root)
    assert ds.class_names == ["brain"] and not ds.has_masks and kind in IMAGE_ONLY_KINDS
    assert _records(ds) == [("brain", "good", 0, "1 no.jpeg", None), ("brain", "yes", 1, "Y1.jpg", None),
                            ("brain", "yes", 1, "Y2.JPG", None)]
    batch = collate_samples([ds[i] for i in range(len(ds))])
    assert batch.masks is None and batch.labels.tolist() == [0, 1, 1]


# --------------------------------------------------------------------------------------------
# all-anomalous medical sets with masks: ISIC, ColonDB, ClinicDB, Kvasir, Endo, TN3K
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dir", ["ground_truth", "ISBI2016_ISIC_Part1_Test_GroundTruth"])
def test_isic_layout(tmp_path, mask_dir):
    root = tmp_path / "isic"
    _img(root / "skin" / "test" / "defect" / "ISIC_0000003.jpg")
    _img(root / "skin" / "test" / "defect" / "ISIC_0000012.jpg")
    _mask(root / "skin" / mask_dir / "ISIC_0000003_Segmentation.png", (0, 10, 0, 10))
    _mask(root / "skin" / mask_dir / "ISIC_0000012_Segmentation.png", (5, 6, 7, 30))
    ds = open_dataset("isic", root)
    assert ds.class_names == ["skin"] and ds.has_masks
    assert _records(ds) == [("skin", "defect", 1, "ISIC_0000003.jpg", "ISIC_0000003_Segmentation.png"),
                            ("skin", "defect", 1, "ISIC_0000012.jpg", "ISIC_0000012_Segmentation.png")]
    _check_masks_load(ds, {"ISIC_0000003": (0, 10, 0, 10), "ISIC_0000012": (5, 6, 7, 30)})
    assert metric_levels(ds) == ("pixel",)


@pytest.mark.parametrize("kind, images, masks, cls, ext", [
    ("colondb", "images", "masks", "colon", ".png"),
    ("clinicdb", "images", "masks", "colon", ".png"),
    ("kvasir", "images", "masks", "colon", ".jpg"),
    ("tn3k", "test-image", "test-mask", "thyroid", ".jpg"),
])
def test_image_and_mask_folder_layouts(tmp_path, kind, images, masks, cls, ext):
    root = tmp_path / kind
    boxes = {"1": (0, 3, 0, 3), "10": (4, 9, 2, 12), "2": (20, 24, 30, 32)}  # "10" sorts between "1" and "2"
    for stem, box in boxes.items():
        _img(root / images / f"{stem}{ext}")
        _mask(root / masks / f"{stem}.png", box)
    ds = open_dataset(kind, root)
    assert ds.class_names == [cls] and ds.has_masks and kind in PIXEL_ONLY_KINDS
    assert _records(ds) == [(cls, "anomaly", 1, f"{s}{ext}", f"{s}.png") for s in ("1", "10", "2")]
    _check_masks_load(ds, boxes)
    assert metric_levels(ds) == ("pixel",)


def test_endo_layout(tmp_path):
    root = tmp_path / "EndoTect_2020_Segmentation_Test_Dataset"
    _img(root / "images" / "a.jpg")
    _img(root / "images" / "b.jpg")
    _mask(root / "masks" / "a.jpg", (1, 2, 1, 2), fmt="PNG")
    _mask(root / "masks" / "b.jpg", (3, 7, 3, 7), fmt="PNG")
    ds = open_dataset("endo", root)
    assert ds.class_names == ["colon"]
    assert _records(ds) == [("colon", "images", 1, "a.jpg", "a.jpg"), ("colon", "images", 1, "b.jpg", "b.jpg")]
    _check_masks_load(ds, {"a": (1, 2, 1, 2), "b": (3, 7, 3, 7)})


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_missing_mask_names_the_image_and_the_expected_paths(tmp_path):
    root = tmp_path / "colondb"
    _img(root / "images" / "1.png")
    _img(root / "images" / "2.png")
    _mask(root / "masks" / "1.png", (0, 1, 0, 1))
    with pytest.raises(DatasetError, match=r"no mask for anomalous image .*2\.png: expected .*masks/2_mask"):
        open_dataset("colondb", root)
    with pytest.raises(DatasetError, match=r"no mask .*ISIC_1\.jpg: expected .*ISIC_1_Segmentation"):
        _img(tmp_path / "isic" / "skin" / "test" / "defect" / "ISIC_1.jpg")
        (tmp_path / "isic" / "skin" / "ground_truth").mkdir()
        open_dataset("isic", tmp_path / "isic")


@pytest.mark.parametrize("kind", ["headct", "brainmri", "br35h", "isic", "colondb", "clinicdb", "kvasir", "endo", "tn3k"])
def test_medical_sets_are_test_only_and_name_their_layout(tmp_path, kind):
    (tmp_path / kind).mkdir()
    with pytest.raises(DatasetError, match=f"{kind} has only a test split"):
        open_dataset(kind, tmp_path / kind, split="train")
    with pytest.raises(DatasetError, match="expected layout"):
        open_dataset(kind, tmp_path / kind)
    with pytest.raises(DatasetError, match="not found.*expected layout"):
        open_dataset(kind, tmp_path / "missing")


def test_unknown_class_of_a_one_class_set(tmp_path):
    root = tmp_path / "tn3k"
    _img(root / "test-image" / "0.jpg")
    _mask(root / "test-mask" / "0.jpg", (0, 1, 0, 1), fmt="PNG")
    assert open_dataset("tn3k", root, classes="thyroid").class_names == ["thyroid"]
    with pytest.raises(DatasetError, match=r"unknown class\(es\) \['colon'\].*\['thyroid'\]"):
        open_dataset("tn3k", root, classes="colon")


# --------------------------------------------------------------------------------------------
# metric levels: the left-out level is NaN without a warning; the kept level is unchanged
# --------------------------------------------------------------------------------------------


def test_compute_table_levels():
    rng = np.random.default_rng(0)
    labels = np.array([1, 1, 1, 1])
    scores = rng.random(4)
    masks = np.zeros((4, 8, 8), bool)
    masks[:, 2:5, 2:5] = True
    maps = rng.random((4, 8, 8)).astype(np.float32) + masks
    names = ["a", "a", "b", "b"]
    with pytest.warns(metrics.UndefinedMetricWarning, match="only one class present"):
        both = metrics.compute_table(labels, scores, masks, maps, names)
    with warnings.catch_warnings():
        warnings.simplefilter("error", metrics.UndefinedMetricWarning)
        pixel = metrics.compute_table(labels, scores, masks, maps, names, levels=("pixel",))
        image = metrics.compute_table(np.array([0, 1, 0, 1]), scores, None, None, names, levels=("image",))
    pixel_keys = [k for k in pixel.columns if not k.startswith("image_")]
    assert pixel[pixel_keys].equals(both[pixel_keys]) and pixel[pixel_keys].notna().all().all()
    assert pixel[list(metrics.IMAGE_KEYS)].isna().all().all()
    assert image[list(metrics.IMAGE_KEYS)].notna().all().all() and image[pixel_keys].isna().all().all()
    assert image.loc["a", "image_auroc"] == metrics.auroc([0, 1], scores[:2])
    with pytest.raises(ValueError, match="unknown metric levels"):
        metrics.compute_table(labels, scores, masks, maps, names, levels=("pixels",))


def test_evaluating_an_all_anomalous_set_gives_pixel_metrics_only_without_warning(tmp_path, tiny_backbone):
    from zsadlib.evaluate import evaluate
    from zsadlib.methods import build_method

    root = tmp_path / "kvasir"
    rng = np.random.default_rng(1)
    for i in range(3):
        _img(root / "images" / f"{i}.jpg", colour=tuple(int(c) for c in rng.integers(0, 255, 3)))
        _mask(root / "masks" / f"{i}.jpg", (2 + i, 12, 4, 20 - i), fmt="PNG")
    ds = open_dataset("kvasir", root, image_size=TINY_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", metrics.UndefinedMetricWarning)
        result = evaluate(build_method("winclip", backbone=tiny_backbone), ds, out_dir=tmp_path / "out", progress=False)
    assert all(result.metrics[k] is None for k in metrics.IMAGE_KEYS)
    assert all(0.0 <= result.metrics[k] <= 1.0 for k in ("pixel_auroc", "pixel_ap", "aupro_linear200"))
    assert result.summary["dataset"]["metric_levels"] == ["pixel"]
    assert not math.isnan(result.table.loc["colon", "pixel_auroc"])
