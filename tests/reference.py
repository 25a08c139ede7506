"""The shared ground of the reference-equality tests (tests/test_*_reference.py) and of the script that writes
their fixtures (``python -m tools.reference_fixtures``, see tools/reference_fixtures/README.md).

Both sides build the same small CLIP from a seed: the ``tiny-ref`` open_clip config (patch 16, native 224 px,
24 vision blocks of width 128 with 2 heads, 12 text blocks of width 128 with 2 heads, joint width 64, QuickGELU;
widths are multiples of 64 because the reference code derives the head count as width // 64). open_clip's
random initialisation leaves every LayerNorm at weight 1 / bias 0, which would hide a missing or misplaced
``ln_post`` / ``ln_1``; :func:`reference_state_dict` therefore redraws every LayerNorm weight and bias from a
seeded generator. The reference code gets this state dict at the native size (it resizes the positional
embedding at run time); zsadlib loads the same dict through :func:`reference_backbone` at any input size.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REF_MODEL = "tiny-ref"
REF_SEED = 0
REF_NATIVE_SIZE = 224
REF_IMAGE_SIZE = 240  # non-native (15 x 15 grid from 14 x 14): the bilinear pos-embed resize always runs


def reference_state_dict(seed: int = REF_SEED) -> dict[str, torch.Tensor]:
    """OpenAI-format CLIP state dict of the ``tiny-ref`` model at its native size, LayerNorms randomised."""
    from zsadlib.backbone import load_backbone

    model = load_backbone(REF_MODEL, pretrained=None, image_size=REF_NATIVE_SIZE, device="cpu", seed=seed).model
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    for key in sorted(state):
        if (".ln_" in key or key.startswith(("ln_final", "visual.ln_"))) and key.endswith((".weight", ".bias")):
            base = 1.0 if key.endswith(".weight") else 0.0
            state[key] = base + 0.2 * torch.randn(state[key].shape, generator=generator)
    return state


def reference_backbone(image_size: int = REF_IMAGE_SIZE, seed: int = REF_SEED, pos_embed_resize: str = "bilinear"):
    """zsadlib's :class:`~zsadlib.backbone.Backbone` holding :func:`reference_state_dict` (loaded as a file, so the
    real checkpoint-loading path runs), at ``image_size``."""
    import tempfile

    from zsadlib.backbone import load_backbone

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny_ref.pt"
        torch.save(reference_state_dict(seed), path)
        return load_backbone(REF_MODEL, pretrained=str(path), image_size=image_size, device="cpu",
                             pos_embed_resize=pos_embed_resize, checksum=False)


def reference_images(batch: int = 2, image_size: int = REF_IMAGE_SIZE, seed: int = REF_SEED) -> torch.Tensor:
    """[batch, 3, S, S] seeded standard-normal images (what both sides feed the model)."""
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed + 2))


def save_fixture(name: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write tests/fixtures/<name>.npz: float arrays stored as float32, plus ``meta`` as JSON under ``__meta__``."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    stored = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        stored[key] = value.astype(np.float32) if value.dtype.kind == "f" else value
    stored["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    path = FIXTURES / f"{name}.npz"
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **stored)
    path.write_bytes(buffer.getvalue())
    return path


def load_fixture(name: str) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of tests/fixtures/<name>.npz."""
    with np.load(FIXTURES / f"{name}.npz") as data:
        arrays = {key: data[key] for key in data.files if key != "__meta__"}
        meta = json.loads(bytes(data["__meta__"]).decode())
    return arrays, meta


def max_abs_diff(ours, theirs) -> float:
    ours = ours.detach().cpu().float().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours, np.float32)
    theirs = np.asarray(theirs, dtype=np.float32)
    assert ours.shape == theirs.shape, f"shape {ours.shape} != reference {theirs.shape}"
    return float(np.abs(ours - theirs).max())


# -- fixtures of the reference-equality tests (import them into a test module: ``from .reference import backbone``) --
@pytest.fixture(scope="module")
def backbone():
    """:func:`reference_backbone` at 240 px."""
    return reference_backbone()


@pytest.fixture(scope="module")
def images():
    """:func:`reference_images`: [2, 3, 240, 240]."""
    return reference_images()
