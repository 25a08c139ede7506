"""Crane fixtures: the authors' code (AlirezaSalehy/Crane at 39181f9) on the seeded tiny-ref CLIP.

    python -m tools.reference_fixtures crane --ref /path/to/Crane [--dinov2 /path/to/dinov2]

Their modules are imported from the checkout; modules their scripts import but this path never runs (cv2,
albumentations, torchmetrics, tabulate, termcolor, humanhash) get stand-ins. Inference is their test.py
``ScoreCalculator`` + scipy ``gaussian_filter`` exactly as ``process_dataset`` runs it; the training loss is their
train.py batch step (prompt learner with context guidance, similarity maps, FocalLoss/BinaryDiceLoss, score-based
pooling), called piece by piece because train.py keeps it inside ``train()``.

Variants written to tests/fixtures/crane_reference.npz (prefix per variant):

* ``crane/``: reproduce.sh's Crane: E-Attn qq+kk+vv on blocks 6..24, features 6/12/18/24, soft_mean True, as
  released (aliased taps);
* ``unaliased/``: the same with each E-Attn block given a copy of its refined-path input (a wrapper around their
  block ``forward``), so that the in-place residual update no longer reaches earlier taps;
* ``plus/`` (with ``--dinov2``): Crane+ as test.sh runs it (features 24, D-Attn with E-Attn, soft_mean False), the
  second backbone a tiny DINOv2-with-registers built from the facebookresearch/dinov2 code; at batch 2 (their batch
  mean) and each image alone (batch 1);
* ``train/`` and ``plus_train/``: one training loss on a fixed batch and mask.

Geometry note: custom_attn computes the CLIP token grid as ``image_size // 14`` (ViT-L/14 hard-coded); tiny-ref has
patch 16 at 240 px (15 x 15), so the model's ``design_details['others'].image_size`` is 15 * 14 = 210 while test.py's
upsampling size (its module-level ``args.image_size``) stays 240.
"""
from __future__ import annotations

import argparse
import copy
import sys

import numpy as np
import torch

from .common import (REF_IMAGE_SIZE, checkout_commit, load_script, pkg_resources_stub, reference_images,
                     reference_state_dict, stub_modules, use_checkout, write)

REPOSITORY = "AlirezaSalehy/Crane"
COMMIT = "39181f9"
PROMPT_SEED = 5  # seeds their PromptLearner's random initialisation
DINO = dict(img_size=REF_IMAGE_SIZE, patch_size=12, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4,
            num_register_tokens=4, init_values=1.0, block_chunks=0, interpolate_antialias=True,
            interpolate_offset=0.0, ffn_layer="mlp")  # dinov2_vitb14_reg's kwargs at a tiny size (20 x 20 grid)


def _args(**changes) -> argparse.Namespace:
    """test.py / train.py argparse defaults that the model and prompt learner read."""
    values = dict(image_size=REF_IMAGE_SIZE, features_list=[6, 12, 18, 24], soft_mean=True, sigma=4,
                  dino_model="none", both_eattn_dattn=True, use_scorebase_pooling=True, attn_type="qq+kk+vv",
                  train_with_img_cls_prob=0.0, train_with_img_cls_type="pad_suffix", n_ctx=12, depth=9, t_n_ctx=4,
                  interpolation="nearest")
    values.update(changes)
    return argparse.Namespace(**values)


def _build(args, model_image_size=None):
    from models.build_model import build_model

    others = copy.copy(args)
    if model_image_size is not None:
        others.image_size = model_image_size
    details = {"Prompt_length": args.n_ctx, "learnabel_text_embedding_depth": args.depth,
               "learnabel_text_embedding_length": args.t_n_ctx, "others": others}
    model = build_model("tiny-ref", reference_state_dict(), details).float().eval()
    model.visual.replace_with_EAttn(to_layer=20, type=args.attn_type)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, details


def _prompt_learner(model, details):
    from models.prompt_ensemble import PromptLearner

    torch.manual_seed(PROMPT_SEED)
    return PromptLearner(model, details)


