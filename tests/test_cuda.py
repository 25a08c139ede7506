"""The method contract on a GPU (users' machines): skipped where CUDA is absent (CI, this project's machines).

Every registered method runs on the tiny backbone on CUDA in fp32, bf16 and fp16 autocast and must give the CPU's
fp32 results: fp32 within 1e-3 (GPU kernels differ in rounding); reduced precision within 5% of the map's range
(APRIL-GAN sums four sharp softmax(100 cos) maps: its bf16 maps move by ~0.1 of a range of ~2-4 on the CPU) and 0.02
on scores.
"""
import pytest
import torch

from zsadlib.evaluate import run_method
from zsadlib.methods import build_method, list_methods

from .conftest import TINY_SIZE

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

TOLERANCE = {"fp32": (1e-3, 1e-3), "bf16": (0.05, 0.02), "fp16": (0.05, 0.02)}  # (maps x map range, scores)


def _build(name, device):
    overrides = {"dino_model": "tiny", "dino_pretrained": None} if name == "crane_plus" else {}
    return build_method(name, backbone="tiny", pretrained=None, image_size=TINY_SIZE, device=device, **overrides)


@pytest.mark.parametrize("name", list_methods())
def test_method_on_cuda_equals_cpu(name, tiny_images):
    names = ["bottle"] * tiny_images.shape[0]
    expected = run_method(_build(name, "cpu"), tiny_images, names)
    map_range = float(expected.maps.max() - expected.maps.min())
    method = _build(name, "cuda")
    assert method.backbone.device.type == "cuda"
    for precision, (map_tolerance, score_tolerance) in TOLERANCE.items():
        out = run_method(method, tiny_images, names, precision=precision)
        assert out.maps.device.type == "cuda" and out.maps.dtype == torch.float32
        assert (out.maps.cpu() - expected.maps).abs().max() < map_tolerance * max(map_range, 1.0), precision
        assert (out.scores.cpu() - expected.scores).abs().max() < score_tolerance, precision


@pytest.mark.parametrize("name", [n for n in list_methods() if n != "winclip"])
def test_training_step_on_cuda(name, tiny_images):
    method = _build(name, "cuda")
    masks = torch.zeros(tiny_images.shape[0], TINY_SIZE, TINY_SIZE, dtype=torch.bool, device="cuda")
    masks[0, 10:40, 10:40] = True
    loss, _ = method.training_loss(tiny_images.cuda(), masks, torch.tensor([1, 0, 1], device="cuda"), ["bottle"] * 3)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in method.learned_parameters().values())


@pytest.mark.parametrize("name", ["anomalyclip", "crane"])
def test_compiled_method_on_cuda_equals_uncompiled(name, tiny_images):
    from zsadlib.runtime import compiled

    method = _build(name, "cuda")
    names = ["bottle"] * tiny_images.shape[0]
    expected = run_method(method, tiny_images, names)
    out = run_method(compiled(method, "default"), tiny_images, names)
    assert (out.maps - expected.maps).abs().max() < 1e-3 and (out.scores - expected.scores).abs().max() < 1e-3
