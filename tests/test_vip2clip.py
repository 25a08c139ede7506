"""ViP2-CLIP on the tiny random-weight backbone (112 px, 8 x 8 patches, widths 32): contract, formulas, training."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from zsadlib.methods import MethodError, build_method, get_method_class, list_methods
from zsadlib.methods.vip2clip import QUIRKS, FineGrainedPerception, ViP2CLIP, ViP2CLIPConfig
from zsadlib.train import TrainConfig, load_checkpoint, save_learned

from .conftest import TINY_SIZE


@pytest.fixture(scope="module")
def method(tiny_backbone):
    return build_method("vip2clip", backbone=tiny_backbone)


@pytest.fixture(scope="module")
def output(method, tiny_images):
    return method(tiny_images)


def _masks(batch=3):
    masks = torch.zeros(batch, TINY_SIZE, TINY_SIZE, dtype=torch.bool)
    masks[0, 20:60, 30:70] = True
    masks[2, 80:100, 5:40] = True
    return masks


def _learned_count(n_ctx, n_cls, d, w, hidden, fgp_modules):
    """The ICA + FGP parameter count: contexts, class tokens, MetaNet bias and MLPs, FGP's 4 projections."""
    metanet = d + n_cls * (d * hidden + hidden + hidden * w + w)
    return 2 * n_ctx * w + n_cls * w + metanet + fgp_modules * 4 * (d * d + d)


# ---- registry and config ---------------------------------------------------------------------------------------
def test_registry_and_class_facts():
    assert "vip2clip" in list_methods()
    cls = get_method_class("vip2clip")
    assert cls is ViP2CLIP and cls.trainable and not cls.uses_class_names
    assert cls.paper == "ViP2-CLIP (2025)"


def test_config_defaults_are_the_released_scripts():
    config = ViP2CLIPConfig()
    assert (config.backbone, config.pretrained, config.image_size) == ("ViT-L-14-336-quickgelu", "openai", 518)
    assert config.layers == (6, 12, 18, 24) and config.global_ln_post is False
    assert (config.n_ctx, config.n_cls, config.meta_hidden, config.meta_input_bias) == (7, 3, 384, True)
    assert (config.normal_state, config.anomalous_state, config.normal_prompt_damaged) == ("good", "damaged", True)
    assert (config.fgp_heads, config.fgp_shared, config.fgp_scaled) == (8, True, False)
    assert (config.topk, config.layer_fusion, config.blur_sigma) == (50, "mean", 8.0)
    assert config.temperature == pytest.approx(0.07)
    assert (config.pixel_loss_weight, config.image_loss_weight, config.focal_gamma) == (1.0, 1.0, 2.0)
    assert (config.lr, config.fgp_lr, config.betas) == (1e-3, 1e-5, (0.9, 0.999))
    assert (config.epochs, config.batch_size, config.seed) == (10, 8, 111)
    assert set(QUIRKS) == {"normal_prompt_damaged", "fgp_shared", "fgp_scaled", "global_ln_post", "pos_embed_resize"}
    train = TrainConfig.from_method(config)
    assert (train.lr, train.betas, train.epochs, train.batch_size, train.seed) == (1e-3, (0.9, 0.999), 10, 8, 111)


def test_learned_parameter_count(method, tiny_backbone):
    counts = {name: p.numel() for name, p in method.learned_parameters().items()}
    d, w = tiny_backbone.embed_dim, tiny_backbone.text_width
    assert sum(counts.values()) == _learned_count(7, 3, d, w, 384, 1)
    # ViT-L/14: D = W = 768 -> about 4.15 M (the paper's figure; the reference adds one unused scalar)
    assert _learned_count(7, 3, 768, 768, 384, 1) == 4_149_120
    assert not any(name.startswith("backbone.") for name in counts)


