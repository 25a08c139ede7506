"""GenCLIP on the tiny random-weight backbone (112 px, 8 x 8 patches): contract, branches, MVP, batching, training."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from zsadlib.methods import MethodError, build_method, get_method_class, list_methods
from zsadlib.methods.genclip import OUR_CHOICES, GenCLIP, GenCLIPConfig

from .conftest import TINY_SIZE

LAYERS = (6, 12, 18, 24)


@pytest.fixture(scope="module")
def method(tiny_backbone):
    return build_method("genclip", backbone=tiny_backbone)


@pytest.fixture(scope="module")
def images8():
    return torch.randn(8, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(5))


def _masks(batch=3):
    masks = torch.zeros(batch, TINY_SIZE, TINY_SIZE, dtype=torch.bool)
    masks[0, 20:60, 30:70] = True
    masks[2, 80:100, 5:40] = True
    return masks


def _twin(tiny_backbone, method, **overrides):
    """Another GenCLIP with the same learned parameters and some config fields changed."""
    other = build_method("genclip", backbone=tiny_backbone, **overrides)
    other.load_learned_state_dict(method.learned_state_dict())
    return other


# ---- registry and config ---------------------------------------------------------------------------------------
def test_registry_and_class_facts():
    assert "genclip" in list_methods()
    cls = get_method_class("genclip")
    assert cls is GenCLIP
    assert cls.trainable and cls.uses_class_names and cls.paper == "GenCLIP (2025)"


def test_config_defaults():
    config = GenCLIPConfig()
    assert (config.backbone, config.pretrained, config.image_size) == ("ViT-L-14-336-quickgelu", "openai", 518)
    assert config.layers == LAYERS and config.dense_from == 6 and config.dense_attention == "vv"
    assert config.query_templates == ("{} object.", "{} damaged object.")
    assert config.enhanced_templates == ("{} {name}.", "{} damaged {name}.")
    assert config.fusion_weight == 0.5 and config.branch == "fused" and config.blur_sigma == 4.0
    assert config.temperature == pytest.approx(0.07) and config.name_filter == "single_token"
    assert config.lr == pytest.approx(1e-3) and config.betas == (0.5, 0.999) and config.batch_size == 8
    assert config.mvp_linear and not config.score_from_map and not config.soft_term_alignment
    assert GenCLIPConfig.from_dict(config.to_dict()) == config
    fields = {f.name for f in dataclasses.fields(GenCLIPConfig)}
    assert set(OUR_CHOICES) <= fields  # every unpublished default is a config field


def test_bad_options_are_rejected(tiny_backbone):
    for overrides in ({"layers": (25,)}, {"layers": ()}, {"layer_fusion": "max"}, {"fusion_weight": 1.5},
                      {"branch": "both"}, {"name_filter": "nope"}, {"mvp_activation": "swish"},
                      {"enhanced_templates": ("{} object.", "{} damaged {name}.")},
                      {"query_templates": ("{} {name}.", "{} damaged object.")}, {"dense_from": 30},
                      {"enhanced_global_text": "first"}, {"temperature": 0.0}, {"deep_depth": 13}):
        with pytest.raises(MethodError):
            build_method("genclip", backbone=tiny_backbone, **overrides)


# ---- inference -------------------------------------------------------------------------------------------------
def test_shapes_ranges_and_extras(method, tiny_backbone, tiny_images):
    out = method(tiny_images, ["bottle", "pcb1", "metal_nut"])
    size, dim, width = TINY_SIZE, tiny_backbone.embed_dim, tiny_backbone.text_width
    assert out.scores.shape == (3,) and out.maps.shape == (3, size, size)
    extras = out.extras
    for key in ("enhanced_maps", "query_maps", "fused_maps"):
        assert extras[key].shape == (3, size, size)
    for key in ("enhanced_layer_maps", "query_layer_maps", "layer_maps"):
        assert extras[key].shape == (3, 4, size, size)
    # the returned (fused) layer maps are the w-weighted mean of the branches' layer maps, which differ
    assert not torch.allclose(extras["enhanced_layer_maps"], extras["query_layer_maps"], atol=1e-4)
    torch.testing.assert_close(extras["layer_maps"],
                               0.5 * extras["enhanced_layer_maps"] + 0.5 * extras["query_layer_maps"])
    assert extras["text_features_query"].shape == (2, dim)
    assert extras["text_features_enhanced"].shape == (3, 4, 2, dim)
    assert extras["visual_prompts"].shape == (3, 4, 1, width)
    assert extras["prompt_names"] == ["bottle", "object", "metal nut"]
    assert extras["filter_report"].filtered == ["pcb1"]
    torch.testing.assert_close(out.scores, extras["fused_scores"], atol=0, rtol=0)
    torch.testing.assert_close(out.maps, extras["fused_maps"], atol=0, rtol=0)
    assert "pcb1" in method.filtered_names and "bottle" in method.kept_names
    described = method.describe()
    assert "pcb1" in described["name_filter"]["filtered"] and described["our_choices"] == OUR_CHOICES
    with pytest.raises(MethodError):
        method(tiny_images, ["only one"])


def test_maps_and_scores_match_a_plain_computation(method, tiny_backbone, tiny_images):
    """Each layer's patches are scored against that layer's own text; enhanced score uses the last layer's text."""
    out = method(tiny_images, ["bottle", "screw", "pill"])
    features = tiny_backbone.forward_features(tiny_images, layers=LAYERS, dense_from=6, global_ln_post=True)
    text_enh, text_q = out.extras["text_features_enhanced"], out.extras["text_features_query"]
    g = F.normalize(features.global_embedding, dim=-1)
    for name, text in (("enhanced", lambda i: text_enh[:, i]), ("query", lambda i: text_q.expand(3, 2, -1))):
        layer_maps = []
        for i, patches in enumerate(features.patch_embeddings):
            probs = ((F.normalize(patches, dim=-1) @ text(i).transpose(1, 2)) / 0.07).softmax(-1)  # [B, N, 2]
            grid_map = ((probs[..., 1] + 1 - probs[..., 0]) / 2).reshape(3, 1, 8, 8)
            layer_maps.append(F.interpolate(grid_map, size=(TINY_SIZE, TINY_SIZE), mode="bilinear",
                                            align_corners=False)[:, 0])
        torch.testing.assert_close(out.extras[f"{name}_layer_maps"], torch.stack(layer_maps, 1), atol=1e-5, rtol=0)
    scores_q = ((g @ text_q.T) / 0.07).softmax(-1)[:, 1]
    scores_e = ((torch.einsum("bd,bcd->bc", g, text_enh[:, -1])) / 0.07).softmax(-1)[:, 1]
    torch.testing.assert_close(out.extras["query_scores"], scores_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.extras["enhanced_scores"], scores_e, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.scores, 0.5 * scores_e + 0.5 * scores_q, atol=1e-6, rtol=0)


