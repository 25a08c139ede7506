"""Training losses of the learned ZSAD methods: focal and dice on anomaly maps, cross-entropy on image scores.

The seed papers' code (APRIL-GAN ``loss.py``, AnomalyCLIP ``loss.py``; both take their focal loss from
Hsuxu/Loss_ToolBox-PyTorch) defines the two pixel losses; what was checked there and reproduced here:

Focal loss (``FocalLoss()`` with its defaults: ``gamma=2``, ``alpha=None``, ``smooth=1e-5``, mean reduction)
    on *probabilities* (the maps are already softmaxed; ``apply_nonlin`` is None in both repos):

    * every pixel is one row ``p [C]`` with integer target ``t`` (the float mask truncated by ``.long()``);
    * the one-hot target is clamped to ``[smooth / (C - 1), 1 - smooth]`` (label smoothing), so
      ``pt = sum_c onehot_c * p_c + smooth`` (the smooth is added once more; ``pt`` stays <= 1 when p sums to 1);
    * ``loss = -alpha_t * (1 - pt) ** gamma * log(pt)``, mean over all B*H*W pixels;
    * ``alpha``: None -> 1 for every class; a list -> normalised to sum 1, indexed by the target class; a float
      -> ``alpha`` for class ``balance_index`` and ``1 - alpha`` for the others.

Binary dice loss (``BinaryDiceLoss``), per sample then averaged over the batch, smoothing 1 in numerator and
    denominator: ``1 - mean_b (2 sum(p*t) + 1) / (sum(p) + sum(t) + 1)``. A perfect binary prediction gives 0,
    and so does an all-zero prediction of an empty mask.

Image loss: AnomalyCLIP calls ``F.cross_entropy(logits, label)`` on the image logits
(``cos(image, text) / 0.07``); :func:`image_cross_entropy` is that (mean over the batch).

Worked example::

    >>> import torch
    >>> target = torch.tensor([[[0, 1]]])                                  # [B=1, H=1, W=2]
    >>> perfect = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])             # [B, C=2, H, W]
    >>> float(dice_loss(perfect[:, 1], target))
    0.0
    >>> focal_loss(perfect, target) < focal_loss(perfect.flip(1), target)
    tensor(True)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["focal_loss", "dice_loss", "image_cross_entropy"]


def _class_weights(alpha, num_classes: int, balance_index: int, device, dtype) -> torch.Tensor:
    """Per-class focal weights [C] following the reference's three alpha conventions."""
    if alpha is None:
        return torch.ones(num_classes, device=device, dtype=dtype)
    if isinstance(alpha, bool):
        raise TypeError("alpha must be None, a float, or a sequence of per-class weights")
    if isinstance(alpha, (int, float)):
        if not 0 <= balance_index < num_classes:
            raise ValueError(f"balance_index {balance_index} out of range for {num_classes} classes")
        weights = torch.full((num_classes,), 1.0 - float(alpha), device=device, dtype=dtype)
        weights[balance_index] = float(alpha)
        return weights
    weights = torch.as_tensor(alpha, dtype=dtype, device=device).reshape(-1)
    if weights.numel() != num_classes:
        raise ValueError(f"alpha has {weights.numel()} weights for {num_classes} classes")
    return weights / weights.sum()