def _unalias(model) -> None:
    """Give every E-Attn block a copy of its refined-path input: their in-place ``x += x_res`` then changes the copy,
    not the tensor an earlier tap holds."""
    from models.Crane import SelfCorAttention

    for block in model.visual.transformer.resblocks:
        if isinstance(block.attn, SelfCorAttention):
            original = block.forward

            def forward(x, _original=original):
                if isinstance(x, list):
                    x = [x[0].clone(), x[1]]
                return _original(x)

            block.forward = forward


def _tiny_dinov2(dinov2_path: str):
    """A seeded tiny DinoVisionTransformer from the dinov2 checkout, every norm and layer scale randomised."""
    sys.path.insert(0, dinov2_path)
    from dinov2.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(7)
    model = DinoVisionTransformer(**DINO).eval()
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "norm" in name or ".ls" in name:
                base = 1.0 if name.endswith(("weight", "gamma")) else 0.0
                tensor.copy_(base + 0.2 * torch.randn(tensor.shape, generator=generator))
    return model


def _static_text(model, prompt_learner):
    import torch.nn.functional as F

    prompts, tokenized, deep, _ = prompt_learner()
    text = model.encode_text_learn(prompts, tokenized, deep).float()
    text = torch.stack(torch.chunk(text, dim=0, chunks=2), dim=1)
    return F.normalize(text, dim=-1)


def _infer(test_module, model, prompt_learner, args, images) -> dict:
    """test.py's process_dataset on one batch: ScoreCalculator + gaussian_filter."""
    from scipy.ndimage import gaussian_filter
    from models import Crane

    test_module.args = args  # ScoreCalculator.forward reads the module-level args for the upsampling size
    calculator = test_module.ScoreCalculator(model, None, args, prompt_learner=prompt_learner,
                                             score_base_pooling=Crane.ScoreBasePooling())
    calculator.text_features = _static_text(model, prompt_learner)
    calculator.eval()
    with torch.no_grad():
        scores, maps = calculator(images)
    blurred = np.stack([gaussian_filter(m, sigma=args.sigma) for m in maps.detach().cpu().numpy()])
    with torch.no_grad():
        global_features, patches = model.encode_image(images, args.features_list, self_cor_attn_layers=20)
    # patch tokens: the first 16 patches of the first image of every entry (proof enough, and small)
    return {"scores": scores, "maps": blurred, "text": calculator.text_features[0], "global": global_features,
            "patches": torch.stack(patches)[:, 0, :16]}


def _train_loss(model, prompt_learner, args, images, masks, labels) -> dict:
    """One batch of train.py's loop (without the optimiser step)."""
    import torch.nn.functional as F
    from models import Crane
    from utils.loss import BinaryDiceLoss, FocalLoss
    from utils.similarity import calc_similarity_logits, regrid_upsample

    with torch.no_grad():
        image_features, patch_features = model.encode_image(images, args.features_list, self_cor_attn_layers=20)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    patch_features = torch.stack([p / p.norm(dim=-1, keepdim=True) for p in patch_features], dim=0)
    prompts, tokenized, deep, guided = prompt_learner(img_emb=image_features)
    assert guided
    text_normal = model.encode_text_learn(prompts[0], tokenized[0], deep)
    text_anomalous = model.encode_text_learn(prompts[1], tokenized[1], deep)
    text = F.normalize(torch.stack([text_normal, text_anomalous], dim=1), dim=-1).float()
    maps = []
    for patch in patch_features:
        logits = calc_similarity_logits(patch, text, temp=0.07)
        maps.append((regrid_upsample(logits.softmax(dim=-1), args.image_size, mode=args.interpolation), logits))
    focal, dice = 0, 0
    for similarity, _ in maps:
        whole = (1 - similarity[..., 0] + similarity[..., 1]) / 2
        dice += BinaryDiceLoss()(whole, masks)
        focal += FocalLoss()(similarity.permute(0, 3, 1, 2), masks)
    pooled = Crane.ScoreBasePooling().forward(patch_features, [logits for _, logits in maps])
    image = F.normalize(0.5 * pooled + 0.5 * image_features, dim=1)
    image_ce = F.cross_entropy(calc_similarity_logits(image, text, temp=0.01), labels.long())
    loss = 2 * focal + 2 * dice + 0.2 * image_ce
    return {"loss": loss.detach(), "focal": focal.detach(), "dice": dice.detach(), "image_ce": image_ce.detach(),
            "text": text.detach()}


