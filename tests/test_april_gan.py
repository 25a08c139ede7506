"""APRIL-GAN on the tiny random-weight backbone (112 px, 8 x 8 patch grid): config, prompts, the map and score
against a plain re-computation, the training loss, and an honest learning test."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zsadlib import ops
from zsadlib.data import open_dataset
from zsadlib.evaluate import evaluate
from zsadlib.losses import dice_loss, focal_loss
from zsadlib.methods import MethodError, build_method, list_methods
from zsadlib.methods.april_gan import (
    APRIL_GAN_ANOMALOUS_STATES,
    APRIL_GAN_NORMAL_STATES,
    APRIL_GAN_TEMPLATES,
    AprilGAN,
    AprilGANConfig,
)
from zsadlib.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES_ANOMALIB, TEMPLATES_WINCLIP22
from zsadlib.train import TrainConfig, train

from .conftest import TINY_SIZE

NAMES = ["bottle", "screw", "bottle"]


@pytest.fixture(scope="module")
def method(tiny_backbone):
    return build_method("april_gan", backbone=tiny_backbone)


@pytest.fixture(scope="module")
def masks():
    generator = torch.Generator().manual_seed(1)
    out = torch.zeros(3, TINY_SIZE, TINY_SIZE, dtype=torch.bool)
    out[0, 20:50, 30:60] = True
    out[2] = torch.rand(TINY_SIZE, TINY_SIZE, generator=generator) > 0.97
    return out


# ---- plain re-computation -------------------------------------------------------------------------------------
def plain_text(backbone, name):
    """Every state x template prompt, each embedding normalised, group means normalised: [2, D]."""
    rows = []
    for states in (APRIL_GAN_NORMAL_STATES, APRIL_GAN_ANOMALOUS_STATES):
        prompts = []
        for state in states:
            for template in APRIL_GAN_TEMPLATES:
                prompts.append(template.format(state.format(name)))
        with torch.no_grad():
            embeddings = backbone.encode_text(prompts)
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def plain_april_gan(method, images, names):
    """Raw block outputs from open_clip's own forward_intermediates, one image and one layer at a time."""
    backbone = method.backbone
    visual = backbone.visual
    size = images.shape[-1]
    scores, maps, both_channels = [], [], []
    with torch.no_grad():
        for image, name in zip(images, names):
            text = plain_text(backbone, name)
            out = visual.forward_intermediates(image[None], indices=[layer - 1 for layer in method.config.layers],
                                               intermediates_only=True, output_fmt="NLC")
            total = torch.zeros(size, size)
            per_layer = []
            for adapter, tokens in zip(method.adapters, out["image_intermediates"]):
                patches = tokens[0] @ adapter.weight.T + adapter.bias  # [N, D]: raw tokens, no ln_post
                patches = patches / patches.norm(dim=-1, keepdim=True)
                logits = 100.0 * patches @ text.T  # [N, 2]
                grid = int(round(logits.shape[0] ** 0.5))
                logits = logits.T.reshape(1, 2, grid, grid)
                probs = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True).softmax(dim=1)
                per_layer.append(probs[0])
                total += probs[0, 1]
            maps.append(total)
            both_channels.append(per_layer)
            global_embedding = backbone.encode_image(image[None])[0]  # open_clip: ln_post(cls) @ proj
            global_embedding = global_embedding / global_embedding.norm()
            scores.append((100.0 * global_embedding @ text.T).softmax(dim=-1)[1])
    return torch.stack(scores), torch.stack(maps), both_channels


# ---- registry, config, prompts --------------------------------------------------------------------------------
def test_registry_and_flags():
    assert "april_gan" in list_methods()
    assert AprilGAN.trainable and AprilGAN.uses_class_names
    assert "APRIL-GAN" in AprilGAN.paper


