"""torch.compile as an evaluation option (zsadlib.runtime.compiled): off by default, equal results when on.

Inductor's code generation is exercised on CUDA (tests/test_cuda.py); here dynamo traces the methods with the
"eager" backend, which checks that every method compiles (graph breaks allowed) and gives the same numbers.
"""
import json

import pytest
import torch

from zsadlib import runtime
from zsadlib.data import open_dataset
from zsadlib.evaluate import evaluate, run_method
from zsadlib.methods import build_method

from .conftest import TINY_SIZE


def _build(name):
    return build_method(name, backbone="tiny", pretrained=None, image_size=TINY_SIZE, device="cpu")


def test_off_by_default_and_bad_modes():
    method = _build("winclip")
    assert runtime.compiled(method) is method and runtime.compiled(method, False) is method
    with pytest.raises(ValueError, match="compile mode must be one of"):
        runtime.compiled(method, "fastest")


@pytest.mark.parametrize("name", ["anomalyclip", "genclip"])
def test_compiled_method_equals_the_method(name, tiny_images):
    torch._dynamo.reset()
    method = _build(name)
    names = ["bottle"] * tiny_images.shape[0]
    expected = run_method(method, tiny_images, names)
    runner = runtime.compiled(method, True, backend="eager")
    assert runner is not method and runner.backbone is method.backbone  # attributes reach the method
    out = run_method(runner, tiny_images, names)
    torch.testing.assert_close(out.maps, expected.maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.scores, expected.scores, atol=1e-6, rtol=0)


def test_evaluate_compiles_when_asked_and_records_it(synthetic_root, tmp_path, monkeypatch):
    torch._dynamo.reset()
    calls = []
    original = torch.compile

    def eager_compile(module, mode=None, backend="inductor"):
        calls.append((mode, backend))
        return original(module, mode=None, backend="eager")  # the same tracing, no code generation

    monkeypatch.setattr(runtime.torch, "compile", eager_compile)
    method = _build("anomalyclip")
    dataset = open_dataset("synthetic", synthetic_root, classes=["bottle"], image_size=TINY_SIZE)
    dataset = dataset.subset(max_per_class=4, seed=0)
    plain = evaluate(method, dataset, tmp_path / "plain", batch_size=2, progress=False)
    assert calls == []
    fast = evaluate(method, dataset, tmp_path / "compiled", batch_size=2, progress=False, compile="reduce-overhead")
    assert calls == [("reduce-overhead", "inductor")]
    assert json.loads((tmp_path / "compiled" / "metrics.json").read_text())["run"]["compile"] == "reduce-overhead"
    for key, value in plain.metrics.items():
        assert fast.metrics[key] == pytest.approx(value, abs=1e-6), key