def test_enhanced_prompts_equal_the_prompt_learners_own_encoding(method, tiny_backbone, tiny_images):
    """The splice of context + visual term into the named prompts agrees with LearnedPromptText(context_shift=...)
    when the name is "object" (then the enhanced prompts have the query prompts' tokens)."""
    with torch.no_grad():
        visual = method.visual_prompts(method.image_features(tiny_images))  # [3, 4, 1, W]
        query, enhanced = method.encode_prompts(["object"] * 3, visual)
        torch.testing.assert_close(query, method.text(), atol=1e-5, rtol=0)
        for layer in range(4):
            torch.testing.assert_close(enhanced[:, layer], method.text(context_shift=visual[:, layer]),
                                       atol=1e-5, rtol=0)
        _, zero = method.encode_prompts(["object"], torch.zeros_like(visual[:1]))
        torch.testing.assert_close(zero[0], query.expand(4, -1, -1), atol=1e-5, rtol=0)


def test_context_positions_with_a_template_prefix(tiny_backbone, tiny_images):
    prefixed = build_method("genclip", backbone=tiny_backbone,
                            query_templates=("a photo of {} object.", "a photo of {} damaged object."),
                            enhanced_templates=("a photo of {} {name}.", "a photo of {} damaged {name}."))
    ids, positions = prefixed._name_tokens("metal nut")
    assert positions[0].tolist() == list(range(4, 16))  # start token, "a photo of", then the 12 context tokens
    with torch.no_grad():
        visual = prefixed.visual_prompts(prefixed.image_features(tiny_images[:1]))
        query, enhanced = prefixed.encode_prompts(["object"], torch.zeros_like(visual))
    torch.testing.assert_close(enhanced[0], query.expand(4, -1, -1), atol=1e-5, rtol=0)


