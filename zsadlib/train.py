"""Training engine for the learned ZSAD methods: Adam over a method's learned parameters, deterministic and
resumable, with safetensors checkpoints and a JSON-lines log.

Typical use::

    from zsadlib.data import open_dataset
    from zsadlib.methods import build_method
    from zsadlib.train import TrainConfig, train

    method = build_method("april_gan")                               # paper defaults
    aux = open_dataset("visa", "/data/visa", image_size=method.config.image_size)
    result = train(method, aux, "runs/april_gan_visa")                # epochs, lr, ... from the method's config
    # later, elsewhere:
    method = build_method("april_gan"); method.load_checkpoint("runs/april_gan_visa")

What a run directory holds::

    log.jsonl                     one JSON record per optimiser step: epoch, step, batch, loss, parts, lr, seconds
    checkpoints/last.safetensors  learned parameters only (CPU, contiguous), written every ``checkpoint_every``
    checkpoints/last.json         steps and at every epoch end; metadata: method + config, backbone (weights
    checkpoints/optimizer.pt      checksum), image size, versions, epoch/step/seed, dataset; optimiser + RNG state
    checkpoints/last.prev.*,      the checkpoint before last.*, kept until the new one is complete: a crash or
      optimizer.prev.pt           kill while writing falls back to it (resume takes the newest step whose weights,
                                  metadata and optimiser state all exist and agree; the weights' header has the step)
    learned.safetensors           the final learned parameters, and their metadata (same format as last.*)
    learned.json

Resume rules: ``batch_size``, ``seed``, ``lr``, ``betas``, ``weight_decay``, ``optimizer`` and ``precision`` must
equal the checkpoint's (TrainingError naming the option and both values otherwise); ``epochs`` and ``max_steps`` may
change.

Determinism and resume: the visiting order of epoch ``e`` is ``torch.randperm`` from a generator seeded by
``(seed, e)``, independent of the global RNG, so a run resumed from a checkpoint taken after batch ``k`` of an
epoch visits exactly the batches an uninterrupted run would, and (same device, same data) ends bit-identical.
The global RNGs (torch, CUDA, NumPy, Python) are seeded at the start of a fresh run and saved in every
checkpoint, for methods that draw random numbers while training. A run killed between two checkpoints loses
the steps after the last one: on resume, ``log.jsonl`` is truncated to the checkpoint's step and those steps
run again, so the log holds every step exactly once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import AnomalyDataset, collate_samples
from .checkpoint import (  # noqa: F401 - checkpoint I/O lives in checkpoint.py; importable from here as before
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    FINAL,
    LAST,
    LOG_NAME,
    OPTIMIZER_FILE,
    CheckpointError,
    _atomic_write_bytes,
    _read_metadata,
    _resolve_checkpoint,
    _state_for_file,
    _warn_differences,
    _write_json,
    load_checkpoint,
    load_learned_file,
    read_checkpoint_step,
    save_learned,
)
from .methods.base import AnomalyMethod, MethodConfig
from .runtime import PRECISIONS, autocast, resolve_device
from .utils import json_safe

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "TrainingWarning",
    "CheckpointError",
    "train",
    "load_checkpoint",
    "save_learned",
    "epoch_order",
    "CHECKPOINT_FORMAT",
]



class TrainingError(ValueError):
    """Training cannot start or continue (bad dataset, bad option, checkpoint that does not fit the run)."""


class TrainingWarning(UserWarning):
    """Training goes on, but not as the method's paper trains (e.g. a dataset without pixel masks)."""


