"""Helpers shared by the dataset scanners: listing images, pairing masks by name, class selection."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence

from .base import IMAGE_EXTENSIONS, DatasetError, DatasetWarning, Record

#: One-line layout descriptions, used in error messages and documented in data/README.md.
LAYOUTS: dict[str, str] = {
    "mvtec": "<root>/<class>/{train,test}/<defect|good>/<name>.png with masks "
    "<root>/<class>/ground_truth/<defect>/<name>_mask.png",
    "mpdd": "<root>/<class>/{train,test}/<defect|good>/<name>.png with masks "
    "<root>/<class>/ground_truth/<defect>/<name>_mask.png",
    "dtd_synthetic": "<root>/<class>/{train,test}/<defect|good>/<name>.png with masks "
    "<root>/<class>/ground_truth/<defect>/<name>_mask.png",
    "btad": "<root>/<01|02|03>/{train,test}/{ok,ko}/<name>.bmp|png with masks "
    "<root>/<class>/ground_truth/ko/<name>.png|bmp",
    "visa": "<root>/split_csv/1cls.csv (columns object,split,label,image,mask) with images "
    "<root>/<class>/Data/Images/{Normal,Anomaly}/* and masks <root>/<class>/Data/Masks/Anomaly/*.png",
    "meta_json": '<root>/meta.json = {"train": {...}, "test": {"<class>": [{"img_path", '
    '"mask_path", "cls_name", "specie_name", "anomaly"}]}}, paths relative to <root>',
    "folder": "<root>/good/*, <root>/bad/* (any image extension), optional "
    "<root>/masks/<stem>.* or <root>/masks/<stem>_mask.* for bad images",
    "synthetic": "MVTec layout written by zsadlib.data.synthetic.generate (plus <root>/meta.json)",
    "ksdd": "<root>/<class>/{train,test}/<defect|good>/<name>.png with masks "
    "<root>/<class>/ground_truth/<defect>/<name>_mask.png (class 'electrical commutators')",
    "dagm": "<root>/Class<k>/{Train,Test}/<name>.PNG with masks <root>/Class<k>/{Train,Test}/Label/<name>_label.PNG "
    "(an image is anomalous when it has a label file)",
    "headct": "<root>/<class>/test/{good,<defect>}/<name>.png, no masks (class 'brain')",
    "brainmri": "<root>/brain_tumor_dataset/{no,yes}/<name>.jpg, no masks",
    "br35h": "<root>/{no,yes}/<name>.jpg or <root>/brain/{no,yes}/<name>.jpg, no masks",
    "isic": "<root>/<class>/test/<defect>/<name>.jpg with masks <root>/<class>/ground_truth/<name>_Segmentation.png "
    "(or ISBI2016_ISIC_Part1_Test_GroundTruth/ instead of ground_truth/; class 'skin')",
    "colondb": "<root>/images/<name>.png with masks <root>/masks/<name>.png",
    "clinicdb": "<root>/images/<name>.png with masks <root>/masks/<name>.png",
    "kvasir": "<root>/images/<name>.jpg with masks <root>/masks/<name>.jpg",
    "endo": "<root>/<images folder>/<name>.jpg (any folder but masks/; good/ is normal) with masks <root>/masks/<name>.*",
    "tn3k": "<root>/test-image/<name>.jpg with masks <root>/test-mask/<name>.jpg",
}


def check_root(root: Path, kind: str, hint: str = "") -> None:
    """DatasetError naming ``root`` and the expected layout when it is not a folder."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise DatasetError(
            f"{kind} dataset root {what}: {root} (expected layout: {LAYOUTS[kind]}){hint}"
        )


def is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (no recursion, hidden files skipped), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def list_subdirs(folder: Path) -> list[Path]:
    """Non-hidden subfolders of ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))),
        key=lambda p: p.name,
    )


class MaskIndex:
    """Masks of one folder indexed by file stem; pairs an image with its mask by name.

    For an image ``<stem>.<ext>`` the mask is ``<stem>_mask.<any ext>`` (MVTec convention), else
    ``<stem>.<any ext>`` (BTAD and others); ``suffixes`` sets the candidate endings tried in order
    (DAGM: ``_label``, ISIC: ``_Segmentation``). Two files with the same candidate stem but different
    extensions are ambiguous -> DatasetError. Pairing never depends on sort order.
    """

    def __init__(self, folder: Path, suffixes: Sequence[str] = ("_mask", "")) -> None:
        self.folder = folder
        self.suffixes = tuple(suffixes)
        self.by_stem: dict[str, list[Path]] = {}
        for p in list_images(folder):
            self.by_stem.setdefault(p.stem, []).append(p)

    def expected(self, image: Path) -> str:
        exts = "|".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        return " or ".join(f"{self.folder / (image.stem + suffix)}.<{exts}>" for suffix in self.suffixes)

    def find(self, image: Path) -> Path | None:
        for stem in (image.stem + suffix for suffix in self.suffixes):
            hits = self.by_stem.get(stem)
            if not hits:
                continue
            if len(hits) > 1:
                raise DatasetError(
                    f"ambiguous masks for image {image}: {[str(h) for h in hits]}"
                )
            return hits[0]
        return None

    def require(self, image: Path) -> Path:
        found = self.find(image)
        if found is None:
            where = "" if self.folder.is_dir() else " (mask folder does not exist)"
            raise DatasetError(
                f"no mask for anomalous image {image}: expected {self.expected(image)}{where}"
            )
        return found


def wanted_classes(classes: str | Sequence[str] | None) -> list[str] | None:
    if classes is None:
        return None
    if isinstance(classes, str):
        return [classes]
    out = list(classes)
    if not out:  # an empty selection (e.g. an unset CLI option) means "all classes"
        return None
    if not all(isinstance(c, str) for c in out):
        raise TypeError(f"classes must be a string or a list of strings, got {classes!r}")
    return out


def select_classes(available: Iterable[str], requested: list[str] | None, root: Path) -> list[str]:
    """The classes to scan: all available, or the requested ones (DatasetError if unknown)."""
    available = sorted(set(available))
    if requested is None:
        return available
    unknown = [c for c in requested if c not in available]
    if unknown:
        raise DatasetError(
            f"unknown class(es) {unknown} in {root}; available classes: {available}"
        )
    return sorted(set(requested))


def empty_class(cls: str, where: Path | str, explicit: bool, detail: str = "") -> None:
    """Policy for a class with no images: error if the user asked for it, else warn and skip."""
    msg = f"class {cls!r} has no images in {where}{detail}"
    if explicit:
        raise DatasetError(msg)
    warnings.warn(msg + "; skipped", DatasetWarning, stacklevel=3)


def no_records(kind: str, root: Path, split: str) -> DatasetError:
    return DatasetError(
        f"no {split!r} images found in {kind} dataset {root} (expected layout: {LAYOUTS[kind]})"
    )


def check_nonempty(records: list[Record], kind: str, root: Path, split: str) -> list[Record]:
    if not records:
        raise no_records(kind, root, split)
    return records
