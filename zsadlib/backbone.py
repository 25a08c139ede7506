"""CLIP backbones for zero-shot anomaly detection, built on open_clip.

One entry point, :func:`load_backbone`, gives a :class:`Backbone` wrapping an open_clip ``CLIP`` model:

* weights from an open_clip pretrained tag (``"openai"``, ``"laion400m_e31"``, ...), from a local checkpoint
  file (open_clip/PyTorch state dict, ``.safetensors``, or the OpenAI TorchScript ``.pt``), or none
  (random initialisation, seeded);
* any square input size: the positional embedding is resized from the native grid to the new one, either
  ``"bilinear"`` (what AnomalyCLIP/Crane's code does at run time: no antialias) or ``"bicubic_antialias"``
  (open_clip's own ``resize_pos_embed``). The choice is recorded in :attr:`Backbone.info`;
* :meth:`Backbone.forward_features` taps patch tokens at chosen layers (1-based, default 6/12/18/24),
  projects them to the joint space (``ln_post`` then ``proj``) and returns the global token with or without
  ``ln_post``; optionally through the dense "dual path" of CLIP-Surgery / AnomalyCLIP / Crane on layers
  ``dense_from..last``.

The built-in ``tiny`` config (random weights, ~2 M parameters, same architecture family as ViT-L/14:
patch 14, native 336 px, 24 vision blocks, QuickGELU, 12 text blocks) runs every code path in tests and smoke
runs. Numbers produced with it mean nothing and every output made with it says so
(``info["random_weights"]``).

Dense dual path (METHODS.md): on each block ``l >= dense_from`` the original path runs unchanged
(``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``) and a refined path is updated as
``r = r + out_proj(A v)`` with no MLP, where ``q, k, v`` come from the *original* path's ``ln_1`` input and
``A = softmax(v v^T / sqrt(d))`` (``"vv"``) or ``softmax(q q^T) + softmax(k k^T) + softmax(v v^T)``
(``"qkv_sum"``, Crane's E-Attn). ``r`` starts as the block input at ``dense_from``. Patch tokens come from the
refined path, the global token from the original one. Every update is out of place, so tapped layers are
distinct tensors (the reference code's in-place residual made every tap alias the last layer).
"""
from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .utils import resolve_device, seeded, sha256_file, state_mismatch

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "DEFAULT_LAYERS",
    "TINY_MODEL",
    "Backbone",
    "ImageFeatures",
    "WeightsNotFoundError",
    "BackboneError",
    "load_backbone",
    "resize_pos_embed",
    "list_backbones",
]

DEFAULT_MODEL = "ViT-L-14-336-quickgelu"  # all seed papers: OpenAI CLIP ViT-L/14 @ 336 px, QuickGELU
DEFAULT_PRETRAINED = "openai"
DEFAULT_IMAGE_SIZE = 518  # AnomalyCLIP / Crane / ViP2-CLIP input size: a 37 x 37 patch grid
DEFAULT_LAYERS = (6, 12, 18, 24)  # 1-based blocks tapped by AnomalyCLIP, Crane, ViP2-CLIP, APRIL-GAN
TINY_MODEL = "tiny"  # built-in random-weight config for tests and smoke runs

PosEmbedResize = Literal["bilinear", "bicubic_antialias", "bicubic"]
DenseAttention = Literal["vv", "qkv_sum"]

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)


class BackboneError(ValueError):
    """A backbone option is wrong (unknown model, tag, layer, size)."""


class WeightsNotFoundError(FileNotFoundError):
    """The requested weights are not on this machine and cannot be downloaded."""


@dataclass
class ImageFeatures:
    """What :meth:`Backbone.forward_features` returns.

    Attributes:
        global_embedding: [B, D] class token of the last layer (original path), projected to the joint space.
        patch_embeddings: one [B, N, D] per tapped layer, N = grid_h * grid_w, ``ln_post`` then ``proj``.
        layer_tokens: one [B, 1 + N, W] per tapped layer: the raw residual stream (class token first)
            before ``ln_post``, refined path where the layer is dense. W is the vision width.
        layers: the tapped layers (1-based).
        grid_size: (grid_h, grid_w).
        dense_from: first dense layer (1-based) or None.
        block_inputs: with ``return_block_inputs``, one [B, 1 + N, W] per tapped layer: the ORIGINAL path's input
            of that block (what its ``ln_1`` reads; Crane's D-Attn takes its value tokens from there), else None.
    """

    global_embedding: torch.Tensor
    patch_embeddings: list[torch.Tensor]
    layer_tokens: list[torch.Tensor]
    layers: tuple[int, ...]
    grid_size: tuple[int, int]
    dense_from: int | None = None
    block_inputs: list[torch.Tensor] | None = None


