"""Tests for zsadlib.data: adapters on tiny real-layout trees, transforms, collate, meta.json,
the synthetic generator, and every bad-input case of the policy in data/README.md."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from zsadlib.data import (
    DATASET_KINDS,
    OPENAI_MEAN,
    OPENAI_STD,
    AnomalyDataset,
    DatasetError,
    DatasetWarning,
    ImageTransform,
    MaskTransform,
    Record,
    Sample,
    collate_samples,
    denormalize,
    ensure_synthetic,
    open_dataset,
    read_image,
    read_mask,
    write_meta_json,
)
from zsadlib.data import synthetic

W, H = 32, 24  # tiny non-square images (PIL size order is (W, H))


# --------------------------------------------------------------------------------------------
# tree builders
# --------------------------------------------------------------------------------------------


def _img(path: Path, colour=(90, 120, 200), size=(W, H), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _mask(path: Path, box, size=(W, H), value: int = 255, fmt: str | None = None) -> Path:
    """A mask with ``value`` inside box = (y0, y1, x0, x1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    y0, y1, x0, x1 = box
    arr[y0:y1, x0:x1] = value
    Image.fromarray(arr, mode="L").save(path, format=fmt)
    return path


BOX_A = (2, 6, 2, 6)
BOX_AB = (10, 20, 20, 30)


def make_mvtec(root: Path) -> Path:
    """Two classes; names chosen so that sort order of images and masks disagree:
    images a.png < a_b.png, but masks a_b_mask.png < a_mask.png."""
    _img(root / "bottle/train/good/000.png")
    _img(root / "bottle/train/good/001.png")
    _img(root / "bottle/test/good/000.png")
    _img(root / "bottle/test/broken/a.png")
    _img(root / "bottle/test/broken/a_b.png")
    _mask(root / "bottle/ground_truth/broken/a_mask.png", BOX_A)
    _mask(root / "bottle/ground_truth/broken/a_b_mask.png", BOX_AB)
    _img(root / "wood/train/good/000.png")
    _img(root / "wood/test/good/000.png")
    _img(root / "wood/test/good/001.png")
    _img(root / "wood/test/scratch/000.png")
    _mask(root / "wood/ground_truth/scratch/000_mask.png", (0, 4, 0, 4))
    (root / "license.txt").write_text("not a class")
    return root


def make_btad(root: Path) -> Path:
    _img(root / "01/train/ok/0000.bmp", fmt="BMP")
    _img(root / "01/test/ok/0000.bmp", fmt="BMP")
    _img(root / "01/test/ko/0001.bmp", fmt="BMP")
    _img(root / "01/test/ko/0000.bmp", fmt="BMP")
    _mask(root / "01/ground_truth/ko/0000.png", BOX_A)  # same stem, other extension
    _mask(root / "01/ground_truth/ko/0001.png", BOX_AB)
    _img(root / "03/test/ok/0000.png")
    _img(root / "03/test/ko/0000.bmp", fmt="BMP")
    _mask(root / "03/ground_truth/ko/0000.bmp", BOX_A, fmt="BMP")
    return root


def make_visa(root: Path) -> Path:
    lines = ["object,split,label,image,mask"]
    for cls in ("candle", "pcb1"):
        for split, n in (("train", 2), ("test", 1)):
            for i in range(n):
                rel = f"{cls}/Data/Images/Normal/{split}{i:03d}.JPG"
                _img(root / rel, fmt="JPEG")
                lines.append(f"{cls},{split},normal,{rel},")
        rel = f"{cls}/Data/Images/Anomaly/000.JPG"
        mrel = f"{cls}/Data/Masks/Anomaly/000.png"
        _img(root / rel, fmt="JPEG")
        _mask(root / mrel, BOX_AB, value=1)  # VisA-style small label values
        lines.append(f"{cls},test,anomaly,{rel},{mrel}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv/1cls.csv").write_text("\n".join(lines) + "\n")
    return root


def make_folder(root: Path, masks: bool = True) -> Path:
    _img(root / "good/n1.jpg", fmt="JPEG")
    _img(root / "good/n2.png")
    _img(root / "bad/x.png")
    _img(root / "bad/y.bmp", fmt="BMP")
    if masks:
        _mask(root / "masks/x.png", BOX_A)  # <stem>.*
        _mask(root / "masks/y_mask.png", BOX_AB)  # <stem>_mask.*
    return root


def _files_hash(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _box_mask(box, size=(W, H)) -> np.ndarray:
    m = np.zeros((size[1], size[0]), bool)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = True
    return m


# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------


def test_kinds_listed():
    assert set(DATASET_KINDS) == {
        "mvtec", "visa", "btad", "mpdd", "dtd_synthetic", "meta_json", "folder", "synthetic",
        "ksdd", "dagm", "headct", "brainmri", "br35h", "isic", "colondb", "clinicdb", "kvasir", "endo", "tn3k",
    }


@pytest.mark.parametrize("kind", ["mvtec", "mpdd", "dtd_synthetic"])
def test_mvtec_layout_records(tmp_path, kind):
    root = make_mvtec(tmp_path / "ds")
    ds = open_dataset(kind, root)
    assert ds.kind == kind and ds.root == root and ds.split == "test"
    assert ds.class_names == ["bottle", "wood"]
    got = [(r.class_name, r.defect, r.label, r.image_path.name) for r in ds.records]
    assert got == [
        ("bottle", "broken", 1, "a.png"),
        ("bottle", "broken", 1, "a_b.png"),
        ("bottle", "good", 0, "000.png"),
        ("wood", "good", 0, "000.png"),
        ("wood", "good", 0, "001.png"),
        ("wood", "scratch", 1, "000.png"),
    ]
    pairs = {r.image_path.name: r.mask_path.name for r in ds.records if r.class_name == "bottle" and r.label}
    assert pairs == {"a.png": "a_mask.png", "a_b.png": "a_b_mask.png"}
    assert all(r.mask_path is None for r in ds.records if r.label == 0)
    assert ds.class_counts() == {"bottle": {"normal": 1, "anomalous": 2}, "wood": {"normal": 2, "anomalous": 1}}


def test_mask_pairing_by_name_not_sort_order(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    images = sorted(p.name for p in (root / "bottle/test/broken").iterdir())
    masks = sorted(p.name for p in (root / "bottle/ground_truth/broken").iterdir())
    assert [m.replace("_mask", "") for m in masks] != images  # sort order would mis-pair
    ds = open_dataset("mvtec", root, classes="bottle", transform=None)
    by_name = {Path(s.path).name: s for s in ds}
    assert torch.equal(by_name["a.png"].mask, torch.from_numpy(_box_mask(BOX_A)))
    assert torch.equal(by_name["a_b.png"].mask, torch.from_numpy(_box_mask(BOX_AB)))
    assert not by_name["000.png"].mask.any()


def test_mvtec_train_split_and_class_filter(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    assert len(open_dataset("mvtec", root, classes=[])) == 6  # empty selection = all
    ds = open_dataset("mvtec", root, split="train", classes=["wood"])
    assert ds.split == "train" and ds.class_names == ["wood"] and len(ds) == 1
    s = ds[0]
    assert s.label == 0 and s.defect == "good" and s.mask is not None and not s.mask.any()


def test_btad_layout(tmp_path):
    root = make_btad(tmp_path / "btad")
    ds = open_dataset("btad", root, transform=None)
    assert ds.class_names == ["01", "03"]
    recs = {(r.class_name, r.defect, r.image_path.name): r for r in ds.records}
    assert recs[("01", "ko", "0000.bmp")].mask_path.name == "0000.png"
    assert recs[("01", "ko", "0001.bmp")].mask_path.name == "0001.png"
    assert recs[("03", "ko", "0000.bmp")].mask_path.name == "0000.bmp"
    assert recs[("01", "ko", "0000.bmp")].label == 1 and recs[("01", "good", "0000.bmp")].label == 0
    normal = [r for r in ds.records if r.label == 0]
    assert {r.defect for r in normal} == {"good"} and len(normal) == 2
    i = [k for k, r in enumerate(ds.records) if r.image_path.name == "0001.bmp"][0]
    assert torch.equal(ds[i].mask, torch.from_numpy(_box_mask(BOX_AB)))
    with pytest.warns(DatasetWarning, match="'03'"):  # 03 has no train folder: skipped
        assert len(open_dataset("btad", root, split="train")) == 1


def test_visa_layout(tmp_path):
    root = make_visa(tmp_path / "visa")
    ds = open_dataset("visa", root, transform=None)
    assert ds.class_names == ["candle", "pcb1"]
    assert [(r.class_name, r.label, r.defect) for r in ds.records] == [
        ("candle", 0, "good"), ("candle", 1, "anomaly"), ("pcb1", 0, "good"), ("pcb1", 1, "anomaly")
    ]
    anomalous = ds[1]
    assert anomalous.mask.dtype == torch.bool
    assert torch.equal(anomalous.mask, torch.from_numpy(_box_mask(BOX_AB)))  # value 1 counts
    train = open_dataset("visa", root, split="train", classes="pcb1")
    assert len(train) == 2 and train.labels.tolist() == [0, 0]


def test_folder_layout_with_masks(tmp_path):
    root = make_folder(tmp_path / "my_part")
    ds = open_dataset("folder", root, transform=None)
    assert ds.class_names == ["my_part"] and ds.has_masks
    recs = {r.image_path.name: r for r in ds.records}
    assert recs["x.png"].mask_path.name == "x.png" and recs["y.bmp"].mask_path.name == "y_mask.png"
    assert recs["n1.jpg"].label == 0 and recs["x.png"].label == 1 and recs["x.png"].defect == "bad"
    i = [k for k, r in enumerate(ds.records) if r.image_path.name == "y.bmp"][0]
    assert torch.equal(ds[i].mask, torch.from_numpy(_box_mask(BOX_AB)))
    assert open_dataset("folder", root, class_name="widget").class_names == ["widget"]


def test_folder_layout_without_masks_is_image_level(tmp_path):
    root = make_folder(tmp_path / "imgs", masks=False)
    ds = open_dataset("folder", root, image_size=16)
    assert not ds.has_masks
    assert all(s.mask is None for s in ds)
    batch = collate_samples([ds[0], ds[1]])
    assert batch.masks is None and batch.images.shape == (2, 3, 16, 16)


# --------------------------------------------------------------------------------------------
# meta.json
# --------------------------------------------------------------------------------------------


def test_meta_json_round_trip(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    test = open_dataset("mvtec", root)
    train = open_dataset("mvtec", root, split="train")
    path = write_meta_json({"train": train, "test": test}, root)
    assert path == root / "meta.json"
    meta = json.loads(path.read_text())
    assert set(meta) == {"train", "test"}
    entry = meta["test"]["bottle"][0]
    assert entry == {
        "img_path": "bottle/test/broken/a.png",
        "mask_path": "bottle/ground_truth/broken/a_mask.png",
        "cls_name": "bottle",
        "specie_name": "broken",
        "anomaly": 1,
    }
    assert meta["test"]["wood"][0]["mask_path"] == ""
    for split, orig in (("test", test), ("train", train)):
        back = open_dataset("meta_json", root, split=split)
        assert back.records == orig.records
        assert back.has_masks
    assert not open_dataset("meta_json", root, split="train")[0].mask.any()
    # a single dataset goes under its own split
    out = write_meta_json(train, root, tmp_path / "only_train.json")
    assert json.loads(out.read_text())["test"] == {}
    assert len(open_dataset("meta_json", root, split="train", meta_path=out)) == len(train) == 3


def test_meta_json_image_level_only_and_mixed(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    recs = open_dataset("mvtec", root).records
    no_masks = [Record(r.image_path, None, r.label, r.class_name, r.defect) for r in recs]
    write_meta_json(no_masks, root)
    ds = open_dataset("meta_json", root)
    assert not ds.has_masks and ds[0].mask is None
    mixed = [no_masks[0]] + recs[1:]
    write_meta_json(mixed, root)
    with pytest.raises(DatasetError, match="a.png"):
        open_dataset("meta_json", root)


def test_meta_json_missing_split_and_file(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    with pytest.raises(DatasetError, match="meta.json"):
        open_dataset("meta_json", root)
    (root / "meta.json").write_text(json.dumps({"test": {}}))
    with pytest.raises(DatasetError, match="'train'"):
        open_dataset("meta_json", root, split="train")


# --------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------


def test_image_transform_constant_colour():
    img = Image.new("RGB", (W, H), (255, 128, 0))
    x = ImageTransform(image_size=16)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = [(v / 255.0 - m) / s for v, m, s in zip((255, 128, 0), OPENAI_MEAN, OPENAI_STD)]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((16, 16), expected[c]), atol=1e-6)
    back = denormalize(x)
    assert torch.allclose(back[:, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]), atol=1e-6)
    assert denormalize(x[None]).shape == (1, 3, 16, 16)


def test_image_transform_square_vs_shorter_side():
    arr = np.zeros((H, W, 3), np.uint8)
    arr[:, :4] = 255  # a white band on the left edge
    img = Image.fromarray(arr)
    sq = ImageTransform(12, resize="square")(img)
    ss = ImageTransform(12, resize="shorter_side")(img)
    assert sq.shape == ss.shape == (3, 12, 12)
    white = (1.0 - OPENAI_MEAN[0]) / OPENAI_STD[0]
    assert sq[0, 6, 0] == pytest.approx(white, abs=0.05)  # square keeps the left edge
    assert ss[0, 6, 0] < white - 1.0  # shorter side: 16x12 then a centre crop cuts it off
    assert ImageTransform(12).to_dict()["resize"] == "square"


def test_mask_transform_keeps_square_region():
    m = _box_mask((8, 24, 8, 24), size=(32, 32))
    out = MaskTransform(64)(m)
    assert out.dtype == torch.bool and out.shape == (64, 64)
    assert torch.equal(out, torch.from_numpy(_box_mask((16, 48, 16, 48), size=(64, 64))))
    # non-square source: region maps to the scaled box (up to the bilinear edge)
    m2 = _box_mask((6, 18, 8, 24))  # 32x24
    out2 = MaskTransform(16)(m2).numpy()
    ref = _box_mask((4, 12, 4, 12), size=(16, 16))
    assert (out2 & ref).sum() / (out2 | ref).sum() > 0.7
    assert MaskTransform(16)(np.zeros((H, W), bool)).sum() == 0


def test_default_transform_sample_shapes(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    ds = open_dataset("mvtec", root, image_size=28)
    s = ds[0]
    assert isinstance(s, Sample)
    assert s.image.shape == (3, 28, 28) and s.image.dtype == torch.float32
    assert s.mask.shape == (28, 28) and s.mask.dtype == torch.bool
    assert s.label == 1 and s.class_name == "bottle" and s.defect == "broken"
    assert s.original_size == (H, W) and s.path.endswith("a.png")
    assert s.mask.any()


def test_custom_transform_callable(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    ds = open_dataset("mvtec", root, image_size=8, transform=lambda im: torch.zeros(3, 8, 8))
    s = ds[0]
    assert torch.equal(s.image, torch.zeros(3, 8, 8)) and s.mask.shape == (8, 8)


# --------------------------------------------------------------------------------------------
# collate, loaders, subsets
# --------------------------------------------------------------------------------------------


def test_collate_and_dataloader(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    ds = open_dataset("mvtec", root, image_size=16)
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=0, collate_fn=collate_samples)
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 2]
    b = batches[0]
    assert b.images.shape == (4, 3, 16, 16) and b.images.dtype == torch.float32
    assert b.masks.shape == (4, 16, 16) and b.masks.dtype == torch.bool
    assert b.labels.dtype == torch.long and b.labels.tolist() == [1, 1, 0, 0]
    assert b.class_names == ["bottle", "bottle", "bottle", "wood"]
    assert b.defects == ["broken", "broken", "good", "good"]
    assert b.original_sizes == [(H, W)] * 4 and len(b.paths) == 4
    assert b.to("cpu").images.shape == b.images.shape
    # any sample without a mask -> masks None
    s = ds[0]
    no_mask = Sample(s.image, None, 1, "x", "d", "p", (H, W))
    assert collate_samples([s, no_mask]).masks is None


def test_collate_rejects_mixed_shapes(tmp_path):
    s1 = Sample(torch.zeros(3, 4, 4), None, 0, "a", "good", "p1", (4, 4))
    s2 = Sample(torch.zeros(3, 5, 5), None, 0, "a", "good", "p2", (5, 5))
    with pytest.raises(DatasetError, match="shapes"):
        collate_samples([s1, s2])


def test_subset_deterministic_and_balanced(tmp_path):
    recs = []
    for i in range(20):
        recs.append(Record(Path(f"/x/n{i}.png"), None, 0, "a", "good"))
    for d in ("crack", "hole"):
        for i in range(10):
            recs.append(Record(Path(f"/x/{d}{i}.png"), Path(f"/x/{d}{i}_m.png"), 1, "a", d))
    recs.append(Record(Path("/x/b0.png"), None, 0, "b", "good"))
    ds = AnomalyDataset(recs, kind="mvtec", root="/x")
    sub = ds.subset(max_per_class=6, seed=1)
    again = ds.subset(max_per_class=6, seed=1)
    assert sub.records == again.records
    a = [r for r in sub.records if r.class_name == "a"]
    assert len(a) == 6 and sum(r.label for r in a) == 3
    assert {r.defect for r in a if r.label} == {"crack", "hole"}
    assert [r for r in sub.records if r.class_name == "b"] == [recs[-1]]
    assert ds.subset(max_per_class=6, seed=2).records != sub.records
    assert sub.has_masks and sub.kind == "mvtec"
    assert ds.subset(classes="b").class_names == ["b"]
    idx = [ds.records.index(r) for r in sub.records]
    assert idx == sorted(idx)  # original order kept
    with pytest.raises(DatasetError, match="available"):
        ds.subset(classes="zzz")


# --------------------------------------------------------------------------------------------
# image modes (documented conversions)
# --------------------------------------------------------------------------------------------


def test_read_image_16bit_scaled_by_bit_depth(tmp_path):
    arr = np.full((H, W), 257 * 200, np.uint16)
    arr[0, 0] = 65535
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = read_image(tmp_path / "g16.png")
    out = np.asarray(rgb)
    assert rgb.mode == "RGB" and out.shape == (H, W, 3)
    assert (out[1:, 1:] == 200).all() and (out[0, 0] == 255).all()
    x = ImageTransform(8)(rgb)
    assert x.shape == (3, 8, 8)


def test_read_image_grey_palette_rgba(tmp_path):
    Image.new("L", (W, H), 77).save(tmp_path / "l.png")
    assert (np.asarray(read_image(tmp_path / "l.png")) == 77).all()

    p = Image.new("P", (W, H), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert (np.asarray(read_image(tmp_path / "p.png")) == [10, 20, 30]).all()

    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 0
    rgba[:, W // 2 :, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    dropped = np.asarray(read_image(tmp_path / "a.png"))
    assert (dropped == [200, 100, 50]).all()  # default: alpha ignored (reference behaviour)
    black = np.asarray(read_image(tmp_path / "a.png", alpha="black"))
    assert (black[:, : W // 2] == 0).all() and (black[:, W // 2 :] == [200, 100, 50]).all()

    for name in ("l.png", "p.png", "a.png"):
        t = ImageTransform(8)(read_image(tmp_path / name))
        assert t.shape == (3, 8, 8) and t.dtype == torch.float32


def test_grey_images_in_a_dataset(tmp_path):
    root = tmp_path / "g"
    (root / "good").mkdir(parents=True)
    Image.new("L", (W, H), 128).save(root / "good/l.png")
    Image.fromarray(np.full((H, W), 257 * 128, np.uint16)).save(root / "good/i16.png")
    ds = open_dataset("folder", root, image_size=8)
    a, b = ds[0].image, ds[1].image
    assert a.shape == b.shape == (3, 8, 8) and torch.allclose(a, b)
    exp = torch.tensor([(128 / 255 - m) / s for m, s in zip(OPENAI_MEAN, OPENAI_STD)])
    assert torch.allclose(a[:, 0, 0], exp, atol=1e-6)


def test_read_mask_any_nonzero(tmp_path):
    _mask(tmp_path / "m.png", BOX_A, value=1)
    assert np.array_equal(read_mask(tmp_path / "m.png"), _box_mask(BOX_A))
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[2:6, 2:6, 2] = 3  # only the blue channel set
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(read_mask(tmp_path / "rgb.png"), _box_mask(BOX_A))


# --------------------------------------------------------------------------------------------
# bad input: clear errors naming the files
# --------------------------------------------------------------------------------------------


def test_truncated_image_raises_dataset_error(tmp_path):
    root = make_folder(tmp_path / "f", masks=False)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "good/trunc.png")
    data = (root / "good/trunc.png").read_bytes()
    (root / "good/trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="trunc.png"):
        read_image(root / "good/trunc.png")
    ds = open_dataset("folder", root)
    i = [k for k, r in enumerate(ds.records) if r.image_path.name == "trunc.png"][0]
    with pytest.raises(DatasetError, match="trunc.png"):
        ds[i]


def test_garbage_and_missing_image(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match="junk.png"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(DatasetError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DatasetError, match="junk.png"):
        read_mask(tmp_path / "junk.png")


def test_mask_size_mismatch_names_both_files(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    _mask(root / "wood/ground_truth/scratch/000_mask.png", BOX_A, size=(16, 16))
    ds = open_dataset("mvtec", root, classes="wood")
    i = [k for k, r in enumerate(ds.records) if r.label == 1][0]
    with pytest.raises(DatasetError) as e:
        ds[i]
    msg = str(e.value)
    assert "000_mask.png" in msg and "scratch/000.png" in msg and "16x16" in msg and f"{W}x{H}" in msg


def test_anomalous_image_without_mask_fails_at_scan(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    (root / "wood/ground_truth/scratch/000_mask.png").unlink()
    with pytest.raises(DatasetError) as e:
        open_dataset("mvtec", root)
    msg = str(e.value)
    assert "wood/test/scratch/000.png" in msg and "000_mask" in msg
    # missing ground_truth folder for a defect type
    _img(root / "bottle/test/dent/000.png")
    with pytest.raises(DatasetError, match="dent"):
        open_dataset("mvtec", root, classes="bottle")


def test_folder_bad_image_without_mask(tmp_path):
    root = make_folder(tmp_path / "f")
    (root / "masks/y_mask.png").unlink()
    with pytest.raises(DatasetError, match="y.bmp"):
        open_dataset("folder", root)


def test_ambiguous_masks(tmp_path):
    root = make_btad(tmp_path / "btad")
    _mask(root / "01/ground_truth/ko/0000.bmp", BOX_A, fmt="BMP")  # 0000.png exists too
    with pytest.raises(DatasetError, match="ambiguous"):
        open_dataset("btad", root)


def test_empty_class_warns_or_errors(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    (root / "empty_cls/test/good").mkdir(parents=True)
    with pytest.warns(DatasetWarning, match="empty_cls"):
        ds = open_dataset("mvtec", root)
    assert ds.class_names == ["bottle", "wood"]
    with pytest.raises(DatasetError, match="empty_cls"):
        open_dataset("mvtec", root, classes=["bottle", "empty_cls"])


def test_missing_root_unknown_kind_unknown_class(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(DatasetError) as e:
        open_dataset("mvtec", missing)
    assert str(missing) in str(e.value) and "ground_truth" in str(e.value)
    with pytest.raises(DatasetError, match="ensure_synthetic"):
        open_dataset("synthetic", missing)
    with pytest.raises(DatasetError) as e:
        open_dataset("imagenet", tmp_path)
    assert all(k in str(e.value) for k in DATASET_KINDS)
    root = make_mvtec(tmp_path / "ds")
    with pytest.raises(DatasetError) as e:
        open_dataset("mvtec", root, classes="zipper")
    assert "zipper" in str(e.value) and "bottle" in str(e.value) and "wood" in str(e.value)
    with pytest.raises(DatasetError, match="1cls.csv"):
        open_dataset("visa", root)
    with pytest.raises(DatasetError, match="single class folder"):
        open_dataset("mvtec", root / "bottle")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no 'test' images"):
        open_dataset("mvtec", empty)
    with pytest.raises(DatasetError, match="good/"):
        open_dataset("folder", empty)


def test_visa_bad_rows(tmp_path):
    root = make_visa(tmp_path / "visa")
    csv = root / "split_csv/1cls.csv"
    lines = csv.read_text().splitlines()
    lines.append("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/404.png")
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="404.png"):
        open_dataset("visa", root)
    csv.write_text("object,split,image\n")
    with pytest.raises(DatasetError, match="label"):
        open_dataset("visa", root)


def test_nonsquare_outputs_never_reach_torch_unchecked(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    ds = open_dataset("mvtec", root, transform=None)
    s = ds[0]
    assert s.image.shape == (3, H, W) and s.mask.shape == (H, W)
    assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0


# --------------------------------------------------------------------------------------------
# synthetic dataset
# --------------------------------------------------------------------------------------------

SMALL = dict(categories=["carpet", "screw", "widget2"], n_train_good=1, n_test_good=1,
             n_test_defect_per_kind=1, image_size=64, progress=False)


def test_synthetic_categories_cover_textures_objects_and_made_up_names():
    cats = synthetic.CATEGORIES
    assert len(cats) >= 6
    assert {c.kind for c in cats.values()} == {"texture", "object"}
    assert all(len(c.defects) >= 3 for c in cats.values())
    assert any(any(ch.isdigit() for ch in name) for name in cats)  # e.g. "widget2"
    assert {"bottle", "screw", "wood"} <= set(cats)


def test_synthetic_deterministic(tmp_path):
    a = synthetic.generate(tmp_path / "a", seed=3, **SMALL)
    b = synthetic.generate(tmp_path / "b", seed=3, **SMALL)
    c = synthetic.generate(tmp_path / "c", seed=4, **SMALL)
    ha, hb, hc = _files_hash(a), _files_hash(b), _files_hash(c)
    assert ha == hb
    assert set(ha) == set(hc)
    png = [k for k in ha if k.endswith(".png")]
    assert sum(ha[k] != hc[k] for k in png) >= len(png) // 2
    assert "meta.json" in ha and "carpet/ground_truth/hole/000_mask.png" in ha


@pytest.mark.parametrize("category", list(synthetic.CATEGORIES))
def test_synthetic_masks_are_exactly_the_altered_pixels(category):
    for defect in synthetic.CATEGORIES[category].defects:
        for index in range(2):
            s = synthetic.render_sample(category, defect, index, seed=0, image_size=128)
            assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
            assert s.mask.dtype == bool and s.mask.sum() >= 6
            assert np.array_equal(s.image[~s.mask], s.good[~s.mask])
            diff = np.abs(s.image.astype(int) - s.good.astype(int)).max(axis=-1)
            assert (diff[s.mask] >= synthetic.MIN_DELTA).all()
        # random placement: two indices give different defects
        m0 = synthetic.render_sample(category, defect, 0).mask
        m1 = synthetic.render_sample(category, defect, 1).mask
        assert not np.array_equal(m0, m1)
    g = synthetic.render_sample(category, "good", 0)
    assert not g.mask.any() and np.array_equal(g.image, g.good)


def test_synthetic_tree_opens_with_every_reader(tmp_path):
    root = synthetic.generate(tmp_path / "syn", seed=0, **SMALL)
    ds = open_dataset("synthetic", root, image_size=96)  # upscaling, as 256 -> 518 does
    assert ds.class_names == ["carpet", "screw", "widget2"]
    assert len(ds) == 3 * (1 + 3)
    via_meta = open_dataset("meta_json", root)
    assert via_meta.records == ds.records
    assert open_dataset("mvtec", root).records == ds.records
    assert len(open_dataset("synthetic", root, split="train")) == 3
    batch = next(iter(DataLoader(ds, batch_size=len(ds), collate_fn=collate_samples)))
    anomalous = batch.masks[batch.labels == 1]
    assert anomalous.flatten(1).any(1).all()  # every anomalous mask survives the resize
    assert not batch.masks[batch.labels == 0].any()


def test_synthetic_default_size_and_ensure(tmp_path):
    root = tmp_path / "data" / "synthetic"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ensure_synthetic(root, progress=False)
    assert out == root
    ds = open_dataset("synthetic", root)
    assert len(ds.class_names) == len(synthetic.CATEGORIES) >= 6
    n_images = len(ds) + len(open_dataset("synthetic", root, split="train"))
    assert 150 <= n_images <= 500
    first = (root / "meta.json").stat().st_mtime_ns
    assert ensure_synthetic(root, progress=False) == root  # present: not regenerated
    assert (root / "meta.json").stat().st_mtime_ns == first
    other = tmp_path / "user_data"
    (other / "x").mkdir(parents=True)
    with pytest.raises(DatasetError, match="refusing"):
        ensure_synthetic(other, progress=False)
    with pytest.raises(DatasetError, match="refusing"):
        synthetic.generate(other, progress=False)
    assert synthetic.DEFAULT_ROOT.parts[-2:] == ("data", "synthetic")


def test_meta_json_bad_values_name_the_entry(tmp_path):
    import json

    from zsadlib.data import DatasetError, open_dataset

    (tmp_path / "a.png").write_bytes(b"")
    for entry, needle in (({"img_path": "a.png", "anomaly": None}, "'anomaly' must be 0 or 1"),
                          ({"img_path": "a.png", "anomaly": "yes"}, "'anomaly' must be 0 or 1"),
                          ({"img_path": 5, "anomaly": 0}, "'img_path' must be")):
        (tmp_path / "meta.json").write_text(json.dumps({"train": {}, "test": {"part": [entry]}}))
        with pytest.raises(DatasetError, match=needle) as error:
            open_dataset("meta_json", tmp_path)
        assert "meta.json" in str(error.value) and "[0]" in str(error.value)


def test_ensure_synthetic_can_keep_a_tree_made_with_other_parameters(tmp_path):
    from zsadlib.data.synthetic import ensure_synthetic

    root = ensure_synthetic(tmp_path / "s", categories=["pill"], image_size=64, n_train_good=0, n_test_good=1,
                            n_test_defect_per_kind=1, progress=False)
    marker = (root / "synthetic.json").read_text()
    assert ensure_synthetic(root, reuse_existing=True, progress=False) == root
    assert (root / "synthetic.json").read_text() == marker  # kept, not regenerated with the defaults