def test_config_defaults_follow_the_released_code():
    config = AprilGANConfig()
    assert config.backbone == "ViT-L-14-336"  # GELU: what their factory builds at 518 px
    assert (config.pretrained, config.image_size, config.pos_embed_resize) == ("openai", 518, "bicubic_antialias")
    assert config.layers == (6, 12, 18, 24)
    assert config.adapter_bias and config.adapter_input == "raw"
    assert config.templates == "april_gan" and config.anomalous_states == "april_gan"
    assert config.normalize_prompt_embeddings
    assert config.logit_scale == 100.0 and config.upsample_align_corners and config.softmax_after_upsample
    assert config.layer_fusion == "sum" and config.blur_sigma == 0.0 and config.image_score == "global"
    assert not config.dice_on_normal and (config.focal_gamma, config.focal_smooth) == (2.0, 1e-5)
    assert (config.epochs, config.batch_size, config.lr, config.betas, config.seed) == (15, 8, 1e-3, (0.5, 0.999), 111)
    assert set(AprilGANConfig.from_dict(config.to_dict()).to_dict().items()) == set(config.to_dict().items())


def test_prompt_lists_are_april_gans_not_winclips():
    assert len(APRIL_GAN_TEMPLATES) == 35 == len(set(APRIL_GAN_TEMPLATES))
    assert all(t.count("{}") == 1 and t.endswith(".") for t in APRIL_GAN_TEMPLATES)
    assert "there is a {} in the scene." in APRIL_GAN_TEMPLATES and "a photo of my {}." in APRIL_GAN_TEMPLATES
    assert set(APRIL_GAN_TEMPLATES) != set(TEMPLATES_ANOMALIB) and set(APRIL_GAN_TEMPLATES) != set(TEMPLATES_WINCLIP22)
    assert APRIL_GAN_NORMAL_STATES == NORMAL_STATES
    assert len(APRIL_GAN_ANOMALOUS_STATES) == 5
    assert set(APRIL_GAN_ANOMALOUS_STATES) == set(ANOMALOUS_STATES) | {"broken {}"}


def test_text_features_match_plain_ensemble(method, tiny_backbone):
    text = method.text_features(["bottle", "screw", "bottle"])
    assert text.shape == (3, 2, tiny_backbone.embed_dim)
    torch.testing.assert_close(text[0], plain_text(tiny_backbone, "bottle"), atol=1e-6, rtol=1e-5)
    assert torch.equal(text[0], text[2]) and not torch.allclose(text[0], text[1])


def test_adapters_are_one_biased_linear_per_layer_with_a_seeded_init(method, tiny_backbone):
    shapes = {name: tuple(p.shape) for name, p in method.learned_parameters().items()}
    width, dim = tiny_backbone.vision_width, tiny_backbone.embed_dim
    assert shapes == {f"adapters.{i}.{kind}": ((dim, width) if kind == "weight" else (dim,))
                      for i in range(4) for kind in ("weight", "bias")}
    rng_before = torch.get_rng_state()
    again = build_method("april_gan", backbone=tiny_backbone)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the init does not consume the global RNG
    assert all(torch.equal(a, b) for a, b in zip(again.learned_state_dict().values(),
                                                 method.learned_state_dict().values()))
    other = build_method("april_gan", backbone=tiny_backbone, seed=1)
    assert not torch.equal(other.adapters[0].weight, method.adapters[0].weight)
    no_bias = build_method("april_gan", backbone=tiny_backbone, adapter_bias=False)
    assert all(adapter.bias is None for adapter in no_bias.adapters)


