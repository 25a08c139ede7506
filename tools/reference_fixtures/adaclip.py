"""AdaCLIP fixtures from the authors' code: ``python -m tools.reference_fixtures adaclip --ref PATH``.

PATH is a checkout of https://github.com/caoyunkang/AdaCLIP (fixtures written at e27ee32). Nothing of it is copied
here: its ``method`` package (``AdaCLIP_Trainer``, ``AdaCLIP``, ``custom_clip``) and ``loss.py`` are imported from
PATH, and their trainer is built with train.py's defaults (prompting depth 4, length 5, type SD, branch VL, HSF with
20 clusters, lr 0.01, features n_layers // 4 x (1, 2, 3, 4) = 6/12/18/24) on the ``tiny-ref`` CLIP
(tests/reference.py) at 240 px. train.py itself is not run (it needs the datasets and tensorboard); its loop body is
``AdaCLIP_Trainer.train_one_batch``, which is called here, batch size 1 as train.py requires.

Stand-ins, all undone when ``main`` returns (except the stub modules, which only exist in this process):

* ``custom_clip.get_model_config`` -> the tiny-ref config (``create_model`` then sets its image size to 240 and
  resizes the positional embedding with their bicubic ``resize_pos_embed``, as for ViT-L at 518);
* ``custom_clip.load_openai_model`` -> their ``build_model_from_openai_state_dict`` on :func:`reference_state_dict`,
  with the exact float32 values loaded again afterwards (their builder rounds Linear weights to float16 first: the
  OpenAI release files ARE float16, the random tiny-ref weights are not);
* the model name passed is "ViT-tiny-ref" (``create_model`` accepts only names containing "ViT");
* their BPE vocabulary ``method/bpe_simple_vocab_16e6.txt.gz`` is a Git LFS pointer in the snapshot: while they
  run, ``gzip.open`` of it reads open_clip's copy of the same OpenAI vocabulary file;
* their top-level ``tools`` package (metrics, plots, tensorboard; clashes with this repository's ``tools``) -> a
  stand-in holding the three names trainer.py imports, used by nothing here; ``cv2`` and ``pkg_resources`` stubs;
* ``torch.Tensor.norm`` -> the norm of a copy: their ``x /= x.norm(...)`` (class token, patch tokens, sentence
  embeddings) overwrites what the norm's backward needs, which fails outside CUDA autocast (there the norm runs on a
  float32 copy of the float16 tensor); the copy gives the same values and lets the backward run in float32 here;
* k-means: HSF calls sklearn ``KMeans`` with NumPy's global RNG; ``np.random.seed(KMEANS_SEED)`` before every
  single-image forward gives the clustering zsadlib's ``kmeans_seed=KMEANS_SEED`` draws.

The learned parameters start from zsadlib's seeded initialisation (``build_method("adaclip", seed=INIT_SEED)`` on
the same backbone), mapped to their names and loaded into their model (every learned key of theirs must be set),
with the dynamic prompt generators' weights x DYNAMIC_SCALE so that the image-dependent prompts matter. Recorded:

``init/*``: per image (batch 1, class "object"), their ``clip_model(image, cls, aggregation=True)``: ``scores`` [2],
    ``maps`` [2, 240, 240] after scipy ``gaussian_filter(sigma=4)`` (trainer.evaluation; at init every
    INIT_MAP_STRIDE-th pixel per axis, [2, 120, 120], to keep the file under 2 MB), and from inside the
    forward ``text_features`` [2, 2, D], ``global_features`` [2, D] (proj_cls_tokens), ``image_features`` [2, D]
    (after HSF);
``loss`` [STEPS]: ``train_one_batch`` on images 0, 1, 0, ... (labels 1, 0; the mask of image 0, an empty one);
``grad/<their key>``: the gradients of the first step (GRADIENT_KEYS), read right before ``optimizer.step``;
``final/<their key>``: their ``AdaCLIP_Trainer.save`` state after the steps (the checkpoint format);
``trained/*``: the same outputs as ``init/*`` after the steps.
Settings also hold their learned keys and shapes here and their learned parameters' shapes and count at ViT-L-14-336
(their AdaCLIP built on the meta device from model_configs/ViT-L-14-336.json).
"""
from __future__ import annotations