def test_too_long_class_name_is_an_error(method, tiny_images):
    with pytest.raises(MethodError, match="does not fit"):
        method(tiny_images[:1], [" ".join(["bottle"] * 80)])


def test_inference_mode_evaluation_then_training(tiny_backbone, tiny_images):
    from zsadlib.evaluate import run_method

    fresh = build_method("genclip", backbone=tiny_backbone)
    run_method(fresh, tiny_images, ["zipper", "cable", "zipper"])  # caches the names' tokens in inference mode
    loss, _ = fresh.training_loss(tiny_images, _masks(), torch.tensor([1, 0, 1]), ["zipper", "cable", "zipper"])
    loss.backward()
    assert float(fresh.text.context.grad.abs().sum()) > 0


def test_query_branch_ignores_the_class_name(method, tiny_images):
    reference = method(tiny_images, None)
    for names in (["bottle", "screw", "pill"], ["pcb1", "macaroni2", "fryum"], ["metal_nut", "toothbrush", "x"]):
        out = method(tiny_images, names)
        for key in ("query_maps", "query_scores", "query_layer_maps", "text_features_query"):
            assert torch.equal(out.extras[key], reference.extras[key]), (names, key)
    # the vision-enhanced branch does see the name; filtered names all read "object"
    kept = method(tiny_images, ["bottle"] * 3)
    other = method(tiny_images, ["screw"] * 3)
    filtered = method(tiny_images, ["pcb1", "fryum", "chewinggum"])
    assert not torch.allclose(kept.extras["enhanced_maps"], other.extras["enhanced_maps"], atol=1e-5)
    assert torch.equal(filtered.extras["enhanced_maps"], reference.extras["enhanced_maps"])


def test_fusion_weight_and_branch_selection(tiny_backbone, method, tiny_images):
    names = ["bottle", "pcb1", "screw"]
    both = method(tiny_images, names)
    only_enhanced = _twin(tiny_backbone, method, fusion_weight=1.0)(tiny_images, names)
    only_query = _twin(tiny_backbone, method, fusion_weight=0.0)(tiny_images, names)
    assert torch.equal(only_enhanced.maps, both.extras["enhanced_maps"])
    assert torch.equal(only_enhanced.scores, both.extras["enhanced_scores"])
    assert torch.equal(only_query.maps, both.extras["query_maps"])
    assert torch.equal(only_query.scores, both.extras["query_scores"])
    assert not torch.allclose(both.extras["enhanced_maps"], both.extras["query_maps"], atol=1e-4)
    torch.testing.assert_close(both.maps, 0.5 * both.extras["enhanced_maps"] + 0.5 * both.extras["query_maps"])
    for branch in ("enhanced", "query"):
        selected = _twin(tiny_backbone, method, branch=branch)(tiny_images, names)
        assert torch.equal(selected.maps, both.extras[f"{branch}_maps"])
        assert torch.equal(selected.scores, both.extras[f"{branch}_scores"])
        assert torch.equal(selected.extras["layer_maps"], both.extras[f"{branch}_layer_maps"])


def test_mean_fusion_and_no_blur(tiny_backbone, method, tiny_images):
    out = _twin(tiny_backbone, method, layer_fusion="mean", blur_sigma=0.0, branch="query")(tiny_images)
    torch.testing.assert_close(out.maps, out.extras["query_layer_maps"].mean(dim=1))