# ---- forward -------------------------------------------------------------------------------------------------
def test_forward_matches_plain_recomputation(method, tiny_images):
    with torch.no_grad():
        out = method(tiny_images, NAMES)
    scores, maps, _ = plain_april_gan(method, tiny_images, NAMES)
    assert out.scores.shape == (3,) and out.maps.shape == (3, TINY_SIZE, TINY_SIZE)
    torch.testing.assert_close(out.maps, maps, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.scores, scores, atol=1e-5, rtol=1e-5)
    assert out.extras["layer_maps"].shape == (3, 4, TINY_SIZE, TINY_SIZE)
    _, _, channels = plain_april_gan(method, tiny_images, NAMES)  # each layer's own map, in layer order
    plain_layers = torch.stack([torch.stack([channels[b][layer][1] for layer in range(4)]) for b in range(3)])
    torch.testing.assert_close(out.extras["layer_maps"], plain_layers, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.extras["image_probabilities"][:, 1], out.scores)


def test_adapters_read_raw_tokens_not_ln_post(method, tiny_backbone, tiny_images):
    """Changing ln_post moves the image score (global path) but not the maps (adapters see raw tokens)."""
    ln_post = tiny_backbone.visual.ln_post
    saved = (ln_post.weight.clone(), ln_post.bias.clone())
    with torch.no_grad():
        before = method(tiny_images, NAMES)
        try:
            ln_post.weight.mul_(1.7)
            ln_post.bias.add_(0.3)
            after = method(tiny_images, NAMES)
            via_ln_post = build_method("april_gan", backbone=tiny_backbone, adapter_input="ln_post")(tiny_images, NAMES)
        finally:
            ln_post.weight.copy_(saved[0])
            ln_post.bias.copy_(saved[1])
    assert torch.equal(after.maps, before.maps)
    assert not torch.equal(after.scores, before.scores)
    assert not torch.allclose(via_ln_post.maps, before.maps)


def test_options_change_what_they_say(method, tiny_backbone, tiny_images):
    with torch.no_grad():
        base = method(tiny_images, NAMES)
        mean = build_method("april_gan", backbone=tiny_backbone, layer_fusion="mean")(tiny_images, NAMES)
        map_max = build_method("april_gan", backbone=tiny_backbone, image_score="map_max")(tiny_images, NAMES)
        blurred = build_method("april_gan", backbone=tiny_backbone, blur_sigma=4.0)(tiny_images, NAMES)
        late_softmax = build_method("april_gan", backbone=tiny_backbone,
                                    softmax_after_upsample=False)(tiny_images, NAMES)
        corners_off = build_method("april_gan", backbone=tiny_backbone,
                                   upsample_align_corners=False)(tiny_images, NAMES)
    torch.testing.assert_close(mean.maps, base.maps / 4)
    torch.testing.assert_close(map_max.scores, base.maps.flatten(1).max(dim=1).values)
    torch.testing.assert_close(blurred.maps, ops.gaussian_blur(base.maps, 4.0))
    assert not torch.allclose(late_softmax.maps, base.maps) and not torch.allclose(corners_off.maps, base.maps)
    torch.testing.assert_close(late_softmax.maps.mean(dim=(1, 2)), base.maps.mean(dim=(1, 2)), atol=0.05, rtol=0)


def test_bad_options_raise(tiny_backbone):
    for change in ({"layers": (0, 6)}, {"layers": ()}, {"adapter_input": "proj"}, {"templates": "nope"},
                   {"anomalous_states": "nope"}, {"layer_fusion": "max"}, {"image_score": "topk"},
                   {"logit_scale": 0.0}, {"blur_sigma": -1.0}):
        with pytest.raises(MethodError):
            build_method("april_gan", backbone=tiny_backbone, **change)


