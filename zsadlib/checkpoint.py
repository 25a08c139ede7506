"""Checkpoint I/O for learned parameters: ``save_learned`` / ``load_checkpoint`` (safetensors + a JSON beside it),
the run-directory layout that :mod:`zsadlib.train` writes, and atomic file writes.

Sits below ``methods/`` and the engines: it imports neither (``AnomalyMethod`` is only a type here), so a method
can load a checkpoint without importing the training engine. ``zsadlib.train`` re-exports every public name.
"""
from __future__ import annotations

import json
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .errors import MethodError
from .utils import json_safe, package_versions

if TYPE_CHECKING:  # pragma: no cover
    from .methods.base import AnomalyMethod

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "save_learned",
    "load_checkpoint",
    "read_checkpoint_step",
    "atomic_write",
    "LOG_NAME",
    "CHECKPOINT_DIR",
    "LAST",
    "FINAL",
    "OPTIMIZER_FILE",
]

CHECKPOINT_FORMAT = "zsadlib-learned-v1"
LOG_NAME = "log.jsonl"
CHECKPOINT_DIR = "checkpoints"
LAST = "last"
FINAL = "learned"
OPTIMIZER_FILE = "optimizer.pt"
# the fields of zsadlib.train.TrainConfig (a method config may share them; they never warn on load)
TRAIN_CONFIG_FIELDS = ("epochs", "batch_size", "lr", "betas", "weight_decay", "optimizer", "seed", "num_workers",
                       "precision", "checkpoint_every", "max_steps", "device")


class CheckpointError(MethodError):
    """A checkpoint file does not fit the method it is loaded into (wrong method, unreadable file)."""


def _state_for_file(method: AnomalyMethod) -> dict[str, torch.Tensor]:
    """Learned parameters as contiguous CPU tensors that own their memory (what safetensors wants)."""
    state = method.learned_state_dict()
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}


def _file_mode() -> int:
    """0666 less the process umask: the mode ``open()`` gives a new file (safetensors writes 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write_bytes(path: Path, writer: Callable[[Path], None]) -> None:
    """Write ``path`` through ``writer(tmp)`` on a temporary name in the same folder, then rename it: readers see
    the old file or the new one, never half of one. The file gets the usual mode (0644 under umask 022)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    _atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(json_safe(payload), indent=2)))


def save_learned(method: AnomalyMethod, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``method``'s learned parameters to ``path`` (.safetensors) and its metadata to the .json beside it.

    The metadata always holds the method name and config, backbone info (weights checksum), image size and
    package versions; ``metadata`` adds to it (train() adds epoch, step, seed, dataset, ...).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"learned parameters are saved as .safetensors, not {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _state_for_file(method)
    info = {
        "format": CHECKPOINT_FORMAT,
        "method": method.name,
        "paper": method.paper,
        "method_config": method.config.to_dict(),
        "backbone": dict(method.backbone.info),
        "weights_sha256": method.backbone.info.get("weights_sha256"),
        "image_size": method.backbone.image_size,
        "parameters": {name: list(tensor.shape) for name, tensor in state.items()},
        "num_parameters": int(sum(t.numel() for t in state.values())),
        "saved_from_device": str(next(iter(method.learned_parameters().values())).device) if state else None,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
    }
    info.update(metadata or {})
    header = {"format": CHECKPOINT_FORMAT, "method": method.name}
    if (metadata or {}).get("step") is not None:  # lets a reader check that the .safetensors and .json agree
        header["step"] = str(int(metadata["step"]))
    _atomic_write_bytes(path, lambda tmp: save_file(state, str(tmp), metadata=header))
    _write_json(path.with_suffix(".json"), info)
    return path




atomic_write = _atomic_write_bytes


def read_checkpoint_step(path: str | Path) -> int | None:
    """The step recorded in a .safetensors file's own header (None for files without one, or unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            step = (handle.metadata() or {}).get("step")
    except Exception:  # noqa: BLE001 - unreadable: no step
        return None
    try:
        return int(step) if step is not None else None
    except ValueError:
        return None


def _resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        candidates = [path / f"{FINAL}.safetensors", path / CHECKPOINT_DIR / f"{LAST}.safetensors"]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"no checkpoint in run directory {path}: looked for {candidates[0]} and {candidates[1]}"
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path} is not a .safetensors checkpoint (pass the file or its run directory)")
    return path


def _read_metadata(path: Path) -> dict[str, Any]:
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"metadata file {meta_path} of checkpoint {path} does not exist")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read checkpoint metadata {meta_path}: {error}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata {meta_path} is not a JSON object")
    return meta


def load_checkpoint(method: AnomalyMethod, path: str | Path) -> dict[str, Any]:
    """Load learned parameters saved by :func:`train` / :func:`save_learned` into ``method``.

    Args:
        method: a built method of the same kind (same name) and compatible backbone widths.
        path: a ``.safetensors`` file, or a run directory (``learned.safetensors``, else
            ``checkpoints/last.safetensors``). Its metadata is the ``.json`` beside it.
    Returns:
        the metadata (method, config, backbone, epoch, step, dataset, ...).
    Raises:
        FileNotFoundError: the file, its metadata, or any checkpoint in the directory is missing.
        CheckpointError: the checkpoint belongs to another method, or the file cannot be read.
        MethodError: missing/unexpected keys or shapes that do not fit (names the file).

    Tensors are always read onto the CPU first (whatever device they were saved from) and then copied onto
    the device of the method's parameters. A different backbone or config only warns.
    """
    path = _resolve_checkpoint(path)
    meta = _read_metadata(path)
    load_learned_file(method, path, meta)
    return meta


def load_learned_file(method, path: Path, meta: dict[str, Any]) -> None:
    """Load the learned parameters of one ``.safetensors`` file (``meta``: its JSON) into ``method``, after checking
    the method's name (CheckpointError) and warning about a different backbone or config; tensors are read onto the
    CPU first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    saved = meta.get("method")
    if saved != method.name:
        raise CheckpointError(
            f"checkpoint {path} holds learned parameters of method {saved!r}, not {method.name!r}; "
            f"build that method (build_method({saved!r}, ...)) to load it"
        )
    _warn_differences(method, meta, path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    method.load_learned_state_dict(state, source=str(path))


def _warn_differences(method: AnomalyMethod, meta: dict[str, Any], path: Path) -> None:
    saved_backbone = meta.get("backbone") or {}
    own = method.backbone.info
    notes = []
    for key in ("name", "weights_sha256", "pretrained"):
        if saved_backbone.get(key) != own.get(key) and (saved_backbone.get(key) or own.get(key)):
            notes.append(f"backbone {key} {saved_backbone.get(key)!r} != {own.get(key)!r}")
    saved_config = meta.get("method_config") or {}
    current = json_safe(method.config.to_dict())
    skip = set(TRAIN_CONFIG_FIELDS) | {"backbone", "pretrained"}
    for key, value in saved_config.items():
        if key in skip or key not in current:
            continue
        if json_safe(value) != current[key]:
            notes.append(f"config {key} {value!r} != {current[key]!r}")
    if notes:
        warnings.warn(f"checkpoint {path} was trained with a different setup: " + "; ".join(notes), stacklevel=3)