# ---- prompts -----------------------------------------------------------------------------------------------------
def test_prompts_are_the_reference_token_layout(method, tiny_backbone):
    prompts = method.prompts
    # quirk: both prompts are embedded from the anomalous template; pooled at the honest texts' end token
    assert prompts.prompt_texts == ["X X X X X X X damaged X X X"] * 2
    assert prompts.text.context_positions.tolist() == [list(range(1, 8))] * 2
    assert prompts.class_positions.tolist() == [[9, 10, 11]] * 2
    honest = tiny_backbone.tokenize(["X X X X X X X good X X X", "X X X X X X X damaged X X X"]).cpu()
    assert torch.equal(prompts.pool_ids.cpu(), honest)
    assert prompts.pool_ids.argmax(dim=-1).tolist() == [12, 12]
    fixed = build_method("vip2clip", backbone=tiny_backbone, normal_prompt_damaged=False)
    assert fixed.prompts.prompt_texts == ["X X X X X X X good X X X", "X X X X X X X damaged X X X"]


def test_class_tokens_are_learned_plus_metanet_of_the_global_feature(method, tiny_images):
    prompts = method.prompts
    g = F.normalize(torch.randn(2, method.backbone.embed_dim), dim=-1)
    meta = prompts.meta
    by_hand = torch.stack([mlp["fc2"](torch.relu(mlp["fc1"](g + meta.bias))) for mlp in meta.mlps], dim=1)
    with torch.no_grad():
        tokens = prompts.conditioned_class_tokens(g)
        assert torch.allclose(tokens, prompts.class_tokens + by_hand, atol=1e-6)
        embeddings = []
        original = prompts.encode
        prompts.encode = lambda e, ids: embeddings.append(e) or original(e, ids)
        try:
            text = prompts(g)
        finally:
            del prompts.encode
    assert text.shape == (2, 2, method.backbone.embed_dim)
    spliced = embeddings[0].reshape(2, 2, 77, -1)
    assert torch.equal(spliced[:, :, 9:12], tokens[:, None].expand(-1, 2, -1, -1))
    assert torch.equal(spliced[0, 0, 1:8], prompts.text.context[0]) and torch.equal(spliced[1, 1, 1:8],
                                                                                      prompts.text.context[1])
    # the cut text tower equals the full-length one
    with torch.no_grad():
        ids = prompts.pool_ids[None].expand(2, -1, -1).reshape(4, 77)
        full = prompts.text.encode(embeddings[0], ids, full_length=True)
    assert torch.allclose(text.reshape(4, -1), full, atol=1e-5)


# ---- FGP -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaled", [False, True])
def test_fgp_is_multi_head_cross_attention(scaled):
    torch.manual_seed(0)
    fgp = FineGrainedPerception(16, 4, scaled)
    text, patches = torch.randn(2, 2, 16), torch.randn(2, 10, 16)
    q, k, v = fgp.q_proj(text), fgp.k_proj(patches), fgp.v_proj(patches)
    heads = []
    for h in range(4):
        sl = slice(4 * h, 4 * h + 4)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) * (0.5 if scaled else 1.0)
        heads.append(logits.softmax(dim=-1) @ v[..., sl])
    expected = F.normalize(fgp.out_proj(torch.cat(heads, dim=-1)), dim=-1)
    assert torch.allclose(fgp(text, patches), expected, atol=1e-6)
    with pytest.raises(MethodError, match="divide"):
        FineGrainedPerception(16, 3, scaled)


# ---- inference -----------------------------------------------------------------------------------------------------
def test_output_shapes_and_ranges(output):
    assert output.scores.shape == (3,) and output.maps.shape == (3, TINY_SIZE, TINY_SIZE)
    assert ((output.scores >= 0) & (output.scores <= 1)).all()
    assert ((output.maps >= 0) & (output.maps <= 1)).all()
    extras = output.extras
    assert extras["layer_maps"].shape == (3, 4, TINY_SIZE, TINY_SIZE)
    assert extras["image_probabilities"].shape == (3, 2)
    assert extras["global_features"].shape == (3, 32)
    assert extras["text_features"].shape == (3, 2, 32) and extras["layer_text_features"].shape == (3, 4, 2, 32)
    assert extras["topk_indices"].shape == (3, 4, 50)
    assert torch.allclose(extras["layer_text_features"].norm(dim=-1), torch.ones(3, 4, 2), atol=1e-5)


