"""Datasets for zero-shot anomaly detection: adapters, transforms, the synthetic set.

Typical use::

    from torch.utils.data import DataLoader
    from zsadlib.data import open_dataset, collate_samples

    ds = open_dataset("mvtec", "/data/mvtec", split="test", image_size=518)
    loader = DataLoader(ds, batch_size=8, collate_fn=collate_samples)
    for batch in loader:          # batch.images [B, 3, 518, 518], batch.masks [B, 518, 518]
        ...

Layouts, the meta.json format and the bad-input policy are documented in ``data/README.md``.
"""

from . import meta_json, synthetic, transforms
from .adapters import DATASET_KINDS, open_dataset, scan_folder, scan_mvtec_like, scan_visa
from .benchmarks import IMAGE_ONLY_KINDS, PIXEL_ONLY_KINDS, metric_levels, scan_dagm
from .base import (
    IMAGE_EXTENSIONS,
    AnomalyDataset,
    Batch,
    DatasetError,
    DatasetWarning,
    Record,
    Sample,
    collate_samples,
    read_image,
    read_mask,
)
from .meta_json import read_meta_json, write_meta_json
from .synthetic import ensure_synthetic
from .transforms import OPENAI_MEAN, OPENAI_STD, ImageTransform, MaskTransform, denormalize

__all__ = [
    "DATASET_KINDS",
    "IMAGE_EXTENSIONS",
    "IMAGE_ONLY_KINDS",
    "PIXEL_ONLY_KINDS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "AnomalyDataset",
    "Batch",
    "DatasetError",
    "DatasetWarning",
    "ImageTransform",
    "MaskTransform",
    "Record",
    "Sample",
    "collate_samples",
    "denormalize",
    "ensure_synthetic",
    "meta_json",
    "metric_levels",
    "open_dataset",
    "read_image",
    "read_mask",
    "read_meta_json",
    "scan_dagm",
    "scan_folder",
    "scan_mvtec_like",
    "scan_visa",
    "synthetic",
    "transforms",
    "write_meta_json",
]
