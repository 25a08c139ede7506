"""zsadlib.dino: the timm DINOv2-with-registers backbone of Crane+'s D-Attn (tiny config, no network)."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms import Normalize

from zsadlib.backbone import BackboneError, WeightsNotFoundError
from zsadlib.dino import IMAGENET_MEAN, IMAGENET_STD, DinoBackbone, load_dino

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tiny():
    return load_dino("tiny", pretrained=None, image_size=240, device="cpu", seed=0)


@pytest.fixture(scope="module")
def clip_images():
    generator = torch.Generator().manual_seed(0)
    raw = torch.rand(2, 3, 240, 240, generator=generator) * 1.1 - 0.05  # a little outside [0, 1]: clamp runs
    return Normalize(OPENAI_MEAN, OPENAI_STD)(raw)


def crane_renormalise(images: torch.Tensor) -> torch.Tensor:
    """Crane's utils/transform.py ``unnormalize`` then torchvision ``Normalize`` (ImageNet), written out."""
    mean = torch.tensor(OPENAI_MEAN).view(-1, 1, 1)
    std = torch.tensor(OPENAI_STD).view(-1, 1, 1)
    raw = (images * std + mean).clamp(0, 1)
    return Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(raw)


def to_dinov2_layout(state: dict, cls_pos: torch.Tensor | None = None) -> dict:
    """Our timm state dict in facebookresearch/dinov2's key layout (what dinov2_vitb14_reg4_pretrain.pth has):
    the hub adds pos_embed[:, 0] to the class token, timm folds it into cls_token; registers are renamed."""
    width = state["cls_token"].shape[-1]
    cls_pos = torch.zeros(1, 1, width) if cls_pos is None else cls_pos.reshape(1, 1, width)
    out = {}
    for key, value in state.items():
        if key == "reg_token":
            out["register_tokens"] = value.clone()
        elif key == "cls_token":
            out["cls_token"] = value - cls_pos
        elif key == "pos_embed":
            out["pos_embed"] = torch.cat([cls_pos, value], dim=1)
        else:
            out[key] = value.clone()
    out["mask_token"] = torch.zeros(1, width)
    return out


def assert_same_state(a: DinoBackbone, b: DinoBackbone) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_tiny_shapes_and_info(tiny, clip_images):
    assert isinstance(tiny, DinoBackbone)
    assert (tiny.patch_size, tiny.grid_size, tiny.embed_dim, tiny.num_register_tokens) == (12, (20, 20), 64, 4)
    assert len(tiny.model.blocks) == 2 and tiny.model.blocks[0].attn.num_heads == 2
    assert torch.all(tiny.model.blocks[0].ls1.gamma == 1.0)  # layer scale, hub init_values=1.0
    with torch.no_grad():
        features = tiny.patch_features(clip_images)
        larger = tiny(torch.zeros(1, 3, 288, 288))  # non-native: pos-embed resized at run time
    assert features.shape == (2, 64, 20, 20) and torch.isfinite(features).all()
    assert larger.shape == (1, 64, 24, 24)
    info = tiny.info
    assert info["random_weights"] is True and info["weights_path"] is None and info["weights_sha256"] is None
    assert (info["name"], info["image_size"], info["patch_size"], info["grid_size"]) == ("tiny", 240, 12, [20, 20])
    assert info["native_grid_size"] == [20, 20] and info["num_register_tokens"] == 4
    other = load_dino("tiny", pretrained=None, patch_size=16, image_size=224, device="cpu")
    assert (other.patch_size, other.grid_size, other.info["native_image_size"]) == (16, (14, 14), 320)
    assert "bicubic antialias" in other.info["pos_embed_resize"]  # 224 != native 320
    with pytest.raises(BackboneError, match="not a multiple of the patch size 12"):
        load_dino("tiny", pretrained=None, image_size=250, device="cpu")
    with pytest.raises(BackboneError, match="not a multiple"):
        tiny.patch_features(torch.zeros(1, 3, 250, 250))


def test_seeded_random_weights():
    a = load_dino("tiny", pretrained=None, seed=3, device="cpu")
    b = load_dino("tiny", pretrained=None, seed=3, device="cpu")
    c = load_dino("tiny", pretrained=None, seed=4, device="cpu")
    assert_same_state(a, b)
    assert not torch.equal(a.model.pos_embed, c.model.pos_embed)


