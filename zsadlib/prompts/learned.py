"""Learned text prompts on the (frozen) open_clip text tower: learned context tokens and deep text prompts.

A prompt template holds one placeholder ``{}`` for the learned context; it is filled with ``n_ctx`` copies of a
placeholder word ("X") before tokenising, so the token ids (and hence the end-of-text position used for pooling)
are exactly those of the text the reference code tokenises, e.g. with ``n_ctx=12``::

    "{} object."          -> "X X X X X X X X X X X X object."
    "{} damaged object."  -> "X X X X X X X X X X X X damaged object."

:class:`LearnedPromptText` embeds those token ids with CLIP's (frozen) token embedding, overwrites the ``n_ctx``
placeholder positions with learned vectors (one ``[n_ctx, text_width]`` block per prompt, initialised from
N(0, 0.02^2) as CoOp / AnomalyCLIP do), and runs the open_clip text blocks one by one so that *deep text prompts*
can be swapped in between blocks: for each text layer ``l`` in ``deep_layers`` (1-based), the ``n_deep`` token
positions right after the start token (positions ``1 .. n_deep``) of that block's *input* are replaced by that
layer's learned ``[n_deep, text_width]`` tokens. The sequence length stays 77 (the encoder skips the positions
after the last end-of-text token, which cannot change the result: :meth:`LearnedPromptText.encode`). Pooling,
``ln_final`` and ``text_projection`` are open_clip's own (argmax of the token ids = end-of-text position).

AnomalyCLIP (``AnomalyCLIP_lib/AnomalyCLIP.py``, ``ResidualAttentionBlock_learnable_token``): depth 9 means
deep prompts at the inputs of text blocks 2..9 (block 1 sees only the token embeddings with the learned
context), 4 tokens each. Its released code casts the deep tokens with ``.half()`` before concatenating them with
the float32 sequence (on any device; ``torch.cat`` promotes back to float32), so the deep prompts are used
rounded to float16. The casts are differentiable, but not transparent: the gradient reaching the float16 copy
is itself rounded to float16 (autograd casts a gradient to its input's dtype), once per prompt, because the
reference expands the tokens over the prompts *before* ``.half()``; the per-prompt gradients are then summed in
float32. ``deep_prompt_fp16_round=True`` reproduces exactly that (expand, ``.half()``, back to float32, in that
order), ``False`` uses the float32 values.

Extension point for visually conditioned prompts (GenCLIP's MVP, ViP2-CLIP): ``forward(context_shift=...)``
adds a per-sample term to the learned context and encodes all prompts x samples in one text-encoder call.

Example (tiny random-weight backbone)::

    text = LearnedPromptText(backbone, LearnedPromptConfig(templates=("{} object.", "{} damaged object.")))
    text()                                   # [2, D]
    text(context_shift=torch.zeros(5, 1, backbone.text_width))   # [5, 2, D]
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

try:  # open_clip >= 2.24
    from open_clip.transformer import text_global_pool as _text_global_pool
except ImportError:  # pragma: no cover - older open_clip
    _text_global_pool = None

from ..backbone import Backbone

__all__ = [
    "ANOMALYCLIP_TEMPLATES",
    "LearnedPromptConfig",
    "LearnedPromptText",
    "PromptError",
    "fill_placeholder",
]

# AnomalyCLIP's two object-agnostic prompts (prompt_ensemble.py: states "{}" / "damaged {}" with the single class
# name "object", preceded by the learned context and followed by a period). Row 0 normal, row 1 anomalous.
ANOMALYCLIP_TEMPLATES: tuple[str, str] = ("{} object.", "{} damaged object.")


class PromptError(ValueError):
    """A learned-prompt option does not fit the backbone (template, layer, length)."""


@dataclass
class LearnedPromptConfig:
    """How :class:`LearnedPromptText` builds its prompts. Defaults are AnomalyCLIP's released settings."""

    templates: tuple[str, ...] = ANOMALYCLIP_TEMPLATES  # one "{}" each: where the learned context goes
    n_ctx: int = 12  # learned context tokens per prompt (AnomalyCLIP --n_ctx 12)
    deep_layers: tuple[int, ...] = tuple(range(2, 10))  # 1-based text blocks whose inputs get deep prompts
    # (AnomalyCLIP --depth 9 -> blocks 2..9; () = no deep prompts)
    n_deep: int = 4  # deep prompt tokens per layer, replacing positions 1..n_deep (AnomalyCLIP --t_n_ctx 4)
    deep_prompt_fp16_round: bool = True  # use the deep prompts rounded to float16 (released code's .half());
    # False = plain float32
    init_std: float = 0.02  # N(0, init_std^2) initialisation of context and deep tokens (CoOp / AnomalyCLIP)
    placeholder: str = "X"  # word tokenised at the context positions (its embedding is overwritten)


