"""Core data types: records, samples, batches, the dataset class, and image/mask reading.

Bad-input policy (see ``data/README.md``): every problem with the files on disk surfaces as a
:class:`DatasetError` (a ``ValueError``) whose message names the offending file(s), either when the
tree is scanned (missing root, missing mask, unknown class, empty requested class) or when a sample
is loaded (unreadable/truncated image, mask/image size mismatch). Unusual but valid image modes are
converted by a documented rule in :func:`read_image`.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .transforms import ImageTransform, MaskTransform

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "DatasetWarning",
    "Record",
    "Sample",
    "Batch",
    "AnomalyDataset",
    "collate_samples",
    "read_image",
    "read_mask",
    "image_size_of",
]

#: File extensions (lower case) recognised as images when scanning folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
)


class DatasetError(ValueError):
    """A problem with a dataset on disk; the message names the file or folder involved."""


class DatasetWarning(UserWarning):
    """Something was skipped while scanning (e.g. an empty class folder nobody asked for)."""


# --------------------------------------------------------------------------------------------
# records, samples, batches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One indexed image, found by scanning (no decoding).

    ``mask_path`` is None for normal images and for datasets without pixel annotations.
    ``defect`` is "good" for normal images.
    """

    image_path: Path
    mask_path: Path | None
    label: int
    class_name: str
    defect: str


@dataclass
class Sample:
    """One loaded example.

    image: float32 ``[3, S, S]`` (normalised by the default transform; ``[3, H, W]`` in [0, 1]
        when the dataset was opened with ``transform=None``).
    mask: bool ``[S, S]`` (``[H, W]`` without transform); all False for normal images; None only
        when the dataset has no pixel annotations at all.
    original_size: ``(H, W)`` of the file on disk.
    """

    image: torch.Tensor
    mask: torch.Tensor | None
    label: int
    class_name: str
    defect: str
    path: str
    original_size: tuple[int, int]


@dataclass
class Batch:
    """A collated list of samples.

    images: ``[B, 3, S, S]`` float32; masks: ``[B, S, S]`` bool, or None when any sample has no
    mask; labels: int64 ``[B]``; the rest are python lists of length B.
    """

    images: torch.Tensor
    masks: torch.Tensor | None
    labels: torch.Tensor
    class_names: list[str]
    defects: list[str]
    paths: list[str]
    original_sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """Move the tensors to ``device`` (returns a new Batch)."""
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            masks=None if self.masks is None else self.masks.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            class_names=list(self.class_names),
            defects=list(self.defects),
            paths=list(self.paths),
            original_sizes=list(self.original_sizes),
        )


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """``collate_fn`` for ``torch.utils.data.DataLoader``: list of Sample -> Batch."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    shapes = {tuple(s.image.shape) for s in samples}
    if len(shapes) != 1:
        raise DatasetError(
            f"cannot batch images of different shapes {sorted(shapes)} "
            "(open the dataset with a transform that resizes, e.g. transform='default')"
        )
    masks = None
    if all(s.mask is not None for s in samples):
        masks = torch.stack([s.mask for s in samples])  # type: ignore[misc]
    return Batch(
        images=torch.stack([s.image for s in samples]),
        masks=masks,
        labels=torch.tensor([int(s.label) for s in samples], dtype=torch.long),
        class_names=[s.class_name for s in samples],
        defects=[s.defect for s in samples],
        paths=[s.path for s in samples],
        original_sizes=[tuple(s.original_size) for s in samples],
    )


# --------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------

_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _open_loaded(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path``; any decoding failure -> DatasetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # truncated files raise OSError here (LOAD_TRUNCATED_IMAGES left False)
            # .copy() detaches the pixels from the (about to be closed) file handle
            return im.copy()
    except UnidentifiedImageError as e:
        raise DatasetError(f"cannot read {what} {path}: not a recognised image file") from e
    except _READ_ERRORS as e:
        raise DatasetError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e


def image_size_of(path: Path) -> tuple[int, int]:
    """``(W, H)`` from the file header only (PIL convention); DatasetError if unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError as e:
        raise DatasetError(f"file not found: {path}") from e
    except _READ_ERRORS as e:
        raise DatasetError(f"cannot read image header of {path}: {e}") from e


def _alpha_to_rgb(im: Image.Image, alpha: str) -> Image.Image:
    """RGBA -> RGB by the alpha policy ("drop": ignore alpha; "black": composite on black)."""
    im = im.convert("RGBA")
    if alpha == "drop":
        return im.convert("RGB")
    if alpha == "black":
        arr = np.asarray(im, dtype=np.float32)
        rgb = arr[..., :3] * (arr[..., 3:4] / 255.0)
        return Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")
    raise ValueError(f"unknown alpha policy {alpha!r}; valid: 'drop', 'black'")


