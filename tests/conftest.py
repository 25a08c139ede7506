"""Shared fixtures. Tests never touch the network: the hub is forced offline before anything imports it."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_SIZE = 112  # an 8 x 8 patch grid: fast, and != the native 336 so the pos-embed resize always runs


@pytest.fixture(scope="session")
def tiny_backbone():
    from zsadlib.backbone import load_backbone

    return load_backbone("tiny", pretrained=None, image_size=TINY_SIZE, device="cpu")


@pytest.fixture(scope="session")
def tiny_images():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, TINY_SIZE, TINY_SIZE, generator=generator)


def pytest_addoption(parser):
    parser.addoption("--regen-notebook-expected", action="store_true", default=False,
                     help="rewrite tests/notebooks/expected/*.json from this run's metrics.json")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """The default synthetic dataset, generated once per test session."""
    from zsadlib.data.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "synthetic", progress=False)