import copy
import gzip
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from .common import (REF_IMAGE_SIZE, Patches, pkg_resources_stub, reference_images, reference_state_dict,
                     stub_modules, use_checkout, write)

REPOSITORY = "caoyunkang/AdaCLIP"
COMMIT = "e27ee32"
LAYERS = [6, 12, 18, 24]
DEPTH, LENGTH, K_CLUSTERS, LR = 4, 5, 20, 0.01  # train.py defaults
KMEANS_SEED = 0
INIT_SEED = 7
DYNAMIC_SCALE = 20.0
STEPS = 3
LABELS = (1, 0)
INIT_MAP_STRIDE = 2  # init/maps keeps every 2nd pixel of each axis (the blurred maps are smooth); trained/maps all
# gradients of the first step kept in the fixture (< 2 MB): every learned tensor but the dynamic generators' and the
# global projection's weights, whose batch-1 gradients are outer products of their (kept) bias gradients and input
GRADIENT_KEYS = tuple(f"clip_model.{name}" for name in (
    "text_prompter.", "visual_prompter.", "patch_token_layer.", "cls_token_layer.head.0.bias",
    "dynamic_visual_prompt_generator.head.0.bias", "dynamic_visual_prompt_generator.head.1.bias",
    "dynamic_visual_prompt_generator.head.2.bias", "dynamic_visual_prompt_generator.head.3.bias",
    "dynamic_visual_prompt_generator.head.4.bias", "dynamic_text_prompt_generator.head.0.bias",
    "dynamic_text_prompt_generator.head.1.bias", "dynamic_text_prompt_generator.head.2.bias",
    "dynamic_text_prompt_generator.head.3.bias", "dynamic_text_prompt_generator.head.4.bias"))
CLASS = "object"
SIGMA = 4


