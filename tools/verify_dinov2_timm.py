"""Check that zsadlib.dino (timm) equals the DINOv2 architecture Crane+ loads through torch.hub.

Usage::

    git clone -q <mirror of github.com/facebookresearch/dinov2> /tmp/ref/dinov2
    python tools/verify_dinov2_timm.py /tmp/ref/dinov2 [--crane /tmp/ref/Crane] [--no-real] [--images 2]

It imports ``dinov2.models.vision_transformer`` from the given checkout (nothing of it is copied here), builds
the network of ``dinov2_vitb14_reg`` with the kwargs of ``dinov2/hub/backbones.py`` (img_size 518, patch 14,
num_register_tokens 4, interpolate_antialias True, interpolate_offset 0.0, init_values 1.0, block_chunks 0,
ffn_layer "mlp", ``Block`` with ``MemEffAttention``), once at a small width/depth (the zsadlib ``tiny`` config:
embed 64, depth 2, heads 2, native grid 20 x 20, patch 14 and 12) and once at the real ViT-B/14 size, with
random weights in which *every* parameter is perturbed (so layer scales, norms, biases, the class token's
positional embedding and the registers all matter). It saves the hub model's state dict (original key layout:
``register_tokens``, ``mask_token``, ``blocks.N.ls1.gamma``) to a ``.pth`` file, loads that file through
``zsadlib.dino.load_dino`` and prints, per input size, the max abs difference of

* ``pos``: the hub's ``interpolate_pos_encoding`` vs timm's ``resample_abs_pos_embed`` (patch part);
* ``arch``: ``hub.get_intermediate_layers(x, reshape=True)[0]`` vs ``DinoBackbone.imagenet_features(x)`` on
  the same ImageNet-normalised images;
* ``e2e``: the hub on Crane's preprocessing (``unnormalize`` with OpenAI mean/std, then torchvision
  ``Normalize`` with ImageNet mean/std; from the Crane checkout's ``utils/transform.py`` when ``--crane`` is
  given) vs ``DinoBackbone.patch_features`` on the CLIP-normalised images.

Measured (facebookresearch/dinov2 at b8931f7bf91576930313be2c6d6af376033b35f0, torch 2.14.1 CPU, float32,
timm 1.0.31, xFormers absent, 2 images, ``--crane /tmp/ref/Crane`` at 39181f9; 75 to 130 s on 2 shared CPU cores)::

    config            size  grid  pos  arch  e2e  max|feature|  control (hub w/o antialias, offset 0.1)
    small patch 14     280    20    0     0    0      4.25      - (native)
    small patch 14     224    16    0     0    0      4.07      0.0545
    small patch 14     518    37    0     0    0      4.38      0.0183
    small patch 12     240    20    0     0    0      3.9       - (native)
    small patch 12     192    16    0     0    0      4.08      0.0555
    real ViT-B/14      518    37    0     0    0      4.69      - (native)
    real ViT-B/14      448    32    0     0    0      5.37      0.0423

i.e. bit-exact everywhere: timm's run-time resize (bicubic, antialias=True, ``size=``) is the hub's
(``interpolate_antialias=True``, ``interpolate_offset=0`` -> ``size=``), both attentions are
``F.scaled_dot_product_attention``, and timm's dinov2 conversion (``cls_token + pos_embed[:, 0]``) gives the
same class token the hub forms by addition.

The control column is a negative control: the same hub model with the positional-embedding interpolation of
the hub's models *without* registers (``interpolate_antialias=False``, ``interpolate_offset=0.1``) is visibly
different (0.018 .. 0.056), so the check does see interpolation differences.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

SMALL = dict(embed_dim=64, depth=2, num_heads=2)
REAL = dict(embed_dim=768, depth=12, num_heads=12)
HUB_KWARGS = dict(  # dinov2/hub/backbones.py: dinov2_vitb14_reg
    init_values=1.0, ffn_layer="mlp", block_chunks=0, num_register_tokens=4,
    interpolate_antialias=True, interpolate_offset=0.0,
)


def import_hub(checkout: Path):
    os.environ.setdefault("XFORMERS_DISABLED", "1")  # the plain SDPA path (CPU); xFormers is CUDA only
    sys.path.insert(0, str(checkout))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dinov2.layers import MemEffAttention
        from dinov2.layers.block import Block
        from dinov2.models import vision_transformer as vits
    return vits, partial(Block, attn_class=MemEffAttention)


def crane_preprocess(crane: Path | None):
    """Crane's ``unnormalize`` + torchvision ``Normalize`` (from its checkout when given)."""
    from torchvision.transforms import Normalize

    if crane is not None:
        spec = importlib.util.spec_from_file_location("crane_transform", crane / "utils" / "transform.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        openai = (module.OPENAI_DATASET_MEAN, module.OPENAI_DATASET_STD)
        imagenet = (module.IMAGENET_DATASET_MEAN, module.IMAGENET_DATASET_STD)
        unnormalize = module.unnormalize
    else:
        openai = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
        imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

        def unnormalize(tensor, mean, std):
            mean = torch.tensor(mean).view(-1, 1, 1).to(tensor.device)
            std = torch.tensor(std).view(-1, 1, 1).to(tensor.device)
            return (tensor * std + mean).clamp(0, 1)

    def preprocess(image):
        raw = unnormalize(image, *openai)
        return Normalize(*imagenet)(raw)

    return preprocess, openai, imagenet


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        if name.endswith(("ls1.gamma", "ls2.gamma")):
            parameter.copy_(0.2 + 0.8 * torch.rand(parameter.shape, generator=generator))
        else:
            parameter.add_(0.05 * noise)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def check(label, vits, block_fn, arch, patch, native, sizes, images, preprocess, openai, seed=0):
    from timm.layers import resample_abs_pos_embed

    from zsadlib.dino import load_dino

    torch.manual_seed(seed)  # the hub's own init draws from the global generator
    hub = vits.DinoVisionTransformer(img_size=native, patch_size=patch, mlp_ratio=4, block_fn=block_fn,
                                     **arch, **HUB_KWARGS).eval()
    perturb(hub, seed)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dinov2_random_pretrain.pth"
        torch.save(hub.state_dict(), path)
        if arch == SMALL:
            ours = load_dino("tiny", pretrained=path, patch_size=patch, device="cpu")
        else:
            ours = load_dino("vit_base_patch14_reg4_dinov2.lvd142m", pretrained=path, device="cpu")
    assert ours.info["weights_format"] == "dinov2", ours.info
    generator = torch.Generator().manual_seed(seed + 1)
    mean = torch.tensor(openai[0]).view(-1, 1, 1)
    std = torch.tensor(openai[1]).view(-1, 1, 1)
    for size in sizes:
        raw = torch.rand(images, 3, size, size, generator=generator) * 1.1 - 0.05  # a little outside [0, 1]
        clip_images = (raw - mean) / std
        dino_images = preprocess(clip_images)
        grid = size // patch
        tokens = torch.zeros(1, 1 + grid * grid, arch["embed_dim"])
        hub_pos = hub.interpolate_pos_encoding(tokens, size, size)[:, 1:]
        timm_pos = resample_abs_pos_embed(ours.model.pos_embed, new_size=(grid, grid),
                                          old_size=ours.model.patch_embed.grid_size, num_prefix_tokens=0)
        reference = hub.get_intermediate_layers(dino_images, reshape=True)[0]
        control = float("nan")
        if size != native:  # negative control: the hub's non-register setting (no antialias, offset 0.1)
            hub.interpolate_antialias, hub.interpolate_offset = False, 0.1
            control = max_diff(hub.get_intermediate_layers(dino_images, reshape=True)[0],
                               ours.imagenet_features(dino_images))
            hub.interpolate_antialias, hub.interpolate_offset = True, 0.0
        row = dict(
            config=label, size=size, grid=grid, native=size == native,
            pos=max_diff(hub_pos, timm_pos),
            arch=max_diff(reference, ours.imagenet_features(dino_images)),
            e2e=max_diff(reference, ours.patch_features(clip_images)),
            scale=float(reference.abs().max()), control=control,
        )
        rows.append(row)
        print(f"{label:<18} {size:>5} {grid:>5}  pos={row['pos']:.3g}  arch={row['arch']:.3g}  "
              f"e2e={row['e2e']:.3g}  (max |feature| {row['scale']:.3g})"
              + ("  native" if row["native"] else f"  [control, hub w/o antialias + offset 0.1: {control:.3g}]"),
              flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dinov2", type=Path, help="a checkout of github.com/facebookresearch/dinov2")
    parser.add_argument("--crane", type=Path, default=None, help="a checkout of AlirezaSalehy/Crane (its transforms)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--no-real", action="store_true", help="skip the real ViT-B/14 size")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    vits, block_fn = import_hub(args.dinov2.resolve())
    preprocess, openai, _ = crane_preprocess(args.crane.resolve() if args.crane else None)
    commit = ""
    head = args.dinov2 / ".git"
    if head.exists():
        import subprocess

        commit = subprocess.run(["git", "-C", str(args.dinov2), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    import timm

    print(f"dinov2 {commit or '(unknown commit)'}; torch {torch.__version__}; timm {timm.__version__}; "
          f"crane transforms: {'checkout' if args.crane else 'inline copy'}")
    rows = []
    rows += check("small patch 14", vits, block_fn, SMALL, 14, 280, [280, 224, 518], args.images, preprocess, openai)
    rows += check("small patch 12", vits, block_fn, SMALL, 12, 240, [240, 192], args.images, preprocess, openai)
    if not args.no_real:
        rows += check("real ViT-B/14", vits, block_fn, REAL, 14, 518, [518, 448], args.images, preprocess, openai)
    worst = max(max(r["pos"], r["arch"], r["e2e"]) for r in rows)
    print(f"worst max abs difference: {worst:.3g} ({'OK' if worst <= args.tolerance else 'FAIL'}, "
          f"tolerance {args.tolerance:g})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
