"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic prompt learning for zero-shot anomaly detection.

What the method computes (checked against the authors' code, zqhang/AnomalyCLIP at its latest commit:
``train.py``, ``test.py``, ``train.sh``, ``test.sh``, ``prompt_ensemble.py``, ``AnomalyCLIP_lib/AnomalyCLIP.py``):

1. Text: two learned prompts with no class name, "[ctx x 12] object." (normal) and "[ctx x 12] damaged object."
   (anomalous), plus deep text prompts (4 tokens replacing positions 1..4 at the inputs of text blocks 2..9);
   see :mod:`zsadlib.prompts.learned`. t = normalise(text) [2, D].
2. Vision: the dense V-V dual path on the last ``dpam_layer - 1`` blocks (``DAPM_replace(DPAM_layer=20)``: blocks
   6..24 of ViT-L/14); patch tokens of the tapped layers from the refined path, ``ln_post`` then ``proj``; the
   global token is the original path's class token times ``proj`` *without* ``ln_post``.
3. Per layer: p = softmax(cos(patch, t) / 0.07) [B, N, 2]; map = (p_anomalous + 1 - p_normal) / 2, upsampled
   bilinearly to the input size; maps are **summed** over layers (``test.py``: ``anomaly_map.sum(dim=0)``), then
   blurred with a Gaussian of sigma 4 (``scipy.ndimage.gaussian_filter``).
4. Image score: softmax(cos(global, t) / 0.07)[anomalous].
5. Training loss: for each layer, focal(upsampled 2-channel probabilities, mask) + dice(p_anomalous, mask)
   + dice(p_normal, 1 - mask), summed over layers and multiplied by lambda = 4, plus the cross-entropy of the
   image logits cos(global, t) / 0.07 against the labels. Adam(lr 1e-3, betas (0.5, 0.999)), batch 8, 15 epochs,
   seed 111. Only the prompts are learned; CLIP is frozen (image features are computed without gradients).

