"""Crane (Salehi et al., 2025, arXiv 2504.11055): context-guided prompt learning and attention refinement.

Checked line by line against the authors' code, AlirezaSalehy/Crane at 39181f9 (``models/Crane.py``,
``models/prompt_ensemble.py``, ``train.py``, ``test.py``, ``test.sh``, ``reproduce.sh``, ``utils/similarity.py``,
``utils/loss.py``), and held equal to it by ``tests/test_crane_reference.py`` (fixtures written by
``python -m tools.reference_fixtures crane --ref PATH``).

What it computes (B images, L tapped entries, N patches, D joint width, W text width):

1. Vision, E-Attn: blocks 6..24 of ViT-L/14 (``replace_with_EAttn(to_layer=20)``: the last ``to_layer - 1`` blocks)
   run a dual path. The original path is unchanged; the refined path adds
   ``out_proj((softmax(q q^T s) + softmax(k k^T s) + softmax(v v^T s)) v)`` with no MLP, q/k/v from ``ln_1`` of
   the ORIGINAL path (``Backbone.forward_features(dense_attention="qkv_sum")``). Patch tokens [B, N, D] come from
   the refined path through ``ln_post`` and ``proj``; the global token [B, D] is the original class token through
   ``ln_post`` and ``proj`` (Crane, unlike AnomalyCLIP, applies ``ln_post``).
2. Text: AnomalyCLIP's learned prompts "[ctx x 12] object." / "[ctx x 12] damaged object." with deep prompts
   (4 tokens replacing positions 1..4 at the inputs of text blocks 2..9), used rounded to float16 as released.
   Training adds *context guidance*: the normalised global image embedding is inserted as one more token right
   after the learned context (``--train_with_img_cls_type pad_suffix``), with probability
   ``--train_with_img_cls_prob`` (1 in train.py) per batch; the released evaluation uses the static prompts.
3. Per entry l: logits_l = cos(patch_l, t) / 0.07 [B, N, 2]. Map (``--soft_mean True``): mean over entries of the
   bilinearly upsampled softmax, anomalous channel; or (``soft_mean False``) the softmax of the mean upsampled
   logits. Gaussian blur sigma 4 (scipy ``gaussian_filter`` in test.py).
4. Image score, score-based pooling: w = softmax(mean_l logits_l)[..., anomalous] [B, N];
   f = normalise(sum_n w_n * mean_l patch_l,n); g = normalise(0.5 f + 0.5 normalise(global));
   score = softmax(g . t / 0.07)[anomalous].
5. Loss (train.py): 2 * sum_l focal(p_l, mask) + 2 * sum_l dice((1 - p_l,normal + p_l,anomalous) / 2, mask)
   + 0.2 * CE(g . t / 0.01, label), with p_l upsampled by *nearest* interpolation (``--interpolation nearest``).
   Adam lr 1e-3, betas (0.6, 0.999), 5 epochs, batch 8, seed 111.

Crane+ (``build_method("crane_plus")`` or ``dattn=True``): a self-supervised ViT (DINOv2 ViT-B/14 with registers)
gives the patch-to-patch cosine similarity S [B, M, M] of its last-layer normed patch tokens; T = 3 (S - 1.2 mean S);
T < 0 -> -inf; A = softmax(T) row-wise, shared by all heads, is applied to the value tokens of the tapped CLIP block
(patch grid bilinearly resized to the DINO grid) and out-projected: D-Attn tokens [B, M, W], no residual. For
every tapped layer the entries are [D-Attn, E-Attn] (``--both_eattn_dattn True``), the E-Attn tokens resized to the
DINO grid when the grids differ.

Quirks of the released code, each a field whose default reproduces it:

* ``aliased_taps=True``: the refined path is updated in place, so every tapped layer is a view of one tensor and
  all taps equal the refined tokens after the last block: the "6, 12, 18, 24" map is the layer-24 map.
  ``False`` taps each layer's own refined tokens.
* ``deep_prompt_fp16_round=True``: deep prompts ``.half()``-rounded before use.
* ``dattn_value_source="mid_block"``: D-Attn reads the tapped block's value tokens from ``ln_1`` of the original
  path AFTER that block's attention residual (the in-place ``x_ori += ...`` has already changed the block input when
  the reference reads it). ``"block_input"`` uses the block input, as the paper describes.
* ``dattn_mean="image"`` is OUR default (a named deviation): the reference takes mean(S) over the whole batch
  (``torch.mean(similarity)``), which makes every image's result depend on the other images in its batch;
  ``"batch"`` reproduces that. At batch size 1 both are the reference.
* ``train_interpolation="nearest"``: training maps are upsampled by nearest neighbour, test maps bilinearly.
* ``train_image_temperature=0.01``: the image cross-entropy uses cos / 0.01, inference cos / 0.07.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..backbone import Backbone, ImageFeatures
from ..losses import dice_loss, focal_loss, image_cross_entropy
from ..prompts.learned import ANOMALYCLIP_TEMPLATES, LearnedPromptConfig, LearnedPromptText
from .anomalyclip import convert_reference_state_dict
from .base import (AnomalyMethod, MethodConfig, MethodError, MethodOutput, check_layers, check_map_settings,
                   check_options, mask_targets, register_method)

__all__ = ["CraneConfig", "CranePlusConfig", "Crane", "CranePlus", "CRANE_PLUS_LAYERS"]

CRANE_LAYERS: tuple[int, ...] = (6, 12, 18, 24)  # reproduce.sh / test.sh --features_list 6 12 18 24 (Crane)
CRANE_PLUS_LAYERS: tuple[int, ...] = (24,)  # reproduce.sh / test.sh --features_list 24 (Crane+)


@dataclass
class CraneConfig(MethodConfig):
    """Crane settings; defaults are the released scripts (reproduce.sh / test.sh / train.py / test.py, 39181f9)."""

    backbone: str = "ViT-L-14-336-quickgelu"  # models.load("ViT-L/14@336px"): OpenAI CLIP ViT-L/14@336, QuickGELU
    pretrained: str | None = "openai"  # OpenAI weights
    image_size: int = 518  # --image_size 518: a 37 x 37 patch grid
    pos_embed_resize: str = "bilinear"  # the reference resizes the positional embedding bilinearly at run time
    layers: tuple[int, ...] = CRANE_LAYERS  # 1-based tapped blocks (--features_list 6 12 18 24 for Crane)
    eattn_to_layer: int = 20  # replace_with_EAttn(to_layer=20): the last to_layer - 1 blocks (6..24 of 24) are dual
    attention: str = "qkv_sum"  # --attn_type qq+kk+vv (E-Attn); "vv" = AnomalyCLIP's V-V attention
    aliased_taps: bool = True  # quirk: every tap is the refined tokens after the last block (in-place update)
    global_ln_post: bool = True  # VisionTransformer.forward: ln_post on the original class token, then proj
    prompt_templates: tuple[str, ...] = ANOMALYCLIP_TEMPLATES  # prompt_ensemble.py: "{}" / "damaged {}" x "object"
    n_ctx: int = 12  # --n_ctx 12 learned context tokens per prompt
    deep_depth: int = 9  # --depth 9: deep text prompts at the inputs of text blocks 2..9
    deep_length: int = 4  # --t_n_ctx 4 deep tokens per layer, replacing positions 1..4
    deep_prompt_fp16_round: bool = True  # quirk: ResidualAttentionBlock_learnable_token casts deep prompts .half()
    init_std: float = 0.02  # nn.init.normal_(std=0.02) of context and deep prompts (prompt_ensemble.py)
    context_guidance: str = "pad_suffix"  # train.py --train_with_img_cls_type pad_suffix: the normalised global
    # image embedding becomes one extra prompt token after the learned context; "none" = static prompts
    context_guidance_prob: float = 1.0  # train.py --train_with_img_cls_prob 1: per-batch probability of guidance
    test_context_guidance: bool = False  # test.py --train_with_img_cls_prob 0: static prompts at inference
    temperature: float = 0.07  # calc_similarity_logits(temp=0.07): patches (train and test), image score at test
    train_image_temperature: float = 0.01  # quirk: train.py image logits use temp=0.01 for the cross-entropy
    layer_fusion: str = "soft_mean"  # --soft_mean True (reproduce.sh/test.sh for Crane): mean of upsampled
    # softmaxes; "logit_mean": softmax of the mean upsampled logits (test.py default, soft_mean False)
    score_pooling: bool = True  # --use_scorebase_pooling True
    pooling_alpha: float = 0.5  # alpha * pooled patch feature + (1 - alpha) * global feature
    blur_sigma: float = 4.0  # test.py --sigma 4 (scipy gaussian_filter per map)
    train_interpolation: str = "nearest"  # quirk: train.py --interpolation nearest for the training maps
    focal_weight: float = 2.0  # train.py ce_focal_loss *= 2
    dice_weight: float = 2.0  # train.py dice_loss *= 2
    image_loss_weight: float = 0.2  # train.py 0.2 * ce_img2txt_loss
    focal_gamma: float = 2.0  # FocalLoss() default
    lr: float = 1e-3  # --learning_rate 0.001
    betas: tuple[float, float] = (0.6, 0.999)  # train.py Adam betas
    epochs: int = 5  # --epoch 5
    batch_size: int = 8  # --batch_size 8
    seed: int = 111  # --seed 111; here it also seeds the prompt initialisation
    # -- Crane+ (D-Attn) ----------------------------------------------------------------------------------------
    dattn: bool = False  # --dino_model none (Crane); True = Crane+ (--dino_model dinov2)
    dino_model: str = "vit_base_patch14_reg4_dinov2.lvd142m"  # torch.hub dinov2_vitb14_reg, through timm
    dino_pretrained: str | None = "lvd142m"  # the timm tag (HF cache, or torch.hub's dinov2_vitb14_reg4_pretrain.pth
    # in its checkpoints folder), a local file (original dinov2 or timm format), or None (random)
    dattn_beta: float = 1.2  # custom_attn beta: T = gamma * (S - beta * mean(S))
    dattn_gamma: float = 3.0  # custom_attn gamma
    dattn_mean: str = "image"  # OUR deviation: mean(S) per image; "batch" = the reference's mean over the batch
    dattn_with_eattn: bool = True  # --both_eattn_dattn True: entries [D-Attn, E-Attn] per tapped layer
    dattn_value_source: str = "mid_block"  # quirk (see module doc); "block_input" as the paper describes
    dattn_empty_rows: str = "nan"  # a patch whose every similarity falls below beta * mean(S) (itself included) has
    # no key left: "nan" = softmax of all -inf, as the reference; "self" = it attends to itself (OUR choice for
    # smoke runs with random DINOv2 weights, whose near-identical tokens empty every row)


@dataclass
class CranePlusConfig(CraneConfig):
    """Crane+: D-Attn on; layer 24 only; ``--soft_mean`` False as test.sh runs the released Crane+ checkpoints on
    MVTec AD / VisA / MPDD / SDD / BTAD / DTD (reproduce.sh and test.sh's DAGM and medical runs use soft_mean True)."""

    layers: tuple[int, ...] = CRANE_PLUS_LAYERS  # --features_list 24
    dattn: bool = True  # --dino_model dinov2
    layer_fusion: str = "logit_mean"  # test.sh (paper checkpoints): no --soft_mean -> False


@dataclass
class CraneFeatures:
    """Per-entry patch features and the global feature, all L2-normalised.

    patches: [L, B, N, D] (L entries: one per tapped layer, or [D-Attn, E-Attn] per layer for Crane+);
    global_embedding: [B, D]; grid: (h, w) of N.
    """

    patches: torch.Tensor
    global_embedding: torch.Tensor
    grid: tuple[int, int]


def dattn_weights(dino_tokens: torch.Tensor, beta: float, gamma: float, mean: str,
                  empty_rows: str = "nan") -> torch.Tensor:
    """D-Attn attention [B, M, M] from DINO patch tokens [B, C, h, w] (M = h * w).

    S = cos(token_i, token_j); T = gamma * (S - beta * mean(S)); T < 0 -> -inf; softmax over j. ``mean``: "image"
    (per image) or "batch" (the reference: one mean over the whole batch). ``empty_rows``: rows with no T >= 0 give
    NaN ("nan", the reference) or attend to their own patch only ("self").
    """
    flat = F.normalize(dino_tokens.flatten(2).float(), dim=1)  # [B, C, M]
    similarity = flat.transpose(1, 2) @ flat  # [B, M, M]
    if mean == "batch":
        centre = similarity.mean()
    else:
        centre = similarity.mean(dim=(1, 2), keepdim=True)
    logits = (similarity - centre * beta) * gamma
    dropped = logits < 0
    if empty_rows == "self":
        empty = dropped.all(dim=-1, keepdim=True)  # [B, M, 1]
        dropped = dropped & ~(empty & torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device))
    return logits.masked_fill(dropped, float("-inf")).softmax(dim=-1)


