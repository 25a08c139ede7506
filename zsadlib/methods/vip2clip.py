"""ViP2-CLIP (2025): visual-perception prompting for zero-shot anomaly detection, with no class names.

What the method computes (checked against the authors' code, kim0806/ViP2-CLIP at commit 4b5884f: ``test.py``,
``train.py``, ``test.sh``, ``train.sh``, ``prompt_learner.py`` (``ICA``, ``Linearlayer``, ``FGP``),
``VIP2CLIP_lib/VIP2CLIP.py``, ``VIP2CLIP_lib/build_model.py``, ``utils.py`` (``get_similarity_map``), ``loss.py``;
the side branch ``patch_selecter_v1`` is not part of the method). Shapes for a batch of B images, L tapped layers,
N patches, D joint width, W text width::

    vision   plain CLIP (no dense path): patch tokens P_l [B, N, D] at layers 6/12/18/24 (ln_post @ proj),
             global g = class token of the last block @ proj, WITHOUT ln_post (reference quirk), normalised [B, D]
    ICA      image-conditioned prompts "[SOS] [ctx x n_ctx] <state> [c1 .. c_ncls] [EOS]" (no period, no class name)
             with separate learned contexts for the normal and anomalous prompt (ctx [2, n_ctx, W]);
             class tokens c = learned [n_cls, W] + MetaNet(g): n_cls MLPs  D -> 384 -> W  (Linear, ReLU, Linear)
             applied to (g + b), b a learned [1, D] bias the reference adds to the input -> [B, n_cls, W];
             the 2B prompts run through the frozen text tower -> t = normalise(text) [B, 2, D] (normal, anomalous)
    FGP      per layer l: 8-head cross-attention, queries = t, keys/values = normalise(P_l):
             q = Wq t, k = Wk P, v = Wv P (1x1 projections with bias), A = softmax_N(q k^T) (NO 1/sqrt(d): quirk),
             t_l = normalise(Wo (A v)) [B, 2, D]; one FGP module is shared by all layers (quirk)
    maps     s_l = cos(P_l, t_l) [B, N, 2]; p_l = softmax(s_l / 0.07); map_l = (p_anom + 1 - p_norm) / 2
             upsampled bilinearly to S x S; mean over layers; Gaussian blur sigma 8  -> maps [B, S, S]
    UTPA     per layer the top-k (k = 50) patches by p_anom; their raw cosines s_l[top-k] [B, k, 2] are pooled over
             all layers: m = mean over the L*k patches [B, 2]; score = softmax(m / 0.07)[anomalous] -> scores [B]

Training (``train.py``, ``train.sh``): ``sum_l [focal(p_l up) + dice(p_anom up, mask) + dice(p_norm up, 1 - mask)]
+ CE(m / 0.07, label)``; Adam (torch defaults, betas (0.9, 0.999)) with two groups: ICA at lr 1e-3, FGP at
lr * 0.01 = 1e-5; 10 epochs, batch 8, seed 111, n_ctx 7 and n_cls 3 (the scripts; ``train.py``'s argparse default
n_ctx is 9). About 4.15 M learned parameters at ViT-L/14 (4,149,120 here; the reference's FGP also holds an
unused scalar ``prompt_temp_l1``, so its modules count 4,149,121).

Reference quirks kept as fields (defaults reproduce the released code; the correction is one switch away):

* ``normal_prompt_damaged=True``: ``ICA`` embeds BOTH prompts from the anomalous token template, so the "normal"
  prompt contains the word "damaged" too (only its learned context differs); it pools at the end-of-text position
  of the "good" prompt, which is the same position. ``False`` embeds "good" in the normal prompt.
* ``fgp_shared=True``: one FGP module for all layers (``False``: one per layer).
* ``fgp_scaled=False``: FGP attention logits are q . k, without 1/sqrt(head_dim) (``True``: scaled).
* ``global_ln_post=False``: the global feature skips ``ln_post`` (``True``: CLIP's own image embedding).
* ``pos_embed_resize="bilinear"``: the positional embedding is resized bilinearly at run time.

METHODS.md vs code (the code wins): METHODS.md describes FGP "per layer"; the code has one FGP shared by all layers
(kept, as a quirk field). "The top-k patches across the 4 layers" is, in the code, the top-k of EACH layer (by that
layer's p_anom), their 4 x k raw cosines averaged. The MetaNet adds its learned bias to the MLP *input*, and its
input is the normalised global feature. The 768 -> 384 -> 768 MetaNet maps the joint width D to the text width W
(both 768 at ViT-L; the reference hard-codes 768).

Unused reference parameter: ``FGP.prompt_temp_l1`` (a scalar no forward uses) is dropped by
:func:`convert_reference_state_dict`, as are the ICA's token buffers (``load_reference_checkpoint`` checks that the
stored prompt token ids equal ours).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..backbone import Backbone, ImageFeatures
from ..losses import image_cross_entropy, layer_pixel_losses
from ..prompts.learned import LearnedPromptConfig, LearnedPromptText, fill_placeholder
from ..utils import seeded
from .base import (AnomalyMethod, MethodConfig, MethodError, MethodOutput, check_layers, check_map_settings,
                   check_options, mask_targets, register_method)

__all__ = [
    "ViP2CLIPConfig",
    "ViP2CLIP",
    "ImageConditionedPrompts",
    "MetaNet",
    "FineGrainedPerception",
    "convert_reference_state_dict",
    "QUIRKS",
]

#: The reference-code quirks, each a config field whose default reproduces the released code.
QUIRKS: dict[str, str] = {
    "normal_prompt_damaged": "True: the normal prompt is embedded from the anomalous template (it says 'damaged')",
    "fgp_shared": "True: one FGP module shared by all tapped layers",
    "fgp_scaled": "False: FGP attention logits without the 1/sqrt(head_dim) scale",
    "global_ln_post": "False: the global feature (MetaNet input) skips ln_post",
    "pos_embed_resize": "'bilinear': run-time bilinear resize of the positional embedding",
}

_PLACEHOLDER = "X"  # word tokenised at the learned positions (context and class tokens); its embedding is replaced


@dataclass
class ViP2CLIPConfig(MethodConfig):
    """ViP2-CLIP settings; defaults are the released code (train.sh / test.sh / train.py / test.py at 4b5884f)."""

    backbone: str = "ViT-L-14-336-quickgelu"  # VIP2CLIP_lib.load("ViT-L/14@336px"): OpenAI CLIP ViT-L/14@336px
    pretrained: str | None = "openai"  # OpenAI weights
    image_size: int = 518  # --image_size 518: a 37 x 37 patch grid
    pos_embed_resize: str = "bilinear"  # quirk: bilinear resize of the positional embedding at the first forward
    layers: tuple[int, ...] = (6, 12, 18, 24)  # --features_list 6 12 18 24 (1-based blocks, plain CLIP tokens)
    global_ln_post: bool = False  # quirk: global feature = class token @ proj without ln_post (VisionTransformer)
    # -- ICA: image-conditioned prompts -------------------------------------------------------------------------------
    n_ctx: int = 7  # --n_ctx 7 in train.sh / test.sh (train.py argparse default 9): context tokens per prompt
    n_cls: int = 3  # --n_cls 3: learned class tokens c1..c3 after the state word
    normal_state: str = "good"  # ICA.normal_state_prompt "good {}"
    anomalous_state: str = "damaged"  # ICA.abnormal_state_prompt "damaged {}"
    normal_prompt_damaged: bool = True  # quirk: both prompts embedded from the anomalous template (the normal
    # prompt contains "damaged"); False = the normal prompt says normal_state
    meta_hidden: int = 384  # Linearlayer hidden_dim=384: each MetaNet MLP is D -> 384 -> W
    meta_input_bias: bool = True  # ICA(use_bias=True): a learned [1, D] bias added to the MetaNet input
    init_std: float = 0.02  # N(0, 0.02^2) init of the contexts, class tokens and MetaNet bias (ICA)
    # -- FGP: fine-grained perception ---------------------------------------------------------------------------------
    fgp_heads: int = 8  # FGP(num_heads=8)
    fgp_shared: bool = True  # quirk: one FGP module for all layers (test.py / train.py build one fgp_learner)
    fgp_scaled: bool = False  # quirk: attention logits q.k * beta_t (beta_t = 1), no 1/sqrt(head_dim)
    # -- similarity, maps and UTPA ------------------------------------------------------------------------------------
    temperature: float = 0.07  # similarity / 0.07 (patch softmax and the UTPA image logits)
    topk: int = 50  # --topk 50: patches per layer pooled into the image score
    layer_fusion: str = "mean"  # anomaly_map.mean(dim=0) over layers (test.py) | "sum"
    blur_sigma: float = 8.0  # --sigma 8 (gaussian_filter); 0 = none
    # -- training (train.py / train.sh) -------------------------------------------------------------------------------
    pixel_loss_weight: float = 1.0  # sum over layers of focal + dice(anom, mask) + dice(normal, 1 - mask), weight 1
    image_loss_weight: float = 1.0  # weight of CE(UTPA logits, label): loss + anomaly_loss
    focal_gamma: float = 2.0  # FocalLoss() default gamma
    lr: float = 1e-3  # --learning_rate 0.001: Adam lr of the ICA parameters (contexts, class tokens, MetaNet)
    fgp_lr: float = 1e-5  # Adam lr of the FGP parameters (train.py: learning_rate * 0.01); scales with lr
    betas: tuple[float, float] = (0.9, 0.999)  # torch.optim.Adam defaults (train.py passes no betas)
    epochs: int = 10  # --epoch 10
    batch_size: int = 8  # --batch_size 8
    seed: int = 111  # --seed 111; here it also seeds the initialisation (independent of the global RNG)


def convert_reference_state_dict(checkpoint: dict[str, Any], fgp_copies: int = 1) -> dict[str, torch.Tensor]:
    """Map a reference checkpoint (``{"prompt_learner": ICA state dict, "Zero_try": FGP state dict}``, as
    ``train.py`` saves it) to :meth:`ViP2CLIP.learned_state_dict` keys.

    ``ctx_pos``/``ctx_neg`` [n_ctx, W] -> ``prompts.text.context`` [2, n_ctx, W]; ``cls_ctx`` ->
    ``prompts.class_tokens``;
    ``cls_prompter.bias`` -> ``prompts.meta.bias``; ``cls_prompter.fc.i.{0,2}`` -> ``prompts.meta.mlps.i.{fc1,fc2}``;
    FGP Conv1d(k=1) weights [out, in, 1] -> ``fgp.j.{q,k,v,out}_proj`` Linear weights [out, in] (copied to each of
    ``fgp_copies`` modules). Dropped: the ICA token buffers and FGP's unused ``prompt_temp_l1``. Any other key is an
    error (not a ViP2-CLIP checkpoint).
    """
    if not isinstance(checkpoint, dict) or "prompt_learner" not in checkpoint or "Zero_try" not in checkpoint:
        raise MethodError("a ViP2-CLIP reference checkpoint is a dict with 'prompt_learner' (ICA) and 'Zero_try' "
                          f"(FGP) state dicts; got keys {sorted(checkpoint) if isinstance(checkpoint, dict) else '?'}")
    ica, fgp = checkpoint["prompt_learner"], checkpoint["Zero_try"]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in ica.items():
        if key in ("ctx_pos", "ctx_neg") or key.startswith(("token_", "tokenized_prompts_")):
            continue
        if key == "cls_ctx":
            out["prompts.class_tokens"] = value
        elif key == "cls_prompter.bias":
            out["prompts.meta.bias"] = value
        elif key.startswith("cls_prompter.fc."):
            _, _, index, layer, kind = key.split(".")
            names = {"0": "fc1", "2": "fc2"}
            if layer not in names:
                unknown.append(f"prompt_learner.{key}")
                continue
            out[f"prompts.meta.mlps.{index}.{names[layer]}.{kind}"] = value
        else:
            unknown.append(f"prompt_learner.{key}")
    missing = [key for key in ("ctx_pos", "ctx_neg", "cls_ctx") if key not in ica]
    if missing:
        raise MethodError(f"not a ViP2-CLIP ICA state dict: missing {missing}")
    out["prompts.text.context"] = torch.stack([ica["ctx_pos"], ica["ctx_neg"]])
    projections = {"q_proj_pre": "q_proj", "k_proj_pre_1": "k_proj", "v_proj_pre_1": "v_proj",
                   "proj_post_t": "out_proj"}
    for key, value in fgp.items():
        if key == "prompt_temp_l1":  # created by FGP.__init__, used by no forward
            continue
        module, _, kind = key.partition(".")
        if module not in projections or kind not in ("weight", "bias"):
            unknown.append(f"Zero_try.{key}")
            continue
        if kind == "weight":
            if value.ndim != 3 or value.shape[-1] != 1:
                raise MethodError(f"Zero_try.{key}: expected a Conv1d(kernel_size=1) weight, got {tuple(value.shape)}")
            value = value[..., 0]
        for copy in range(int(fgp_copies)):
            out[f"fgp.{copy}.{projections[module]}.{kind}"] = value
    if unknown:
        raise MethodError(f"unexpected keys in the ViP2-CLIP checkpoint: {unknown}")
    return {key: value.float() for key, value in out.items()}


class MetaNet(nn.Module):
    """``Linearlayer``: ``n`` MLPs ``Linear(D, hidden) -> ReLU -> Linear(hidden, W)`` on ``x + bias``.

    forward: [B, D] -> [B, n, W] (row i from MLP i).
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, count: int, input_bias: bool, init_std: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        if input_bias:
            self.bias = nn.Parameter(torch.empty(1, in_dim).normal_(std=init_std, generator=generator))
        else:
            self.register_parameter("bias", None)
        self.mlps = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(in_dim, hidden), "fc2": nn.Linear(hidden, out_dim)}) for _ in range(count)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            x = x + self.bias
        return torch.stack([mlp["fc2"](F.relu(mlp["fc1"](x))) for mlp in self.mlps], dim=1)