Layers: the latest scripts (``train.sh``/``test.sh``, 2025-04) pass ``--features_list 24`` and ``train.py`` sets
``lam = 4``. Before that fix the scripts used layers 6/12/18/24 with lambda 1, but an in-place residual update made
all four taps alias layer 24, so the old loss was 4 x (focal + dice) of layer 24 and the old map 4 x the layer-24
map: the new defaults reproduce the old numbers exactly. The paper's description (layers 6, 12, 18, 24, taps not
aliased) is ``layers=PAPER_LAYERS`` (and ``pixel_loss_weight=1.0`` for the paper's loss without lambda).

Reference quirks kept as fields (defaults reproduce the released code): ``global_ln_post=False`` (the global
feature skips ``ln_post``), ``deep_prompt_fp16_round=True`` (deep prompts ``.half()``-rounded on any device),
``pos_embed_resize="bilinear"`` (run-time bilinear resize of the positional embedding).

Unused reference parameters: ``AnomalyCLIP_PromptLearner`` also creates ``compound_prompt_projections`` (8 Linear
layers 768 -> 896) that no forward uses; they are stored in its checkpoints but are not part of the method, and
:func:`convert_reference_state_dict` drops them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..backbone import Backbone, ImageFeatures
from ..losses import image_cross_entropy, layer_pixel_losses
from ..prompts.learned import ANOMALYCLIP_TEMPLATES, LearnedPromptConfig, LearnedPromptText
from .base import (AnomalyMethod, MethodConfig, MethodError, MethodOutput, check_layers, check_map_settings,
                   check_options, mask_targets, register_method)

__all__ = [
    "AnomalyCLIPConfig",
    "AnomalyCLIP",
    "PAPER_LAYERS",
    "RELEASED_LAYERS",
    "convert_reference_state_dict",
    "dense_from_dpam",
]

RELEASED_LAYERS: tuple[int, ...] = (24,)  # train.sh / test.sh --features_list 24 (latest code)
PAPER_LAYERS: tuple[int, ...] = (6, 12, 18, 24)  # paper, and train.py / test.py argparse defaults


@dataclass
class AnomalyCLIPConfig(MethodConfig):
    """AnomalyCLIP settings; defaults are the latest released code (train.sh / test.sh / train.py / test.py)."""

    backbone: str = "ViT-L-14-336-quickgelu"  # OpenAI CLIP ViT-L/14@336px (AnomalyCLIP_lib.load("ViT-L/14@336px"))
    pretrained: str | None = "openai"  # OpenAI weights
    image_size: int = 518  # --image_size 518: a 37 x 37 patch grid
    pos_embed_resize: str = "bilinear"  # quirk: the reference resizes the positional embedding bilinearly at its
    # first forward (no antialias); "bicubic_antialias" is open_clip's resize
    layers: tuple[int, ...] = RELEASED_LAYERS  # 1-based vision blocks whose patch tokens make maps (and losses):
    # latest train.sh/test.sh use 24 only; the paper's variant is PAPER_LAYERS = (6, 12, 18, 24)
    dpam_layer: int = 20  # DPAM_layer of DAPM_replace: the last dpam_layer - 1 blocks run the dense V-V path
    # (20 -> blocks 6..24 of 24); 1 = no dense path (plain CLIP patch tokens)
    dense_attention: str = "vv"  # refined-path attention: "vv" = softmax(v v^T / sqrt(d)) (AnomalyCLIP's DPAM)
    global_ln_post: bool = False  # quirk: the reference's global feature is class token @ proj without ln_post
    prompt_templates: tuple[str, ...] = ANOMALYCLIP_TEMPLATES  # ("{} object.", "{} damaged object."): normal,
    # anomalous; "{}" is where the learned context goes (prompt_ensemble.py with class name "object")
    n_ctx: int = 12  # learned context tokens per prompt (--n_ctx 12)
    deep_depth: int = 9  # --depth 9: deep text prompts at the inputs of text blocks 2..deep_depth (1 = none)
    deep_length: int = 4  # --t_n_ctx 4: deep tokens per layer, replacing token positions 1..4
    deep_prompt_fp16_round: bool = True  # quirk: deep prompts are used rounded to float16 (.half()), any device
    init_std: float = 0.02  # N(0, 0.02^2) initialisation of all learned tokens (prompt_ensemble.py)
    temperature: float = 0.07  # cos / 0.07 for patches and the global feature (compute_similarity, train.py)
    layer_fusion: str = "sum"  # "sum" over layers (test.py anomaly_map.sum(dim=0)) | "mean"
    blur_sigma: float = 4.0  # Gaussian blur of the fused map in pixels (test.py --sigma 4); 0 = none
    pixel_loss_weight: float = 4.0  # lambda on sum over layers of focal + 2 dice (train.py lam = 4, since
    # 2025-04; 1.0 before and in the paper)
    image_loss_weight: float = 1.0  # weight of the image cross-entropy (train.py: loss + image_loss)
    focal_gamma: float = 2.0  # FocalLoss() default gamma
    lr: float = 1e-3  # Adam learning rate (--learning_rate 0.001)
    betas: tuple[float, float] = (0.5, 0.999)  # Adam betas (train.py)
    epochs: int = 15  # --epoch 15
    batch_size: int = 8  # --batch_size 8
    seed: int = 111  # --seed 111; here it also seeds the prompt initialisation (independent of global RNG)


def dense_from_dpam(dpam_layer: int, num_layers: int) -> int | None:
    """First dense block (1-based) for the reference's ``DPAM_layer``: blocks ``-1 .. -(dpam_layer - 1)`` are
    replaced, i.e. ``num_layers - dpam_layer + 2 .. num_layers``; ``dpam_layer=1`` -> None (no dense path).

    >>> dense_from_dpam(20, 24)
    6
    """
    dpam_layer = int(dpam_layer)
    if dpam_layer < 1 or dpam_layer > num_layers + 1:
        raise MethodError(f"dpam_layer must be in 1..{num_layers + 1} for a {num_layers}-block ViT, got {dpam_layer}")
    if dpam_layer == 1:
        return None
    return num_layers - dpam_layer + 2


def convert_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an ``AnomalyCLIP_PromptLearner`` state dict (the reference checkpoint's ``"prompt_learner"``) to
    :meth:`AnomalyCLIP.learned_state_dict` keys.

    ``ctx_pos`` [1, 1, n_ctx, W] and ``ctx_neg`` -> ``text.context`` [2, n_ctx, W] (normal, anomalous);
    ``compound_prompts_text.{i}`` [n_deep, W] (i = 0 .. depth-2, text blocks 2 .. depth) -> ``text.deep_prompts``.
    Buffers and the unused ``compound_prompt_projections`` are dropped.
    """
    if "prompt_learner" in state and isinstance(state["prompt_learner"], dict):
        state = state["prompt_learner"]
    missing = [key for key in ("ctx_pos", "ctx_neg") if key not in state]
    if missing:
        raise MethodError(f"not an AnomalyCLIP prompt-learner state dict: missing {missing}")
    width = state["ctx_pos"].shape[-1]
    context = torch.cat([state["ctx_pos"].reshape(-1, state["ctx_pos"].shape[-2], width),
                         state["ctx_neg"].reshape(-1, state["ctx_neg"].shape[-2], width)], dim=0)
    out = {"text.context": context.float()}
    deep_keys = sorted((key for key in state if key.startswith("compound_prompts_text.")),
                       key=lambda key: int(key.rsplit(".", 1)[1]))
    if deep_keys:
        out["text.deep_prompts"] = torch.stack([state[key] for key in deep_keys]).float()
    return out


@register_method
class AnomalyCLIP(AnomalyMethod):
    """AnomalyCLIP: ``forward(images [B,3,S,S], class_names ignored) -> MethodOutput``.

    ``extras``: ``"layer_maps"`` [B, L, S, S] per-layer maps (p_anom + 1 - p_normal) / 2 upsampled, before fusion
    and blur; ``"image_probabilities"`` [B, 2]; ``"text_features"`` [2, D] normalised.
    Learned parameters: ``text.context`` [2, n_ctx, W] and ``text.deep_prompts`` [deep_depth - 1, deep_length, W].
    """

    name = "anomalyclip"
    config_class = AnomalyCLIPConfig
    uses_class_names = False  # object-agnostic prompts
    trainable = True
    paper = "AnomalyCLIP (Zhou et al., ICLR 2024)"

    def __init__(self, config: AnomalyCLIPConfig, backbone: Backbone):
        super().__init__(config, backbone)
        self._validate(config, backbone)
        self.layers = tuple(int(layer) for layer in config.layers)
        self.dense_from = dense_from_dpam(config.dpam_layer, backbone.num_layers)
        n_text_layers = len(backbone.model.transformer.resblocks)
        if config.deep_depth < 1 or config.deep_depth > n_text_layers:
            raise MethodError(f"deep_depth must be in 1..{n_text_layers}, got {config.deep_depth}")
        prompt_config = LearnedPromptConfig(
            templates=tuple(config.prompt_templates),
            n_ctx=config.n_ctx,
            deep_layers=tuple(range(2, int(config.deep_depth) + 1)),
            n_deep=config.deep_length,
            deep_prompt_fp16_round=config.deep_prompt_fp16_round,
            init_std=config.init_std,
        )
        generator = torch.Generator().manual_seed(int(config.seed))
        self.text = LearnedPromptText(backbone, prompt_config, generator=generator)

    @staticmethod
    def _validate(config: AnomalyCLIPConfig, backbone: Backbone) -> None:
        if len(config.prompt_templates) != 2:
            raise MethodError(
                f"AnomalyCLIP needs 2 prompt templates (normal, anomalous), got {config.prompt_templates}"
            )
        check_layers(config.layers, backbone)
        check_options(config, dense_attention=("vv", "qkv_sum"), layer_fusion=("sum", "mean"))
        check_map_settings(config)

    # -- pieces ------------------------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """[2, D] normalised text embeddings (normal, anomalous) of the learned prompts (differentiable)."""
        return F.normalize(self.text().float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> ImageFeatures:
        """Frozen-CLIP features (no gradients): dense-path patch tokens at ``layers``, global token."""
        config = self.config
        with torch.no_grad():
            return self.backbone.forward_features(
                images.to(device=self.backbone.device),
                layers=self.layers,
                dense_from=self.dense_from,
                dense_attention=config.dense_attention,
                global_ln_post=config.global_ln_post,
            )

    def image_logits(self, features: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """[B, 2] = cos(global, text) / temperature."""
        global_embedding = F.normalize(features.global_embedding.float(), dim=-1)
        return global_embedding @ text.transpose(0, 1) / self.config.temperature

    def layer_probabilities(self, features: ImageFeatures, text: torch.Tensor) -> list[torch.Tensor]:
        """One [B, N, 2] per layer: softmax(cos(patch, text) / temperature)."""
        return [ops.anomaly_probability(patches.float(), text, self.config.temperature)
                for patches in features.patch_embeddings]

    # -- inference ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> MethodOutput:
        """Args: images [B, 3, S, S]; class_names: ignored (object-agnostic), length-checked when given.
        Returns: scores [B] in [0, 1]; maps [B, S, S] (sum over L layers of maps in [0, 1], blurred)."""
        config = self.config
        if class_names is not None:
            self._class_names(class_names, images.shape[0])
        size = tuple(images.shape[-2:])
        text = self.inference_text(self.text_features)
        features = self.image_features(images)
        image_probabilities = self.image_logits(features, text).softmax(dim=-1)
        layer_maps = ops.layer_maps(self.layer_probabilities(features, text), features.grid_size, size)  # [B,L,S,S]
        maps = ops.fuse_layers(layer_maps, config.layer_fusion)
        if config.blur_sigma > 0:
            maps = ops.gaussian_blur(maps, config.blur_sigma)
        return MethodOutput(
            scores=image_probabilities[:, 1],
            maps=maps,
            extras={"layer_maps": layer_maps, "image_probabilities": image_probabilities, "text_features": text},
        )

    # -- training ----------------------------------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor,
                      class_names: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``pixel_loss_weight * sum_layers [focal + dice(p_anom, mask) + dice(p_normal, 1 - mask)]
        + image_loss_weight * CE(image logits, labels)``.

        Args:
            images: [B, 3, S, S]; masks: [B, S, S] (bool or float, > 0.5 is anomalous) or None (image loss only);
            labels: [B] 0/1; class_names: ignored.
        Returns:
            (loss, parts) with parts ``"image_ce"`` and, with masks, ``"focal"`` and ``"dice"`` (both unweighted
            sums over layers; ``"dice"`` holds both dice terms).
        """
        config = self.config
        text = self.text_features()
        features = self.image_features(images)
        labels = labels.to(self.backbone.device).reshape(-1)
        image_ce = image_cross_entropy(self.image_logits(features, text), labels)
        loss = config.image_loss_weight * image_ce
        parts = {"image_ce": float(image_ce.detach())}
        if masks is None:
            return loss, parts
        target = mask_targets(masks, images, self.backbone.device)
        size, grid = tuple(images.shape[-2:]), features.grid_size
        pixel_probs = [ops.pixel_probabilities(p, grid, size) for p in self.layer_probabilities(features, text)]
        focal_total, dice_total = layer_pixel_losses(pixel_probs, target, gamma=config.focal_gamma)
        loss = loss + config.pixel_loss_weight * (focal_total + dice_total)
        parts.update({"focal": float(focal_total.detach()), "dice": float(dice_total.detach())})
        return loss, parts

    # -- reference checkpoints ---------------------------------------------------------------------------------
    def load_reference_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint written by the authors' ``train.py`` (``{"prompt_learner": state_dict}``, ``.pth``),
        e.g. ``checkpoints/9_12_4_multiscale/epoch_15.pth``; shapes are checked strictly."""
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        self.load_learned_state_dict(convert_reference_state_dict(state), source=str(path))
