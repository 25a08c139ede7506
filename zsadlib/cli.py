"""The ``zsad`` command.

    zsad methods                                   list the methods
    zsad data synth --out data/synthetic           generate the synthetic dataset
    zsad eval --method winclip --dataset mvtec --data-root DIR [--classes ...] [--out DIR]
    zsad train --method anomalyclip --dataset mvtec --data-root DIR --out RUN_DIR
    zsad eval --method anomalyclip --checkpoint RUN_DIR --dataset visa --data-root DIR
    zsad predict --method winclip IMAGE_OR_FOLDER... --out DIR
    zsad demo                                      the main job on the synthetic data
    zsad sweep SPEC.yaml [--engine local|ray]      a notebook over parameter sets (resumable)
    zsad sweep collect OUT                         every run's metrics.json into OUT/results.csv
    zsad reproduce --method crane --targets mvtec visa --data-root DIR   the papers' protocol vs published
    zsad report RUN_DIR_OR_NOTEBOOKS... --out DIR  executed notebooks as HTML (--execute runs them first)

Errors are one line on stderr and a non-zero exit code; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Sequence

EXIT_ERROR = 2


class CLIError(Exception):
    """A user-facing error raised by the CLI itself."""


def _pretrained_arg(value: str | None):
    if value is None:
        return ...
    return None if value.lower() in ("none", "random") else value


MIN_IMAGE_SIZE = 14  # one patch of the 14 px ViTs


def _memory_bytes() -> int:
    """This machine's physical memory (bytes)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 64 << 30


def image_size_memory(image_size: int, batch_size: int = 1, patch: int = 14) -> int:
    """A lower bound of the memory a forward pass at ``image_size`` needs (bytes): one float32 attention map of one
    head over the ``(image_size // patch)**2 + 1`` tokens, for each image of the batch."""
    tokens = (int(image_size) // patch) ** 2 + 1
    return tokens * tokens * 4 * max(1, int(batch_size))


def _check_options(args) -> None:
    """Bad numbers and devices as one-line errors before anything is loaded."""
    positive = {"batch_size": "--batch-size", "max_per_class": "--max-per-class", "epochs": "--epochs",
                "max_steps": "--max-steps", "k_shot": "--k-shot"}
    for key, flag in positive.items():
        value = getattr(args, key, None)
        if value is not None and value < 1:
            extra = " (leave it out for no limit)" if key == "max_per_class" else ""
            raise CLIError(f"{flag} must be at least 1, got {value}{extra}")
    if getattr(args, "workers", 0) is not None and getattr(args, "workers", 0) < 0:
        raise CLIError(f"--workers must be 0 or more, got {args.workers}")
    lr = getattr(args, "lr", None)
    if lr is not None and not lr > 0:
        raise CLIError(f"--lr must be > 0, got {lr}")
    size = getattr(args, "image_size", None)
    if size is not None:
        if size < MIN_IMAGE_SIZE:
            raise CLIError(f"--image-size must be at least {MIN_IMAGE_SIZE} (one patch), got {size}")
        batch = getattr(args, "batch_size", None) or 1
        need, have = image_size_memory(size, batch), _memory_bytes()
        if need > have:
            raise CLIError(
                f"--image-size {size} needs at least {need / 2**30:,.0f} GiB (one attention map of "
                f"{(size // 14) ** 2 + 1:,} tokens per image, batch {batch}), more than this machine's "
                f"{have / 2**30:,.0f} GiB; the papers use 240 to 518"
            )
    device = getattr(args, "device", "auto")
    if device and device != "auto":
        from .runtime import check_device

        try:
            check_device(device)
        except ValueError as error:
            raise CLIError(f"--device {device}: {error}") from None
    pretrained = getattr(args, "pretrained", None)
    if getattr(args, "backbone", None) == "tiny" and pretrained and pretrained.lower() not in ("none", "random"):
        from .backbone import _is_file_spec

        if not _is_file_spec(pretrained):
            raise CLIError(f"--backbone tiny has no published weights (--pretrained {pretrained}): use "
                           f"--pretrained none, or a weights file of the tiny model")


def _check_out_dir(path: str | os.PathLike) -> Path:
    """Fail before any work when ``--out`` cannot take the results: it is a file, lies below a file, or is (or
    would be created in) a folder that takes no files. Creates nothing (the command does, when it writes)."""
    import tempfile

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"--out {out}: {existing} is a file, not a folder")
    if existing == out:
        try:
            with tempfile.NamedTemporaryFile(dir=out, prefix=".zsad-write-test-"):
                pass
        except OSError as error:
            raise CLIError(f"--out {out} is not a writable folder: {error.strerror or error}") from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out} cannot be created: {existing} is not writable")
    return out