def test_visual_prompts_depend_on_image_and_layer(method, tiny_images):
    out = method(tiny_images, ["bottle"] * 3)
    visual, text = out.extras["visual_prompts"], out.extras["text_features_enhanced"]  # [B, L, 1, W], [B, L, 2, D]
    for a, b in ((0, 1), (0, 2), (1, 2)):  # different images -> different visual terms and text, at every layer
        for layer in range(4):
            assert not torch.allclose(visual[a, layer], visual[b, layer], atol=1e-4)
            assert not torch.allclose(text[a, layer], text[b, layer], atol=1e-4)
    for layer in range(3):  # and every layer has its own
        assert not torch.allclose(text[:, layer], text[:, 3], atol=1e-4)
        assert not torch.allclose(out.extras["enhanced_layer_maps"][:, layer], out.extras["enhanced_layer_maps"][:, 3],
                                  atol=1e-4)


@pytest.mark.parametrize("per_prompt", [False, True])
def test_visual_prompts_and_enhanced_text_follow_the_formula(per_prompt, tiny_backbone, tiny_images):
    """MVP with fixed, distinct weights per layer against a plain computation written from the formula:
    V_l = fc2_l(act(fc1_l(mean_patches(normalize(P_l))))) from layer l's OWN patch tokens, split into P' rows of W
    (row 0 normal, row 1 abnormal with ``mvp_per_prompt``), and the enhanced text of layer l and prompt p = the text
    tower on "X ... X {name}." with the context tokens replaced by C_p + V_l[p]."""
    other = build_method("genclip", backbone=tiny_backbone, mvp_per_prompt=per_prompt, mvp_hidden=8, mvp_linear=False,
                         mvp_activation="gelu" if per_prompt else "relu", deep_prompts=not per_prompt)
    width, prompts = tiny_backbone.text_width, 2 if per_prompt else 1
    shapes = {k: tuple(v.shape) for k, v in other.learned_state_dict().items()}
    assert ("text.deep_prompts" in shapes) == (not per_prompt)
    assert shapes["mvp.0.fc1.weight"] == (8, tiny_backbone.embed_dim)
    assert shapes["mvp.3.fc2.weight"] == (prompts * width, 8)
    weights = []
    with torch.no_grad():
        for layer, mlp in enumerate(other.mvp):  # distinct weights per layer, large enough to matter
            generator = torch.Generator().manual_seed(1000 + layer)
            w1 = torch.randn(mlp.fc1.weight.shape, generator=generator) * (1 + layer)
            b1 = torch.randn(mlp.fc1.bias.shape, generator=generator)
            w2 = torch.randn(mlp.fc2.weight.shape, generator=generator) * 0.05
            b2 = torch.randn(mlp.fc2.bias.shape, generator=generator) * 0.05
            for param, value in zip((mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias), (w1, b1, w2, b2)):
                param.copy_(value)
            weights.append((w1, b1, w2, b2))
        out = other(tiny_images, ["bottle"] * 3)
        features = tiny_backbone.forward_features(tiny_images, layers=LAYERS, dense_from=6, global_ln_post=True)
        act = F.gelu if per_prompt else F.relu
        expected = []
        for (w1, b1, w2, b2), patches in zip(weights, features.patch_embeddings):
            pooled = F.normalize(patches, dim=-1).mean(dim=1)  # [B, D]
            expected.append((act(pooled @ w1.T + b1) @ w2.T + b2).reshape(3, prompts, width))
        expected = torch.stack(expected, dim=1)  # [B, L, P', W]
        visual = out.extras["visual_prompts"]
        assert visual.shape == (3, 4, prompts, width)
        torch.testing.assert_close(visual, expected, atol=1e-5, rtol=1e-5)
        for a in range(4):  # the layers' terms differ, so a swap of layers cannot pass
            for b in range(a):
                assert (expected[:, a] - expected[:, b]).abs().max() > 1e-2

        marker = int(tiny_backbone.tokenize(["X"])[0, 1])
        embedding = tiny_backbone.model.token_embedding
        text = out.extras["text_features_enhanced"]  # [B, L, 2, D]
        rows, row_ids, wanted = [], [], []
        for p, template in enumerate(("{} bottle.", "{} damaged bottle.")):
            ids = tiny_backbone.tokenize([template.replace("{}", " ".join(["X"] * other.text.n_ctx))])[0]
            spots = ids == marker
            assert int(spots.sum()) == other.text.n_ctx
            for image in (0, 2):
                for layer in range(4):
                    tokens = embedding(ids).clone()
                    tokens[spots] = other.text.context[p] + expected[image, layer, p if per_prompt else 0]
                    rows.append(tokens)
                    row_ids.append(ids)
                    wanted.append(text[image, layer, p])
        plain = F.normalize(other.text.encode(torch.stack(rows), torch.stack(row_ids)).float(), dim=-1)
        torch.testing.assert_close(torch.stack(wanted), plain, atol=1e-5, rtol=1e-5)


