"""zsadlib's AnomalyCLIP equals the authors' code (zqhang/AnomalyCLIP @ 45ed4dd) on identical random weights.

The fixtures tests/fixtures/anomalyclip_{released,paper}.npz were written by the authors' own ``train.py`` (one
step) and ``test.py`` run on the ``tiny-ref`` CLIP of tests/reference.py at 240 px (non-native: the bilinear
pos-embed resize runs), see ``python -m tools.reference_fixtures anomalyclip --ref PATH``. Here zsadlib builds
the same model from the same state dict, loads the reference prompt-learner checkpoint through
:meth:`AnomalyCLIP.load_reference_checkpoint`, and every stored array must match within ``TOL`` (max abs diff;
for the gradients, of order 10, ``TOL`` times their scale, and for the deep-prompt gradients, which the
reference rounds to float16, up to rare float16 rounding flips).
Variants: ``released`` = ``features_list 24`` (train.sh / test.sh), ``paper`` = layers 6/12/18/24 (at 45ed4dd
the taps no longer alias, so this is ``layers=PAPER_LAYERS`` with the default sum fusion and lambda 4).
Run with ``-s`` to see the measured differences.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zsadlib.methods.anomalyclip import PAPER_LAYERS, RELEASED_LAYERS, AnomalyCLIP, AnomalyCLIPConfig, \
    convert_reference_state_dict

from .reference import REF_IMAGE_SIZE, REF_MODEL, load_fixture, max_abs_diff, reference_images
from .reference import backbone, images  # noqa: F401 (fixtures)

TOL = 1e-5
COMMIT = "45ed4dd"
VARIANTS = {"released": RELEASED_LAYERS, "paper": PAPER_LAYERS}


def check(name: str, ours, theirs, tol: float = TOL, scaled: bool = False) -> float:
    """max |ours - theirs| <= tol; ``scaled``: tol times max(1, max |theirs|) (gradients, of order 10)."""
    diff = max_abs_diff(ours, theirs)
    if scaled:
        tol = tol * max(1.0, float(np.abs(np.asarray(theirs)).max()))
    print(f"  {name}: max abs diff {diff:.3g} (tol {tol:.3g})")
    assert diff <= tol, f"{name}: max abs diff {diff:.3g} > {tol:g} from the reference"
    return diff


def check_fp16_rounded(name: str, ours, theirs, max_flips: float = 0.01) -> None:
    """Gradients that the reference rounds to float16 (deep prompts, see zsadlib.prompts.learned): float32 noise
    of ~1e-6 flips an entry's float16 rounding now and then, by one float16 step (2^-11 relative). Every entry
    within the scaled TOL except at most ``max_flips`` of them, and those within two float16 steps of the
    array's scale. (Rounding the gradient sum once instead of each copy, zsadlib's old code, misses 35-60%.)"""
    ours = ours.detach().cpu().float().numpy()
    theirs = np.asarray(theirs, dtype=np.float32)
    assert ours.shape == theirs.shape
    scale = max(1.0, float(np.abs(theirs).max()))
    diff = np.abs(ours - theirs)
    flips = diff > TOL * scale
    print(f"  {name}: max abs diff {diff.max():.3g}; {int(flips.sum())} of {diff.size} entries beyond "
          f"{TOL * scale:.3g} (float16 rounding flips)")
    assert flips.mean() <= max_flips, f"{name}: {flips.mean():.1%} of the entries differ from the reference"
    assert diff.max() <= 2 * 2.0 ** -10 * scale, f"{name}: max abs diff {diff.max():.3g}, beyond float16 rounding"


def _fixture(variant: str) -> tuple[dict, dict]:
    """Arrays of the variant, completed with the variant-independent ones stored in the first fixture."""
    arrays, meta = load_fixture(f"anomalyclip_{variant}")
    shared = meta["settings"].get("shared_with")
    if shared:
        first, _ = load_fixture(shared["fixture"])
        arrays.update({key: first[key] for key in shared["keys"]})
    return arrays, meta


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def reference(variant):
    return _fixture(variant)


def build(backbone, variant: str, **changes) -> AnomalyCLIP:
    config = AnomalyCLIPConfig(backbone=REF_MODEL, pretrained=None, image_size=REF_IMAGE_SIZE,
                               layers=VARIANTS[variant], **changes)
    return AnomalyCLIP(config, backbone).eval()


def reference_checkpoint(arrays: dict, meta: dict, prefix: str, folder) -> str:
    """Rebuild the authors' checkpoint file ``{"prompt_learner": state}``: the stored parameters, plus the
    unused ``compound_prompt_projections`` (stored as shapes only) filled with zeros."""
    state = {key.split("/", 1)[1]: torch.from_numpy(value) for key, value in arrays.items()
             if key.startswith(prefix + "/")}
    for key, shape in meta["settings"]["compound_prompt_projections_shapes"].items():
        state[key] = torch.zeros(shape)
    path = folder / f"{prefix}.pth"
    torch.save({"prompt_learner": state}, path)
    return str(path)


@pytest.fixture(scope="module")
def trained(backbone, variant, reference, tmp_path_factory):
    """zsadlib's AnomalyCLIP holding the checkpoint that the reference test.py loaded."""
    arrays, meta = reference
    method = build(backbone, variant)
    method.load_reference_checkpoint(reference_checkpoint(arrays, meta, "trained_state", tmp_path_factory.mktemp("ck")))
    return method


