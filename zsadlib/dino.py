"""DINOv2 (with registers) second backbone for Crane+'s D-Attn, built with timm.

Crane+ (AlirezaSalehy/Crane@39181f9, ``models/Crane.py``: ``use_DAttn('dinov2')`` and ``encode_image``) loads
``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitb14_reg')`` and, for a batch of CLIP-normalised images,
computes::

    raw = unnormalize(image, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)     # image * std + mean, clamp(0, 1)
    dino_img = Normalize(IMAGENET_DATASET_MEAN, IMAGENET_DATASET_STD)(raw)  # (raw - mean) / std
    dino_feats = vfm.get_intermediate_layers(dino_img, reshape=True)[0]     # [B, 768, H/14, W/14]

:func:`load_dino` builds the same network with timm (``vit_base_patch14_reg4_dinov2``, no torch.hub, no
network) and :meth:`DinoBackbone.patch_features` computes ``dino_feats`` from CLIP-normalised images exactly
as above: the last block's tokens through the final LayerNorm, class token and the 4 registers dropped,
reshaped to [B, C, h, w].

Geometry. The hub model is built at 518 px (a 37 x 37 positional grid) and resizes its positional embedding
at every forward for other sizes (bicubic, ``antialias=True``, output ``size`` given, i.e.
``interpolate_offset=0``). Here the timm model keeps that native grid (``img_size`` = the native 518, not the
input size) and is built with ``dynamic_img_size=True``: timm then resizes from the native grid at every
forward with ``resample_abs_pos_embed`` (bicubic, ``antialias=True``, ``size=``), the same call. Building at
``img_size=image_size`` instead would resize once at load and then resize *again* from that grid for any
other input size, which the hub never does. ``image_size`` is therefore only the expected input size
(recorded in ``info`` with its grid); any multiple of the patch size works.

Measured against the hub architecture (tools/verify_dinov2_timm.py, facebookresearch/dinov2 at
b8931f7bf91576930313be2c6d6af376033b35f0, torch 2.14.1 CPU float32, random weights with every parameter
perturbed, the hub model's state dict saved in the original format and loaded here by path; max abs
difference of ``get_intermediate_layers(x, reshape=True)[0]`` vs ``patch_features``, CLIP-normalised inputs
through Crane's own ``unnormalize`` + torchvision ``Normalize``):

* small width (embed 64, depth 2, heads 2, 4 registers; patch 14 at native 280 px and 224 / 518 px;
  patch 12 at native 240 px and 192 px): 0.0 at every size (bit-exact);
* real ViT-B/14 (embed 768, depth 12, heads 12): 518 px (native) 0.0, 448 px (32 x 32 grid, the positional
  embedding is resized) 0.0; the resized positional embeddings themselves are bit-identical (0.0);
* negative control: the same hub model interpolating as its no-register siblings do (no antialias, offset
  0.1) differs from ours by 0.018 .. 0.056 at the non-native sizes (features up to ~5 in magnitude), so the
  check does see interpolation differences.

Both sides use ``F.scaled_dot_product_attention`` (xFormers absent/disabled) and the same ops in the same
order, hence the exact equality. The only conversion is timm's own (``checkpoint_filter_fn`` ->
``_convert_dinov2``): ``cls_token + pos_embed[:, 0]`` becomes timm's ``cls_token`` (timm's reg4 models do not
add a positional embedding to prefix tokens; the hub adds ``pos_embed[:, 0]`` to the class token and none to
the registers), ``register_tokens`` -> ``reg_token``, ``mask_token`` dropped. On a GPU, or with xFormers
installed on the hub side, the attention kernels may differ at float rounding level.

Only the ``*_reg4_dinov2`` architectures are accepted: the hub's models without registers interpolate with
``interpolate_offset=0.1`` and no antialias, which timm's run-time resize does not reproduce.

The built-in ``tiny`` config (random weights; embed 64, depth 2, heads 2, 4 registers, layer scale, patch 12
by default, native grid 20 x 20 so 240 px with patch 12) runs every code path in tests; numbers made with it
mean nothing (``info["random_weights"]``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .backbone import (BackboneError, WeightsNotFoundError, _existing_file, _hf_cache_dir, _is_file_spec, _weights_sha256,
                       try_download)
from .data.transforms import OPENAI_MEAN, OPENAI_STD
from .utils import resolve_device, seeded, state_mismatch

__all__ = [
    "DEFAULT_DINO",
    "DEFAULT_DINO_TAG",
    "TINY_DINO",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DinoBackbone",
    "load_dino",
    "clip_to_imagenet",
]

DEFAULT_DINO = "vit_base_patch14_reg4_dinov2.lvd142m"  # = torch.hub facebookresearch/dinov2 dinov2_vitb14_reg
DEFAULT_DINO_TAG = "lvd142m"
TINY_DINO = "tiny"
TINY_PATCH = 12
TINY_GRID = 20  # native positional grid of the tiny config: 240 px with patch 12
TINY_ARGS = dict(embed_dim=64, depth=2, num_heads=2)

#: ImageNet normalisation constants (RGB), as in Crane's utils/transform.py.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# the hub builds dinov2_vitb14_reg with init_values=1.0 (layer scale); only random weights see it
_HUB_INIT_VALUES = 1.0


def clip_to_imagenet(images: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised images -> ImageNet-normalised, op for op as Crane does it (float32 throughout).

    ``unnormalize``: ``(x * std + mean).clamp(0, 1)`` with OpenAI mean/std; then torchvision ``Normalize``:
    ``(x - mean) / std`` with ImageNet mean/std.
    """
    x = images.float()
    device = x.device
    clip_mean = torch.tensor(OPENAI_MEAN, device=device).view(-1, 1, 1)
    clip_std = torch.tensor(OPENAI_STD, device=device).view(-1, 1, 1)
    raw = (x * clip_std + clip_mean).clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=raw.dtype, device=device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=raw.dtype, device=device).view(-1, 1, 1)
    return (raw - mean) / std