def test_batch_of_one_equals_batch_of_eight(method, images8):
    names = ["bottle", "pcb1", "screw", "metal_nut", "pill", "fryum", "wood", "carpet"]
    together = method(images8, names)
    for i in range(8):
        alone = method(images8[i:i + 1], names[i:i + 1])
        for key in ("fused_maps", "enhanced_maps", "query_maps"):
            torch.testing.assert_close(alone.extras[key], together.extras[key][i:i + 1], atol=1e-5, rtol=0)
        for key in ("fused_scores", "enhanced_scores", "query_scores"):
            torch.testing.assert_close(alone.extras[key], together.extras[key][i:i + 1], atol=1e-5, rtol=0)


def test_one_text_encoder_call_per_batch(method, tiny_images, monkeypatch):
    calls = []
    original = method.text.encode

    def counting(embeddings, token_ids):
        calls.append(tuple(embeddings.shape))
        return original(embeddings, token_ids)

    monkeypatch.setattr(method.text, "encode", counting)
    method(tiny_images, ["bottle", "pcb1", "screw"])
    assert len(calls) == 1 and calls[0][0] == 2 + 3 * 4 * 2  # query prompts + B x L x 2 enhanced prompts
    calls.clear()
    method.training_loss(tiny_images, _masks(), torch.tensor([1, 0, 1]), ["bottle", "pcb1", "screw"])
    assert len(calls) == 1


# ---- training --------------------------------------------------------------------------------------------------
def test_training_step_updates_learned_parameters_only(tiny_backbone, tiny_images):
    trained = build_method("genclip", backbone=tiny_backbone)
    frozen = {name: p.detach().clone() for name, p in tiny_backbone.named_parameters()}
    before = {name: p.detach().clone() for name, p in trained.learned_parameters().items()}
    assert {"text.context", "text.deep_prompts", "mvp.0.fc.weight", "mvp.3.fc.bias"} <= set(before)
    assert not any(name.startswith("backbone.") for name in before)
    optimizer = torch.optim.Adam(trained.parameter_groups(trained.config.lr), betas=trained.config.betas)
    loss, parts = trained.training_loss(tiny_images, _masks(), torch.tensor([1, 0, 1]), ["bottle", "pcb1", "screw"])
    assert set(parts) == {f"{b}_{p}" for b in ("enhanced", "query") for p in ("image_ce", "focal", "dice")}
    expected = sum(parts[f"{b}_image_ce"] + parts[f"{b}_focal"] + parts[f"{b}_dice"] for b in ("enhanced", "query"))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for name, parameter in trained.learned_parameters().items():
        assert not torch.equal(parameter, before[name]), name
    for name, parameter in tiny_backbone.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None and torch.equal(parameter, frozen[name]), name


