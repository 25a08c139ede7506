"""AdaCLIP on the tiny random-weight backbone (112 px, 8 x 8 patches, widths 32): contract, properties, training.

Equality with the authors' code is tests/test_adaclip_reference.py."""
import os

import numpy as np
import pytest
import torch

from zsadlib.methods import MethodError, build_method, get_method_class, list_methods
from zsadlib.methods.adaclip import (QUIRKS, AdaCLIP, AdaCLIPConfig, convert_reference_state_dict,
                                     hybrid_semantic_fusion, learned_parameter_count)
from zsadlib.train import TrainConfig

from .conftest import TINY_SIZE

NAMES = ["bottle", "metal-nut", "bottle"]


@pytest.fixture(scope="module")
def method(tiny_backbone):
    return build_method("adaclip", backbone=tiny_backbone)


@pytest.fixture(scope="module")
def output(method, tiny_images):
    return method(tiny_images, NAMES)


def _masks(batch=3):
    masks = torch.zeros(batch, TINY_SIZE, TINY_SIZE, dtype=torch.bool)
    masks[0, 20:60, 30:70] = True
    if batch > 2:
        masks[2, 80:100, 5:40] = True
    return masks


def _count(d, wv, wt, layers=4, n=5, depth=4):
    """Static prompts (both branches), one Linear(W_v, D) per layer, Linear(D, D), n heads D -> W_v and D -> W_t."""
    return depth * n * (wt + wv) + layers * (wv * d + d) + (d * d + d) + n * (d * wv + wv) + n * (d * wt + wt)


def test_registry_and_released_defaults():
    assert "adaclip" in list_methods() and get_method_class("adaclip") is AdaCLIP
    assert AdaCLIP.trainable and AdaCLIP.uses_class_names
    config = AdaCLIPConfig()
    assert (config.backbone, config.pretrained, config.image_size, config.pos_embed_resize) == (
        "ViT-L-14-336", "openai", 518, "bicubic")
    assert config.layers == (6, 12, 18, 24)
    assert (config.prompting_depth, config.prompting_length, config.prompting_type, config.prompting_branch) == (
        4, 5, "SD", "VL")
    assert (config.use_hsf, config.k_clusters, config.hsf_top_factor, config.hsf_alpha) == (True, 20, 5, 0.2)
    assert (config.logit_scale, config.blur_sigma) == (100.0, 4.0)
    assert len(config.normal_states) * len(config.templates) == 28 and len(config.anomalous_states) == 5
    assert set(QUIRKS) == {"prompt_fp16_round", "dice_per_row", "map_align_corners", "pos_embed_resize"}
    train = TrainConfig.from_method(config)
    assert (train.optimizer, train.lr, train.betas, train.weight_decay, train.epochs, train.batch_size,
            train.seed) == ("adamw", 0.01, (0.5, 0.999), 0.01, 5, 1, 111)


def test_parameter_count_at_vit_l_and_here(method, tiny_backbone):
    assert learned_parameter_count() == _count(768, 1024, 768) == 10_665_472
    ours = sum(p.numel() for p in method.learned_parameters().values())
    assert ours == _count(tiny_backbone.embed_dim, tiny_backbone.vision_width, tiny_backbone.text_width)
    static_only = build_method("adaclip", backbone=tiny_backbone, prompting_type="S")
    assert not any(k.startswith("dynamic_") for k in static_only.learned_parameters())


def test_output_shapes_and_ranges(output):
    assert output.scores.shape == (3,) and output.maps.shape == (3, TINY_SIZE, TINY_SIZE)
    assert torch.all((output.scores >= 0) & (output.scores <= 1))
    assert torch.all((output.maps >= 0) & (output.maps <= 1))
    assert output.extras["layer_maps"].shape == (3, 4, TINY_SIZE, TINY_SIZE)
    assert output.extras["text_features"].shape == (3, 2, 32)
    assert torch.allclose(output.extras["text_features"].norm(dim=-1), torch.ones(3, 2), atol=1e-5)
    assert torch.allclose(output.extras["image_probabilities"][:, 1], output.scores)


def test_batch_size_does_not_change_results(method, tiny_images, output):
    for index in range(3):
        alone = method(tiny_images[index:index + 1], NAMES[index:index + 1])
        assert torch.allclose(alone.scores, output.scores[index:index + 1], atol=1e-5)
        assert torch.allclose(alone.maps, output.maps[index:index + 1], atol=1e-5)


def test_dynamic_prompts_make_the_text_depend_on_the_image(tiny_backbone, method, tiny_images, output):
    text = output.extras["text_features"]
    assert float((text[0] - text[2]).abs().max()) > 1e-4  # same class "bottle", different images
    static = build_method("adaclip", backbone=tiny_backbone, prompting_type="S")
    out = static(tiny_images, NAMES)
    assert torch.allclose(out.extras["text_features"][0], out.extras["text_features"][2], atol=1e-6)
    assert float((out.extras["text_features"][0] - out.extras["text_features"][1]).abs().max()) > 1e-4


