"""Compute kernels shared by the ZSAD methods.

Every function here is batched, device-agnostic torch (it runs wherever its inputs live), has no Python loop
over pixels or patches, and is tested against a plain implementation (numpy / scipy / explicit loops) in
``tests/test_ops.py``.

Shapes use: ``B`` batch, ``N`` patches (``h * w``), ``C`` text classes (2: normal, anomalous), ``D`` joint
embedding width, ``M`` windows, ``K`` patches per window, ``L`` layers.

Worked example (one patch, text = [normal, anomalous])::

    >>> import torch
    >>> patch = torch.tensor([[[1.0, 0.0]]])            # [B=1, N=1, D=2]
    >>> text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])   # [C=2, D=2]
    >>> cosine_similarity_maps(patch, text)
    tensor([[[1., 0.]]])
    >>> harmonic_mean(torch.tensor([1.0, 0.5]))           # 2 / (1/1 + 1/0.5)
    tensor(0.6667)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "cosine_similarity_maps",
    "anomaly_probability",
    "layer_anomaly_map",
    "upsample_maps",
    "gaussian_kernel1d",
    "gaussian_blur",
    "harmonic_mean",
    "harmonic_aggregate",
    "sliding_windows",
    "topk_mean",
]


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"size must be an int or (H, W), got {size}")
    return size


# ---------------------------------------------------------------------------------------------------------
# similarity
# ---------------------------------------------------------------------------------------------------------
def cosine_similarity_maps(patch_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch with every text embedding (both are L2-normalised here).

    Args:
        patch_features: [B, N, D].
        text_features: [C, D] (shared by the batch) or [B, C, D] (one set per image).
    Returns:
        [B, N, C].
    """
    if patch_features.ndim != 3:
        raise ValueError(f"patch_features must be [B, N, D], got {tuple(patch_features.shape)}")
    if text_features.ndim not in (2, 3):
        raise ValueError(f"text_features must be [C, D] or [B, C, D], got {tuple(text_features.shape)}")
    patches = F.normalize(patch_features, dim=-1)
    text = F.normalize(text_features.to(patches.dtype), dim=-1)
    if text.ndim == 2:
        return patches @ text.transpose(0, 1)
    if text.shape[0] != patches.shape[0]:
        raise ValueError(f"text_features batch {text.shape[0]} != patch batch {patches.shape[0]}")
    return torch.bmm(patches, text.transpose(1, 2))