def test_loss_weights_and_image_only_loss(tiny_backbone, method, tiny_images):
    labels, names = torch.tensor([1, 0, 1]), ["bottle", "pcb1", "screw"]
    weighted = _twin(tiny_backbone, method, query_loss_weight=0.0, pixel_loss_weight=2.0, image_loss_weight=0.5)
    with torch.no_grad():
        loss, parts = weighted.training_loss(tiny_images, _masks(), labels, names)
    expected = 0.5 * parts["enhanced_image_ce"] + 2.0 * (parts["enhanced_focal"] + parts["enhanced_dice"])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    loss, parts = method.training_loss(tiny_images, None, labels, names)
    assert set(parts) == {"enhanced_image_ce", "query_image_ce"}
    assert float(loss.detach()) == pytest.approx(parts["enhanced_image_ce"] + parts["query_image_ce"], rel=1e-5)
    loss.backward()  # the image terms alone reach the context and the MLPs
    assert float(method.text.context.grad.abs().sum()) > 0 and float(method.mvp[3].fc.weight.grad.abs().sum()) > 0
    method.zero_grad()
    with pytest.raises(MethodError, match="masks"):
        method.training_loss(tiny_images, torch.zeros(3, 56, 56), labels, names)


def test_learned_state_dict_round_trip(tiny_backbone, method, tiny_images):
    state = method.learned_state_dict()
    other = build_method("genclip", backbone=tiny_backbone, seed=7)
    assert not torch.equal(other.text.context, method.text.context)
    assert not torch.equal(other.mvp[0].fc.weight, method.mvp[0].fc.weight)
    other.load_learned_state_dict(state)
    assert all(torch.equal(other.learned_state_dict()[k], v) for k, v in state.items())
    names = ["bottle", "pcb1", "screw"]
    a, b = method(tiny_images, names), other(tiny_images, names)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)
    with pytest.raises(MethodError, match="shape mismatch"):
        build_method("genclip", backbone=tiny_backbone, mvp_per_prompt=True).load_learned_state_dict(state)
    with pytest.raises(MethodError, match="fc1"):  # the 2-layer MLP form does not take the linear form's weights
        build_method("genclip", backbone=tiny_backbone, mvp_linear=False).load_learned_state_dict(state)
    with pytest.raises(MethodError, match=r"unexpected \['text\.deep_prompts'\]"):
        build_method("genclip", backbone=tiny_backbone, deep_prompts=False).load_learned_state_dict(state)


def test_initialisation_is_seeded_and_leaves_the_global_rng(tiny_backbone):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a = build_method("genclip", backbone=tiny_backbone)
    after = torch.rand(3)
    b = build_method("genclip", backbone=tiny_backbone)
    assert torch.equal(after, expected)
    for name, value in a.learned_state_dict().items():
        assert torch.equal(value, b.learned_state_dict()[name]), name