def test_class_name_hyphen_is_a_space_and_names_are_checked(method, tiny_images):
    assert method.sentences("metal-nut")[0] == "a bad photo of a metal nut."
    assert len(method.sentences("x")) == 48 and method.sentences("x")[28] == "a bad photo of a damaged x."
    with pytest.raises(MethodError, match="class names"):
        method(tiny_images, ["bottle"])


def test_hsf_is_the_mean_of_cluster_centres():
    """One layer, distinct points, K = top: every point its own cluster -> the normalised mean of the top points."""
    generator = torch.Generator().manual_seed(0)
    patches = torch.nn.functional.normalize(torch.randn(1, 30, 8, generator=generator), dim=-1)
    logits = torch.zeros(1, 30, 2)
    logits[0, :6, 1] = 5.0  # the 6 most anomalous patches
    fused = hybrid_semantic_fusion([patches], [logits], k_clusters=6, top=6, seed=0)
    expected = torch.nn.functional.normalize(patches[0, :6].mean(dim=0), dim=0)
    assert torch.allclose(fused[0], expected, atol=1e-6)
    two = hybrid_semantic_fusion([patches, patches], [logits, logits], k_clusters=3, top=6, seed=0)
    assert two.shape == (1, 8) and torch.allclose(two.norm(dim=-1), torch.ones(1))


def test_kmeans_seed_none_draws_from_numpys_global_rng(tiny_backbone, tiny_images):
    method = build_method("adaclip", backbone=tiny_backbone, kmeans_seed=None)
    np.random.seed(3)
    first = method(tiny_images[:1], ["bottle"]).scores
    np.random.seed(3)
    assert torch.equal(method(tiny_images[:1], ["bottle"]).scores, first)


@pytest.mark.parametrize("quirk", [{"prompt_fp16_round": False}, {"map_align_corners": False}, {"use_hsf": False}])
def test_switches_change_outputs(tiny_backbone, tiny_images, output, quirk):
    out = build_method("adaclip", backbone=tiny_backbone, **quirk)(tiny_images, NAMES)
    assert float((out.maps - output.maps).abs().max() + (out.scores - output.scores).abs().max()) > 1e-7, quirk