def _checkpoint_note(args) -> dict:
    """What metrics.json records about --checkpoint (its step), and a printed note for an unfinished run."""
    meta = getattr(args, "checkpoint_meta", None)
    if not meta:
        return {}
    record = {"checkpoint_step": meta.get("step"), "checkpoint_total_steps": meta.get("total_steps"),
              "checkpoint_finished": meta.get("final")}
    if meta.get("final") is False:  # a run's checkpoints/last.* (files saved by hand record no "final")
        print(f"note: --checkpoint {args.checkpoint} is from an unfinished run: its last checkpoint, step "
              f"{meta.get('step')} of {meta.get('total_steps')}; finish the run with zsad train ... --out "
              f"{args.checkpoint} for the final learned parameters")
    return record


def _build(args) -> "object":
    from .methods import build_method, get_method_class

    cls = get_method_class(args.method)
    method = build_method(args.method, backbone=args.backbone, pretrained=_pretrained_arg(args.pretrained),
                          image_size=args.image_size, device=args.device)
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint:
        if not cls.trainable:
            raise CLIError(f"--checkpoint {checkpoint}: method {args.method!r} has no learned parameters")
        args.checkpoint_meta = method.load_checkpoint(checkpoint)
    return method


def _cmd_methods(args) -> int:
    from .methods import get_method_class, list_methods

    for name in list_methods():
        cls = get_method_class(name)
        config = cls.config_class()
        kind = "learned prompts" if cls.trainable else "training-free"
        print(f"{name:12s} {kind:16s} {config.backbone} ({config.pretrained}) @ {config.image_size}px  {cls.paper}")
    return 0


def _cmd_synth(args) -> int:
    from .data.synthetic import generate

    root = generate(args.out, seed=args.seed, image_size=args.size, defect_scale=args.defect_scale,
                    progress=not args.quiet)
    print(f"synthetic dataset written to {root}")
    return 0


def _set_reference_images(args, method, dataset) -> None:
    """--k-shot K / --reference-images DIR: few-shot memories (WinCLIP+), per class of ``dataset``."""
    k, folder = getattr(args, "k_shot", None), getattr(args, "reference_images", None)
    if k is None and folder is None:
        return
    if not hasattr(method, "set_reference_images"):
        raise CLIError(f"--k-shot / --reference-images: method {method.name!r} has no few-shot mode (winclip has)")
    if folder is None:
        from .data import open_dataset

        train = open_dataset(args.dataset, args.data_root, split="train", classes=dataset.class_names,
                             image_size=method.backbone.image_size)
        method.config = method.config.replace(k_shot=k)
        method.fit_reference(train, seed=args.seed, progress=not args.quiet)
        return
    from .methods.winclip import reference_images_from_folder

    for name, (images, paths) in reference_images_from_folder(folder, method.backbone.image_size, k).items():
        method.set_reference_images(images, class_name=name, sources=paths)


