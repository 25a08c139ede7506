"""Text side of the ZSAD methods: handcrafted prompt ensembles (learned contexts come later)."""
from .handcrafted import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATE_SETS,
    TEMPLATES_ANOMALIB,
    TEMPLATES_WINCLIP22,
    encode_prompt_ensemble,
    get_templates,
    prompt_ensemble,
    winclip_prompts,
)

__all__ = [
    "ANOMALOUS_STATES",
    "NORMAL_STATES",
    "TEMPLATE_SETS",
    "TEMPLATES_ANOMALIB",
    "TEMPLATES_WINCLIP22",
    "encode_prompt_ensemble",
    "get_templates",
    "prompt_ensemble",
    "winclip_prompts",
]