def test_training_step_changes_only_learned_parameters(tiny_backbone, tiny_images):
    method = build_method("adaclip", backbone=tiny_backbone, seed=5)
    frozen = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    before = {k: v.clone() for k, v in method.learned_state_dict().items()}
    config = method.config
    optimizer = torch.optim.AdamW(method.parameter_groups(config.lr), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    method.train()
    loss, parts = method.training_loss(tiny_images, _masks(), torch.tensor([1, 0, 1]), NAMES)
    assert set(parts) == {"image_focal", "focal", "dice"}
    assert float(loss.detach()) == pytest.approx(sum(parts.values()), rel=1e-5)
    optimizer.zero_grad()
    loss.backward()
    unused = [name for name, p in method.learned_parameters().items() if p.grad is None]
    assert unused == ["text_prompts.0"]  # as released: text block 1 sees the sentence itself
    optimizer.step()
    assert all(not p.requires_grad for p in tiny_backbone.parameters())
    for key, value in tiny_backbone.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    after = method.learned_state_dict()
    moved = {k: float((after[k] - before[k]).abs().max()) for k in before}
    assert moved["text_prompts.0"] == 0.0
    assert moved["patch_projections.0.weight"] == pytest.approx(0.01, rel=0.02)  # AdamW's first step ~ lr * sign
    image_only, parts = method.training_loss(tiny_images, None, torch.tensor([1, 0, 1]), NAMES)
    assert set(parts) == {"image_focal"}


def test_dice_per_row_is_the_batch_one_reference_loss(tiny_backbone, tiny_images):
    """dice_per_row: each mask row is a dice sample (what BinaryDiceLoss does on a squeezed [S, S] mask)."""
    from zsadlib.losses import dice_loss

    rows = build_method("adaclip", backbone=tiny_backbone)
    whole = build_method("adaclip", backbone=tiny_backbone, dice_per_row=False)
    masks, labels = _masks(1), torch.tensor([1])
    _, per_row = rows.training_loss(tiny_images[:1], masks, labels, ["bottle"])
    _, per_image = whole.training_loss(tiny_images[:1], masks, labels, ["bottle"])
    assert per_row["focal"] == pytest.approx(per_image["focal"], rel=1e-6)
    assert abs(per_row["dice"] - per_image["dice"]) > 1e-3
    pred, target = torch.rand(1, 4, 6), (torch.rand(1, 4, 6) > 0.5).float()
    by_rows = np.mean([1 - (2 * float((pred[0, r] * target[0, r]).sum()) + 1)
                       / (float(pred[0, r].sum() + target[0, r].sum()) + 1) for r in range(4)])
    assert float(dice_loss(pred.reshape(-1, 6), target.reshape(-1, 6))) == pytest.approx(by_rows, rel=1e-6)


def test_reference_state_dict_names_round_trip(method):
    mapping = {"text_prompts.": "text_prompter.static_prompts.", "visual_prompts.": "visual_prompter.static_prompts.",
               "patch_projections.": "patch_token_layer.head.", "global_projection.": "cls_token_layer.head.0.",
               "dynamic_visual.": "dynamic_visual_prompt_generator.head.",
               "dynamic_text.": "dynamic_text_prompt_generator.head."}
    theirs = {}
    for key, value in method.learned_state_dict().items():
        prefix = next(p for p in mapping if key.startswith(p))
        theirs["clip_model." + mapping[prefix] + key[len(prefix):]] = value
    converted = convert_reference_state_dict(theirs)
    assert sorted(converted) == sorted(method.learned_state_dict())
    with pytest.raises(MethodError, match="unexpected"):
        convert_reference_state_dict({"clip_model.freeze_clip.visual.proj": torch.zeros(1)})


@pytest.mark.parametrize("overrides, message", [
    ({"prompting_type": "X"}, "prompting_type"), ({"prompting_branch": "Q"}, "prompting_branch"),
    ({"prompting_depth": 0}, "prompting_depth"), ({"prompting_length": 0}, "prompting_length"),
    ({"k_clusters": 500}, "k_clusters"), ({"layers": (30,)}, "out of range"),
])
def test_bad_options_raise(tiny_backbone, overrides, message):
    with pytest.raises(MethodError, match=message):
        build_method("adaclip", backbone=tiny_backbone, **overrides)


@pytest.mark.parametrize("branch", ["", "V", "L"])
def test_single_branch_variants_run(tiny_backbone, tiny_images, branch):
    out = build_method("adaclip", backbone=tiny_backbone, prompting_branch=branch)(tiny_images[:2], NAMES[:2])
    assert out.maps.shape == (2, TINY_SIZE, TINY_SIZE) and torch.isfinite(out.scores).all()


def test_training_engine_runs_adamw_with_the_released_recipe(tiny_backbone, synthetic_root, tmp_path):
    """zsadlib.train with TrainConfig.from_method: AdamW (decoupled weight decay 0.01) over the learned parameters;
    the optimiser state it saves says so, and an unknown optimiser is one clear error."""
    from zsadlib.data import open_dataset
    from zsadlib.train import TrainingError, train

    data = open_dataset("synthetic", synthetic_root, classes=["bottle"], image_size=TINY_SIZE).subset(max_per_class=2)
    method = build_method("adaclip", backbone=tiny_backbone, seed=3)
    before = {k: v.clone() for k, v in method.learned_state_dict().items()}
    config = TrainConfig.from_method(method, max_steps=1, checkpoint_every=1)
    result = train(method, data, tmp_path / "run", config, progress=False)
    assert result.step == 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "optimizer.pt", map_location="cpu", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert group["decoupled_weight_decay"] is True and group["weight_decay"] == 0.01 and group["lr"] == 0.01
    after = method.learned_state_dict()
    assert torch.equal(after["text_prompts.0"], before["text_prompts.0"])  # no gradient: AdamW skips it
    assert float((after["global_projection.weight"] - before["global_projection.weight"]).abs().max()) > 1e-3
    with pytest.raises(TrainingError, match="optimizer"):
        train(method, data, tmp_path / "other", TrainConfig.from_method(method, optimizer="sgd", max_steps=1),
              progress=False)


@pytest.mark.skipif(not os.environ.get("ZSAD_ADACLIP_CHECKPOINT"),
                    reason="set ZSAD_ADACLIP_CHECKPOINT to a released AdaCLIP checkpoint (pretrained_*.pth)")
def test_released_checkpoint_loads_at_vit_l():
    """The authors' released weights fit the ViT-L-14-336 configuration exactly (random CLIP weights)."""
    method = build_method("adaclip", pretrained=None, device="cpu")
    method.load_reference_checkpoint(os.environ["ZSAD_ADACLIP_CHECKPOINT"])
    state = torch.load(os.environ["ZSAD_ADACLIP_CHECKPOINT"], map_location="cpu", weights_only=True)
    assert torch.equal(method.global_projection.weight, state["clip_model.cls_token_layer.head.0.weight"].float())