def _cmd_eval(args) -> int:
    from .data import open_dataset
    from .evaluate import evaluate, format_table

    _check_options(args)
    if args.out:
        _check_out_dir(args.out)
    method = _build(args)
    checkpoint_info = _checkpoint_note(args)
    dataset = open_dataset(args.dataset, args.data_root, split=args.split, classes=args.classes,
                           image_size=method.backbone.image_size)
    if args.max_per_class:
        dataset = dataset.subset(max_per_class=args.max_per_class, seed=args.seed)
    _set_reference_images(args, method, dataset)
    result = evaluate(method, dataset, out_dir=args.out, batch_size=args.batch_size, precision=args.precision,
                      num_workers=args.workers, seed=args.seed, progress=not args.quiet, compile=args.compile,
                      extra_info={"argv": args.argv, "checkpoint": args.checkpoint, **checkpoint_info})
    print(format_table(result.table))
    if result.summary.get("random_weights"):
        print("note: random weights; these numbers mean nothing")
    if args.out:
        from .checkpoint import atomic_write
        from .viz import plot_class_metrics

        figure = plot_class_metrics(result.table, title=f"{method.name} on {args.dataset}")
        atomic_write(Path(args.out) / "per_class.png", lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
        print(f"wrote {Path(args.out) / 'metrics.json'}, scores.csv, per_class.png")
    return 0


def _cmd_train(args) -> int:
    from .data import open_dataset
    from .methods import get_method_class
    from .train import TrainConfig, TrainingError, train

    if not get_method_class(args.method).trainable:
        raise CLIError(f"method {args.method!r} is training-free; nothing to train (use zsad eval)")
    _check_options(args)
    _check_out_dir(args.out)
    method = _build(args)
    dataset = open_dataset(args.dataset, args.data_root, split=args.split, classes=args.classes,
                           image_size=method.backbone.image_size)
    if args.max_per_class:
        dataset = dataset.subset(max_per_class=args.max_per_class, seed=args.seed if args.seed is not None else 0)
    overrides = {key: value for key, value in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                               ("lr", args.lr), ("seed", args.seed),
                                               ("precision", args.precision), ("max_steps", args.max_steps))
                 if value is not None}
    config = TrainConfig.from_method(method, **overrides)
    try:
        result = train(method, dataset, args.out, config=config, resume=not args.restart, progress=not args.quiet)
    except TrainingError as error:
        raise CLIError(_cli_words(str(error))) from None
    if method.backbone.info.get("random_weights"):
        print("note: random weights; the learned prompts mean nothing")
    where = result.learned if result.learned else result.checkpoint
    print(f"trained {method.name}: {result.step} steps, last loss {result.last_loss:.4f}; learned parameters in "
          f"{where}; evaluate with: zsad eval --method {method.name} --checkpoint {args.out} ...")
    return 0


def _cli_words(message: str) -> str:
    """A training message in the CLI's words: flags, not the Python arguments."""
    import re

    message = message.replace("pass resume=False", "pass --restart").replace("resume=False", "--restart")
    message = message.replace("another out_dir", "another --out")
    return re.sub(r"(?<=: |; )(batch_size|seed|lr|betas|weight_decay|precision) ",
                  lambda m: "--" + m.group(1).replace("_", "-") + " ", message)


