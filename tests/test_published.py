"""zsadlib.published: the published numbers table (schema, names, the headline list, transcription checks, filters)."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from zsadlib.data import DATASET_KINDS
from zsadlib.methods import list_methods
from zsadlib.metrics import METRIC_KEYS
from zsadlib.published import BASELINES, COLUMNS, csv_files, load_published

HEADLINE = Path(__file__).resolve().parents[2] / "shared" / "PUBLISHED.md"


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return load_published()


def test_schema_and_names(table):
    assert tuple(table.columns) == COLUMNS
    assert len(csv_files()) >= 3 and len(table) > 800
    assert table["value"].dtype == float
    known_methods = set(list_methods()) | set(BASELINES)
    assert set(table["method"]) <= known_methods, set(table["method"]) - known_methods
    assert set(table["dataset"]) <= set(DATASET_KINDS), set(table["dataset"]) - set(DATASET_KINDS)
    assert set(table["metric"]) <= set(METRIC_KEYS), set(table["metric"]) - set(METRIC_KEYS)
    assert table["value"].between(0, 100).all()
    assert table["source"].str.match(r"^\S.* Table \d+$").all()
    dupes = table[table.duplicated(["method", "dataset", "metric", "source"], keep=False)]
    assert dupes.empty, dupes


def test_every_seed_table_dataset_has_numbers_for_every_method_in_it(table):
    # Crane Table 1: 6 methods x (10 image-level sets x 3 + 11 pixel-level sets x 3)
    crane = table[table["source"].str.startswith("Crane")]
    assert crane.groupby("method").size().to_dict() == {m: 63 for m in
                                                        ("winclip", "april_gan", "anomalyclip", "adaclip", "crane", "crane_plus")}
    vip = table[table["source"].str.startswith("ViP2-CLIP")]
    assert set(vip["dataset"]) == {"mvtec", "visa", "mpdd", "btad", "ksdd", "dagm", "dtd_synthetic", "headct", "brainmri",
                                   "br35h", "isic", "colondb", "clinicdb", "endo", "kvasir"}
    assert vip.groupby("method").size().nunique() == 1  # every method has every cell
    image_only = {"headct", "brainmri", "br35h"}
    assert not table[table["dataset"].isin(image_only) & ~table["metric"].str.startswith("image_")].shape[0]
    pixel_only = {"isic", "colondb", "clinicdb", "kvasir", "endo", "tn3k"}
    assert table[table["dataset"].isin(pixel_only)]["metric"].str.startswith("image_").sum() == 0


# --- the headline list gathered by the project (PUBLISHED.md): each number must be in the table --------------

_METHODS = {"winclip": "winclip", "april-gan": "april_gan", "anomalyclip": "anomalyclip", "adaclip": "adaclip",
            "crane+": "crane_plus", "crane": "crane", "vip2-clip": "vip2clip", "genclip": "genclip"}
_DATASETS = {"mvtec ad": "mvtec", "visa": "visa", "mpdd": "mpdd", "btad": "btad", "ksdd": "ksdd", "dagm": "dagm",
             "dtd-synthetic": "dtd_synthetic"}
_NUMBER = re.compile(r"^\d+(\.\d+)?$")


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def parse_headline(text: str) -> list[tuple[str, str, str, float]]:
    """(method, dataset, metric, value) of every number in PUBLISHED.md's two tables."""
    out, header, metrics = [], None, None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            if "image AUROC / pixel AUROC" in line:
                metrics = (("image_auroc", "pixel_auroc"),)
            continue
        cells = _cells(line)
        if header is None:
            header = [_DATASETS.get(c.lower()) for c in cells]
            continue
        if set(cells[0]) <= set("- "):
            continue
        name = cells[0].split(" (")[0].strip().lower()
        method = _METHODS[name]
        for dataset, cell in zip(header[1:], cells[1:]):
            groups = cell.split("|") if "|" in cell else [cell]
            keys = (("image_auroc", "image_ap"), ("pixel_auroc", "aupro_linear200")) if metrics is None else metrics
            for group, names in zip(groups, keys):
                parts = [p.strip() for p in group.split("/")]
                for key, part in zip(names, parts):
                    if dataset and _NUMBER.match(part):
                        out.append((method, dataset, key, float(part)))
    return out


def test_headline_parser_reads_a_known_row():
    text = ("| Method | MVTec AD | VisA |\n| --- | --- | --- |\n"
            "| Crane+ (D-Attn) | 93.9 / 97.6 \\| 91.2 / 88.1 | 83.6 / 86.7 \\| 95.3 / - |\n\n"
            "Other industrial sets, image AUROC / pixel AUROC:\n\n| Method | KSDD |\n| --- | --- |\n| Crane | 97.8 / 97.9 |\n")
    assert parse_headline(text) == [
        ("crane_plus", "mvtec", "image_auroc", 93.9), ("crane_plus", "mvtec", "image_ap", 97.6),
        ("crane_plus", "mvtec", "pixel_auroc", 91.2), ("crane_plus", "mvtec", "aupro_linear200", 88.1),
        ("crane_plus", "visa", "image_auroc", 83.6), ("crane_plus", "visa", "image_ap", 86.7),
        ("crane_plus", "visa", "pixel_auroc", 95.3), ("crane", "ksdd", "image_auroc", 97.8),
        ("crane", "ksdd", "pixel_auroc", 97.9)]


@pytest.mark.skipif(not HEADLINE.is_file(), reason=f"{HEADLINE} (the project's shared notes) is not here")
def test_every_headline_number_is_in_the_table(table):
    numbers = parse_headline(HEADLINE.read_text(encoding="utf-8"))
    assert len(numbers) >= 80  # 7 methods x 2 sets x 4 (AdaCLIP has no AUPRO) + 3 methods x 5 sets x 2
    have = set(zip(table["method"], table["dataset"], table["metric"], table["value"].round(1)))
    missing = [n for n in numbers if n not in have]
    assert not missing, missing


