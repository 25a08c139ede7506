"""``zsad reproduce``: the papers' zero-shot protocol, run as sweeps, against the published numbers.

Protocol (AnomalyCLIP, Crane, ViP2-CLIP, GenCLIP): learn the prompts on the TEST split of an auxiliary set, MVTec AD
(:data:`AUXILIARY`), and for MVTec AD itself on VisA (:data:`AUXILIARY_FOR_MVTEC`); then evaluate zero-shot on each
target. Training-free methods (WinCLIP) skip the learning. Two sweeps in ``OUT``:

* ``OUT/learn/<run-id>``: one :func:`learn` run per auxiliary set (so 13 targets learned on MVTec AD share one
  training), skipped when ``checkpoint`` is given;
* ``OUT/eval/<run-id>``: one :func:`evaluate_target` run per target, reading its auxiliary run's learned parameters.

Both resume (finished runs are skipped) and run on either engine. Then ``OUT/reproduce.csv`` (one row per target x
metric x published source: ours, published, difference, in percent), ``OUT/reproduce.md`` (the paper-style table)
and ``OUT/reproduce.png``. The published numbers come from :func:`zsadlib.published.load_published` unless a
DataFrame (method, dataset, metric, value in percent, source) is passed.

    from zsadlib.reproduce import reproduce
    table = reproduce("crane", ["mvtec", "visa", "btad"], data_root="/data", out="runs/crane_repro")
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

# imports of torch-backed modules happen inside the functions: the CLI builds its parser from add_arguments

AUXILIARY = "mvtec"  # the papers learn on MVTec AD's test split ...
AUXILIARY_FOR_MVTEC = "visa"  # ... and on VisA's when the target is MVTec AD
TINY_NOTE = "TINY/RANDOM WEIGHTS: these numbers mean nothing (smoke run)"
LEARN_ENTRY = "zsadlib.reproduce:learn"
EVAL_ENTRY = "zsadlib.reproduce:evaluate_target"


def auxiliary_for(target: str) -> str:
    """The set the papers learn on before evaluating on ``target``."""
    return AUXILIARY_FOR_MVTEC if target == AUXILIARY else AUXILIARY


def data_root_for(kind: str, data_root: str | Path | None, roots: Mapping[str, str] | None = None) -> str:
    """A dataset's folder: ``roots[kind]`` when given, else ``data_root/<kind>`` (e.g. /data/mvtec)."""
    from .sweep import SweepError

    if roots and kind in roots:
        return str(roots[kind])
    if data_root is None:
        raise SweepError(f"no folder for dataset {kind!r}: pass --data-root DIR (holding DIR/{kind}) or "
                         f"--root {kind}=PATH")
    return str(Path(data_root) / kind)


def _build(method: str, backbone, pretrained, image_size, device, overrides):
    from .backbone import TINY_MODEL
    from .methods import build_method, get_method_class

    pretrained = ... if pretrained == "default" else pretrained
    if backbone == TINY_MODEL:  # e.g. Crane+'s tiny DINO stand-in
        overrides = {**get_method_class(method).tiny_overrides, **dict(overrides or {})}
    return build_method(method, backbone=backbone, pretrained=pretrained, image_size=image_size, device=device,
                        **dict(overrides or {}))


def _open(kind: str, root: str, classes, image_size: int, max_per_class: int | None, seed: int = 0):
    from .data import ensure_synthetic, open_dataset

    if kind == "synthetic":
        ensure_synthetic(root, progress=False, reuse_existing=True)
    dataset = open_dataset(kind, root, split="test", classes=classes, image_size=image_size)
    return dataset.subset(max_per_class=max_per_class, seed=seed) if max_per_class else dataset


def learn(output_dir: str, method: str, aux: str, aux_root: str, aux_classes: Sequence[str] | None = None,
          backbone: str | None = None, pretrained: Any = "default", image_size: int | None = None,
          device: str = "auto", overrides: Mapping[str, Any] | None = None, max_per_class: int | None = None,
          epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
          seed: int | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """Sweep entry point: learn ``method``'s prompts on the test split of ``aux`` into ``output_dir/run``
    (checkpoints, log.jsonl, learned.safetensors); writes ``output_dir/metrics.json`` (the training record)."""
    from .train import TrainConfig, train
    from .utils import write_json

    model = _build(method, backbone, pretrained, image_size, device, overrides)
    dataset = _open(aux, aux_root, aux_classes, model.backbone.image_size, max_per_class)
    settings = {key: value for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr),
                                               ("seed", seed), ("max_steps", max_steps)) if value is not None}
    config = TrainConfig.from_method(model, **settings)
    result = train(model, dataset, Path(output_dir) / "run", config=config, progress=False)
    info = model.backbone.info
    record = {"method": model.name, "backbone": info, "random_weights": bool(info.get("random_weights")),
              "note": TINY_NOTE if info.get("random_weights") else "pretrained weights",
              "train": {"dataset": aux, "classes": list(dataset.class_names), "images": len(dataset),
                        "steps": result.step, "last_loss": result.last_loss, **config.to_dict()},
              "overrides": dict(overrides or {})}
    write_json(Path(output_dir) / "metrics.json", record)
    return record