# ---- learning with the training engine ---------------------------------------------------------------------------
def test_training_engine_learns_and_checkpoint_reloads(tiny_backbone, synthetic_root, tmp_path, record_property):
    """Train on three synthetic categories, look at four held-out ones.

    What the tiny random-weight backbone can show (measured before writing the bounds, seeds 0-4 and 111, this
    setup): the training objective generalises -- the loss on every held-out category drops after training, the
    mean over the four by 16-39 % (seed 111: 12.94 -> 10.81, x0.835) -- while held-out pixel AUROC does not move
    consistently (seed 111, fused: pill 0.92 -> 0.27, wood 0.54 -> 0.55, grid 0.21 -> 0.35, widget2 0.41 -> 0.34;
    other seeds go either way). Random features carry little defect information: a linear probe trained directly on
    the patch features reaches only ~0.65 pixel AUROC on held-out images. So the test asserts the loss drops and
    only records the AUROCs (``record_property``); real-weight numbers belong to the benchmark runs.
    """
    from zsadlib.data import collate_samples, open_dataset
    from zsadlib.metrics import auroc
    from zsadlib.train import TrainConfig, train

    def batch_of(dataset):
        return collate_samples([dataset[i] for i in range(len(dataset))])

    dataset = open_dataset("synthetic", synthetic_root, classes=["carpet", "bottle", "screw"], image_size=TINY_SIZE)
    dataset = dataset.subset(max_per_class=4, seed=0)
    held_out = {name: batch_of(open_dataset("synthetic", synthetic_root, classes=[name], image_size=TINY_SIZE)
                               .subset(max_per_class=8, seed=0))
                for name in ("pill", "wood", "grid", "widget2")}
    training_batch = batch_of(dataset)
    learner = build_method("genclip", backbone=tiny_backbone)

    def measure():
        losses, aurocs = {}, {}
        for name, batch in held_out.items():
            with torch.no_grad():
                losses[name] = float(learner.training_loss(batch.images, batch.masks, batch.labels,
                                                           list(batch.class_names))[0])
            maps = learner(batch.images, list(batch.class_names)).maps
            aurocs[name] = auroc(batch.masks.reshape(-1).numpy(), maps.reshape(-1).numpy())
        with torch.no_grad():
            train_loss = float(learner.training_loss(training_batch.images, training_batch.masks,
                                                     training_batch.labels, list(training_batch.class_names))[0])
        return losses, aurocs, train_loss

    losses_before, aurocs_before, train_before = measure()
    config = TrainConfig.from_method(learner, epochs=8, batch_size=6, lr=1e-2, checkpoint_every=None)
    assert (config.betas, config.seed) == ((0.5, 0.999), 111)  # taken from GenCLIPConfig
    result = train(learner, dataset, tmp_path / "run", config=config, progress=False)
    assert result.finished and result.step == 16
    assert set(result.history[0]["parts"]) == {f"{b}_{p}" for b in ("enhanced", "query")
                                               for p in ("image_ce", "focal", "dice")}
    losses_after, aurocs_after, train_after = measure()
    record_property("genclip_heldout_pixel_auroc", {"before": aurocs_before, "after": aurocs_after})
    record_property("genclip_heldout_loss", {"before": losses_before, "after": losses_after})

    assert train_after < 0.8 * train_before  # measured x0.61-0.65
    for name in held_out:  # the objective generalises to every unseen category...
        assert losses_after[name] < losses_before[name], name
    mean_before, mean_after = (sum(v.values()) / len(v) for v in (losses_before, losses_after))
    assert mean_after < 0.92 * mean_before  # ...by 16.5 % on average at seed 111
    for name in held_out:  # the recorded held-out AUROCs measure the trained prompts, not the initial ones
        assert aurocs_after[name] != aurocs_before[name], name

    reloaded = build_method("genclip", backbone=tiny_backbone)
    reloaded.load_checkpoint(str(tmp_path / "run"))
    for name, value in learner.learned_state_dict().items():
        assert torch.equal(reloaded.learned_state_dict()[name], value), name
    batch = held_out["pill"]
    torch.testing.assert_close(reloaded(batch.images, list(batch.class_names)).maps,
                               learner(batch.images, list(batch.class_names)).maps, atol=0, rtol=0)


def test_metrics_record_the_filter_outcome_of_the_evaluated_classes_only(tiny_backbone):
    method = build_method("genclip", backbone=tiny_backbone)
    method(torch.zeros(2, 3, 112, 112), ["pcb1", "bottle"])  # names seen earlier (e.g. in training)
    described = method.describe(["widget2", "screw"])["name_filter"]
    assert described["filtered"] == ["widget2"] and described["kept"] == ["screw"]
    assert "pcb1" in method.describe()["name_filter"]["filtered"]


# ---- the paper's choices and the journal's adaptive term alignment ------------------------------------------------
def test_linear_visual_prompts_follow_the_formula(tiny_backbone, tiny_images):
    """mvp_linear (default, the paper): V_l = W_l mean_patches(normalize(P_l)) + b_l, one Linear per layer, on
    layer l's own patch tokens."""
    other = build_method("genclip", backbone=tiny_backbone)
    width = tiny_backbone.text_width
    shapes = {k: tuple(v.shape) for k, v in other.learned_state_dict().items()}
    assert shapes["mvp.0.fc.weight"] == (width, tiny_backbone.embed_dim) and shapes["mvp.3.fc.bias"] == (width,)
    assert not any("fc1" in key or "fc2" in key for key in shapes)
    weights = []
    with torch.no_grad():
        for layer, linear in enumerate(other.mvp):
            generator = torch.Generator().manual_seed(2000 + layer)
            w = torch.randn(linear.fc.weight.shape, generator=generator) * (1 + layer)
            b = torch.randn(linear.fc.bias.shape, generator=generator)
            linear.fc.weight.copy_(w)
            linear.fc.bias.copy_(b)
            weights.append((w, b))
        out = other(tiny_images, ["bottle"] * 3)
        features = tiny_backbone.forward_features(tiny_images, layers=LAYERS, dense_from=6, global_ln_post=True)
    expected = torch.stack([(F.normalize(patches, dim=-1).mean(dim=1) @ w.T + b).reshape(3, 1, width)
                            for (w, b), patches in zip(weights, features.patch_embeddings)], dim=1)
    torch.testing.assert_close(out.extras["visual_prompts"], expected, atol=1e-5, rtol=1e-5)
    for a in range(4):
        for b in range(a):
            assert (expected[:, a] - expected[:, b]).abs().max() > 1e-2


