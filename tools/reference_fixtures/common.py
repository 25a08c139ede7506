"""Helpers shared by the per-method fixture writers: import the authors' checkout, record its commit, save."""
from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.reference import (REF_IMAGE_SIZE, REF_MODEL, REF_NATIVE_SIZE, REF_SEED,  # noqa: E402
                             reference_images, reference_state_dict, save_fixture)

__all__ = ["use_checkout", "checkout_commit", "write", "stub_modules", "shim_pkg_resources", "reference_images", "reference_state_dict", "to_numpy",
           "REF_IMAGE_SIZE", "REF_NATIVE_SIZE", "REF_MODEL", "REF_SEED"]


def use_checkout(path: str | Path) -> Path:
    """Put the authors' checkout first on ``sys.path`` (its modules are imported from there, never copied)."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise SystemExit(f"reference checkout {path} is not a folder")
    sys.path.insert(0, str(path))
    return path


def checkout_commit(path: Path) -> str:
    """The checkout's HEAD commit (``git rev-parse``), or 'unknown' outside git."""
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    return np.asarray(value)


def write(name: str, arrays: dict, checkout: Path, repository: str, expected_commit: str, settings: dict) -> None:
    """Save a fixture with what made it: the reference repository + commit, the model, the seeds, the settings."""
    commit = checkout_commit(checkout)
    if expected_commit and not commit.startswith(expected_commit):
        print(f"warning: {checkout} is at {commit[:7]}, the fixtures document {expected_commit}", file=sys.stderr)
    meta = {
        "reference": repository,
        "reference_commit": commit,
        "model": REF_MODEL,
        "seed": REF_SEED,
        "image_size": REF_IMAGE_SIZE,
        "native_size": REF_NATIVE_SIZE,
        "torch": torch.__version__,
        "written": datetime.date.today().isoformat(),
        "settings": settings,
    }
    path = save_fixture(name, {key: to_numpy(value) for key, value in arrays.items()}, meta)
    print(f"wrote {path.relative_to(REPO_ROOT)} ({path.stat().st_size / 1024:.0f} KiB): {sorted(arrays)}")


def stub_modules(*names: str) -> None:
    """Register empty stand-ins for modules the reference imports but the fixture path never uses (cv2,
    torchmetrics, ...), so that no extra package is needed to import their test/train scripts. A stand-in's
    attributes are placeholders that do nothing and return an empty string."""
    import importlib.machinery
    import types

    def _missing(module_name):
        def placeholder(*args, **kwargs):
            return ""
        placeholder.__qualname__ = module_name
        return placeholder

    for name in names:
        if name in sys.modules:
            continue
        try:
            __import__(name)
            continue
        except ImportError:
            pass
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)

        def __getattr__(attribute, _name=name):
            if attribute.startswith("__"):
                raise AttributeError(attribute)
            return _missing(f"{_name}.{attribute}")

        module.__getattr__ = __getattr__  # type: ignore[attr-defined]
        sys.modules[name] = module


def shim_pkg_resources() -> None:
    """The reference code does ``from pkg_resources import packaging`` (for a torch version check); current
    setuptools no longer ships pkg_resources, so give it a module holding the real ``packaging``."""
    import types

    try:
        import pkg_resources  # noqa: F401
        return
    except ImportError:
        import packaging.version

        module = types.ModuleType("pkg_resources")
        module.packaging = packaging  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = module
