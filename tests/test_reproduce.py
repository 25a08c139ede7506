"""zsad reproduce: the protocol as two sweeps (learn on the auxiliary set once, evaluate on each target), the
comparison with an injected published table, the written table / markdown / figure, resume, the CLI."""
import json
import math

import pandas as pd
import pytest

from zsadlib.metrics import METRIC_KEYS
from zsadlib.reproduce import (TINY_NOTE, auxiliary_for, compare_with_published, data_root_for, markdown_table,
                               reproduce)
from zsadlib.sweep import SweepError

TINY = {"backbone": "tiny", "pretrained": None, "image_size": 112, "device": "cpu", "max_per_class": 2, "jobs": 1,
        "progress": False}


def published_table():
    return pd.DataFrame([
        ("anomalyclip", "synthetic", "image_auroc", 91.5, "AnomalyCLIP (ICLR 2024) Table 1"),
        ("anomalyclip", "synthetic", "image_auroc", 90.0, "Crane (arXiv 2504.11055) Table 1"),
        ("anomalyclip", "synthetic", "pixel_auroc", 91.1, "Crane (arXiv 2504.11055) Table 1"),
        ("crane", "synthetic", "image_auroc", 99.0, "Crane (arXiv 2504.11055) Table 1"),
    ], columns=["method", "dataset", "metric", "value", "source"])


def test_auxiliary_rule_and_data_roots(tmp_path):
    assert auxiliary_for("mvtec") == "visa" and auxiliary_for("visa") == "mvtec" and auxiliary_for("btad") == "mvtec"
    assert data_root_for("btad", tmp_path) == str(tmp_path / "btad")
    assert data_root_for("btad", tmp_path, {"btad": "/x/BTech"}) == "/x/BTech"
    with pytest.raises(SweepError, match="--data-root"):
        data_root_for("visa", None)
    from zsadlib.reproduce import learn_and_evaluate

    with pytest.raises(SweepError, match="auxiliary set 'mvtec' is missing"):  # never learns on the target's folder
        learn_and_evaluate(str(tmp_path / "o"), "anomalyclip", "btad", str(tmp_path / "btad"))


def test_comparison_picks_the_methods_own_paper_and_computes_differences():
    ours = pd.DataFrame([("synthetic", "image_auroc", 80.0), ("synthetic", "pixel_auroc", 95.0),
                         ("synthetic", "image_ap", float("nan"))], columns=["dataset", "metric", "value"])
    table = compare_with_published(ours, published_table(), "anomalyclip")
    rows = {r.metric: r for r in table.itertuples()}
    assert list(table.metric) == [m for m in METRIC_KEYS if m in rows]  # in the metrics' order
    assert rows["image_auroc"].published == 91.5 and rows["image_auroc"].source.startswith("AnomalyCLIP")
    assert rows["image_auroc"].difference == pytest.approx(80.0 - 91.5)
    assert rows["pixel_auroc"].difference == pytest.approx(95.0 - 91.1)
    assert math.isnan(rows["image_ap"].published) and math.isnan(rows["image_ap"].difference)
    chosen = compare_with_published(ours, published_table(), "anomalyclip", source="Crane (arXiv 2504.11055) Table 1")
    assert chosen.set_index("metric").loc["image_auroc", "published"] == 90.0
    text = markdown_table(table, TINY_NOTE)
    assert "| synthetic | 80.0 / 91.5 (-11.5) | - |" in text and "95.0 / 91.1 (+3.9)" in text and "mean nothing" in text


def test_reproduce_learns_once_evaluates_each_target_writes_the_table_and_resumes(tmp_path, synthetic_root):
    out = tmp_path / "repro"
    options = dict(data_root=synthetic_root.parent, aux="synthetic", aux_classes=["carpet"], target_classes=["pill"],
                   epochs=1, published=published_table(), **TINY)
    table = reproduce("anomalyclip", ["synthetic"], out, **options)
    learn_runs = [p for p in (out / "learn").iterdir() if not p.name.endswith(".csv")]
    eval_runs = list((out / "eval").iterdir())
    assert len(learn_runs) == 1 and len(eval_runs) == 1
    learned = json.loads((learn_runs[0] / "metrics.json").read_text())
    assert learned["train"]["dataset"] == "synthetic" and learned["train"]["epochs"] == 1 and learned["random_weights"]
    evaluated = json.loads((eval_runs[0] / "metrics.json").read_text())
    assert evaluated["extra"]["protocol"]["checkpoint"] == str(learn_runs[0] / "run")
    assert evaluated["dataset"]["classes"] == ["pill"]
    # ours = the evaluation's macro mean in percent; published and the difference from the injected table
    for row in table.itertuples():
        want = evaluated["metrics"][row.metric]
        assert (math.isnan(row.ours) and want is None) or row.ours == pytest.approx(100.0 * want)
    auroc = table.set_index("metric").loc["image_auroc"]
    assert auroc.published == 91.5 and auroc.difference == pytest.approx(auroc.ours - 91.5)
    assert set(table.metric) == set(METRIC_KEYS)
    assert pd.read_csv(out / "reproduce.csv").shape == table.shape
    assert TINY_NOTE in (out / "reproduce.md").read_text() and (out / "reproduce.png").stat().st_size > 0
    # rerun: both sweeps find their runs finished and execute nothing
    stamps = {p: (p / "run.json").stat().st_mtime_ns for p in learn_runs + eval_runs}
    again = reproduce("anomalyclip", ["synthetic"], out, **options)
    assert {p: (p / "run.json").stat().st_mtime_ns for p in stamps} == stamps
    pd.testing.assert_frame_equal(again, table)


def test_cli_reproduce_of_a_training_free_method_skips_learning(tmp_path, synthetic_root, capsys):
    from zsadlib.cli import main

    out = tmp_path / "w"
    code = main(["reproduce", "--method", "winclip", "--targets", "synthetic", "--data-root",
                 str(synthetic_root.parent), "--backbone", "tiny", "--weights", "none", "--image-size", "112",
                 "--max-per-class", "2", "--classes", "pill", "--device", "cpu", "--jobs", "1", "--out", str(out),
                 "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and not (out / "learn").exists() and len(list((out / "eval").iterdir())) == 1
    assert "mean nothing" in printed and "No published numbers" in printed
    assert main(["reproduce", "--method", "winclip", "--targets", "visa", "--out", str(out), "--quiet"]) == 2
