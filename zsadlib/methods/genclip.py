"""GenCLIP (2025): general query prompts, multi-layer vision prompts, dual-branch inference, name filtering.

There is no public code. This module builds the method from the paper's description (METHODS.md, "GenCLIP"); every
detail the paper leaves open is a config field whose default is marked **OUR choice** below and listed in
:data:`OUR_CHOICES` (which :meth:`GenCLIP.describe` copies into metrics.json).

What the method computes (shapes for a batch of B images, L tapped layers, D joint width, W text width)::

    features   frozen CLIP: patch tokens P_l [B, N, D] at layers 6/12/18/24 (ln_post @ proj), global g [B, D]
    GQP        learned context C [2, n_ctx, W] (normal, abnormal), shared by all layers and both branches,
               plus optional deep text prompts (as AnomalyCLIP)
    MVP        V_l = Linear_l(mean_patches(P_l)) [B, W], one single linear layer per tapped layer (paper; the
               2-layer MLP with ``mvp_linear=False``); added to every context token: context of layer l of
               image b = C + V_l[b]
    enhanced   prompts "[C + V_l] {name}." / "[C + V_l] damaged {name}." (name filtered, see below)
               -> text T_enh [B, L, 2, D]: every image and layer has its own text embeddings
    query      prompts "[C] object." / "[C] damaged object." -> text T_q [2, D] (no class name, no visual term)
    maps       per branch and layer: softmax(cos(P_l, T_l) / 0.07) [B, N, 2]; (p_abn + 1 - p_norm) / 2 upsampled
               bilinearly; combined over layers (sum or mean); Gaussian blur sigma 4
    scores     per branch: softmax(cos(g, T) / 0.07)[abnormal]; the enhanced branch uses the last tapped layer's
               text (OUR choice, ``enhanced_global_text``); ``score_from_map=True``: the maximum of the branch's
               final map instead (the fused score then is the maximum of the fused map)
    fused      w * enhanced + (1 - w) * query, for maps and scores (w = ``fusion_weight`` = 0.5)

All text embeddings of a batch -- the query prompts and the B x L x 2 enhanced prompts -- go through the text
encoder in ONE call (:meth:`GenCLIP.encode_prompts`).

Adaptive text prompt filtering (:mod:`zsadlib.prompts.filtering`): before prompting, class names that are not made
of single whole-word CLIP BPE tokens are replaced by "object" (``name_filter="single_token"``, OUR rule). The names
filtered so far are in :attr:`GenCLIP.filtered_names`, each forward's report in ``extras["filter_report"]``, and
both in :meth:`GenCLIP.describe`. ``soft_term_alignment=True`` (the journal version's "adaptive term alignment")
down-weights a filtered name instead of replacing it: with w = words / CLIP BPE tokens of the name (1 for a name of
whole-word tokens, lower the more the BPE cuts it), each enhanced text is
normalize(w * n(T[name]) + (1 - w) * n(T[replacement])), n = L2 normalisation (the mixing formula is OURS).

Training: ``enhanced_loss_weight * L(enhanced) + query_loss_weight * L(query)`` with, per branch,
``L = pixel_loss_weight * sum_layers [focal + dice(p_abn, mask) + dice(p_norm, 1 - mask)]
+ image_loss_weight * CE(image logits)``. Only the GQP context, the deep prompts and the MVP MLPs learn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..backbone import Backbone, ImageFeatures
from ..losses import image_cross_entropy, layer_pixel_losses
from ..prompts.filtering import FILTER_RULES, FilterReport, filter_class_names, prompt_form
from ..prompts.learned import LearnedPromptConfig, LearnedPromptText, fill_placeholder
from ..utils import seeded
from .base import (AnomalyMethod, MethodConfig, MethodError, MethodOutput, check_layers, check_map_settings,
                   check_options, mask_targets, register_method)

__all__ = [
    "GenCLIPConfig",
    "GenCLIP",
    "VisualPromptMLP",
    "QUERY_TEMPLATES",
    "ENHANCED_TEMPLATES",
    "OUR_CHOICES",
    "BRANCHES",
]

# "{}" = the learned context; "{name}" = the (filtered) class name. Row 0 normal, row 1 abnormal.
QUERY_TEMPLATES: tuple[str, str] = ("{} object.", "{} damaged object.")
ENHANCED_TEMPLATES: tuple[str, str] = ("{} {name}.", "{} damaged {name}.")
BRANCHES = ("fused", "enhanced", "query")
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "identity": nn.Identity}

#: Every default not published by the GenCLIP paper, with the reason for the choice.
OUR_CHOICES: dict[str, str] = {
    "dense_from": "dense V-V path from block 6 as AnomalyCLIP (the paper does not say); None = plain CLIP tokens",
    "dense_attention": "'vv' as AnomalyCLIP",
    "global_ln_post": "True: the global token is CLIP's own image embedding (no reference-code quirk to copy)",
    "n_ctx": "12 learned context tokens per prompt, as AnomalyCLIP",
    "query_templates": "the query-only branch uses the object-agnostic word 'object' (AnomalyCLIP's prompts)",
    "enhanced_templates": "'[ctx] {name}.' / '[ctx] damaged {name}.' (AnomalyCLIP's states with the class name)",
    "deep_prompts": "on, AnomalyCLIP's deep text prompts (text blocks 2..9, 4 tokens)",
    "deep_prompt_fp16_round": "False: the float16 rounding is an AnomalyCLIP code quirk, not part of GenCLIP",
    "mvp_hidden": "with mvp_linear=False only: None = embed_dim // 2 (ViP2-CLIP's MetaNet 768-384-768 shape)",
    "mvp_activation": "with mvp_linear=False only: ReLU between the two Linear layers (CoCoOp's meta-net)",
    "mvp_normalize": "patch features are L2-normalised before the mean (as the similarity uses them)",
    "mvp_per_prompt": "False: one visual vector shared by the normal and abnormal context",
    "layer_fusion": "'sum' over layers as AnomalyCLIP's test.py",
    "enhanced_global_text": "'last': the enhanced branch scores the global token with the last tapped layer's text",
    "score_from_map": "False: image scores from the global token against the text (AnomalyCLIP's); the available "
                      "paper text does not say; third-party summaries say the maximum of the map (True)",
    "fusion_weight": "0.5 weighted mean of the two branches (METHODS.md)",
    "name_filter": "'single_token': every word must be one whole-word CLIP BPE token",
    "pixel_loss_weight": "1.0 on the per-layer focal + dice sum (AnomalyCLIP paper, 4 layers)",
    "enhanced_loss_weight": "1.0: both branches trained, losses summed",
    "query_loss_weight": "1.0: both branches trained, losses summed",
    "betas": "Adam (0.5, 0.999) as AnomalyCLIP",
    "epochs": "15 as AnomalyCLIP",
    "seed": "111 as AnomalyCLIP",
}


@dataclass
class GenCLIPConfig(MethodConfig):
    """GenCLIP settings. "paper" marks what the GenCLIP paper / the common ground fixes; "OUR choice" marks
    defaults the paper does not publish (see :data:`OUR_CHOICES`)."""

    backbone: str = "ViT-L-14-336-quickgelu"  # paper: OpenAI CLIP ViT-L/14@336px
    pretrained: str | None = "openai"  # paper: OpenAI weights
    image_size: int = 518  # common ground: 518 px input, 37 x 37 patches
    pos_embed_resize: str = "bilinear"  # "bilinear" (AnomalyCLIP-style run-time resize) | "bicubic_antialias"
    layers: tuple[int, ...] = (6, 12, 18, 24)  # paper: tapped vision blocks (1-based), one MVP MLP each
    dense_from: int | None = 6  # OUR choice: dense V-V dual path on blocks 6..24 as AnomalyCLIP; None = plain CLIP
    dense_attention: str = "vv"  # OUR choice: "vv" (AnomalyCLIP) | "qkv_sum" (Crane's E-Attn)
    global_ln_post: bool = True  # OUR choice: ln_post on the global token (open_clip's image embedding)
    # -- GQP: general query prompts ----------------------------------------------------------------------------
    n_ctx: int = 12  # OUR choice: learned context tokens per prompt (AnomalyCLIP's 12)
    query_templates: tuple[str, ...] = QUERY_TEMPLATES  # OUR choice: query-only branch prompts, object-agnostic
    enhanced_templates: tuple[str, ...] = ENHANCED_TEMPLATES  # OUR choice: vision-enhanced prompts with {name}
    deep_prompts: bool = True  # OUR choice: deep text prompts on (AnomalyCLIP's)
    deep_depth: int = 9  # with deep_prompts: learned tokens at the inputs of text blocks 2..deep_depth
    deep_length: int = 4  # with deep_prompts: tokens per layer, replacing token positions 1..deep_length
    deep_prompt_fp16_round: bool = False  # OUR choice: no float16 rounding (an AnomalyCLIP code quirk)
    init_std: float = 0.02  # N(0, 0.02^2) initialisation of the context and deep tokens (CoOp / AnomalyCLIP)
    # -- MVP: multi-layer vision prompts -----------------------------------------------------------------------
    mvp_linear: bool = True  # paper, multi-layer prompting: V_i = MLP_i(mean(F_i)) where MLP_i is one learnable
    # single-layer linear projection per layer, added to the shared query prompt tokens (the paper's own text was not
    # available here: this is its formula as themoonlight.io's summary of arXiv 2504.14919v1 gives it, section not
    # named there). False = a 2-layer MLP (mvp_hidden, mvp_activation; our first guess)
    mvp_hidden: int | None = None  # with mvp_linear=False: hidden width of each 2-layer MLP; None = embed_dim // 2
    mvp_activation: str = "relu"  # with mvp_linear=False: "relu" | "gelu" | "tanh" | "identity"
    mvp_normalize: bool = True  # OUR choice: L2-normalise patch features before taking their mean
    mvp_per_prompt: bool = False  # OUR choice: False = one [W] vector added to both prompts' context tokens;
    # True = separate vectors for the normal and abnormal context ([2, W] per layer)
    # -- adaptive text prompt filtering --------------------------------------------------------------------------
    name_filter: str = "single_token"  # OUR rule (paper's unpublished): see zsadlib.prompts.filtering.FILTER_RULES
    filter_replacement: str = "object"  # paper: filtered names become "object"
    soft_term_alignment: bool = False  # journal version (Pattern Recognition 2026, "adaptive term alignment ...
    # down-weights uninformative textual terms"): a filtered name stays in the prompt, its enhanced text mixed with
    # the replacement's by w = words / BPE tokens (OUR formula, see the module docstring). False = the conference
    # paper's replacement
    # -- inference ----------------------------------------------------------------------------------------------
    temperature: float = 0.07  # common ground: cos / 0.07
    layer_fusion: str = "sum"  # OUR choice: "sum" (AnomalyCLIP test.py) | "mean" over layers
    blur_sigma: float = 4.0  # common ground: Gaussian sigma 4 in pixels; 0 = none
    enhanced_global_text: str = "last"  # OUR choice: text of the enhanced branch's image score: "last" tapped
    # layer's text embeddings | "mean" (normalised mean over layers)
    fusion_weight: float = 0.5  # paper: weighted mean of the branches (weight unpublished: 0.5, METHODS.md)
    score_from_map: bool = False  # OUR choice: False = softmax(cos(global, text) / T)[abnormal] per branch; True =
    # the maximum of each branch's final map (third-party summaries; not in the paper text available to us)
    branch: str = "fused"  # what forward returns: "fused" | "enhanced" | "query"
    # -- training -----------------------------------------------------------------------------------------------
    pixel_loss_weight: float = 1.0  # OUR choice: weight of sum over layers of focal + 2 dice (AnomalyCLIP paper)
    image_loss_weight: float = 1.0  # weight of the image cross-entropy
    enhanced_loss_weight: float = 1.0  # OUR choice: both branches' losses summed
    query_loss_weight: float = 1.0  # OUR choice: both branches' losses summed
    focal_gamma: float = 2.0  # focal loss gamma (reference FocalLoss default)
    lr: float = 1e-3  # common ground: Adam lr 1e-3
    betas: tuple[float, float] = (0.5, 0.999)  # OUR choice: AnomalyCLIP's Adam betas
    epochs: int = 15  # OUR choice: AnomalyCLIP's 15
    batch_size: int = 8  # common ground: batch 8
    seed: int = 111  # OUR choice: AnomalyCLIP's; also seeds the prompt and MLP initialisation


class VisualPromptMLP(nn.Module):
    """MVP for one layer: ``Linear(D, hidden) -> activation -> Linear(hidden, out)`` (parameters ``fc1``, ``fc2``), or
    with ``linear=True`` the paper's single ``Linear(D, out)`` (parameter ``fc``); [..., D] -> [..., out]."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, activation: str = "relu", linear: bool = False):
        super().__init__()
        if linear:
            self.fc = nn.Linear(in_dim, out_dim)
        else:
            self.fc1 = nn.Linear(in_dim, hidden)
            self.act = _ACTIVATIONS[activation]()
            self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "fc"):
            return self.fc(x)
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class _BranchOutputs:
    """Differentiable intermediate results of one batch (both branches)."""

    features: ImageFeatures
    prompt_names: list[str]
    report: FilterReport
    visual_prompts: torch.Tensor  # [B, L, P', W]
    text_query: torch.Tensor  # [2, D] normalised
    text_enhanced: torch.Tensor  # [B, L, 2, D] normalised
    probs_query: list[torch.Tensor]  # L x [B, N, 2]
    probs_enhanced: list[torch.Tensor]  # L x [B, N, 2]
    logits_query: torch.Tensor  # [B, 2]
    logits_enhanced: torch.Tensor  # [B, 2]
    term_weights: torch.Tensor | None = None  # [B] with soft_term_alignment


