"""ViP2-CLIP equals the authors' code (kim0806/ViP2-CLIP @ 4b5884f) within 1e-5 on the tiny-ref CLIP.

The fixtures (tests/fixtures/vip2clip_init.npz, vip2clip_trained.npz) were written by
``python -m tools.reference_fixtures vip2clip --ref PATH``, which runs the authors' own test.py and train.py (see
tools/reference_fixtures/vip2clip.py for what was stood in for). Here the reference's learned weights are loaded
into zsadlib's method through its reference-checkpoint path, and every recorded array is compared.
"""
import numpy as np
import pytest
import torch

from zsadlib.methods import MethodError, build_method
from zsadlib.methods.vip2clip import convert_reference_state_dict

from .reference import load_fixture, max_abs_diff
from .reference import backbone, images  # noqa: F401 (fixtures)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def init_fixture():
    return load_fixture("vip2clip_init")


@pytest.fixture(scope="module")
def trained_fixture():
    return load_fixture("vip2clip_trained")


def _checkpoint(arrays: dict, prefix: str) -> dict:
    """{"prompt_learner": ..., "Zero_try": ...} from the fixture arrays stored under ``prefix/``."""
    out = {"prompt_learner": {}, "Zero_try": {}}
    for key, value in arrays.items():
        if key.startswith(prefix + "/"):
            _, part, name = key.split("/", 2)
            out[part][name] = torch.from_numpy(np.array(value))
    return out


def _method(backbone, meta, **overrides):
    return build_method("vip2clip", backbone=backbone, meta_hidden=meta["settings"]["meta_hidden"], **overrides)


def _compare(method, images, arrays) -> dict[str, float]:
    out = method(images)
    diffs = {
        "scores": max_abs_diff(out.scores, arrays["scores"]),
        "maps": max_abs_diff(out.maps, arrays["maps"]),
        "global_features": max_abs_diff(out.extras["global_features"], arrays["global_features"]),
        "text_features": max_abs_diff(out.extras["text_features"], arrays["text_features"]),
        "layer_text_features": max_abs_diff(out.extras["layer_text_features"], arrays["layer_text_features"]),
    }
    diffs["topk_indices"] = 0.0 if np.array_equal(out.extras["topk_indices"].numpy(), arrays["topk_indices"]) else 1.0
    return diffs


def test_fixtures_document_the_reference(init_fixture, trained_fixture):
    for arrays, meta in (init_fixture, trained_fixture):
        assert meta["reference"] == "kim0806/ViP2-CLIP" and meta["reference_commit"].startswith("4b5884f")
        assert meta["settings"]["features_list"] == [6, 12, 18, 24] and meta["settings"]["topk"] == 50
        assert arrays["maps"].shape == (2, meta["image_size"], meta["image_size"])
    assert trained_fixture[1]["settings"]["fgp_qk_scale"] == 30.0


def test_reference_checkpoint_file_loads_and_outputs_equal(backbone, images, init_fixture, tmp_path):
    """The constructor-initialised ICA + FGP (every key of the reference's checkpoint, buffers included) saved as a
    .pth file, loaded by path: FGP attention is nearly uniform, so all maps are ~0.5 (wiring + format check)."""
    arrays, meta = init_fixture
    path = tmp_path / "epoch_10.pth"
    torch.save(_checkpoint(arrays, "ckpt"), path)
    method = _method(backbone, meta)
    method.load_reference_checkpoint(path)
    diffs = _compare(method, images, arrays)
    assert max(diffs.values()) < TOLERANCE, diffs


def test_trained_big_fgp_outputs_equal(backbone, images, trained_fixture):
    """train.py's weights after 5 steps from FGP q/k x 30: attention far from uniform, maps far from 0.5."""
    arrays, meta = trained_fixture
    assert arrays["maps"].max() - arrays["maps"].min() > 0.1  # the variant is not a near-constant map
    method = _method(backbone, meta)
    method.load_reference_state(_checkpoint(arrays, "final"))
    diffs = _compare(method, images, arrays)
    assert max(diffs.values()) < TOLERANCE, diffs


def _trained_init_method(backbone, init_fixture, trained_fixture):
    """Our method holding what train.py started from: the init checkpoint, FGP q/k weights and biases x 30."""
    arrays, meta = init_fixture
    method = _method(backbone, meta)
    method.load_reference_state(_checkpoint(arrays, "ckpt"))
    scale = trained_fixture[1]["settings"]["fgp_qk_scale"]
    with torch.no_grad():
        for linear in (method.fgp[0].q_proj, method.fgp[0].k_proj):
            linear.weight.mul_(scale)
            linear.bias.mul_(scale)
    return method


