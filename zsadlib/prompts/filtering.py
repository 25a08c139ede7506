"""Adaptive text prompt filtering (GenCLIP, 2025): class names CLIP is unlikely to know leave the prompt.

GenCLIP drops class names that CLIP has probably never seen from its prompts and writes "object" instead; the
paper does not publish the rule. OUR rule (METHODS.md, ``"single_token"``, the default): a name is kept only if
each of its words (split on spaces, underscores and hyphens) is encoded by CLIP's BPE tokenizer as ONE whole-word
token, i.e. a single vocabulary entry ending in ``</w>``. A word the BPE has to cut into pieces (``"fryum"`` ->
``fr`` + ``yum</w>``) or that holds digits (``"pcb1"`` -> ``pcb</w>`` + ``1</w>``: CLIP's pre-tokeniser splits
letters from digits) was rare or absent in CLIP's training text.

The vocabulary is open_clip's ``SimpleTokenizer`` (the CLIP BPE merges ship with open_clip: no weights needed);
the word is cleaned and lower-cased exactly as CLIP's tokenizer does before the lookup.

Rules are pluggable: any callable ``name -> bool`` (True = keep), or a registered rule name
(:data:`FILTER_RULES`: ``"single_token"``, ``"keep_all"``, ``"drop_all"``; add one with
:func:`register_filter_rule`).

Outcome of the default rule on the two standard class lists (tested in ``tests/test_filtering.py``)::

    VisA:      kept candle, capsules, cashew
               filtered chewinggum, fryum, macaroni1, macaroni2, pcb1, pcb2, pcb3, pcb4, pipe_fryum
    MVTec AD:  kept all but transistor ("transi" + "stor</w>"); metal_nut -> "metal nut"

Example::

    >>> names, report = filter_class_names(["metal_nut", "pcb1", "candle"])
    >>> names
    ['metal nut', 'object', 'candle']
    >>> report.filtered
    ['pcb1']
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = [
    "FILTER_RULES",
    "DEFAULT_RULE",
    "DEFAULT_REPLACEMENT",
    "FilterReport",
    "FilterError",
    "clip_tokenizer",
    "split_words",
    "word_tokens",
    "is_single_token_word",
    "single_token_rule",
    "register_filter_rule",
    "get_filter_rule",
    "filter_class_names",
    "prompt_form",
]

DEFAULT_RULE = "single_token"
DEFAULT_REPLACEMENT = "object"  # what a filtered name becomes in the prompt (GenCLIP: "object")

_WORD_SPLIT = re.compile(r"[\s_\-]+")

FilterRule = Callable[[str], bool]


class FilterError(ValueError):
    """Unknown filtering rule or a bad rule argument."""


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """open_clip's ``SimpleTokenizer`` with CLIP's own BPE vocabulary (49408 entries; shipped with open_clip)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def split_words(name: str) -> list[str]:
    """``"pipe_fryum"`` -> ``["pipe", "fryum"]``: split on spaces, underscores and hyphens; empty parts dropped."""
    return [word for word in _WORD_SPLIT.split(str(name)) if word]


def word_tokens(word: str, tokenizer=None) -> list[str]:
    """The BPE tokens CLIP's tokenizer makes of one word (cleaned and lower-cased as CLIP does).

    >>> word_tokens("fryum")
    ['fr', 'yum</w>']
    """
    tokenizer = tokenizer or clip_tokenizer()
    return [tokenizer.decoder[index] for index in tokenizer.encode(word)]


def is_single_token_word(word: str, tokenizer=None) -> bool:
    """True when ``word`` is ONE whole-word token of CLIP's vocabulary (a single entry ending in ``</w>``)."""
    tokens = word_tokens(word, tokenizer)
    return len(tokens) == 1 and tokens[0].endswith("</w>")


@functools.lru_cache(maxsize=4096)
def _single_token_name(name: str) -> bool:
    words = split_words(name)
    return bool(words) and all(is_single_token_word(word) for word in words)


