"""Run presets of the notebooks: ``"paper"`` (the papers' settings, the notebooks' defaults) and ``"quick"`` (a CPU
tour in about a minute: the tiny random-weight backbone at a small size, a few images, one epoch).

A notebook's parameters cell holds the paper values and ``preset = "paper"``; its first code cell calls::

    params = resolve("02_prompt_learning", preset, **{name: value for each parameter})

Each parameter that still has its paper value takes the preset's value; a parameter set to anything else (by hand
or by papermill) is an explicit choice and is kept. So ``preset = "quick"`` with ``epochs = 3`` trains 3 epochs on
the tiny backbone. (A paper value cannot be forced under ``"quick"``: use ``preset = "paper"`` and set the rest.)

The quick image size, 126 px (a 9 x 9 grid), is a multiple of the 14 px patch but not a divisor of the native
336 px, so the position-embedding resize really interpolates, as it does at the papers' 518 px.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "PAPER", "QUICK", "resolve"]

# the notebooks' parameters-cell defaults (tests/test_notebook_presets.py checks that the cells hold these values)
PAPER: dict[str, dict[str, Any]] = {
    "01_feature_extraction": {
        "backbone": "ViT-L-14-336-quickgelu", "pretrained": "openai", "image_size": 518,
        "classes": None, "images_per_class": 4,
    },
    "02_prompt_learning": {
        "backbone": "ViT-L-14-336-quickgelu", "pretrained": "openai", "image_size": 518,
        "train_classes": ["carpet", "grid", "bottle", "screw"], "eval_classes": ["wood", "pill", "widget2"],
        "max_per_class": None,
        "epochs": 15,  # AnomalyCLIP paper default
        "batch_size": 8,
    },
    "03_dual_branch_inference": {
        "backbone": "ViT-L-14-336-quickgelu", "pretrained": "openai", "image_size": 518,
        "classes": None, "max_per_class": 4,
        "sweep_weights": [0.0, 0.25, 0.5, 0.75, 1.0],
    },
}

_TINY = {"backbone": "tiny", "pretrained": None, "image_size": 126}  # random weights: numbers mean nothing
QUICK: dict[str, dict[str, Any]] = {
    "01_feature_extraction": {**_TINY, "classes": ["carpet", "bottle"], "images_per_class": 4},
    "02_prompt_learning": {**_TINY, "train_classes": ["carpet", "bottle"], "eval_classes": ["pill"],
                           "max_per_class": 4, "epochs": 1, "batch_size": 4},
    "03_dual_branch_inference": {**_TINY, "classes": ["bottle", "widget2"], "max_per_class": 4,
                                 "sweep_weights": [0.0, 0.3, 0.5, 1.0]},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"paper": PAPER, "quick": QUICK}


def resolve(notebook: str, preset: str = "paper", **parameters: Any) -> dict[str, Any]:
    """The effective values of the parameters a preset governs, in the order given.

    parameters: the notebook's current value of every parameter the preset governs (a missing one is an error).
    A value equal to the paper value takes the preset's value; any other value is explicit and kept. So a
    notebook can write ``backbone, image_size = resolve(name, preset, backbone=backbone,
    image_size=image_size).values()``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if notebook not in PAPER:
        raise ValueError(f"no presets for notebook {notebook!r}; known: {sorted(PAPER)}")
    paper, chosen = PAPER[notebook], PRESETS[preset][notebook]
    missing = [name for name in chosen if name not in parameters]
    if missing:
        raise ValueError(f"resolve({notebook!r}): pass the current value of {missing} (the preset sets them)")
    return {name: chosen[name] if name in chosen and _same(value, paper.get(name, _NONE)) else value
            for name, value in parameters.items()}


_NONE = object()


def _same(value: Any, paper: Any) -> bool:
    """Equal and of the same kind (so True is not 1, and 518.0 counts as 518)."""
    if paper is _NONE:
        return False
    if isinstance(value, bool) or isinstance(paper, bool):
        return value is paper
    return value == paper