def test_fixture_provenance(reference, variant):
    arrays, meta = reference
    assert meta["reference"] == "zqhang/AnomalyCLIP" and meta["reference_commit"].startswith(COMMIT)
    assert meta["model"] == REF_MODEL and meta["image_size"] == REF_IMAGE_SIZE
    settings = meta["settings"]
    assert tuple(settings["features_list"]) == VARIANTS[variant]
    assert settings["DPAM_layer"] == 20 and settings["sigma"] == 4
    assert settings["design_details"] == {"Prompt_length": 12, "learnabel_text_embedding_depth": 9,
                                          "learnabel_text_embedding_length": 4}
    assert abs(settings["train"]["lam_measured"] - 4.0) < 1e-4  # train.py's lam, as measured in the run
    assert sorted(key.split("/")[1] for key in arrays if key.startswith("patch_embeddings/")) == \
        sorted(str(layer) for layer in VARIANTS[variant])


def test_prompt_tokens_match(backbone, tmp_path):
    """Token ids and frozen token embeddings of the two prompts == the reference prompt learner's buffers."""
    arrays, _ = _fixture("released")
    method = build(backbone, "released")
    ids = torch.from_numpy(arrays["trained_state/tokenized_prompts_pos"]).reshape(1, -1)
    ids = torch.cat([ids, torch.from_numpy(arrays["trained_state/tokenized_prompts_neg"]).reshape(1, -1)])
    assert torch.equal(method.text.token_ids.long().cpu(), ids.long())
    with torch.no_grad():
        embeddings = method.text.prompt_embeddings()  # [2, 77, W], context at positions 1..12
    n_ctx = method.config.n_ctx
    for row, name in enumerate(("pos", "neg")):
        check(f"token_prefix_{name}", embeddings[row, :1], arrays[f"trained_state/token_prefix_{name}"].reshape(1, -1))
        suffix = arrays[f"trained_state/token_suffix_{name}"]
        check(f"token_suffix_{name}", embeddings[row, 1 + n_ctx:], suffix.reshape(suffix.shape[-2:]))


def test_checkpoint_conversion(trained, reference):
    """load_reference_checkpoint puts ctx_pos / ctx_neg / compound_prompts_text.* where they belong."""
    arrays, _ = reference
    state = trained.learned_state_dict()
    check("text.context[normal]", state["text.context"][0], arrays["trained_state/ctx_pos"].reshape(12, -1), tol=0)
    check("text.context[anomalous]", state["text.context"][1], arrays["trained_state/ctx_neg"].reshape(12, -1), tol=0)
    for i, deep in enumerate(state["text.deep_prompts"]):
        check(f"text.deep_prompts[{i}]", deep, arrays[f"trained_state/compound_prompts_text.{i}"], tol=0)


