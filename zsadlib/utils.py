"""Small shared helpers: device choice, seeding, checksums, environment facts."""
from __future__ import annotations

import contextlib
import hashlib
import math
import platform
import random
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .runtime import resolve_device  # noqa: F401 - its home is runtime.py; importable here as before

__all__ = ["write_json", "seeded", "resolve_device", "seed_everything", "sha256_file", "package_versions", "json_safe", "state_mismatch"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch seeded by ``seed``, restoring the CPU and every CUDA generator afterwards
    (``torch.manual_seed`` also reseeds CUDA, so forking the CPU generator alone would not leave it untouched)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (weights files are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that change numbers, for metrics.json."""
    names = ["zsadlib", "torch", "open_clip_torch", "numpy", "scipy", "scikit-learn", "scikit-image", "pillow"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def json_safe(value: Any) -> Any:
    """A JSON-ready copy: NaN/inf -> None, numpy scalars -> Python, paths and devices -> str, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (Path, torch.device)):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def state_mismatch(expected: dict[str, Any], state: dict[str, Any], limit: int = 4) -> str:
    """'' when ``state`` has exactly the keys and shapes of ``expected``; else what differs, in one line."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in expected
                  if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" ... ({len(items)} in all)" if len(items) > limit else ""
            parts.append(f"{label} {items[:limit]}{more}")
    return "; ".join(parts)


def write_json(path: str | Path, content: dict[str, Any]) -> Path:
    """Write ``json_safe(content)`` as indented JSON, creating the folder."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(content), indent=2))
    return path
