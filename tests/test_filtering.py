"""Adaptive text prompt filtering on CLIP's real BPE vocabulary (ships with open_clip; no weights needed)."""
import pytest

from zsadlib.prompts.filtering import (
    FILTER_RULES,
    FilterError,
    FilterReport,
    clip_tokenizer,
    filter_class_names,
    get_filter_rule,
    is_single_token_word,
    prompt_form,
    register_filter_rule,
    split_words,
    word_tokens,
)

VISA = ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
        "pcb4", "pipe_fryum"]
MVTEC = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
         "toothbrush", "transistor", "wood", "zipper"]


def test_vocabulary_is_clips_bpe():
    tokenizer = clip_tokenizer()
    assert len(tokenizer.encoder) == 49408
    assert "bottle</w>" in tokenizer.encoder and "fryum</w>" not in tokenizer.encoder
    assert word_tokens("bottle") == ["bottle</w>"]
    assert word_tokens("fryum") == ["fr", "yum</w>"]  # cut by the BPE merges
    assert word_tokens("pcb1") == ["pcb</w>", "1</w>"]  # CLIP's pre-tokeniser splits letters from digits
    assert word_tokens("Bottle") == ["bottle</w>"]  # lower-cased as CLIP does
    assert is_single_token_word("candle") and not is_single_token_word("transistor")


def test_split_words():
    assert split_words("pipe_fryum") == ["pipe", "fryum"]
    assert split_words("metal nut") == ["metal", "nut"]
    assert split_words("x-ray  film__roll") == ["x", "ray", "film", "roll"]
    assert split_words("") == []
    assert prompt_form("metal_nut") == "metal nut"


def test_visa_outcome():
    names, report = filter_class_names(VISA)
    assert report.rule == "single_token" and report.replacement == "object"
    assert report.kept == ["candle", "capsules", "cashew"]
    assert report.filtered == ["chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
                               "pipe_fryum"]
    assert names == ["candle", "capsules", "cashew"] + ["object"] * 9
    assert report.tokens["chewinggum"] == [["che", "wing", "gum</w>"]]
    assert report.tokens["pipe_fryum"] == [["pipe</w>"], ["fr", "yum</w>"]]  # one bad word is enough


def test_mvtec_outcome():
    names, report = filter_class_names(MVTEC)
    assert report.filtered == ["transistor"]  # "transi" + "stor</w>"
    assert report.kept == [name for name in MVTEC if name != "transistor"]
    assert names[MVTEC.index("metal_nut")] == "metal nut"  # both words are single tokens
    assert names[MVTEC.index("transistor")] == "object"
    assert names[MVTEC.index("bottle")] == "bottle"


def test_repeats_keep_one_prompt_name_per_input():
    names, report = filter_class_names(["pcb1", "bottle", "pcb1", "bottle"])
    assert names == ["object", "bottle", "object", "bottle"]
    assert report.kept == ["bottle"] and report.filtered == ["pcb1"]
    assert report.prompt_names == {"pcb1": "object", "bottle": "bottle"}
    assert report.to_dict()["filtered"] == ["pcb1"]
    assert "pcb1" in str(report)


def test_rules_are_pluggable():
    assert set(FILTER_RULES) >= {"single_token", "keep_all", "drop_all"}
    names, report = filter_class_names(["pcb1", "metal_nut"], "keep_all")
    assert names == ["pcb1", "metal nut"] and report.filtered == []
    names, report = filter_class_names(["bottle"], "drop_all", replacement="thing")
    assert names == ["thing"] and report.filtered == ["bottle"]

    def short_names(name):
        return len(name) <= 5

    names, report = filter_class_names(["pcb1", "transistor"], short_names)
    assert names == ["pcb1", "object"] and report.rule == "short_names"
    register_filter_rule("test_short", short_names)
    try:
        assert get_filter_rule("test_short") == ("test_short", short_names)
        assert filter_class_names(["transistor"], "test_short")[0] == ["object"]
    finally:
        FILTER_RULES.pop("test_short")
    with pytest.raises(FilterError, match="unknown name filter"):
        filter_class_names(["bottle"], "no_such_rule")
    with pytest.raises(FilterError):
        register_filter_rule("bad", "not callable")
    with pytest.raises(FilterError):
        filter_class_names("bottle")  # a bare string is not a list of names


def test_empty_name_is_filtered():
    names, report = filter_class_names([""])
    assert names == ["object"] and isinstance(report, FilterReport)