class ImageConditionedPrompts(nn.Module):
    """ICA: two prompts "[SOS] [ctx x n_ctx] <state> [c x n_cls] [EOS]" whose class tokens depend on the image.

    The learned contexts live in a :class:`~zsadlib.prompts.learned.LearnedPromptText` (``text.context``
    [2, n_ctx, W], no deep prompts) whose templates are the *embedded* texts; the class tokens
    ``class_tokens + meta(g)`` [B, n_cls, W] are spliced in at the class positions of both prompts, and the
    2B sequences are encoded in one call of the text tower, pooled at the end-of-text position of the honest
    texts (normal_state / anomalous_state).

    forward(global_features [B, D], normalised) -> [B, 2, D] text embeddings (not normalised), row 0 normal.
    """

    def __init__(self, backbone: Backbone, config: ViP2CLIPConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.__dict__["backbone"] = backbone  # not a submodule: the frozen CLIP stays out of the state dict
        n_ctx, n_cls = int(config.n_ctx), int(config.n_cls)
        if n_ctx < 1 or n_cls < 1:
            raise MethodError(f"n_ctx and n_cls must be >= 1, got {n_ctx}, {n_cls}")
        cls_words = " ".join([_PLACEHOLDER] * n_cls)
        honest = tuple(f"{{}} {state} {cls_words}" for state in (config.normal_state, config.anomalous_state))
        for state in (config.normal_state, config.anomalous_state):
            if not state.strip() or "{" in state or _PLACEHOLDER.lower() in state.lower().split():
                raise MethodError(f"state word {state!r} must be a non-empty word other than {_PLACEHOLDER!r}")
        embedded = (honest[1], honest[1]) if config.normal_prompt_damaged else honest
        self.embedded_templates = embedded
        width, embed_dim = backbone.text_width, backbone.embed_dim
        # draw order: class tokens, the two contexts, the MetaNet bias, then the MLPs (ICA's order)
        class_tokens = torch.empty(n_cls, width).normal_(std=config.init_std, generator=generator)
        self.text = LearnedPromptText(
            backbone,
            LearnedPromptConfig(templates=embedded, n_ctx=n_ctx, deep_layers=(), init_std=config.init_std,
                                placeholder=_PLACEHOLDER),
            generator=generator,
        )
        self.class_tokens = nn.Parameter(class_tokens.to(self.text.context.dtype))
        self.meta = MetaNet(embed_dim, int(config.meta_hidden), width, n_cls, config.meta_input_bias,
                            config.init_std, generator)
        # pooling ids: the honest texts (the reference pools the normal prompt at the "good" text's end token)
        pool_ids = backbone.tokenize([fill_placeholder(t, n_ctx, _PLACEHOLDER) for t in honest]).cpu()
        embed_ids = self.text.token_ids.cpu()
        if not torch.equal(pool_ids.argmax(dim=-1), embed_ids.argmax(dim=-1)):
            raise MethodError(
                f"with normal_prompt_damaged the state words {config.normal_state!r} and {config.anomalous_state!r} "
                "must have the same number of tokens (the reference pools one prompt at the other's end token)"
            )
        marker = int(backbone.tokenize([_PLACEHOLDER])[0, 1])
        rows = []
        for index in range(2):
            ids = embed_ids[index]
            context = set(self.text.context_positions[index].tolist())
            found = [p for p in (ids == marker).nonzero().flatten().tolist() if p not in context]
            if len(found) != n_cls or min(found) < max(context):
                raise MethodError(f"could not place {n_cls} class tokens in {self.text.prompt_texts[index]!r}")
            rows.append(found)
        self.register_buffer("class_positions", torch.tensor(rows, dtype=torch.long), persistent=False)  # [2, n_cls]
        self.register_buffer("pool_ids", pool_ids, persistent=False)  # [2, 77]
        self.to(backbone.device)

    @property
    def prompt_texts(self) -> list[str]:
        """The two embedded texts (placeholders at the learned positions)."""
        return list(self.text.prompt_texts)

    def conditioned_class_tokens(self, global_features: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, n_cls, W]: learned class tokens + MetaNet(global)."""
        return self.class_tokens[None] + self.meta(global_features.to(self.class_tokens.dtype))

    def forward(self, global_features: torch.Tensor) -> torch.Tensor:
        batch = global_features.shape[0]
        class_tokens = self.conditioned_class_tokens(global_features)  # [B, n_cls, W]
        base = self.text.prompt_embeddings(None)  # [2, 77, W] with the contexts in place
        out = base[None].expand(batch, -1, -1, -1).clone()
        for index in range(2):
            out[:, index, self.class_positions[index]] = class_tokens
        length, width = out.shape[-2:]
        ids = self.pool_ids[None].expand(batch, -1, -1).reshape(batch * 2, length)
        encoded = self.encode(out.reshape(batch * 2, length, width), ids)
        return encoded.reshape(batch, 2, -1)

    def encode(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The text tower on [N, 77, W] prompt embeddings (:meth:`LearnedPromptText.encode`, which runs only up to
        the last end-of-text token: the 13-token prompts cost ~6x less than 77). Returns [N, D]."""
        return self.text.encode(embeddings, token_ids)


class FineGrainedPerception(nn.Module):
    """FGP: multi-head cross-attention of text queries over patch keys/values (1x1 projections with bias).

    forward(text [B, C, D], patches [B, N, D]) -> [B, C, D], L2-normalised:
    ``normalise(out_proj(softmax_N(q k^T * scale) v))`` per head, ``scale`` = 1 (reference) or 1/sqrt(head_dim).
    """

    def __init__(self, dim: int, heads: int, scaled: bool):
        super().__init__()
        if heads < 1 or dim % heads:
            raise MethodError(f"fgp_heads must divide the joint width {dim}, got {heads}")
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads) if scaled else 1.0
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        batch, count, dim = text.shape
        heads, head_dim = self.heads, dim // self.heads
        q = self.q_proj(text).view(batch, count, heads, head_dim)
        k = self.k_proj(patches).view(batch, -1, heads, head_dim)
        v = self.v_proj(patches).view(batch, -1, heads, head_dim)
        attention = (torch.einsum("bchd,bnhd->bhcn", q, k) * self.scale).softmax(dim=-1)
        out = torch.einsum("bhcn,bnhd->bchd", attention, v).reshape(batch, count, dim)
        return F.normalize(self.out_proj(out), dim=-1)