def test_patch_features_equal_plain_renormalisation_and_timm(tiny, clip_images):
    dino_images = crane_renormalise(clip_images)
    with torch.no_grad():
        ours = tiny.patch_features(clip_images)
        plain = tiny.model.get_intermediate_layers(dino_images, n=1, reshape=True, norm=True)[0]
    assert torch.equal(ours, plain)
    # by hand: last block's tokens, final norm, class token and 4 registers dropped, [B, C, h, w]
    with torch.no_grad():
        x = tiny.model.patch_embed(dino_images)
        x = tiny.model._pos_embed(x)
        for block in tiny.model.blocks:
            x = block(x)
        x = tiny.model.norm(x)[:, 1 + 4:]
        by_hand = x.reshape(2, 20, 20, 64).permute(0, 3, 1, 2)
    assert torch.equal(ours, by_hand)
    # other sizes: the same thing, with the run-time positional resize
    small = torch.nn.functional.interpolate(clip_images, size=(192, 192), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.equal(
            tiny.patch_features(small),
            tiny.model.get_intermediate_layers(crane_renormalise(small), n=1, reshape=True, norm=True)[0],
        )


@pytest.mark.parametrize("layout", ["dinov2", "timm_safetensors", "timm_bin"])
def test_checkpoint_round_trip_by_path(tmp_path, tiny, clip_images, layout):
    state = {key: value.clone() for key, value in tiny.model.state_dict().items()}
    if layout == "dinov2":
        path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
        original = to_dinov2_layout(state)
        assert {"register_tokens", "mask_token", "blocks.0.ls1.gamma"} <= original.keys()
        torch.save(original, path)
    elif layout == "timm_safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(state, path)
    loaded = load_dino("tiny", pretrained=path, image_size=240, device="cpu", seed=123)  # seed must not matter
    assert_same_state(tiny, loaded)
    with torch.no_grad():
        assert torch.equal(loaded.patch_features(clip_images), tiny.patch_features(clip_images))
    info = loaded.info
    assert info["weights_path"] == str(path) and info["random_weights"] is False and info["seed"] is None
    assert info["weights_format"] == ("dinov2" if layout == "dinov2" else "timm")
    assert len(info["weights_sha256"]) == 64
    assert load_dino("tiny", pretrained=str(path), device="cpu", checksum=False).info["weights_sha256"] is None


def test_original_class_token_positional_embedding_is_folded(tmp_path, tiny, clip_images):
    """The hub adds pos_embed[:, 0] to the class token at run time; timm's conversion folds it in."""
    cls_pos = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    original = to_dinov2_layout(tiny.model.state_dict(), cls_pos)
    path = tmp_path / "with_cls_pos.pth"
    torch.save(original, path)
    loaded = load_dino("tiny", pretrained=path, device="cpu")
    assert torch.equal(loaded.model.cls_token, original["cls_token"] + original["pos_embed"][:, :1])
    with torch.no_grad():
        torch.testing.assert_close(loaded.patch_features(clip_images), tiny.patch_features(clip_images))


def test_missing_tag_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    with pytest.raises(WeightsNotFoundError) as caught:
        load_dino(pretrained="lvd142m", cache_dir=str(tmp_path / "hf"), device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert "vit_base_patch14_reg4_dinov2.lvd142m" in message and "'lvd142m'" in message
    assert str(tmp_path / "hf") in message and "dinov2_vitb14_reg4_pretrain.pth" in message
    assert "HF_HUB_OFFLINE=1" in message and "pass pretrained='/path/to/" in message


def test_tag_found_in_caches_without_network(tmp_path, monkeypatch):
    """The HF cache (timm format) and the torch-hub checkpoint folder (Crane's torch.hub download) are read
    without any network call."""
    from zsadlib import dino

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_dir = tmp_path / "torch_hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    repo = tmp_path / "hf" / "models--timm--vit_base_patch14_reg4_dinov2.lvd142m"
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch_file = hub_dir / "checkpoints" / "dinov2_vitb14_reg4_pretrain.pth"
    torch_file.write_bytes(b"x")
    found = dino._download_dino_tag("vit_base_patch14_reg4_dinov2.lvd142m", "vit_base_patch14_reg4_dinov2",
                                    "lvd142m", str(tmp_path / "hf"))
    assert found == str(torch_file)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    hf_file = repo / "snapshots" / "abc123" / "model.safetensors"
    hf_file.write_bytes(b"y")
    found = dino._download_dino_tag("vit_base_patch14_reg4_dinov2.lvd142m", "vit_base_patch14_reg4_dinov2",
                                    "lvd142m", str(tmp_path / "hf"))
    assert found == str(hf_file)


def test_checkpoint_that_does_not_fit_names_the_file(tmp_path, tiny):
    path = tmp_path / "patch12.pth"
    torch.save(to_dinov2_layout(tiny.model.state_dict()), path)
    with pytest.raises(BackboneError, match=r"patch12\.pth does not fit model tiny.*patch_embed\.proj\.weight"):
        load_dino("tiny", pretrained=path, patch_size=14, device="cpu")
    state = dict(tiny.model.state_dict())
    state.pop("blocks.1.mlp.fc2.bias")
    missing = tmp_path / "missing_key.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(missing))
    with pytest.raises(BackboneError, match=r"missing_key\.safetensors does not fit.*blocks\.1\.mlp\.fc2\.bias"):
        load_dino("tiny", pretrained=missing, device="cpu")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=r"cannot read DINOv2 checkpoint .*garbage\.pth"):
        load_dino("tiny", pretrained=garbage, device="cpu")
    with pytest.raises(WeightsNotFoundError, match=r"nothere\.pth does not exist"):
        load_dino("tiny", pretrained=tmp_path / "nothere.pth", device="cpu")


def test_unknown_models_and_tags():
    with pytest.raises(BackboneError, match="reg4_dinov2"):
        load_dino("vit_base_patch14_dinov2", pretrained=None, device="cpu")  # no registers: other interpolation
    with pytest.raises(BackboneError, match="unknown pretrained tag 'foo'"):
        load_dino("vit_base_patch14_reg4_dinov2", pretrained="foo", device="cpu")
    with pytest.raises(BackboneError, match="no published weights"):
        load_dino("tiny", pretrained="lvd142m_other", device="cpu")
    with pytest.raises(BackboneError, match="only for the 'tiny' config"):
        load_dino(pretrained=None, patch_size=16, device="cpu")


def test_frozen(tiny, clip_images):
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.model.training
    images = clip_images.clone().requires_grad_(True)
    features = tiny.patch_features(images)
    assert not any(p.grad is not None for p in tiny.parameters())
    features.sum().backward()  # gradients may flow to the input, never to the weights
    assert all(p.grad is None for p in tiny.parameters())
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
