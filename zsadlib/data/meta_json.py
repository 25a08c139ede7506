"""The ``meta.json`` dataset index used by the reference repositories (read and write).

Format (paths relative to the dataset root, "" for a normal image's mask)::

    {"train": {"<class>": [...]},
     "test":  {"<class>": [{"img_path": "bottle/test/broken_large/000.png",
                            "mask_path": "bottle/ground_truth/broken_large/000_mask.png",
                            "cls_name": "bottle", "specie_name": "broken_large",
                            "anomaly": 1}, ...]}}

Reading rules: the class is the entry's ``cls_name`` (the section key when absent); the defect is
"good" for normal entries, else ``specie_name`` (or "anomaly" when empty, as in VisA's index).
A ``mask_path`` that is "" or names a folder means "no mask" (the reference uses a folder to mean
"image-level label only"). A split whose anomalous entries all lack masks is an image-label-only
dataset (``Sample.mask`` None); one where only some lack masks is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from ._scan import check_nonempty, check_root, empty_class, select_classes, wanted_classes
from .base import AnomalyDataset, DatasetError, Record

__all__ = ["write_meta_json", "read_meta_json", "records_to_meta"]

RecordsLike = AnomalyDataset | Sequence[Record]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise DatasetError(
            f"cannot write {path} to meta.json: it is not inside the dataset root {root}"
        ) from None


def records_to_meta(records: Sequence[Record], root: Path) -> dict[str, list[dict]]:
    """Records -> one split section ``{class: [entry, ...]}`` (classes sorted, order kept)."""
    section: dict[str, list[dict]] = {}
    for r in records:
        section.setdefault(r.class_name, []).append(
            {
                "img_path": _relative(r.image_path, root),
                "mask_path": "" if (r.mask_path is None or r.label == 0) else _relative(r.mask_path, root),
                "cls_name": r.class_name,
                "specie_name": r.defect,
                "anomaly": int(r.label),
            }
        )
    return {c: section[c] for c in sorted(section)}


def write_meta_json(
    dataset_or_records: RecordsLike | Mapping[str, RecordsLike],
    root: str | Path,
    path: str | Path | None = None,
    split: str = "test",
) -> Path:
    """Write a reference-format ``meta.json`` and return its path.

    Args:
        dataset_or_records: an AnomalyDataset (written under its own ``split``), a list of
            Records (written under ``split``), or ``{"train": ..., "test": ...}`` of either.
        root: dataset root; every path is written relative to it (DatasetError if outside).
        path: output file, default ``<root>/meta.json``.
    Both "train" and "test" keys are always present (empty when not given). Output is
    deterministic: classes sorted, entries in record order, 4-space indent.
    """
    root = Path(root)
    out = Path(path) if path is not None else root / "meta.json"
    if isinstance(dataset_or_records, Mapping):
        parts = dict(dataset_or_records)
    elif isinstance(dataset_or_records, AnomalyDataset):
        parts = {dataset_or_records.split: dataset_or_records}
    else:
        parts = {split: dataset_or_records}
    meta: dict[str, dict] = {"train": {}, "test": {}}
    for name, part in parts.items():
        records = part.records if isinstance(part, AnomalyDataset) else list(part)
        meta[name] = records_to_meta(records, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta, indent=4) + "\n", encoding="utf-8")
    return out


def read_meta_json(
    root: str | Path,
    split: str = "test",
    classes: str | Sequence[str] | None = None,
    meta_path: str | Path | None = None,
    kind: str = "meta_json",
) -> tuple[list[Record], bool]:
    """Scan a ``meta.json`` index. Returns ``(records, has_masks)``; see the module docstring."""
    root = Path(root)
    check_root(root, kind)
    mpath = Path(meta_path) if meta_path is not None else root / "meta.json"
    if not mpath.is_absolute() and meta_path is not None and not mpath.exists():
        mpath = root / mpath
    if not mpath.is_file():
        raise DatasetError(f"meta.json index not found: {mpath} (dataset root {root})")
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot parse {mpath}: {e}") from e
    if not isinstance(meta, dict) or split not in meta or not isinstance(meta[split], dict):
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise DatasetError(f"{mpath} has no {split!r} section (found: {keys})")
    section: dict = meta[split]
    requested = wanted_classes(classes)
    selected = select_classes(section.keys(), requested, root)

    records: list[Record] = []
    with_mask: list[Path] = []
    without_mask: list[Path] = []
    for key in selected:
        entries = section[key]
        if not entries:
            empty_class(key, f"{mpath} [{split!r}]", explicit=requested is not None)
            continue
        for n, e in enumerate(entries):
            where = f"{mpath} [{split!r}][{key!r}][{n}]"
            if not isinstance(e, dict) or "img_path" not in e or "anomaly" not in e:
                raise DatasetError(f"{where}: entry needs 'img_path' and 'anomaly', got {e!r}")
            if e["anomaly"] not in (0, 1) or isinstance(e["anomaly"], float) and not float(e["anomaly"]).is_integer():
                raise DatasetError(f"{where}: 'anomaly' must be 0 or 1, got {e['anomaly']!r}")
            label = int(e["anomaly"])
            if not isinstance(e["img_path"], str) or not e["img_path"]:
                raise DatasetError(f"{where}: 'img_path' must be a non-empty path string, got {e['img_path']!r}")
            img = root / e["img_path"]
            if not img.is_file():
                raise DatasetError(f"image listed in {where} not found: {img}")
            mask: Path | None = None
            if label == 1:
                mrel = e.get("mask_path") or ""
                if not isinstance(mrel, str):
                    raise DatasetError(f"{where}: 'mask_path' must be a path string, got {mrel!r}")
                if mrel and not (root / mrel).is_dir():
                    mask = root / mrel
                    if not mask.is_file():
                        raise DatasetError(
                            f"mask of anomalous image {img} listed in {where} not found: {mask}"
                        )
                    with_mask.append(img)
                else:
                    without_mask.append(img)
            defect = "good" if label == 0 else (e.get("specie_name") or "anomaly")
            records.append(Record(img, mask, label, str(e.get("cls_name") or key), defect))
    if with_mask and without_mask:
        raise DatasetError(
            f"{mpath}: {len(without_mask)} anomalous image(s) have no mask_path while "
            f"{len(with_mask)} do, e.g. {without_mask[0]} (give every anomalous image a mask, or none)"
        )
    check_nonempty(records, kind, root, split)
    return records, not without_mask