def _sixteen_bit_to_rgb(arr: np.ndarray, path: Path) -> Image.Image:
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DatasetError(
            f"cannot convert image {path}: integer values outside the 16-bit range "
            f"[{arr.min()}, {arr.max()}]"
        )
    u8 = np.round(arr / 257.0).astype(np.uint8)  # 65535 -> 255, 257*k -> k
    return Image.fromarray(u8, mode="L").convert("RGB")


def read_image(path: str | Path, alpha: str = "drop") -> Image.Image:
    """Read an image file as a PIL RGB image, or raise :class:`DatasetError` naming the file.

    Mode conversions (documented policy):
        RGB            unchanged.
        L, 1           grey replicated to the three channels.
        P              palette expanded to its RGB colours (with transparency: as RGBA below).
        RGBA, LA, PA   alpha="drop" (default, what the reference's ``convert("RGB")`` does):
                       the alpha channel is ignored; alpha="black": composited on black.
        I;16*, I       16-bit grey scaled to 8 bits by the 16-bit range (``round(v / 257)``),
                       then replicated; "I" (32-bit) is accepted when its values fit 16 bits.
        CMYK, YCbCr... PIL's ``convert("RGB")``.
        F (float)      not supported: DatasetError.
    """
    path = Path(path)
    im = _open_loaded(path, "image")
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("L", "1"):
        return im.convert("L").convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _alpha_to_rgb(im, alpha)
    if mode == "P":
        if "transparency" in im.info:
            return _alpha_to_rgb(im, alpha)
        return im.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_rgb(np.asarray(im), path)
    if mode == "F":
        raise DatasetError(f"cannot convert image {path}: floating-point images (mode F) unsupported")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise DatasetError(f"cannot convert image {path} (mode {mode}) to RGB: {e}") from e


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as a bool array ``[H, W]``: any nonzero pixel is anomalous.

    Colour masks count a pixel when any colour channel is nonzero (alpha is ignored); palette
    masks are judged by their palette colour. Raises :class:`DatasetError` naming the file.
    """
    path = Path(path)
    im = _open_loaded(path, "mask")
    mode = im.mode
    if mode in ("RGBA", "RGBa", "PA", "P"):
        arr = np.asarray(im.convert("RGBA"))[..., :3]
    elif mode in ("LA", "La"):
        arr = np.asarray(im)[..., 0]
    elif mode in ("1", "L", "I", "F", "RGB") or mode.startswith("I;16"):
        arr = np.asarray(im)
    else:
        arr = np.asarray(im.convert("RGB"))
    out = arr != 0
    if out.ndim == 3:
        out = out.any(axis=-1)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------

TransformArg = str | Callable[[Image.Image], torch.Tensor] | None


class AnomalyDataset(torch.utils.data.Dataset):
    """A scanned anomaly-detection dataset: ``records`` plus loading and transforms.

    Args:
        records: the index (see :class:`Record`), usually produced by ``open_dataset``.
        kind: the adapter that produced it (e.g. "mvtec").
        root: dataset root folder.
        split: "test" or "train".
        has_masks: whether the dataset has pixel annotations; when True, normal images get an
            all-False mask and every anomalous record must carry a ``mask_path``; when False,
            ``Sample.mask`` is None. Default: True when any record has a mask.
        image_size: ``S``, used by the default transforms.
        transform: "default" (``ImageTransform(image_size)``), None (float ``[3, H, W]`` in
            [0, 1] at the original size, mask ``[H, W]``), or a callable PIL RGB -> tensor.
        mask_transform: callable bool ``[H, W]`` ndarray -> bool tensor; default
            ``MaskTransform(image_size)`` (or no resize when ``transform=None``).

    ``__getitem__`` returns a :class:`Sample`; use ``collate_fn=collate_samples`` in DataLoaders.
    """

    def __init__(
        self,
        records: Iterable[Record],
        *,
        kind: str,
        root: str | Path,
        split: str = "test",
        has_masks: bool | None = None,
        image_size: int = 518,
        transform: TransformArg = "default",
        mask_transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    ) -> None:
        self.records: list[Record] = list(records)
        self.kind = kind
        self.root = Path(root)
        self.split = split
        self.image_size = int(image_size)
        self.has_masks = (
            any(r.mask_path is not None for r in self.records) if has_masks is None else has_masks
        )
        self.class_names: list[str] = sorted({r.class_name for r in self.records})
        self._transform_arg = transform
        self._mask_transform_arg = mask_transform
        if isinstance(transform, str):
            if transform != "default":
                raise ValueError(f"transform must be 'default', None or a callable, got {transform!r}")
            self.transform: Callable | None = ImageTransform(self.image_size)
        else:
            self.transform = transform
        if mask_transform is not None:
            self.mask_transform: Callable | None = mask_transform
        elif transform is None:
            self.mask_transform = None
        else:
            self.mask_transform = MaskTransform(self.image_size)

    # ---- sizes and summaries -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        n_anom = sum(r.label for r in self.records)
        return (
            f"AnomalyDataset(kind={self.kind!r}, root='{self.root}', split={self.split!r}, "
            f"classes={len(self.class_names)}, images={len(self)}, anomalous={n_anom}, "
            f"masks={self.has_masks})"
        )

    @property
    def labels(self) -> np.ndarray:
        """int64 ``[N]`` image labels (0 normal, 1 anomalous), from the index."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    def class_counts(self) -> dict[str, dict[str, int]]:
        """``{class: {"normal": n0, "anomalous": n1}}`` from the index."""
        out: dict[str, dict[str, int]] = {c: {"normal": 0, "anomalous": 0} for c in self.class_names}
        for r in self.records:
            out[r.class_name]["anomalous" if r.label else "normal"] += 1
        return out

    # ---- loading -----------------------------------------------------------------------
    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        img = read_image(rec.image_path)
        w, h = img.size
        mask_np: np.ndarray | None = None
        if self.has_masks:
            if rec.mask_path is not None and rec.label == 1:
                mw, mh = image_size_of(rec.mask_path)
                if (mw, mh) != (w, h):
                    raise DatasetError(
                        f"mask size {mw}x{mh} (WxH) of {rec.mask_path} differs from image size "
                        f"{w}x{h} of {rec.image_path}"
                    )
                mask_np = read_mask(rec.mask_path)
            elif rec.label == 1:
                raise DatasetError(f"anomalous image {rec.image_path} has no mask")
            else:
                mask_np = np.zeros((h, w), dtype=bool)

        if self.transform is None:
            arr = np.asarray(img, dtype=np.float32) / 255.0
            image = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # [3, H, W]
        else:
            image = self.transform(img)
        mask: torch.Tensor | None = None
        if mask_np is not None:
            if self.mask_transform is None:
                mask = torch.from_numpy(mask_np)
            else:
                mask = self.mask_transform(mask_np)
        return Sample(
            image=image,
            mask=mask,
            label=int(rec.label),
            class_name=rec.class_name,
            defect=rec.defect,
            path=str(rec.image_path),
            original_size=(h, w),
        )

    # ---- subsets -----------------------------------------------------------------------
    def with_records(self, records: Iterable[Record]) -> "AnomalyDataset":
        """A dataset with the same settings over other records."""
        return AnomalyDataset(
            records,
            kind=self.kind,
            root=self.root,
            split=self.split,
            has_masks=self.has_masks,
            image_size=self.image_size,
            transform=self._transform_arg,
            mask_transform=self._mask_transform_arg,
        )

    def subset(
        self,
        classes: str | Sequence[str] | None = None,
        max_per_class: int | None = None,
        seed: int = 0,
    ) -> "AnomalyDataset":
        """A deterministic, roughly balanced subset for smoke runs.

        Per class, up to ``max_per_class`` records: half normal and half anomalous when both
        exist (a short side is topped up from the other), anomalous picks spread round-robin
        over defect types. The same ``seed`` always gives the same subset; records keep their
        original order.
        """
        if classes is not None:
            wanted = [classes] if isinstance(classes, str) else list(classes)
            unknown = [c for c in wanted if c not in self.class_names]
            if unknown:
                raise DatasetError(
                    f"unknown class(es) {unknown} in {self.root}; available: {self.class_names}"
                )
            keep_cls = set(wanted)
        else:
            keep_cls = set(self.class_names)
        if max_per_class is not None and max_per_class < 1:
            raise ValueError("max_per_class must be >= 1")

        by_class: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(self.records):
            if r.class_name in keep_cls:
                by_class[r.class_name].append(i)
        chosen: list[int] = []
        for cls in sorted(by_class):
            idx = by_class[cls]
            if max_per_class is None or len(idx) <= max_per_class:
                chosen.extend(idx)
                continue
            rng = np.random.default_rng([seed, zlib.crc32(cls.encode())])
            normal = [i for i in idx if self.records[i].label == 0]
            normal = [normal[j] for j in rng.permutation(len(normal))]
            by_defect: dict[str, list[int]] = defaultdict(list)
            for i in idx:
                if self.records[i].label == 1:
                    by_defect[self.records[i].defect].append(i)
            for d in by_defect:
                by_defect[d] = [by_defect[d][j] for j in rng.permutation(len(by_defect[d]))]
            anomalous: list[int] = []  # round-robin over defect types
            queues = [by_defect[d] for d in sorted(by_defect)]
            while any(queues):
                for q in queues:
                    if q:
                        anomalous.append(q.pop(0))
            n_norm = min(len(normal), max_per_class // 2)
            n_anom = min(len(anomalous), max_per_class - n_norm)
            n_norm = min(len(normal), max_per_class - n_anom)
            chosen.extend(normal[:n_norm] + anomalous[:n_anom])
        chosen.sort()
        return self.with_records([self.records[i] for i in chosen])
