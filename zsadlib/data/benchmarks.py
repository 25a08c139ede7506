"""Scanners for the other datasets of the seed papers' tables: KSDD, DAGM and the medical sets.

Each reads the folder layout that the reference repositories' index scripts read
(``generate_dataset_json/*.py`` of AnomalyCLIP and Crane); layouts are documented in ``data/README.md``.
Masks are paired with images by name (never by sort order, unlike those scripts).

What each set measures:

* image-label-only (no masks, ``has_masks`` False -> image metrics only): HeadCT, BrainMRI, Br35H;
* all-anomalous with masks (pixel metrics only; the evaluation leaves image metrics out): ISIC,
  CVC-ColonDB, CVC-ClinicDB, Kvasir, Endo, TN3K;
* both: KSDD (KolektorSDD, cut into thirds by AdaCLIP's preprocessing into the MVTec layout) and DAGM.

The medical sets are test-only (the reference scripts read no train images): any other split is an error.
Their class names are the reference scripts' (``CLSNAMES``): "brain", "skin", "colon", "thyroid".
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ._scan import (
    LAYOUTS,
    MaskIndex,
    check_nonempty,
    check_root,
    empty_class,
    list_images,
    list_subdirs,
    select_classes,
    wanted_classes,
)
from .base import DatasetError, Record

__all__ = [
    "IMAGE_ONLY_KINDS",
    "metric_levels",
    "PIXEL_ONLY_KINDS",
    "scan_benchmark",
    "scan_dagm",
    "scan_labelled_folders",
    "scan_image_mask_folders",
]

#: Sets without masks: image-level metrics only.
IMAGE_ONLY_KINDS: tuple[str, ...] = ("headct", "brainmri", "br35h")
#: Sets whose test images are all anomalous: pixel-level metrics only.
PIXEL_ONLY_KINDS: tuple[str, ...] = ("isic", "colondb", "clinicdb", "kvasir", "endo", "tn3k")

# the reference scripts' class names (CLSNAMES) of the one-class medical sets
_CLASS = {"brainmri": "brain", "br35h": "brain", "colondb": "colon", "clinicdb": "colon", "kvasir": "colon",
          "endo": "colon", "tn3k": "thyroid"}
# (image folder, mask folder) relative to the root, for the sets of one image folder and one mask folder
_PAIRED = {"colondb": ("images", "masks"), "clinicdb": ("images", "masks"), "kvasir": ("images", "masks"),
           "tn3k": ("test-image", "test-mask")}
_ISIC_MASK_DIRS = ("ground_truth", "ISBI2016_ISIC_Part1_Test_GroundTruth")
_ISIC_SUFFIXES = ("_Segmentation", "_segmentation", "_mask", "")


def _test_only(kind: str, split: str) -> None:
    if split != "test":
        raise DatasetError(f"{kind} has only a test split (the reference scripts read no train images); "
                           f"got split={split!r}")


# --------------------------------------------------------------------------------------------
# generic scanners
# --------------------------------------------------------------------------------------------


def scan_labelled_folders(folder: Path, class_name: str, normal_dirs: Sequence[str]) -> list[Record]:
    """Image-label-only records from ``<folder>/<label folder>/<image>``: folders named in ``normal_dirs``
    are normal (defect "good"), every other folder is anomalous with the folder's name as defect. No masks."""
    records: list[Record] = []
    for sub in list_subdirs(folder):
        normal = sub.name in normal_dirs
        records += [Record(p, None, 0 if normal else 1, class_name, "good" if normal else sub.name)
                    for p in list_images(sub)]
    return records


def scan_image_mask_folders(
    image_dirs: Sequence[tuple[Path, str]],
    masks: MaskIndex,
    class_name: str,
    normal_dirs: Sequence[str] = ("good",),
) -> list[Record]:
    """Records from ``(folder, defect)`` pairs: images in a folder whose name is in ``normal_dirs`` are normal;
    every other image is anomalous and needs its mask in ``masks`` (DatasetError naming the expected paths)."""
    records: list[Record] = []
    for folder, defect in image_dirs:
        if folder.name in normal_dirs:
            records += [Record(p, None, 0, class_name, "good") for p in list_images(folder)]
        else:
            records += [Record(p, masks.require(p), 1, class_name, defect) for p in list_images(folder)]
    return records


# --------------------------------------------------------------------------------------------
# DAGM 2007
# --------------------------------------------------------------------------------------------


