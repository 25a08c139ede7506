"""Crane / Crane+ on the tiny random-weight backbone (112 px, 8 x 8 patches): contract, formulas, quirks, training."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from zsadlib.methods import MethodError, build_method, get_method_class, list_methods
from zsadlib.methods.crane import CraneConfig, CranePlusConfig, dattn_weights

from .conftest import TINY_SIZE


class FakeDino(torch.nn.Module):
    """A stand-in second backbone: a fixed random 1x1 projection of the image average-pooled to a 6 x 6 grid (a grid
    unlike CLIP's 8 x 8, so the token resize runs), per image: [B, 16, 6, 6]."""

    def __init__(self):
        super().__init__()
        self.info = {"name": "fake"}
        self.weight = torch.randn(16, 3, 1, 1, generator=torch.Generator().manual_seed(3))

    def patch_features(self, images):
        return F.conv2d(F.adaptive_avg_pool2d(images, 6), self.weight)


@pytest.fixture(scope="module")
def method(tiny_backbone):
    return build_method("crane", backbone=tiny_backbone)


def _masks(batch=3):
    masks = torch.zeros(batch, TINY_SIZE, TINY_SIZE, dtype=torch.bool)
    masks[0, 20:60, 30:70] = True
    masks[2, 80:100, 5:40] = True
    return masks


def test_registered_with_released_defaults():
    assert {"crane", "crane_plus"} <= set(list_methods())
    config = CraneConfig()
    assert config.layers == (6, 12, 18, 24) and config.attention == "qkv_sum" and config.aliased_taps
    assert (config.lr, config.betas, config.epochs, config.batch_size) == (1e-3, (0.6, 0.999), 5, 8)
    assert (config.focal_weight, config.dice_weight, config.image_loss_weight) == (2.0, 2.0, 0.2)
    plus = CranePlusConfig()
    assert plus.dattn and plus.layers == (24,) and plus.dattn_mean == "image"
    assert get_method_class("crane_plus").config_class is CranePlusConfig


def test_outputs_and_hand_computation(method, tiny_images):
    """Soft mean of per-entry upsampled softmaxes, scipy blur, score-based pooling, all recomputed by hand."""
    out = method(tiny_images)
    assert out.scores.shape == (3,) and out.maps.shape == (3, TINY_SIZE, TINY_SIZE)
    backbone = method.backbone
    features = backbone.forward_features(tiny_images, layers=(24,), dense_from=6, dense_attention="qkv_sum",
                                         global_ln_post=True)
    patches = F.normalize(features.patch_embeddings[0], dim=-1)  # aliased: every tap is layer 24
    with torch.no_grad():
        text = F.normalize(method.text().float(), dim=-1)
    logits = patches @ text.T / 0.07
    probs = logits.softmax(dim=-1)[..., 1].reshape(3, 1, 8, 8)
    upsampled = F.interpolate(probs, size=(TINY_SIZE, TINY_SIZE), mode="bilinear", align_corners=False)[:, 0]
    expected_maps = np.stack([gaussian_filter(m, sigma=4) for m in upsampled.numpy()])
    assert np.abs(out.maps.numpy() - expected_maps).max() < 1e-5
    weights = logits.softmax(dim=-1)[..., 1:]
    pooled = F.normalize((patches * weights).sum(dim=1), dim=-1)
    image = F.normalize(0.5 * pooled + 0.5 * F.normalize(features.global_embedding, dim=-1), dim=-1)
    expected_scores = (image @ text.T / 0.07).softmax(dim=-1)[:, 1]
    assert torch.allclose(out.scores, expected_scores, atol=1e-6)


def test_aliasing_switch_changes_maps(tiny_backbone, method, tiny_images):
    released = method(tiny_images)
    assert torch.equal(released.extras["layer_maps"][:, 0], released.extras["layer_maps"][:, -1])
    fixed = build_method("crane", backbone=tiny_backbone, aliased_taps=False)(tiny_images)
    assert (fixed.extras["layer_maps"][:, 0] - fixed.extras["layer_maps"][:, -1]).abs().max() > 1e-3
    assert (fixed.maps - released.maps).abs().max() > 1e-4


def test_logit_mean_differs_from_soft_mean(tiny_backbone, tiny_images):
    soft = build_method("crane", backbone=tiny_backbone, aliased_taps=False)(tiny_images)
    logit = build_method("crane", backbone=tiny_backbone, aliased_taps=False, layer_fusion="logit_mean")(tiny_images)
    assert (soft.maps - logit.maps).abs().max() > 1e-4
    assert torch.allclose(soft.scores, logit.scores)  # the image score does not depend on the map fusion


def test_batch_size_does_not_change_results(method, tiny_images):
    together = method(tiny_images)
    alone = [method(tiny_images[i:i + 1]) for i in range(3)]
    assert torch.allclose(together.maps, torch.cat([o.maps for o in alone]), atol=1e-5)
    assert torch.allclose(together.scores, torch.cat([o.scores for o in alone]), atol=1e-6)


def test_class_names_are_ignored_but_checked(method, tiny_images):
    assert torch.equal(method(tiny_images, ["a", "b", "c"]).maps, method(tiny_images).maps)
    with pytest.raises(MethodError, match="3 images"):
        method(tiny_images, ["a"])


def test_context_guidance_inserts_the_image_embedding(method, tiny_images):
    features = method.image_features(tiny_images)
    guided = method.text_features(features.global_embedding)
    static = method.text_features()
    assert guided.shape == (3, 2, static.shape[-1])
    assert (guided - static[None]).abs().max() > 1e-4
    assert (guided[0] - guided[1]).abs().max() > 1e-6  # one text pair per image
    # what is inserted: the embedding token right after the context, the end-of-text token one position later
    embeddings, ids = method.text.insert_context_tokens(method.text.prompt_embeddings(),
                                                        features.global_embedding[:, None])
    end = int(method.text.context_positions[0, -1]) + 1
    assert torch.equal(embeddings[1, 0, end], features.global_embedding[1])
    assert int(ids[0, 0].argmax()) == int(method.text.token_ids[0].argmax()) + 1


def test_training_step_changes_only_the_prompts(tiny_backbone, tiny_images):
    method = build_method("crane", backbone=tiny_backbone, aliased_taps=False)
    frozen = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    before = {k: v.clone() for k, v in method.learned_state_dict().items()}
    optimizer = torch.optim.Adam(method.learned_parameters().values(), lr=1e-2, betas=(0.6, 0.999))
    loss, parts = method.training_loss(tiny_images, _masks(), torch.tensor([0, 1, 1]))
    assert set(parts) == {"image_ce", "focal", "dice"} and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    after = method.learned_state_dict()
    assert all((after[k] - before[k]).abs().max() > 0 for k in before)
    assert all(torch.equal(v, frozen[k]) for k, v in tiny_backbone.state_dict().items())
    assert set(method.learned_state_dict()) == {"text.context", "text.deep_prompts"}


def test_image_loss_only_without_masks(method, tiny_images):
    loss, parts = method.training_loss(tiny_images, None, torch.tensor([0, 1, 1]))
    assert set(parts) == {"image_ce"}
    assert abs(float(loss.detach()) - 0.2 * parts["image_ce"]) < 1e-5


def test_guidance_probability_zero_uses_static_prompts(tiny_backbone, tiny_images):
    static = build_method("crane", backbone=tiny_backbone, context_guidance_prob=0.0)
    none = build_method("crane", backbone=tiny_backbone, context_guidance="none")
    labels = torch.tensor([0, 1, 1])
    torch.manual_seed(0)
    a, _ = static.training_loss(tiny_images, _masks(), labels)
    b, _ = none.training_loss(tiny_images, _masks(), labels)
    assert abs(float(a.detach()) - float(b.detach())) < 1e-6


def test_reference_checkpoint_round_trip(method, tmp_path):
    state = method.learned_state_dict()
    reference = {"ctx_pos": state["text.context"][0][None, None] + 1, "ctx_neg": state["text.context"][1][None, None],
                 "tokenized_prompts_pos": method.text.token_ids[0][None, None].int()}
    for index, tokens in enumerate(state["text.deep_prompts"]):
        reference[f"compound_prompts_text.{index}"] = tokens
    path = tmp_path / "epoch_5.pth"
    torch.save({"prompt_learner": reference}, path)
    fresh = build_method("crane", backbone=method.backbone)
    fresh.load_reference_checkpoint(path)
    assert torch.equal(fresh.text.context[0], state["text.context"][0] + 1)
    torch.save({"prompt_learner": {"ctx_pos": torch.zeros(1, 1, 5, 32), "ctx_neg": torch.zeros(1, 1, 5, 32)}}, path)
    with pytest.raises(MethodError, match="epoch_5.pth"):
        fresh.load_reference_checkpoint(path)
    reference["tokenized_prompts_pos"] = method.text.token_ids[1][None, None].int()  # another prompt's tokens
    torch.save({"prompt_learner": reference}, path)
    with pytest.raises(MethodError, match="tokenized_prompts_pos differ"):
        fresh.load_reference_checkpoint(path)


@pytest.mark.skipif(not os.environ.get("ZSAD_CRANE_CHECKPOINT"),
                    reason="set ZSAD_CRANE_CHECKPOINT to a released Crane checkpoint (checkpoints/*/epoch_5.pth)")
def test_released_checkpoint_loads_at_vit_l():
    """The authors' released prompt learners fit the ViT-L/14@336 configuration exactly (random CLIP weights)."""
    method = build_method("crane", pretrained=None, device="cpu")
    method.load_reference_checkpoint(os.environ["ZSAD_CRANE_CHECKPOINT"])
    state = torch.load(os.environ["ZSAD_CRANE_CHECKPOINT"], map_location="cpu", weights_only=True)["prompt_learner"]
    assert torch.equal(method.text.context[1], state["ctx_neg"][0, 0].float())


@pytest.mark.parametrize("overrides, message", [
    ({"attention": "qq"}, "attention"),
    ({"layer_fusion": "max"}, "layer_fusion"),
    ({"layers": (3, 24)}, "aliased_taps"),
    ({"layers": (30,)}, "out of range"),
    ({"dattn_mean": "global"}, "dattn_mean"),
    ({"context_guidance_prob": 2.0}, "context_guidance_prob"),
    ({"eattn_to_layer": 40}, "eattn_to_layer"),
])
def test_bad_options_are_clear_errors(tiny_backbone, overrides, message):
    with pytest.raises(MethodError, match=message):
        build_method("crane", backbone=tiny_backbone, **overrides)


# ---- Crane+ (D-Attn) with a stand-in second backbone ------------------------------------------------------------
def test_dattn_weights_formula():
    tokens = torch.randn(2, 5, 3, 3)
    weights = dattn_weights(tokens, beta=1.2, gamma=3.0, mean="image")
    flat = F.normalize(tokens.flatten(2), dim=1)
    for b in range(2):
        s = flat[b].T @ flat[b]
        t = 3.0 * (s - 1.2 * s.mean())
        t[t < 0] = float("-inf")
        assert torch.allclose(weights[b], t.softmax(dim=-1), atol=1e-6)
    batch = dattn_weights(tokens, beta=1.2, gamma=3.0, mean="batch")
    alone = dattn_weights(tokens[:1], beta=1.2, gamma=3.0, mean="batch")
    assert torch.allclose(alone[0], weights[0], atol=1e-6) and not torch.allclose(batch[0], weights[0])


def test_dattn_empty_rows():
    """Identical tokens put every similarity at the mean, below 1.2 x mean: every row is empty. The reference gives
    NaN; "self" attends to the patch itself."""
    tokens = torch.ones(1, 4, 2, 2)
    assert torch.isnan(dattn_weights(tokens, beta=1.2, gamma=3.0, mean="image")).all()
    assert torch.equal(dattn_weights(tokens, beta=1.2, gamma=3.0, mean="image", empty_rows="self")[0], torch.eye(4))
    mixed = torch.randn(2, 5, 3, 3)
    assert torch.equal(dattn_weights(mixed, 1.2, 3.0, "image", "self"), dattn_weights(mixed, 1.2, 3.0, "image"))


def test_tiny_fallback_builds_crane_plus_with_a_tiny_dino(tiny_images):
    from zsadlib.methods import build_method_or_tiny

    method = build_method_or_tiny("crane_plus", image_size=TINY_SIZE, device="cpu", announce=lambda message: None)
    assert method.dino.info["random_weights"] and method.config.dattn_empty_rows == "self"
    out = method(tiny_images)
    assert torch.isfinite(out.maps).all() and torch.isfinite(out.scores).all()


def _plus(backbone, **overrides):
    method = get_method_class("crane_plus")(CranePlusConfig(backbone="tiny", pretrained=None,
                                                            image_size=TINY_SIZE).replace(**overrides),
                                            backbone, dino=FakeDino())
    return method.eval()


def test_crane_plus_entries_and_batch_independence(tiny_backbone, tiny_images):
    method = _plus(tiny_backbone)
    out = method(tiny_images)
    assert out.extras["entries"] == ["dattn@24", "eattn@24"]
    assert out.extras["layer_maps"].shape == (3, 2, TINY_SIZE, TINY_SIZE)
    alone = torch.cat([method(tiny_images[i:i + 1]).maps for i in range(3)])
    assert torch.allclose(out.maps, alone, atol=1e-5)
    dattn_only = _plus(tiny_backbone, dattn_with_eattn=False)(tiny_images)
    assert dattn_only.extras["entries"] == ["dattn@24"]
    block_input = _plus(tiny_backbone, dattn_value_source="block_input")(tiny_images)
    assert (block_input.maps - out.maps).abs().max() > 1e-5


def test_crane_plus_training_step(tiny_backbone, tiny_images):
    method = _plus(tiny_backbone)
    loss, parts = method.training_loss(tiny_images, _masks(), torch.tensor([0, 1, 1]))
    loss.backward()
    assert method.text.context.grad.abs().sum() > 0 and torch.isfinite(loss)