# ---------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Optimisation settings. Defaults are the seed papers' common ground (METHODS.md); use
    :meth:`from_method` to take a method's own paper values (fields of its config with the same names)."""

    epochs: int = 15  # AnomalyCLIP / APRIL-GAN (VisA -> MVTec AD)
    batch_size: int = 8  # AnomalyCLIP, APRIL-GAN train.sh
    lr: float = 1e-3  # Adam learning rate (methods with several groups scale it in parameter_groups)
    betas: tuple[float, float] = (0.5, 0.999)  # AnomalyCLIP / APRIL-GAN Adam betas
    weight_decay: float = 0.0  # Adam weight decay (none in the references)
    optimizer: str = "adam"  # "adam" (torch.optim.Adam, L2 weight decay) | "adamw" (decoupled decay: AdaCLIP)
    seed: int = 111  # AnomalyCLIP / APRIL-GAN setup_seed(111); also seeds every epoch's shuffle
    num_workers: int = 0  # DataLoader workers
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (CUDA, with a GradScaler) autocast
    checkpoint_every: int | None = 200  # steps between checkpoints (also at every epoch end); None: epochs only
    max_steps: int | None = None  # stop (and finish the run) after this many steps in total; None: all epochs
    device: str | None = None  # None: wherever the method is; else "cpu" / "cuda" / "auto" (the method is moved)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_method(cls, method: AnomalyMethod | MethodConfig, **overrides: Any) -> "TrainConfig":
        """Paper defaults of a method: every TrainConfig field that the method's config also has (epochs,
        batch_size, lr, betas, seed, ...) is taken from it; ``overrides`` change any field."""
        config = method.config if isinstance(method, AnomalyMethod) else method
        known = set(cls.fields())
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TrainingError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        values = {}
        if config is not None:
            for f in dataclasses.fields(config):
                if f.name in known:
                    values[f.name] = getattr(config, f.name)
        values.update(overrides)
        if isinstance(values.get("betas"), list):
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    def validate(self) -> None:
        if int(self.epochs) < 1:
            raise TrainingError(f"epochs must be >= 1, got {self.epochs}")
        if int(self.batch_size) < 1:
            raise TrainingError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise TrainingError(f"lr must be > 0, got {self.lr}")
        if len(tuple(self.betas)) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise TrainingError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.checkpoint_every is not None and int(self.checkpoint_every) < 1:
            raise TrainingError(f"checkpoint_every must be >= 1 or None, got {self.checkpoint_every}")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise TrainingError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if int(self.num_workers) < 0:
            raise TrainingError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class TrainResult:
    """What :func:`train` did.

    step: optimiser steps done in total (this call and earlier ones); epoch: epochs completed;
    finished: all planned steps are done and ``learned.safetensors`` was written; interrupted: stopped early by
    ``stop_after_steps``; resumed_from_step: the checkpoint's step when the run resumed (None for a fresh run);
    history: this call's log records.
    """

    out_dir: Path
    step: int
    epoch: int
    total_steps: int
    finished: bool
    interrupted: bool
    resumed_from_step: int | None
    last_loss: float | None
    checkpoint: Path | None
    learned: Path | None
    log_path: Path
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order of one epoch: a permutation [num_samples] from a generator seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(_mix_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


def _mix_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"zsadlib-train:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def describe_dataset(dataset: AnomalyDataset) -> dict[str, Any]:
    """What a checkpoint records about its training set (with a fingerprint of the image list and order)."""
    records = getattr(dataset, "records", [])
    root = Path(getattr(dataset, "root", "."))
    digest = hashlib.sha256()
    for record in records:
        try:
            name = Path(record.image_path).relative_to(root).as_posix()
        except ValueError:
            name = Path(record.image_path).as_posix()
        digest.update(f"{name}|{record.label}|{record.class_name}\n".encode())
    labels = [int(r.label) for r in records]
    return {
        "kind": getattr(dataset, "kind", type(dataset).__name__),
        "root": str(root),
        "split": getattr(dataset, "split", None),
        "classes": list(getattr(dataset, "class_names", [])),
        "images": len(dataset),
        "anomalous": int(sum(labels)),
        "has_masks": bool(getattr(dataset, "has_masks", False)),
        "image_size": getattr(dataset, "image_size", None),
        "fingerprint": digest.hexdigest(),
    }


def _check_dataset(dataset: AnomalyDataset, method: AnomalyMethod) -> bool:
    """Raise TrainingError for data that cannot train; return whether pixel masks are used."""
    root = getattr(dataset, "root", "?")
    if len(dataset) == 0:
        raise TrainingError(f"the training dataset at {root} is empty: no images to learn from")
    labels = set(int(label) for label in np.asarray(dataset.labels).reshape(-1))
    if len(labels) < 2:
        only = "normal (label 0)" if labels == {0} else "anomalous (label 1)"
        raise TrainingError(
            f"the training dataset at {root} holds only {only} images ({len(dataset)} images): the losses need both "
            f"normal and anomalous examples; train on the test split of an annotated auxiliary dataset"
        )
    size = getattr(dataset, "image_size", None)
    if size is not None and int(size) != method.backbone.image_size:
        raise TrainingError(
            f"the training dataset at {root} is resized to {size} px but the backbone expects "
            f"{method.backbone.image_size}; open it with image_size={method.backbone.image_size}"
        )
    if not getattr(dataset, "has_masks", False):
        warnings.warn(
            f"the training dataset at {root} has no pixel masks: {method.name} is trained with its image loss only "
            f"(masks=None), not with the focal/dice map losses of its paper",
            TrainingWarning,
            stacklevel=3,
        )
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# RNG state (stored so that weights_only=True can read it back: tensors and plain Python values only)
# ---------------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position), int(has_gauss),
                  float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a corrupt file becomes one clear error naming it
        raise TrainingError(f"cannot read optimiser state {path}: {type(error).__name__}: {error}") from None


# ---------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------
def _truncate_log(log_path: Path, step: int) -> None:
    """Keep the records of steps 1..step (once each); drop later or unreadable lines (written after the last
    checkpoint by a run that was killed)."""
    if not log_path.exists():
        return
    kept: dict[int, str] = {}
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        number = record.get("step") if isinstance(record, dict) else None
        if isinstance(number, int) and 1 <= number <= step and number not in kept:
            kept[number] = line
    text = "".join(kept[n] + "\n" for n in sorted(kept))
    _atomic_write_bytes(log_path, lambda tmp: tmp.write_text(text))


PREVIOUS = "last.prev"  # the checkpoint before last.*: the fallback when a write of last.* was interrupted
PREVIOUS_OPTIMIZER = "optimizer.prev.pt"
# options that change what a step does: a resumed run must use the checkpoint's values (epochs and max_steps may
# change: they only move the end of the run)
RESUME_MUST_MATCH = ("batch_size", "seed", "lr", "betas", "weight_decay", "optimizer", "precision")


def _checkpoint_files(ckpt_dir: Path) -> dict[str, list[Path]]:
    return {"weights": [ckpt_dir / f"{LAST}.safetensors", ckpt_dir / f"{PREVIOUS}.safetensors"],
            "meta": [ckpt_dir / f"{LAST}.json", ckpt_dir / f"{PREVIOUS}.json"],
            "optimizer": [ckpt_dir / OPTIMIZER_FILE, ckpt_dir / PREVIOUS_OPTIMIZER]}


def _remove_run_files(out: Path) -> None:
    files = [path for paths in _checkpoint_files(out / CHECKPOINT_DIR).values() for path in paths]
    for path in (*files, out / f"{FINAL}.safetensors", out / f"{FINAL}.json", out / LOG_NAME):
        if path.exists():
            path.unlink()


def _rotate_checkpoint(ckpt_dir: Path) -> None:
    """Keep the current (consistent) checkpoint as last.prev.* / optimizer.prev.pt before writing a new one."""
    files = _checkpoint_files(ckpt_dir)
    for current, previous in (files["optimizer"], files["weights"], files["meta"]):
        if current.exists():
            os.replace(current, previous)


def _newest_consistent_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any], Path, dict[str, Any], bool]:
    """(weights file, its metadata, optimiser file, optimiser state, whether a .prev file was used) of the newest
    step for which a weights file, a metadata file and an optimiser state all exist and agree. A write of the
    three files that was interrupted (a crash, a kill) leaves the previous step's files: resume from those."""
    files = _checkpoint_files(ckpt_dir)
    metas: dict[int, tuple[Path, dict[str, Any]]] = {}
    problems: list[str] = []
    for path in files["meta"]:
        if path.is_file():
            try:
                meta = _read_metadata(path.with_suffix(".safetensors"))
                metas.setdefault(int(meta["step"]), (path, meta))
            except (OSError, ValueError, KeyError, TypeError) as error:
                problems.append(f"{path.name}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    weights: dict[int, Path] = {}
    for path in files["weights"]:
        if path.is_file():
            step = read_checkpoint_step(path)
            if step is None:  # written before the header recorded the step: trust the .json beside it
                beside = path.with_suffix(".json")
                step = next((s for s, (p, _) in metas.items() if p == beside), None)
            if step is not None:
                weights.setdefault(step, path)
    optimizers: dict[int, tuple[Path, dict[str, Any]]] = {}
    for path in files["optimizer"]:
        if path.is_file():
            try:
                saved = _torch_load(path)
                optimizers.setdefault(int(saved.get("step", -1)), (path, saved))
            except TrainingError as error:
                problems.append(str(error))
    steps = sorted(set(metas) & set(weights) & set(optimizers), reverse=True)
    if not steps:
        found = (f"metadata at steps {sorted(metas)}, weights at {sorted(weights)}, optimiser state at "
                 f"{sorted(optimizers)}")
        if not optimizers and not problems:
            raise FileNotFoundError(f"optimiser state {files['optimizer'][0]} of checkpoint "
                                    f"{files['weights'][0]} does not exist")
        raise TrainingError(
            f"no consistent checkpoint in {ckpt_dir} ({found}"
            + (f"; {'; '.join(problems)}" if problems else "")
            + "); pass resume=False to start over"
        )
    step = steps[0]
    meta_path, meta = metas[step]
    opt_path, saved = optimizers[step]
    used_previous = any(p.name.startswith(PREVIOUS) or p.name == PREVIOUS_OPTIMIZER
                        for p in (meta_path, weights[step], opt_path))
    return weights[step], meta, opt_path, saved, used_previous


def _resume(method: AnomalyMethod, optimizer, scaler, ckpt_dir: Path, config: TrainConfig,
            dataset_info: dict[str, Any]) -> dict[str, Any]:
    """Load the newest consistent checkpoint into the method and optimiser; return its metadata (with
    ``_used_previous`` True when it came from the .prev files)."""
    weights, meta, opt_path, saved, used_previous = _newest_consistent_checkpoint(ckpt_dir)
    saved_train = meta.get("train_config") or {}
    problems = []
    for key in RESUME_MUST_MATCH:
        if key not in saved_train:
            continue
        old, new = json_safe(saved_train[key]), json_safe(getattr(config, key))
        if old != new:
            problems.append(f"{key} {old} (checkpoint) != {new} (this run)")
    saved_data = meta.get("dataset") or {}
    if saved_data.get("fingerprint") and saved_data.get("fingerprint") != dataset_info["fingerprint"]:
        problems.append(
            f"dataset differs (checkpoint: {saved_data.get('images')} images from {saved_data.get('root')}; "
            f"this run: {dataset_info['images']} images from {dataset_info['root']})"
        )
    if problems:
        raise TrainingError(
            f"cannot resume from {weights}: " + "; ".join(problems)
            + "; resume with the checkpoint's values, pass resume=False to start over, or use another out_dir"
        )
    if saved.get("step") != meta.get("step"):  # pragma: no cover - _newest_consistent_checkpoint matched them
        raise TrainingError(f"checkpoint files in {ckpt_dir} disagree")
    load_learned_file(method, weights, meta)
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError) as error:
        raise TrainingError(
            f"optimiser state {opt_path} does not fit {method.name}'s parameter groups: {error}"
        ) from None
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    _set_rng_state(saved["rng"])
    if used_previous:
        warnings.warn(f"the last checkpoint write in {ckpt_dir} was interrupted: resuming from step "
                      f"{meta.get('step')}, the newest complete checkpoint", TrainingWarning, stacklevel=3)
    return {**meta, "_used_previous": used_previous}