# ---- training loss -------------------------------------------------------------------------------------------
def test_training_loss_is_focal_plus_dice_per_layer(method, tiny_images, masks):
    loss, parts = method.training_loss(tiny_images, masks, torch.tensor([1, 0, 1]), NAMES)
    assert set(parts) == {"focal", "dice"}
    _, _, channels = plain_april_gan(method, tiny_images, NAMES)
    focal = dice = 0.0
    for layer in range(4):
        probs = torch.stack([channels[b][layer] for b in range(3)])  # [B, 2, S, S]
        focal += float(focal_loss(probs, masks.long()))
        dice += float(dice_loss(probs[:, 1], masks.float()))
    assert parts["focal"] == pytest.approx(focal, rel=1e-4)
    assert parts["dice"] == pytest.approx(dice, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(focal + dice, rel=1e-4)


def test_float_training_masks_are_anomalous_strictly_above_one_half(method, tiny_images, masks):
    """Float masks (e.g. resized with interpolation) count a pixel anomalous when its value is > 0.5: exactly 0.5
    is normal. The loss with such float masks equals the loss with the bool masks they stand for."""
    from zsadlib.methods.base import mask_targets

    values = torch.tensor([0.0, 0.25, 0.5, float(np.nextafter(0.5, 1.0)), 0.75, 1.0])
    grid = values.repeat(TINY_SIZE * TINY_SIZE // values.numel() + 1)[: TINY_SIZE * TINY_SIZE]
    floats = grid.reshape(1, TINY_SIZE, TINY_SIZE).repeat(3, 1, 1)
    floats[0] = torch.where(masks[0], 1.0, 0.5)  # image 0: the fixture's box, exactly 0.5 elsewhere
    target = mask_targets(floats[:, None], tiny_images, "cpu")
    assert target.dtype == torch.bool and target.shape == (3, TINY_SIZE, TINY_SIZE)
    assert torch.equal(target[0], masks[0])
    assert not bool(target[1][grid.reshape(TINY_SIZE, TINY_SIZE) == 0.5].any())
    assert bool(target[1][grid.reshape(TINY_SIZE, TINY_SIZE) > 0.5].all())
    bools = torch.stack([masks[0], target[1], target[2]])
    labels = torch.tensor([1, 1, 1])
    with torch.no_grad():
        from_floats, _ = method.training_loss(tiny_images, floats, labels, NAMES)
        from_bools, _ = method.training_loss(tiny_images, bools, labels, NAMES)
    assert float(from_floats) == float(from_bools)


def test_training_gradients_reach_only_the_adapters(tiny_backbone, tiny_images, masks):
    fresh = build_method("april_gan", backbone=tiny_backbone, dice_on_normal=True)
    loss, parts = fresh.training_loss(tiny_images, masks, torch.tensor([1, 0, 1]), NAMES)
    assert set(parts) == {"focal", "dice", "dice_normal"}
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fresh.learned_parameters().values())
    assert all(p.grad is None for p in tiny_backbone.parameters())
    with pytest.raises(MethodError, match="only from pixel masks"):
        fresh.training_loss(tiny_images, None, torch.tensor([1, 0, 1]), NAMES)


# ---- learning --------------------------------------------------------------------------------------------------
def _blob_textures(root, kinds, per_split=6, size=TINY_SIZE):
    """An MVTec-layout set whose defects span several patches: a dark or bright disc (radius 14-23 px) on a
    periodic texture. The bundled synthetic set's defects cover ~0.4% of an image (well under one 14 px patch
    at 112 px), too small for a random-weight backbone to learn from in a few steps (see the next test)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for index, kind in enumerate(kinds):
        rng = np.random.default_rng(index)
        for split in ("good", "blotch"):
            (root / kind / "test" / split).mkdir(parents=True)
            if split == "blotch":
                (root / kind / "ground_truth" / split).mkdir(parents=True)
            for i in range(per_split):
                if kind == "stripes":
                    level = 0.8 + 0.2 * np.sin(2 * np.pi * (xx + rng.uniform(0, 20)) / rng.uniform(8, 12))
                elif kind == "checks":
                    period = rng.uniform(10, 16)
                    level = 0.8 + 0.2 * np.sign(np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period))
                else:  # waves
                    level = 0.8 + 0.2 * np.sin(2 * np.pi * (xx + yy) / rng.uniform(14, 20))
                image = level[..., None] * rng.uniform(90, 160, 3) + rng.normal(0, 4, (size, size, 3))
                if split == "blotch":
                    radius = int(rng.integers(14, 24))
                    cy, cx = rng.integers(radius, size - radius, 2)
                    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius * radius
                    dark = rng.random() < 0.5
                    image[disc] = rng.uniform(0, 255, 3) * 0.3 + 20 if dark else rng.uniform(200, 255, 3)
                    Image.fromarray(disc.astype(np.uint8) * 255).save(
                        root / kind / "ground_truth" / split / f"{i:03d}_mask.png")
                pixels = np.clip(image, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / kind / "test" / split / f"{i:03d}.png")


def _pixel_auroc(method, dataset):
    result = evaluate(method, dataset, progress=False, aupro_variants=())
    return float(result.metrics["pixel_auroc"])


def test_learning_transfers_to_a_held_out_category(tiny_backbone, tmp_path):
    """Train on two texture categories, evaluate pixel AUROC on a third never seen in training.

    Measured (torch 2.14 CPU, tiny backbone seed 0, config seed 111, 20 epochs x 3 steps, lr 1e-2): held-out
    pixel AUROC 0.479 -> 0.720 (+0.241), loss 5.06 -> 3.43. A variant of this data measured +0.07 .. +0.30 over
    init seeds 111/2/3 after 10 epochs. The bound below is half the measured margin.
    """
    root = tmp_path / "blobs"
    _blob_textures(root, ["stripes", "checks", "waves"])
    train_set = open_dataset("mvtec", root, classes=["stripes", "checks"], image_size=TINY_SIZE)
    held_out = open_dataset("mvtec", root, classes=["waves"], image_size=TINY_SIZE)
    method = build_method("april_gan", backbone=tiny_backbone)
    before = _pixel_auroc(method, held_out)
    config = TrainConfig.from_method(method, epochs=20, lr=1e-2, checkpoint_every=None)
    result = train(method, train_set, tmp_path / "run", config, progress=False)
    after = _pixel_auroc(method, held_out)
    print(f"held-out pixel AUROC {before:.3f} -> {after:.3f} (margin {after - before:+.3f}); "
          f"loss {result.history[0]['loss']:.3f} -> {result.history[-1]['loss']:.3f}")
    assert result.finished and result.step == 60
    assert after - before > 0.12


def test_bundled_synthetic_set_measurement(tiny_backbone, synthetic_root, tmp_path):
    """The brief's setting: train on carpet/grid/bottle/screw, evaluate on pill and wood. The tiny random
    backbone does not learn a clear held-out margin here (measured: pill 0.750 -> 0.791, wood 0.450 -> 0.419,
    mean 0.600 -> 0.605 after 10 epochs at lr 1e-3; other seeds and settings are as mixed), so this test only
    asserts that the training loss falls and that the held-out numbers moved, and prints them."""
    train_set = open_dataset("synthetic", synthetic_root, classes=["carpet", "grid", "bottle", "screw"],
                             image_size=TINY_SIZE).subset(max_per_class=8)
    held_out = open_dataset("synthetic", synthetic_root, classes=["pill", "wood"], image_size=TINY_SIZE)
    method = build_method("april_gan", backbone=tiny_backbone)
    before = _pixel_auroc(method, held_out)
    config = TrainConfig.from_method(method, epochs=10, checkpoint_every=None)
    result = train(method, train_set, tmp_path, config, progress=False)
    after = _pixel_auroc(method, held_out)
    losses = [record["loss"] for record in result.history]
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])  # 4 steps per epoch
    print(f"bundled synthetic: held-out pixel AUROC {before:.3f} -> {after:.3f}; epoch loss {first:.3f} -> {last:.3f}")
    assert np.isfinite([before, after]).all()
    assert after != before  # the held-out numbers measure the trained adapters, not the initial ones
    assert first - last > 0.6  # measured 5.31 -> 4.06 (drop 1.25)