def test_text_features(trained, reference):
    arrays, _ = reference
    with torch.no_grad():
        check("text_features", trained.text_features(), arrays["text_features"])


def test_image_features(trained, reference, images):
    """Global embedding (class token @ proj, no ln_post) and per-layer patch embeddings (dense V-V path)."""
    arrays, _ = reference
    features = trained.image_features(images)
    check("global_embedding", features.global_embedding, arrays["global_embedding"])
    for layer, patches in zip(trained.layers, features.patch_embeddings):
        check(f"patch_embeddings/{layer}", patches, arrays[f"patch_embeddings/{layer}"][:, 1:])  # drop class token


def test_patch_probabilities(trained, reference, images):
    arrays, _ = reference
    with torch.no_grad():
        text = trained.text_features()
        probabilities = trained.layer_probabilities(trained.image_features(images), text)
    for layer, probs in zip(trained.layers, probabilities):
        check(f"patch_probabilities/{layer}", probs, arrays[f"patch_probabilities/{layer}"][:, 1:])


def test_scores_and_maps(trained, reference, images):
    """test.py's text_probs[:, 0, 1] and its anomaly maps (sum over layers, gaussian_filter sigma 4)."""
    arrays, _ = reference
    out = trained(images)
    check("image_scores", out.scores, arrays["image_scores"])
    check("maps", out.maps, arrays["maps"])


def test_training_loss_and_gradients(backbone, variant, reference, images, tmp_path):
    """train.py's loss on one batch (lam * sum_layers(focal + 2 dice) + image CE) and its gradients with respect
    to the prompt learner, from the state train.py initialised."""
    arrays, meta = reference
    method = build(backbone, variant).train()
    method.load_reference_checkpoint(reference_checkpoint(arrays, meta, "init_state", tmp_path))
    masks = torch.from_numpy(arrays["train_masks"])
    labels = torch.from_numpy(arrays["train_labels"])
    loss, parts = method.training_loss(images, masks, labels)
    check("train_loss", loss, arrays["train_loss"])
    check("train_image_ce", torch.tensor(parts["image_ce"]), arrays["train_image_ce"])
    check("train_focal", torch.tensor(parts["focal"]), arrays["train_focal"])
    check("train_dice", torch.tensor(parts["dice"]), arrays["train_dice"])
    method.zero_grad()
    loss.backward()
    theirs = convert_reference_state_dict({key.split("/", 1)[1]: torch.from_numpy(value)
                                           for key, value in arrays.items() if key.startswith("train_grads/")})
    params = method.learned_parameters()
    check("grad text.context", params["text.context"].grad, theirs["text.context"], scaled=True)
    check_fp16_rounded("grad text.deep_prompts", params["text.deep_prompts"].grad, theirs["text.deep_prompts"])


@pytest.mark.parametrize("change, array", [
    ({"global_ln_post": True}, "image_scores"),
    ({"deep_depth": 1}, "text_features"),
    ({"dpam_layer": 1}, "maps"),
    ({"layer_fusion": "mean"}, "maps"),
    ({"blur_sigma": 0.0}, "maps"),
])
def test_fixtures_catch_deviations(backbone, change, array, tmp_path):
    """The comparison has teeth: a config that departs from the reference code misses the paper-variant fixture
    by far more than TOL (``layer_fusion`` only matters with several layers)."""
    arrays, meta = _fixture("paper")
    method = build(backbone, "paper", **change)
    if "deep_depth" not in change:
        method.load_reference_checkpoint(reference_checkpoint(arrays, meta, "trained_state", tmp_path))
    else:  # no deep prompts: load the context only
        state = convert_reference_state_dict({key.split("/", 1)[1]: torch.from_numpy(value)
                                              for key, value in arrays.items() if key.startswith("trained_state/")})
        method.load_learned_state_dict({"text.context": state["text.context"]})
    out = method(reference_images())
    ours = {"image_scores": out.scores, "maps": out.maps, "text_features": out.extras["text_features"]}[array]
    assert max_abs_diff(ours, arrays[array]) > 100 * TOL