def test_training_loss_and_five_adam_steps_equal_train_py(backbone, images, init_fixture, trained_fixture):
    arrays, meta = trained_fixture
    method = _trained_init_method(backbone, init_fixture, trained_fixture)
    masks = torch.from_numpy(arrays["train_masks"])
    labels = torch.from_numpy(arrays["train_labels"])
    config = method.config
    features = method.image_features(images)  # frozen and gradient-free: computed once for the 5 steps
    method.image_features = lambda _images: features
    optimizer = torch.optim.Adam(method.parameter_groups(config.lr), lr=config.lr, betas=config.betas)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-5]
    method.train()
    for step in range(meta["settings"]["epochs"]):
        loss, parts = method.training_loss(images, masks, labels)
        if step == 0:
            assert abs(parts["focal"] - float(arrays["loss_focal"].sum())) < TOLERANCE
            assert abs(parts["dice"] - float(arrays["loss_dice"].sum())) < TOLERANCE
            assert abs(parts["image_ce"] - float(arrays["loss_image_ce"])) < TOLERANCE
            total = float(arrays["loss_focal"].sum() + arrays["loss_dice"].sum() + arrays["loss_image_ce"])
            assert abs(float(loss.detach()) - total) < TOLERANCE
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = convert_reference_state_dict(_checkpoint(arrays, "final"))
    ours = method.learned_state_dict()
    assert sorted(ours) == sorted(final)
    for key, value in final.items():
        if key == "fgp.0.k_proj.bias":
            # softmax over patches ignores a per-query constant, so this gradient is exactly 0 in exact arithmetic;
            # Adam turns each side's float noise into steps of up to lr: bound by steps x fgp_lr
            bound = meta["settings"]["epochs"] * config.fgp_lr + TOLERANCE
            assert max_abs_diff(ours[key], value) < bound, key
        else:
            assert max_abs_diff(ours[key], value) < TOLERANCE, key


@pytest.mark.parametrize("quirk", [{"normal_prompt_damaged": False}, {"fgp_scaled": True},
                                   {"global_ln_post": True}])
def test_each_quirk_default_is_what_the_reference_does(backbone, images, trained_fixture, quirk):
    """Flipping any quirk field moves the outputs away from the reference (so the defaults are pinned)."""
    arrays, meta = trained_fixture
    method = _method(backbone, meta, **quirk)
    method.load_reference_state(_checkpoint(arrays, "final"))
    diffs = _compare(method, images, arrays)
    assert max(diffs["maps"], diffs["scores"], diffs["layer_text_features"]) > 1e-3, (quirk, diffs)


def test_unshared_fgp_with_copies_of_the_shared_weights_equals_the_reference(backbone, images, trained_fixture):
    arrays, meta = trained_fixture
    method = _method(backbone, meta, fgp_shared=False)
    with pytest.raises(MethodError, match="fgp_shared"):
        method.load_reference_state(_checkpoint(arrays, "final"))
    method.load_learned_state_dict(convert_reference_state_dict(_checkpoint(arrays, "final"), fgp_copies=4))
    diffs = _compare(method, images, arrays)
    assert max(diffs.values()) < TOLERANCE, diffs


def test_reference_checkpoint_is_loaded_strictly(backbone, init_fixture):
    arrays, meta = init_fixture
    method = _method(backbone, meta)
    checkpoint = _checkpoint(arrays, "ckpt")
    missing = {"prompt_learner": dict(checkpoint["prompt_learner"]), "Zero_try": dict(checkpoint["Zero_try"])}
    del missing["Zero_try"]["v_proj_pre_1.bias"]
    with pytest.raises(MethodError, match="v_proj"):
        method.load_reference_state(missing)
    extra = {"prompt_learner": dict(checkpoint["prompt_learner"], surprise=torch.zeros(1)),
             "Zero_try": checkpoint["Zero_try"]}
    with pytest.raises(MethodError, match="surprise"):
        method.load_reference_state(extra)
    wrong_ids = {"prompt_learner": dict(checkpoint["prompt_learner"]), "Zero_try": checkpoint["Zero_try"]}
    wrong_ids["prompt_learner"]["tokenized_prompts_pos"] = checkpoint["prompt_learner"]["tokenized_prompts_neg"]
    with pytest.raises(MethodError, match="tokenized_prompts_pos"):
        method.load_reference_state(wrong_ids)
    with pytest.raises(MethodError):  # another n_ctx: the stored token ids (and shapes) do not fit
        _method(backbone, meta, n_ctx=9).load_reference_state(checkpoint)
    with pytest.raises(MethodError, match="prompt_learner"):
        method.load_reference_state({"Zero_try": checkpoint["Zero_try"]})