def list_backbones() -> list[str]:
    """Model names open_clip knows (including the built-in ``tiny``)."""
    return open_clip.list_models()


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], mode: PosEmbedResize) -> torch.Tensor:
    """Resize a ViT positional embedding with one class token.

    Args:
        pos_embed: [1 + g*g, W] with a square native grid g.
        new_grid: (h, w) target grid.
        mode: ``"bilinear"`` (F.interpolate bilinear, align_corners=False, no antialias: what the AnomalyCLIP
            and Crane code does at their first forward) or ``"bicubic_antialias"`` (open_clip's
            ``resize_pos_embed``: bicubic with antialias).
    Returns:
        [1 + h*w, W]
    """
    cls_pos, grid_pos = pos_embed[:1], pos_embed[1:]
    side = int(round(grid_pos.shape[0] ** 0.5))
    if side * side != grid_pos.shape[0]:
        raise BackboneError(f"positional embedding has {grid_pos.shape[0]} grid tokens, not a square grid")
    if tuple(new_grid) == (side, side):
        return pos_embed.clone()
    grid = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    if mode == "bilinear":
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=False)
    elif mode == "bicubic_antialias":
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    elif mode == "bicubic":  # AdaCLIP's load-time resize (older open_clip): bicubic without antialias
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    else:
        raise BackboneError(f"pos_embed_resize must be 'bilinear', 'bicubic_antialias' or 'bicubic', not {mode!r}")
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)
    return torch.cat([cls_pos, grid], dim=0)