def focal_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | torch.Tensor | None = None,
    smooth: float = 1e-5,
    balance_index: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Focal loss on class probabilities, as APRIL-GAN / AnomalyCLIP compute it.

    Args:
        probs: [B, C, H, W] (or [N, C]) probabilities, already softmaxed over C.
        target: [B, H, W] (or [N]) class index per pixel: long, bool, or a float mask (truncated like
            the reference's ``.long()``, so binarise float masks first).
        gamma: focusing exponent (2 in the reference).
        alpha: class weights: None (all 1), a float (``alpha`` for ``balance_index``, ``1 - alpha`` for the
            rest), or one weight per class (normalised to sum 1).
        smooth: label smoothing of the one-hot target and the additive term of ``pt`` (1e-5); 0 disables both.
        balance_index: the class a float ``alpha`` applies to.
        reduction: "mean" (reference), "sum" or "none" ([B*H*W] per-pixel losses, pixel order b, h, w).
    Returns:
        scalar (or [N] for reduction="none").
    """
    if probs.ndim < 2:
        raise ValueError(f"probs must be [B, C, H, W] or [N, C], got {tuple(probs.shape)}")
    if not 0 <= smooth <= 1:
        raise ValueError(f"smooth must be in [0, 1], got {smooth}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    num_classes = probs.shape[1]
    if probs.ndim > 2:
        rows = probs.reshape(probs.shape[0], num_classes, -1).transpose(1, 2).reshape(-1, num_classes)
    else:
        rows = probs
    index = target.reshape(-1).long()
    if index.numel() != rows.shape[0]:
        raise ValueError(
            f"target {tuple(target.shape)} does not match probs {tuple(probs.shape)} (one class index per pixel)"
        )
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_classes):
        raise ValueError(f"target class indices must lie in 0..{num_classes - 1}")
    one_hot = F.one_hot(index, num_classes).to(rows.dtype)
    if smooth:
        if num_classes < 2:
            raise ValueError("label smoothing needs at least 2 classes")
        one_hot = one_hot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    pt = (one_hot * rows).sum(dim=1) + smooth
    weights = _class_weights(alpha, num_classes, balance_index, rows.device, rows.dtype)[index]
    loss = -weights * (1.0 - pt).pow(gamma) * pt.log()
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Binary dice loss, per sample then averaged over the batch (the reference ``BinaryDiceLoss``).

    Args:
        pred: [B, H, W] (any [B, ...]) predicted probability of the positive class, in [0, 1].
        target: same shape, 0/1 (bool or float).
        smooth: added to numerator and denominator (1 in the reference).
    Returns:
        scalar ``1 - mean_b (2 sum(p t) + smooth) / (sum p + sum t + smooth)``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if pred.ndim < 1 or pred.shape[0] == 0:
        raise ValueError("dice_loss needs a non-empty batch")
    batch = pred.shape[0]
    p = pred.reshape(batch, -1)
    t = target.reshape(batch, -1).to(p.dtype)
    coefficient = (2.0 * (p * t).sum(dim=1) + smooth) / (p.sum(dim=1) + t.sum(dim=1) + smooth)
    return 1.0 - coefficient.mean()


def image_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of image logits [B, 2] (normal, anomalous) against labels [B] (0/1), mean over the batch."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, C], got {tuple(logits.shape)}")
    if labels.reshape(-1).shape[0] != logits.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    return F.cross_entropy(logits.float(), labels.reshape(-1).long().to(logits.device))


def layer_pixel_losses(pixel_probs: Sequence[torch.Tensor], target: torch.Tensor, gamma: float = 2.0,
                       smooth: float = 1e-5, dice_on_normal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over layers of the focal loss and of the dice terms.

    Args:
        pixel_probs: L tensors [B, 2, H, W] of (normal, anomalous) probabilities at pixel level.
        target: [B, H, W] bool mask (True = anomalous).
        dice_on_normal: add dice(p_normal, 1 - mask) to dice(p_anomalous, mask) (AnomalyCLIP; APRIL-GAN does not).
    Returns:
        (focal_total, dice_total), scalars.
    """
    target_float = target.float()
    focal_total = target_float.new_zeros(())
    dice_total = target_float.new_zeros(())
    for probs in pixel_probs:
        focal_total = focal_total + focal_loss(probs, target, gamma=gamma, smooth=smooth)
        dice_total = dice_total + dice_loss(probs[:, 1], target_float)
        if dice_on_normal:
            dice_total = dice_total + dice_loss(probs[:, 0], 1.0 - target_float)
    return focal_total, dice_total