def test_score_from_map_is_the_maximum_of_each_map(tiny_backbone, method, tiny_images):
    names = ["bottle", "pcb1", "screw"]
    base = method(tiny_images, names)
    other = _twin(tiny_backbone, method, score_from_map=True)
    out = other(tiny_images, names)
    torch.testing.assert_close(out.maps, base.maps)  # the maps do not change
    enhanced, query = base.extras["enhanced_maps"], base.extras["query_maps"]
    fused = 0.5 * enhanced + 0.5 * query
    for key, maps in (("enhanced_scores", enhanced), ("query_scores", query), ("fused_scores", fused)):
        expected = torch.tensor([float(maps[i].max()) for i in range(3)])
        torch.testing.assert_close(out.extras[key], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.scores, out.extras["fused_scores"], atol=0, rtol=0)
    assert not torch.allclose(out.scores, base.scores, atol=1e-3)


def test_soft_term_alignment_mixes_named_and_replaced_text(tiny_backbone, method, tiny_images):
    """A filtered name is down-weighted, not replaced: w = words / BPE tokens ("pcb1" -> pcb + 1 = 1/2,
    "pipe_fryum" -> pipe + fr + yum = 2/3), text = normalize(w n(T[name]) + (1 - w) n(T["object"]))."""
    from zsadlib.prompts.filtering import split_words, word_tokens

    names = ["bottle", "pcb1", "pipe_fryum"]
    expected_weights = [1.0, 1 / 2, 2 / 3]
    assert [len(split_words(n)) / sum(len(word_tokens(w)) for w in split_words(n)) for n in names][1:] == \
        pytest.approx(expected_weights[1:])
    soft = _twin(tiny_backbone, method, soft_term_alignment=True)
    out = soft(tiny_images, names)
    torch.testing.assert_close(out.extras["term_weights"], torch.tensor(expected_weights))
    assert out.extras["prompt_names"] == ["bottle", "pcb1", "pipe fryum"]
    with torch.no_grad():
        features = soft.image_features(tiny_images)
        visual = soft.visual_prompts(features)
        _, named = soft.encode_prompts(["bottle", "pcb1", "pipe fryum"], visual)
        _, replaced = soft.encode_prompts(["object"] * 3, visual)
    named, replaced = F.normalize(named, dim=-1), F.normalize(replaced, dim=-1)
    w = torch.tensor(expected_weights).view(3, 1, 1, 1)
    expected = F.normalize(w * named + (1 - w) * replaced, dim=-1)
    torch.testing.assert_close(out.extras["text_features_enhanced"], expected, atol=1e-5, rtol=1e-5)
    # a kept name keeps its text; the replacement mode ("object") differs from the soft one for filtered names
    hard = method(tiny_images, names)
    torch.testing.assert_close(out.extras["text_features_enhanced"][0], hard.extras["text_features_enhanced"][0],
                               atol=1e-5, rtol=1e-5)
    for i in (1, 2):
        assert not torch.allclose(out.extras["text_features_enhanced"][i], hard.extras["text_features_enhanced"][i],
                                  atol=1e-4)
    torch.testing.assert_close(out.extras["query_scores"], hard.extras["query_scores"])  # query branch untouched
    loss, _ = soft.training_loss(tiny_images, _masks(), torch.tensor([1, 0, 1]), names)  # differentiable
    loss.backward()
    assert float(soft.mvp[0].fc.weight.grad.abs().sum()) > 0
