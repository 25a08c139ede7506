"""``make demo`` / ``zsad demo``: WinCLIP on the embedded synthetic dataset, end to end.

Generates the synthetic data when missing, loads the paper's backbone (ViT-B-16-plus-240, laion400m_e31) when
its weights are on this machine, otherwise says so in one line and runs the tiny random-weight backbone, whose
outputs are labelled as meaningless everywhere (metrics.json ``note``, figure titles, console). Evaluates a
deterministic subset (``max_per_class`` images per class, half normal, half anomalous; default 4, i.e. 28 of the
144 test images: WinCLIP re-encodes 365 windows per image; with the real ViT-B-16-plus-240 architecture on a quiet
2-core CPU 14 images took 92 s including the 7 class prompt ensembles, so the default stays near 2.5 minutes),
writes metrics.json, scores.csv, a per-class plot and heatmap overlays, and prints the table.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data import ensure_synthetic, open_dataset
from .evaluate import evaluate, format_table
from .methods import build_method, build_method_or_tiny
from .viz import figure_label, plot_class_metrics, plot_maps

__all__ = ["run_demo", "DEMO_METHOD", "TINY_IMAGE_SIZE"]

DEMO_METHOD = "winclip"
TINY_IMAGE_SIZE = 238  # the tiny backbone has patch 14: 240 rounded down to a multiple of 14


def load_demo_method(force_tiny: bool = False, device: str = "auto", announce=print):
    """The demo's method: paper weights when available, else the tiny backbone (announced in one line)."""
    if force_tiny:
        return build_method(DEMO_METHOD, backbone="tiny", pretrained=None, image_size=TINY_IMAGE_SIZE, device=device)
    return build_method_or_tiny(DEMO_METHOD, device=device, announce=announce)


def run_demo(out_dir: str | Path = "outputs/demo", data_root: str | Path = "data/synthetic", max_per_class: int = 4,
             force_tiny: bool = False, device: str = "auto", progress: bool = True, heatmaps_per_class: int = 2):
    """Run the demo; returns the :class:`~zsadlib.evaluate.EvaluationResult`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = ensure_synthetic(data_root, progress=progress)
    method = load_demo_method(force_tiny=force_tiny, device=device)
    tiny = bool(method.backbone.info.get("random_weights"))
    label = figure_label(method.backbone.info)  # " [random weights: meaningless]" with the tiny fallback
    dataset = open_dataset("synthetic", root, image_size=method.backbone.image_size)
    subset = dataset.subset(max_per_class=max_per_class, seed=0)
    print(f"demo: {method.name} ({method.backbone.info['name']}, {method.backbone.info['pretrained']}) on "
          f"{len(subset)} of {len(dataset)} synthetic test images ({max_per_class} per class){label}")
    picks = _heatmap_picks(subset, heatmaps_per_class)
    result = evaluate(method, subset, out_dir=out, progress=progress, keep_maps_for=picks,
                      extra_info={"demo": {"subset": f"{max_per_class} per class, seed 0", "tiny_fallback": tiny}})
    plot_class_metrics(result.table, title=f"{method.name} on synthetic{label}").savefig(out / "per_class.png", dpi=120)
    _save_heatmaps(subset, picks, result, out / "heatmaps.png", f"{method.name} map{label}")
    print(format_table(result.table))
    print(f"outputs: {out}/metrics.json, scores.csv, per_class.png, heatmaps.png{label}")
    return result


def _heatmap_picks(dataset, per_class: int) -> list[int]:
    """Indices of up to ``per_class`` images per class: anomalous first, then normal."""
    picks = []
    for class_name in dataset.class_names:
        indices = [i for i, r in enumerate(dataset.records) if r.class_name == class_name]
        anomalous = [i for i in indices if dataset.records[i].label == 1][:max(1, per_class - 1)]
        normal = [i for i in indices if dataset.records[i].label == 0][:max(0, per_class - len(anomalous))]
        picks.extend(anomalous + normal)
    return picks


def _save_heatmaps(dataset, picks: list[int], result, path: Path, title: str) -> None:
    """Image, mask and the evaluated map of each picked image (maps kept by the evaluation, not recomputed)."""
    samples = [dataset[i] for i in picks]
    titles = [f"{s.class_name}/{s.defect} score {result.scores[i]:.2f}" for s, i in zip(samples, picks)]
    masks = [s.mask if s.mask is not None else torch.zeros(s.image.shape[-2:]) for s in samples]
    figure = plot_maps([s.image for s in samples], [[result.kept_maps[i]] for i in picks], [title],
                       row_titles=titles, masks=masks)
    figure.savefig(path, dpi=100)