def anomaly_probability(
    patch_features: torch.Tensor, text_features: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """softmax over {normal, anomalous} of cos(patch, text) / temperature.

    Args:
        patch_features: [B, N, D] (a global embedding is ``[B, 1, D]``).
        text_features: [2, D] or [B, 2, D], row 0 normal, row 1 anomalous.
        temperature: CLIP-style temperature (0.07 in AnomalyCLIP, Crane and anomalib's WinCLIP).
    Returns:
        [B, N, 2] probabilities (normal, anomalous).
    """
    if text_features.shape[-2] != 2:
        raise ValueError(f"text_features must hold 2 rows (normal, anomalous), got {tuple(text_features.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return (cosine_similarity_maps(patch_features, text_features) / temperature).softmax(dim=-1)


def layer_anomaly_map(probs: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Per-layer anomaly map (p_anomalous + 1 - p_normal) / 2 on the patch grid.

    Args:
        probs: [B, N, 2] from :func:`anomaly_probability`, N = h * w (row-major patches).
        grid: (h, w).
    Returns:
        [B, h, w].
    """
    h, w = (int(g) for g in grid)
    if probs.ndim != 3 or probs.shape[-1] != 2 or probs.shape[1] != h * w:
        raise ValueError(f"probs must be [B, {h * w}, 2] for grid {(h, w)}, got {tuple(probs.shape)}")
    scores = (probs[..., 1] + 1.0 - probs[..., 0]) / 2.0
    return scores.reshape(probs.shape[0], h, w)


# ---------------------------------------------------------------------------------------------------------
# post-processing
# ---------------------------------------------------------------------------------------------------------
def upsample_maps(maps: torch.Tensor, size: int | Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, no antialias), as the reference code does.

    Args:
        maps: [B, h, w] or [B, L, h, w].
        size: output S or (H, W).
        mode: ``"bilinear"`` (default) or ``"nearest"`` (Crane's training maps, ``train.py --interpolation``).
    Returns:
        [B, H, W] or [B, L, H, W] (same dtype as ``maps``; computed in float32 at least).
    """
    size = _as_size(size)
    if maps.ndim not in (3, 4):
        raise ValueError(f"maps must be [B, h, w] or [B, L, h, w], got {tuple(maps.shape)}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"upsampling mode must be 'bilinear' or 'nearest', not {mode!r}")
    work = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
    x = work.unsqueeze(1) if maps.ndim == 3 else work
    out = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) if mode == "bilinear"
           else F.interpolate(x, size=size, mode="nearest"))
    out = out.squeeze(1) if maps.ndim == 3 else out
    return out.to(maps.dtype) if maps.is_floating_point() else out


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``scipy.ndimage.gaussian_filter``: radius ``int(truncate*sigma + 0.5)``.

    Returns:
        [2 * radius + 1].
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def _reflect_indices(length: int, radius: int, device) -> torch.Tensor:
    """Indices of a line padded by ``radius`` on each side in scipy's ``"reflect"`` mode.

    scipy's "reflect" is half-sample symmetric (``d c b a | a b c d | d c b a``), repeated with period
    ``2 * length`` when the radius exceeds the line (torch's "reflect" is scipy's "mirror" and cannot pad
    more than ``length - 1``, hence this index map). Returns [length + 2 * radius].
    """
    positions = torch.arange(-radius, length + radius, device=device)
    period = 2 * length
    folded = torch.remainder(positions, period)
    return torch.where(folded >= length, period - 1 - folded, folded)


def _blur_last_axis(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every line along the last axis of ``x`` [..., n] with a symmetric ``kernel`` [2r+1]."""
    radius = (kernel.numel() - 1) // 2
    shape = x.shape
    lines = x.reshape(-1, 1, shape[-1])
    padded = lines.index_select(-1, _reflect_indices(shape[-1], radius, x.device))
    out = F.conv1d(padded, kernel.view(1, 1, -1))
    return out.reshape(shape)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of each map over its last two axes, matching
    ``scipy.ndimage.gaussian_filter(map, sigma, mode="reflect", truncate=truncate)`` applied per map.

    Args:
        maps: [B, H, W] (any leading dims: [..., H, W]).
        sigma: standard deviation in pixels (4 in the seed papers, 8 in ViP2-CLIP); 0 returns a copy.
        truncate: the kernel radius is ``int(truncate * sigma + 0.5)`` (scipy's rule).
    Returns:
        same shape and dtype as ``maps`` (float16/bfloat16 inputs are blurred in float32).
    """
    if maps.ndim < 2:
        raise ValueError(f"maps must be [..., H, W], got {tuple(maps.shape)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return maps.clone()
    work_dtype = maps.dtype if maps.dtype in (torch.float32, torch.float64) else torch.float32
    x = maps.to(work_dtype)
    kernel = gaussian_kernel1d(sigma, truncate, dtype=work_dtype, device=maps.device)
    x = _blur_last_axis(x, kernel)  # along W
    x = _blur_last_axis(x.transpose(-1, -2), kernel).transpose(-1, -2)  # along H
    return x.contiguous().to(maps.dtype)


# ---------------------------------------------------------------------------------------------------------
# aggregation and pooling
# ---------------------------------------------------------------------------------------------------------
def harmonic_mean(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Harmonic mean ``K / sum(1 / v)`` along ``dim`` for positive values.

    A zero anywhere gives 0 (1/0 = inf), which is the limit and what anomalib's WinCLIP returns.

    Args:
        values: [..., K, ...].
    Returns:
        ``values`` with ``dim`` removed.
    """
    count = values.shape[dim]
    return count / values.reciprocal().sum(dim=dim)


def sliding_windows(grid: Sequence[int], size: int, stride: int = 1, device=None) -> torch.Tensor:
    """Patch indices of every ``size x size`` window sliding over an ``h x w`` patch grid.

    Windows are ordered row-major by their top-left patch; inside a window the patches are row-major. With
    ``stride=1`` there are ``(h - size + 1) * (w - size + 1)`` windows and every patch is covered.

    Example (3 x 3 grid, 2 x 2 windows)::

        >>> sliding_windows((3, 3), 2)
        tensor([[0, 1, 3, 4],
                [1, 2, 4, 5],
                [3, 4, 6, 7],
                [4, 5, 7, 8]])

    Returns:
        LongTensor [M, size * size] of indices into the row-major grid (0 .. h*w - 1).
    """
    h, w = (int(g) for g in grid)
    size, stride = int(size), int(stride)
    if size < 1 or stride < 1:
        raise ValueError(f"window size and stride must be >= 1, got size={size}, stride={stride}")
    if size > h or size > w:
        raise ValueError(f"window size {size} does not fit in the {h} x {w} patch grid")
    tops = torch.arange(0, h - size + 1, stride, device=device)
    lefts = torch.arange(0, w - size + 1, stride, device=device)
    offsets = torch.arange(size, device=device)
    rows = tops.view(-1, 1, 1, 1) + offsets.view(1, 1, -1, 1)  # [Mr, 1, s, 1]
    cols = lefts.view(1, -1, 1, 1) + offsets.view(1, 1, 1, -1)  # [1, Mc, 1, s]
    index = rows * w + cols  # [Mr, Mc, s, s]
    return index.reshape(-1, size * size)


def harmonic_aggregate(window_scores: torch.Tensor, windows: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Per-patch harmonic mean of the scores of all windows that cover the patch (WinCLIP's aggregation).

    Patches covered by no window get 0, and so does a patch covered by a window scoring 0 (anomalib's
    convention: ``nan_to_num`` of the harmonic mean).

    Args:
        window_scores: [B, M] one score per window (positive).
        windows: [M, K] patch indices of each window (e.g. :func:`sliding_windows`).
        grid: (h, w).
    Returns:
        [B, h, w].
    """
    h, w = (int(g) for g in grid)
    if window_scores.ndim != 2 or windows.ndim != 2 or window_scores.shape[1] != windows.shape[0]:
        raise ValueError(
            f"window_scores [B, M] and windows [M, K] do not fit: {tuple(window_scores.shape)}, {tuple(windows.shape)}"
        )
    batch, _ = window_scores.shape
    windows = windows.to(window_scores.device).long()
    per_slot = window_scores.reciprocal().unsqueeze(-1).expand(-1, -1, windows.shape[1])  # [B, M, K]
    flat_index = windows.reshape(-1)
    inverse_sum = window_scores.new_zeros(batch, h * w).index_add_(1, flat_index, per_slot.reshape(batch, -1))
    counts = torch.bincount(flat_index, minlength=h * w).to(window_scores.dtype)  # [N]
    aggregated = (counts / inverse_sum).nan_to_num(nan=0.0, posinf=0.0)
    return aggregated.reshape(batch, h, w)


def topk_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest values of each row.

    Args:
        x: [B, N].
        k: 1 <= k <= N.
    Returns:
        [B].
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [B, N], got {tuple(x.shape)}")
    if not 1 <= int(k) <= x.shape[1]:
        raise ValueError(f"k must be in 1..{x.shape[1]}, got {k}")
    return x.topk(int(k), dim=-1).values.mean(dim=-1)


def layer_maps(probabilities: Sequence[torch.Tensor], grid: Sequence[int], size: int | Sequence[int]) -> torch.Tensor:
    """Per-layer anomaly maps at image size from per-layer patch probabilities.

    Args:
        probabilities: L tensors [B, N, 2] (softmax over {normal, anomalous}), N = h * w.
        grid: (h, w); size: output S or (H, W).
    Returns:
        [B, L, H, W]: (p_anomalous + 1 - p_normal) / 2 per layer, upsampled bilinearly.
    """
    return upsample_maps(torch.stack([layer_anomaly_map(p, grid) for p in probabilities], dim=1), size)


def fuse_layers(maps: torch.Tensor, fusion: str = "sum") -> torch.Tensor:
    """[B, L, H, W] -> [B, H, W]: ``"sum"`` (AnomalyCLIP test.py) or ``"mean"`` over layers."""
    if fusion == "sum":
        return maps.sum(dim=1)
    if fusion == "mean":
        return maps.mean(dim=1)
    raise ValueError(f"layer fusion must be 'sum' or 'mean', not {fusion!r}")


def pixel_probabilities(probabilities: torch.Tensor, grid: Sequence[int], size: int | Sequence[int],
                        mode: str = "bilinear") -> torch.Tensor:
    """Patch probabilities [B, N, 2] -> [B, 2, H, W] upsampled (bilinear, or ``"nearest"``): the reference's
    similarity map."""
    batch = probabilities.shape[0]
    return upsample_maps(probabilities.transpose(1, 2).reshape(batch, 2, *grid), size, mode)
