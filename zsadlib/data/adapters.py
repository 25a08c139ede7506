"""Dataset adapters: scan a dataset tree into Records, and :func:`open_dataset`.

Every scanner is cheap (directory listings and ``stat`` calls, no image decoding) and pairs
masks with images by name, never by sort order. Layouts are documented in ``data/README.md``.

Empty-class policy: a class folder (or index section) without images for the split is an error
when the class was requested explicitly (``classes=...``), otherwise a :class:`DatasetWarning`
and the class is skipped.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Callable, Sequence

from ._scan import (
    LAYOUTS,
    MaskIndex,
    check_nonempty,
    check_root,
    empty_class,
    is_image_file,
    list_images,
    list_subdirs,
    select_classes,
    wanted_classes,
)
from .base import AnomalyDataset, DatasetError, DatasetWarning, Record, TransformArg
from .benchmarks import scan_benchmark, scan_dagm
from .meta_json import read_meta_json
from .synthetic import DEFAULT_ROOT as SYNTHETIC_ROOT

__all__ = [
    "DATASET_KINDS",
    "open_dataset",
    "scan_mvtec_like",
    "scan_visa",
    "scan_folder",
]

#: Every value accepted by ``open_dataset(kind=...)``.
DATASET_KINDS: tuple[str, ...] = (
    "mvtec",
    "visa",
    "btad",
    "mpdd",
    "dtd_synthetic",
    "ksdd",
    "dagm",
    "headct",
    "brainmri",
    "br35h",
    "isic",
    "colondb",
    "clinicdb",
    "kvasir",
    "endo",
    "tn3k",
    "meta_json",
    "folder",
    "synthetic",
)


# --------------------------------------------------------------------------------------------
# MVTec AD family (MVTec AD, MPDD, DTD-Synthetic, BTAD, our synthetic set)
# --------------------------------------------------------------------------------------------


def scan_mvtec_like(
    root: Path,
    split: str = "test",
    classes: str | Sequence[str] | None = None,
    normal_dirs: Sequence[str] = ("good",),
    kind: str = "mvtec",
) -> list[Record]:
    """Scan ``<root>/<class>/<split>/<defect>/<image>`` with masks in
    ``<root>/<class>/ground_truth/<defect>/``.

    Folders named in ``normal_dirs`` hold normal images (defect recorded as "good"); every
    other folder is a defect type whose images must each have a mask (DatasetError otherwise,
    naming the image and the expected mask paths). Every non-hidden subfolder of the root is a
    class. Records are sorted by class, defect folder, file name.
    """
    check_root(root, kind)
    if (root / "test").is_dir() and ((root / "train").is_dir() or (root / "ground_truth").is_dir()):
        raise DatasetError(
            f"{root} looks like a single class folder (it has test/ and train/ or ground_truth/): "
            f"pass its parent {root.parent} as root and classes={root.name!r}"
        )
    requested = wanted_classes(classes)
    selected = select_classes((d.name for d in list_subdirs(root)), requested, root)
    records: list[Record] = []
    for cls in selected:
        split_dir = root / cls / split
        cls_records: list[Record] = []
        for defect_dir in list_subdirs(split_dir):
            is_normal = defect_dir.name in normal_dirs
            images = list_images(defect_dir)
            if is_normal:
                cls_records += [Record(p, None, 0, cls, "good") for p in images]
                continue
            masks = MaskIndex(root / cls / "ground_truth" / defect_dir.name)
            cls_records += [
                Record(p, masks.require(p), 1, cls, defect_dir.name) for p in images
            ]
        if not cls_records:
            detail = "" if split_dir.is_dir() else " (folder missing)"
            empty_class(cls, split_dir, explicit=requested is not None, detail=detail)
            continue
        records += cls_records
    return check_nonempty(records, kind, root, split)


# --------------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------------

_VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def scan_visa(
    root: Path,
    split: str = "test",
    classes: str | Sequence[str] | None = None,
    csv_path: str | Path = "split_csv/1cls.csv",
) -> list[Record]:
    """Scan VisA through its split csv (columns object,split,label,image,mask; paths relative
    to the root; label "normal" or "anomaly"). Anomalies get defect "anomaly"; every listed
    image and anomaly mask must exist (DatasetError naming the csv line otherwise)."""
    kind = "visa"
    check_root(root, kind)
    csv_file = Path(csv_path)
    if not csv_file.is_absolute():
        csv_file = root / csv_file
    if not csv_file.is_file():
        raise DatasetError(f"VisA split csv not found: {csv_file} (expected layout: {LAYOUTS[kind]})")
    with csv_file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in _VISA_COLUMNS if c not in header]
        if missing:
            raise DatasetError(f"{csv_file}: missing column(s) {missing}; found {header}")
        rows = [
            (line, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None})
            for line, row in enumerate(reader, start=2)
        ]
    requested = wanted_classes(classes)
    selected = select_classes({r["object"] for _, r in rows}, requested, root)
    records: list[Record] = []
    for cls in selected:
        cls_rows = [(n, r) for n, r in rows if r["object"] == cls and r["split"] == split]
        if not cls_rows:
            empty_class(cls, csv_file, explicit=requested is not None, detail=f" for split {split!r}")
            continue
        for line, r in cls_rows:
            where = f"{csv_file}:{line}"
            if r["label"] not in ("normal", "anomaly"):
                raise DatasetError(f"{where}: label must be 'normal' or 'anomaly', got {r['label']!r}")
            img = root / r["image"]
            if not img.is_file():
                raise DatasetError(f"image listed at {where} not found: {img}")
            if r["label"] == "normal":
                records.append(Record(img, None, 0, cls, "good"))
                continue
            if not r["mask"]:
                raise DatasetError(f"no mask for anomalous image {img}: the mask column at {where} is empty")
            mask = root / r["mask"]
            if not mask.is_file():
                raise DatasetError(f"no mask for anomalous image {img}: expected {mask} (listed at {where})")
            records.append(Record(img, mask, 1, cls, "anomaly"))
    records.sort(key=lambda r: (r.class_name, r.label, r.image_path.name))
    return check_nonempty(records, kind, root, split)


# --------------------------------------------------------------------------------------------
# a plain folder of the user's own images
# --------------------------------------------------------------------------------------------


def scan_folder(
    root: Path,
    classes: str | Sequence[str] | None = None,
    class_name: str | None = None,
) -> tuple[list[Record], bool]:
    """Scan ``<root>/good/*`` (normal) and ``<root>/bad/*`` (anomalous, defect "bad") with
    optional masks ``<root>/masks/<stem>_mask.*`` or ``<root>/masks/<stem>.*``.

    One class, named ``class_name`` or the root folder's name. With a ``masks/`` folder every
    bad image needs its mask (DatasetError otherwise); without one the dataset is
    image-label-only. Returns ``(records, has_masks)``; the split argument does not apply.
    """
    kind = "folder"
    check_root(root, kind)
    name = class_name or root.resolve().name
    requested = wanted_classes(classes)
    select_classes([name], requested, root)
    good, bad, mask_dir = root / "good", root / "bad", root / "masks"
    if not good.is_dir() and not bad.is_dir():
        raise DatasetError(
            f"folder dataset {root} has neither good/ nor bad/ (expected layout: {LAYOUTS[kind]})"
        )
    has_masks = mask_dir.is_dir()
    masks = MaskIndex(mask_dir) if has_masks else None
    records = [Record(p, None, 0, name, "good") for p in list_images(good)]
    for p in list_images(bad):
        records.append(Record(p, masks.require(p) if masks else None, 1, name, "bad"))
    nested = [p for folder in (good, bad) if folder.is_dir() for p in sorted(folder.rglob("*"))
              if p.parent != folder and is_image_file(p)]
    if nested:
        warnings.warn(
            f"folder dataset {root}: {len(nested)} images in subfolders of good/ or bad/ are not used (e.g. "
            f"{nested[0]}); only the images directly in good/ and bad/ are read: move them up to include them",
            DatasetWarning, stacklevel=3,
        )
    if not records:
        raise DatasetError(f"folder dataset {root}: no images in {good} or {bad}")
    return records, has_masks


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def open_dataset(
    kind: str,
    root: str | Path | None,
    split: str = "test",
    classes: str | Sequence[str] | None = None,
    image_size: int = 518,
    transform: TransformArg = "default",
    *,
    mask_transform: Callable | None = None,
    class_name: str | None = None,
    meta_path: str | Path | None = None,
    csv_path: str | Path = "split_csv/1cls.csv",
) -> AnomalyDataset:
    """Open a dataset folder as an :class:`AnomalyDataset`.

    Args:
        kind: one of :data:`DATASET_KINDS` ("synthetic" reads the generated MVTec-layout tree;
            ``root=None`` means its default location).
        root: dataset root folder.
        split: "test" or "train" (ignored by kind "folder").
        classes: a class name or list of names to keep (DatasetError listing the available
            classes if one is unknown); None keeps all.
        image_size, transform, mask_transform: see :class:`AnomalyDataset`.
        class_name: kind "folder" only: the class name (default: the folder's name).
        meta_path: kind "meta_json" only: the index file (default ``<root>/meta.json``).
        csv_path: kind "visa" only: the split csv, relative to the root.
    """
    if kind not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASET_KINDS)}")
    if root is None and kind != "synthetic":
        raise DatasetError(f"open_dataset({kind!r}, root=None): a root folder is required")
    has_masks = True
    if kind in ("mvtec", "mpdd", "dtd_synthetic", "ksdd"):
        root = Path(root)  # type: ignore[arg-type]
        records = scan_mvtec_like(root, split, classes, ("good",), kind)
    elif kind == "dagm":
        root = Path(root)  # type: ignore[arg-type]
        records = scan_dagm(root, split, classes)
    elif kind in ("headct", "brainmri", "br35h", "isic", "colondb", "clinicdb", "kvasir", "endo", "tn3k"):
        root = Path(root)  # type: ignore[arg-type]
        records, has_masks = scan_benchmark(kind, root, split, classes)
    elif kind == "btad":
        root = Path(root)  # type: ignore[arg-type]
        records = scan_mvtec_like(root, split, classes, ("ok", "good"), kind)
    elif kind == "synthetic":
        root = Path(root) if root is not None else SYNTHETIC_ROOT
        check_root(
            root,
            kind,
            hint="; create it with `zsad data synth --out <root>` or zsadlib.data.ensure_synthetic(root)",
        )
        records = scan_mvtec_like(root, split, classes, ("good",), kind)
    elif kind == "visa":
        root = Path(root)  # type: ignore[arg-type]
        records = scan_visa(root, split, classes, csv_path)
    elif kind == "meta_json":
        root = Path(root)  # type: ignore[arg-type]
        records, has_masks = read_meta_json(root, split, classes, meta_path)
    else:  # folder
        root = Path(root)  # type: ignore[arg-type]
        records, has_masks = scan_folder(root, classes, class_name)
    return AnomalyDataset(
        records,
        kind=kind,
        root=root,
        split=split,
        has_masks=has_masks,
        image_size=image_size,
        transform=transform,
        mask_transform=mask_transform,
    )
