"""WinCLIP's compositional prompt ensemble (Jeong et al., CVPR 2023, Sec. 4.1), as plain data.

A prompt is a template with a state word inserted, and the class name inserted in the state word::

    template "a photo of the {}."  +  state "flawless {}"  +  class "bottle"
        -> "a photo of the flawless bottle."

Every (state, template) pair of a group (normal or anomalous) is encoded by CLIP's text encoder and the
embeddings are averaged into one prototype per group, giving the two rows [normal, anomalous] that the
image, window and patch embeddings are scored against.

What was checked (anomalib ``src/anomalib/models/image/winclip/prompting.py`` and ``torch_model.py``, and the
community re-implementation caoyunkang/WinClip used by later papers):

* 7 normal states and 4 anomalous states, identical in both.
* anomalib's template list has 21 entries, all ending with a period; "a jpeg corrupted photo of the {}."
  appears twice (so 20 distinct templates) and "a cropped photo of a {}." / "a jpeg corrupted photo of a {}."
  are absent. caoyunkang/WinClip (and APRIL-GAN) use 22 templates without the final period and with both
  "a ..." variants. Both sets are here (:data:`TEMPLATE_SETS`); ``"anomalib"`` is the default of
  :class:`zsadlib.methods.winclip.WinCLIPConfig`, ``"winclip22"`` is the alternative.
* anomalib (and caoyunkang's default "V1") average the *unnormalised* text embeddings of a group; the
  cosine similarity normalises the mean afterwards. ``normalize_each=True`` normalises every prompt
  embedding before the mean (the CLIP zero-shot-classification recipe) instead.

So anomalib's ensemble has 7 x 21 = 147 normal and 4 x 21 = 84 anomalous prompts.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "NORMAL_STATES",
    "ANOMALOUS_STATES",
    "TEMPLATES_ANOMALIB",
    "TEMPLATES_WINCLIP22",
    "TEMPLATE_SETS",
    "get_templates",
    "prompt_ensemble",
    "winclip_prompts",
    "encode_prompt_ensemble",
]

# State words: "{}" is the class name.
NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

# Templates: "{}" is the state phrase. anomalib's list, kept exactly (duplicate included: it weights that
# template twice in the mean, which is what anomalib computes).
TEMPLATES_ANOMALIB: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

# The 22-template list of caoyunkang/WinClip and APRIL-GAN: no final period, both "a"/"the" variants.
TEMPLATES_WINCLIP22: tuple[str, ...] = tuple(
    f"a {kind} photo of {article} {{}}"
    for kind, articles in (
        ("cropped", ("the", "a")),
        ("close-up", ("a", "the")),
        ("bright", ("a", "the")),
        ("dark", ("the", "a")),
        ("jpeg corrupted", ("a", "the")),
        ("blurry", ("the", "a")),
    )
    for article in articles
) + (
    "a photo of a {}",
    "a photo of the {}",
    "a photo of a small {}",
    "a photo of the small {}",
    "a photo of a large {}",
    "a photo of the large {}",
    "a photo of the {} for visual inspection",
    "a photo of a {} for visual inspection",
    "a photo of the {} for anomaly detection",
    "a photo of a {} for anomaly detection",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "anomalib": TEMPLATES_ANOMALIB,
    "winclip22": TEMPLATES_WINCLIP22,
}


def get_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A template set by name (:data:`TEMPLATE_SETS`) or an explicit sequence of ``"...{}..."`` strings."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {templates!r}; known: {sorted(TEMPLATE_SETS)}")
        return TEMPLATE_SETS[templates]
    templates = tuple(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"templates must be a non-empty sequence of strings with one '{{}}' each; bad: {bad}")
    return templates


def prompt_ensemble(class_name: str, states: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every state filled with ``class_name``; state-major order.

    >>> prompt_ensemble("bottle", ["{}", "damaged {}"], ["a photo of a {}.", "the {}."])
    ['a photo of a bottle.', 'the bottle.', 'a photo of a damaged bottle.', 'the damaged bottle.']

    Returns:
        ``len(states) * len(templates)`` prompts.
    """
    phrases = [state.format(class_name) for state in states]
    return [template.format(phrase) for phrase in phrases for template in templates]


def winclip_prompts(class_name: str, templates: str | Sequence[str] = "anomalib") -> tuple[list[str], list[str]]:
    """(normal prompts, anomalous prompts) of WinCLIP's ensemble for one class name."""
    chosen = get_templates(templates)
    return (prompt_ensemble(class_name, NORMAL_STATES, chosen), prompt_ensemble(class_name, ANOMALOUS_STATES, chosen))


@torch.no_grad()
def encode_prompt_ensemble(
    backbone,
    class_name: str,
    templates: str | Sequence[str] = "anomalib",
    normalize_each: bool = False,
    normal_states: Sequence[str] = NORMAL_STATES,
    anomalous_states: Sequence[str] = ANOMALOUS_STATES,
) -> torch.Tensor:
    """The two ensemble prototypes of a class.

    Args:
        backbone: a :class:`zsadlib.backbone.Backbone` (anything with ``encode_text(list[str]) -> [T, D]``).
        class_name: inserted in the state words.
        templates: a name from :data:`TEMPLATE_SETS` or explicit templates.
        normalize_each: L2-normalise every prompt embedding before averaging (False: anomalib / WinCLIP
            re-implementations average the raw embeddings).
        normal_states, anomalous_states: the state words.
    Returns:
        [2, D] rows (normal, anomalous), each the L2-normalised mean of its group's embeddings.
    """
    chosen = get_templates(templates)
    groups = [prompt_ensemble(class_name, normal_states, chosen), prompt_ensemble(class_name, anomalous_states, chosen)]
    prototypes = []
    device_type = backbone.device.type if hasattr(backbone, "device") else "cpu"
    for prompts in groups:
        with torch.autocast(device_type=device_type, enabled=False):  # cached by callers: never reduced precision
            embeddings = backbone.encode_text(prompts).float()
        if normalize_each:
            embeddings = F.normalize(embeddings, dim=-1)
        prototypes.append(embeddings.mean(dim=0))
    return F.normalize(torch.stack(prototypes), dim=-1)