def evaluate_target(output_dir: str, method: str, target: str, target_root: str,
                    classes: Sequence[str] | None = None, checkpoint: str | None = None,
                    backbone: str | None = None, pretrained: Any = "default", image_size: int | None = None,
                    device: str = "auto", overrides: Mapping[str, Any] | None = None,
                    max_per_class: int | None = None, batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
    """Sweep entry point: evaluate ``method`` (with the learned parameters of ``checkpoint``, a learn run's
    ``run`` folder or a checkpoint file) zero-shot on the test split of ``target``; evaluate's metrics.json,
    scores.csv in ``output_dir``."""
    from .evaluate import evaluate

    model = _build(method, backbone, pretrained, image_size, device, overrides)
    if checkpoint:
        model.load_checkpoint(checkpoint)
    dataset = _open(target, target_root, classes, model.backbone.image_size, max_per_class, seed)
    result = evaluate(model, dataset, out_dir=output_dir, batch_size=batch_size, seed=seed, progress=False,
                      extra_info={"protocol": {"target": target, "checkpoint": checkpoint,
                                               "overrides": dict(overrides or {})}})
    return result.summary


def learn_and_evaluate(output_dir: str, method: str, target: str, target_root: str, aux: str | None = None,
                       aux_root: str | None = None, aux_classes: Sequence[str] | None = None,
                       classes: Sequence[str] | None = None, learn_options: Mapping[str, Any] | None = None,
                       **common: Any) -> dict[str, Any]:
    """Sweep entry point: :func:`learn` on ``aux`` (when the method learns) into ``output_dir/learn``, then
    :func:`evaluate_target` into ``output_dir`` (one run per ablation variant). ``common``: backbone,
    pretrained, image_size, device, overrides, max_per_class."""
    from .methods import get_method_class

    from .sweep import SweepError

    checkpoint = None
    if get_method_class(method).trainable:
        aux = aux or auxiliary_for(target)
        if aux_root is None and aux != target:
            raise SweepError(f"aux_root: the folder of the auxiliary set {aux!r} is missing (the target's folder "
                             f"holds {target!r})")
        learn(str(Path(output_dir) / "learn"), method, aux, aux_root or target_root, aux_classes,
              **common, **dict(learn_options or {}))
        checkpoint = str(Path(output_dir) / "learn" / "run")
    evaluate_options = {k: v for k, v in common.items() if k != "max_per_class"}
    summary = evaluate_target(output_dir, method, target, target_root, classes, checkpoint,
                              max_per_class=common.get("max_per_class"), **evaluate_options)
    return summary


def _source_rank(method: str, source: str) -> int:
    """0 for the method's own paper (e.g. Crane for crane and crane_plus), 1 otherwise."""
    own = re.sub(r"[^a-z0-9]", "", method.lower().replace("_plus", ""))
    return 0 if re.sub(r"[^a-z0-9]", "", str(source).lower()).startswith(own) else 1


def compare_with_published(ours, published, method: str, source: str | None = None):
    """One row per target x metric: ``ours`` (percent), ``published`` (percent), ``difference`` (ours -
    published) and ``source``. ``ours``: DataFrame dataset, metric, value (percent). Several published sources:
    ``source`` picks one, else the method's own paper, else the first by name."""
    import pandas as pd

    from .metrics import METRIC_KEYS

    rows = published[published["method"] == method].copy() if published is not None else None
    if rows is not None and source is not None:
        rows = rows[rows["source"] == source]
    if rows is not None and len(rows):
        rows["rank"] = [_source_rank(method, s) for s in rows["source"]]
        rows = rows.sort_values(["rank", "source"]).drop_duplicates(["dataset", "metric"])
        rows = rows[["dataset", "metric", "value", "source"]].rename(columns={"value": "published"})
    else:
        rows = pd.DataFrame(columns=["dataset", "metric", "published", "source"])
    table = ours.rename(columns={"value": "ours"}).merge(rows, on=["dataset", "metric"], how="left")
    table["published"] = table["published"].astype(float)
    table["difference"] = table["ours"] - table["published"]
    table.insert(0, "method", method)
    order = {m: i for i, m in enumerate(METRIC_KEYS)}
    return table.sort_values(["dataset", "metric"], key=lambda c: c.map(order) if c.name == "metric" else c) \
        .reset_index(drop=True)[["method", "dataset", "metric", "ours", "published", "difference", "source"]]


def markdown_table(table, note: str = "") -> str:
    """The paper-style table: one row per target, ``ours / published (difference)`` per metric, in percent."""
    def cell(row):
        if row.ours != row.ours:  # NaN: undefined on this target
            return "-"
        if row.published != row.published:
            return f"{row.ours:.1f}"
        return f"{row.ours:.1f} / {row.published:.1f} ({row.difference:+.1f})"

    from .metrics import METRIC_KEYS

    metrics = [m for m in METRIC_KEYS if m in set(table.metric)]
    lines = ["| dataset | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for dataset, group in table.groupby("dataset", sort=False):
        cells = {row.metric: cell(row) for row in group.itertuples()}
        lines.append(f"| {dataset} | " + " | ".join(cells.get(m, "-") for m in metrics) + " |")
    sources = sorted({s for s in table.source.dropna()})
    head = f"{table.method.iloc[0]}: ours / published (ours - published), percent"
    tail = ([f"Published: {'; '.join(sources)}."] if sources else ["No published numbers for these targets."])
    return "\n".join([head, "", *lines, "", *tail, *([note] if note else [])]) + "\n"


def plot_reproduction(table, title: str = ""):
    """Grouped bars per metric: ours and published on each target (seaborn)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = table.melt(id_vars=["dataset", "metric"], value_vars=["ours", "published"], var_name="numbers",
                      value_name="percent").dropna(subset=["percent"])
    grid = sns.catplot(data=long, x="dataset", y="percent", hue="numbers", col="metric", kind="bar",
                       col_wrap=min(4, max(1, long.metric.nunique())), height=2.6, aspect=1.1, sharey=False)
    grid.set_titles("{col_name}")
    if title:
        grid.figure.suptitle(title, y=1.02)
    plt.close(grid.figure)
    return grid.figure


def reproduce(method: str, targets: Sequence[str], out: str | Path, data_root: str | Path | None = None,
              roots: Mapping[str, str] | None = None, aux: str | None = None,
              target_classes: Sequence[str] | None = None, aux_classes: Sequence[str] | None = None,
              checkpoint: str | None = None, backbone: str | None = None, pretrained: Any = "default",
              image_size: int | None = None, device: str = "auto", max_per_class: int | None = None,
              epochs: int | None = None, max_steps: int | None = None, batch_size: int | None = None,
              published=None, source: str | None = None, engine: str = "local", jobs: int | None = None,
              address: str | None = None, progress: bool = True):
    """Run the protocol (see the module docstring) and write reproduce.csv / .md / .png in ``out``; returns the
    comparison table. ``aux`` replaces the papers' auxiliary set for every target (e.g. "synthetic" in smoke
    runs); ``published``: a DataFrame to compare with (default :func:`zsadlib.published.load_published`)."""
    import pandas as pd

    from .checkpoint import atomic_write
    from .methods import get_method_class
    from .metrics import METRIC_KEYS
    from .sweep import Run, SweepError, run_sweep

    out = Path(out)
    if not targets:
        raise SweepError("--targets: name at least one dataset")
    trainable = get_method_class(method).trainable
    model_args = {"backbone": backbone, "pretrained": pretrained, "image_size": image_size, "device": device}
    learned: dict[str, str] = {}
    if trainable and not checkpoint:
        aux_sets = sorted({aux or auxiliary_for(t) for t in targets})
        learn_runs = [Run(LEARN_ENTRY, {"method": method, "aux": kind,
                                        "aux_root": data_root_for(kind, data_root, roots),
                                        "aux_classes": aux_classes, "max_per_class": max_per_class,
                                        "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
                                        **model_args}, slug_keys=("method", "aux")) for kind in aux_sets]
        result = run_sweep(learn_runs, out=out / "learn", engine=engine, jobs=jobs, address=address,
                           progress=progress)
        if result.failed:
            raise SweepError(f"learning failed: {result.failed[0]['error']} (see {out / 'learn'})")
        learned = {run.parameters["aux"]: str(out / "learn" / run.run_id / "run") for run in learn_runs}
    eval_runs = [Run(EVAL_ENTRY, {"method": method, "target": target,
                                  "target_root": data_root_for(target, data_root, roots),
                                  "classes": target_classes, "max_per_class": max_per_class,
                                  "checkpoint": checkpoint or learned.get(aux or auxiliary_for(target)), **model_args},
                     slug_keys=("method", "target")) for target in targets]
    result = run_sweep(eval_runs, out=out / "eval", engine=engine, jobs=jobs, address=address, progress=progress)
    rows, random_weights = [], False
    for run, record in zip(eval_runs, result.records):
        if record.get("status") != "done":
            continue
        summary = json.loads((out / "eval" / run.run_id / "metrics.json").read_text())
        random_weights |= bool(summary.get("random_weights"))
        rows += [{"dataset": run.parameters["target"], "metric": key, "value": 100.0 * value if value is not None
                  else float("nan")} for key, value in summary["metrics"].items() if key in METRIC_KEYS]
    if published is None:
        from .published import load_published

        published = load_published(method=method)
    table = compare_with_published(pd.DataFrame(rows, columns=["dataset", "metric", "value"]), published, method,
                                   source)
    note = TINY_NOTE if random_weights else ""
    failed = [f"{r['run_id']}: {r.get('error')}" for r in result.failed]
    if failed:
        note = "\n".join([note, *(f"FAILED {line}" for line in failed)]).strip()
    if len(table):
        atomic_write(out / "reproduce.csv", lambda tmp: table.to_csv(tmp, index=False))
        atomic_write(out / "reproduce.md", lambda tmp: tmp.write_text(markdown_table(table, note)))
        figure = plot_reproduction(table, f"{method}: ours vs published" + (" (random weights)" if note else ""))
        atomic_write(out / "reproduce.png", lambda tmp: figure.savefig(tmp, dpi=110, format="png",
                                                                       bbox_inches="tight"))
    table.attrs.update(note=note, failed=failed)
    return table


def add_arguments(parser) -> None:
    """The options of ``zsad reproduce``."""
    parser.add_argument("--method", required=True, help="a method from `zsad methods`")
    parser.add_argument("--targets", nargs="+", required=True, help="target datasets (mvtec visa btad mpdd ...)")
    parser.add_argument("--data-root", default=None, help="folder holding one folder per dataset (DIR/mvtec, ...)")
    parser.add_argument("--root", action="append", default=[], metavar="KIND=PATH",
                        help="a dataset's own folder (repeatable), instead of DATA_ROOT/KIND")
    parser.add_argument("--out", default=None, help="output folder (default: runs/reproduce_<method>)")
    parser.add_argument("--weights", default=None,
                        help="backbone weights: open_clip tag or local file, 'none' for random (default: the paper's)")
    parser.add_argument("--checkpoint", default=None, help="learned parameters to evaluate (skips learning)")
    parser.add_argument("--backbone", default=None, help="open_clip model name (default: the paper's), or 'tiny'")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--aux", default=None, help="learn on this set for every target (default: the papers' rule)")
    parser.add_argument("--classes", nargs="+", default=None, help="target classes (default: all)")
    parser.add_argument("--aux-classes", nargs="+", default=None, help="auxiliary classes (default: all)")
    parser.add_argument("--max-per-class", type=int, default=None, help="a deterministic subset (smoke runs)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the paper's")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--source", default=None, help="the published source to compare with (default: own paper)")


def reproduce_command(args) -> int:
    from .sweep import SweepError

    roots = {}
    for item in args.root:
        kind, sep, path = item.partition("=")
        if not sep:
            raise SweepError(f"--root {item}: write KIND=PATH")
        roots[kind] = path
    weights = "default" if args.weights is None else (None if args.weights.lower() in ("none", "random")
                                                      else args.weights)
    out = args.out or f"runs/reproduce_{args.method}"
    table = reproduce(args.method, args.targets, out, data_root=args.data_root, roots=roots, aux=args.aux,
                      target_classes=args.classes, aux_classes=args.aux_classes, checkpoint=args.checkpoint,
                      backbone=args.backbone, pretrained=weights, image_size=args.image_size, device=args.device,
                      max_per_class=args.max_per_class, epochs=args.epochs, max_steps=args.max_steps,
                      batch_size=args.batch_size, source=args.source, engine=args.engine, jobs=args.jobs,
                      address=args.address, progress=not args.quiet)
    if len(table):
        print(markdown_table(table, table.attrs.get("note", "")))
        print(f"wrote {Path(out) / 'reproduce.csv'}, reproduce.md, reproduce.png")
    return 1 if table.attrs.get("failed") else 0