class Backbone(nn.Module):
    """A frozen open_clip CLIP with multi-layer patch tokens and the dense dual path.

    Build it with :func:`load_backbone`. The wrapped model is ``self.model`` (an ``open_clip.CLIP``), kept in
    eval mode with ``requires_grad=False`` on every parameter; methods put their learned parameters elsewhere.
    """

    def __init__(self, model: nn.Module, tokenizer, info: dict):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        _use_contiguous_attention(self.model)
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    @property
    def patch_size(self) -> int:
        return int(self.visual.patch_size[0])

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def vision_width(self) -> int:
        return int(self.visual.conv1.out_channels)

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def train(self, mode: bool = True) -> "Backbone":
        """The CLIP model stays in eval mode whatever the caller asks (it is frozen)."""
        super().train(mode)
        self.model.eval()
        return self

    # -- text ----------------------------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Texts -> token ids [T, context_length] on the backbone's device."""
        return self.tokenizer(texts).to(self.device)

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, normalize: bool = False,
                    truncate: bool = True) -> torch.Tensor:
        """Texts (or token ids [T, 77]) -> text embeddings [T, D].

        With ``truncate`` (default) the sequences are cut after the longest end-of-text token before the text
        transformer runs. CLIP's text attention is causal and the embedding is read at the end-of-text token,
        so the result equals open_clip's ``encode_text`` (tested) while prompt ensembles of ~10-token prompts
        run several times faster than at the full 77 positions.
        """
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        tokens = tokens.to(self.device)
        model = self.model
        if not (truncate and getattr(model, "text_pool_type", None) == "argmax"
                and getattr(model, "attn_mask", None) is not None and hasattr(model, "token_embedding")):
            return model.encode_text(tokens, normalize=normalize)
        length = int(tokens.argmax(dim=-1).max()) + 1
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens[:, :length]).to(cast_dtype)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens[:, :length].argmax(dim=-1)]
        if isinstance(model.text_projection, nn.Linear):
            x = model.text_projection(x)
        elif model.text_projection is not None:
            x = x @ model.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    # -- image -----------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's own image embedding (ln_post on the class token, proj). images: [B, 3, S, S] -> [B, D]."""
        return self.model.encode_image(images, normalize=normalize)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Residual-stream tokens [..., W] -> joint space [..., D] (``ln_post`` then ``proj``)."""
        return self.visual.ln_post(tokens) @ self.visual.proj

    def _check_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        layers = tuple(int(layer) for layer in layers)
        bad = [layer for layer in layers if not 1 <= layer <= self.num_layers]
        if bad:
            raise BackboneError(
                f"layers {bad} out of range: {self.info['name']} has vision blocks 1..{self.num_layers}"
            )
        return layers

    def forward_features(
        self,
        images: torch.Tensor,
        layers: Sequence[int] = DEFAULT_LAYERS,
        dense_from: int | None = None,
        dense_attention: DenseAttention = "vv",
        global_ln_post: bool = True,
        return_block_inputs: bool = False,
    ) -> ImageFeatures:
        """Multi-layer patch features.

        Args:
            images: [B, 3, S, S] normalised images, S = ``self.image_size``.
            layers: 1-based blocks whose outputs are tapped.
            dense_from: first block (1-based) of the dense dual path, or None for the plain model.
                AnomalyCLIP and Crane use 6 on ViT-L/14 (the last 19 blocks).
            dense_attention: ``"vv"`` (V-V attention) or ``"qkv_sum"`` (Crane's E-Attn).
            global_ln_post: apply ``ln_post`` to the global token (open_clip does; AnomalyCLIP and
                ViP2-CLIP's code does not).
            return_block_inputs: also return the original path's input of each tapped block (``block_inputs``).
        Returns:
            :class:`ImageFeatures`; with ``dense_from=None`` and ``global_ln_post=True`` the global embedding
            equals ``encode_image(images)``.
        """
        layers = self._check_layers(layers)
        if dense_from is not None:
            dense_from = self._check_layers([dense_from])[0]
        if dense_attention not in ("vv", "qkv_sum"):
            raise BackboneError(f"dense_attention must be 'vv' or 'qkv_sum', not {dense_attention!r}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise BackboneError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        expected = self.visual.image_size
        if tuple(images.shape[-2:]) != tuple(expected):
            raise BackboneError(
                f"images are {tuple(images.shape[-2:])} but the backbone was loaded for {tuple(expected)}; "
                f"pass image_size={images.shape[-1]} to load_backbone"
            )
        visual = self.visual
        x = visual._embeds(images.to(self.dtype))  # [B, 1+N, W]
        refined: torch.Tensor | None = None
        taps: dict[int, torch.Tensor] = {}
        inputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            if return_block_inputs and index in layers:
                inputs[index] = x
            if dense_from is not None and index >= dense_from:
                x, refined = _dual_block(block, x, x if refined is None else refined, dense_attention)
            else:
                x = block(x)
            if index in layers:
                taps[index] = refined if (refined is not None) else x
        global_token = x[:, 0]
        if global_ln_post:
            global_token = visual.ln_post(global_token)
        global_embedding = global_token @ visual.proj
        layer_tokens = [taps[layer] for layer in layers]
        patch_embeddings = [self.project_tokens(tokens[:, 1:]) for tokens in layer_tokens]
        return ImageFeatures(
            global_embedding=global_embedding,
            patch_embeddings=patch_embeddings,
            layer_tokens=layer_tokens,
            layers=layers,
            grid_size=self.grid_size,
            dense_from=dense_from,
            block_inputs=[inputs[layer] for layer in layers] if return_block_inputs else None,
        )

    def forward(self, images: torch.Tensor, **kwargs) -> ImageFeatures:  # noqa: D401 - nn.Module protocol
        return self.forward_features(images, **kwargs)


def _heads(attn: nn.MultiheadAttention, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, h, L, d] of a batch-first attention from ONE in-projection of the contiguous [B, L, W] input."""
    batch, length, width = hidden.shape
    heads = attn.num_heads
    projected = F.linear(hidden.contiguous(), attn.in_proj_weight, attn.in_proj_bias)
    return tuple(part.view(batch, length, heads, width // heads).transpose(1, 2)
                 for part in projected.chunk(3, dim=-1))


def self_attention(attn: nn.MultiheadAttention, hidden: torch.Tensor,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``attn(hidden, hidden, hidden, need_weights=False)[0]`` of a batch-first ``nn.MultiheadAttention``, computed
    from one in-projection of the contiguous input and ``scaled_dot_product_attention``.

    Why: outside its inference fast path (under autocast, or with gradients) ``nn.MultiheadAttention`` transposes the
    input to sequence-first before its in-projection, and ``F.linear`` on that transposed 3-D input is slow: 3.4x in
    float32 and 80x under bf16 autocast on this CPU (4 x 1370 x 1024 by 3072: 0.22 s contiguous, 17.6 s transposed),
    which made bf16 evaluation slower per image as the batch grew. Equal to the module up to float rounding.

    Args:
        hidden: [B, L, W]; attn_mask: additive [L, L] (e.g. CLIP's causal text mask) or None.
    Returns:
        [B, L, W].
    """
    batch, length, width = hidden.shape
    q, k, v = _heads(attn, hidden)
    mask = attn_mask.to(q.dtype) if attn_mask is not None else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class _ContiguousAttentionBlock(open_clip.transformer.ResidualAttentionBlock):
    """open_clip's block with self-attention through :func:`self_attention` (the class of each plain block of a
    loaded :class:`Backbone`; weights, state dict and forward are open_clip's)."""

    def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is None and v_x is None and getattr(self.attn, "batch_first", False):
            return self_attention(self.attn, q_x, attn_mask)
        return super().attention(q_x, k_x, v_x, attn_mask)


def _use_contiguous_attention(model: nn.Module) -> None:
    """Give every plain open_clip ``ResidualAttentionBlock`` of the model :class:`_ContiguousAttentionBlock`'s
    attention (both towers)."""
    for module in model.modules():
        if type(module) is open_clip.transformer.ResidualAttentionBlock and not hasattr(module, "ln_1_kv"):
            module.__class__ = _ContiguousAttentionBlock


def _dual_block(block: nn.Module, x: torch.Tensor, base: torch.Tensor,
                mode: DenseAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """One dense block: the original path and the refined path from ONE q/k/v projection of ``ln_1(x)``.

    Args:
        block: an open_clip ``ResidualAttentionBlock`` (``attn`` is ``nn.MultiheadAttention``, batch first).
        x: [B, L, W] input of the block on the original path.
        base: [B, L, W] the refined path so far (``x`` itself at the first dense block).
        mode: ``"vv"`` -> softmax(v v^T * s) v;
            ``"qkv_sum"`` -> (softmax(qq^T s) + softmax(kk^T s) + softmax(vv^T s)) v.
    Returns:
        (original path output [B, L, W], refined path output [B, L, W]). The original path is exactly the block's
        own forward (:func:`self_attention`, then the MLP); the refined path reuses its q/k/v projection.
    """
    attn: nn.MultiheadAttention = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not getattr(attn, "batch_first", False):
        raise BackboneError("the dense path needs open_clip blocks with a batch-first nn.MultiheadAttention")
    batch, length, width = x.shape
    q, k, v = _heads(attn, block.ln_1(x))

    def project(heads_out: torch.Tensor) -> torch.Tensor:
        return attn.out_proj(heads_out.transpose(1, 2).reshape(batch, length, width))

    # scaled_dot_product_attention uses the same 1/sqrt(d) scale as CLIP's attention
    original = x + block.ls_1(project(F.scaled_dot_product_attention(q, k, v)))
    original = original + block.ls_2(block.mlp(block.ln_2(original)))
    refined = F.scaled_dot_product_attention(v, v, v)
    if mode == "qkv_sum":
        refined = refined + F.scaled_dot_product_attention(q, q, v)
        refined = refined + F.scaled_dot_product_attention(k, k, v)
    return original, base + block.ls_1(project(refined))


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------
def _is_file_spec(pretrained: str) -> bool:
    return (
        os.sep in pretrained
        or pretrained.startswith(".")
        or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
        or Path(pretrained).exists()
    )


def _existing_file(pretrained: str, what: str, expects: str) -> Path:
    """The weights file a ``pretrained=`` path names; WeightsNotFoundError naming it (``what``, e.g. "checkpoint
    file") and what ``pretrained=`` expects when it does not exist."""
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"{what} {path} does not exist (pretrained= expects {expects})")
    return path


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _cached_hub_file(cfg: dict, cache_dir: str | None) -> str | None:
    """The tag's weights file when it is already in the Hugging Face cache (no network), else None."""
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    for candidate in names:
        found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
        if isinstance(found, str) and Path(found).is_file():
            return found
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub's endpoint: a closed network fails here in seconds instead of
    minutes of download retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def try_download(download: Callable[[], str | None], unavailable: str = "") -> tuple[str | None, str]:
    """Run ``download()`` (returns a file path) unless the hub is off or unreachable, with the hub's logging quiet.

    Returns (path, "") on success, else (None, reason): ``unavailable`` when given (e.g. "the tag has no Hugging
    Face repository"), "HF_HUB_OFFLINE=1 is set", "the hub is unreachable from this machine", or what failed. Any
    hub or network failure becomes that reason, for one clear error message at the caller.
    """
    import logging

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if offline:
        return None, "HF_HUB_OFFLINE=1 is set"
    if unavailable:
        return None, unavailable
    if not _hub_reachable():
        return None, "the hub is unreachable from this machine"
    quiet = logging.getLogger("huggingface_hub")
    previous = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        path = download()
        if path and Path(path).is_file():
            return str(path), ""
        return None, "the download gave no file"
    except Exception as error:  # noqa: BLE001 - any hub/network failure becomes one clear message
        return None, f"the download failed ({type(error).__name__})"
    finally:
        quiet.setLevel(previous)


def _download_tag(name: str, tag: str, cache_dir: str | None) -> str:
    """Path of the weights for an open_clip (name, tag), from the cache or the hub; one clear error if absent."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub_id = cfg.get("hf_hub", "") or cfg.get("url", "")
    where = cache_dir or _hf_cache_dir()
    cached = _cached_hub_file(cfg, cache_dir)
    if cached:
        return cached
    path, reason = try_download(lambda: open_clip.download_pretrained(cfg, cache_dir=cache_dir))
    if path:
        return path
    raise WeightsNotFoundError(
        f"weights for {name} (pretrained={tag!r}) are not on this machine: looked in {where} for "
        f"'{hub_id}' and {reason}; download them where the hub is reachable and pass "
        f"pretrained='/path/to/open_clip_pytorch_model.bin' (or the OpenAI .pt / a .safetensors file)"
    )


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint onto the CPU: safetensors, a (possibly wrapped) state dict, or OpenAI TorchScript."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # noqa: BLE001 - one clear line naming the file
            raise BackboneError(_not_weights(path, error)) from None
    try:
        return open_clip.factory.load_state_dict(str(path), device="cpu", weights_only=True)
    except Exception as first_error:  # noqa: BLE001
        if zipfile.is_zipfile(path):
            try:  # the OpenAI release files are TorchScript archives
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    scripted = torch.jit.load(str(path), map_location="cpu")
            except Exception:  # noqa: BLE001
                raise BackboneError(_not_weights(path, first_error)) from None
            state = scripted.state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
            return state
        raise BackboneError(_not_weights(path, first_error)) from None


def _not_weights(path: Path, error: BaseException) -> str:
    """One line for a file that is not a weights file. torch's own message advises retrying with
    weights_only=False, which would run arbitrary code from the file: it is not repeated here."""
    return (f"{path} is not a weights file that zsadlib can read (expected an open_clip / PyTorch state dict, "
            f"the OpenAI TorchScript .pt, or a .safetensors file; reading it failed with {type(error).__name__})")


def _load_weights_file(model: nn.Module, path: Path, name: str) -> None:
    """Load a full CLIP checkpoint strictly (after resizing its pos-embed to the model's native grid)."""
    state = _load_state_dict_file(path)
    state = {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    open_clip.model.resize_pos_embed(state, model)  # no-op when the file matches the native grid
    problems = state_mismatch(model.state_dict(), state, limit=3)
    if problems:
        raise BackboneError(f"checkpoint {path} does not fit model {name}: {problems}")
    model.load_state_dict(state, strict=True)


def _weights_sha256(path: Path) -> str:
    """SHA-256 of a weights file; Hugging Face cache files are links to blobs named by it, so no re-read there."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    return sha256_file(path)


@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip logs 'No pretrained weights loaded' on the root logger; we report weights in ``info``."""
    import logging

    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous)


def load_backbone(
    name: str = DEFAULT_MODEL,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    image_size: int = DEFAULT_IMAGE_SIZE,
    device: str | torch.device = "auto",
    pos_embed_resize: PosEmbedResize = "bilinear",
    cache_dir: str | None = None,
    seed: int = 0,
    checksum: bool = True,
) -> Backbone:
    """Load an open_clip CLIP as a frozen :class:`Backbone`.

    Args:
        name: open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-L-14-336-quickgelu"`` (default)
            or ``"ViT-B-16-plus-240"`` (WinCLIP), or ``"tiny"`` (built-in random-weight test config).
        pretrained: an open_clip tag (``"openai"``, ...), a path to a local checkpoint file, or ``None`` /
            ``"none"`` for random weights (seeded by ``seed``). The default tag of ``tiny`` is ignored: it has
            no published weights, so ``load_backbone("tiny")`` gives random weights.
        image_size: square input size; the positional embedding is resized to ``image_size // patch``.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...
        pos_embed_resize: ``"bilinear"`` (reference code), ``"bicubic_antialias"`` (open_clip) or ``"bicubic"``
            (no antialias: AdaCLIP's load-time resize).
        cache_dir: where open_clip/Hugging Face cache downloads (default: the HF cache).
        seed: seed of the random initialisation (used when weights are random).
        checksum: record the SHA-256 of a weights file in ``info`` (takes a few seconds for ViT-L).
    Raises:
        WeightsNotFoundError: the tag's weights are not cached and cannot be downloaded, or the file is missing.
        BackboneError: unknown model or tag, or a checkpoint that does not fit the model.
    """
    if name not in open_clip.list_models():
        raise BackboneError(
            f"unknown backbone {name!r}; open_clip knows e.g. {DEFAULT_MODEL}, ViT-B-16-plus-240, {TINY_MODEL} "
            f"(see zsadlib.backbone.list_backbones())"
        )
    if pos_embed_resize not in ("bilinear", "bicubic_antialias", "bicubic"):
        raise BackboneError(f"pos_embed_resize must be 'bilinear', 'bicubic_antialias' or 'bicubic', "
                            f"not {pos_embed_resize!r}")
    if pretrained is not None:
        pretrained = os.fspath(pretrained)
    if pretrained in (None, "", "none", "None") or (name == TINY_MODEL and pretrained == DEFAULT_PRETRAINED):
        pretrained = None

    weights_path: Path | None = None
    if pretrained is not None:
        if _is_file_spec(pretrained):
            weights_path = _existing_file(pretrained, "checkpoint file",
                                          "an open_clip tag such as 'openai' or a path to a weights file")
        elif open_clip.get_pretrained_cfg(name, pretrained):
            weights_path = Path(_download_tag(name, pretrained, cache_dir))
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise BackboneError(
                f"unknown pretrained tag {pretrained!r} for {name}; known tags: {tags or 'none'}; "
                f"or pass a path to a local checkpoint file"
            )

    with seeded(seed), _quiet_root_logger():
        model = open_clip.create_model(name, pretrained=None, device="cpu")
    if weights_path is not None:
        _load_weights_file(model, weights_path, name)

    patch = int(model.visual.patch_size[0])
    if image_size % patch:
        raise BackboneError(f"image_size {image_size} is not a multiple of the patch size {patch} of {name}")
    native_size = int(model.visual.image_size[0])
    new_grid = (image_size // patch, image_size // patch)
    with torch.no_grad():
        new_pos = resize_pos_embed(model.visual.positional_embedding.data, new_grid, pos_embed_resize)
    model.visual.positional_embedding = nn.Parameter(new_pos, requires_grad=False)
    model.visual.image_size = (image_size, image_size)
    model.visual.grid_size = new_grid

    quick_gelu = isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU) or (
        type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    )
    info = {
        "name": name,
        "pretrained": pretrained,
        "weights_path": str(weights_path) if weights_path else None,
        "weights_sha256": _weights_sha256(weights_path) if (weights_path and checksum) else None,
        "random_weights": weights_path is None,
        "seed": seed if weights_path is None else None,
        "image_size": image_size,
        "native_image_size": native_size,
        "grid_size": list(new_grid),
        "pos_embed_resize": pos_embed_resize if native_size != image_size else "none (native size)",
        "quick_gelu": bool(quick_gelu),
        "note": (
            "random weights: outputs mean nothing (smoke/test run)" if weights_path is None else "pretrained weights"
        ),
    }
    tokenizer = open_clip.get_tokenizer(name)
    backbone = Backbone(model, tokenizer, info)
    return backbone.to(resolve_device(device))