def main(ref: str, dinov2: str | None = None) -> None:
    checkout = use_checkout(ref)
    stub_modules({"cv2": {}, "albumentations": {}, "torchmetrics": {"AUROC": None, "AveragePrecision": None},
                  "tabulate": {"tabulate": lambda *a, **k: ""}, "termcolor": {"colored": lambda text, *a, **k: text},
                  "humanhash": {}, **pkg_resources_stub()})
    test_module = load_script(checkout, "test", "crane")
    images = reference_images()
    masks = torch.zeros(2, REF_IMAGE_SIZE, REF_IMAGE_SIZE)
    masks[1, 60:140, 90:200] = 1.0
    labels = torch.tensor([0.0, 1.0])
    arrays: dict = {}

    args = _args()
    model, details = _build(args)
    learner = _prompt_learner(model, details)
    for key, value in learner.state_dict().items():
        if key.startswith(("ctx_", "compound_prompts_text")):
            arrays[f"state/{key}"] = value
    arrays.update({f"crane/{k}": v for k, v in _infer(test_module, model, learner, args, images).items()})

    train_args = _args(train_with_img_cls_prob=1.0)
    train_model, train_details = _build(train_args)
    train_learner = _prompt_learner(train_model, train_details)
    train_learner.load_state_dict(learner.state_dict())
    arrays.update({f"train/{k}": v for k, v in
                   _train_loss(train_model, train_learner, train_args, images, masks, labels).items()})

    unaliased, _ = _build(args)
    _unalias(unaliased)
    arrays.update({f"unaliased/{k}": v for k, v in _infer(test_module, unaliased, learner, args, images).items()})

    settings = {"crane": "features 6 12 18 24, qq+kk+vv, soft_mean True, sigma 4, static prompts",
                "unaliased": "as crane, each E-Attn block given a copy of its refined input",
                "train": "train.py step: prob 1 pad_suffix guidance, nearest maps, 2 focal + 2 dice + 0.2 CE(t=0.01)",
                "prompt_seed": PROMPT_SEED}
    if dinov2:
        dino = _tiny_dinov2(dinov2)
        grid = REF_IMAGE_SIZE // 16
        plus_args = _args(features_list=[24], soft_mean=False, dino_model="dinov2")
        plus, plus_details = _build(plus_args, model_image_size=grid * 14)
        plus.vfm, plus.vfm_model = dino, "dinov2"
        arrays.update({f"plus/{k}": v for k, v in _infer(test_module, plus, learner, plus_args, images).items()})
        for index in range(images.shape[0]):
            single = _infer(test_module, plus, learner, plus_args, images[index:index + 1])
            arrays[f"plus_single/maps_{index}"] = single["maps"]
            arrays[f"plus_single/scores_{index}"] = single["scores"]
        plus_train_args = _args(features_list=[24], dino_model="dinov2", train_with_img_cls_prob=1.0)
        plus_train, plus_train_details = _build(plus_train_args, model_image_size=grid * 14)
        plus_train.vfm, plus_train.vfm_model = dino, "dinov2"
        plus_learner = _prompt_learner(plus_train, plus_train_details)
        plus_learner.load_state_dict(learner.state_dict())
        arrays.update({f"plus_train/{k}": v for k, v in
                       _train_loss(plus_train, plus_learner, plus_train_args, images, masks, labels).items()})
        for key, value in dino.state_dict().items():
            arrays[f"dino_state/{key}"] = value
        settings.update({"plus": "test.sh Crane+: features 24, D-Attn + E-Attn, soft_mean False, batch 2",
                         "plus_single": "plus, each image alone (batch 1)", "dino": DINO,
                         "dinov2_commit": checkout_commit(__import__("pathlib").Path(dinov2))})
    arrays["masks"] = masks.to(torch.uint8)
    arrays["labels"] = labels
    write("crane_reference", arrays, checkout, REPOSITORY, COMMIT, settings)
