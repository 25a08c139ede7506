"""Floating-point operations per evaluated image of each method, next to the bare backbone forward pass.

    python bench/bench_flops.py                                   # ViT-B-16 @ 224, batch 8, every method
    python bench/bench_flops.py --backbone ViT-L-14-336 --image-size 518 --methods anomalyclip crane

Counted with torch.utils.flop_counter (matmuls, convolutions and attention), so the figures do not depend on how
busy the machine is; they bound what any kernel can do, and explain the timings of bench_method.py. Each method
runs once as a warm-up (filling its text cache, as in an evaluation) and is then counted on a second batch. The
learned text encoders are counted twice: as run (cut after the last end-of-text token) and at the full 77
positions, as the reference codes run them. Random weights; prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from zsadlib.methods import build_method, get_method_class  # noqa: E402
from zsadlib.prompts.learned import LearnedPromptText  # noqa: E402
from zsadlib.utils import package_versions  # noqa: E402

METHODS = ("winclip", "april_gan", "anomalyclip", "genclip", "crane", "vip2clip")


LAYER_FIELDS = ("layers", "dense_from", "dpam_layer", "eattn_to_layer")  # 1-based block numbers of a 24-block ViT


def depth_overrides(name: str, depth: int) -> dict:
    """The method's block-number fields scaled from the papers' 24-block ViT-L to a ``depth``-block backbone (e.g.
    layers 6/12/18/24 -> 3/6/9/12 at ViT-B), so that every method runs on the same smaller backbone."""
    config = get_method_class(name).config_class()
    out = {}
    for field in LAYER_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, (tuple, list)):
            out[field] = [max(1, round(v * depth / 24)) for v in value]
        elif isinstance(value, int) and field == "dense_from":
            out[field] = max(1, round(value * depth / 24))
        elif isinstance(value, int):  # "the last value - 1 blocks run the dense path": scale their first block
            first = max(1, round((24 - value + 2) * depth / 24))
            out[field] = depth - first + 2
    return out if depth != 24 else {}


def count_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return int(counter.get_total_flops())


@contextmanager
def full_length_text():
    """Learned prompts encoded at all 77 positions (the reference codes' way)."""
    original = LearnedPromptText.encoded_length
    LearnedPromptText.encoded_length = lambda self, token_ids: token_ids.shape[-1]
    try:
        yield
    finally:
        LearnedPromptText.encoded_length = original


def method_flops(method, images: torch.Tensor) -> int:
    names = ["object"] * images.shape[0]
    with torch.inference_mode():
        method(images, names)  # warm-up: what an evaluation caches is cached
        return count_flops(lambda: method(images, names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=JSON",
                        help="change a config field of one method, e.g. --set crane.layers=[3,6,9,12]")
    args = parser.parse_args()
    overrides: dict[str, dict] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        overrides.setdefault(name, {})[field] = json.loads(value)
    torch.manual_seed(0)
    result = {"bench": "flops", "backbone": args.backbone, "image_size": args.image_size,
              "batch_size": args.batch_size, "random_weights": True, "methods": {}}
    bare = None
    for name in args.methods:
        depth = 12 if args.backbone.startswith("ViT-B") else 24
        fields = {**depth_overrides(name, depth), **overrides.get(name, {})}
        method = build_method(name, backbone=args.backbone, pretrained=None, image_size=args.image_size,
                              device="cpu", **fields)
        size = method.backbone.image_size
        images = torch.randn(args.batch_size, 3, size, size)
        if bare is None:
            with torch.inference_mode():
                bare = count_flops(lambda: method.backbone.encode_image(images)) / args.batch_size
            result["bare_encode_image_gflops_per_image"] = round(bare / 1e9, 3)
        flops = method_flops(method, images) / args.batch_size
        entry = {"gflops_per_image": round(flops / 1e9, 3), "ratio_to_bare": round(flops / bare, 3),
                 "config_overrides": fields}
        if any(isinstance(m, LearnedPromptText) for m in method.modules()):
            with full_length_text():
                full = method_flops(method, images) / args.batch_size
            entry.update({"full_length_text_gflops_per_image": round(full / 1e9, 3),
                          "full_length_text_ratio_to_bare": round(full / bare, 3)})
        result["methods"][name] = entry
        print(f"{name}: {entry}", file=sys.stderr)
    result["versions"] = {k: package_versions()[k] for k in ("torch", "open_clip_torch")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
