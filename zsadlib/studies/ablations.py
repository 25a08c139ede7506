"""Ablations behind notebook 04: a method's default against variants that change one config field each, every
variant learned (when the method learns) and evaluated by the same protocol as ``zsad reproduce``, as one sweep.

The default ablation is the quirk audit: every reference-code quirk and every unpublished choice of every method,
switched one at a time, so a reader sees what each costs. The fields come from the config dataclasses themselves:
a field whose line comment starts with ``quirk`` or ``OUR choice`` (:data:`MARKERS`) is audited, plus the quirks
whose marker sits elsewhere (:data:`EXTRA_QUIRKS`, e.g. AnomalyCLIP's released layer 24 against the paper's
6/12/18/24). A boolean is flipped; any other field takes its value in :data:`ALTERNATIVES`; fields with no
meaningful single switch are listed, with the reason, in :data:`NOT_AUDITED`.

    from zsadlib.studies.ablations import quirk_variants, run_ablation
    quirk_variants("vip2clip")   # {'global_ln_post': [True], 'normal_prompt_damaged': [False], ...}
    table = run_ablation(["crane"], None, dataset="mvtec", root="/data/mvtec", aux_root="/data/visa", out="runs/abl")
    deltas = metric_deltas(table)   # variant - default, per method x variant x class x metric
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

MARKERS = ("quirk", "OUR choice")
_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^=#]+=[^#]*#\s*(.*)$")

#: quirks whose marker is not the field's own line comment: method -> field -> the audited value(s)
EXTRA_QUIRKS: dict[str, dict[str, list[Any]]] = {
    "anomalyclip": {"layers": [[6, 12, 18, 24]]},  # released code: layer 24 only; the paper: 6/12/18/24
    "crane_plus": {"dattn_mean": ["batch"]},  # OUR default is per image; the reference's mean over the batch
    "adaclip": {"kmeans_seed": [None]},  # OUR default seeds each image's k-means; the reference's global NumPy RNG
}
#: the value a marked non-boolean field is switched to (the corrected or the other documented behaviour)
ALTERNATIVES: dict[str, Any] = {
    "pos_embed_resize": {"bilinear": "bicubic", "bicubic": "bicubic_antialias"},  # by default value
    "train_image_temperature": 0.07,  # Crane: the inference temperature
    "train_interpolation": "bilinear",
    "dattn_value_source": "block_input",  # Crane+: as the paper describes
    "dense_from": None,  # GenCLIP: plain CLIP tokens
    "dense_attention": "qkv_sum",  # GenCLIP: Crane's E-Attn instead of V-V
    "mvp_activation": "gelu",
    "layer_fusion": "mean",
    "enhanced_global_text": "mean",
}
#: marked fields that act in one method only although its base config holds them: field -> that method
ONLY_FOR: dict[str, str] = {"dattn_value_source": "crane_plus"}  # CraneConfig holds Crane+'s D-Attn fields
#: marked fields that the audit leaves alone, and why
NOT_AUDITED: dict[str, str] = {
    "n_ctx": "a size, not a switch",
    "query_templates": "a vocabulary, not a switch",
    "enhanced_templates": "a vocabulary, not a switch",
    "mvp_hidden": "a size, not a switch",
    "pixel_loss_weight": "a loss weight (a sweep, not a switch)",
    "enhanced_loss_weight": "a loss weight (a sweep, not a switch)",
    "query_loss_weight": "a loss weight (a sweep, not a switch)",
    "betas": "an optimiser setting",
    "epochs": "a training length",
    "seed": "a seed",
}


def marked_fields(method: str) -> dict[str, str]:
    """Config fields of ``method`` whose line comment starts with a marker: field -> comment (the config class
    and its bases, nearest first)."""
    from ..methods import get_method_class
    from ..methods.base import MethodConfig

    found: dict[str, str] = {}
    seen: set[str] = set()  # a field redefined lower in the hierarchy takes that line's marker (or none)
    for cls in get_method_class(method).config_class.__mro__:
        if not (isinstance(cls, type) and issubclass(cls, MethodConfig)) or cls is MethodConfig:
            continue
        here = {}
        for line in inspect.getsource(cls).splitlines():
            match = _FIELD_LINE.match(line)
            if match and match.group(1) not in here:
                here[match.group(1)] = match.group(2)
        for name, comment in here.items():
            if name not in seen and comment.startswith(MARKERS):
                found[name] = comment
        seen.update(here)
    return found


def _alternative(field: str, default: Any) -> Any:
    if isinstance(default, bool):
        return not default
    value = ALTERNATIVES[field]
    return value[default] if isinstance(value, dict) else value


def quirk_variants(method: str) -> dict[str, list[Any]]:
    """The quirk audit of one method: field -> [the switched value] (JSON literals: tuples become lists)."""
    from ..methods import get_method_class

    config = get_method_class(method).config_class()
    variants: dict[str, list[Any]] = {}
    for field in marked_fields(method):
        if field in NOT_AUDITED or ONLY_FOR.get(field, method) != method:
            continue
        variants[field] = [_alternative(field, getattr(config, field))]
    variants.update({field: list(values) for field, values in EXTRA_QUIRKS.get(method, {}).items()})
    return variants


def audited_methods() -> list[str]:
    """Registered methods with at least one audited field."""
    from ..methods import list_methods

    return [name for name in list_methods() if quirk_variants(name)]


def resolve_backbone(method: str, backbone: str | None, pretrained: Any, image_size: int | None,
                     allow_tiny: bool = True) -> tuple[str | None, Any, int | None, dict[str, Any]]:
    """(backbone, pretrained, image_size, backbone info) the runs will use: the requested ones when their weights
    are on this machine, else (``allow_tiny``) the tiny random-weight backbone, announced once here instead of in
    every run."""
    from ..backbone import TINY_MODEL
    from ..methods import build_method_or_tiny

    probe = build_method_or_tiny(method, backbone=backbone, pretrained=... if pretrained == "default" else pretrained,
                                 image_size=image_size, device="cpu", allow_tiny=allow_tiny,
                                 **(get_method_class_tiny(method) if backbone == TINY_MODEL else {}))
    info = dict(probe.backbone.info)
    if info["name"] == TINY_MODEL and backbone != TINY_MODEL:
        return TINY_MODEL, None, probe.backbone.image_size, info
    return backbone, pretrained, image_size, info


def get_method_class_tiny(method: str) -> dict[str, Any]:
    from ..methods import get_method_class

    return dict(get_method_class(method).tiny_overrides)


def variant_label(field: str | None, value: Any = None) -> str:
    return "default" if field is None else f"{field}={json.dumps(value)}"


def ablation_runs(method: str, variants: Mapping[str, Sequence[Any]], *, dataset: str, root: str,
                  aux_dataset: str | None = None, aux_root: str | None = None,
                  classes: Sequence[str] | None = None, aux_classes: Sequence[str] | None = None,
                  backbone: str | None = None, pretrained: Any = "default", image_size: int | None = None,
                  device: str = "auto", max_per_class: int | None = None, epochs: int | None = None,
                  max_steps: int | None = None, batch_size: int | None = None, seed: int | None = None):
    """The sweep runs of one method: the default, then each field at each of its values (one change per run).
    Each run is :func:`zsadlib.reproduce.learn_and_evaluate` (learning skipped for training-free methods)."""
    from ..sweep import Run

    learn_options = {key: value for key, value in (("epochs", epochs), ("max_steps", max_steps),
                                                   ("batch_size", batch_size), ("seed", seed)) if value is not None}
    base = {"method": method, "target": dataset, "target_root": root, "aux": aux_dataset, "aux_root": aux_root,
            "classes": classes, "aux_classes": aux_classes, "backbone": backbone, "pretrained": pretrained,
            "image_size": image_size, "device": device, "max_per_class": max_per_class,
            "learn_options": learn_options}
    changes = [(None, None)] + [(field, value) for field, values in variants.items() for value in values]
    return [Run("zsadlib.reproduce:learn_and_evaluate", {**base, "overrides": {} if field is None else {field: value}},
                name=f"{method}-{variant_label(field, value)}", slug_keys=())
            for field, value in changes]


def run_ablation(methods: Sequence[str], ablate: Mapping[str, Sequence[Any]] | None, *, out: str | Path,
                 engine: str = "local", jobs: int | None = None, address: str | None = None, progress: bool = True,
                 **protocol: Any):
    """Run the default and every variant of each method (``ablate``: field -> values for every method; None: the
    quirk audit of each) as one sweep in ``out``; returns the tidy table (method, variant, field, class_name,
    metric, value) of the finished runs, with the failed runs in ``table.attrs["failed"]``."""
    import pandas as pd

    from ..sweep import collect, run_sweep
    from ..sweep.collect import metric_rows

    from ..data import ensure_synthetic

    for kind, root in ((protocol.get("dataset"), protocol.get("root")),
                       (protocol.get("aux_dataset"), protocol.get("aux_root"))):
        if kind == "synthetic" and root:  # generated once here, not by concurrent runs
            ensure_synthetic(root, progress=False, reuse_existing=True)
    labels: dict[str, tuple[str, str, str | None]] = {}
    runs = []
    for method in methods:
        variants = quirk_variants(method) if ablate is None else dict(ablate)
        for run in ablation_runs(method, variants, **protocol):
            field, value = next(iter(run.parameters["overrides"].items()), (None, None))
            labels[run.run_id] = (method, variant_label(field, value), field)
            runs.append(run)
    result = run_sweep(runs, out=out, engine=engine, jobs=jobs, address=address, progress=progress)
    collect(out)  # results.csv / runs.csv beside the runs
    rows = []
    for record in result.records:
        if record.get("status") != "done":
            continue
        method, label, field = labels[record["run_id"]]
        metrics = json.loads((Path(out) / record["run_id"] / "metrics.json").read_text())
        rows += [{"method": method, "variant": label, "field": field, **row} for row in metric_rows(metrics)
                 if row["section"] == ""]
    table = pd.DataFrame(rows, columns=["method", "variant", "field", "section", "class_name", "metric", "value"])
    table = table.drop(columns="section")
    table.attrs["failed"] = [f"{labels[r['run_id']][0]} {labels[r['run_id']][1]}: {r.get('error')}"
                             for r in result.failed]
    return table


def metric_deltas(table):
    """Each variant's value minus its method's default, per class and metric (percentage points): columns
    method, variant, field, class_name, metric, value, default, delta. The default rows are left out."""
    keys = ["method", "class_name", "metric"]
    defaults = table[table.variant == "default"][keys + ["value"]].rename(columns={"value": "default"})
    merged = table[table.variant != "default"].merge(defaults, on=keys, how="left")
    merged["delta"] = 100.0 * (merged["value"] - merged["default"])
    return merged.reset_index(drop=True)


def plot_delta_bars(deltas, title: str = ""):
    """One bar chart per metric: the change of the macro mean against the default, per variant (seaborn)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    mean = deltas[deltas.class_name == "mean"].assign(variant=lambda d: d.method + ": " + d.variant)
    grid = sns.catplot(data=mean, x="delta", y="variant", col="metric", kind="bar", col_wrap=4, height=2.8,
                       aspect=1.0, sharex=False, color="tab:blue")
    grid.set_titles("{col_name}")
    grid.set_axis_labels("change vs default (points)", "")
    for ax in grid.axes.flat:
        ax.axvline(0.0, color="black", linewidth=0.8)
    if title:
        grid.figure.suptitle(title, y=1.02)
    plt.close(grid.figure)
    return grid.figure


