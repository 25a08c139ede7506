"""APRIL-GAN (Chen et al., "A Zero-/Few-Shot Anomaly Classification and Segmentation Method for CVPR 2023
VAND Workshop Challenge"), zero-shot track: frozen CLIP, one learned linear adapter per tapped layer.

What the released code (ByChelsea/VAND-APRIL-GAN: ``model.py``, ``train.py``, ``test.py``,
``prompt_ensemble.py``, ``open_clip/``) computes, and what this module reproduces:

1. Backbone: OpenAI ViT-L/14-336 weights run at 518 px. At a size other than 336 the authors' factory builds the
   model from ``ViT-L-14-336.json``, which has no ``quick_gelu`` flag, so *both towers run with nn.GELU* on
   weights trained with QuickGELU; the positional embedding is resized once at load by open_clip's
   ``resize_pos_embed`` (bicubic, antialias). Hence the defaults ``backbone="ViT-L-14-336"`` (GELU) and
   ``pos_embed_resize="bicubic_antialias"``; ``backbone="ViT-L-14-336-quickgelu"`` is the corrected model.
2. Patch features: the raw residual stream after blocks 6/12/18/24 (no ``ln_post``, no ``proj``), class token
   dropped, each through its own ``nn.Linear(vision_width, embed_dim)`` with bias, then L2-normalised.
3. Text: per class name, prompts = state words x templates. APRIL-GAN's lists differ from WinCLIP's: 7 normal
   states (WinCLIP's), 5 anomalous states (WinCLIP's 4 plus "broken {}"), and 35 templates (CLIP's ImageNet-style
   list plus "there is a {} in the scene." etc.), not the 21/22 of WinCLIP. Every prompt embedding is
   normalised, the group mean normalised again (``normalize_each=True``).
4. Map per layer: logits ``100 * cos(patch, text)`` [B, 2, h, w] are upsampled bilinearly with
   ``align_corners=True`` to the input size, *then* softmaxed over {normal, anomalous}; the anomalous channel
   is summed over the layers (values in [0, n_layers]). No blur.
5. Image score (zero-shot test): ``softmax(100 * cos(g, text))[anomalous]`` with ``g = ln_post(cls) @ proj`` of
   the last block (the adapters do not touch it, so training never changes image scores).
6. Training: ``sum_layers focal(probs, mask) + dice(probs[:, anomalous], mask)`` (no dice on the normal map, no
   image loss), Adam lr 1e-3, betas (0.5, 0.999), batch 8, seed 111; 15 epochs on VisA (to test on MVTec AD),
   3 epochs on MVTec AD (to test on VisA), per ``train.sh``.

Not reproduced: the MVTec-AD training set's mosaic augmentation (``aug_rate=0.2``: with probability 0.2 a
training image is replaced by a 2 x 2 mosaic of random test images of the same class); the text encoding under
CUDA fp16 autocast; the few-shot memory bank (``few_shot.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..backbone import Backbone
from ..losses import dice_loss, layer_pixel_losses
from ..prompts.handcrafted import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATE_SETS, encode_prompt_ensemble
from ..utils import seeded
from .base import (AnomalyMethod, MethodConfig, MethodError, MethodOutput, check_layers, check_map_settings,
                   check_options, mask_targets, register_method)

__all__ = [
    "AprilGANConfig",
    "AprilGAN",
    "APRIL_GAN_NORMAL_STATES",
    "APRIL_GAN_ANOMALOUS_STATES",
    "APRIL_GAN_TEMPLATES",
]

# prompt_ensemble.py of APRIL-GAN: the normal states are WinCLIP's seven, the anomalous ones add "broken {}".
APRIL_GAN_NORMAL_STATES: tuple[str, ...] = NORMAL_STATES
APRIL_GAN_ANOMALOUS_STATES: tuple[str, ...] = (ANOMALOUS_STATES[0], "broken {}") + tuple(ANOMALOUS_STATES[1:])

# The 35 templates of APRIL-GAN, in their order (order does not change the mean; kept for traceability).
APRIL_GAN_TEMPLATES: tuple[str, ...] = tuple(
    f"a {adjective} photo of {article} {{}}." for adjective, article in (
        ("bad", "a"), ("low resolution", "the"), ("bad", "the"), ("cropped", "the"), ("bright", "a"),
        ("dark", "the"),
    )
) + (
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
) + tuple(f"{opening} {article} {{}} in the scene." for opening, article in (
    ("there is", "a"), ("there is", "the"), ("this is", "a"), ("this is", "the"), ("this is", "one"),
))

_TEMPLATE_CHOICES = ("april_gan",) + tuple(TEMPLATE_SETS)
_STATE_CHOICES = ("april_gan", "winclip")


@dataclass
class AprilGANConfig(MethodConfig):
    """APRIL-GAN zero-shot settings; defaults follow the released code (ByChelsea/VAND-APRIL-GAN)."""

    backbone: str = "ViT-L-14-336"  # train.sh --model ViT-L-14-336 --pretrained openai; at 518 px the authors'
    # factory builds it WITHOUT QuickGELU (nn.GELU on QuickGELU weights); "ViT-L-14-336-quickgelu" = corrected
    pretrained: str | None = "openai"  # train.sh --pretrained openai
    image_size: int = 518  # train.sh / test_zero_shot.sh --image_size 518 (37 x 37 patch grid)
    pos_embed_resize: str = "bicubic_antialias"  # open_clip resize_pos_embed at load (bicubic, antialias=True)
    layers: tuple[int, ...] = (6, 12, 18, 24)  # --features_list 6 12 18 24 (1-based blocks)
    adapter_bias: bool = True  # model.py LinearLayer: nn.Linear(width, embed_dim), bias on
    adapter_input: str = "raw"  # "raw": residual-stream patch tokens as the blocks output them (reference,
    # no ln_post); "ln_post": apply the frozen ln_post before the adapter (not in the reference)
    templates: str = "april_gan"  # "april_gan" (their 35) or a zsadlib.prompts TEMPLATE_SETS name
    anomalous_states: str = "april_gan"  # "april_gan" (5, adds "broken {}") | "winclip" (WinCLIP's 4)
    normalize_prompt_embeddings: bool = True  # prompt_ensemble.py normalises each embedding before the mean
    logit_scale: float = 100.0  # 100 * cos for both maps and image score (a temperature of 0.01)
    upsample_align_corners: bool = True  # train.py/test.py F.interpolate(..., align_corners=True)
    softmax_after_upsample: bool = True  # reference upsamples the 2-channel logits, then softmaxes;
    # False: softmax on the patch grid, then upsample the probabilities
    layer_fusion: str = "sum"  # test.py np.sum over layers ("mean" divides by the number of layers)
    blur_sigma: float = 0.0  # no Gaussian blur in the zero-shot test
    image_score: str = "global"  # "global": softmax(100 cos(global, text))[anomalous] (test.py zero-shot);
    # "map_max": max of the anomaly map
    global_ln_post: bool = True  # their VisionTransformer applies ln_post to the pooled class token
    focal_gamma: float = 2.0  # loss.py FocalLoss() default
    focal_smooth: float = 1e-5  # loss.py FocalLoss() default
    dice_on_normal: bool = False  # APRIL-GAN: dice on the anomalous map only (AnomalyCLIP adds dice(normal, 1-mask))
    epochs: int = 15  # train.sh: 15 on VisA (for testing on MVTec AD); 3 when training on MVTec AD for VisA
    batch_size: int = 8  # train.sh --batch_size 8 (an earlier train.sh used 64)
    lr: float = 1e-3  # train.sh / train.py --learning_rate 0.001
    betas: tuple[float, float] = (0.5, 0.999)  # train.py Adam betas
    seed: int = 111  # train.py setup_seed(111); here also seeds the adapters' initialisation


@register_method
class AprilGAN(AnomalyMethod):
    """APRIL-GAN zero-shot: ``forward(images [B,3,S,S], class_names) -> MethodOutput``.

    ``extras``: ``"layer_maps"`` [B, L, S, S] per-layer anomalous probabilities, ``"image_probabilities"``
    [B, 2]. Learned parameters: ``adapters.{i}.weight`` [D, W] (and ``.bias`` [D]), one per tapped layer.
    """

    name = "april_gan"
    config_class = AprilGANConfig
    uses_class_names = True
    trainable = True
    paper = "APRIL-GAN (Chen et al., CVPR 2023 VAND workshop)"

    def __init__(self, config: AprilGANConfig, backbone: Backbone):
        super().__init__(config, backbone)
        self._validate(config, backbone)
        self.layers = tuple(int(layer) for layer in config.layers)
        with seeded(config.seed):  # deterministic init, global RNGs (CPU and CUDA) untouched
            self.adapters = nn.ModuleList(
                nn.Linear(backbone.vision_width, backbone.embed_dim, bias=config.adapter_bias)
                for _ in self.layers
            )
        self.adapters.to(device=backbone.device)

    @staticmethod
    def _validate(config: AprilGANConfig, backbone: Backbone) -> None:
        check_layers(config.layers, backbone)
        check_options(config, adapter_input=("raw", "ln_post"), templates=tuple(_TEMPLATE_CHOICES),
                      anomalous_states=tuple(_STATE_CHOICES), layer_fusion=("sum", "mean"),
                      image_score=("global", "map_max"))
        if config.logit_scale <= 0:
            raise MethodError(f"logit_scale must be > 0, got {config.logit_scale}")
        check_map_settings(config)

    # -- text ------------------------------------------------------------------------------------------------
    def text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """[B, 2, D] (normal, anomalous) ensemble prototypes per image; each class name is encoded once."""
        config = self.config
        templates = APRIL_GAN_TEMPLATES if config.templates == "april_gan" else config.templates
        anomalous = APRIL_GAN_ANOMALOUS_STATES if config.anomalous_states == "april_gan" else ANOMALOUS_STATES
        return self.cached_class_text(class_names, lambda name: encode_prompt_ensemble(
            self.backbone, name, templates=templates, normalize_each=config.normalize_prompt_embeddings,
            normal_states=APRIL_GAN_NORMAL_STATES, anomalous_states=anomalous))

    # -- shared computation ------------------------------------------------------------------------------------
    def _adapted_patches(self, layer_tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Raw tapped tokens [B, 1+N, W] -> adapted, L2-normalised patch features [B, N, D] per layer."""
        out = []
        for adapter, tokens in zip(self.adapters, layer_tokens):
            patches = tokens[:, 1:]
            if self.config.adapter_input == "ln_post":
                patches = self.backbone.visual.ln_post(patches)
            out.append(F.normalize(adapter(patches.to(adapter.weight.dtype)), dim=-1))
        return out

    def _pixel_probabilities(self, patches: torch.Tensor, text: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One layer: patches [B, N, D] (normalised), text [B, 2, D] -> probabilities [B, 2, H, W]."""
        grid_h, grid_w = self.backbone.grid_size
        logits = self.config.logit_scale * ops.cosine_similarity_maps(patches, text)  # [B, N, 2]
        logits = logits.transpose(1, 2).reshape(logits.shape[0], 2, grid_h, grid_w).float()
        align = self.config.upsample_align_corners
        if self.config.softmax_after_upsample:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=align)
            return logits.softmax(dim=1)
        probs = logits.softmax(dim=1)
        return F.interpolate(probs, size=size, mode="bilinear", align_corners=align)

    def _layer_probabilities(self, images: torch.Tensor, class_names: Sequence[str]):
        """(features, text [B,2,D], per-layer probabilities list of [B, 2, S, S])."""
        names = self._class_names(class_names, images.shape[0])
        text = self.text_features(names)
        with torch.no_grad():
            features = self.backbone.forward_features(
                images.to(self.backbone.device), layers=self.layers, global_ln_post=self.config.global_ln_post,
            )
        size = tuple(images.shape[-2:])
        patches = self._adapted_patches(features.layer_tokens)
        probabilities = [self._pixel_probabilities(p, text, size) for p in patches]
        return features, text, probabilities

    # -- forward ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> MethodOutput:
        """Args: images [B, 3, S, S]; class_names: B names (None -> "object").
        Returns: scores [B], maps [B, S, S] (sum over layers of anomalous probabilities: [0, L] by default)."""
        config = self.config
        features, text, probabilities = self._layer_probabilities(images, class_names)
        layer_maps = torch.stack([p[:, 1] for p in probabilities], dim=1)  # [B, L, S, S]
        maps = layer_maps.sum(dim=1) if config.layer_fusion == "sum" else layer_maps.mean(dim=1)
        if config.blur_sigma > 0:
            maps = ops.gaussian_blur(maps, config.blur_sigma)
        image_probabilities = ops.anomaly_probability(
            features.global_embedding[:, None], text, temperature=1.0 / config.logit_scale
        )[:, 0]  # [B, 2]
        if config.image_score == "global":
            scores = image_probabilities[:, 1]
        else:
            scores = maps.flatten(1).max(dim=1).values
        return MethodOutput(scores=scores, maps=maps,
                            extras={"layer_maps": layer_maps, "image_probabilities": image_probabilities})

    # -- training --------------------------------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor,
                      class_names: Sequence[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """``sum over layers [focal(probs, mask) + dice(probs[:, 1], mask)]`` (+ dice(probs[:, 0], 1 - mask) with
        ``dice_on_normal``). images [B,3,S,S], masks [B,S,S] bool. APRIL-GAN has no image loss: its image score
        comes from the frozen global embedding, so it cannot learn from image labels alone."""
        if masks is None:
            raise MethodError(
                "APRIL-GAN learns only from pixel masks (its image score uses the frozen global embedding, which "
                "no learned parameter touches); train it on a dataset with masks"
            )
        config = self.config
        _, _, probabilities = self._layer_probabilities(images, class_names)
        target = mask_targets(masks, images, probabilities[0].device)
        probabilities = [p.float() for p in probabilities]
        focal, dice = layer_pixel_losses(probabilities, target, gamma=config.focal_gamma, smooth=config.focal_smooth,
                                         dice_on_normal=False)
        parts = {"focal": float(focal.detach()), "dice": float(dice.detach())}
        loss = focal + dice
        if config.dice_on_normal:  # our option, reported apart (the released code has no normal-map dice)
            dice_normal = sum(dice_loss(p[:, 0], (~target).float()) for p in probabilities)
            parts["dice_normal"] = float(dice_normal.detach())
            loss = loss + dice_normal
        return loss, parts
