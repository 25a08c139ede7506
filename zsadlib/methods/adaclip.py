"""AdaCLIP (Cao et al., ECCV 2024): hybrid learnable prompts for zero-shot anomaly detection.

Checked line by line against the authors' code, caoyunkang/AdaCLIP at e27ee32 (``method/adaclip.py``,
``method/trainer.py``, ``method/custom_clip.py``, ``method/transformer.py``, ``loss.py``, ``train.py``, ``test.py``,
``train.sh``, ``model_configs/ViT-L-14-336.json``), and held equal to it by ``tests/test_adaclip_reference.py``
(fixtures written by ``python -m tools.reference_fixtures adaclip --ref PATH``).

What it computes (B images, L tapped layers, N patches, D joint width, W_v / W_t vision / text width, n prompt
length 5, J prompting depth 4):

1. Dynamic prompts ('D'): g = CLIP's own image embedding of the image (ln_post(class token) @ proj, no prompts, no
   gradient); n linear heads D -> W_v and n heads D -> W_t give per-image prompts [B, n, W_v] and [B, n, W_t].
2. Vision ('V'): prompts P_j = dynamic + static_j ([n, W_v] learned), rounded to float16 (quirk), are APPENDED to
   the token sequence before block 1 and replace the last n tokens before blocks 2..J; they stay in the sequence up
   to the last block. Patch tokens of layers 6/12/18/24 (the raw residual stream, prompt tokens dropped, no
   ln_post) go through one Linear(W_v, D) per layer and are normalised [B, N, D]; the global feature is
   normalise(Linear(D, D)(ln_post(class token) @ proj)) [B, D].
3. Text ('L'): the class name in 7 normal states x 4 templates (28 sentences) and 5 anomalous states x 4 templates
   (20); before text blocks 2..J the tokens at positions 1..n are replaced by dynamic + static_j ([n, W_t],
   float16-rounded). Block 1 sees the sentence itself, so ``text_prompts.0`` is never used (as released). Each
   group: mean of the normalised sentence embeddings, normalised -> t [B, 2, D]. The dynamic text prompts make the
   text depend on the image (the reference supports batch size 1 only for that reason; here each image gets its own
   text).
4. Per layer logits_l = 100 * patches_l . t [B, N, 2]. Map: the logits upsampled bilinearly (align_corners=True),
   averaged over layers, softmax, (p_anom + 1 - p_norm) / 2; Gaussian blur sigma 4 (trainer.evaluation).
5. Image score with hybrid semantic fusion (HSF): p = softmax(mean_l logits_l)[anomalous]; the k = 5 * K patches
   (K = 20 clusters) of highest p, their tokens of all layers side by side [k, L * D], are clustered by k-means; each
   cluster's centre is the mean of its members' tokens over all layers, f = normalise(mean of the K centres);
   g' = normalise(0.2 f + 0.8 global); score = softmax(100 g' . t)[anomalous].
6. Loss (trainer.train_one_batch): focal(score probabilities, label) + sum_l [focal(P_l, mask) + dice(P_l,anom,
   mask) + dice(P_l,norm, 1 - mask)], P_l the softmax of layer l's upsampled logits. AdamW (lr 0.01,
   betas (0.5, 0.999), weight decay 0.01: torch's default), 5 epochs, batch size 1, seed 111.

Learned parameters (10,665,472 at ViT-L/14-336, as the reference's): ``text_prompts.j`` [n, W_t] and
``visual_prompts.j`` [n, W_v] (j < J), ``patch_projections.l`` Linear(W_v, D), ``global_projection`` Linear(D, D),
``dynamic_visual.i`` Linear(D, W_v) and ``dynamic_text.i`` Linear(D, W_t) (i < n).

Quirks of the released code, each a field whose default reproduces it:

* ``prompt_fp16_round=True``: the prompts are ``.half()``-rounded before they enter the sequence (also rounding
  each prompt copy's gradient to float16).
* ``dice_per_row=True``: train.py runs batch size 1 and ``gt.squeeze()`` drops the batch axis, so
  ``BinaryDiceLoss`` treats every mask ROW as a sample (mean over rows of per-row dice). Here: the same per image,
  averaged over the images of a batch. ``False``: per image.
* ``map_align_corners=True``: maps upsampled with ``align_corners=True``.
* ``backbone="ViT-L-14-336"`` (not -quickgelu): their model config has no ``quick_gelu``, so the OpenAI weights
  run with exact GELU; ``pos_embed_resize="bicubic"``: bicubic, no antialias, at load time.
* ``kmeans_seed=0`` is OUR default (a named deviation): each image's k-means (sklearn ``KMeans(K, n_init="auto")``)
  is seeded with it, so a score does not depend on the images before it. The reference draws from NumPy's global
  RNG (seeded once by setup_seed(111)); ``None`` does that.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..backbone import Backbone
from ..losses import dice_loss, focal_loss
from ..utils import seeded
from .base import (AnomalyMethod, MethodConfig, MethodError, MethodOutput, check_layers, check_map_settings,
                   check_options, mask_targets, register_method)

__all__ = ["AdaCLIPConfig", "AdaCLIP", "build_learned_modules", "convert_reference_state_dict",
           "hybrid_semantic_fusion", "QUIRKS"]

#: The reference-code quirks, each a config field whose default reproduces the released code.
QUIRKS: dict[str, str] = {
    "prompt_fp16_round": "True: prompts rounded to float16 (.half()) before they enter the sequence",
    "dice_per_row": "True: dice over mask rows (batch size 1 and gt.squeeze() in trainer.py)",
    "map_align_corners": "True: bilinear upsampling with align_corners=True",
    "pos_embed_resize": "'bicubic': load-time bicubic resize of the positional embedding, no antialias",
}

NORMAL_STATES: tuple[str, ...] = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                                  "{} without defect", "{} without damage")  # TextEmbebddingLayer.prompt_normal
ANOMALOUS_STATES: tuple[str, ...] = ("damaged {}", "broken {}", "{} with flaw", "{} with defect",
                                     "{} with damage")  # TextEmbebddingLayer.prompt_abnormal
TEMPLATES: tuple[str, ...] = ("a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
                              "a cropped photo of the {}.")  # TextEmbebddingLayer.prompt_templates


@dataclass
class AdaCLIPConfig(MethodConfig):
    """AdaCLIP settings; defaults are the released code (train.py / test.py / trainer.py / adaclip.py at e27ee32)."""

    backbone: str = "ViT-L-14-336"  # --model ViT-L-14-336 with OpenAI weights; quirk: their config has no
    # quick_gelu, so the weights run with exact GELU (open_clip's "ViT-L-14-336", not "-quickgelu")
    pretrained: str | None = "openai"  # create_model(pretrained='openai')
    image_size: int = 518  # --image_size 518: a 37 x 37 patch grid
    pos_embed_resize: str = "bicubic"  # quirk: custom_clip.resize_pos_embed, bicubic without antialias at load
    layers: tuple[int, ...] = (6, 12, 18, 24)  # train.py: n_layers // 4 * (1, 2, 3, 4) (1-based blocks)
    # -- prompts --------------------------------------------------------------------------------------------------
    prompting_depth: int = 4  # --prompting_depth 4: prompts enter blocks 1..4 (vision) / replace at 2..4 (text)
    prompting_length: int = 5  # --prompting_length 5 prompt tokens
    prompting_type: str = "SD"  # --prompting_type SD: static + dynamic ("S", "D", "SD")
    prompting_branch: str = "VL"  # --prompting_branch VL: vision and language ("V", "L", "VL", "")
    prompt_fp16_round: bool = True  # quirk: PromptLayer casts the prompts .half() before concatenating
    init_std: float = 0.02  # nn.init.normal_(std=0.02) of the static prompts
    normal_states: tuple[str, ...] = NORMAL_STATES  # TextEmbebddingLayer.prompt_normal
    anomalous_states: tuple[str, ...] = ANOMALOUS_STATES  # TextEmbebddingLayer.prompt_abnormal
    templates: tuple[str, ...] = TEMPLATES  # TextEmbebddingLayer.prompt_templates
    # -- similarity, maps and HSF ---------------------------------------------------------------------------------
    logit_scale: float = 100.0  # 100.0 * patch @ text and 100.0 * image @ text
    map_align_corners: bool = True  # quirk: F.interpolate(..., align_corners=True) of the layer logits
    blur_sigma: float = 4.0  # trainer.evaluation / test.py gaussian_filter(sigma=4)
    use_hsf: bool = True  # --use_hsf True: hybrid semantic fusion for the image score
    k_clusters: int = 20  # --k_clusters 20
    hsf_top_factor: int = 5  # HybridSemanticFusion.n_aggregate_patch_tokens = k_clusters * 5
    hsf_alpha: float = 0.2  # visual_text_similarity: alpha * clustered + (1 - alpha) * class feature
    kmeans_seed: int | None = 0  # OUR deviation: each image's KMeans seeded; None = NumPy's global RNG (reference)
    # -- training (train.py / trainer.py / loss.py) ---------------------------------------------------------------
    image_loss_weight: float = 1.0  # loss = focal(image probabilities) + seg_loss
    pixel_loss_weight: float = 1.0  # seg_loss = sum_l focal + dice(anomalous, mask) + dice(normal, 1 - mask)
    focal_gamma: float = 2.0  # FocalLoss() default
    dice_per_row: bool = True  # quirk: BinaryDiceLoss on a squeezed [S, S] mask counts rows as samples
    optimizer: str = "adamw"  # torch.optim.AdamW
    lr: float = 0.01  # --learning_rate 0.01
    betas: tuple[float, float] = (0.5, 0.999)  # AdamW(betas=(0.5, 0.999))
    weight_decay: float = 0.01  # AdamW's default weight decay (trainer.py passes none)
    epochs: int = 5  # --epoch 5
    batch_size: int = 1  # --batch_size 1 (train.py refuses any other)
    seed: int = 111  # setup_seed(111); here it also seeds the initialisation


def build_learned_modules(config: AdaCLIPConfig, vision_width: int, text_width: int, embed_dim: int,
                          generator: torch.Generator | None = None) -> dict[str, nn.Module]:
    """The learned modules (what the reference's trainer updates), by attribute name; shapes only depend on the
    widths, so the parameter count at any backbone can be computed without one."""
    n, depth = int(config.prompting_length), int(config.prompting_depth)
    branch, kind = config.prompting_branch, config.prompting_type
    modules: dict[str, nn.Module] = {}
    for name, on, width in (("text_prompts", "L" in branch, text_width), ("visual_prompts", "V" in branch,
                                                                          vision_width)):
        if on and "S" in kind:
            modules[name] = nn.ParameterList(
                nn.Parameter(torch.empty(n, width).normal_(std=config.init_std, generator=generator))
                for _ in range(depth))
    modules["patch_projections"] = nn.ModuleList(nn.Linear(vision_width, embed_dim) for _ in config.layers)
    modules["global_projection"] = nn.Linear(embed_dim, embed_dim)
    if "D" in kind:  # built whenever dynamic prompts are on (as the reference), used by the prompted branches
        modules["dynamic_visual"] = nn.ModuleList(nn.Linear(embed_dim, vision_width) for _ in range(n))
        modules["dynamic_text"] = nn.ModuleList(nn.Linear(embed_dim, text_width) for _ in range(n))
    return modules


_REFERENCE_NAMES = (  # (their module path, ours); ``head.i`` of a ProjectLayer is our ModuleList index i
    ("text_prompter.static_prompts.", "text_prompts."),
    ("visual_prompter.static_prompts.", "visual_prompts."),
    ("patch_token_layer.head.", "patch_projections."),
    ("cls_token_layer.head.0.", "global_projection."),
    ("dynamic_visual_prompt_generator.head.", "dynamic_visual."),
    ("dynamic_text_prompt_generator.head.", "dynamic_text."),
)


def convert_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a checkpoint of the authors' ``AdaCLIP_Trainer.save`` (keys ``clip_model.<module>...``, e.g.
    ``clip_model.patch_token_layer.head.0.weight``) to :meth:`AdaCLIP.learned_state_dict` keys. Any other key is an
    error (not an AdaCLIP checkpoint)."""
    if not isinstance(state, dict) or not state:
        raise MethodError("an AdaCLIP reference checkpoint is a non-empty state dict (AdaCLIP_Trainer.save)")
    out, unknown = {}, []
    for key, value in state.items():
        name = key[len("clip_model."):] if key.startswith("clip_model.") else key
        for theirs, ours in _REFERENCE_NAMES:
            if name.startswith(theirs):
                out[ours + name[len(theirs):]] = value.float()
                break
        else:
            unknown.append(key)
    if unknown:
        raise MethodError(f"unexpected keys in the AdaCLIP checkpoint: {unknown[:4]}")
    return out


def hybrid_semantic_fusion(patches: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], k_clusters: int,
                           top: int, seed: int | None) -> torch.Tensor:
    """HSF (``HybridSemanticFusion.forward``): patches L x [B, N, D] (normalised), logits L x [B, N, 2] -> [B, D].

    The top ``top`` patches by softmax(mean_l logits)[anomalous] are clustered (sklearn KMeans on their tokens of all
    layers side by side, detached); the result is normalise(mean over the non-empty clusters of each cluster's mean
    token over its members and all layers). Gradients flow through the tokens, not the cluster labels.
    """
    from sklearn.cluster import KMeans

    probability = torch.stack(list(logits), dim=1).mean(dim=1).softmax(dim=-1)[..., 1]  # [B, N]
    k = min(probability.shape[1], int(top))
    indices = probability.topk(k, dim=1).indices  # [B, k]
    selected = torch.stack([p.gather(1, indices[..., None].expand(-1, -1, p.shape[-1])) for p in patches])
    stacked = selected.detach().permute(1, 2, 0, 3).reshape(indices.shape[0], k, -1).float().cpu().numpy()
    centres = []
    for b in range(indices.shape[0]):
        random_state = None if seed is None else int(seed)
        labels = KMeans(n_clusters=int(k_clusters), n_init="auto", random_state=random_state).fit_predict(stacked[b])
        counts = np.bincount(labels, minlength=int(k_clusters))
        weights = 1.0 / (np.count_nonzero(counts) * len(patches) * counts[labels])  # [k]
        weights = torch.as_tensor(weights, dtype=selected.dtype, device=selected.device)
        centres.append((selected[:, b] * weights[None, :, None]).sum(dim=(0, 1)))
    return F.normalize(torch.stack(centres), dim=1)


