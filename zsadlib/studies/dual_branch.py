"""Dual-branch analysis for GenCLIP (notebook 03): branch outputs, fusion-weight sweeps, filtering effect,
and the precomputed items behind the interactive explorer (:class:`zsadlib.viz.Explorer`).

The model runs once per image; everything else (any fusion weight, any layer, either branch) is recombined
from the stored per-layer maps. This is exact because both the layer fusion (a sum or mean) and the Gaussian
blur are linear: blur(w * a + (1 - w) * b) = w * blur(a) + (1 - w) * blur(b).

Intended for notebook-sized subsets (everything is kept in memory: per image L + 2 maps of S x S floats).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import metrics as metrics_module
from .. import ops
from ..data import AnomalyDataset, collate_samples
from ..evaluate import run_method
from ..methods.base import AnomalyMethod
from ..viz import ExplorerItem

__all__ = ["BranchOutputs", "collect_branches", "branch_metrics", "fusion_sweep", "filter_effect", "explorer_items"]

BRANCHES = ("enhanced", "query")


@dataclass
class BranchOutputs:
    """Per-image outputs of both branches over a dataset (in dataset order).

    layer_maps[branch]: [N, L, S, S] per-layer maps (before layer fusion and blur);
    maps[branch]: [N, S, S] the branch's final (fused over layers, blurred) maps; scores[branch]: [N];
    masks: [N, S, S] bool or None; labels: [N]; class_names / prompt_names: N strings.
    """

    layer_maps: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    masks: torch.Tensor | None
    labels: torch.Tensor
    class_names: list[str]
    prompt_names: list[str]
    filtered: list[str]

    def fused(self, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused maps [N, S, S] and scores [N] for a fusion weight (weight of the vision-enhanced branch)."""
        maps = weight * self.maps["enhanced"] + (1.0 - weight) * self.maps["query"]
        scores = weight * self.scores["enhanced"] + (1.0 - weight) * self.scores["query"]
        return maps, scores


def collect_branches(method: AnomalyMethod, dataset: AnomalyDataset, batch_size: int = 8,
                     progress: bool = True) -> BranchOutputs:
    """Run a dual-branch method (GenCLIP) once over ``dataset`` and keep both branches' outputs."""
    layer_maps = {b: [] for b in BRANCHES}
    maps = {b: [] for b in BRANCHES}
    scores = {b: [] for b in BRANCHES}
    masks, labels, class_names, prompt_names = [], [], [], []
    indices = list(range(len(dataset)))
    for start in tqdm(range(0, len(indices), batch_size), desc=f"{method.name}: both branches",
                      disable=not progress):
        batch = collate_samples([dataset[i] for i in indices[start:start + batch_size]])
        output = run_method(method, batch.images, batch.class_names)
        extras = output.extras
        if "enhanced_layer_maps" not in extras:
            raise ValueError(f"method {method.name!r} has no dual-branch outputs (extras['enhanced_layer_maps'])")
        for branch in BRANCHES:
            layer_maps[branch].append(extras[f"{branch}_layer_maps"].float().cpu())
            maps[branch].append(extras[f"{branch}_maps"].float().cpu())
            scores[branch].append(extras[f"{branch}_scores"].float().cpu())
        if batch.masks is not None:
            masks.append(batch.masks)
        labels.append(batch.labels)
        class_names.extend(batch.class_names)
        prompt_names.extend(extras.get("prompt_names", batch.class_names))
    filtered = sorted({c for c, p in zip(class_names, prompt_names) if c != p})
    return BranchOutputs(
        layer_maps={b: torch.cat(v) for b, v in layer_maps.items()},
        maps={b: torch.cat(v) for b, v in maps.items()},
        scores={b: torch.cat(v) for b, v in scores.items()},
        masks=torch.cat(masks) if len(masks) == len(labels) and masks else None,
        labels=torch.cat(labels), class_names=class_names, prompt_names=prompt_names, filtered=filtered)


