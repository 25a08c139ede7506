"""WinCLIP (Jeong et al., CVPR 2023): training-free zero-shot anomaly classification and segmentation.

Zero-shot path (what anomalib's ``WinClipModel`` computes with ``k_shot=0``):

1. Text: the compositional prompt ensemble (:mod:`zsadlib.prompts.handcrafted`) gives two prototypes per
   class name, t = [normal, anomalous] ([2, D]); cached per class name.
2. Image score: ``softmax(cos(g, t) / temperature)[anomalous]`` with g the image embedding (class token of the
   last block, ``ln_post``, ``proj``).
3. Windows: for each scale s, every s x s window of patches (stride 1) is re-encoded by the vision
   transformer from only its own tokens: the class token and the window's patch tokens, taken after the patch
   embedding, the positional embedding and ``ln_pre`` (anomalib selects them before ``ln_pre``; LayerNorm
   acts per token, so the order does not matter). The window's class token (``ln_post``, ``proj``) is scored
   like the image, giving one anomalous probability per window.
4. Per scale, each patch gets the harmonic mean of the scores of the windows covering it.
5. Map on the patch grid = harmonic mean over {image score broadcast to every patch, scale maps}
   (anomalib: ``(n_scales + 1) / sum(1 / maps)``), then bilinear upsampling to the input size. No blur.

Every knob is a :class:`WinCLIPConfig` field; the few-shot extension (WinCLIP+) is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import ops
from ..backbone import Backbone
from ..prompts.handcrafted import TEMPLATE_SETS, encode_prompt_ensemble
from .base import (AnomalyMethod, MethodConfig, MethodError, MethodOutput, check_map_settings, check_options,
                   register_method)

__all__ = [
    "WinCLIPConfig",
    "WinCLIP",
    "embed_tokens",
    "encode_class_token",
    "encode_token_windows",
    "encode_windows_from_tokens",
]


@dataclass
class WinCLIPConfig(MethodConfig):
    """WinCLIP zero-shot settings; defaults follow the paper and anomalib's implementation."""

    backbone: str = "ViT-B-16-plus-240"  # paper Sec. 5 / anomalib BACKBONE
    pretrained: str | None = "laion400m_e31"  # anomalib PRETRAINED (caoyunkang/WinClip uses laion400m_e32)
    image_size: int = 240  # native size of ViT-B-16-plus-240: a 15 x 15 patch grid (anomalib, paper)
    pos_embed_resize: str = "bilinear"  # only used when image_size differs from the native 240
    scales: tuple[int, ...] = (2, 3)  # window sizes in patches (paper: small/mid windows; anomalib scales)
    window_stride: int = 1  # windows slide by one patch (anomalib make_masks(..., stride=1))
    temperature: float = 0.07  # softmax temperature for image and window scores (anomalib TEMPERATURE;
    # caoyunkang/WinClip uses 100 * cos, i.e. 0.01; image AUROC does not depend on it, maps do)
    include_image_score: bool = True  # the full-image score joins the harmonic fusion as the coarsest scale
    # (anomalib _compute_zero_shot_scores)
    scale_fusion: str = "harmonic"  # "harmonic" (anomalib: (S+1) / sum(1/maps)) | "mean" (arithmetic)
    templates: str = "anomalib"  # template set: "anomalib" (21, one duplicated) | "winclip22" (caoyunkang/APRIL-GAN)
    normalize_prompt_embeddings: bool = False  # False: average raw text embeddings (anomalib, caoyunkang "V1")
    blur_sigma: float = 0.0  # Gaussian blur of the final map in pixels; 0 = none (anomalib; caoyunkang has
    # sigma 4 commented out)
    k_shot: int = 0  # WinCLIP+ reference images; only 0 (zero-shot) is implemented
    window_batch: int = 256  # windows encoded per chunk (memory bound: B * window_batch sequences); no effect
    # on results


# ---------------------------------------------------------------------------------------------------------
# window encoding on an open_clip VisionTransformer
# ---------------------------------------------------------------------------------------------------------
def _check_class_token_pooling(backbone: Backbone) -> None:
    visual = backbone.visual
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise MethodError(
            f"WinCLIP needs a ViT whose image embedding is its class token; {backbone.info.get('name')} pools with "
            f"pool_type={getattr(visual, 'pool_type', None)!r}, attn_pool={type(getattr(visual, 'attn_pool', None))}"
        )


