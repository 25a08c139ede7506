"""AnomalyCLIP fixtures from the authors' code: ``python -m tools.reference_fixtures anomalyclip --ref PATH``.

PATH is a checkout of https://github.com/zqhang/AnomalyCLIP (fixtures written at 45ed4dd, its latest commit).
Nothing of it is copied here: its modules are imported from PATH and its own ``train.train(args)`` and
``test.test(args)`` run end to end, fed through small stand-ins for the parts that need data, a GPU or the
ViT-L/14@336px download. What each stand-in replaces (all undone when this module's ``main`` returns, except
the stub modules, which only exist in this process):

* ``AnomalyCLIP_lib.load("ViT-L/14@336px", ...)`` -> the same ``load`` on a temporary file holding
  :func:`reference_state_dict` (``tiny-ref``), so their ``build_model`` / ``.float()`` path runs unchanged;
  during that call ``torch.jit.load`` raises at once: ``load`` first tries the file as a TorchScript archive
  (the OpenAI download is one) and, on failure, re-reads the *same* file handle as a state dict, which only
  works if the failed attempt did not move the handle;
* ``Dataset`` / ``get_transform`` of train.py and test.py -> an in-memory dataset of :func:`reference_images`
  (already "preprocessed": tensors at 240 px) with a fixed mask and labels;
* ``torch.Tensor.cuda`` -> identity while train.py runs on a CPU-only machine (train.py calls
  ``label.long().cuda()`` unconditionally);
* stub modules for imports that the code paths run here never use: ``thop`` (``from thop import profile`` in
  AnomalyCLIP_lib/AnomalyCLIP.py), ``cv2`` (visualization.py, whose call is commented out in test.py),
  ``tabulate`` (the final results table) and ``pkg_resources`` (only ``pkg_resources.packaging``, removed
  from recent setuptools; the stub hands out the real ``packaging``);
* recorders (call the original, keep a copy of what passes): ``model.encode_image`` (global and per-layer
  patch embeddings), ``AnomalyCLIP_lib.compute_similarity`` (normalised text features, per-layer patch
  probabilities), test.py's ``gaussian_filter`` (the final maps), test.py's
  ``image_level_metrics`` (its ``results``: image scores; returns 0 instead of an AUROC),
  train.py's ``FocalLoss`` / ``BinaryDiceLoss`` / ``F.cross_entropy`` (loss terms),
  ``torch.Tensor.backward`` (the total that train.py backpropagates, and the prompt learner's gradients
  right after it) and ``AnomalyCLIP_PromptLearner`` (its state right after construction).

Per variant (``features_list`` [24] as in the released train.sh / test.sh, and [6, 12, 18, 24], the paper's
layers and the argparse default), train.py runs one epoch over one batch (the 2 images, batch size 2,
lr 1e-3, seed 111, ``lam = 4`` as written in train.py) from the prompt learner that train.py initialises; the
checkpoint it saves (``epoch_1.pth``) is then what test.py loads, and test.py runs on the same 2 images.
At 45ed4dd the taps are ``.clone()``d (upstream fix 2a7c886, 2025-04-13), so layers 6/12/18/24 are four
different layers: zsadlib's ``layers=PAPER_LAYERS`` with the default ``layer_fusion="sum"`` and
``pixel_loss_weight=4`` (this script checks that the taps differ).

Written: tests/fixtures/anomalyclip_released.npz and anomalyclip_paper.npz (float32; ~1.8 MB together): text
features, global embedding, per-layer patch embeddings (class token first) and patch probabilities, image
scores, final maps, the prompt learner before / after the step (without the unused
``compound_prompt_projections``, kept as shapes), the training batch's masks / labels, loss terms and
gradients. Arrays that do not depend on the variant are stored in the released file only (``meta.settings.
shared_with``). The run is deterministic: regenerating gives identical arrays.
"""
from __future__ import annotations

import argparse
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from .common import (REF_IMAGE_SIZE, Patches, image_set, load_script, pkg_resources_stub, reference_state_dict,
                     stub_modules, use_checkout, write)

