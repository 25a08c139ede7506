"""AnomalyCLIP on the tiny random-weight backbone (112 px, 8 x 8 patches): contract, formulas, training step."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from zsadlib.losses import dice_loss, focal_loss
from zsadlib.methods import MethodError, build_method, get_method_class, list_methods
from zsadlib.methods.anomalyclip import (
    PAPER_LAYERS,
    AnomalyCLIP,
    AnomalyCLIPConfig,
    convert_reference_state_dict,
    dense_from_dpam,
)

from .conftest import TINY_SIZE


@pytest.fixture(scope="module")
def method(tiny_backbone):
    return build_method("anomalyclip", backbone=tiny_backbone)


@pytest.fixture(scope="module")
def paper_method(tiny_backbone):
    return build_method("anomalyclip", backbone=tiny_backbone, layers=PAPER_LAYERS)


def _masks(batch=3):
    masks = torch.zeros(batch, TINY_SIZE, TINY_SIZE, dtype=torch.bool)
    masks[0, 20:60, 30:70] = True
    masks[2, 80:100, 5:40] = True
    return masks


def _hand_outputs(backbone, images, text, layers, ln_post=False, sigma=4.0):
    """Plain re-computation: cosine / 0.07 softmax by hand, per-layer map, bilinear upsample, sum, scipy blur."""
    features = backbone.forward_features(images, layers=layers, dense_from=6, dense_attention="vv",
                                         global_ln_post=ln_post)
    t = text / text.norm(dim=-1, keepdim=True)
    layer_maps = []
    for patches in features.patch_embeddings:
        p = patches / patches.norm(dim=-1, keepdim=True)
        logits = (p @ t.T) / 0.07
        e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        probs = e / e.sum(dim=-1, keepdim=True)
        grid_map = ((probs[..., 1] + 1 - probs[..., 0]) / 2).reshape(-1, 1, 8, 8)
        layer_maps.append(F.interpolate(grid_map, size=(TINY_SIZE, TINY_SIZE), mode="bilinear",
                                        align_corners=False)[:, 0])
    layer_maps = torch.stack(layer_maps, dim=1)
    fused = layer_maps.sum(dim=1).numpy().astype(np.float64)
    maps = np.stack([gaussian_filter(m, sigma=sigma) for m in fused])
    g = features.global_embedding / features.global_embedding.norm(dim=-1, keepdim=True)
    scores = ((g @ t.T) / 0.07).softmax(dim=-1)[:, 1]
    return scores, layer_maps, maps


def _plain_text(method):
    """AnomalyCLIP's two object-agnostic text embeddings [2, D] from the formula: "X x12 object." /
    "X x12 damaged object." with the placeholders replaced by the learned context, the text blocks run one by one
    with positions 1..4 of the inputs of blocks 2..9 replaced by the deep prompts (rounded to float16, as the
    reference code), ln_final, the end-of-text token, text_projection."""
    backbone, text = method.backbone, method.text
    model = backbone.model
    ids = backbone.tokenize([" ".join(["X"] * 12) + " object.", " ".join(["X"] * 12) + " damaged object."])
    x = model.token_embedding(ids).clone()
    spots = ids == int(backbone.tokenize(["X"])[0, 1])
    x[spots] = text.context.reshape(-1, x.shape[-1])  # row-major: prompt 0's 12 tokens, then prompt 1's
    x = x + model.positional_embedding
    for layer, block in enumerate(model.transformer.resblocks, start=1):
        if 2 <= layer <= 9:
            x = x.clone()
            x[:, 1:5] = text.deep_prompts[layer - 2].half().float()
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(2), ids.argmax(dim=-1)] @ model.text_projection


# ---- registry and config ---------------------------------------------------------------------------------------
def test_registry_and_class_facts():
    assert "anomalyclip" in list_methods()
    cls = get_method_class("anomalyclip")
    assert cls is AnomalyCLIP
    assert cls.trainable and not cls.uses_class_names
    assert cls.paper == "AnomalyCLIP (Zhou et al., ICLR 2024)"


def test_config_defaults_are_the_latest_reference_code():
    config = AnomalyCLIPConfig()
    assert (config.backbone, config.pretrained, config.image_size) == ("ViT-L-14-336-quickgelu", "openai", 518)
    assert config.layers == (24,) and PAPER_LAYERS == (6, 12, 18, 24)
    assert config.dpam_layer == 20 and dense_from_dpam(20, 24) == 6 and dense_from_dpam(1, 24) is None
    assert config.dense_attention == "vv" and config.global_ln_post is False
    assert config.prompt_templates == ("{} object.", "{} damaged object.")
    assert (config.n_ctx, config.deep_depth, config.deep_length) == (12, 9, 4)
    assert config.deep_prompt_fp16_round is True
    assert config.temperature == pytest.approx(0.07) and config.blur_sigma == 4.0
    assert config.layer_fusion == "sum"
    assert config.pixel_loss_weight == 4.0 and config.image_loss_weight == 1.0
    assert config.lr == pytest.approx(1e-3) and config.betas == (0.5, 0.999)
    assert (config.epochs, config.batch_size, config.seed) == (15, 8, 111)
    assert AnomalyCLIPConfig.from_dict(config.to_dict()) == config


def test_bad_options_are_rejected(tiny_backbone):
    for overrides in ({"layers": (25,)}, {"layers": ()}, {"layer_fusion": "max"}, {"dpam_layer": 26},
                      {"deep_depth": 13}, {"prompt_templates": ("{} object.",)}, {"temperature": 0.0}):
        with pytest.raises(MethodError):
            build_method("anomalyclip", backbone=tiny_backbone, **overrides)


# ---- inference -------------------------------------------------------------------------------------------------
def test_shapes_and_ranges(method, paper_method, tiny_images):
    out = method(tiny_images)
    assert out.scores.shape == (3,) and out.maps.shape == (3, TINY_SIZE, TINY_SIZE)
    assert out.extras["layer_maps"].shape == (3, 1, TINY_SIZE, TINY_SIZE)
    assert out.extras["text_features"].shape == (2, method.backbone.embed_dim)
    paper = paper_method(tiny_images, class_names=["a", "b", "c"])  # class names are accepted and ignored
    layer_maps = paper.extras["layer_maps"]
    assert layer_maps.shape == (3, 4, TINY_SIZE, TINY_SIZE)
    # the map is the SUM of the 4 layer maps (not their mean), blurred as scipy does
    summed = np.stack([gaussian_filter(m, sigma=4.0) for m in layer_maps.sum(dim=1).double().numpy()])
    np.testing.assert_allclose(paper.maps.numpy(), summed, atol=1e-5)
    for i in range(3):  # taps are not aliased: every layer gives its own map
        assert not torch.allclose(layer_maps[:, i], layer_maps[:, 3], atol=1e-4)
    torch.testing.assert_close(paper.extras["layer_maps"][:, 3], out.extras["layer_maps"][:, 0])
    with pytest.raises(MethodError):
        method(tiny_images, class_names=["only one"])


def test_batch_of_one_equals_batch_of_three(paper_method, tiny_images):
    together = paper_method(tiny_images)
    for i in range(3):
        alone = paper_method(tiny_images[i:i + 1])
        torch.testing.assert_close(alone.scores, together.scores[i:i + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.maps, together.maps[i:i + 1], atol=1e-5, rtol=0)


def test_maps_and_scores_match_a_plain_computation(paper_method, tiny_backbone, tiny_images):
    out = paper_method(tiny_images)
    with torch.no_grad():
        text = _plain_text(paper_method)  # not the method's own text encoding
        torch.testing.assert_close(F.normalize(out.extras["text_features"], dim=-1), F.normalize(text, dim=-1),
                                   atol=1e-5, rtol=1e-5)
        scores, layer_maps, maps = _hand_outputs(tiny_backbone, tiny_images, text, PAPER_LAYERS)
    torch.testing.assert_close(out.extras["layer_maps"], layer_maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.scores, scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.maps.numpy(), maps, atol=1e-5)


def test_mean_fusion_and_no_blur(tiny_backbone, paper_method, tiny_images):
    other = build_method("anomalyclip", backbone=tiny_backbone, layers=PAPER_LAYERS, layer_fusion="mean",
                         blur_sigma=0.0)
    other.load_learned_state_dict(paper_method.learned_state_dict())
    out = other(tiny_images)
    torch.testing.assert_close(out.maps, out.extras["layer_maps"].mean(dim=1))


def test_global_ln_post_switch(tiny_backbone, method, tiny_images):
    with_ln = build_method("anomalyclip", backbone=tiny_backbone, global_ln_post=True)
    with_ln.load_learned_state_dict(method.learned_state_dict())
    a, b = method(tiny_images), with_ln(tiny_images)
    assert not torch.allclose(a.scores, b.scores, atol=1e-4)
    torch.testing.assert_close(a.maps, b.maps)  # only the global feature changes
    with torch.no_grad():
        scores, _, _ = _hand_outputs(tiny_backbone, tiny_images, with_ln.text(), (24,), ln_post=True)
    torch.testing.assert_close(b.scores, scores, atol=1e-5, rtol=0)


def test_fp16_rounding_switch(tiny_backbone, method, tiny_images):
    exact = build_method("anomalyclip", backbone=tiny_backbone, deep_prompt_fp16_round=False)
    exact.load_learned_state_dict(method.learned_state_dict())
    a, b = method(tiny_images), exact(tiny_images)
    difference = float((a.maps - b.maps).abs().max())
    assert 0 < difference < 1e-2  # a small move, as on the real model (about 1e-4)
    deep = exact.text.deep_prompts
    assert torch.equal(exact.text.deep_prompt(2), deep[0])  # off: the float32 values themselves
    assert torch.equal(method.text.deep_prompt(2), deep[0].half().float())


# ---- learned parameters ----------------------------------------------------------------------------------------
def test_learned_state_dict_and_strict_loading(tiny_backbone, method):
    width = tiny_backbone.text_width
    state = method.learned_state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "text.context": (2, 12, width), "text.deep_prompts": (8, 4, width)}
    other = build_method("anomalyclip", backbone=tiny_backbone, seed=7)
    assert not torch.equal(other.text.context, method.text.context)
    other.load_learned_state_dict(state)
    assert all(torch.equal(other.learned_state_dict()[k], v) for k, v in state.items())
    shorter = build_method("anomalyclip", backbone=tiny_backbone, n_ctx=8)
    with pytest.raises(MethodError, match=r"shape mismatch.*text\.context"):
        shorter.load_learned_state_dict(state)
    with pytest.raises(MethodError, match=r"missing \['text\.deep_prompts'\]"):
        other.load_learned_state_dict({"text.context": state["text.context"]})
    no_deep = build_method("anomalyclip", backbone=tiny_backbone, deep_depth=1)
    with pytest.raises(MethodError, match=r"unexpected \['text\.deep_prompts'\]"):
        no_deep.load_learned_state_dict(state, source="ckpt.safetensors")


def test_reference_checkpoint_conversion(tiny_backbone, method, tmp_path):
    width = tiny_backbone.text_width
    g = torch.Generator().manual_seed(3)
    reference = {"ctx_pos": torch.randn(1, 1, 12, width, generator=g),
                 "ctx_neg": torch.randn(1, 1, 12, width, generator=g),
                 "token_prefix_pos": torch.zeros(1, 1, 1, width)}
    for i in range(8):
        reference[f"compound_prompts_text.{i}"] = torch.randn(4, width, generator=g)
        reference[f"compound_prompt_projections.{i}.weight"] = torch.zeros(896, width)
    path = tmp_path / "epoch_15.pth"
    torch.save({"prompt_learner": reference}, path)
    other = build_method("anomalyclip", backbone=tiny_backbone)
    other.load_reference_checkpoint(path)
    assert torch.equal(other.text.context[0], reference["ctx_pos"][0, 0])
    assert torch.equal(other.text.context[1], reference["ctx_neg"][0, 0])
    assert torch.equal(other.text.deep_prompts[7], reference["compound_prompts_text.7"])
    assert set(convert_reference_state_dict(reference)) == {"text.context", "text.deep_prompts"}


# ---- training --------------------------------------------------------------------------------------------------
def test_training_step_updates_prompts_only(tiny_backbone, tiny_images):
    trained = build_method("anomalyclip", backbone=tiny_backbone, layers=PAPER_LAYERS)
    frozen = {name: p.detach().clone() for name, p in tiny_backbone.named_parameters()}
    before = {name: p.detach().clone() for name, p in trained.learned_parameters().items()}
    assert set(before) == {"text.context", "text.deep_prompts"}
    optimizer = torch.optim.Adam(trained.parameter_groups(trained.config.lr), betas=trained.config.betas)
    loss, parts = trained.training_loss(tiny_images, _masks(), torch.tensor([1, 0, 1]), None)
    assert set(parts) == {"focal", "dice", "image_ce"}
    assert float(loss.detach()) == pytest.approx(4.0 * (parts["focal"] + parts["dice"]) + parts["image_ce"], rel=1e-5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for name, parameter in trained.learned_parameters().items():
        assert not torch.equal(parameter, before[name]), name
    for name, parameter in tiny_backbone.named_parameters():
        assert parameter.grad is None and torch.equal(parameter, frozen[name]), name


def test_pixel_loss_matches_a_plain_computation(tiny_backbone, paper_method, tiny_images):
    masks, labels = _masks(), torch.tensor([1, 0, 1])
    with torch.no_grad():
        loss, parts = paper_method.training_loss(tiny_images, masks, labels, None)
        text = F.normalize(paper_method.text(), dim=-1)
        features = tiny_backbone.forward_features(tiny_images, layers=PAPER_LAYERS, dense_from=6,
                                                  global_ln_post=False)
        focal = dice = 0.0
        for patches in features.patch_embeddings:
            probs = ((F.normalize(patches, dim=-1) @ text.T) / 0.07).softmax(-1)  # [B, N, 2]
            grid = probs.permute(0, 2, 1).reshape(3, 2, 8, 8)
            up = F.interpolate(grid, size=(TINY_SIZE, TINY_SIZE), mode="bilinear", align_corners=False)
            focal += float(focal_loss(up, masks.long()))
            dice += float(dice_loss(up[:, 1], masks.float())) + float(dice_loss(up[:, 0], 1 - masks.float()))
        logits = F.normalize(features.global_embedding, dim=-1) @ text.T / 0.07
        ce = float(F.cross_entropy(logits, labels))
    assert parts["focal"] == pytest.approx(focal, rel=1e-5)
    assert parts["dice"] == pytest.approx(dice, rel=1e-5)
    assert parts["image_ce"] == pytest.approx(ce, rel=1e-5)
    assert float(loss) == pytest.approx(4.0 * (focal + dice) + ce, rel=1e-5)


def test_masks_none_uses_the_image_term_only(tiny_backbone, method, tiny_images):
    labels = torch.tensor([1, 0, 1])
    loss, parts = method.training_loss(tiny_images, None, labels, None)
    assert set(parts) == {"image_ce"}
    with torch.no_grad():
        text = F.normalize(method.text(), dim=-1)
        features = tiny_backbone.forward_features(tiny_images, layers=(24,), dense_from=6, global_ln_post=False)
        logits = F.normalize(features.global_embedding, dim=-1) @ text.T / 0.07
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    loss.backward()  # the image term alone still trains the prompts
    assert float(method.text.context.grad.abs().sum()) > 0
    method.zero_grad()
    with pytest.raises(MethodError, match="masks"):
        method.training_loss(tiny_images, torch.zeros(3, 56, 56), labels, None)


# ---- learning with the training engine ---------------------------------------------------------------------------
def test_training_engine_lowers_the_loss_and_checkpoint_reloads(tiny_backbone, synthetic_root, tmp_path):
    from zsadlib.data import collate_samples, open_dataset
    from zsadlib.train import TrainConfig, train

    dataset = open_dataset("synthetic", synthetic_root, classes=["carpet", "bottle"], image_size=TINY_SIZE)
    dataset = dataset.subset(max_per_class=4, seed=0)
    batch = collate_samples([dataset[i] for i in range(len(dataset))])
    assert batch.masks is not None and 0 < int(batch.labels.sum()) < len(dataset)
    learner = build_method("anomalyclip", backbone=tiny_backbone)
    with torch.no_grad():
        before, _ = learner.training_loss(batch.images, batch.masks, batch.labels, None)
    config = TrainConfig.from_method(learner, epochs=6, batch_size=len(dataset), lr=1e-2, checkpoint_every=None)
    assert (config.betas, config.seed) == ((0.5, 0.999), 111)  # taken from AnomalyCLIPConfig
    result = train(learner, dataset, tmp_path / "run", config=config, progress=False)
    assert result.finished and result.step == 6
    assert all(set(record["parts"]) == {"focal", "dice", "image_ce"} for record in result.history)
    with torch.no_grad():
        after, _ = learner.training_loss(batch.images, batch.masks, batch.labels, None)
    assert float(after) < 0.95 * float(before)

    reloaded = build_method("anomalyclip", backbone=tiny_backbone)
    reloaded.load_checkpoint(str(tmp_path / "run"))
    for name, value in learner.learned_state_dict().items():
        assert torch.equal(reloaded.learned_state_dict()[name], value), name
    torch.testing.assert_close(reloaded(batch.images).maps, learner(batch.images).maps, atol=0, rtol=0)