def test_outputs_follow_the_formulas(method, tiny_images, output):
    """Maps: mean over layers of (p_anom + 1 - p_norm) / 2 upsampled, scipy blur sigma 8; score: softmax of the mean
    raw cosine of the top-50 patches (by p_anom) of every layer, / 0.07."""
    features = method.image_features(tiny_images)
    layer_text = output.extras["layer_text_features"]
    layer_maps, pooled, indices = [], [], []
    for index, patches in enumerate(features.patch_embeddings):
        p = patches / patches.norm(dim=-1, keepdim=True)
        cosine = torch.einsum("bnd,bcd->bnc", p, layer_text[:, index])
        probs = (cosine / 0.07).softmax(dim=-1)
        grid_map = ((probs[..., 1] + 1 - probs[..., 0]) / 2).reshape(3, 1, 8, 8)
        layer_maps.append(F.interpolate(grid_map, size=(TINY_SIZE, TINY_SIZE), mode="bilinear")[:, 0])
        order = probs[..., 1].argsort(dim=-1, descending=True)[:, :50]
        indices.append(order.sort(dim=-1).values)
        pooled.append(torch.stack([cosine[b, order[b]] for b in range(3)]))
    layer_maps = torch.stack(layer_maps, dim=1)
    assert torch.allclose(output.extras["layer_maps"], layer_maps, atol=1e-6)
    maps = np.stack([gaussian_filter(m, sigma=8) for m in layer_maps.mean(dim=1).double().numpy()])
    assert np.abs(output.maps.numpy() - maps).max() < 1e-5
    assert torch.equal(output.extras["topk_indices"], torch.stack(indices, dim=1))
    scores = (torch.cat(pooled, dim=1).mean(dim=1) / 0.07).softmax(dim=-1)[:, 1]
    assert torch.allclose(output.scores, scores, atol=1e-6)


def test_batch_size_independence(method, tiny_images, output):
    for index in range(tiny_images.shape[0]):
        alone = method(tiny_images[index:index + 1])
        assert torch.allclose(alone.scores, output.scores[index:index + 1], atol=1e-5)
        assert torch.allclose(alone.maps, output.maps[index:index + 1], atol=1e-5)


def test_class_names_are_ignored_but_checked(method, tiny_images, output):
    named = method(tiny_images, ["bottle", "screw", "pcb1"])
    assert torch.equal(named.scores, output.scores)
    with pytest.raises(MethodError, match="class names"):
        method(tiny_images, ["bottle"])


@pytest.mark.parametrize("quirk, extra", [({"normal_prompt_damaged": False}, "text_features"),
                                          ({"fgp_scaled": True}, "layer_text_features"),
                                          ({"global_ln_post": True}, "global_features")])
def test_quirk_switches_change_outputs(tiny_backbone, tiny_images, method, output, quirk, extra):
    other = build_method("vip2clip", backbone=tiny_backbone, **quirk)
    other.load_learned_state_dict(method.learned_state_dict())  # same weights: only the switch differs
    changed = other(tiny_images)
    assert (changed.extras[extra] - output.extras[extra]).abs().max() > 1e-4
    assert not torch.allclose(changed.extras["layer_text_features"], output.extras["layer_text_features"])


def test_unshared_fgp_has_one_module_per_layer(tiny_backbone, method):
    other = build_method("vip2clip", backbone=tiny_backbone, fgp_shared=False)
    assert len(other.fgp) == 4 and len(method.fgp) == 1
    d, w = tiny_backbone.embed_dim, tiny_backbone.text_width
    assert sum(p.numel() for p in other.learned_parameters().values()) == _learned_count(7, 3, d, w, 384, 4)


# ---- training --------------------------------------------------------------------------------------------------------
def test_parameter_groups_have_the_two_learning_rates(method):
    groups = method.parameter_groups(1e-3)
    assert [g["name"] for g in groups] == ["ica", "fgp"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-5])
    assert method.parameter_groups(2e-3)[1]["lr"] == pytest.approx(2e-5)  # FGP's rate scales with lr (x 0.01)
    names = {id(p): n for n, p in method.learned_parameters().items()}
    ica = {names[id(p)] for p in groups[0]["params"]}
    fgp = {names[id(p)] for p in groups[1]["params"]}
    assert ica.isdisjoint(fgp) and ica | fgp == set(names.values())
    assert all(n.startswith("fgp.") for n in fgp) and all(n.startswith("prompts.") for n in ica)


