"""WinCLIP and WinCLIP+ equal anomalib's WinClipModel (anomalib 2.7.0, open_clip 2.24) on identical seeded weights,
within 1e-5.

The fixture comes from ``python -m tools.reference_fixtures winclip --ref /tmp/anomalib-venv`` (see
tools/reference_fixtures/README.md): anomalib's own constructor, ``setup`` and ``forward`` in a side environment,
zero-shot and with 1 and 2 reference images.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.reference import FIXTURES, load_fixture, max_abs_diff
from tests.reference import backbone  # noqa: F401 (fixture)
from tools.reference_fixtures.winclip import CLASS_NAME, K_SHOTS, SCALES, VERSION, query_images, shot_images
from zsadlib.methods import build_method

TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(not (FIXTURES / "winclip_reference.npz").exists(), reason="no WinCLIP fixture")


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("winclip_reference")


@pytest.fixture(scope="module")
def inputs():
    return query_images(), shot_images()


def _winclip(backbone, **overrides):
    return build_method("winclip", backbone=backbone, scales=SCALES, **overrides)


def test_fixture_records_the_reference(fixture):
    _, meta = fixture
    settings = meta["settings"]
    assert settings["anomalib"] == VERSION
    assert tuple(int(x) for x in settings["open_clip"].split(".")[:3]) < (2, 26, 1)
    assert settings["class_name"] == CLASS_NAME and tuple(settings["k_shots"]) == K_SHOTS


def test_zero_shot_equals_anomalib(fixture, backbone, inputs):
    arrays, _ = fixture
    images, _ = inputs
    method = _winclip(backbone)
    out = method(images, [CLASS_NAME] * len(images))
    diffs = {
        # ours are the normalised prototypes; anomalib keeps the raw means (its cosine normalises them)
        "text": max_abs_diff(method.text_features([CLASS_NAME])[0], F.normalize(torch.from_numpy(arrays["zero/text"]),
                                                                              dim=-1)),
        "grid": max_abs_diff(out.extras["grid_map"], arrays["zero/grid"]),
        "maps": max_abs_diff(out.maps, arrays["zero/maps"]),
        "scores": max_abs_diff(out.scores, arrays["zero/scores"]),
    }
    print("winclip zero-shot max abs diff:", diffs)
    assert max(diffs.values()) < TOLERANCE, diffs
    assert float(arrays["zero/grid"].max() - arrays["zero/grid"].min()) > 1e-3  # the reference maps are not flat


@pytest.mark.parametrize("k", K_SHOTS)
def test_few_shot_equals_anomalib(fixture, backbone, inputs, k):
    arrays, _ = fixture
    images, shots = inputs
    method = _winclip(backbone, k_shot=k)
    method.set_reference_images(shots[:k], class_name=CLASS_NAME)
    out = method(images, [CLASS_NAME] * len(images))
    diffs = {
        "patch_grid": max_abs_diff(out.extras["few_shot_patch_map"], arrays[f"k{k}/patch_grid"]),
        "few_grid": max_abs_diff(out.extras["few_shot_map"], arrays[f"k{k}/few_grid"]),
        "maps": max_abs_diff(out.maps, arrays[f"k{k}/maps"]),
        "scores": max_abs_diff(out.scores, arrays[f"k{k}/scores"]),
    }
    print(f"winclip+ k={k} max abs diff:", diffs)
    assert max(diffs.values()) < TOLERANCE, diffs


def test_few_shot_moves_the_reference_outputs(fixture):
    """The few-shot fixtures differ from the zero-shot ones (the fusion is not a no-op), and the pasted image (the
    first reference image with a noise square) has a few-shot map far higher inside the square than outside."""
    arrays, _ = fixture
    assert abs(arrays["k1/scores"] - arrays["zero/scores"]).max() > 1e-3
    pasted = arrays["k1/patch_grid"][2]  # 15 x 15 grid; pixels 96..159 are patches 6..9
    inside = pasted[6:10, 6:10].min()
    outside = max(pasted[:5].max(), pasted[11:].max())
    assert inside > 4 * outside
