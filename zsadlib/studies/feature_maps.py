"""Training-free feature probing (notebook 01): per-layer text-similarity maps, plain vs dense dual path.

For each tapped layer, patch embeddings are compared with two plain prompts (``"normal {name}"`` vs
``"damaged {name}"`` by default), giving the per-layer anomaly map of METHODS.md:
softmax(cos / 0.07) over {normal, anomalous}, map = (p_anomalous + 1 - p_normal) / 2, upsampled bilinearly.
With random (tiny) weights the maps are noise; with real CLIP weights they show why the dense V-V path
is used: plain deep-layer patch tokens are poorly localised.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import ops
from ..backbone import Backbone, WeightsNotFoundError, load_backbone
from ..metrics import compute

__all__ = ["load_backbone_or_tiny", "prompt_pair_embeddings", "layer_similarity_maps", "layer_map_metrics"]


def load_backbone_or_tiny(name: str, pretrained: str | None, image_size: int, device: str = "auto",
                          allow_tiny: bool = True, announce=print, **kwargs) -> Backbone:
    """:func:`load_backbone`, falling back to the tiny random-weight backbone (announced) when weights are missing."""
    try:
        return load_backbone(name, pretrained=pretrained, image_size=image_size, device=device, **kwargs)
    except WeightsNotFoundError as error:
        if not allow_tiny:
            raise
        size = max(14, image_size - image_size % 14)
        announce(f"{error}; falling back to the tiny random-weight backbone at {size}px: outputs mean nothing")
        return load_backbone("tiny", pretrained=None, image_size=size, device=device, **kwargs)


def prompt_pair_embeddings(backbone: Backbone, class_name: str = "object",
                           templates: Sequence[str] = ("normal {}", "damaged {}")) -> torch.Tensor:
    """Normalised text embeddings [2, D] of the (normal, anomalous) prompts for one class name."""
    with torch.inference_mode():
        return backbone.encode_text([t.format(class_name) for t in templates], normalize=True)


@torch.inference_mode()
def layer_similarity_maps(backbone: Backbone, images: torch.Tensor, class_names: Sequence[str] | None = None,
                          layers: Sequence[int] = (6, 12, 18, 24), dense_from: int | None = None,
                          dense_attention: str = "vv", temperature: float = 0.07,
                          batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Per-layer anomaly maps.

    Args:
        images: [B, 3, S, S] normalised (any device; run ``batch_size`` at a time on the backbone's device).
        class_names: B names put in the prompts (default "object").
        layers, dense_from, dense_attention: see :meth:`Backbone.forward_features`.
        progress: a tqdm bar over the batches (``tqdm.auto``: a widget in JupyterLab).
    Returns:
        [B, L, S, S] maps in [0, 1] (on the CPU), one per tapped layer.
    """
    names = list(class_names) if class_names is not None else ["object"] * images.shape[0]
    text_by_name = {name: prompt_pair_embeddings(backbone, name) for name in sorted(set(names))}
    chunks = []
    starts = range(0, images.shape[0], batch_size)  # bounded memory whatever the number of images
    path = "plain" if dense_from is None else dense_attention
    for start in tqdm(starts, desc=f"{path} path: layer maps", unit="batch", disable=not progress):
        chunk = images[start:start + batch_size].to(backbone.device)
        features = backbone.forward_features(chunk, layers=layers, dense_from=dense_from,
                                             dense_attention=dense_attention)
        text = torch.stack([text_by_name[name] for name in names[start:start + batch_size]])  # [b, 2, D]
        per_layer = [ops.layer_anomaly_map(ops.anomaly_probability(patches, text, temperature=temperature),
                                           features.grid_size) for patches in features.patch_embeddings]
        chunks.append(ops.upsample_maps(torch.stack(per_layer, dim=1), tuple(images.shape[-2:])).cpu())
    return torch.cat(chunks)


def layer_map_metrics(maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                      layers: Sequence[int]) -> dict[str, dict[str, float | None]]:
    """Pixel AUROC / AUPRO and image AUROC (max of the map) of each layer's map.

    maps: [B, L, S, S]; masks: [B, S, S] bool; labels: [B]. Returns {layer: {metric: value}}.
    """
    out: dict[str, dict[str, float | None]] = {}
    for index, layer in enumerate(layers):
        layer_maps = maps[:, index].float().cpu()
        scores = layer_maps.flatten(1).amax(dim=1)
        values = compute(labels.cpu(), scores, masks.cpu(), layer_maps, aupro_variants=("mvtec",))
        out[str(layer)] = {key: (None if np.isnan(values[key]) else round(float(values[key]), 6))
                           for key in ("pixel_auroc", "aupro_mvtec", "image_auroc")}
    return out