def test_training_step_changes_only_learned_parameters(tiny_backbone, tiny_images):
    method = build_method("vip2clip", backbone=tiny_backbone, seed=5)
    frozen = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    before = {k: v.clone() for k, v in method.learned_state_dict().items()}
    optimizer = torch.optim.Adam(method.parameter_groups(1e-3), lr=1e-3)
    method.train()
    loss, parts = method.training_loss(tiny_images, _masks(), torch.tensor([1, 0, 1]))
    assert set(parts) == {"image_ce", "focal", "dice"}
    assert float(loss.detach()) == pytest.approx(parts["image_ce"] + parts["focal"] + parts["dice"], rel=1e-5)
    optimizer.zero_grad()
    loss.backward()
    for name, parameter in method.learned_parameters().items():
        assert parameter.grad is not None, name
    optimizer.step()
    assert not tiny_backbone.model.training
    assert all(not p.requires_grad for p in tiny_backbone.parameters())
    for key, value in tiny_backbone.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    after = method.learned_state_dict()
    moved = {k: float((after[k] - before[k]).abs().max()) for k in before}
    assert moved["prompts.text.context"] == pytest.approx(1e-3, rel=1e-2)  # Adam's first step is lr * sign(g)
    assert moved["fgp.0.v_proj.weight"] == pytest.approx(1e-5, rel=1e-2)  # the FGP group's lr
    image_only, parts = method.training_loss(tiny_images, None, torch.tensor([1, 0, 1]))
    assert set(parts) == {"image_ce"} and float(image_only.detach()) == pytest.approx(parts["image_ce"], rel=1e-6)
    with pytest.raises(MethodError, match="masks"):
        method.training_loss(tiny_images, torch.zeros(3, 10, 10), torch.tensor([1, 0, 1]))


def test_state_round_trip(tiny_backbone, tiny_images, method, output, tmp_path):
    other = build_method("vip2clip", backbone=tiny_backbone, seed=7)
    assert not torch.allclose(other(tiny_images).scores, output.scores)
    path = save_learned(method, tmp_path / "learned.safetensors")
    load_checkpoint(other, path)
    again = other(tiny_images)
    assert torch.equal(again.scores, output.scores) and torch.equal(again.maps, output.maps)
    with pytest.raises(MethodError):
        build_method("vip2clip", backbone=tiny_backbone, n_cls=2).load_learned_state_dict(method.learned_state_dict())


def test_seeded_initialisation_leaves_the_global_rng_alone(tiny_backbone):
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    first = build_method("vip2clip", backbone=tiny_backbone)
    assert torch.equal(torch.rand(3), expected)
    second = build_method("vip2clip", backbone=tiny_backbone)
    for key, value in first.learned_state_dict().items():
        assert torch.equal(value, second.learned_state_dict()[key]), key


# ---- errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"topk": 65}, "topk"),
    ({"topk": 0}, "topk"),
    ({"fgp_heads": 5}, "fgp_heads"),
    ({"layers": (6, 25)}, "layers"),
    ({"layer_fusion": "max"}, "layer_fusion"),
    ({"meta_hidden": 0}, "meta_hidden"),
    ({"n_ctx": 0}, "n_ctx"),
    ({"fgp_lr": 0.0}, "fgp_lr"),
    ({"temperature": 0.0}, "temperature"),
    ({"blur_sigma": -1.0}, "blur_sigma"),
    ({"normal_state": "X"}, "state word"),
    ({"normal_state": "very good"}, "same number of tokens"),
    ({"no_such_field": 1}, "unknown"),
])
def test_bad_options_raise(tiny_backbone, overrides, message):
    with pytest.raises(MethodError, match=message):
        build_method("vip2clip", backbone=tiny_backbone, **overrides)


def test_two_word_state_works_without_the_quirk(tiny_backbone, tiny_images):
    method = build_method("vip2clip", backbone=tiny_backbone, normal_state="very good", normal_prompt_damaged=False)
    assert method.prompts.class_positions.tolist() == [[10, 11, 12], [9, 10, 11]]
    assert method(tiny_images[:1]).scores.shape == (1,)