def train(
    method: AnomalyMethod,
    dataset: AnomalyDataset,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after_steps: int | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``method``'s learned parameters on ``dataset`` (the backbone stays frozen).

    Args:
        method: a trainable method (``method.trainable``), already built on its backbone.
        dataset: an :class:`AnomalyDataset` with normal and anomalous images (and masks for the map losses).
        out_dir: the run directory (created); see the module docstring for its files.
        config: optimisation settings (default: :meth:`TrainConfig.from_method`).
        resume: continue from ``out_dir/checkpoints/last.*`` when present (False: delete them and start over).
        progress: tqdm bar with the running mean loss of the epoch.
        stop_after_steps: stop right after this global step *without* writing anything more, as a kill would
            (only the periodic checkpoints survive); the result has ``interrupted=True``. For tests.
        callback: called with each step's log record after the step (and its checkpoint, when due) is done;
            an exception raised there (e.g. KeyboardInterrupt) propagates and leaves the run resumable.
    Returns:
        :class:`TrainResult`.
    Raises:
        TrainingError: not trainable, empty or single-label dataset, image size mismatch, non-finite loss, a
            checkpoint from another setup.
    Warns:
        TrainingWarning: the dataset has no masks: ``masks=None`` is passed to ``training_loss`` (image loss only).
    """
    started = time.perf_counter()
    if not getattr(method, "trainable", False):
        raise TrainingError(f"method {method.name!r} is training-free: it has no learned parameters to train")
    config = TrainConfig.from_method(method) if config is None else config
    config.validate()
    use_masks = _check_dataset(dataset, method)
    if config.device is not None:
        method.to(resolve_device(config.device))
    device = method.backbone.device
    if config.precision == "fp16" and device.type != "cuda":
        raise TrainingError("precision 'fp16' needs CUDA; on the CPU use 'bf16' or 'fp32'")
    if not method.learned_parameters():
        raise TrainingError(f"method {method.name!r} has no parameters with requires_grad to train")

    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    dataset_info = describe_dataset(dataset)

    if config.optimizer not in ("adam", "adamw"):
        raise TrainingError(f"optimizer must be 'adam' or 'adamw', not {config.optimizer!r}")
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(method.parameter_groups(config.lr), lr=config.lr, betas=tuple(config.betas),
                                weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None

    count = len(dataset)
    batch_size = int(config.batch_size)
    steps_per_epoch = math.ceil(count / batch_size)
    total_steps = steps_per_epoch * int(config.epochs)
    if config.max_steps is not None:
        total_steps = min(total_steps, int(config.max_steps))

    epoch, batch_in_epoch, step = 0, 0, 0
    resumed_from: int | None = None
    used_previous = False
    saved_loss: float | None = None
    if resume and any(path.is_file() for path in _checkpoint_files(ckpt_dir)["weights"]):
        meta = _resume(method, optimizer, scaler, ckpt_dir, config, dataset_info)
        epoch, batch_in_epoch, step = int(meta["epoch"]), int(meta["batch_in_epoch"]), int(meta["step"])
        resumed_from = step
        used_previous = bool(meta.get("_used_previous"))
        _truncate_log(log_path, step)
        saved_loss = meta.get("loss")
    else:
        _remove_run_files(out)
        _seed_all(int(config.seed))

    def checkpoint_metadata(final: bool, last_loss: float | None) -> dict[str, Any]:
        return {
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step, "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch, "seed": int(config.seed), "final": final, "loss": last_loss,
            "train_config": config.to_dict(), "dataset": dataset_info, "pixel_losses": use_masks,
            "trained_on_device": str(device),
        }

    rotate = not used_previous

    def write_checkpoint(last_loss: float | None) -> Path:
        nonlocal rotate
        weights = ckpt_dir / f"{LAST}.safetensors"
        if rotate:  # keep the complete checkpoint until the new one is complete (a crash falls back to it)
            _rotate_checkpoint(ckpt_dir)
        rotate = True
        payload = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                   "rng": _rng_state(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
        _atomic_write_bytes(ckpt_dir / OPTIMIZER_FILE, lambda tmp: torch.save(payload, tmp))
        save_learned(method, weights, checkpoint_metadata(False, last_loss))  # the .json goes last
        return weights

    history: list[dict[str, Any]] = []
    last_loss: float | None = saved_loss if resumed_from is not None else None
    interrupted = False
    checkpoint_path: Path | None = ckpt_dir / f"{LAST}.safetensors" if resumed_from is not None else None
    bar = tqdm(total=total_steps, initial=step, desc=f"{method.name}: train", unit="step", disable=not progress)
    method.train()
    log = open(log_path, "a", encoding="utf-8")
    try:
        while step < total_steps and not interrupted:
            order = epoch_order(count, config.seed, epoch)
            remaining = order[batch_in_epoch * batch_size:].tolist()
            loader = DataLoader(
                dataset, batch_size=batch_size, sampler=remaining, num_workers=config.num_workers,
                collate_fn=collate_samples, drop_last=False,
                generator=torch.Generator().manual_seed(_mix_seed(config.seed + 1, epoch)),
            )
            epoch_losses: list[float] = []
            for batch in loader:
                tick = time.perf_counter()
                images = batch.images.to(device)
                masks = batch.masks.to(device) if (use_masks and batch.masks is not None) else None
                labels = batch.labels.to(device)
                with autocast(device, config.precision):
                    loss, parts = method.training_loss(images, masks, labels, list(batch.class_names))
                if not torch.isfinite(loss.detach()).all():
                    raise TrainingError(
                        f"loss is {float(loss.detach())} at step {step + 1} (epoch {epoch}); parts {parts}; "
                        f"last checkpoint: {checkpoint_path}"
                    )
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                step += 1
                batch_in_epoch += 1
                last_loss = float(loss.detach())
                epoch_losses.append(last_loss)
                record = {
                    "epoch": epoch, "step": step, "batch": batch_in_epoch, "loss": last_loss,
                    "parts": {k: float(v) for k, v in parts.items()},
                    "lr": float(optimizer.param_groups[0]["lr"]),
                    "seconds": round(time.perf_counter() - tick, 4),
                }
                if len(optimizer.param_groups) > 1:
                    record["group_lrs"] = [float(g["lr"]) for g in optimizer.param_groups]
                log.write(json.dumps(json_safe(record)) + "\n")
                log.flush()
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{sum(epoch_losses) / len(epoch_losses):.4f}", epoch=epoch)
                epoch_done = batch_in_epoch >= steps_per_epoch
                if epoch_done:
                    epoch += 1
                    batch_in_epoch = 0
                periodic = config.checkpoint_every is not None and step % int(config.checkpoint_every) == 0
                if epoch_done or periodic or step >= total_steps:
                    checkpoint_path = write_checkpoint(last_loss)
                if callback is not None:
                    callback(dict(record))
                if stop_after_steps is not None and step >= int(stop_after_steps):
                    interrupted = True
                    break
                if step >= total_steps:
                    break
    finally:
        log.close()
        bar.close()
        method.eval()

    finished = step >= total_steps and not interrupted
    learned_path = None
    if finished:
        if checkpoint_path is None or resumed_from == step:  # nothing ran in this call: make sure last.* exists
            checkpoint_path = ckpt_dir / f"{LAST}.safetensors"
            if not checkpoint_path.is_file():
                checkpoint_path = write_checkpoint(last_loss)
        learned_path = save_learned(method, out / f"{FINAL}.safetensors", checkpoint_metadata(True, last_loss))
    return TrainResult(
        out_dir=out, step=step, epoch=epoch, total_steps=total_steps, finished=finished, interrupted=interrupted,
        resumed_from_step=resumed_from, last_loss=last_loss, checkpoint=checkpoint_path, learned=learned_path,
        log_path=log_path, seconds=round(time.perf_counter() - started, 3), history=history,
    )
