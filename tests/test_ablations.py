"""zsadlib.studies.ablations: the quirk audit's fields come from the config dataclasses, every variant builds and
changes its config, and the deltas against the default are differences of the right rows."""
import dataclasses

import pandas as pd
import pytest

from zsadlib.methods import build_method, get_method_class
from zsadlib.studies.ablations import (ALTERNATIVES, EXTRA_QUIRKS, NOT_AUDITED, ONLY_FOR, ablation_runs,
                                       audited_methods, marked_fields, metric_deltas, quirk_variants, summarize)


def _all_fields():
    from zsadlib.methods import list_methods

    return {f.name for name in list_methods() for f in dataclasses.fields(get_method_class(name).config_class)}


def test_the_audit_covers_the_documented_quirks():
    audit = {method: quirk_variants(method) for method in audited_methods()}
    assert audit["anomalyclip"]["deep_prompt_fp16_round"] == [False]
    assert audit["anomalyclip"]["global_ln_post"] == [True] and audit["anomalyclip"]["layers"] == [[6, 12, 18, 24]]
    assert audit["crane"]["aliased_taps"] == [False] and "dattn_value_source" not in audit["crane"]
    assert audit["crane_plus"]["dattn_mean"] == ["batch"]
    assert audit["crane_plus"]["dattn_value_source"] == ["block_input"]
    assert audit["vip2clip"]["normal_prompt_damaged"] == [False] and audit["vip2clip"]["fgp_shared"] == [False]
    genclip = marked_fields("genclip")
    assert all(comment.startswith("OUR choice") for comment in genclip.values()) and len(genclip) >= 15
    assert set(audit["genclip"]) == set(genclip) - set(NOT_AUDITED)
    assert "winclip" not in audit and "april_gan" not in audit  # no marked field


def test_every_listed_field_exists_and_every_marked_non_boolean_has_a_rule():
    fields = _all_fields()
    for table in (ALTERNATIVES, NOT_AUDITED, ONLY_FOR):
        assert set(table) <= fields, set(table) - fields
    for method, extra in EXTRA_QUIRKS.items():
        assert set(extra) <= {f.name for f in dataclasses.fields(get_method_class(method).config_class)}
    for method in audited_methods():
        config = get_method_class(method).config_class()
        for field in marked_fields(method):
            assert isinstance(getattr(config, field), bool) or field in ALTERNATIVES or field in NOT_AUDITED, \
                f"{method}.{field}: a marked non-boolean needs an alternative or a reason"


@pytest.mark.parametrize("method", ["anomalyclip", "crane", "crane_plus", "vip2clip", "genclip"])
def test_every_variant_builds_and_changes_one_field(method):
    tiny = get_method_class(method).tiny_overrides
    default = build_method(method, backbone="tiny", pretrained=None, image_size=126, device="cpu", **tiny).config
    for field, values in quirk_variants(method).items():
        for value in values:
            config = build_method(method, backbone="tiny", pretrained=None, image_size=126, device="cpu",
                                  **{**tiny, field: value}).config
            changed = {f.name for f in dataclasses.fields(config)
                       if getattr(config, f.name) != getattr(default, f.name)}
            assert changed == {field}, (method, field, changed)


def test_runs_are_the_default_then_one_change_each():
    runs = ablation_runs("crane", {"aliased_taps": [False], "blur_sigma": [0.0, 8.0]}, dataset="synthetic",
                         root="/data/s")
    assert [r.parameters["overrides"] for r in runs] == [{}, {"aliased_taps": False}, {"blur_sigma": 0.0},
                                                         {"blur_sigma": 8.0}]
    assert len({r.run_id for r in runs}) == 4 and runs[1].run_id.startswith("crane-aliased_taps-false-")
    assert all(r.target == "zsadlib.reproduce:learn_and_evaluate" for r in runs)


def test_deltas_are_variant_minus_default_of_the_same_method_class_and_metric():
    table = pd.DataFrame([
        ("crane", "default", None, "mean", "image_auroc", 0.50), ("crane", "default", None, "a", "image_auroc", 0.40),
        ("crane", "x=1", "x", "mean", "image_auroc", 0.55), ("crane", "x=1", "x", "a", "image_auroc", 0.30),
        ("vip2clip", "default", None, "mean", "image_auroc", 0.90),
        ("vip2clip", "y=2", "y", "mean", "image_auroc", 0.80),
    ], columns=["method", "variant", "field", "class_name", "metric", "value"])
    deltas = metric_deltas(table)
    got = {(r.method, r.variant, r.class_name): round(r.delta, 9) for r in deltas.itertuples()}
    assert got == {("crane", "x=1", "mean"): 5.0, ("crane", "x=1", "a"): -10.0, ("vip2clip", "y=2", "mean"): -10.0}
    summary = summarize(table, deltas)
    assert summary["crane"]["default"]["metrics"] == {"image_auroc": 0.5}
    assert summary["vip2clip"]["y=2"]["delta_points"]["image_auroc"] == pytest.approx(-10.0)