def plot_delta_heatmap(deltas, metric: str = "pixel_auroc", title: str = ""):
    """Heatmap variant x class of one metric's change against the default (the macro mean as the last column)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = deltas[deltas.metric == metric].assign(variant=lambda d: d.method + ": " + d.variant)
    grid = rows.pivot_table(index="variant", columns="class_name", values="delta", aggfunc="first", dropna=False)
    grid = grid[[c for c in grid.columns if c != "mean"] + (["mean"] if "mean" in grid.columns else [])]
    # room for the variant labels (~0.08 in per character at 10 pt), ~1 in per class column, a colorbar
    label_width = 0.08 * max([len(str(v)) for v in grid.index] + [10])
    width = max(6.0, label_width + 1.0 * max(1, grid.shape[1]) + 1.5)
    figure, ax = plt.subplots(figsize=(width, 1.6 + 0.5 * max(1, grid.shape[0])), layout="constrained")
    limit = float(abs(grid).max().max()) if grid.size and grid.notna().any().any() else 1.0
    sns.heatmap(grid, ax=ax, annot=True, fmt=".1f", cmap="RdBu_r", center=0.0, vmin=-limit or -1, vmax=limit or 1,
                cbar_kws={"label": "change (points)"}, annot_kws={"fontsize": 9})
    ax.set_title(title or f"{metric}: change vs default", fontsize=11, wrap=True)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.tick_params(axis="x", labelrotation=30)
    plt.close(figure)
    return figure


def summarize(table, deltas) -> dict[str, Any]:
    """The metrics.json content of an ablation: per method and variant, the mean-row metrics and their deltas."""
    def pick(frame, column):
        return {metric: (None if value != value else float(value))
                for metric, value in zip(frame.metric, frame[column])}

    out: dict[str, Any] = {}
    mean = table[table.class_name == "mean"]
    mean_deltas = deltas[deltas.class_name == "mean"]
    for (method, variant), group in mean.groupby(["method", "variant"], sort=False):
        out.setdefault(method, {})[variant] = {"metrics": pick(group, "value")}
        if variant != "default":
            rows = mean_deltas[(mean_deltas.method == method) & (mean_deltas.variant == variant)]
            out[method][variant]["delta_points"] = pick(rows, "delta")
    return out