def embed_tokens(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """Input tokens of the vision transformer: patch embedding, class token, positional embedding, ``ln_pre``.

    Args:
        images: [B, 3, S, S] normalised, S = ``backbone.image_size``.
    Returns:
        [B, 1 + N, W] (class token first, patches row-major).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise MethodError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    expected = tuple(backbone.visual.image_size)
    if tuple(images.shape[-2:]) != expected:
        raise MethodError(
            f"images are {tuple(images.shape[-2:])} but the backbone was loaded for {expected}; "
            f"pass image_size={images.shape[-1]} to load_backbone / build_method"
        )
    return backbone.visual._embeds(images.to(device=backbone.device, dtype=backbone.dtype))


def encode_class_token(backbone: Backbone, tokens: torch.Tensor) -> torch.Tensor:
    """Run all vision blocks on token sequences and project their class token.

    Args:
        tokens: [S, L, W] sequences (class token first), already through ``ln_pre``.
    Returns:
        [S, D] = ``ln_post(x[:, 0]) @ proj`` after the last block.
    """
    x = tokens
    for block in backbone.visual.transformer.resblocks:
        x = block(x)
    return backbone.project_tokens(x[:, 0])


def encode_windows_from_tokens(
    backbone: Backbone, tokens: torch.Tensor, windows: torch.Tensor, window_batch: int = 256
) -> torch.Tensor:
    """Embed every window from its own tokens only (class token + the window's patch tokens).

    Args:
        tokens: [B, 1 + N, W] from :func:`embed_tokens`.
        windows: LongTensor [M, K] of patch indices (0 .. N-1), e.g. :func:`zsadlib.ops.sliding_windows`.
        window_batch: windows per chunk; each chunk runs ``B * window_batch`` sequences of ``1 + K`` tokens.
    Returns:
        [B, M, D] window embeddings (``ln_post`` + ``proj`` of each window's class token).
    """
    if tokens.ndim != 3:
        raise MethodError(f"tokens must be [B, 1 + N, W], got {tuple(tokens.shape)}")
    if windows.ndim != 2 or windows.numel() == 0:
        raise MethodError(f"windows must be a non-empty [M, K] index tensor, got {tuple(windows.shape)}")
    if window_batch < 1:
        raise MethodError(f"window_batch must be >= 1, got {window_batch}")
    batch, length, width = tokens.shape
    windows = windows.to(tokens.device).long()
    if int(windows.min()) < 0 or int(windows.max()) >= length - 1:
        raise MethodError(f"window indices must lie in 0..{length - 2} (the patch grid)")
    count, size = windows.shape
    class_index = windows.new_zeros(count, 1)
    index = torch.cat([class_index, windows + 1], dim=1)  # [M, 1 + K]: position 0 is the class token
    chunks = []
    for start in range(0, count, int(window_batch)):
        part = index[start:start + int(window_batch)]  # [m, 1 + K]
        gathered = tokens[:, part]  # [B, m, 1 + K, W]
        sequences = gathered.reshape(batch * part.shape[0], size + 1, width)
        chunks.append(encode_class_token(backbone, sequences).reshape(batch, part.shape[0], -1))
    return torch.cat(chunks, dim=1)


def encode_token_windows(
    backbone: Backbone, images: torch.Tensor, windows: torch.Tensor, window_batch: int = 256
) -> torch.Tensor:
    """Window embeddings of images: :func:`embed_tokens` once, then :func:`encode_windows_from_tokens`.

    Args:
        images: [B, 3, S, S].
        windows: LongTensor [M, K] of patch indices.
    Returns:
        [B, M, D].
    """
    _check_class_token_pooling(backbone)
    return encode_windows_from_tokens(backbone, embed_tokens(backbone, images), windows, window_batch)


# ---------------------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------------------
@register_method
class WinCLIP(AnomalyMethod):
    """WinCLIP zero-shot: ``forward(images [B,3,S,S], class_names) -> MethodOutput``.

    ``extras``: ``"scale_maps"`` {scale: [B, h, w]} per-scale harmonic window maps on the patch grid,
    ``"grid_map"`` [B, h, w] the fused map before upsampling, ``"image_probabilities"`` [B, 2].
    """

    name = "winclip"
    config_class = WinCLIPConfig
    uses_class_names = True
    trainable = False
    paper = "WinCLIP (Jeong et al., CVPR 2023)"

    def __init__(self, config: WinCLIPConfig, backbone: Backbone):
        super().__init__(config, backbone)
        self._validate(config, backbone)
        self.scales = tuple(int(s) for s in config.scales)
        for scale in self.scales:
            windows = ops.sliding_windows(backbone.grid_size, scale, config.window_stride)
            self.register_buffer(f"windows_{scale}", windows, persistent=False)

    @staticmethod
    def _validate(config: WinCLIPConfig, backbone: Backbone) -> None:
        _check_class_token_pooling(backbone)
        if config.k_shot != 0:
            raise MethodError("only zero-shot WinCLIP (k_shot=0) is implemented; WinCLIP+ is not")
        check_options(config, scale_fusion=("harmonic", "mean"), templates=tuple(sorted(TEMPLATE_SETS)))
        check_map_settings(config)
        if config.window_batch < 1 or config.window_stride < 1:
            raise MethodError("window_batch and window_stride must be >= 1")
        if not config.scales and not config.include_image_score:
            raise MethodError("no scales and include_image_score=False leaves nothing to build a map from")
        grid = backbone.grid_size
        bad = [s for s in config.scales if not 1 <= int(s) <= min(grid)]
        if bad:
            raise MethodError(f"window scales {bad} do not fit the {grid[0]} x {grid[1]} patch grid")

    def windows(self, scale: int) -> torch.Tensor:
        """LongTensor [M, s*s] of the windows of one scale."""
        return getattr(self, f"windows_{int(scale)}")

    # -- text ------------------------------------------------------------------------------------------------
    def text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """[B, 2, D] ensemble prototypes (normal, anomalous) per image; each class name is encoded once."""
        return self.cached_class_text(class_names, lambda name: encode_prompt_ensemble(
            self.backbone, name, templates=self.config.templates,
            normalize_each=self.config.normalize_prompt_embeddings))

    # -- forward ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> MethodOutput:
        """Args: images [B, 3, S, S]; class_names: B names (None -> "object").
        Returns: scores [B], maps [B, S, S] in [0, 1]."""
        config = self.config
        names = self._class_names(class_names, images.shape[0])
        text = self.text_features(names)  # [B, 2, D]
        tokens = embed_tokens(self.backbone, images)  # [B, 1 + N, W]
        batch = tokens.shape[0]
        grid = self.backbone.grid_size

        image_embedding = encode_class_token(self.backbone, tokens)  # [B, D]
        image_probabilities = ops.anomaly_probability(image_embedding[:, None], text, config.temperature)[:, 0]
        scores = image_probabilities[:, 1]  # [B]

        scale_maps: dict[int, torch.Tensor] = {}
        for scale in self.scales:
            windows = self.windows(scale)
            embeddings = encode_windows_from_tokens(self.backbone, tokens, windows, config.window_batch)
            window_scores = ops.anomaly_probability(embeddings, text, config.temperature)[..., 1]  # [B, M]
            scale_maps[scale] = ops.harmonic_aggregate(window_scores, windows, grid)  # [B, h, w]

        layers = list(scale_maps.values())
        if config.include_image_score:
            layers.insert(0, scores.view(batch, 1, 1).expand(batch, *grid))
        stacked = torch.stack(layers, dim=-1)  # [B, h, w, n]
        if config.scale_fusion == "harmonic":
            grid_map = ops.harmonic_mean(stacked, dim=-1)
        else:
            grid_map = stacked.mean(dim=-1)

        maps = ops.upsample_maps(grid_map, tuple(images.shape[-2:]))
        if config.blur_sigma > 0:
            maps = ops.gaussian_blur(maps, config.blur_sigma)
        return MethodOutput(
            scores=scores,
            maps=maps,
            extras={"scale_maps": scale_maps, "grid_map": grid_map, "image_probabilities": image_probabilities},
        )
