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

Few-shot path (WinCLIP+, what anomalib's ``WinClipModel`` computes once ``setup(reference_images=...)`` ran):

6. Memory: for K normal reference images, per scale every window embedding ([K * M_s, D]) and the patch tokens
   of the last block after ``ln_post`` (open_clip's ``output_tokens``, not projected: [K * N, W]). Memories
   are kept per class name (:meth:`WinCLIP.set_reference_images`, :meth:`WinCLIP.fit_reference`).
7. Each test window / patch scores ``min over every memory item of (1 - cos) / 2`` (all positions of all K
   images, not only the same position); window scores are aggregated per patch by the harmonic mean.
8. Few-shot map = arithmetic mean of {patch map, scale maps}; final grid map = (zero-shot map + few-shot map)
   / 2; image score = (zero-shot score + max of the few-shot map) / 2; then bilinear upsampling.

Every knob is a :class:`WinCLIPConfig` field.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

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
    "visual_association",
    "normal_reference_images",
    "reference_images_from_folder",
]


@dataclass
class WinCLIPConfig(MethodConfig):
    """WinCLIP and WinCLIP+ settings; defaults follow the paper and anomalib's implementation."""

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
    k_shot: int = 0  # WinCLIP+ normal reference images per class (paper tables: 1, 2, 4 shots); 0 = zero-shot.
    # set_reference_images sets it to K when it is 0, as anomalib's setup(reference_images=...) does
    reference_batch: int = 8  # reference images encoded per chunk by set_reference_images; no effect on results
    few_shot_clamp: bool = False  # deviation when True: clamp the (1 - cos) / 2 distances at 0 before the harmonic
    # mean. anomalib does not; a test window equal to a memory window (distance 0 +- 1e-7, maybe negative) then gets
    # a harmonic mean of rounding noise. False = anomalib
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


def run_blocks(backbone: Backbone, tokens: torch.Tensor) -> torch.Tensor:
    """All vision blocks on token sequences: [S, L, W] (after ``ln_pre``) -> [S, L, W] after the last block."""
    x = tokens
    for block in backbone.visual.transformer.resblocks:
        x = block(x)
    return x


def encode_class_token(backbone: Backbone, tokens: torch.Tensor) -> torch.Tensor:
    """Run all vision blocks on token sequences and project their class token.

    Args:
        tokens: [S, L, W] sequences (class token first), already through ``ln_pre``.
    Returns:
        [S, D] = ``ln_post(x[:, 0]) @ proj`` after the last block.
    """
    return backbone.project_tokens(run_blocks(backbone, tokens)[:, 0])


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


def visual_association(embeddings: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """WinCLIP+'s visual association score: distance to the nearest memory item, ``min_r (1 - cos(x, m_r)) / 2``.

    Args:
        embeddings: [B, M, C] test windows or patches.
        memory: [R, C] every reference item (all positions of all K reference images).
    Returns:
        [B, M] in [0, 1] (computed in float32).
    """
    if embeddings.ndim != 3 or memory.ndim != 2 or embeddings.shape[-1] != memory.shape[-1]:
        raise MethodError(f"embeddings [B, M, C] and memory [R, C] do not fit: {tuple(embeddings.shape)}, "
                          f"{tuple(memory.shape)}")
    queries = F.normalize(embeddings.float(), dim=-1)
    keys = F.normalize(memory.to(embeddings.device).float(), dim=-1)
    return (1 - (queries @ keys.T).amax(dim=-1)) / 2


def normal_reference_images(dataset, k: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """K normal images per class of a dataset (usually its ``train`` split), drawn with a seeded generator.

    Args:
        dataset: a :class:`zsadlib.data.AnomalyDataset`.
        k: images per class.
        seed: the same seed always picks the same images (in dataset order).
    Returns:
        {class name: (images [k, 3, S, S], their paths)}.
    """
    if k < 1:
        raise MethodError(f"k_shot must be >= 1 to draw reference images, got {k}")
    generator = torch.Generator().manual_seed(int(seed))
    chosen: dict[str, tuple[torch.Tensor, list[str]]] = {}
    for name in dataset.class_names:
        normal = [i for i, record in enumerate(dataset.records) if record.class_name == name and record.label == 0]
        if len(normal) < k:
            raise MethodError(f"class {name!r} of {dataset.root} ({dataset.split} split) has {len(normal)} normal "
                              f"images, fewer than k_shot={k}")
        picked = sorted(normal[int(i)] for i in torch.randperm(len(normal), generator=generator)[:k])
        samples = [dataset[i] for i in picked]
        chosen[name] = (torch.stack([sample.image for sample in samples]), [sample.path for sample in samples])
    return chosen


def reference_images_from_folder(folder, image_size: int, k: int | None = None
                                 ) -> dict[str | None, tuple[torch.Tensor, list[str]]]:
    """Reference images read from a folder (what ``zsad eval --reference-images DIR`` takes).

    Image files directly in ``folder`` serve every class (key None); otherwise each subfolder holds the references
    of the class it is named after. Files are taken sorted; with ``k``, the first k of each group.

    Returns:
        {class name or None: (images [K, 3, S, S] with the default transform at ``image_size``, their paths)}.
    """
    from ..data import read_image
    from ..data._scan import list_images
    from ..data.transforms import ImageTransform

    folder = Path(folder)
    if not folder.is_dir():
        raise MethodError(f"reference images: {folder} is not a folder")
    groups: dict[str | None, list[Path]] = {None: list_images(folder)}
    if not groups[None]:
        groups = {sub.name: list_images(sub) for sub in sorted(folder.iterdir())
                  if sub.is_dir() and not sub.name.startswith(".")}
    if not groups:
        raise MethodError(f"reference images: no images in {folder} nor in class subfolders of it")
    transform = ImageTransform(image_size)
    chosen = {}
    for name, paths in groups.items():
        where = folder if name is None else folder / name
        if not paths or (k is not None and len(paths) < k):
            raise MethodError(f"reference images: {where} has {len(paths)} images, fewer than "
                              f"{k if k is not None else 1} (k_shot)")
        paths = paths[:k] if k is not None else paths
        chosen[name] = (torch.stack([transform(read_image(path)) for path in paths]), [str(path) for path in paths])
    return chosen


# ---------------------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------------------
@register_method
class WinCLIP(AnomalyMethod):
    """WinCLIP / WinCLIP+: ``forward(images [B,3,S,S], class_names) -> MethodOutput``.

    Few-shot: build with ``k_shot=K`` (or not) and give K normal images per class with
    :meth:`set_reference_images` (``class_name=None``: for every class) or :meth:`fit_reference` (a dataset).

    ``extras``: ``"scale_maps"`` {scale: [B, h, w]} per-scale harmonic window maps on the patch grid,
    ``"grid_map"`` [B, h, w] the fused map before upsampling, ``"image_probabilities"`` [B, 2]; few-shot adds
    ``"zero_shot_map"`` / ``"zero_shot_scores"`` (before the fusion), ``"few_shot_map"`` [B, h, w],
    ``"few_shot_patch_map"`` [B, h, w] and ``"few_shot_scale_maps"`` {scale: [B, h, w]}.
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
        # class name (None: any class) -> {"patches": [K * N, W], scale: [K * M_s, D]} (WinCLIP+ memory)
        self._reference_memory: dict[str | None, dict] = {}
        self._reference_sources: dict[str, list[str]] = {}

    @staticmethod
    def _validate(config: WinCLIPConfig, backbone: Backbone) -> None:
        _check_class_token_pooling(backbone)
        if config.k_shot < 0 or config.reference_batch < 1:
            raise MethodError(f"k_shot must be >= 0 and reference_batch >= 1, got {config.k_shot}, "
                              f"{config.reference_batch}")
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

    # -- visual features ----------------------------------------------------------------------------------------
    def encode_visual(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
        """One image pass plus the window passes.

        Args: images [B, 3, S, S].
        Returns: image embeddings [B, D], window embeddings {scale: [B, M_s, D]}, patch tokens [B, N, W] (last
        block, ``ln_post``, no projection: what open_clip returns with ``output_tokens``).
        """
        tokens = embed_tokens(self.backbone, images)  # [B, 1 + N, W]
        hidden = run_blocks(self.backbone, tokens)
        image_embedding = self.backbone.project_tokens(hidden[:, 0])
        patch_tokens = self.backbone.visual.ln_post(hidden[:, 1:])
        windows = {scale: encode_windows_from_tokens(self.backbone, tokens, self.windows(scale),
                                                     self.config.window_batch) for scale in self.scales}
        return image_embedding, windows, patch_tokens

    # -- WinCLIP+ reference memory ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_reference_images(self, images: torch.Tensor, class_name: str | None = None,
                             sources: Sequence[str] | None = None) -> None:
        """Keep the window embeddings and patch tokens of K normal images as the few-shot memory of a class.

        Args:
            images: [K, 3, S, S] normalised like the test images.
            class_name: the class they are references for; None: every class without its own references.
            sources: where they came from (file paths), recorded by :meth:`describe`.
        """
        if images.ndim != 4 or images.shape[0] < 1:
            raise MethodError(f"reference images must be [K, 3, H, W] with K >= 1, got {tuple(images.shape)}")
        count = int(images.shape[0])
        if self.config.k_shot == 0:
            self.config = self.config.replace(k_shot=count)
        elif count != self.config.k_shot:
            raise MethodError(f"got {count} reference images for class {class_name!r}, but k_shot="
                              f"{self.config.k_shot}")
        parts = [self.encode_visual(images[start:start + self.config.reference_batch])
                 for start in range(0, count, self.config.reference_batch)]
        memory = {"patches": torch.cat([part[2] for part in parts]).flatten(0, 1).float()}  # [K * N, W]
        for scale in self.scales:
            memory[scale] = torch.cat([part[1][scale] for part in parts]).flatten(0, 1).float()  # [K * M_s, D]
        self._reference_memory[class_name] = memory
        label = "*" if class_name is None else str(class_name)
        self._reference_sources[label] = list(sources) if sources is not None else [f"tensor [{count}, 3, ...]"]

    def fit_reference(self, dataset, seed: int = 0, progress: bool = True) -> dict[str, list[str]]:
        """Draw ``config.k_shot`` normal images per class from ``dataset`` (seeded, see
        :func:`normal_reference_images`) and keep them as each class's memory. Returns {class: paths}."""
        if self.config.k_shot < 1:
            raise MethodError("fit_reference needs k_shot >= 1: build the method with k_shot=K")
        chosen = normal_reference_images(dataset, self.config.k_shot, seed)
        for name in tqdm(chosen, desc=f"{self.name}: reference images", unit="class", disable=not progress):
            images, paths = chosen[name]
            self.set_reference_images(images, class_name=name, sources=paths)
        return {name: paths for name, (_, paths) in chosen.items()}

    def clear_reference_images(self) -> None:
        """Forget every memory (the method is zero-shot again only if it was built with k_shot=0)."""
        self._reference_memory.clear()
        self._reference_sources.clear()

    def _memory_for(self, name: str) -> dict:
        memory = self._reference_memory.get(name, self._reference_memory.get(None))
        if memory is None:
            raise MethodError(f"k_shot={self.config.k_shot} but no reference images for class {name!r}: call "
                              f"set_reference_images(images, class_name={name!r}) or fit_reference(train_dataset) "
                              f"(CLI: --k-shot K or --reference-images DIR)")
        return memory

    def _distances(self, embeddings: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        distances = visual_association(embeddings, memory)
        return distances.clamp(min=0.0) if self.config.few_shot_clamp else distances

    def few_shot_maps(self, windows: dict[int, torch.Tensor], patch_tokens: torch.Tensor,
                      class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """WinCLIP+ maps of a batch against each image's class memory.

        Returns: few-shot map [B, h, w] (mean of the patch map and the scale maps), patch map [B, h, w],
        scale maps {scale: [B, h, w]} (harmonic aggregation of window distances).
        """
        grid = self.backbone.grid_size
        batch = patch_tokens.shape[0]
        patch_map = patch_tokens.new_zeros(batch, *grid, dtype=torch.float32)
        scale_maps = {scale: patch_map.clone() for scale in self.scales}
        for name in dict.fromkeys(class_names):
            rows = torch.tensor([i for i, other in enumerate(class_names) if other == name],
                                device=patch_tokens.device)
            memory = self._memory_for(name)
            patch_map[rows] = self._distances(patch_tokens[rows], memory["patches"]).reshape(-1, *grid)
            for scale in self.scales:
                distances = self._distances(windows[scale][rows], memory[scale])  # [b, M_s]
                scale_maps[scale][rows] = ops.harmonic_aggregate(distances, self.windows(scale), grid)
        few_shot_map = torch.stack([patch_map, *scale_maps.values()]).mean(dim=0)
        return few_shot_map, patch_map, scale_maps

    def describe(self, class_names: Sequence[str] | None = None) -> dict:
        record = super().describe(class_names)
        if self.config.k_shot:
            record["reference_images"] = {name: list(paths) for name, paths in self._reference_sources.items()}
        return record

    # -- forward ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> MethodOutput:
        """Args: images [B, 3, S, S]; class_names: B names (None -> "object").
        Returns: scores [B], maps [B, S, S] in [0, 1]."""
        config = self.config
        names = self._class_names(class_names, images.shape[0])
        text = self.text_features(names)  # [B, 2, D]
        image_embedding, window_embeddings, patch_tokens = self.encode_visual(images)
        batch = image_embedding.shape[0]
        grid = self.backbone.grid_size

        image_probabilities = ops.anomaly_probability(image_embedding[:, None], text, config.temperature)[:, 0]
        scores = image_probabilities[:, 1]  # [B]

        scale_maps: dict[int, torch.Tensor] = {}
        for scale in self.scales:
            windows = self.windows(scale)
            window_scores = ops.anomaly_probability(window_embeddings[scale], text, config.temperature)[..., 1]
            scale_maps[scale] = ops.harmonic_aggregate(window_scores, windows, grid)  # [B, h, w]

        layers = list(scale_maps.values())
        if config.include_image_score:
            layers.insert(0, scores.view(batch, 1, 1).expand(batch, *grid))
        stacked = torch.stack(layers, dim=-1)  # [B, h, w, n]
        if config.scale_fusion == "harmonic":
            grid_map = ops.harmonic_mean(stacked, dim=-1)
        else:
            grid_map = stacked.mean(dim=-1)
        extras = {"scale_maps": scale_maps, "image_probabilities": image_probabilities}

        if config.k_shot:  # WinCLIP+: anomalib fuses zero- and few-shot by plain means
            few_map, patch_map, few_scale_maps = self.few_shot_maps(window_embeddings, patch_tokens, names)
            extras.update(zero_shot_map=grid_map, zero_shot_scores=scores, few_shot_map=few_map,
                          few_shot_patch_map=patch_map, few_shot_scale_maps=few_scale_maps)
            grid_map = (grid_map + few_map.to(grid_map.dtype)) / 2
            scores = (scores + few_map.amax(dim=(-2, -1)).to(scores.dtype)) / 2

        extras["grid_map"] = grid_map
        maps = ops.upsample_maps(grid_map, tuple(images.shape[-2:]))
        if config.blur_sigma > 0:
            maps = ops.gaussian_blur(maps, config.blur_sigma)
        return MethodOutput(scores=scores, maps=maps, extras=extras)