def _cmd_predict(args) -> int:
    from .predict import collect_images, predict_images, write_predictions

    _check_options(args)
    _check_out_dir(args.out)
    method = _build(args)
    _checkpoint_note(args)
    paths = collect_images(args.inputs)
    predictions = predict_images(method, paths, class_name=args.class_name, batch_size=args.batch_size,
                                 precision=args.precision, progress=not args.quiet)
    scores = write_predictions(predictions, args.out, save_npy=args.npy)
    if method.backbone.info.get("random_weights"):
        print("note: random weights; these heatmaps mean nothing")
    print(f"{len(paths)} images: maps and overlays in {args.out}, scores in {scores}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    _check_options(args)
    run_demo(out_dir=args.out, data_root=args.data_root, max_per_class=args.max_per_class,
             force_tiny=args.tiny, device=args.device, progress=not args.quiet)
    return 0


def _cmd_report(args) -> int:
    from .report import build_reports

    if args.preset is not None and not args.execute:
        raise CLIError("--preset applies to notebooks run here: add --execute")
    for page in build_reports(args.inputs, args.out, execute=args.execute, preset=args.preset,
                              progress=not args.quiet):
        print(f"wrote {page}")
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import collect, load_spec, run_sweep

    if args.spec == "collect":
        if not args.folder:
            raise CLIError("zsad sweep collect OUT: name the sweep's output folder")
        results, runs = collect(args.folder)
        print(f"{len(runs)} runs ({(runs.status == 'done').sum()} done), {len(results)} rows: "
              f"{Path(args.folder) / 'results.csv'}, runs.csv")
        return 0
    if args.folder:
        raise CLIError(f"zsad sweep SPEC.yaml takes one spec file (got {args.folder!r} too)")
    _check_options(args)
    spec = load_spec(args.spec)
    result = run_sweep(spec, out=args.out, engine=args.engine, jobs=args.jobs, address=args.address,
                       progress=not args.quiet)
    print(result.summary())
    for record in result.failed:
        print(f"failed: {record['run_id']}: {record.get('error')} (see its error.json)")
    return 1 if result.failed else 0


def _cmd_reproduce(args) -> int:
    from .reproduce import reproduce_command

    _check_options(args)
    return reproduce_command(args)


def _add_model_args(parser: argparse.ArgumentParser, with_checkpoint: bool = True,
                    with_batch_size: bool = True) -> None:
    parser.add_argument("--method", required=True, help="a method from `zsad methods`")
    parser.add_argument("--backbone", default=None, help="open_clip model name (default: the paper's), or 'tiny'")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip tag, a local weights file, or 'none' (default: the paper's)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the paper's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    if with_batch_size:
        parser.add_argument("--batch-size", type=int, default=8)
    if with_checkpoint:
        parser.add_argument("--checkpoint", default=None, help="learned parameters (.safetensors) of a trained run")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", default="local", choices=["local", "ray"],
                        help="local: a process pool on this machine; ray: a Ray cluster (pip install zsadlib[distributed])")
    parser.add_argument("--jobs", type=int, default=None, help="local engine: parallel runs (default: CPUs / num_cpus)")
    parser.add_argument("--address", default=None, help="ray engine: auto | ray://HOST:PORT (default: a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    parser = argparse.ArgumentParser(prog="zsad", parents=[common],
                                     description="CLIP-based zero-shot anomaly detection (zsadlib)")
    parser.set_defaults(debug=False, quiet=False)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", parents=[common], help="list the methods").set_defaults(func=_cmd_methods)

    data = sub.add_parser("data", parents=[common], help="datasets").add_subparsers(dest="data_command",
                                                                                    required=True)
    synth = data.add_parser("synth", parents=[common],
                            help="generate the deterministic synthetic dataset (MVTec AD layout)")
    synth.add_argument("--out", default="data/synthetic")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=256, help="image side in pixels")
    synth.add_argument("--defect-scale", type=float, default=1.0, help="defect size multiplier (e.g. 3 for tiny smoke learning)")
    synth.set_defaults(func=_cmd_synth)

    evaluate = sub.add_parser("eval", parents=[common], help="evaluate a method on a dataset")
    _add_model_args(evaluate)
    evaluate.add_argument("--dataset", required=True,
                          help="mvtec | visa | btad | mpdd | dtd_synthetic | meta_json | folder | synthetic")
    evaluate.add_argument("--data-root", default=None, help="dataset root folder")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--classes", nargs="+", default=None)
    evaluate.add_argument("--max-per-class", type=int, default=None, help="a deterministic subset per class")
    evaluate.add_argument("--out", default=None, help="output folder for metrics.json, scores.csv, per_class.png")
    evaluate.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (decoding, resizing)")
    evaluate.add_argument("--compile", nargs="?", const="default", default=False,
                          choices=["default", "reduce-overhead", "max-autotune"],
                          help="torch.compile the method (CUDA users; the first batch pays the compilation)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--k-shot", type=int, default=None,
                          help="winclip: K normal reference images per class (WinCLIP+), drawn with --seed from the "
                               "dataset's train split (or the first K of --reference-images)")
    evaluate.add_argument("--reference-images", default=None,
                          help="winclip: folder of normal reference images for every class, or with one subfolder "
                               "per class name")
    evaluate.set_defaults(func=_cmd_eval)

    training = sub.add_parser("train", parents=[common],
                              help="learn a method's prompts on an auxiliary dataset (zero-shot protocol)")
    _add_model_args(training, with_checkpoint=False, with_batch_size=False)
    training.add_argument("--dataset", required=True, help="auxiliary dataset kind (paper: mvtec; visa for MVTec AD)")
    training.add_argument("--data-root", default=None)
    training.add_argument("--split", default="test", help="the protocol learns on the auxiliary TEST split")
    training.add_argument("--classes", nargs="+", default=None)
    training.add_argument("--max-per-class", type=int, default=None)
    training.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl, learned.safetensors)")
    training.add_argument("--epochs", type=int, default=None, help="default: the paper's")
    training.add_argument("--batch-size", type=int, default=None, help="default: the paper's")
    training.add_argument("--lr", type=float, default=None, help="default: the paper's")
    training.add_argument("--seed", type=int, default=None, help="default: the paper's")
    training.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    training.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    training.set_defaults(func=_cmd_train)

    predict = sub.add_parser("predict", parents=[common], help="heatmaps and scores for your own images")
    _add_model_args(predict)
    predict.add_argument("inputs", nargs="+", help="image files and/or folders")
    predict.add_argument("--out", required=True)
    predict.add_argument("--class-name", default=None, help="object name for methods that prompt with it")
    predict.add_argument("--npy", action="store_true", help="also save each map as .npy")
    predict.set_defaults(func=_cmd_predict)

    demo = sub.add_parser("demo", parents=[common], help="the main job on the synthetic data (make demo)")
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--data-root", default="data/synthetic")
    demo.add_argument("--max-per-class", type=int, default=4,
                      help="images per class (default 4: 28 images, about 2.5 minutes with real weights on 2 cores)")
    demo.add_argument("--tiny", action="store_true", help="use the tiny random-weight backbone")
    demo.add_argument("--device", default="auto")
    demo.set_defaults(func=_cmd_demo)

    report = sub.add_parser("report", parents=[common],
                            help="executed notebooks to HTML (figures inline, widget state saved) for kernel-less readers")
    report.add_argument("inputs", nargs="+", help="executed notebooks (.ipynb) and/or folders of them (e.g. a run dir)")
    report.add_argument("--out", required=True, help="folder for the <notebook>.html pages")
    report.add_argument("--execute", action="store_true",
                        help="run each notebook first (papermill) into --out, with its output_dir in --out/<notebook>")
    report.add_argument("--preset", default=None, help="with --execute: the notebooks' preset (quick | paper)")
    report.set_defaults(func=_cmd_report)

    sweep = sub.add_parser("sweep", parents=[common],
                           help="run a notebook or entry point over parameter sets (resumable), or collect results")
    sweep.add_argument("spec", help="SPEC.yaml, or 'collect' to merge OUT's metrics.json files into results.csv")
    sweep.add_argument("folder", nargs="?", default=None, help="with collect: the sweep's output folder")
    sweep.add_argument("--out", default=None, help="output folder (default: the spec's 'out')")
    _add_engine_args(sweep)
    sweep.set_defaults(func=_cmd_sweep)

    reproduce = sub.add_parser("reproduce", parents=[common],
                               help="the papers' zero-shot protocol on target datasets, against the published table")
    from .reproduce import add_arguments as _reproduce_arguments

    _reproduce_arguments(reproduce)
    _add_engine_args(reproduce)
    reproduce.set_defaults(func=_cmd_reproduce)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .backbone import BackboneError, WeightsNotFoundError
    from .data import DatasetError
    from .methods import MethodError

    return (CLIError, BackboneError, WeightsNotFoundError, DatasetError, MethodError, FileNotFoundError,
            ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    previous_sigterm = _handle_sigterm()
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.filterwarnings("ignore", category=FutureWarning)
            return int(args.func(args) or 0)
    except Terminated:
        print("zsad: terminated (SIGTERM); work files removed", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("zsad: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line unless --debug
        if args.debug or not isinstance(error, _user_errors()):
            if args.debug:
                raise
            print(f"zsad: internal error: {type(error).__name__}: {error} (rerun with --debug)", file=sys.stderr)
            return 1
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"zsad: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if previous_sigterm is not _NOT_SET:
            signal.signal(signal.SIGTERM, previous_sigterm if previous_sigterm is not None else signal.SIG_DFL)


_NOT_SET = object()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (work files, open logs) runs."""


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated()


def _handle_sigterm():
    """SIGTERM behaves like SIGINT (cleanup runs, then exit 143); returns the previous handler (None when this
    is not the main thread, where handlers cannot be set: _NOT_SET)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _NOT_SET
    return signal.signal(signal.SIGTERM, _raise_terminated)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
