"""Crane equals the authors' code (AlirezaSalehy/Crane at 39181f9) on identical seeded weights, within 1e-5.

The fixtures come from ``python -m tools.reference_fixtures crane --ref PATH [--dinov2 PATH]`` (see
tools/reference_fixtures/README.md): their test.py ScoreCalculator + gaussian_filter, and one train.py step.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference import FIXTURES, load_fixture, max_abs_diff
from tests.reference import backbone, images  # noqa: F401 (fixtures)
from zsadlib.methods import build_method, get_method_class

TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(not (FIXTURES / "crane_reference.npz").exists(), reason="no Crane fixture")


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("crane_reference")


def _reference_checkpoint(arrays, tmp_path) -> str:
    state = {key[len("state/"):]: torch.from_numpy(value) for key, value in arrays.items() if key.startswith("state/")}
    path = tmp_path / "epoch_5.pth"
    torch.save({"prompt_learner": state}, path)
    return str(path)


def _crane(name, backbone, arrays, tmp_path, **overrides):
    method = build_method(name, backbone=backbone, **overrides)
    method.load_reference_checkpoint(_reference_checkpoint(arrays, tmp_path))
    return method.eval()


def _compare(out, method, images, arrays, prefix):
    features = method.image_features(images)
    diffs = {
        "maps": max_abs_diff(out.maps, arrays[f"{prefix}/maps"]),
        "scores": max_abs_diff(out.scores, arrays[f"{prefix}/scores"]),
        "text": max_abs_diff(out.extras["text_features"], arrays[f"{prefix}/text"]),
        "global": max_abs_diff(features.global_embedding,
                               torch.nn.functional.normalize(torch.from_numpy(arrays[f"{prefix}/global"]), dim=-1)),
    }
    return diffs


@pytest.mark.parametrize("variant,overrides", [("crane", {}), ("unaliased", {"aliased_taps": False})])
def test_crane_equals_reference(fixture, backbone, images, tmp_path, variant, overrides):
    arrays, meta = fixture
    assert meta["reference_commit"].startswith("39181f9")
    method = _crane("crane", backbone, arrays, tmp_path, **overrides)
    out = method(images)
    diffs = _compare(out, method, images, arrays, variant)
    # their patch tokens are ln_post @ proj, not normalised; ours are normalised per entry
    reference_patches = torch.nn.functional.normalize(torch.from_numpy(arrays[f"{variant}/patches"]), dim=-1)
    diffs["patches"] = max_abs_diff(method.image_features(images).patches[:, 0, :16], reference_patches)
    assert max(diffs.values()) < TOLERANCE, diffs


def test_aliasing_is_what_the_reference_computes(fixture):
    """The released taps alias (all four equal); unaliased taps differ. Guards the meaning of the two fixtures."""
    arrays, _ = fixture
    aliased, unaliased = arrays["crane/patches"], arrays["unaliased/patches"]
    assert np.abs(aliased - aliased[-1:]).max() == 0
    assert np.abs(unaliased[0] - unaliased[-1]).max() > 1e-2
    assert np.abs(arrays["crane/maps"] - arrays["unaliased/maps"]).max() > 1e-3


def test_crane_training_loss_equals_reference(fixture, backbone, images, tmp_path):
    arrays, _ = fixture
    method = _crane("crane", backbone, arrays, tmp_path)
    masks = torch.from_numpy(arrays["masks"]).bool()
    labels = torch.from_numpy(arrays["labels"])
    loss, parts = method.training_loss(images, masks, labels)
    assert abs(float(loss.detach()) - float(arrays["train/loss"])) < TOLERANCE
    for key in ("focal", "dice", "image_ce"):
        assert abs(parts[key] - float(arrays[f"train/{key}"])) < TOLERANCE, key
    guided = method.text_features(method.image_features(images).global_embedding)
    assert max_abs_diff(guided, arrays["train/text"]) < TOLERANCE


def test_training_loss_has_gradients_for_the_prompts_only(fixture, backbone, images, tmp_path):
    arrays, _ = fixture
    method = _crane("crane", backbone, arrays, tmp_path)
    loss, _ = method.training_loss(images, torch.from_numpy(arrays["masks"]).bool(), torch.from_numpy(arrays["labels"]))
    loss.backward()
    assert method.text.context.grad is not None and method.text.context.grad.abs().sum() > 0
    assert method.text.deep_prompts.grad is not None and method.text.deep_prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.backbone.parameters())


needs_plus = pytest.mark.skipif(
    not (FIXTURES / "crane_reference.npz").exists()
    or "plus/maps" not in np.load(FIXTURES / "crane_reference.npz").files, reason="no Crane+ fixture")


@pytest.fixture(scope="module")
def dino(fixture, tmp_path_factory):
    from zsadlib.dino import load_dino

    arrays, meta = fixture
    state = {key[len("dino_state/"):]: torch.from_numpy(value) for key, value in arrays.items()
             if key.startswith("dino_state/")}
    path = tmp_path_factory.mktemp("dino") / "tiny_dinov2.pth"
    torch.save(state, path)
    config = meta["settings"]["dino"]
    assert (config["embed_dim"], config["depth"], config["num_heads"]) == (64, 2, 2)  # zsadlib.dino's tiny config
    return load_dino("tiny", pretrained=str(path), image_size=config["img_size"], device="cpu",
                     patch_size=config["patch_size"])


def _plus(backbone, dino, arrays, tmp_path, **overrides):
    config = get_method_class("crane_plus").config_class(backbone="tiny-ref", pretrained=None,
                                                         image_size=backbone.image_size).replace(**overrides)
    method = get_method_class("crane_plus")(config, backbone, dino=dino)
    method.load_reference_checkpoint(_reference_checkpoint(arrays, tmp_path))
    return method.eval()


@needs_plus
def test_crane_plus_batch_mean_equals_reference(fixture, backbone, images, dino, tmp_path):
    arrays, _ = fixture
    method = _plus(backbone, dino, arrays, tmp_path, dattn_mean="batch")
    out = method(images)
    diffs = {"maps": max_abs_diff(out.maps, arrays["plus/maps"]),
             "scores": max_abs_diff(out.scores, arrays["plus/scores"])}
    assert max(diffs.values()) < TOLERANCE, diffs


@needs_plus
def test_crane_plus_per_image_mean_equals_reference_at_batch_one(fixture, backbone, images, dino, tmp_path):
    """Our default (mean(S) per image) gives every image what the reference gives it alone, whatever the batch."""
    arrays, _ = fixture
    method = _plus(backbone, dino, arrays, tmp_path)
    out = method(images)
    for index in range(images.shape[0]):
        assert max_abs_diff(out.maps[index:index + 1], arrays[f"plus_single/maps_{index}"]) < TOLERANCE
        assert max_abs_diff(out.scores[index:index + 1], arrays[f"plus_single/scores_{index}"]) < TOLERANCE
    batch_mean = _plus(backbone, dino, arrays, tmp_path, dattn_mean="batch")
    assert (batch_mean(images).maps - out.maps).abs().max() > 1e-6  # the batch mean does depend on the batch


@needs_plus
def test_crane_plus_training_loss_equals_reference(fixture, backbone, images, dino, tmp_path):
    arrays, _ = fixture
    method = _plus(backbone, dino, arrays, tmp_path, dattn_mean="batch")
    loss, parts = method.training_loss(images, torch.from_numpy(arrays["masks"]).bool(),
                                       torch.from_numpy(arrays["labels"]))
    assert abs(float(loss.detach()) - float(arrays["plus_train/loss"])) < TOLERANCE, (float(loss.detach()), parts)
