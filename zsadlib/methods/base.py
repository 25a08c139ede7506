"""The method contract shared by every ZSAD method in zsadlib.

A method is a config dataclass (paper defaults, one commented field per knob) plus an ``nn.Module`` that maps
a batch of normalised images (and class names, for methods that put them in prompts) to image scores [B] and
anomaly maps [B, H, W] at the input resolution. Methods are registered by name::

    @register_method
    class WinCLIP(AnomalyMethod):
        name = "winclip"
        config_class = WinCLIPConfig

    method = build_method("winclip", backbone="tiny", pretrained=None)   # or a loaded Backbone
    out = method(images, class_names)        # MethodOutput(scores [B], maps [B, H, W], extras)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..backbone import Backbone, load_backbone
from ..checkpoint import load_checkpoint as _load_checkpoint
from ..errors import MethodError
from ..utils import state_mismatch

__all__ = [
    "MethodConfig",
    "MethodOutput",
    "AnomalyMethod",
    "MethodError",
    "register_method",
    "list_methods",
    "get_method_class",
    "build_method",
    "build_method_or_tiny",
    "check_layers",
    "check_map_settings",
    "check_options",
    "mask_targets",
]


@dataclass
class MethodConfig:
    """Fields every method has. Subclasses override the defaults with their paper's values."""

    backbone: str = "ViT-L-14-336-quickgelu"  # open_clip model name
    pretrained: str | None = "openai"  # open_clip tag, a local checkpoint file, or None (random weights)
    image_size: int = 518  # square input size (pixel metrics are computed at this size)
    pos_embed_resize: str = "bilinear"  # "bilinear" (reference code) | "bicubic_antialias" (open_clip)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MethodError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        converted = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                value = values[f.name]
                if isinstance(value, list):  # JSON round trip turns tuples into lists
                    value = tuple(value)
                converted[f.name] = value
        return cls(**converted)

    def replace(self, **changes) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise MethodError(f"unknown {type(self).__name__} fields {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)


def check_options(config: MethodConfig, **choices: Sequence[Any]) -> None:
    """Raise MethodError naming the field when ``getattr(config, field)`` is not one of its ``choices``."""
    for field_name, allowed in choices.items():
        value = getattr(config, field_name)
        if value not in allowed:
            raise MethodError(f"{field_name} must be one of {list(allowed)}, not {value!r}")


def check_layers(layers: Sequence[int], backbone: Backbone, field_name: str = "layers") -> None:
    """Raise MethodError unless ``layers`` names at least one block of the backbone (1-based)."""
    if not layers:
        raise MethodError(f"{field_name} must name at least one vision block")
    bad = [layer for layer in layers if not 1 <= int(layer) <= backbone.num_layers]
    if bad:
        raise MethodError(f"{field_name} {bad} out of range: the backbone has vision blocks 1..{backbone.num_layers}")


def check_map_settings(config: MethodConfig) -> None:
    """The shared similarity / post-processing fields: temperature > 0 and blur_sigma >= 0 (where present)."""
    if getattr(config, "temperature", 1.0) <= 0:
        raise MethodError(f"temperature must be > 0, got {config.temperature}")
    if getattr(config, "blur_sigma", 0.0) < 0:
        raise MethodError(f"blur_sigma must be >= 0, got {config.blur_sigma}")


def mask_targets(masks: torch.Tensor, images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Training masks ([B, S, S] or [B, 1, S, S]; bool, or float with > 0.5 anomalous) -> bool [B, S, S] on
    ``device``, checked against the images' size."""
    size = tuple(images.shape[-2:])
    masks = masks.to(device)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if tuple(masks.shape) != (images.shape[0], *size):
        raise MethodError(f"masks must be [B, {size[0]}, {size[1]}], got {tuple(masks.shape)}")
    return masks > 0.5 if masks.is_floating_point() else masks.bool()


@dataclass
class MethodOutput:
    """scores: [B] image anomaly scores; maps: [B, H, W] anomaly maps at input resolution; extras: per-method
    intermediate results (e.g. ``layer_maps`` [B, n_layers, H, W]) for notebooks and ablations."""

    scores: torch.Tensor
    maps: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


class AnomalyMethod(nn.Module):
    """Base class: ``forward(images [B,3,S,S], class_names list[str] | None) -> MethodOutput``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    uses_class_names: ClassVar[bool] = False  # whether the class name enters the prompts
    trainable: ClassVar[bool] = False  # whether it has learned parameters (prompt learning)
    paper: ClassVar[str] = ""
    tiny_overrides: ClassVar[dict[str, Any]] = {}  # config fields for smoke runs on the tiny backbone (e.g. a tiny
    # second backbone), applied by build_method_or_tiny's fallback unless the caller sets them

    def __init__(self, config: MethodConfig, backbone: Backbone):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self._text_cache: dict[str, torch.Tensor] = {}  # class name -> [2, D] (see cached_class_text)

    def forward(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> MethodOutput:
        raise NotImplementedError

    def _class_names(self, class_names: Sequence[str] | None, batch: int) -> list[str]:
        if class_names is None:
            if self.uses_class_names:
                return ["object"] * batch
            return [""] * batch
        if len(class_names) != batch:
            raise MethodError(f"got {len(class_names)} class names for a batch of {batch} images")
        return [str(name) for name in class_names]

    # -- per-class text (handcrafted prompt ensembles), encoded once per class name --------------------------
    def cached_class_text(self, class_names: Sequence[str], encode: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """[B, 2, D]: ``encode(name)`` ([2, D]) for each image's class name, each name encoded once per method."""
        rows = []
        for name in class_names:
            if name not in self._text_cache:
                self._text_cache[name] = encode(name)
            rows.append(self._text_cache[name].to(self.backbone.device))
        return torch.stack(rows)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()
        self.__dict__.pop("_inference_text_cache", None)

    # -- learned text that does not depend on the image: computed once per parameter state at inference ---------
    def inference_text(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()`` (e.g. the learned prompts' text features), kept and reused at inference.

        With gradients enabled (training) it is computed every call. Without, the result is reused until a learned
        parameter changes: the key holds each learned parameter's identity and version counter, which every in-place
        update bumps (optimiser steps, checkpoint loads), plus the device. It is computed in full precision (autocast
        off): once per evaluation it costs nothing, and bf16 text moved AnomalyCLIP's summed maps by up to 0.03.
        """
        if torch.is_grad_enabled():
            return compute()
        device = self.backbone.device
        key = (str(device), tuple((id(p), p._version) for p in self.learned_parameters().values()))
        cached = self.__dict__.get("_inference_text_cache")
        if cached is None or cached[0] != key:
            with torch.autocast(device.type, enabled=False):  # computed once: full precision costs nothing later
                cached = (key, compute())
            self.__dict__["_inference_text_cache"] = cached
        return cached[1]

    # -- learned parameters (prompt-learning methods) -------------------------------------------------------
    def learned_parameters(self) -> dict[str, nn.Parameter]:
        """Named parameters that training updates: everything with ``requires_grad`` outside the frozen backbone."""
        return {name: p for name, p in self.named_parameters()
                if p.requires_grad and not name.startswith("backbone.")}

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups; methods with several learning rates (ViP2-CLIP) override this."""
        return [{"params": list(self.learned_parameters().values()), "lr": lr}]

    def training_loss(self, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor,
                      class_names: Sequence[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch (images [B,3,S,S], masks [B,S,S] bool or None, labels [B]) and its named parts.

        ``masks=None`` means the training set has no pixel annotations: the method uses its image loss only.
        """
        raise MethodError(f"method {self.name!r} is training-free (no learned parameters)")

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        """The learned parameters only (what checkpoints hold), detached, on their device."""
        return {name: p.detach() for name, p in self.learned_parameters().items()}

    def load_learned_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load learned parameters strictly: every key present, no extra key, same shapes; says what differs."""
        own = self.learned_parameters()
        problems = state_mismatch(own, state)
        if problems:
            raise MethodError(f"{source} does not fit {self.name}: {problems}")
        with torch.no_grad():
            for name, parameter in own.items():
                parameter.copy_(state[name].to(device=parameter.device, dtype=parameter.dtype))

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Load a training checkpoint (safetensors + JSON) made by :mod:`zsadlib.train`; returns its metadata."""
        return _load_checkpoint(self, path)

    def describe(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """What metrics.json records about the method (``class_names``: the evaluated classes, for methods whose
        record depends on them)."""
        return {"method": self.name, "paper": self.paper, "config": self.config.to_dict(),
                "backbone": dict(self.backbone.info)}


_REGISTRY: dict[str, type[AnomalyMethod]] = {}


def register_method(cls: type[AnomalyMethod]) -> type[AnomalyMethod]:
    if not cls.name:
        raise MethodError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    from . import _load_all  # noqa: F401 - importing registers the built-in methods

    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[AnomalyMethod]:
    names = list_methods()
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(names)}")
    return _REGISTRY[name]


def build_method_or_tiny(
    name: str,
    backbone: str | None = None,
    pretrained: str | None | type(...) = ...,
    image_size: int | None = None,
    device: str | torch.device = "auto",
    allow_tiny: bool = True,
    announce=print,
    **overrides: Any,
) -> AnomalyMethod:
    """:func:`build_method` with real weights, or, when they are not on this machine and ``allow_tiny``, the same
    method on the tiny random-weight backbone (announced in one line; every output then says it means nothing).

    The tiny backbone has patch 14: its input size is the requested one rounded down to a multiple of 14.
    """
    from ..backbone import TINY_MODEL, WeightsNotFoundError

    try:
        return build_method(name, backbone=backbone, pretrained=pretrained, image_size=image_size, device=device,
                            **overrides)
    except WeightsNotFoundError as error:
        if not allow_tiny:
            raise
        wanted = image_size or get_method_class(name).config_class().image_size
        size = max(14, wanted - wanted % 14)
        announce(f"{error}; running {name} on the tiny random-weight backbone at {size}px instead: "
                 "its outputs mean nothing")
        overrides = {**get_method_class(name).tiny_overrides, **overrides}
        return build_method(name, backbone=TINY_MODEL, pretrained=None, image_size=size, device=device, **overrides)


def build_method(
    name: str,
    backbone: Backbone | str | None = None,
    pretrained: str | None | type(...) = ...,
    image_size: int | None = None,
    device: str | torch.device = "auto",
    config: MethodConfig | dict | None = None,
    **overrides: Any,
) -> AnomalyMethod:
    """Build a registered method with its paper defaults, changing only what is passed.

    Args:
        name: a name from :func:`list_methods`.
        backbone: a loaded :class:`Backbone`, or an open_clip model name (default: the paper's).
        pretrained: tag / file / None for the backbone (default: the paper's).
        image_size: input size (default: the paper's).
        config: a full config (or dict of fields) to start from instead of the paper defaults.
        overrides: config fields to change (ablations change fields, never code).
    """
    cls = get_method_class(name)
    if config is None:
        config = cls.config_class()
    elif isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    changes = dict(overrides)
    if isinstance(backbone, str):
        changes["backbone"] = backbone
    if pretrained is not ...:
        changes["pretrained"] = pretrained
    if image_size is not None:
        changes["image_size"] = image_size
    config = config.replace(**changes)
    if not isinstance(backbone, Backbone):
        backbone = load_backbone(config.backbone, pretrained=config.pretrained, image_size=config.image_size,
                                 device=device, pos_embed_resize=config.pos_embed_resize)
        # record the weights actually loaded (the tiny backbone ignores a tag: it has no published weights)
        config = config.replace(pretrained=backbone.info.get("pretrained"))
    else:  # the config records the backbone actually used, including how its positional embedding was resized
        resize = backbone.info.get("pos_embed_resize", "")
        config = config.replace(backbone=backbone.info["name"], pretrained=backbone.info["pretrained"],
                                image_size=backbone.image_size,
                                pos_embed_resize=resize if resize in ("bilinear", "bicubic_antialias", "bicubic")
                                else config.pos_embed_resize)
    method = cls(config, backbone)
    return method.to(backbone.device)