class DinoBackbone(nn.Module):
    """A frozen timm DINOv2-with-registers ViT giving Crane's D-Attn features.

    Build it with :func:`load_dino`. ``self.model`` is the timm ``VisionTransformer`` (eval mode,
    ``requires_grad=False``).
    """

    def __init__(self, model: nn.Module, info: dict):
        super().__init__()
        self.model = model
        self.info = info
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid of an ``image_size`` input."""
        return (self.image_size // self.patch_size, self.image_size // self.patch_size)

    @property
    def native_grid_size(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.model.patch_embed.grid_size)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def num_register_tokens(self) -> int:
        return int(self.model.num_reg_tokens)

    @property
    def device(self) -> torch.device:
        return self.model.patch_embed.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    def train(self, mode: bool = True) -> "DinoBackbone":
        """The ViT stays in eval mode whatever the caller asks (it is frozen)."""
        super().train(mode)
        self.model.eval()
        return self

    def imagenet_features(self, images: torch.Tensor) -> torch.Tensor:
        """The hub's ``get_intermediate_layers(images, reshape=True)[0]`` for ImageNet-normalised images."""
        images = images.to(self.device)
        if images.ndim != 4 or images.shape[1] != 3:
            raise BackboneError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        patch = self.patch_size
        if height % patch or width % patch:
            raise BackboneError(f"image size {height} x {width} is not a multiple of the DINOv2 patch size {patch}")
        (features,) = self.model.forward_intermediates(
            images.to(self.dtype), indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return features

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Crane's ``dino_feats``: [B, C, H/p, W/p] normed last-layer patch tokens for CLIP-normalised images."""
        return self.imagenet_features(clip_to_imagenet(images.to(self.device)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D401 - nn.Module protocol
        """Same as :meth:`patch_features`."""
        return self.patch_features(images)


# ---------------------------------------------------------------------------------------------------------
# building and loading
# ---------------------------------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def _create(arch: str, native_size: int, seed: int, patch_size: int | None) -> nn.Module:
    import timm

    kwargs = dict(
        pretrained=False,
        num_classes=0,
        img_size=native_size,
        dynamic_img_size=True,  # resize the pos-embed from the native grid at each forward, like the hub
        init_values=_HUB_INIT_VALUES,
    )
    with seeded(seed):
        if arch == TINY_DINO:
            return timm.create_model(
                "vit_base_patch14_reg4_dinov2", patch_size=patch_size, **TINY_ARGS, **kwargs
            )
        return timm.create_model(arch, **kwargs)


def _tag_sources(arch: str, tag: str) -> tuple[str, str, list[str], str]:
    """(hf repo id, torch-hub file name, candidate HF file names, original url) of a timm (arch, tag)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(f"{arch}.{tag}")
    repo_id = cfg.hf_hub_id or ""
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    url = cfg.url or ""
    return repo_id, (url.rsplit("/", 1)[-1] if url else ""), names, url


def _cached_tag_file(repo_id: str, names: list[str], hub_file: str, cache_dir: str | None) -> str | None:
    """The tag's weights when already on this machine: the HF cache (timm format) or the torch-hub checkpoint
    folder (the original file Crane's torch.hub.load downloads). No network."""
    if repo_id:
        from huggingface_hub import try_to_load_from_cache

        for candidate in names:
            found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(found, str) and Path(found).is_file():
                return found
    if hub_file:
        path = Path(torch.hub.get_dir()) / "checkpoints" / hub_file
        if path.is_file():
            return str(path)
    return None


def _download_dino_tag(name: str, arch: str, tag: str, cache_dir: str | None) -> str:
    """Path of the weights of a timm (arch, tag), from a cache or the hub; one clear error if absent."""
    repo_id, hub_file, names, url = _tag_sources(arch, tag)
    cached = _cached_tag_file(repo_id, names, hub_file, cache_dir)
    if cached:
        return cached
    where = f"{cache_dir or _hf_cache_dir()} (for '{repo_id}')"
    if hub_file:
        where += f" and {Path(torch.hub.get_dir()) / 'checkpoints' / hub_file}"
    def download() -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, names[0], cache_dir=cache_dir)

    path, reason = try_download(download, "" if repo_id else "the tag has no Hugging Face repository")
    if path:
        return path
    raise WeightsNotFoundError(
        f"weights for DINOv2 {name} (pretrained={tag!r}) are not on this machine: looked in {where} and "
        f"{reason}; download them where the hub is reachable and pass pretrained='/path/to/model.safetensors' "
        f"(timm/HF format) or the original '{hub_file or 'dinov2_*_pretrain.pth'}'"
        + (f" ({url})" if url else "")
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint on the CPU: safetensors or a (possibly wrapped) PyTorch state dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise BackboneError(f"cannot read DINOv2 checkpoint {path}: {type(error).__name__}: {error}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"DINOv2 checkpoint {path} is not a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _load_weights(model: nn.Module, path: Path, name: str) -> str:
    """Load a DINOv2 checkpoint strictly; returns its format ("dinov2" original or "timm")."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = _read_state(path)
    original = "mask_token" in state or "register_tokens" in state
    # timm's filter would silently resample a different patch kernel or positional grid: refuse instead
    problems = []
    weight = state.get("patch_embed.proj.weight")
    expected = tuple(model.patch_embed.proj.weight.shape)
    if weight is not None and tuple(weight.shape) != expected:
        problems.append(f"patch_embed.proj.weight {tuple(weight.shape)} != {expected}")
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        tokens = pos.shape[1] - (1 if original else 0)
        native = int(model.pos_embed.shape[1])
        if tokens != native:
            problems.append(f"positional grid of {tokens} patches != the model's native {native}")
    if original and "register_tokens" not in state:
        problems.append("no register_tokens (a DINOv2 model without registers)")
    if not problems:
        state = checkpoint_filter_fn(dict(state), model)
        mismatch = state_mismatch(model.state_dict(), state, limit=3)
        if mismatch:
            problems.append(mismatch)
    if problems:
        raise BackboneError(f"DINOv2 checkpoint {path} does not fit model {name}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return "dinov2" if original else "timm"


def load_dino(
    name: str = DEFAULT_DINO,
    pretrained: str | os.PathLike | None = DEFAULT_DINO_TAG,
    image_size: int | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    *,
    patch_size: int | None = None,
    cache_dir: str | None = None,
    checksum: bool = True,
) -> DinoBackbone:
    """Load a DINOv2-with-registers ViT as a frozen :class:`DinoBackbone` (timm, no torch.hub).

    Args:
        name: a timm ``*_reg4_dinov2`` model, with or without its tag (default
            ``"vit_base_patch14_reg4_dinov2.lvd142m"``, the hub's ``dinov2_vitb14_reg``), or ``"tiny"``
            (built-in random-weight test config).
        pretrained: a timm tag (``"lvd142m"``; read from the Hugging Face cache, or the torch-hub checkpoint
            folder, and downloaded only when the hub is reachable and ``HF_HUB_OFFLINE`` is not set), a path to a
            local weights file (the original ``dinov2_vitb14_reg4_pretrain.pth`` or a timm/HF ``.safetensors`` /
            ``.bin``), or ``None`` / ``"none"`` for random weights seeded by ``seed``. ``tiny`` ignores the
            default tag (it has no published weights).
        image_size: the expected square input size (default: the native size, 518 / tiny 20 x patch); it must
            be a multiple of the patch size. The positional grid stays native; other sizes are resized at each
            forward exactly as the hub does.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ...
        seed: seed of the random initialisation.
        patch_size: patch size of the ``tiny`` config (default 12); must be None (or match) for real models.
        cache_dir: Hugging Face cache folder (default: the HF cache).
        checksum: record the SHA-256 of the weights file in ``info``.
    Raises:
        WeightsNotFoundError: the tag's weights are not on this machine and cannot be downloaded, or the file
            is missing.
        BackboneError: unknown model or tag, a checkpoint that does not fit, a size not a multiple of the patch.
    """
    import timm

    arch, name_tag = _split_name(name)
    if pretrained is not None:
        pretrained = os.fspath(pretrained)
    if pretrained in ("", "none", "None") or (arch == TINY_DINO and pretrained == DEFAULT_DINO_TAG):
        pretrained = None

    if arch == TINY_DINO:
        patch = int(patch_size or TINY_PATCH)
        if patch < 1:
            raise BackboneError(f"patch_size must be positive, not {patch}")
        native_size = TINY_GRID * patch
    else:
        if not arch.endswith("_reg4_dinov2") or arch not in timm.list_models():
            raise BackboneError(
                f"unknown DINOv2 model {name!r}: expected a timm *_reg4_dinov2 model such as {DEFAULT_DINO} "
                f"(the hub's dinov2_vitb14_reg) or {TINY_DINO!r}"
            )
        default_cfg = timm.models.get_pretrained_cfg(f"{arch}.{name_tag or DEFAULT_DINO_TAG}")
        native_size = int(default_cfg.input_size[-1]) if default_cfg else 518
        patch = None
        if patch_size is not None:
            raise BackboneError(f"patch_size is only for the {TINY_DINO!r} config; {arch} has its own")

    weights_path: Path | None = None
    tag = None
    if pretrained is not None:
        if _is_file_spec(pretrained):
            weights_path = _existing_file(pretrained, "DINOv2 checkpoint file",
                                          f"a timm tag such as '{DEFAULT_DINO_TAG}' or a path to a weights file")
        elif arch == TINY_DINO:
            raise BackboneError(f"the {TINY_DINO!r} DINOv2 config has no published weights; pass a file path or None")
        else:
            tag = pretrained
            if name_tag and name_tag != tag:
                raise BackboneError(f"model {name} names tag {name_tag!r} but pretrained={tag!r}")
            known = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
            if tag not in known:
                raise BackboneError(
                    f"unknown pretrained tag {tag!r} for {arch}; known tags: {known or 'none'}; "
                    f"or pass a path to a local weights file"
                )
            weights_path = Path(_download_dino_tag(f"{arch}.{tag}", arch, tag, cache_dir))

    model = _create(arch, native_size, seed, patch)
    weights_format = None
    if weights_path is not None:
        weights_format = _load_weights(model, weights_path, arch)

    patch = int(model.patch_embed.patch_size[0])
    image_size = int(image_size or native_size)
    if image_size % patch:
        raise BackboneError(f"image_size {image_size} is not a multiple of the patch size {patch} of DINOv2 {name}")
    grid = [image_size // patch, image_size // patch]
    info = {
        "name": name if arch == TINY_DINO or name_tag else (f"{arch}.{tag}" if tag else arch),
        "pretrained": pretrained,
        "weights_path": str(weights_path) if weights_path else None,
        "weights_sha256": _weights_sha256(weights_path) if (weights_path and checksum) else None,
        "weights_format": weights_format,
        "random_weights": weights_path is None,
        "seed": seed if weights_path is None else None,
        "image_size": image_size,
        "native_image_size": native_size,
        "patch_size": patch,
        "grid_size": grid,
        "native_grid_size": [int(g) for g in model.patch_embed.grid_size],
        "embed_dim": int(model.embed_dim),
        "num_register_tokens": int(model.num_reg_tokens),
        "pos_embed_resize": (
            "none (native size)" if image_size == native_size
            else "bicubic antialias from the native grid at each forward (as the hub: interpolate_offset 0)"
        ),
        "input_normalisation": "CLIP (OpenAI) -> unnormalise, clamp(0, 1) -> ImageNet (as Crane)",
        "timm": timm.__version__,
        "note": (
            "random weights: outputs mean nothing (smoke/test run)" if weights_path is None else "pretrained weights"
        ),
    }
    return DinoBackbone(model, info).to(resolve_device(device))
