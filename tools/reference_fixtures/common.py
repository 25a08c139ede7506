"""Helpers shared by the per-method fixture writers: import the authors' checkout, record its commit, save."""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.reference import (REF_IMAGE_SIZE, REF_MODEL, REF_NATIVE_SIZE, REF_SEED,  # noqa: E402
                             reference_images, reference_state_dict, save_fixture)

__all__ = ["use_checkout", "checkout_commit", "write", "stub_modules", "pkg_resources_stub", "load_script", "Patches",
           "image_set", "reference_images", "reference_state_dict", "to_numpy", "REF_IMAGE_SIZE", "REF_NATIVE_SIZE",
           "REF_MODEL", "REF_SEED"]


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


def stub_modules(stubs: dict[str, dict]) -> None:
    """Register stand-ins for modules the reference scripts import but the fixture paths never use (cv2, thop,
    tabulate, ...), so that no extra package is needed to import them: ``stubs`` maps a module name to the
    attributes its stand-in holds. A module that is installed is left alone. ``pkg_resources`` (gone from current
    setuptools; the references only read ``pkg_resources.packaging``) is usually among them."""
    import importlib.machinery

    import packaging.version  # noqa: F401  (so that sys.modules["packaging"].version exists for a stand-in)
    import torchvision  # noqa: F401  (imported before the stand-ins: torch._dynamo probes installed modules)

    for name, attributes in stubs.items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
            module.__dict__.update(attributes)
            sys.modules[name] = module


def pkg_resources_stub() -> dict[str, dict]:
    """The stand-in for ``pkg_resources``: a module holding the real ``packaging``."""
    import packaging.version  # noqa: F401

    return {"pkg_resources": {"packaging": sys.modules["packaging"]}}


def load_script(checkout: Path, name: str, prefix: str):
    """Import the checkout's ``<name>.py`` (train.py / test.py) under a private module name (``test`` is also a
    stdlib package)."""
    spec = importlib.util.spec_from_file_location(f"_{prefix}_reference_{name}", checkout / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Patches:
    """Set attributes, remember the originals, undo them all."""

    def __init__(self):
        self._undo = []

    def set(self, owner, name, value):
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def undo(self):
        for owner, name, value in reversed(self._undo):
            setattr(owner, name, value)
        self._undo.clear()


def image_set(masks, labels, **fields) -> type:
    """An in-memory stand-in for the reference scripts' ``Dataset`` class: item i is ``{"img": reference_images()[i],
    "img_mask": masks()[i], "anomaly": labels[i], "cls_name": "object", "img_path": "reference_<i>.png", **fields}``
    (what their train.py / test.py read); any constructor arguments are ignored. ``masks``: a function -> [N, 1, S, S].
    """

    class ImageSet(torch.utils.data.Dataset):
        obj_list = ["object"]

        def __init__(self, *args, **kwargs):
            self.images = reference_images()
            self.masks = masks()

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            return {"img": self.images[index], "img_mask": self.masks[index].clone(), "anomaly": labels[index],
                    "cls_name": "object", **fields, "img_path": f"reference_{index}.png"}

    return ImageSet