def fusion_sweep(outputs: BranchOutputs, weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                 aupro_variants: Sequence[str] = ("mvtec",)):
    """Macro-mean metrics for each fusion weight: a DataFrame indexed by weight (0 = query-only, 1 = enhanced)."""
    import pandas as pd
    import warnings

    rows = {}
    for weight in weights:
        maps, scores = outputs.fused(float(weight))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics_module.UndefinedMetricWarning)
            table = metrics_module.compute_table(outputs.labels, scores, outputs.masks, maps, outputs.class_names,
                                                 aupro_variants=tuple(aupro_variants))
        rows[float(weight)] = table.loc["mean"]
    frame = pd.DataFrame(rows).T
    frame.index.name = "fusion_weight"
    return frame


def branch_metrics(outputs: BranchOutputs, fusion_weight: float = 0.5,
                   aupro_variants: Sequence[str] = ("mvtec", "linear200")) -> dict[str, dict[str, float | None]]:
    """Macro-mean metrics of the vision-enhanced branch, the query-only branch and their fusion."""
    import warnings

    results = {}
    candidates = {"enhanced": (outputs.maps["enhanced"], outputs.scores["enhanced"]),
                  "query": (outputs.maps["query"], outputs.scores["query"]),
                  "fused": outputs.fused(float(fusion_weight))}
    for name, (maps, scores) in candidates.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics_module.UndefinedMetricWarning)
            table = metrics_module.compute_table(outputs.labels, scores, outputs.masks, maps, outputs.class_names,
                                                 aupro_variants=tuple(aupro_variants))
        results[name] = metrics_module.table_to_dict(table)["mean"]
    return results


def filter_effect(method: AnomalyMethod, dataset: AnomalyDataset, batch_size: int = 8, progress: bool = True,
                  outputs: BranchOutputs | None = None):
    """Per-class prompt name and mean fused score of anomalous and normal images, with the method's name filter
    and with every name kept (``name_filter="keep_all"``). Returns a DataFrame indexed by class, with two-level
    columns (``"filtered"`` / ``"all names"``, then ``"prompt name"`` / ``"mean score anomalous"`` /
    ``"mean score normal"``).

    ``outputs``: the filtered pass already computed by :func:`collect_branches` on ``dataset`` (saves one pass)."""
    import pandas as pd

    original = method.config
    results = {}
    try:
        for label, rule in (("filtered", original.name_filter), ("all names", "keep_all")):
            if label == "filtered" and outputs is not None:
                run = outputs
            else:
                method.config = dataclasses.replace(original, name_filter=rule)
                run = collect_branches(method, dataset, batch_size=batch_size, progress=progress)
            scores = run.fused(float(original.fusion_weight))[1].numpy()
            for class_name in sorted(set(run.class_names)):
                idx = np.array([c == class_name for c in run.class_names])
                lab = run.labels.numpy()[idx]
                row = results.setdefault(class_name, {})
                row[(label, "prompt name")] = run.prompt_names[int(np.flatnonzero(idx)[0])]
                row[(label, "mean score anomalous")] = (float(scores[idx][lab == 1].mean()) if (lab == 1).any()
                                                        else None)
                row[(label, "mean score normal")] = float(scores[idx][lab == 0].mean()) if (lab == 0).any() else None
    finally:
        method.config = original
    frame = pd.DataFrame.from_dict(results, orient="index")
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame.infer_objects()


def explorer_items(outputs: BranchOutputs, dataset: AnomalyDataset, blur_sigma: float,
                   indices: Sequence[int] | None = None) -> list[ExplorerItem]:
    """Explorer items with per-layer maps blurred once (so the explorer's sums equal the method's maps)."""
    chosen = list(range(len(dataset))) if indices is None else list(indices)
    items = []
    for i in chosen:
        sample = dataset[i]
        per_branch = {}
        for branch in BRANCHES:
            layers = outputs.layer_maps[branch][i]
            per_branch[branch] = ops.gaussian_blur(layers, blur_sigma) if blur_sigma > 0 else layers
        items.append(ExplorerItem(class_name=sample.class_name, path=sample.path, image=sample.image,
                                  mask=sample.mask, layer_maps=per_branch,
                                  scores={b: float(outputs.scores[b][i]) for b in BRANCHES}, label=sample.label))
    return items