def fill_placeholder(template: str, n_ctx: int, placeholder: str = "X") -> str:
    """``"{} object."`` -> ``"X X ... X object."`` (``n_ctx`` placeholder words)."""
    if template.count("{}") != 1:
        raise PromptError(f"template {template!r} must hold exactly one '{{}}' (the learned context)")
    return template.replace("{}", " ".join([placeholder] * n_ctx))


class LearnedPromptText(nn.Module):
    """Learned context + deep text prompts on a frozen open_clip text tower.

    Args:
        backbone: a loaded :class:`~zsadlib.backbone.Backbone` whose model is an ``open_clip.CLIP`` (the text
            tower is used, never changed; it is not registered as a submodule, so this module's parameters are
            the learned ones only).
        config: :class:`LearnedPromptConfig`; keyword ``overrides`` change single fields.
        generator: optional ``torch.Generator`` for the initialisation (default: the global RNG).

    Parameters:
        context: [P, n_ctx, W] learned context, one block per template (P = number of templates).
        deep_prompts: [len(deep_layers), n_deep, W] or None when ``deep_layers`` is empty.

    ``forward(context_shift=None) -> [P, D]``; with ``context_shift`` [B, n_ctx | 1, W] (shared by all prompts)
    or [B, P, n_ctx | 1, W] (per prompt), returns [B, P, D]. Outputs are not normalised.
    """

    def __init__(self, backbone: Backbone, config: LearnedPromptConfig | None = None,
                 generator: torch.Generator | None = None, **overrides):
        super().__init__()
        config = config or LearnedPromptConfig()
        if overrides:
            config = replace(config, **overrides)
        self.config = config
        # not a submodule: keeps the frozen CLIP out of this module's parameters and state dict
        self.__dict__["backbone"] = backbone
        model = backbone.model
        for attribute in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
            if not hasattr(model, attribute):
                raise PromptError(
                    f"{backbone.info.get('name')} has no open_clip CLIP text tower (missing {attribute}); "
                    f"learned prompts need an open_clip CLIP model"
                )
        n_layers = len(model.transformer.resblocks)
        context_length = int(model.positional_embedding.shape[0])
        width = backbone.text_width
        templates = tuple(config.templates)
        if not templates:
            raise PromptError("at least one prompt template is needed")
        if config.n_ctx < 1:
            raise PromptError(f"n_ctx must be >= 1, got {config.n_ctx}")
        deep_layers = tuple(int(layer) for layer in config.deep_layers)
        bad = [layer for layer in deep_layers if not 1 <= layer <= n_layers]
        if bad:
            raise PromptError(f"deep_layers {bad} out of range: the text tower has blocks 1..{n_layers}")
        if len(set(deep_layers)) != len(deep_layers):
            raise PromptError(f"deep_layers has duplicates: {deep_layers}")
        if deep_layers and not 1 <= config.n_deep < context_length - 1:
            raise PromptError(f"n_deep must be in 1..{context_length - 2}, got {config.n_deep}")
        self.templates = templates
        self.n_ctx = int(config.n_ctx)
        self.deep_layers = deep_layers
        self.n_deep = int(config.n_deep)
        self.prompt_texts = [fill_placeholder(t, self.n_ctx, config.placeholder) for t in templates]

        token_ids = backbone.tokenize(self.prompt_texts).cpu()  # [P, 77]
        starts = [self._context_start(backbone, t, token_ids[i], config.placeholder) for i, t in enumerate(templates)]
        positions = torch.tensor([[s + j for j in range(self.n_ctx)] for s in starts], dtype=torch.long)
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("context_positions", positions, persistent=False)  # [P, n_ctx]

        dtype = model.transformer.get_cast_dtype() if hasattr(model.transformer, "get_cast_dtype") else backbone.dtype
        # draw order as the reference: prompt 0's context, prompt 1's context, then the deep layers in order
        context = torch.empty(len(templates), self.n_ctx, width, dtype=dtype)
        for index in range(len(templates)):
            nn.init.normal_(context[index], std=config.init_std, generator=generator)
        self.context = nn.Parameter(context)
        if deep_layers:
            deep = torch.empty(len(deep_layers), self.n_deep, width, dtype=dtype)
            for index in range(len(deep_layers)):
                nn.init.normal_(deep[index], std=config.init_std, generator=generator)
            self.deep_prompts = nn.Parameter(deep)
        else:
            self.register_parameter("deep_prompts", None)
        self.to(backbone.device)

    # -- construction helpers ----------------------------------------------------------------------------------
    def _context_start(self, backbone: Backbone, template: str, ids: torch.Tensor, placeholder: str) -> int:
        """Token position of the first context placeholder (the start token is position 0)."""
        prefix = template.split("{}", 1)[0].strip()
        if prefix:
            prefix_ids = backbone.tokenize([prefix])[0].cpu()
            offset = int((prefix_ids != 0).sum()) - 2  # without start and end tokens
        else:
            offset = 0
        start = 1 + offset
        marker = int(backbone.tokenize([placeholder])[0, 1])
        end = start + self.n_ctx
        eot = int(ids.argmax())
        if end > eot or not bool((ids[start:end] == marker).all()):
            raise PromptError(
                f"could not place {self.n_ctx} context tokens in {template!r} (tokens {ids[:eot + 1].tolist()}); "
                f"is the prompt longer than the context length?"
            )
        return start

    # -- facts -------------------------------------------------------------------------------------------------
    @property
    def num_prompts(self) -> int:
        return len(self.templates)

    def deep_prompt(self, layer: int, dtype: torch.dtype | None = None, count: int | None = None) -> torch.Tensor:
        """The [n_deep, W] tokens used at the input of text block ``layer`` (1-based), as the encoder uses them
        (rounded to float16 and cast back when ``deep_prompt_fp16_round``); ``count``: expanded to
        [count, n_deep, W] first, so that (as in the reference) each copy's gradient is rounded to float16."""
        if layer not in self.deep_layers:
            raise PromptError(f"text layer {layer} has no deep prompt (deep_layers={self.deep_layers})")
        tokens = self.deep_prompts[self.deep_layers.index(layer)]
        dtype = dtype or tokens.dtype
        if count is not None:
            tokens = tokens.expand(count, -1, -1)
        if self.config.deep_prompt_fp16_round:
            # differentiable; each cast's backward casts the gradient to its input's dtype (float16 here)
            return tokens.half().to(dtype)
        return tokens.to(dtype)

    # -- encoding ----------------------------------------------------------------------------------------------
    def prompt_embeddings(self, context_shift: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the learned context spliced in.

        Args:
            context_shift: None, [B, n_ctx | 1, W] or [B, P, n_ctx | 1, W], added to the learned context.
        Returns:
            [P, 77, W] without a shift, else [B, P, 77, W].
        """
        model = self.backbone.model
        dtype = self.context.dtype
        base = model.token_embedding(self.token_ids).to(dtype)  # [P, 77, W]
        prompts = self.num_prompts
        rows = torch.arange(prompts, device=base.device).repeat_interleave(self.n_ctx)
        cols = self.context_positions.reshape(-1)
        if context_shift is None:
            out = base.clone()
            out[rows, cols] = self.context.reshape(prompts * self.n_ctx, -1)
            return out
        shift = context_shift.to(device=base.device, dtype=dtype)
        if shift.ndim == 3:
            shift = shift[:, None]  # [B, 1, n | 1, W]: shared by the prompts
        if shift.ndim != 4 or shift.shape[1] not in (1, prompts) or shift.shape[2] not in (1, self.n_ctx) \
                or shift.shape[3] != base.shape[-1]:
            raise PromptError(
                f"context_shift must be [B, {self.n_ctx} or 1, {base.shape[-1]}] or "
                f"[B, {prompts}, {self.n_ctx} or 1, {base.shape[-1]}], got {tuple(context_shift.shape)}"
            )
        batch = shift.shape[0]
        context = self.context[None] + shift  # [B, P, n_ctx, W]
        out = base[None].expand(batch, -1, -1, -1).clone()
        out[:, rows, cols] = context.reshape(batch, prompts * self.n_ctx, -1)
        return out

    def encoded_length(self, token_ids: torch.Tensor) -> int:
        """How many leading positions of [N, 77] prompts :meth:`encode` runs: up to the last end-of-text token when
        the text tower is causal and pools at the end-of-text token (CLIP's, open_clip's "argmax" pooling), since no
        later position can change an earlier one; else all of them. Never fewer than the deep-prompt positions."""
        model = self.backbone.model
        length = token_ids.shape[-1]
        causal = getattr(model, "attn_mask", None) is not None
        if not causal or getattr(model, "text_pool_type", "argmax") != "argmax" or token_ids.numel() == 0:
            return length
        needed = int(token_ids.argmax(dim=-1).max()) + 1
        return min(length, max(needed, 1 + self.n_deep if self.deep_layers else 1))

    def encode(self, embeddings: torch.Tensor, token_ids: torch.Tensor, full_length: bool = False) -> torch.Tensor:
        """Run the text tower on prepared token embeddings, inserting the deep prompts between blocks.

        The sequence is cut after the last end-of-text token (:meth:`encoded_length`): with CLIP's causal text
        attention this equals the full 77-token encoding (masked keys have weight exactly 0; tested at 1e-6) and
        costs a fraction of it (AnomalyCLIP's prompts are 16 tokens, GenCLIP's and ViP2-CLIP's 10-20).

        Args:
            embeddings: [N, 77, W] token embeddings (learned context already in place).
            token_ids: [N, 77] the matching token ids (for end-of-text pooling).
            full_length: run all 77 positions (the reference codes' way; for tests and comparisons).
        Returns:
            [N, D] text embeddings (not normalised).
        """
        model = self.backbone.model
        transformer = model.transformer
        length = embeddings.shape[1] if full_length else self.encoded_length(token_ids)
        embeddings, token_ids = embeddings[:, :length], token_ids[:, :length]
        x = embeddings + model.positional_embedding[:length].to(embeddings.dtype)
        batch_first = getattr(transformer, "batch_first", True)
        attn_mask = getattr(model, "attn_mask", None)
        if attn_mask is not None:
            attn_mask = attn_mask[:length, :length]
        count = x.shape[0]
        for index, block in enumerate(transformer.resblocks, start=1):
            if index in self.deep_layers:
                deep = self.deep_prompt(index, x.dtype, count=count)
                x = torch.cat([x[:, :1], deep, x[:, 1 + self.n_deep:]], dim=1)  # replace, never append
            if batch_first:
                x = block(x, attn_mask=attn_mask)
            else:  # pragma: no cover - open_clip < 2.24 ran the text tower sequence-first
                x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        x = model.ln_final(x)
        pool_type = getattr(model, "text_pool_type", "argmax")
        if _text_global_pool is not None:
            pooled = _text_global_pool(x, token_ids, pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        else:  # pragma: no cover
            pooled = x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
        if isinstance(pooled, tuple):  # some open_clip versions return (pooled, tokens)
            pooled = pooled[0]
        projection = model.text_projection
        if projection is None:
            return pooled
        if isinstance(projection, nn.Linear):
            return projection(pooled)
        return pooled @ projection

    def insert_context_tokens(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Insert per-sample tokens right after each prompt's learned context (Crane's context guidance,
        ``pad_suffix``): the rest of the sequence moves right by k and its last k positions are dropped, so the
        length stays 77 and the end-of-text token moves by k.

        Args:
            embeddings: [P, 77, W] (from :meth:`prompt_embeddings`, learned context in place).
            tokens: [B, k, W] tokens per sample (e.g. the normalised global image embedding, k = 1).
        Returns:
            (embeddings [B, P, 77, W], token_ids [B, P, 77]) with the matching shifted token ids.
        """
        if tokens.ndim != 3 or tokens.shape[-1] != embeddings.shape[-1]:
            raise PromptError(f"context tokens must be [B, k, {embeddings.shape[-1]}], got {tuple(tokens.shape)}")
        batch, count = tokens.shape[:2]
        length = embeddings.shape[1]
        tokens = tokens.to(device=embeddings.device, dtype=embeddings.dtype)
        rows, ids = [], []
        for prompt in range(self.num_prompts):
            end = int(self.context_positions[prompt, -1]) + 1
            if int(self.token_ids[prompt].argmax()) + count >= length:
                raise PromptError(f"no room for {count} context tokens in prompt {self.prompt_texts[prompt]!r}")
            sequence = embeddings[prompt][None].expand(batch, -1, -1)
            rows.append(torch.cat([sequence[:, :end], tokens, sequence[:, end:length - count]], dim=1))
            token_ids = self.token_ids[prompt]
            ids.append(torch.cat([token_ids[:end], token_ids[end].repeat(count), token_ids[end:length - count]]))
        return torch.stack(rows, dim=1), torch.stack(ids)[None].expand(batch, -1, -1)

    def forward(self, context_shift: torch.Tensor | None = None,
                context_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings of the prompts.

        Args:
            context_shift: optional per-sample additive term on the context, [B, n_ctx | 1, W] or
                [B, P, n_ctx | 1, W].
            context_tokens: optional per-sample tokens [B, k, W] inserted after the learned context
                (:meth:`insert_context_tokens`); not combinable with ``context_shift``.
        Returns:
            [P, D] (neither) or [B, P, D]; not normalised.
        """
        if context_tokens is not None:
            if context_shift is not None:
                raise PromptError("pass context_shift or context_tokens, not both")
            embeddings, token_ids = self.insert_context_tokens(self.prompt_embeddings(), context_tokens)
        else:
            embeddings = self.prompt_embeddings(context_shift)
            if context_shift is None:
                return self.encode(embeddings, self.token_ids)
            token_ids = self.token_ids[None].expand(embeddings.shape[0], -1, -1)
        batch, prompts, length, width = embeddings.shape
        encoded = self.encode(embeddings.reshape(batch * prompts, length, width), token_ids.reshape(-1, length))
        return encoded.reshape(batch, prompts, -1)

    def extra_repr(self) -> str:
        return (f"prompts={self.prompt_texts}, n_ctx={self.n_ctx}, deep_layers={self.deep_layers}, "
                f"n_deep={self.n_deep}, deep_prompt_fp16_round={self.config.deep_prompt_fp16_round}")