def resize_tokens(tokens: torch.Tensor, grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """[B, h*w, C] -> [B, h'*w', C], bilinear (align_corners=False) on the patch grid; identity when equal."""
    if tuple(grid) == tuple(new_grid):
        return tokens
    batch, _, channels = tokens.shape
    x = tokens.transpose(1, 2).reshape(batch, channels, *grid)
    x = F.interpolate(x, size=tuple(new_grid), mode="bilinear", align_corners=False)
    return x.reshape(batch, channels, -1).transpose(1, 2)


@register_method
class Crane(AnomalyMethod):
    """Crane: ``forward(images [B,3,S,S], class_names ignored) -> MethodOutput``.

    ``extras``: ``"layer_maps"`` [B, L, S, S] per-entry anomalous probability maps (upsampled, before fusion and
    blur), ``"image_probabilities"`` [B, 2], ``"text_features"`` [2, D] (or [B, 2, D] with test-time guidance),
    ``"entries"`` the names of the L entries (e.g. ``["eattn@24"]`` or ``["dattn@24", "eattn@24"]``).
    Learned parameters: ``text.context`` [2, n_ctx, W], ``text.deep_prompts`` [deep_depth - 1, deep_length, W].
    """

    name = "crane"
    config_class = CraneConfig
    uses_class_names = False  # object-agnostic prompts
    trainable = True
    paper = "Crane (Salehi et al., 2025, arXiv 2504.11055)"

    def __init__(self, config: CraneConfig, backbone: Backbone, dino=None):
        super().__init__(config, backbone)
        self._validate(config, backbone)
        self.layers = tuple(int(layer) for layer in config.layers)
        to_layer = int(config.eattn_to_layer)
        if not 1 <= to_layer <= backbone.num_layers + 1:
            raise MethodError(f"eattn_to_layer must be in 1..{backbone.num_layers + 1}, got {to_layer}")
        self.dense_from = None if to_layer == 1 else backbone.num_layers - to_layer + 2
        if config.aliased_taps and self.dense_from is not None and min(self.layers) < self.dense_from:
            raise MethodError(f"aliased_taps reproduces the reference only for layers in the E-Attn blocks "
                              f"{self.dense_from}..{backbone.num_layers}; got layers {self.layers}")
        n_text_layers = len(backbone.model.transformer.resblocks)
        if not 1 <= config.deep_depth <= n_text_layers:
            raise MethodError(f"deep_depth must be in 1..{n_text_layers}, got {config.deep_depth}")
        prompt_config = LearnedPromptConfig(
            templates=tuple(config.prompt_templates), n_ctx=config.n_ctx,
            deep_layers=tuple(range(2, int(config.deep_depth) + 1)), n_deep=config.deep_length,
            deep_prompt_fp16_round=config.deep_prompt_fp16_round, init_std=config.init_std)
        generator = torch.Generator().manual_seed(int(config.seed))
        self.text = LearnedPromptText(backbone, prompt_config, generator=generator)
        self.__dict__["dino"] = None  # frozen second backbone, not a submodule (kept out of state dicts)
        if config.dattn:
            self.__dict__["dino"] = dino if dino is not None else self._load_dino(config, backbone)

    @staticmethod
    def _validate(config: CraneConfig, backbone: Backbone) -> None:
        if len(config.prompt_templates) != 2:
            raise MethodError(f"Crane needs 2 prompt templates (normal, anomalous), got {config.prompt_templates}")
        check_layers(config.layers, backbone)
        check_options(config, attention=("qkv_sum", "vv"), layer_fusion=("soft_mean", "logit_mean"),
                      context_guidance=("pad_suffix", "none"), train_interpolation=("nearest", "bilinear"),
                      dattn_mean=("image", "batch"), dattn_value_source=("mid_block", "block_input"),
                      dattn_empty_rows=("nan", "self"))
        check_map_settings(config)
        if config.train_image_temperature <= 0:
            raise MethodError(f"train_image_temperature must be > 0, got {config.train_image_temperature}")
        if not 0.0 <= config.context_guidance_prob <= 1.0:
            raise MethodError(f"context_guidance_prob must be in [0, 1], got {config.context_guidance_prob}")
        if config.context_guidance != "none" and backbone.embed_dim != backbone.text_width:
            raise MethodError(f"context guidance puts the image embedding ({backbone.embed_dim}) into the text "
                              f"sequence (width {backbone.text_width}): the widths must agree, or "
                              f"context_guidance='none'")

    @staticmethod
    def _load_dino(config: CraneConfig, backbone: Backbone):
        from ..dino import load_dino

        # the tiny (smoke-run) DINOv2 takes CLIP's patch size, so that any CLIP input size fits it
        extra = {"patch_size": backbone.patch_size} if config.dino_model == "tiny" else {}
        return load_dino(config.dino_model, pretrained=config.dino_pretrained, image_size=backbone.image_size,
                         device=backbone.device, **extra)

    # -- vision --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> CraneFeatures:
        """Frozen features (no gradients): normalised per-entry patch features and global feature."""
        config = self.config
        backbone = self.backbone
        images = images.to(device=backbone.device)
        # aliased taps all hold the refined tokens after the last block (D-Attn still reads each tapped block's input)
        aliased = config.aliased_taps and self.dense_from is not None
        tapped = tuple(sorted(set(self.layers) | {backbone.num_layers})) if aliased else self.layers
        if aliased and not config.dattn:
            tapped = (backbone.num_layers,)
        features = backbone.forward_features(
            images, layers=tapped, dense_from=self.dense_from, dense_attention=config.attention,
            global_ln_post=config.global_ln_post, return_block_inputs=config.dattn)
        by_layer = dict(zip(tapped, features.layer_tokens))
        eattn_tokens = [by_layer[backbone.num_layers if aliased else layer] for layer in self.layers]
        grid = tuple(features.grid_size)
        if not config.dattn:
            entries = [backbone.project_tokens(tokens[:, 1:]) for tokens in eattn_tokens]
        else:
            entries, grid = self._dattn_entries(images, features, eattn_tokens, grid)
        patches = torch.stack([F.normalize(e.float(), dim=-1) for e in entries])
        return CraneFeatures(patches=patches, global_embedding=F.normalize(features.global_embedding.float(), dim=-1),
                             grid=grid)

    def _dattn_entries(self, images: torch.Tensor, features: ImageFeatures, eattn_tokens: list[torch.Tensor],
                       grid: tuple[int, int]) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """[D-Attn, E-Attn] joint-space patch tokens per tapped layer, on the DINO grid."""
        config = self.config
        dino_tokens = self.dino.patch_features(images)  # [B, C, h', w']
        dino_grid = tuple(dino_tokens.shape[-2:])
        weights = dattn_weights(dino_tokens, config.dattn_beta, config.dattn_gamma, config.dattn_mean,
                                config.dattn_empty_rows)
        by_layer = dict(zip(features.layers, features.block_inputs))
        entries = []
        for layer, eattn in zip(self.layers, eattn_tokens):
            block = self.backbone.visual.transformer.resblocks[layer - 1]
            hidden = by_layer[layer]
            if config.dattn_value_source == "mid_block":
                hidden = hidden + block.ls_1(block.attention(block.ln_1(hidden)))
            entries.append(self.backbone.project_tokens(self._dattn_tokens(block, hidden, weights, grid, dino_grid)))
            if config.dattn_with_eattn:
                entries.append(self.backbone.project_tokens(resize_tokens(eattn[:, 1:], grid, dino_grid)))
        return entries, dino_grid

    @staticmethod
    def _dattn_tokens(block, hidden: torch.Tensor, weights: torch.Tensor, grid, dino_grid) -> torch.Tensor:
        """out_proj(A v): v from ``ln_1(hidden)`` with the block's value projection, patch grid resized to the DINO
        grid; A [B, M, M] shared by the heads. Returns [B, M, W] residual-stream tokens (no residual added)."""
        attn = block.attn
        width = hidden.shape[-1]
        value = F.linear(block.ln_1(hidden), attn.in_proj_weight[2 * width:],
                         None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width:])
        value = resize_tokens(value[:, 1:], grid, dino_grid)  # [B, M, W]; per-head split commutes with A
        return attn.out_proj(weights.to(value.dtype) @ value)

    # -- text ------------------------------------------------------------------------------------------------------
    def text_features(self, global_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text embeddings: static [2, D], or [B, 2, D] guided by ``global_embedding`` [B, D]
        (normalised image embeddings inserted after the learned context)."""
        if global_embedding is None:
            return F.normalize(self.text().float(), dim=-1)
        return F.normalize(self.text(context_tokens=global_embedding[:, None]).float(), dim=-1)

    def _inference_text(self, features: CraneFeatures) -> torch.Tensor:
        if self.config.test_context_guidance and self.config.context_guidance != "none":
            return self.text_features(features.global_embedding)
        return self.inference_text(self.text_features)

    # -- heads -------------------------------------------------------------------------------------------------
    @staticmethod
    def _logits(patches: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
        """patches [L, B, N, D], text [2, D] or [B, 2, D] (normalised) -> logits [L, B, N, 2]."""
        if text.ndim == 2:
            return patches @ text.t() / temperature
        return patches @ text.transpose(1, 2)[None] / temperature

    def _image_logits(self, features: CraneFeatures, logits: torch.Tensor, text: torch.Tensor,
                      temperature: float) -> torch.Tensor:
        """[B, 2]: score-based pooling (when on) mixed with the global feature, cos / temperature."""
        image = features.global_embedding
        if self.config.score_pooling:
            weights = logits.mean(dim=0).softmax(dim=-1)[..., 1:]  # [B, N, 1]
            pooled = F.normalize((features.patches.mean(dim=0) * weights).sum(dim=1), dim=-1)
            alpha = self.config.pooling_alpha
            image = F.normalize(alpha * pooled + (1 - alpha) * image, dim=-1)
        if text.ndim == 2:
            return image @ text.t() / temperature
        return (image[:, None] @ text.transpose(1, 2))[:, 0] / temperature

    def _maps(self, logits: torch.Tensor, grid, size) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [L, B, N, 2] -> (map [B, H, W] before the blur, per-entry anomalous probabilities [B, L, H, W]).

        "soft_mean": the mean of the upsampled per-entry probabilities; "logit_mean": the softmax of the mean
        upsampled logits (bilinear, align_corners=False, as regrid_upsample)."""
        entries, batch = logits.shape[:2]
        layer_maps = ops.upsample_maps(logits.softmax(dim=-1)[..., 1].transpose(0, 1).reshape(batch, entries, *grid),
                                       size)
        if self.config.layer_fusion == "soft_mean":
            return layer_maps.mean(dim=1), layer_maps
        upsampled = ops.upsample_maps(logits.permute(1, 0, 3, 2).reshape(batch, entries * 2, *grid), size)
        return upsampled.reshape(batch, entries, 2, *size).mean(dim=1).softmax(dim=1)[:, 1], layer_maps

    # -- inference -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> MethodOutput:
        """Args: images [B, 3, S, S]; class_names ignored (length-checked when given).
        Returns: scores [B] in [0, 1]; maps [B, S, S] in [0, 1] (blurred)."""
        config = self.config
        if class_names is not None:
            self._class_names(class_names, images.shape[0])
        size = tuple(images.shape[-2:])
        features = self.image_features(images)
        text = self._inference_text(features)
        logits = self._logits(features.patches, text, config.temperature)
        maps, layer_maps = self._maps(logits, features.grid, size)
        if config.blur_sigma > 0:
            maps = ops.gaussian_blur(maps, config.blur_sigma)
        image_probabilities = self._image_logits(features, logits, text, config.temperature).softmax(dim=-1)
        return MethodOutput(scores=image_probabilities[:, 1], maps=maps,
                            extras={"layer_maps": layer_maps, "image_probabilities": image_probabilities,
                                    "text_features": text, "entries": self.entry_names()})

    def entry_names(self) -> list[str]:
        names = []
        for layer in self.layers:
            if self.config.dattn:
                names.append(f"dattn@{layer}")
                if self.config.dattn_with_eattn:
                    names.append(f"eattn@{layer}")
            else:
                names.append(f"eattn@{layer}")
        return names

    # -- training ----------------------------------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor,
                      class_names: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """train.py's loss: ``focal_weight * sum_l focal(p_l, mask) + dice_weight * sum_l dice((1 - p_l,0 + p_l,1)/2,
        mask) + image_loss_weight * CE(image logits / train_image_temperature, label)``.

        Returns (loss, parts) with parts ``"image_ce"`` and, with masks, ``"focal"`` and ``"dice"`` (unweighted sums
        over entries). ``masks=None``: the image loss only.
        """
        config = self.config
        features = self.image_features(images)
        guided = config.context_guidance != "none" and (
            config.context_guidance_prob >= 1.0 or float(torch.rand(1)) <= config.context_guidance_prob)
        text = self.text_features(features.global_embedding if guided else None)
        logits = self._logits(features.patches, text, config.temperature)
        labels = labels.to(self.backbone.device).reshape(-1)
        image_ce = image_cross_entropy(self._image_logits(features, logits, text, config.train_image_temperature),
                                       labels)
        loss = config.image_loss_weight * image_ce
        parts = {"image_ce": float(image_ce.detach())}
        if masks is None:
            return loss, parts
        target = mask_targets(masks, images, self.backbone.device)
        size = tuple(images.shape[-2:])
        focal_total = logits.new_zeros(())
        dice_total = logits.new_zeros(())
        for entry_logits in logits:
            probs = ops.pixel_probabilities(entry_logits.softmax(dim=-1), features.grid, size,
                                            config.train_interpolation)  # [B, 2, S, S]
            focal_total = focal_total + focal_loss(probs, target, gamma=config.focal_gamma)
            dice_total = dice_total + dice_loss((1 - probs[:, 0] + probs[:, 1]) / 2, target.float())
        loss = loss + config.focal_weight * focal_total + config.dice_weight * dice_total
        parts.update({"focal": float(focal_total.detach()), "dice": float(dice_total.detach())})
        return loss, parts

    # -- reference checkpoints ---------------------------------------------------------------------------------
    def load_reference_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint of the authors' ``train.py`` (``{"prompt_learner": state_dict}``), e.g.
        ``checkpoints/trained_on_visa_crane/epoch_5.pth``; shapes are checked strictly."""
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        learner = state.get("prompt_learner", state) if isinstance(state, dict) else state
        for index, key in enumerate(("tokenized_prompts_pos", "tokenized_prompts_neg")):
            if key in learner:  # the prompts it was trained with must be ours (n_ctx, templates)
                theirs = learner[key].reshape(-1)[:self.text.token_ids.shape[1]].long().cpu()
                if not torch.equal(theirs, self.text.token_ids[index].long().cpu()):
                    raise MethodError(f"{path}: its {key} differ from this config's prompt "
                                      f"{self.text.prompt_texts[index]!r} (n_ctx or prompt_templates)")
        self.load_learned_state_dict(convert_reference_state_dict(state), source=str(path))

    def describe(self, class_names: Sequence[str] | None = None) -> dict:
        record = super().describe(class_names)
        record["entries"] = self.entry_names()
        if self.dino is not None:
            record["dino"] = dict(getattr(self.dino, "info", {}))
        return record


@register_method
class CranePlus(Crane):
    """Crane+ = Crane with D-Attn (a DINOv2 second backbone); see :class:`Crane`."""

    name = "crane_plus"
    config_class = CranePlusConfig
    # smoke runs: a tiny random DINOv2 too, whose near-identical tokens leave D-Attn rows empty (see dattn_empty_rows)
    tiny_overrides = {"dino_model": "tiny", "dino_pretrained": None, "dattn_empty_rows": "self"}
    paper = "Crane+ (Salehi et al., 2025, arXiv 2504.11055), D-Attn"