@dataclass
class _Outputs:
    """Differentiable intermediate results of one batch."""

    features: ImageFeatures
    text: torch.Tensor  # [B, 2, D] normalised ICA text
    layer_text: torch.Tensor  # [B, L, 2, D] FGP outputs
    cosines: list[torch.Tensor]  # L x [B, N, 2]
    probabilities: list[torch.Tensor]  # L x [B, N, 2]
    topk_indices: torch.Tensor  # [B, L, k]
    image_logits: torch.Tensor  # [B, 2] UTPA logits (mean top-k cosine / temperature)


@register_method
class ViP2CLIP(AnomalyMethod):
    """ViP2-CLIP: ``forward(images [B,3,S,S], class_names ignored) -> MethodOutput``.

    ``extras``: ``"layer_maps"`` [B, L, S, S] (per layer (p_anom + 1 - p_norm) / 2 upsampled, before fusion and
    blur); ``"image_probabilities"`` [B, 2]; ``"global_features"`` [B, D] (normalised MetaNet input);
    ``"text_features"`` [B, 2, D] (ICA, normalised);
    ``"layer_text_features"`` [B, L, 2, D] (FGP outputs); ``"topk_indices"`` [B, L, k] (patch indices pooled by UTPA,
    sorted ascending); ``"layer_maps_before_fgp"`` [B, L, S, S] (the per-layer maps with the ICA text itself, i.e.
    without FGP: what fine-grained perception changes).
    Learned parameters: ``prompts.text.context`` [2, n_ctx, W], ``prompts.class_tokens`` [n_cls, W],
    ``prompts.meta.*`` (bias [1, D], n_cls MLPs), ``fgp.j.*`` (1 module, or one per layer without ``fgp_shared``).
    """

    name = "vip2clip"
    config_class = ViP2CLIPConfig
    uses_class_names = False  # no class names anywhere
    trainable = True
    paper = "ViP2-CLIP (2025)"

    def __init__(self, config: ViP2CLIPConfig, backbone: Backbone):
        super().__init__(config, backbone)
        self._validate(config, backbone)
        self.layers = tuple(int(layer) for layer in config.layers)
        generator = torch.Generator().manual_seed(int(config.seed))  # tokens and bias: drawn from this generator
        copies = 1 if config.fgp_shared else len(self.layers)
        with seeded(int(config.seed) + 1):  # seeded Linear initialisation that leaves the global RNGs alone
            self.prompts = ImageConditionedPrompts(backbone, config, generator=generator)
            self.fgp = nn.ModuleList(FineGrainedPerception(backbone.embed_dim, int(config.fgp_heads),
                                                           bool(config.fgp_scaled)) for _ in range(copies))
        self.to(device=backbone.device)

    @staticmethod
    def _validate(config: ViP2CLIPConfig, backbone: Backbone) -> None:
        check_layers(config.layers, backbone)
        check_options(config, layer_fusion=("sum", "mean"))
        check_map_settings(config)
        patches = backbone.grid_size[0] * backbone.grid_size[1]
        if not 1 <= int(config.topk) <= patches:
            raise MethodError(f"topk must be in 1..{patches} (patches per layer), got {config.topk}")
        if int(config.meta_hidden) < 1:
            raise MethodError(f"meta_hidden must be >= 1, got {config.meta_hidden}")
        heads = int(config.fgp_heads)
        if heads < 1 or backbone.embed_dim % heads:
            raise MethodError(f"fgp_heads must divide the joint width {backbone.embed_dim}, got {config.fgp_heads}")
        if not (config.lr > 0 and config.fgp_lr > 0):
            raise MethodError(f"lr and fgp_lr must be > 0, got {config.lr}, {config.fgp_lr}")

    # -- pieces ------------------------------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> ImageFeatures:
        """Frozen plain-CLIP features (no gradients): patch tokens at ``layers``, global token."""
        with torch.no_grad():
            return self.backbone.forward_features(images.to(device=self.backbone.device), layers=self.layers,
                                                  dense_from=None, global_ln_post=self.config.global_ln_post)

    def text_features(self, global_embedding: torch.Tensor) -> torch.Tensor:
        """ICA: global embeddings [B, D] (normalised here) -> [B, 2, D] normalised text (differentiable)."""
        return F.normalize(self.prompts(F.normalize(global_embedding.float(), dim=-1)).float(), dim=-1)

    def _fgp(self, index: int) -> FineGrainedPerception:
        return self.fgp[0] if len(self.fgp) == 1 else self.fgp[index]

    def _compute(self, images: torch.Tensor) -> _Outputs:
        config = self.config
        features = self.image_features(images)
        text = self.text_features(features.global_embedding)
        layer_text, cosines, probabilities, indices, pooled = [], [], [], [], []
        for index, patches in enumerate(features.patch_embeddings):
            patches = F.normalize(patches.float(), dim=-1)
            refined = self._fgp(index)(text, patches)  # [B, 2, D] normalised
            cosine = ops.cosine_similarity_maps(patches, refined)  # [B, N, 2]
            probs = (cosine / config.temperature).softmax(dim=-1)
            top = probs[..., 1].topk(int(config.topk), dim=-1).indices  # [B, k]
            pooled.append(torch.gather(cosine, 1, top[..., None].expand(-1, -1, cosine.shape[-1])))
            layer_text.append(refined)
            cosines.append(cosine)
            probabilities.append(probs)
            indices.append(top.sort(dim=-1).values)
        image_logits = torch.cat(pooled, dim=1).mean(dim=1) / config.temperature  # [B, 2]
        return _Outputs(features, text, torch.stack(layer_text, dim=1), cosines, probabilities,
                        torch.stack(indices, dim=1), image_logits)

    # -- inference ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> MethodOutput:
        """Args: images [B, 3, S, S]; class_names: ignored (no class names), length-checked when given.
        Returns: scores [B] in [0, 1] (UTPA); maps [B, S, S] (mean over layers of maps in [0, 1], blurred)."""
        config = self.config
        if class_names is not None:
            self._class_names(class_names, images.shape[0])
        out = self._compute(images)
        size = tuple(images.shape[-2:])
        layer_maps = ops.layer_maps(out.probabilities, out.features.grid_size, size)  # [B, L, S, S]
        # the same maps with the ICA text before FGP (what fine-grained perception changes, for notebooks)
        before_fgp = [ops.anomaly_probability(F.normalize(p.float(), dim=-1), out.text, config.temperature)
                      for p in out.features.patch_embeddings]
        maps = ops.fuse_layers(layer_maps, config.layer_fusion)
        if config.blur_sigma > 0:
            maps = ops.gaussian_blur(maps, config.blur_sigma)
        image_probabilities = out.image_logits.softmax(dim=-1)
        return MethodOutput(
            scores=image_probabilities[:, 1],
            maps=maps,
            extras={"layer_maps": layer_maps, "image_probabilities": image_probabilities,
                    "global_features": F.normalize(out.features.global_embedding.float(), dim=-1),
                    "text_features": out.text, "layer_text_features": out.layer_text,
                    "topk_indices": out.topk_indices,
                    "layer_maps_before_fgp": ops.layer_maps(before_fgp, out.features.grid_size, size)},
        )

    # -- training ----------------------------------------------------------------------------------------------
    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """Two Adam groups as ``train.py``: the ICA parameters at ``lr`` and the FGP parameters at
        ``lr * fgp_lr / config.lr`` (1e-3 and 1e-5 with the defaults)."""
        learned = self.learned_parameters()
        fgp = [p for name, p in learned.items() if name.startswith("fgp.")]
        ica = [p for name, p in learned.items() if not name.startswith("fgp.")]
        return [{"params": ica, "lr": lr, "name": "ica"},
                {"params": fgp, "lr": lr * self.config.fgp_lr / self.config.lr, "name": "fgp"}]

    def training_loss(self, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor,
                      class_names: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``pixel_loss_weight * sum_layers [focal + dice(p_anom, mask) + dice(p_norm, 1 - mask)]
        + image_loss_weight * CE(UTPA logits, labels)`` (``train.py``).

        Args:
            images: [B, 3, S, S]; masks: [B, S, S] (bool or float, > 0.5 is anomalous) or None (image loss only);
            labels: [B] 0/1; class_names: ignored.
        Returns:
            (loss, parts) with ``"image_ce"`` and, with masks, ``"focal"`` and ``"dice"`` (unweighted sums over
            layers; ``"dice"`` holds both dice terms).
        """
        config = self.config
        out = self._compute(images)
        labels = labels.to(out.image_logits.device).reshape(-1)
        image_ce = image_cross_entropy(out.image_logits, labels)
        loss = config.image_loss_weight * image_ce
        parts = {"image_ce": float(image_ce.detach())}
        if masks is None:
            return loss, parts
        target = mask_targets(masks, images, out.image_logits.device)
        size, grid = tuple(images.shape[-2:]), out.features.grid_size
        pixel_probs = [ops.pixel_probabilities(p, grid, size) for p in out.probabilities]
        focal_total, dice_total = layer_pixel_losses(pixel_probs, target, gamma=config.focal_gamma)
        loss = loss + config.pixel_loss_weight * (focal_total + dice_total)
        parts.update({"focal": float(focal_total.detach()), "dice": float(dice_total.detach())})
        return loss, parts

    # -- reference checkpoints ---------------------------------------------------------------------------------
    def load_reference_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint written by the authors' ``train.py`` (``{"prompt_learner": ICA state dict,
        "Zero_try": FGP state dict}``, e.g. ``models/mvtec_train_epoch_10.pth``); keys and shapes are checked
        strictly, and the stored prompt token ids must equal this method's (same n_ctx, n_cls and state words)."""
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
        self.load_reference_state(checkpoint, source=str(path))

    def load_reference_state(self, checkpoint: dict[str, Any], source: str = "reference checkpoint") -> None:
        """:meth:`load_reference_checkpoint` on an already loaded checkpoint dict."""
        if not self.config.fgp_shared:
            raise MethodError("the released checkpoints hold one FGP shared by all layers: build with fgp_shared=True")
        ica = checkpoint.get("prompt_learner", {}) if isinstance(checkpoint, dict) else {}
        for key, index in (("tokenized_prompts_pos", 0), ("tokenized_prompts_neg", 1)):
            if key in ica:
                stored = ica[key].reshape(-1).long().cpu()
                ours = self.prompts.pool_ids[index].long().cpu()
                if stored.shape != ours.shape or not torch.equal(stored, ours):
                    raise MethodError(f"{source}: its {key} ({stored[:16].tolist()}...) differ from this method's "
                                      f"prompt ({ours[:16].tolist()}...): n_ctx, n_cls or state words differ")
        self.load_learned_state_dict(convert_reference_state_dict(checkpoint), source=source)

    def describe(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        described = super().describe(class_names)
        described["quirks"] = {name: getattr(self.config, name) for name in QUIRKS}
        described["prompts"] = self.prompts.prompt_texts
        return described