@register_method
class GenCLIP(AnomalyMethod):
    """GenCLIP: ``forward(images [B,3,S,S], class_names list[str] | None) -> MethodOutput``.

    ``scores`` [B] and ``maps`` [B, S, S] are those of ``config.branch`` ("fused" by default). ``extras``:

    * ``"enhanced_maps"``, ``"query_maps"``, ``"fused_maps"`` [B, S, S]; ``"enhanced_scores"``, ``"query_scores"``,
      ``"fused_scores"`` [B];
    * ``"enhanced_layer_maps"``, ``"query_layer_maps"`` [B, L, S, S] (per-layer maps before layer fusion and blur)
      and ``"layer_maps"`` (those of the returned branch; fused = weighted mean of the two);
    * ``"text_features_query"`` [2, D], ``"text_features_enhanced"`` [B, L, 2, D] (normalised),
      ``"visual_prompts"`` [B, L, P', W] (MVP outputs, P' = 2 if ``mvp_per_prompt`` else 1);
    * ``"prompt_names"`` (one per image, after filtering) and ``"filter_report"`` (:class:`FilterReport`).

    Learned parameters: ``text.context`` [2, n_ctx, W], ``text.deep_prompts`` [deep_depth - 1, deep_length, W]
    (with deep prompts), ``mvp.<l>.fc`` (one linear layer per tapped layer; ``mvp.<l>.fc1/fc2`` with
    ``mvp_linear=False``).
    """

    name = "genclip"
    config_class = GenCLIPConfig
    uses_class_names = True
    trainable = True
    paper = "GenCLIP (2025)"

    def __init__(self, config: GenCLIPConfig, backbone: Backbone):
        super().__init__(config, backbone)
        self._validate(config, backbone)
        self.layers = tuple(int(layer) for layer in config.layers)
        self.dense_from = None if config.dense_from is None else int(config.dense_from)
        deep_layers = tuple(range(2, int(config.deep_depth) + 1)) if config.deep_prompts else ()
        prompt_config = LearnedPromptConfig(
            templates=tuple(config.query_templates),
            n_ctx=config.n_ctx,
            deep_layers=deep_layers,
            n_deep=config.deep_length,
            deep_prompt_fp16_round=config.deep_prompt_fp16_round,
            init_std=config.init_std,
        )
        generator = torch.Generator().manual_seed(int(config.seed))
        # GQP: the learned context (and deep prompts) of this module are shared by both branches
        self.text = LearnedPromptText(backbone, prompt_config, generator=generator)
        embed_dim, width = backbone.embed_dim, backbone.text_width
        hidden = int(config.mvp_hidden) if config.mvp_hidden else max(1, embed_dim // 2)
        self.mvp_prompts = 2 if config.mvp_per_prompt else 1
        with seeded(int(config.seed) + 1):  # seeded MLP initialisation that leaves the global RNGs alone
            self.mvp = nn.ModuleList(
                VisualPromptMLP(embed_dim, hidden, self.mvp_prompts * width, config.mvp_activation,
                                linear=config.mvp_linear)
                for _ in self.layers
            )
        self.mvp.to(device=backbone.device, dtype=self.text.context.dtype)
        self._name_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.filtered_names: set[str] = set()
        self.kept_names: set[str] = set()
        self.last_filter_report: FilterReport | None = None

    @staticmethod
    def _validate(config: GenCLIPConfig, backbone: Backbone) -> None:
        check_layers(config.layers, backbone)
        if config.dense_from is not None and not 1 <= int(config.dense_from) <= backbone.num_layers:
            raise MethodError(f"dense_from must be None or in 1..{backbone.num_layers}, got {config.dense_from}")
        check_options(config, dense_attention=("vv", "qkv_sum"), mvp_activation=tuple(sorted(_ACTIVATIONS)),
                      name_filter=tuple(sorted(FILTER_RULES)), layer_fusion=("sum", "mean"),
                      enhanced_global_text=("last", "mean"), branch=tuple(BRANCHES))
        for field_name in ("query_templates", "enhanced_templates"):
            templates = tuple(getattr(config, field_name))
            if len(templates) != 2:
                raise MethodError(f"{field_name} needs 2 templates (normal, abnormal), got {templates}")
            for template in templates:
                if template.count("{}") != 1:
                    raise MethodError(f"{field_name}: {template!r} must hold one '{{}}' (the learned context)")
                wanted = 1 if field_name == "enhanced_templates" else 0
                if template.count("{name}") != wanted:
                    raise MethodError(f"{field_name}: {template!r} must hold '{{name}}' {wanted} time(s)")
        n_text_layers = len(backbone.model.transformer.resblocks)
        if config.deep_prompts and not 2 <= int(config.deep_depth) <= n_text_layers:
            raise MethodError(f"deep_depth must be in 2..{n_text_layers} with deep_prompts, got {config.deep_depth}")
        if config.mvp_hidden is not None and int(config.mvp_hidden) < 1:
            raise MethodError(f"mvp_hidden must be None or >= 1, got {config.mvp_hidden}")
        if not 0.0 <= float(config.fusion_weight) <= 1.0:
            raise MethodError(f"fusion_weight must be in [0, 1], got {config.fusion_weight}")
        check_map_settings(config)

    # -- class names -----------------------------------------------------------------------------------------------
    def filter_names(self, class_names: Sequence[str]) -> tuple[list[str], FilterReport]:
        """Apply ``config.name_filter``: one prompt name per class name, and the report; records the outcome in
        :attr:`filtered_names` / :attr:`kept_names`."""
        prompt_names, report = filter_class_names(list(class_names), self.config.name_filter,
                                                  self.config.filter_replacement)
        self.filtered_names.update(report.filtered)
        self.kept_names.update(report.kept)
        self.last_filter_report = report
        return prompt_names, report

    def _name_tokens(self, prompt_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [2, 77] of the enhanced prompts for one prompt name, and the context positions [2, n_ctx]."""
        if prompt_name not in self._name_cache:
            with torch.inference_mode(False):  # cached for training too: never store inference tensors
                self._name_cache[prompt_name] = self._tokenize_name(prompt_name)
        return self._name_cache[prompt_name]

    def _tokenize_name(self, prompt_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [2, 77] and context positions [2, n_ctx] of the two enhanced prompts for one name."""
        placeholder = self.text.config.placeholder
        marker = int(self.backbone.tokenize([placeholder])[0, 1])
        context_length = int(self.backbone.model.positional_embedding.shape[0])
        ids_rows, position_rows = [], []
        for template in self.config.enhanced_templates:
            named = template.replace("{name}", prompt_name)
            text = fill_placeholder(named, self.text.n_ctx, placeholder)
            ids = self.backbone.tokenize([text])[0].cpu()
            prefix = named.split("{}", 1)[0].strip()
            start = 1 + (int((self.backbone.tokenize([prefix])[0] != 0).sum()) - 2 if prefix else 0)
            end = start + self.text.n_ctx
            if int((ids != 0).sum()) >= context_length or not bool((ids[start:end] == marker).all()):
                raise MethodError(f"the prompt {text!r} does not fit CLIP's {context_length}-token context "
                                  f"(class name {prompt_name!r} too long?)")
            ids_rows.append(ids)
            position_rows.append(torch.arange(start, end))
        return torch.stack(ids_rows), torch.stack(position_rows)

    # -- pieces ------------------------------------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> ImageFeatures:
        """Frozen-CLIP features (no gradients): patch tokens at ``layers`` (dense path if on), global token."""
        with torch.no_grad():
            return self.backbone.forward_features(
                images.to(device=self.backbone.device),
                layers=self.layers,
                dense_from=self.dense_from,
                dense_attention=self.config.dense_attention,
                global_ln_post=self.config.global_ln_post,
            )

    def visual_prompts(self, features: ImageFeatures) -> torch.Tensor:
        """MVP: [B, L, P', W], ``V_l = MLP_l(mean over patches of layer l's projected patch features)``."""
        dtype = self.text.context.dtype
        out = []
        for mlp, patches in zip(self.mvp, features.patch_embeddings):
            patches = patches.to(dtype)
            if self.config.mvp_normalize:
                patches = F.normalize(patches, dim=-1)
            out.append(mlp(patches.mean(dim=1)))  # [B, P' * W]
        stacked = torch.stack(out, dim=1)  # [B, L, P' * W]
        return stacked.reshape(stacked.shape[0], stacked.shape[1], self.mvp_prompts, -1)

    def encode_prompts(self, prompt_names: Sequence[str], visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings of both branches in ONE text-encoder call.

        Args:
            prompt_names: B prompt names (already filtered).
            visual: [B, L, P', W] visual prompts (added to the learned context of the enhanced prompts).
        Returns:
            ``(query [2, D], enhanced [B, L, 2, D])``, not normalised.
        """
        batch, n_layers = visual.shape[:2]
        if len(prompt_names) != batch:
            raise MethodError(f"{len(prompt_names)} prompt names for {batch} images")
        text = self.text
        model = self.backbone.model
        device = text.context.device
        dtype = text.context.dtype
        query = text.prompt_embeddings(None)  # [2, 77, W]: "[C] object." / "[C] damaged object."
        tokens = [self._name_tokens(name) for name in prompt_names]
        ids = torch.stack([t[0] for t in tokens]).to(device)  # [B, 2, 77]
        positions = torch.stack([t[1] for t in tokens]).to(device)  # [B, 2, n_ctx]
        prompts, length = ids.shape[1], ids.shape[2]
        width = query.shape[-1]
        base = model.token_embedding(ids).to(dtype)  # [B, 2, 77, W]
        base = base[:, None].expand(batch, n_layers, prompts, length, width)
        context = text.context[None, None] + visual.to(dtype)[:, :, :, None, :]  # [B, L, 2, n_ctx, W]
        index = positions[:, None, :, :, None].expand(batch, n_layers, prompts, text.n_ctx, width)
        enhanced = torch.scatter(base, 3, index, context)  # context spliced in at its positions
        all_embeddings = torch.cat([query, enhanced.reshape(-1, length, width)], dim=0)
        all_ids = torch.cat([text.token_ids, ids[:, None].expand(batch, n_layers, prompts, length).reshape(-1, length)])
        encoded = text.encode(all_embeddings, all_ids)  # the one text-encoder call
        return encoded[:prompts], encoded[prompts:].reshape(batch, n_layers, prompts, -1)

    def term_weights(self, class_names: Sequence[str], report: FilterReport) -> torch.Tensor:
        """Adaptive term alignment: [B] weight of each class name, 1 for names the filter keeps, else
        ``words / CLIP BPE tokens`` of the name (``report.tokens``), e.g. "pipe_fryum" -> 2 / 3."""
        weights = []
        for name in class_names:
            pieces = report.tokens[str(name)]
            kept = str(name) in report.kept
            weights.append(1.0 if kept or not pieces else len(pieces) / sum(len(word) for word in pieces))
        return torch.tensor(weights, dtype=torch.float32)

    def _branches(self, images: torch.Tensor, class_names: Sequence[str] | None) -> _BranchOutputs:
        config = self.config
        names = self._class_names(class_names, images.shape[0])
        prompt_names, report = self.filter_names(names)
        features = self.image_features(images)
        visual = self.visual_prompts(features)  # [B, L, P', W]
        weights = self.term_weights(names, report) if config.soft_term_alignment else None
        if weights is not None and bool((weights < 1).any()):
            prompt_names = [prompt_form(name) for name in names]  # every name stays, down-weighted below
            batch = len(names)
            replacements = [config.filter_replacement] * batch
            query, both = self.encode_prompts(prompt_names + replacements, torch.cat([visual, visual]))
            named = F.normalize(both[:batch].float(), dim=-1)
            replaced = F.normalize(both[batch:].float(), dim=-1)
            w = weights.to(named.device).view(-1, 1, 1, 1)
            text_enhanced = F.normalize(w * named + (1 - w) * replaced, dim=-1)  # [B, L, 2, D]
        else:
            query, enhanced = self.encode_prompts(prompt_names, visual)
            text_enhanced = F.normalize(enhanced.float(), dim=-1)  # [B, L, 2, D]
        text_query = F.normalize(query.float(), dim=-1)  # [2, D]
        temperature = config.temperature
        probs_query, probs_enhanced = [], []
        for index, patches in enumerate(features.patch_embeddings):
            patches = patches.float()
            probs_query.append(ops.anomaly_probability(patches, text_query, temperature))
            probs_enhanced.append(ops.anomaly_probability(patches, text_enhanced[:, index], temperature))
        global_embedding = F.normalize(features.global_embedding.float(), dim=-1)  # [B, D]
        logits_query = global_embedding @ text_query.transpose(0, 1) / temperature
        if config.enhanced_global_text == "last":
            global_text = text_enhanced[:, -1]  # [B, 2, D]
        else:
            global_text = F.normalize(text_enhanced.mean(dim=1), dim=-1)
        logits_enhanced = torch.einsum("bd,bcd->bc", global_embedding, global_text) / temperature
        return _BranchOutputs(features, prompt_names, report, visual, text_query, text_enhanced,
                              probs_query, probs_enhanced, logits_query, logits_enhanced, weights)

    # -- inference ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> MethodOutput:
        """Args: images [B, 3, S, S]; class_names: B names (None: "object" for every image).
        Returns: scores [B] in [0, 1] and maps [B, S, S] of ``config.branch``; see the class docstring for extras."""
        config = self.config
        size = tuple(images.shape[-2:])
        out = self._branches(images, class_names)
        grid = out.features.grid_size
        enhanced_layers = ops.layer_maps(out.probs_enhanced, grid, size)  # [B, L, S, S]
        query_layers = ops.layer_maps(out.probs_query, grid, size)
        both = torch.stack([ops.fuse_layers(enhanced_layers, config.layer_fusion),
                            ops.fuse_layers(query_layers, config.layer_fusion)], dim=1)  # [B, 2, S, S]
        if config.blur_sigma > 0:
            both = ops.gaussian_blur(both, config.blur_sigma)
        enhanced_maps, query_maps = both[:, 0], both[:, 1]
        w = float(config.fusion_weight)
        fused_maps = w * enhanced_maps + (1.0 - w) * query_maps
        if config.score_from_map:
            enhanced_scores, query_scores, fused_scores = (m.amax(dim=(-2, -1))
                                                           for m in (enhanced_maps, query_maps, fused_maps))
        else:
            enhanced_scores = out.logits_enhanced.softmax(dim=-1)[:, 1]
            query_scores = out.logits_query.softmax(dim=-1)[:, 1]
            fused_scores = w * enhanced_scores + (1.0 - w) * query_scores
        if config.branch == "enhanced":
            scores, maps, returned_layers = enhanced_scores, enhanced_maps, enhanced_layers
        elif config.branch == "query":
            scores, maps, returned_layers = query_scores, query_maps, query_layers
        else:
            scores, maps = fused_scores, fused_maps
            returned_layers = w * enhanced_layers + (1.0 - w) * query_layers
        extras: dict[str, Any] = {
            "enhanced_maps": enhanced_maps, "query_maps": query_maps, "fused_maps": fused_maps,
            "enhanced_scores": enhanced_scores, "query_scores": query_scores, "fused_scores": fused_scores,
            "enhanced_layer_maps": enhanced_layers, "query_layer_maps": query_layers, "layer_maps": returned_layers,
            "text_features_query": out.text_query, "text_features_enhanced": out.text_enhanced,
            "visual_prompts": out.visual_prompts, "prompt_names": out.prompt_names, "filter_report": out.report,
        }
        if out.term_weights is not None:
            extras["term_weights"] = out.term_weights
        return MethodOutput(scores=scores, maps=maps, extras=extras)

    # -- training ----------------------------------------------------------------------------------------------------
    def _pixel_loss(self, probs: list[torch.Tensor], grid, size, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Sum over layers of focal and of both dice terms, on the upsampled 2-channel probabilities."""
        pixel_probs = [ops.pixel_probabilities(p, grid, size) for p in probs]
        return layer_pixel_losses(pixel_probs, target, gamma=self.config.focal_gamma)

    def training_loss(self, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor,
                      class_names: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``enhanced_loss_weight * L_enh + query_loss_weight * L_query``; per branch
        ``L = pixel_loss_weight * sum_layers [focal + dice(p_abn, mask) + dice(p_norm, 1 - mask)]
        + image_loss_weight * CE``.

        Args:
            images: [B, 3, S, S]; masks: [B, S, S] (bool, or float > 0.5 anomalous) or None (image loss only);
            labels: [B] 0/1; class_names: B names (filtered before prompting).
        Returns:
            (loss, parts): ``"enhanced_image_ce"``, ``"query_image_ce"`` and, with masks, ``"enhanced_focal"``,
            ``"enhanced_dice"``, ``"query_focal"``, ``"query_dice"`` (unweighted sums over layers).
        """
        config = self.config
        out = self._branches(images, class_names)
        device = out.logits_query.device
        labels = labels.to(device).reshape(-1)
        parts: dict[str, float] = {}
        branch_losses = {}
        for branch, logits in (("enhanced", out.logits_enhanced), ("query", out.logits_query)):
            ce = image_cross_entropy(logits, labels)
            parts[f"{branch}_image_ce"] = float(ce.detach())
            branch_losses[branch] = config.image_loss_weight * ce
        if masks is not None:
            size = tuple(images.shape[-2:])
            target = mask_targets(masks, images, device)
            grid = out.features.grid_size
            for branch, probs in (("enhanced", out.probs_enhanced), ("query", out.probs_query)):
                focal_total, dice_total = self._pixel_loss(probs, grid, size, target)
                parts[f"{branch}_focal"] = float(focal_total.detach())
                parts[f"{branch}_dice"] = float(dice_total.detach())
                branch_losses[branch] = branch_losses[branch] + config.pixel_loss_weight * (focal_total + dice_total)
        loss = (config.enhanced_loss_weight * branch_losses["enhanced"]
                + config.query_loss_weight * branch_losses["query"])
        return loss, parts

    # -- reporting ---------------------------------------------------------------------------------------------------
    def describe(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """With ``class_names`` (e.g. an evaluated dataset's classes) the filter report is computed for exactly those
        names; without, it lists every name this object has filtered or kept so far."""
        described = super().describe(class_names)
        if class_names is not None:
            _, report = filter_class_names(list(class_names), self.config.name_filter,
                                           replacement=self.config.filter_replacement)
            filtered, kept = sorted(report.filtered), sorted(report.kept)
        else:
            filtered, kept = sorted(self.filtered_names), sorted(self.kept_names)
        described["name_filter"] = {
            "rule": self.config.name_filter,
            "replacement": self.config.filter_replacement,
            "filtered": filtered,
            "kept": kept,
        }
        described["our_choices"] = dict(OUR_CHOICES)
        return described