# --- transcription check: the mean of a method's cells equals the table's printed "Average" row ---------------

IND = ("mvtec", "visa", "mpdd", "btad", "ksdd", "dagm", "dtd_synthetic")
IMG = ("image_auroc", "image_ap", "image_f1_max")
PIX = ("pixel_auroc", "aupro_linear200", "pixel_f1_max")
# (source prefix, datasets, metrics) -> {method: the printed Average (AUROC, AP or AUPRO, F1-max)}
PRINTED_AVERAGES = {
    ("Crane", IND, IMG): {"winclip": (81.6, 81.1, 82.8), "april_gan": (None, 82.0, 85.9),
                          "anomalyclip": (87.8, 88.6, None), "adaclip": (90.2, 89.2, 89.6),
                          "crane": (92.6, 93.7, 90.3), "crane_plus": (92.5, 93.5, 90.1)},
    ("Crane", ("headct", "brainmri", "br35h"), IMG): {
        "winclip": (83.0, 84.6, 80.2), "april_gan": (90.1, 90.8, 84.9), "anomalyclip": (92.8, 92.8, 90.0),
        "adaclip": (92.5, 93.1, 86.4), "crane": (95.7, 96.2, 92.2), "crane_plus": (95.7, 96.7, 91.4)},
    ("Crane", IND, PIX): {"winclip": (79.2, 49.3, 18.8), "april_gan": (84.9, 65.3, 46.8),
                          "anomalyclip": (94.5, 83.3, 46.2), "adaclip": (94.2, 50.1, 50.2),
                          "crane": (96.1, 89.0, 51.9), "crane_plus": (96.4, 92.3, 54.0)},
    ("Crane", ("isic", "colondb", "clinicdb", "tn3k"), PIX): {
        "winclip": (68.9, 35.3, 30.6), "april_gan": (80.5, 60.2, 43.9), "anomalyclip": (84.0, 67.0, 49.5),
        "adaclip": (83.1, 55.3, 47.6), "crane": (83.5, 66.6, 48.2), "crane_plus": (86.4, 72.0, 51.8)},
    ("ViP2-CLIP", IND, IMG): {"winclip": (None, None, 80.5), "april_gan": (84.4, 85.2, 81.9),
                              "anomalyclip": (89.8, 90.9, 87.2), "adaclip": (90.4, 91.9, 89.4),
                              "vip2clip": (92.4, 93.9, 90.6)},
    ("ViP2-CLIP", IND, PIX): {"winclip": (None, None, 16.0), "april_gan": (90.9, 74.4, 42.2),
                              "anomalyclip": (95.6, 87.2, 47.0), "adaclip": (94.7, 49.7, 49.9),
                              "vip2clip": (96.2, 92.3, 49.6)},
    ("ViP2-CLIP", ("headct", "brainmri", "br35h"), IMG): {
        "winclip": (82.8, 84.6, 79.0), "april_gan": (90.0, 90.8, 84.9), "anomalyclip": (92.1, 92.3, 87.1),
        "adaclip": (94.7, 94.2, 91.1), "vip2clip": (95.1, 95.5, 90.2)},
    ("ViP2-CLIP", ("isic", "colondb", "clinicdb", "endo", "kvasir"), PIX): {
        "winclip": (71.3, 33.8, 36.2), "april_gan": (81.0, 58.7, 44.9), "anomalyclip": (83.5, 65.3, 49.6),
        "adaclip": (84.9, 59.1, 50.1), "vip2clip": (85.1, 68.1, 50.3)},
}
# None: the paper's own Average disagrees with its cells (listed in zsadlib/published/README.md)


def test_cells_reproduce_the_printed_averages(table):
    checked = 0
    for (prefix, datasets, metrics), rows in PRINTED_AVERAGES.items():
        part = table[table["source"].str.startswith(prefix) & table["dataset"].isin(datasets)]
        for method, printed in rows.items():
            for metric, want in zip(metrics, printed):
                cells = part[(part["method"] == method) & (part["metric"] == metric)]
                assert len(cells) == len(datasets), (prefix, method, metric)
                if want is not None:
                    assert cells["value"].mean() == pytest.approx(want, abs=0.151), (prefix, method, metric)
                    checked += 1
    assert checked == 126  # 132 printed averages less the 6 inconsistent ones


def test_filters(table):
    one = load_published(method="crane", dataset="mvtec", metric="aupro_linear200")
    assert one.to_dict("records") == [{"method": "crane", "dataset": "mvtec", "metric": "aupro_linear200",
                                       "value": 84.6, "source": "Crane (arXiv 2504.11055) Table 1"}]
    several = load_published(method=["crane", "crane_plus"], dataset=("ksdd", "dagm"))
    assert set(several["method"]) == {"crane", "crane_plus"} and set(several["dataset"]) == {"ksdd", "dagm"}
    assert len(several) == 2 * 2 * 6
    expected = table[(table["method"].isin(["crane", "crane_plus"])) & table["dataset"].isin(["ksdd", "dagm"])]
    assert several.equals(expected.reset_index(drop=True))
    by_source = load_published(method="anomalyclip", dataset="mvtec", metric="image_auroc", source="vip2")
    assert by_source["value"].tolist() == [91.6]
    assert load_published(method="genclip").empty
    assert list(load_published(dataset="nope").columns) == list(COLUMNS)


def test_csvs_are_package_data():
    import tomllib

    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["zsadlib"]
    assert "published/*.csv" in patterns
