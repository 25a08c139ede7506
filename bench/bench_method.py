"""Seconds per evaluated image and per training step of a method, next to the bare backbone forward pass.

    python bench/bench_method.py --method anomalyclip            # ViT-L-14-336 @ 518, random weights
    python bench/bench_method.py --method anomalyclip --backbone tiny --image-size 112 --repeats 3
    python bench/bench_method.py --method crane --backbone ViT-B-16 --image-size 224 --set layers=[3,6,9,12] \
        --set eattn_to_layer=10 --precision-matrix fp32 bf16 --batch-sizes 1 8

Random weights are fine for timing (the arithmetic is the same as with real ones). Prints one JSON object:
the bare backbone forward (open_clip encode_image, and forward_features with the method's taps), the method's
inference per image, one training step (forward + backward + Adam) per batch, and the method's overhead over
the backbone. Each figure is the median of ``--repeats`` runs after one warm-up run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from zsadlib.methods import build_method  # noqa: E402
from zsadlib.utils import package_versions  # noqa: E402


def timed(function, repeats: int) -> float:
    function()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="anomalyclip")
    parser.add_argument("--backbone", default=None, help="default: the method's (ViT-L-14-336-quickgelu)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=2, help="images per inference batch and training step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precision-matrix", nargs="+", default=[], choices=["fp32", "bf16", "fp16"],
                        help="also time inference (zsadlib.evaluate.run_method) at these precisions x --batch-sizes, "
                             "each as s/image and as a ratio to bare fp32 encode_image at the same batch size")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="change a config field, e.g. --set aliased_taps=false --set dino_pretrained=null")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = json.loads(value)
    if args.method == "crane_plus" or overrides.get("dattn"):
        overrides.setdefault("dino_pretrained", None)  # random DINOv2 weights: the timing is the same
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    method = build_method(args.method, backbone=args.backbone, pretrained=None, image_size=args.image_size,
                          device="cpu", **overrides)
    backbone = method.backbone
    size = backbone.image_size
    images = torch.randn(args.batch_size, 3, size, size)
    masks = torch.zeros(args.batch_size, size, size, dtype=torch.bool)
    masks[:, size // 4: size // 2, size // 4: size // 2] = True
    labels = torch.tensor([i % 2 for i in range(args.batch_size)])
    masks[labels == 0] = False
    names = ["object"] * args.batch_size
    config = method.config
    layers = tuple(getattr(method, "layers", getattr(config, "layers", (6, 12, 18, 24))))
    dense_from = getattr(method, "dense_from", getattr(config, "dense_from", None))
    dense_attention = getattr(config, "attention", getattr(config, "dense_attention", "vv"))

    with torch.inference_mode():
        bare = timed(lambda: backbone.encode_image(images), args.repeats)
        taps = timed(lambda: backbone.forward_features(images, layers=layers, dense_from=dense_from,
                                                       dense_attention=dense_attention), args.repeats)
        inference = timed(lambda: method(images, names), args.repeats)

    result = {
        "bench": "method",
        "method": method.name,
        "backbone": backbone.info["name"],
        "random_weights": True,
        "image_size": size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "backbone_encode_image_s_per_image": round(bare / args.batch_size, 4),
        "backbone_forward_features_s_per_image": round(taps / args.batch_size, 4),
        "dense_from": dense_from,
        "dense_attention": dense_attention if dense_from else None,
        "layers": list(layers),
        "config_overrides": overrides,
        "method_inference_s_per_image": round(inference / args.batch_size, 4),
        "method_overhead_over_encode_image": round(inference / bare, 3),
    }
    if method.trainable:
        optimizer = torch.optim.Adam([p for g in method.parameter_groups(1e-3) for p in g["params"]], lr=1e-3)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss, _ = method.training_loss(images, masks, labels, names)
            loss.backward()
            optimizer.step()

        train_step = timed(step, args.repeats)
        result.update({
            "train_step_s": round(train_step, 4),
            "train_step_s_per_image": round(train_step / args.batch_size, 4),
            "train_step_overhead_over_encode_image": round(train_step / bare, 3),
            "learned_parameters": sum(p.numel() for p in method.learned_parameters().values()),
        })
    if args.precision_matrix:
        from zsadlib.evaluate import run_method

        matrix = []
        for batch in args.batch_sizes:
            batch_images = torch.randn(batch, 3, size, size)
            with torch.inference_mode():
                bare_batch = timed(lambda: backbone.encode_image(batch_images), args.repeats) / batch
            for precision in args.precision_matrix:
                seconds = timed(lambda: run_method(method, batch_images, ["object"] * batch, precision=precision),
                                args.repeats) / batch
                matrix.append({"precision": precision, "batch_size": batch, "s_per_image": round(seconds, 4),
                               "bare_fp32_encode_image_s_per_image": round(bare_batch, 4),
                               "ratio_to_bare_fp32": round(seconds / bare_batch, 3)})
        result["precision_matrix"] = matrix
    result["versions"] = {k: package_versions()[k] for k in ("torch", "open_clip_torch")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