def scan_dagm(root: Path, split: str = "test", classes: str | Sequence[str] | None = None) -> list[Record]:
    """Scan DAGM 2007: ``<root>/Class<k>/{Train,Test}/<name>.PNG``; an image is anomalous (defect "anomaly")
    when ``Label/<name>_label.PNG`` exists beside it, normal otherwise. A label file without its image is an
    error. ``split`` "test"/"train" reads ``Test``/``Train`` (either capitalisation)."""
    kind = "dagm"
    check_root(root, kind)
    requested = wanted_classes(classes)
    selected = select_classes((d.name for d in list_subdirs(root)), requested, root)
    records: list[Record] = []
    for cls in selected:
        split_dir = next((root / cls / name for name in (split.capitalize(), split) if (root / cls / name).is_dir()),
                         root / cls / split.capitalize())
        labels = MaskIndex(split_dir / "Label", suffixes=("_label",))
        images = list_images(split_dir)
        cls_records = []
        for p in images:
            mask = labels.find(p)
            cls_records.append(Record(p, mask, 1 if mask else 0, cls, "anomaly" if mask else "good"))
        used = {r.mask_path for r in cls_records if r.mask_path is not None}
        orphans = [m for found in labels.by_stem.values() for m in found if m not in used]
        if orphans:
            raise DatasetError(f"DAGM label {orphans[0]} has no image {split_dir}/"
                               f"{orphans[0].stem.removesuffix('_label')}.<ext> ({len(orphans)} such labels)")
        if not cls_records:
            empty_class(cls, split_dir, explicit=requested is not None,
                        detail="" if split_dir.is_dir() else " (folder missing)")
            continue
        records += cls_records
    return check_nonempty(records, kind, root, split)


# --------------------------------------------------------------------------------------------
# the medical sets
# --------------------------------------------------------------------------------------------


def _scan_headct(root: Path, split: str, requested: list[str] | None) -> list[Record]:
    """``<root>/<class>/test/{good,<defect>}/*`` (class "brain" in the reference), no masks."""
    records: list[Record] = []
    for cls in select_classes((d.name for d in list_subdirs(root)), requested, root):
        found = scan_labelled_folders(root / cls / split, cls, ("good",))
        if not found:
            empty_class(cls, root / cls / split, explicit=requested is not None)
        records += found
    return records


def _scan_isic(root: Path, split: str, requested: list[str] | None) -> list[Record]:
    """``<root>/<class>/test/<defect>/*`` with masks in ``<root>/<class>/ground_truth/`` (flat, Crane) or
    ``ISBI2016_ISIC_Part1_Test_GroundTruth/`` (AnomalyCLIP), or ``ground_truth/<defect>/`` (AdaCLIP)."""
    records: list[Record] = []
    for cls in select_classes((d.name for d in list_subdirs(root)), requested, root):
        mask_root = next((root / cls / d for d in _ISIC_MASK_DIRS if (root / cls / d).is_dir()),
                         root / cls / _ISIC_MASK_DIRS[0])
        found: list[Record] = []
        for folder in list_subdirs(root / cls / split):
            per_defect = mask_root / folder.name
            masks = MaskIndex(per_defect if per_defect.is_dir() else mask_root, suffixes=_ISIC_SUFFIXES)
            found += scan_image_mask_folders([(folder, folder.name)], masks, cls)
        if not found:
            empty_class(cls, root / cls / split, explicit=requested is not None)
        records += found
    return records


def scan_benchmark(kind: str, root: Path, split: str = "test",
                   classes: str | Sequence[str] | None = None) -> tuple[list[Record], bool]:
    """Scan one of the kinds of this module (except "ksdd", an MVTec layout). Returns ``(records, has_masks)``."""
    check_root(root, kind)
    _test_only(kind, split)
    requested = wanted_classes(classes)
    if kind == "headct":
        return check_nonempty(_scan_headct(root, split, requested), kind, root, split), False
    if kind == "isic":
        return check_nonempty(_scan_isic(root, split, requested), kind, root, split), True
    if kind not in _CLASS:
        raise DatasetError(f"no benchmark scanner for kind {kind!r}")
    cls = _CLASS[kind]
    select_classes([cls], requested, root)
    if kind in ("brainmri", "br35h"):
        sub = {"brainmri": "brain_tumor_dataset", "br35h": "brain"}[kind]
        folder = root / sub if (root / sub).is_dir() else root
        records = scan_labelled_folders(folder, cls, ("no",))
        has_masks = False
    elif kind == "endo":
        mask_dir = root / "masks"
        image_dirs = [(d, d.name) for d in list_subdirs(root) if d.name != "masks"]
        records = scan_image_mask_folders(image_dirs, MaskIndex(mask_dir), cls)
        has_masks = True
    else:
        image_dir, mask_dir = _PAIRED[kind]
        records = scan_image_mask_folders([(root / image_dir, "anomaly")], MaskIndex(root / mask_dir), cls)
        has_masks = True
    if not records:
        raise DatasetError(f"no images found in {kind} dataset {root} (expected layout: {LAYOUTS[kind]})")
    return records, has_masks


def metric_levels(dataset) -> tuple[str, ...]:
    """The metric levels a dataset can define (for ``zsadlib.metrics.compute_table(levels=...)``):
    "image" when it has at least one normal image (image AUROC needs both labels), "pixel" when it has
    masks. HeadCT-like sets give ("image",), ISIC-like all-anomalous sets ("pixel",)."""
    levels = []
    if any(r.label == 0 for r in dataset.records):
        levels.append("image")
    if dataset.has_masks:
        levels.append("pixel")
    return tuple(levels)
