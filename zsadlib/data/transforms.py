"""Image and mask preprocessing shared by every method.

Reference behaviour (AnomalyCLIP ``utils.get_transform``, also used by Crane and ViP2-CLIP): the
image is resized to a *square* ``(S, S)`` with bicubic interpolation (aspect ratio not preserved),
center-cropped to ``S`` (a no-op after a square resize), converted to RGB, scaled to [0, 1] and
normalised with the OpenAI CLIP mean/std. The mask is binarised (any nonzero pixel), stored as a
0/255 8-bit image, resized to ``(S, S)`` with torchvision's default interpolation for PIL images
(bilinear), center-cropped, scaled to [0, 1] and thresholded at 0.5.

Both transforms work on PIL images and use PIL's own resampling, exactly as torchvision's
``Resize`` does for PIL inputs, so results match the reference pipeline pixel for pixel.

``resize="shorter_side"`` is the aspect-preserving alternative (open_clip's default eval
transform): resize the shorter side to ``S``, then center-crop ``S x S``. Image and mask always use
the same geometry so they stay aligned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "ImageTransform",
    "MaskTransform",
    "denormalize",
    "resize_and_crop",
]

#: OpenAI CLIP normalisation constants (RGB).
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["square", "shorter_side"]

_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _resample(name: str) -> Image.Resampling:
    try:
        return _PIL_INTERPOLATION[name]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {name!r}; valid: {sorted(_PIL_INTERPOLATION)}"
        ) from None


def resize_and_crop(
    img: Image.Image, size: int, resize: ResizeMode, interpolation: str
) -> Image.Image:
    """Resize then center-crop a PIL image to ``size x size``.

    ``resize="square"`` resizes to ``(size, size)`` directly; ``"shorter_side"`` resizes the
    shorter side to ``size`` keeping the aspect ratio (long side truncated to int, as torchvision
    does), then center-crops (crop offset ``round((L - size) / 2)``, as torchvision does).
    """
    resample = _resample(interpolation)
    w, h = img.size
    if resize == "square":
        if (w, h) != (size, size):
            img = img.resize((size, size), resample)
        return img
    if resize != "shorter_side":
        raise ValueError(f"unknown resize mode {resize!r}; valid: 'square', 'shorter_side'")
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


@dataclass(frozen=True)
class ImageTransform:
    """PIL RGB image ``[H, W]`` -> normalised float32 tensor ``[3, S, S]``.

    Fields (defaults reproduce the reference preprocessing):
        image_size: output side ``S`` (518 for ViT-L/14 at a 37x37 patch grid).
        mean, std: per-channel normalisation (OpenAI CLIP).
        interpolation: PIL resampling for the resize ("bicubic" in the reference).
        resize: "square" (reference: resize to (S, S), aspect not kept) or "shorter_side".
    """

    image_size: int = 518
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize: ResizeMode = "square"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = resize_and_crop(img, self.image_size, self.resize, self.interpolation)
        arr = np.asarray(img, dtype=np.float32) / 255.0  # [S, S, 3]
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # [3, S, S]
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        """Plain-JSON description, for recording the preprocessing a run used."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass(frozen=True)
class MaskTransform:
    """Boolean mask ``[H, W]`` (ndarray or PIL) -> bool tensor ``[S, S]``.

    The mask is turned into a 0/255 8-bit image, resized with ``interpolation`` (the reference
    uses torchvision's default for PIL, bilinear), center-cropped with the same geometry as the
    image, scaled to [0, 1], and thresholded: ``value > threshold``.
    """

    image_size: int = 518
    interpolation: str = "bilinear"
    resize: ResizeMode = "square"
    threshold: float = 0.5

    def __call__(self, mask: np.ndarray | Image.Image) -> torch.Tensor:
        if isinstance(mask, Image.Image):
            arr = np.asarray(mask) != 0
            if arr.ndim == 3:
                arr = arr.any(axis=-1)
        else:
            arr = np.asarray(mask) != 0
        if arr.ndim != 2:
            raise ValueError(f"mask must be 2-D [H, W], got shape {arr.shape}")
        img = Image.fromarray(arr.astype(np.uint8) * 255, mode="L")
        img = resize_and_crop(img, self.image_size, self.resize, self.interpolation)
        out = np.asarray(img, dtype=np.float32) / 255.0 > self.threshold  # [S, S]
        return torch.from_numpy(np.ascontiguousarray(out))

    def to_dict(self) -> dict:
        return asdict(self)


def denormalize(
    image: torch.Tensor,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> torch.Tensor:
    """Undo the normalisation for display.

    Args:
        image: ``[3, H, W]`` or ``[B, 3, H, W]`` normalised tensor.
    Returns:
        Same shape, float32 in [0, 1] (clamped). Use ``.permute(1, 2, 0)`` for matplotlib.
    """
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"expected [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
    m = torch.tensor(mean, dtype=torch.float32, device=image.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return (image.float() * s + m).clamp(0.0, 1.0)