def fixed_masks(size: int = REF_IMAGE_SIZE) -> torch.Tensor:
    """[2, 1, S, S]: an off-centre rectangle on image 0, nothing on image 1."""
    masks = torch.zeros(2, 1, size, size)
    masks[0, 0, size // 5: size // 2, size // 4: (3 * size) // 5] = 1.0
    return masks


def our_init_state() -> dict[str, torch.Tensor]:
    """zsadlib's seeded initial learned state on tiny-ref with the dynamic generators' weights x DYNAMIC_SCALE (also
    rebuilt by tests/test_adaclip_reference.py)."""
    from tests.reference import reference_backbone
    from zsadlib.methods import build_method

    method = build_method("adaclip", backbone=reference_backbone(pos_embed_resize="bicubic"), seed=INIT_SEED)
    state = {key: value.clone() for key, value in method.learned_state_dict().items()}
    for key in state:
        if key.startswith(("dynamic_visual.", "dynamic_text.")) and key.endswith(".weight"):
            state[key] = state[key] * DYNAMIC_SCALE
    return state


def _theirs_from_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from zsadlib.methods.adaclip import _REFERENCE_NAMES

    out = {}
    for key, value in state.items():
        for theirs, ours in _REFERENCE_NAMES:
            if key.startswith(ours):
                out["clip_model." + theirs + key[len(ours):]] = value
                break
        else:
            raise KeyError(key)
    return out


def _bpe_file(path):
    """Their BPE vocabulary is a Git LFS pointer in the repository: read open_clip's copy of the same OpenAI file."""
    path = Path(path)
    if path.name == "bpe_simple_vocab_16e6.txt.gz" and path.read_bytes()[:2] != b"\x1f\x8b":
        import open_clip

        return Path(open_clip.__file__).parent / path.name
    return path


class _Reference:
    def __init__(self, checkout: Path, workdir: Path):
        stub_modules({"cv2": {}, **pkg_resources_stub()})
        ours = sys.modules.get("tools")
        stand_in = types.ModuleType("tools")
        stand_in.visualization = types.SimpleNamespace()
        stand_in.calculate_metric = stand_in.calculate_average_metric = None
        sys.modules["tools"] = stand_in
        self.patches = Patches()
        open_gzip = gzip.open
        self.patches.set(gzip, "open", lambda path, *args, **kwargs: open_gzip(_bpe_file(path), *args, **kwargs))
        try:
            import method
            from method import adaclip as adaclip_module
            from method import custom_clip, trainer
        finally:
            sys.modules["tools"] = ours
        for module in (method, custom_clip, trainer):
            assert str(Path(module.__file__).resolve()).startswith(str(checkout)), module.__file__
        self.checkout, self.custom_clip, self.trainer, self.adaclip = checkout, custom_clip, trainer, adaclip_module
        self.state = reference_state_dict()
        self.config = json.loads((Path(__file__).resolve().parents[2] / "zsadlib" / "model_configs"
                                  / "tiny-ref.json").read_text())
        reference = self

        def get_model_config(name):
            return copy.deepcopy(reference.config)

        def load_openai_model(name, precision=None, device=None, jit=True, cache_dir=None):
            model = custom_clip.build_model_from_openai_state_dict(dict(reference.state), cast_dtype=None).float()
            model.load_state_dict(reference.state)  # undo the builder's float16 rounding of the random weights
            return model.to(device)

        norm = torch.Tensor.norm
        self.patches.set(torch.Tensor, "norm", lambda tensor, *args, **kwargs: norm(tensor.clone(), *args, **kwargs))
        self.patches.set(custom_clip, "get_model_config", get_model_config)
        self.patches.set(custom_clip, "load_openai_model", load_openai_model)
        self.workdir = workdir

    def close(self):
        self.patches.undo()

    def build(self, init: dict[str, torch.Tensor]):
        width = int(self.config["vision_cfg"]["width"])
        model = self.trainer.AdaCLIP_Trainer(
            backbone="ViT-tiny-ref", feat_list=LAYERS, input_dim=width, output_dim=int(self.config["embed_dim"]),
            learning_rate=LR, device="cpu", image_size=REF_IMAGE_SIZE, prompting_depth=DEPTH,
            prompting_length=LENGTH, prompting_branch="VL", prompting_type="SD", use_hsf=True, k_clusters=K_CLUSTERS)
        learned = {key for key in model.state_dict() if any(n in key for n in model.learnable_paramter_list)}
        theirs = _theirs_from_ours(init)
        assert set(theirs) == learned, sorted(learned ^ set(theirs))
        missing, unexpected = model.load_state_dict(theirs, strict=False)
        assert not unexpected and not set(missing) & learned
        return model

    def run_test(self, model) -> dict[str, torch.Tensor]:
        from scipy.ndimage import gaussian_filter

        clip_model = model.clip_model
        record = {"text": [], "global": [], "image": []}
        original_similarity = clip_model.visual_text_similarity

        def similarity(image_feature, patch_token, text_feature, aggregation):
            record["global"].append(image_feature.detach().clone())
            record["text"].append(text_feature.detach().clone())
            original_hsf = clip_model.HSF.forward

            def hsf(patch_tokens, anomaly_maps):
                out = original_hsf(patch_tokens, anomaly_maps)
                record["image"].append(torch.nn.functional.normalize(
                    0.2 * out + 0.8 * image_feature.detach(), dim=1))
                return out

            clip_model.HSF.forward = hsf
            try:
                return original_similarity(image_feature, patch_token, text_feature, aggregation)
            finally:
                del clip_model.HSF.forward

        clip_model.visual_text_similarity = similarity
        clip_model.eval()
        scores, maps = [], []
        try:
            with torch.no_grad():
                for image in reference_images():
                    np.random.seed(KMEANS_SEED)
                    anomaly_map, score = clip_model(image[None], [CLASS], aggregation=True)
                    maps.append(torch.from_numpy(gaussian_filter(anomaly_map[0].numpy(), sigma=SIGMA)))
                    scores.append(score[0])
        finally:
            del clip_model.visual_text_similarity
        return {"scores": torch.stack(scores), "maps": torch.stack(maps),
                "text_features": torch.cat(record["text"]).transpose(1, 2),  # [B, D, 2] -> [B, 2, D]
                "global_features": torch.cat(record["global"]), "image_features": torch.cat(record["image"])}

    def run_train(self, model) -> tuple[list[float], dict[str, torch.Tensor]]:
        """STEPS of train_one_batch; (losses, the first step's gradients of GRADIENT_KEYS)."""
        images, masks = reference_images(), fixed_masks()
        losses, gradients = [], {}
        step_optimizer = model.optimizer.step

        def step_recording(*args, **kwargs):
            if not gradients:
                for name, parameter in model.named_parameters():
                    if parameter.grad is not None and name.startswith(GRADIENT_KEYS):
                        gradients[name] = parameter.grad.detach().clone()
            return step_optimizer(*args, **kwargs)

        model.optimizer.step = step_recording
        for step in range(STEPS):
            index = step % 2
            np.random.seed(KMEANS_SEED)
            items = {"img": images[index][None], "cls_name": [CLASS], "img_mask": masks[index][None].clone(),
                     "anomaly": torch.tensor([LABELS[index]])}
            losses.append(float(model.train_one_batch(items).detach()))
        del model.optimizer.step
        return losses, gradients

    def saved_state(self, model) -> dict[str, torch.Tensor]:
        path = self.workdir / "adaclip.pth"
        model.save(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)

    def vit_l_shapes(self) -> dict[str, list[int]]:
        """Their learned parameters' shapes at ViT-L-14-336 (their CLIP from model_configs, on the meta device)."""
        config = json.loads((self.checkout / "model_configs" / "ViT-L-14-336.json").read_text())
        with torch.device("meta"):
            clip = self.custom_clip.CLIP(**config)
            model = self.adaclip.AdaCLIP(freeze_clip=clip, text_channel=config["embed_dim"],
                                         visual_channel=config["vision_cfg"]["width"], prompting_length=LENGTH,
                                         prompting_depth=DEPTH, prompting_branch="VL", prompting_type="SD",
                                         use_hsf=True, k_clusters=K_CLUSTERS, output_layers=LAYERS, device="meta",
                                         image_size=518)
        learnable = ("text_prompter", "visual_prompter", "patch_token_layer", "cls_token_layer",
                     "dynamic_visual_prompt_generator", "dynamic_text_prompt_generator")  # trainer.py's list
        return {name: list(p.shape) for name, p in model.named_parameters() if any(n in name for n in learnable)}


def main(ref_path: str) -> None:
    checkout = use_checkout(ref_path)
    torch.manual_seed(111)
    with tempfile.TemporaryDirectory() as folder:
        reference = _Reference(checkout, Path(folder))
        try:
            model = reference.build(our_init_state())
            arrays = {f"init/{key}": value for key, value in reference.run_test(model).items()}
            arrays["init/maps"] = arrays["init/maps"][:, ::INIT_MAP_STRIDE, ::INIT_MAP_STRIDE]  # < 2 MB in all
            keys = {key: list(value.shape) for key, value in reference.saved_state(model).items()}
            model.clip_model.train()
            losses, gradients = reference.run_train(model)
            arrays.update({f"grad/{key}": value for key, value in gradients.items()})
            arrays.update({f"trained/{key}": value for key, value in reference.run_test(model).items()})
            arrays.update({f"final/{key}": value for key, value in reference.saved_state(model).items()})
            arrays.update({"loss": torch.tensor(losses), "train_masks": fixed_masks()[:, 0],
                           "train_labels": torch.tensor(LABELS)})
            vit_l_shapes = reference.vit_l_shapes()
            settings = {"features_list": LAYERS, "prompting_depth": DEPTH, "prompting_length": LENGTH,
                        "prompting_type": "SD", "prompting_branch": "VL", "k_clusters": K_CLUSTERS, "lr": LR,
                        "betas": [0.5, 0.999], "optimizer": "AdamW (weight decay 0.01)", "steps": STEPS,
                        "batch_size": 1, "kmeans_seed": KMEANS_SEED, "init_seed": INIT_SEED,
                        "dynamic_scale": DYNAMIC_SCALE, "init_map_stride": INIT_MAP_STRIDE, "class_name": CLASS,
                        "labels": list(LABELS), "sigma": SIGMA,
                        "pos_embed_resize": "bicubic", "reference_learned_keys": keys,
                        "vit_l_14_336_learned_shapes": vit_l_shapes,
                        "vit_l_14_336_learned_parameters": sum(int(np.prod(shape)) for shape in vit_l_shapes.values())}
            write("adaclip_reference", arrays, checkout, REPOSITORY, COMMIT, settings)
        finally:
            reference.close()