def single_token_rule(name: str) -> bool:
    """OUR default rule: keep ``name`` only if every word is a single whole-word CLIP BPE token (a name without
    words, e.g. "", is not kept)."""
    return _single_token_name(str(name))


FILTER_RULES: dict[str, FilterRule] = {
    "single_token": single_token_rule,
    "keep_all": lambda name: True,  # no filtering: every class name goes into the prompt
    "drop_all": lambda name: False,  # every name replaced: the vision-enhanced branch becomes object-agnostic
}


def register_filter_rule(name: str, rule: FilterRule) -> FilterRule:
    """Register ``rule`` (``class name -> keep?``) under ``name`` so configs can refer to it by name."""
    if not callable(rule):
        raise FilterError(f"a filter rule must be callable (name -> bool), got {type(rule).__name__}")
    FILTER_RULES[str(name)] = rule
    return rule


def get_filter_rule(rule: str | FilterRule) -> tuple[str, FilterRule]:
    """``(rule name, callable)`` for a registered rule name or a callable (named after its ``__name__``)."""
    if callable(rule):
        return getattr(rule, "__name__", type(rule).__name__), rule
    if rule not in FILTER_RULES:
        raise FilterError(f"unknown name filter {rule!r}; registered rules: {', '.join(sorted(FILTER_RULES))}")
    return str(rule), FILTER_RULES[rule]


def prompt_form(name: str) -> str:
    """How a kept class name is written in a prompt: underscores become spaces (``"metal_nut"`` -> ``"metal nut"``),
    as the seed papers' code does (``cls_name.replace("_", " ")``)."""
    return " ".join(str(name).replace("_", " ").split())


@dataclass
class FilterReport:
    """What :func:`filter_class_names` did.

    Attributes:
        rule: the rule's name.
        replacement: the word written instead of a filtered name.
        kept: distinct kept names, in first-seen order.
        filtered: distinct filtered names, in first-seen order.
        prompt_names: distinct input name -> the word(s) used in the prompt.
        tokens: distinct input name -> CLIP BPE tokens of each word (why a name was kept or filtered).
    """

    rule: str
    replacement: str
    kept: list[str] = field(default_factory=list)
    filtered: list[str] = field(default_factory=list)
    prompt_names: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, list[list[str]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "replacement": self.replacement, "kept": list(self.kept),
                "filtered": list(self.filtered), "prompt_names": dict(self.prompt_names),
                "tokens": {k: [list(t) for t in v] for k, v in self.tokens.items()}}

    def __str__(self) -> str:
        return (f"name filter {self.rule!r}: kept {self.kept or 'none'}; filtered (-> {self.replacement!r}) "
                f"{self.filtered or 'none'}")


def filter_class_names(
    names: Sequence[str],
    rule: str | FilterRule = DEFAULT_RULE,
    replacement: str = DEFAULT_REPLACEMENT,
) -> tuple[list[str], FilterReport]:
    """Replace class names the rule rejects by ``replacement``.

    Args:
        names: class names as datasets spell them (``"metal_nut"``, ``"pcb1"``, ...); repeats allowed (one per
            image of a batch).
        rule: a registered rule name (:data:`FILTER_RULES`, default ``"single_token"``) or a callable
            ``name -> bool`` (True = keep).
        replacement: the prompt word for filtered names (GenCLIP: ``"object"``).
    Returns:
        ``(prompt_names, report)``: one prompt name per input name (kept names in :func:`prompt_form`,
        filtered ones as ``replacement``) and a :class:`FilterReport`.
    """
    if isinstance(names, str):
        raise FilterError("names must be a sequence of class names, not a single string")
    rule_name, keep = get_filter_rule(rule)
    report = FilterReport(rule=rule_name, replacement=replacement)
    out: list[str] = []
    tokenizer = clip_tokenizer()
    for name in names:
        name = str(name)
        if name not in report.prompt_names:
            kept = bool(keep(name))
            report.prompt_names[name] = prompt_form(name) if kept else replacement
            (report.kept if kept else report.filtered).append(name)
            report.tokens[name] = [word_tokens(word, tokenizer) for word in split_words(name)]
        out.append(report.prompt_names[name])
    return out, report