REPOSITORY = "zqhang/AnomalyCLIP"
COMMIT = "45ed4dd"
SEED = 111  # train.py / test.py --seed
DESIGN = {"n_ctx": 12, "depth": 9, "t_n_ctx": 4}  # test.sh / train.sh: --n_ctx 12 --depth 9 --t_n_ctx 4
VARIANTS = {"released": [24], "paper": [6, 12, 18, 24]}
SHARED = ("patch_embeddings/", "global_embedding", "init_state/", "train_masks", "train_labels")
LABELS = (1, 0)  # image 0 anomalous (with the mask below), image 1 normal (empty mask)


def fixed_masks(size: int = REF_IMAGE_SIZE) -> torch.Tensor:
    """[2, 1, S, S] float masks: a rectangle plus a disc on image 0, nothing on image 1."""
    masks = torch.zeros(2, 1, size, size)
    masks[0, 0, size // 4: size // 2, size // 3: (5 * size) // 6] = 1.0
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks[0, 0][((yy - 0.7 * size) ** 2 + (xx - 0.3 * size) ** 2) < (0.12 * size) ** 2] = 1.0
    return masks


_ImageSet = image_set(fixed_masks, LABELS, cls_id=0)  # what train.py / test.py read from their Dataset


def _stub_unused_modules() -> None:
    stub_modules({"thop": {"profile": None}, "cv2": {}, "tabulate": {"tabulate": lambda *a, **k: ""},
                  **pkg_resources_stub()})


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return [_clone(v) for v in value]
    return value


def run_variant(checkout: Path, features_list: list[int], workdir: Path,
                keep_buffers: bool = True) -> tuple[dict, dict]:
    """Run train.py (one step) then test.py on the reference images; returns (arrays, recorded settings)."""
    import AnomalyCLIP_lib
    import prompt_ensemble

    train_py, test_py = load_script(checkout, "train", "anomalyclip"), load_script(checkout, "test", "anomalyclip")
    weights = workdir / "tiny_ref_openai.pt"
    torch.save(reference_state_dict(), weights)
    record: dict[str, list] = {key: [] for key in ("encode_image", "similarity", "blur_out", "results",
                                                   "focal", "dice", "image_ce", "total", "grads", "init_state")}
    learners = []
    patches = Patches()
    original_load = AnomalyCLIP_lib.load
    original_compute_similarity = AnomalyCLIP_lib.compute_similarity
    original_backward = torch.Tensor.backward

    def load(name, device="cpu", design_details=None, **kwargs):
        assert name == "ViT-L/14@336px", name
        jit_load = torch.jit.load

        def not_torchscript(*args, **kw):
            raise RuntimeError("not a TorchScript archive (a plain state dict)")

        torch.jit.load = not_torchscript
        try:
            model, preprocess = original_load(str(weights), device=device, design_details=design_details, **kwargs)
        finally:
            torch.jit.load = jit_load
        encode_image = model.encode_image

        def recording_encode_image(*args, **kw):
            out = encode_image(*args, **kw)
            record["encode_image"].append(_clone(out))
            return out

        model.encode_image = recording_encode_image
        return model, preprocess

    def compute_similarity(image_features, text_features, *args, **kwargs):
        out = original_compute_similarity(image_features, text_features, *args, **kwargs)
        record["similarity"].append((_clone(text_features), _clone(out[0])))
        return out

    def gaussian_filter(array, *args, **kwargs):
        out = test_py.gaussian_filter.__wrapped_original__(array, *args, **kwargs)
        record["blur_out"].append(np.array(out, copy=True))
        return out

    gaussian_filter.__wrapped_original__ = test_py.gaussian_filter

    def image_level_metrics(results, obj, metric):
        record["results"].append({key: _clone(value) for key, value in results[obj].items()})
        return 0.0

    class PromptLearner(prompt_ensemble.AnomalyCLIP_PromptLearner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record["init_state"].append({k: v.detach().clone() for k, v in self.state_dict().items()})
            learners.append(self)

    class FocalLoss(train_py.FocalLoss):
        def forward(self, *args):
            out = super().forward(*args)
            record["focal"].append(float(out.detach()))
            return out

    class BinaryDiceLoss(train_py.BinaryDiceLoss):
        def forward(self, *args):
            out = super().forward(*args)
            record["dice"].append(float(out.detach()))
            return out

    functional = types.SimpleNamespace(**{k: getattr(torch.nn.functional, k) for k in dir(torch.nn.functional)
                                          if not k.startswith("__")})

    def cross_entropy(*args, **kwargs):
        out = torch.nn.functional.cross_entropy(*args, **kwargs)
        record["image_ce"].append(float(out.detach()))
        return out

    functional.cross_entropy = cross_entropy

    def backward(self, *args, **kwargs):
        record["total"].append(float(self.detach()))
        original_backward(self, *args, **kwargs)
        learner = learners[-1]
        record["grads"].append({name: p.grad.detach().clone() for name, p in learner.named_parameters()
                                if p.grad is not None})

    try:
        patches.set(AnomalyCLIP_lib, "load", load)
        patches.set(AnomalyCLIP_lib, "compute_similarity", compute_similarity)
        for script in (train_py, test_py):
            patches.set(script, "Dataset", _ImageSet)
            patches.set(script, "get_transform", lambda args: (None, None))
            patches.set(script, "AnomalyCLIP_PromptLearner", PromptLearner)
        patches.set(train_py, "FocalLoss", FocalLoss)
        patches.set(train_py, "BinaryDiceLoss", BinaryDiceLoss)
        patches.set(train_py, "F", functional)
        patches.set(test_py, "gaussian_filter", gaussian_filter)
        patches.set(test_py, "image_level_metrics", image_level_metrics)
        patches.set(torch.Tensor, "backward", backward)
        if not torch.cuda.is_available():
            patches.set(torch.Tensor, "cuda", lambda self, *a, **k: self)

        common = dict(dataset="reference", depth=DESIGN["depth"], n_ctx=DESIGN["n_ctx"], t_n_ctx=DESIGN["t_n_ctx"],
                      feature_map_layer=[0, 1, 2, 3], features_list=list(features_list), image_size=REF_IMAGE_SIZE,
                      seed=SEED)
        train_dir = workdir / "train"
        train_args = argparse.Namespace(train_data_path="unused", save_path=str(train_dir), epoch=1,
                                        learning_rate=0.001, batch_size=2, print_freq=1, save_freq=1, **common)
        train_py.setup_seed(train_args.seed)  # what train.py's __main__ does before train(args)
        train_py.train(train_args)
        n_train_calls = len(record["encode_image"])
        checkpoint = train_dir / "epoch_1.pth"
        test_args = argparse.Namespace(data_path="unused", save_path=str(workdir / "test"),
                                       checkpoint_path=str(checkpoint), metrics="image-level", sigma=4, **common)
        n_train_similarity = len(record["similarity"])
        test_py.setup_seed(test_args.seed)  # test.py's __main__
        test_py.test(test_args)
    finally:
        patches.undo()

    n_layers = len(features_list)
    assert n_train_calls == 1 and len(record["total"]) == 1, "expected one training step"
    assert len(record["focal"]) == n_layers and len(record["dice"]) == 2 * n_layers
    test_encodes = record["encode_image"][n_train_calls:]
    test_similarity = record["similarity"][n_train_similarity:]
    n_images = len(test_encodes)
    assert n_images == 2 and len(test_similarity) == n_images * n_layers and len(record["blur_out"]) == n_images

    trained = torch.load(checkpoint, map_location="cpu", weights_only=True)["prompt_learner"]
    text = test_similarity[0][0]
    assert all(torch.equal(t, text) for t, _ in test_similarity)
    global_embedding = torch.cat([g for g, _ in test_encodes])  # [2, D], test.py: batch size 1
    patches_per_layer = [torch.cat([p[layer] for _, p in test_encodes]) for layer in range(n_layers)]  # [2,1+N,D]
    probabilities = [torch.cat([test_similarity[i * n_layers + layer][1] for i in range(n_images)])
                     for layer in range(n_layers)]  # [2, 1+N, 2]
    if n_layers > 1:
        gaps = [float((patches_per_layer[i] - patches_per_layer[-1]).abs().max()) for i in range(n_layers - 1)]
        assert min(gaps) > 1e-3, f"taps alias the last layer at this commit? max gaps {gaps}"
    results = record["results"][-1]

    arrays = {
        "text_features": text,  # [2, D] normalised (normal, anomalous), test.py text_features[0]
        "global_embedding": global_embedding,  # encode_image's first output (class token @ proj, no ln_post)
        "image_scores": torch.stack([torch.as_tensor(s) for s in results["pr_sp"]]),  # test.py text_probs[:, 0, 1]
        "maps": np.stack(record["blur_out"]),  # [2, S, S] after gaussian_filter(sigma=4)
        # train images = reference_images() (not stored: seeded), masks stored as bool (compress to nothing)
        "train_masks": fixed_masks()[:, 0] > 0.5,
        "train_labels": torch.tensor(LABELS),
        "train_loss": torch.tensor(record["total"][0], dtype=torch.float64),  # loss + image_loss, as backpropagated
        "train_image_ce": torch.tensor(record["image_ce"][0], dtype=torch.float64),
        "train_focal": torch.tensor(sum(record["focal"]), dtype=torch.float64),  # sum over layers
        "train_dice": torch.tensor(sum(record["dice"]), dtype=torch.float64),  # both dice terms, sum over layers
    }
    for layer, (patch, prob) in zip(features_list, zip(patches_per_layer, probabilities)):
        arrays[f"patch_embeddings/{layer}"] = patch  # [2, 1 + N, D], class token first
        arrays[f"patch_probabilities/{layer}"] = prob  # [2, 1 + N, 2] softmax(cos / 0.07)
    # the prompt learner before (train step input) and after one Adam step (= the checkpoint test.py loads);
    # the unused compound_prompt_projections (8 x Linear(W, 896), ~3.7 MB) are kept as shapes only; the
    # buffers (token embeddings and ids of the two prompts, the same for every variant) in one file only
    projections = {}
    for prefix, state in (("init_state", record["init_state"][0]), ("trained_state", trained)):
        for key, value in state.items():
            if key.startswith("compound_prompt_projections."):
                projections[key] = list(value.shape)
            elif not key.startswith(("token_", "tokenized_")) or (keep_buffers and prefix == "trained_state"):
                arrays[f"{prefix}/{key}"] = value
    for key, value in record["grads"][0].items():
        if not key.startswith("compound_prompt_projections."):
            arrays[f"train_grads/{key}"] = value
    pixel = record["total"][0] - record["image_ce"][0]
    settings = {
        "features_list": list(features_list),
        "design_details": {"Prompt_length": DESIGN["n_ctx"], "learnabel_text_embedding_depth": DESIGN["depth"],
                           "learnabel_text_embedding_length": DESIGN["t_n_ctx"]},
        "DPAM_layer": 20,
        "sigma": 4,
        "image_size": REF_IMAGE_SIZE,
        "train": {"epoch": 1, "batch_size": 2, "learning_rate": 0.001, "seed": SEED, "labels": list(LABELS),
                  "lam_measured": pixel / (sum(record["focal"]) + sum(record["dice"]))},
        "test": {"batch_size": 1, "seed": SEED},
        "compound_prompt_projections_shapes": projections,
    }
    return arrays, settings


def main(ref_path: str) -> None:
    checkout = use_checkout(ref_path)
    _stub_unused_modules()
    first: dict = {}
    for name, features_list in VARIANTS.items():
        with tempfile.TemporaryDirectory() as folder:
            arrays, settings = run_variant(checkout, features_list, Path(folder), keep_buffers=not first)
        if first:
            # arrays that do not depend on the variant (the frozen image tower's outputs at the layers both
            # variants tap, the prompt learner before training, the masks) are stored once, in the first file;
            # the tests read them from there (checked identical here, keeps the fixtures under 2 MB)
            shared = sorted(key for key in arrays if key in first and key.startswith(SHARED)
                            and np.array_equal(np.asarray(first[key]), np.asarray(arrays[key])))
            settings["shared_with"] = {"fixture": f"anomalyclip_{next(iter(VARIANTS))}", "keys": shared}
            arrays = {key: value for key, value in arrays.items() if key not in shared}
        else:
            first = arrays
        write(f"anomalyclip_{name}", arrays, checkout, REPOSITORY, COMMIT, settings)
        print(f"  train loss {float(arrays['train_loss']):.6f} (lam measured {settings['train']['lam_measured']:.4f})")