@dataclass
class _Outputs:
    """Differentiable intermediate results of one batch."""

    global_features: torch.Tensor  # [B, D] normalised (global_projection)
    text: torch.Tensor  # [B, 2, D] normalised (normal, anomalous)
    logits: list[torch.Tensor]  # L x [B, N, 2] (logit_scale * cos)
    image_features: torch.Tensor  # [B, D] what the image score uses (HSF mix, or the global feature)
    image_logits: torch.Tensor  # [B, 2]
    grid: tuple[int, int]


@register_method
class AdaCLIP(AnomalyMethod):
    """AdaCLIP: ``forward(images [B,3,S,S], class_names) -> MethodOutput``.

    ``extras``: ``"layer_maps"`` [B, L, S, S] (per layer softmax of the upsampled logits, anomalous channel, before
    fusion and blur); ``"image_probabilities"`` [B, 2]; ``"text_features"`` [B, 2, D] (each image's own text);
    ``"global_features"`` [B, D]; ``"image_features"`` [B, D] (after HSF).
    """

    name = "adaclip"
    config_class = AdaCLIPConfig
    uses_class_names = True  # the class name enters the prompt sentences
    trainable = True
    paper = "AdaCLIP (Cao et al., ECCV 2024)"

    def __init__(self, config: AdaCLIPConfig, backbone: Backbone):
        super().__init__(config, backbone)
        self._validate(config, backbone)
        self.layers = tuple(int(layer) for layer in config.layers)
        generator = torch.Generator().manual_seed(int(config.seed))
        with seeded(int(config.seed) + 1):  # seeded Linear initialisation that leaves the global RNGs alone
            modules = build_learned_modules(config, backbone.vision_width, backbone.text_width, backbone.embed_dim,
                                            generator=generator)
        for name, module in modules.items():
            setattr(self, name, module)
        self._token_cache: dict[str, torch.Tensor] = {}
        self.to(device=backbone.device)

    @staticmethod
    def _validate(config: AdaCLIPConfig, backbone: Backbone) -> None:
        check_layers(config.layers, backbone)
        check_options(config, prompting_type=("S", "D", "SD"), prompting_branch=("", "V", "L", "VL"),
                      optimizer=("adam", "adamw"))
        check_map_settings(config)
        n_text = len(backbone.model.transformer.resblocks)
        if not 1 <= int(config.prompting_depth) <= min(backbone.num_layers, n_text):
            raise MethodError(f"prompting_depth must be in 1..{min(backbone.num_layers, n_text)}, "
                              f"got {config.prompting_depth}")
        if int(config.prompting_length) < 1:
            raise MethodError(f"prompting_length must be >= 1, got {config.prompting_length}")
        if backbone.grid_size[0] != backbone.grid_size[1]:
            raise MethodError(f"AdaCLIP needs a square patch grid, got {backbone.grid_size}")
        patches = backbone.grid_size[0] * backbone.grid_size[1]
        top = min(patches, int(config.k_clusters) * int(config.hsf_top_factor))
        if config.use_hsf and not 1 <= int(config.k_clusters) <= top:
            raise MethodError(f"k_clusters must be in 1..{patches} (patches) and hsf_top_factor >= 1, got "
                              f"{config.k_clusters}, {config.hsf_top_factor}")
        if not (config.normal_states and config.anomalous_states and config.templates):
            raise MethodError("normal_states, anomalous_states and templates must not be empty")

    # -- prompts ---------------------------------------------------------------------------------------------
    def _dynamic(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Dynamic prompts ([B, n, W_v], [B, n, W_t]) from CLIP's own image embedding (no gradient to it)."""
        if "D" not in self.config.prompting_type:
            return None, None
        with torch.no_grad():
            embedding = self.backbone.encode_image(images).float()
        return (torch.stack([head(embedding) for head in self.dynamic_visual], dim=1),
                torch.stack([head(embedding) for head in self.dynamic_text], dim=1))

    def _context(self, static: nn.ParameterList | None, index: int, dynamic: torch.Tensor | None,
                 shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Prompt tokens of block ``index``: dynamic [B, n, W] + static [n, W], expanded to ``shape``
        ([B, copies, n, W] for text, [B, n, W] for vision) BEFORE the float16 rounding (as the reference)."""
        parts = []
        if static is not None:
            parts.append(static[index])
        if dynamic is not None:
            parts.append(dynamic if len(shape) == 3 else dynamic[:, None])
        context = parts[0] if len(parts) == 1 else parts[1] + parts[0]
        context = context.expand(*shape)
        if self.config.prompt_fp16_round:
            context = context.half()
        return context.to(dtype)

    # -- vision ----------------------------------------------------------------------------------------------
    def _vision(self, images: torch.Tensor, dynamic: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(pooled [B, D] = ln_post(class token) @ proj, patch tokens L x [B, N, W_v] raw residual stream)."""
        visual = self.backbone.visual
        prompted = "V" in self.config.prompting_branch
        n, depth = int(self.config.prompting_length), int(self.config.prompting_depth)
        static = getattr(self, "visual_prompts", None)
        x = visual._embeds(images.to(self.backbone.dtype))  # [B, 1 + N, W_v]
        taps = []
        for index, block in enumerate(visual.transformer.resblocks):
            if prompted and index < depth:
                context = self._context(static, index, dynamic, (x.shape[0], n, x.shape[-1]), x.dtype)
                x = torch.cat([x if index == 0 else x[:, :-n], context], dim=1)
            x = block(x)
            if index + 1 in self.layers:
                taps.append(x[:, 1:x.shape[1] - n] if prompted else x[:, 1:])
        return visual.ln_post(x[:, 0]) @ visual.proj, taps

    # -- text ------------------------------------------------------------------------------------------------
    def sentences(self, class_name: str) -> list[str]:
        """The 2 x (states x templates) sentences of ``class_name`` ('-' read as a space), normal first."""
        name = class_name.replace("-", " ")
        return [template.format(state.format(name)) for states in (self.config.normal_states,
                                                                    self.config.anomalous_states)
                for state in states for template in self.config.templates]

    def _tokens(self, class_name: str) -> torch.Tensor:
        if class_name not in self._token_cache:
            tokens = self.backbone.tokenize(self.sentences(class_name))
            eot = tokens.argmax(dim=-1)
            if "L" in self.config.prompting_branch and int(eot.min()) <= int(self.config.prompting_length):
                raise MethodError(f"a prompt sentence of {class_name!r} ends before the {self.config.prompting_length} "
                                  "replaced text positions")
            self._token_cache[class_name] = tokens
        return self._token_cache[class_name].to(self.backbone.device)

    def _encode_text(self, tokens: torch.Tensor, dynamic: torch.Tensor | None) -> torch.Tensor:
        """tokens [B, T, 77] -> [B, T, D]: the text tower with positions 1..n replaced before blocks 2..depth,
        cut after the last end-of-text token (causal attention: equal to the full length)."""
        model = self.backbone.model
        batch, count = tokens.shape[:2]
        flat = tokens.reshape(batch * count, -1)
        length = int(flat.argmax(dim=-1).max()) + 1
        n, depth = int(self.config.prompting_length), int(self.config.prompting_depth)
        prompted = "L" in self.config.prompting_branch
        static = getattr(self, "text_prompts", None)
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(flat[:, :length]).to(cast) + model.positional_embedding[:length].to(cast)
        mask = model.attn_mask[:length, :length]
        for index, block in enumerate(model.transformer.resblocks):
            if prompted and 1 <= index < depth:
                context = self._context(static, index, dynamic, (batch, count, n, x.shape[-1]), x.dtype)
                x = torch.cat([x[:, :1], context.reshape(batch * count, n, -1), x[:, 1 + n:]], dim=1)
            x = block(x, attn_mask=mask)
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), flat[:, :length].argmax(dim=-1)]
        projection = model.text_projection
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return x.reshape(batch, count, -1)

    def _group_mean(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, T, D] sentence embeddings -> [B, 2, D]: per state group mean of normalised rows, normalised."""
        normal = len(self.config.normal_states) * len(self.config.templates)
        embeddings = F.normalize(embeddings.float(), dim=-1)
        groups = [embeddings[:, :normal].mean(dim=1), embeddings[:, normal:].mean(dim=1)]
        return F.normalize(torch.stack(groups, dim=1), dim=-1)

    def text_features(self, class_names: Sequence[str], dynamic: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 2, D] normalised text of each image (its class name; its dynamic text prompts [B, n, W_t])."""
        if "L" not in self.config.prompting_branch:  # fixed handcrafted text: encoded once per class name
            with torch.no_grad():
                return self.cached_class_text(
                    class_names, lambda name: self._group_mean(self._encode_text(self._tokens(name)[None], None))[0])
        tokens = torch.stack([self._tokens(name) for name in class_names])
        if dynamic is None:  # static prompts only: the text of a class does not depend on the image
            unique = sorted(set(class_names))
            text = self._group_mean(self._encode_text(torch.stack([self._tokens(u) for u in unique]), None))
            return text[[unique.index(name) for name in class_names]]
        return self._group_mean(self._encode_text(tokens, dynamic))

    # -- heads -----------------------------------------------------------------------------------------------
    def _compute(self, images: torch.Tensor, class_names: Sequence[str]) -> _Outputs:
        config = self.config
        images = images.to(device=self.backbone.device)
        dynamic_visual, dynamic_text = self._dynamic(images)
        if "V" in config.prompting_branch:
            pooled, taps = self._vision(images, dynamic_visual)
        else:
            with torch.no_grad():
                pooled, taps = self._vision(images, None)
        text = self.text_features(class_names, dynamic_text)
        global_features = F.normalize(self.global_projection(pooled.float()), dim=-1)
        patches = [F.normalize(head(tokens.float()), dim=-1) for head, tokens in zip(self.patch_projections, taps)]
        logits = [config.logit_scale * (p @ text.transpose(1, 2)) for p in patches]
        image_features = global_features
        if config.use_hsf:
            fused = hybrid_semantic_fusion(patches, logits, int(config.k_clusters),
                                           int(config.k_clusters) * int(config.hsf_top_factor), config.kmeans_seed)
            image_features = F.normalize(config.hsf_alpha * fused + (1 - config.hsf_alpha) * global_features, dim=1)
        image_logits = config.logit_scale * (image_features[:, None] @ text.transpose(1, 2))[:, 0]
        return _Outputs(global_features, text, logits, image_features, image_logits, self.backbone.grid_size)

    def _upsampled(self, logits: torch.Tensor, grid, size) -> torch.Tensor:
        """[B, N, 2] -> [B, 2, H, W] bilinear (align_corners per config)."""
        x = logits.transpose(1, 2).reshape(logits.shape[0], 2, *grid)
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=bool(self.config.map_align_corners))

    # -- inference -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> MethodOutput:
        """Args: images [B, 3, S, S]; class_names: one per image ("object" when None).
        Returns: scores [B] in [0, 1]; maps [B, S, S] in [0, 1] (blurred)."""
        config = self.config
        names = self._class_names(class_names, images.shape[0])
        out = self._compute(images, names)
        size = tuple(images.shape[-2:])
        upsampled = torch.stack([self._upsampled(logits, out.grid, size) for logits in out.logits], dim=1)
        probabilities = upsampled.mean(dim=1).softmax(dim=1)  # [B, 2, S, S]
        maps = (probabilities[:, 1] + 1 - probabilities[:, 0]) / 2
        if config.blur_sigma > 0:
            maps = ops.gaussian_blur(maps, config.blur_sigma)
        image_probabilities = out.image_logits.softmax(dim=-1)
        return MethodOutput(scores=image_probabilities[:, 1], maps=maps, extras={
            "layer_maps": upsampled.softmax(dim=2)[:, :, 1], "image_probabilities": image_probabilities,
            "text_features": out.text, "global_features": out.global_features,
            "image_features": out.image_features})

    # -- training --------------------------------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor,
                      class_names: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``image_loss_weight * focal(softmax(image logits), label) + pixel_loss_weight * sum_l [focal(P_l, mask)
        + dice(P_l,anom, mask) + dice(P_l,norm, 1 - mask)]`` (trainer.train_one_batch).

        Returns (loss, parts) with ``"image_focal"`` and, with masks, ``"focal"`` and ``"dice"`` (sums over layers).
        """
        config = self.config
        names = self._class_names(class_names, images.shape[0])
        out = self._compute(images, names)
        labels = labels.to(out.image_logits.device).reshape(-1)
        image_focal = focal_loss(out.image_logits.softmax(dim=-1), (labels > 0.5).long(), gamma=config.focal_gamma)
        loss = config.image_loss_weight * image_focal
        parts = {"image_focal": float(image_focal.detach())}
        if masks is None:
            return loss, parts
        target = mask_targets(masks, images, out.image_logits.device)
        target_float = target.float()
        size = tuple(images.shape[-2:])
        focal_total = loss.new_zeros(())
        dice_total = loss.new_zeros(())
        for logits in out.logits:
            probs = self._upsampled(logits, out.grid, size).softmax(dim=1)  # [B, 2, S, S]
            focal_total = focal_total + focal_loss(probs, target, gamma=config.focal_gamma)
            for channel, goal in ((1, target_float), (0, 1 - target_float)):
                pred = probs[:, channel]
                if config.dice_per_row:
                    pred, goal = pred.reshape(-1, size[1]), goal.reshape(-1, size[1])
                dice_total = dice_total + dice_loss(pred, goal)
        loss = loss + config.pixel_loss_weight * (focal_total + dice_total)
        parts.update({"focal": float(focal_total.detach()), "dice": float(dice_total.detach())})
        return loss, parts

    # -- reference checkpoints -------------------------------------------------------------------------------
    def load_reference_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint written by the authors' ``AdaCLIP_Trainer.save`` (e.g.
        ``weights/pretrained_mvtec_colondb.pth``); keys and shapes are checked strictly."""
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        self.load_learned_state_dict(convert_reference_state_dict(state), source=str(path))

    def describe(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        record = super().describe(class_names)
        record["quirks"] = {name: getattr(self.config, name) for name in QUIRKS}
        record["kmeans_seed"] = self.config.kmeans_seed
        return record


def learned_parameter_count(config: AdaCLIPConfig | None = None, vision_width: int = 1024, text_width: int = 768,
                            embed_dim: int = 768) -> int:
    """Learned parameters of AdaCLIP at the given widths (defaults: ViT-L/14-336), without building a backbone."""
    config = config or AdaCLIPConfig()
    with torch.device("meta"):
        modules = build_learned_modules(config, vision_width, text_width, embed_dim)
    return sum(p.numel() for module in modules.values() for p in module.parameters())

