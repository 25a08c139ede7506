"""Backbone: loading, positional-embedding resize, multi-layer taps, the dense dual path."""
import math
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from zsadlib.backbone import (
    DEFAULT_LAYERS,
    BackboneError,
    WeightsNotFoundError,
    load_backbone,
    resize_pos_embed,
)

from .conftest import TINY_SIZE


# ---- plain reference of one dual-path block, written out with explicit softmax matrices ------------------
def naive_refined_attention(block, x, mode):
    """[B, L, W] -> out-projected refined attention, the slow explicit way."""
    attn = block.attn
    width = x.shape[-1]
    heads = attn.num_heads
    d = width // heads
    h = block.ln_1(x)
    q, k, v = (h @ attn.in_proj_weight[i * width:(i + 1) * width].T + attn.in_proj_bias[i * width:(i + 1) * width]
               for i in range(3))

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)

    q, k, v = split(q), split(k), split(v)
    scale = 1.0 / math.sqrt(d)
    weights = torch.softmax(v @ v.transpose(-1, -2) * scale, dim=-1)
    if mode == "qkv_sum":
        weights = weights + torch.softmax(q @ q.transpose(-1, -2) * scale, dim=-1)
        weights = weights + torch.softmax(k @ k.transpose(-1, -2) * scale, dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(x.shape)
    return attn.out_proj(out)


def naive_dense_forward(backbone, images, layers, dense_from, mode):
    """Reference dual path: returns (tapped refined tokens per layer, final original tokens)."""
    visual = backbone.visual
    x = visual._embeds(images)
    refined = None
    taps = {}
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        if index >= dense_from:
            start = x if refined is None else refined
            refined = start + naive_refined_attention(block, x, mode)
        x = block(x)
        if index in layers:
            taps[index] = refined.clone() if refined is not None else x.clone()
    return [taps[layer] for layer in layers], x


@torch.no_grad()
def test_original_path_equals_open_clip_encode_image(tiny_backbone, tiny_images):
    expected = tiny_backbone.model.encode_image(tiny_images)
    for dense_from in (None, 6, 1):
        for mode in ("vv", "qkv_sum"):
            features = tiny_backbone.forward_features(tiny_images, dense_from=dense_from, dense_attention=mode)
            assert torch.equal(features.global_embedding, expected)  # dense blocks share the projection exactly


@torch.no_grad()
def test_plain_taps_equal_open_clip_intermediates(tiny_backbone, tiny_images):
    features = tiny_backbone.forward_features(tiny_images, layers=DEFAULT_LAYERS)
    reference = tiny_backbone.visual.forward_intermediates(
        tiny_images, indices=[layer - 1 for layer in DEFAULT_LAYERS], output_fmt="NLC",
        output_extra_tokens=True, normalize_intermediates=False, intermediates_only=True,
    )
    for ours, patches, prefix in zip(features.layer_tokens, reference["image_intermediates"],
                                     reference["image_intermediates_prefix"]):
        torch.testing.assert_close(ours, torch.cat([prefix, patches], dim=1), rtol=0, atol=0)
    visual = tiny_backbone.visual
    for ours, tokens in zip(features.patch_embeddings, reference["image_intermediates"]):
        torch.testing.assert_close(ours, visual.ln_post(tokens) @ visual.proj)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["vv", "qkv_sum"])
def test_dense_path_matches_naive_reference(tiny_backbone, tiny_images, mode):
    layers = (6, 12, 18, 24)
    features = tiny_backbone.forward_features(tiny_images, layers=layers, dense_from=6, dense_attention=mode)
    expected_taps, _ = naive_dense_forward(tiny_backbone, tiny_images, layers, 6, mode)
    for ours, expected in zip(features.layer_tokens, expected_taps):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_tapped_layers_are_distinct_tensors(tiny_backbone, tiny_images):
    """The reference code's in-place residual made every tap the last layer; here it cannot happen."""
    for dense_from in (None, 6):
        features = tiny_backbone.forward_features(tiny_images, layers=(6, 12, 18, 24), dense_from=dense_from)
        tokens = features.layer_tokens
        pointers = {t.untyped_storage().data_ptr() for t in tokens}
        assert len(pointers) == len(tokens)
        for a in range(len(tokens)):
            for b in range(a + 1, len(tokens)):
                assert (tokens[a] - tokens[b]).abs().max() > 1e-3


@torch.no_grad()
def test_dense_path_changes_patch_tokens_but_not_before_dense_from(tiny_backbone, tiny_images):
    plain = tiny_backbone.forward_features(tiny_images, layers=(3, 12), dense_from=None)
    dense = tiny_backbone.forward_features(tiny_images, layers=(3, 12), dense_from=6)
    assert torch.equal(plain.layer_tokens[0], dense.layer_tokens[0])
    assert (plain.layer_tokens[1] - dense.layer_tokens[1]).abs().max() > 1e-3


@torch.no_grad()
def test_global_without_ln_post(tiny_backbone, tiny_images):
    features = tiny_backbone.forward_features(tiny_images, layers=(24,), global_ln_post=False)
    expected = features.layer_tokens[0][:, 0] @ tiny_backbone.visual.proj
    torch.testing.assert_close(features.global_embedding, expected)
    with_ln = tiny_backbone.forward_features(tiny_images, layers=(24,), global_ln_post=True)
    assert not torch.allclose(with_ln.global_embedding, features.global_embedding)


@torch.no_grad()
def test_batch_composition_does_not_change_features(tiny_backbone, tiny_images):
    batch = tiny_backbone.forward_features(tiny_images, dense_from=6, dense_attention="qkv_sum")
    for i in range(tiny_images.shape[0]):
        single = tiny_backbone.forward_features(tiny_images[i:i + 1], dense_from=6, dense_attention="qkv_sum")
        for ours, alone in zip(batch.patch_embeddings, single.patch_embeddings):
            torch.testing.assert_close(ours[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_shapes_and_facts(tiny_backbone, tiny_images):
    features = tiny_backbone.forward_features(tiny_images)
    grid = TINY_SIZE // 14
    assert features.grid_size == (grid, grid)
    assert [p.shape for p in features.patch_embeddings] == [(3, grid * grid, tiny_backbone.embed_dim)] * 4
    assert [t.shape for t in features.layer_tokens] == [(3, 1 + grid * grid, tiny_backbone.vision_width)] * 4
    assert tiny_backbone.info["random_weights"] is True
    assert "mean nothing" in tiny_backbone.info["note"]
    assert tiny_backbone.info["pos_embed_resize"] == "bilinear"
    assert all(not p.requires_grad for p in tiny_backbone.parameters())
    tiny_backbone.train()
    assert not tiny_backbone.model.training


def test_bad_layers_and_sizes(tiny_backbone, tiny_images):
    with pytest.raises(BackboneError, match="out of range"):
        tiny_backbone.forward_features(tiny_images, layers=(0, 25))
    with pytest.raises(BackboneError, match="image_size=224"):
        tiny_backbone.forward_features(torch.zeros(1, 3, 224, 224))
    with pytest.raises(BackboneError, match="multiple of the patch size"):
        load_backbone("tiny", pretrained=None, image_size=100, device="cpu")


# ---- positional embedding resize ------------------------------------------------------------------------
def test_pos_embed_bicubic_antialias_equals_open_clip():
    torch.manual_seed(0)
    pos = torch.randn(1 + 24 * 24, 16)
    ours = resize_pos_embed(pos, (37, 37), "bicubic_antialias")
    model = open_clip.create_model("tiny", pretrained=None)
    model.visual.grid_size = (37, 37)
    state = {"visual.positional_embedding": pos.clone()}
    open_clip.model.resize_pos_embed(state, model)
    torch.testing.assert_close(ours, state["visual.positional_embedding"], rtol=0, atol=0)


def test_pos_embed_bilinear_is_plain_interpolation_and_differs_from_bicubic():
    torch.manual_seed(0)
    pos = torch.randn(1 + 24 * 24, 8)
    bilinear = resize_pos_embed(pos, (37, 37), "bilinear")
    assert bilinear.shape == (1 + 37 * 37, 8)
    assert torch.equal(bilinear[0], pos[0])  # class token untouched
    # a constant grid stays constant; corners of an align_corners=False upsample keep the corner values
    constant = torch.cat([torch.zeros(1, 8), torch.full((576, 8), 2.5)])
    torch.testing.assert_close(resize_pos_embed(constant, (37, 37), "bilinear")[1:], torch.full((1369, 8), 2.5))
    grid = pos[1:].reshape(24, 24, 8)
    assert torch.allclose(bilinear[1:].reshape(37, 37, 8)[0, 0], grid[0, 0])
    bicubic = resize_pos_embed(pos, (37, 37), "bicubic_antialias")
    assert (bicubic - bilinear).abs().max() > 1e-3
    torch.testing.assert_close(resize_pos_embed(pos, (24, 24), "bilinear"), pos)


def test_load_records_resize_mode():
    native = load_backbone("tiny", pretrained=None, image_size=336, device="cpu")
    assert native.info["pos_embed_resize"].startswith("none")
    bicubic = load_backbone("tiny", pretrained=None, image_size=112, device="cpu", pos_embed_resize="bicubic_antialias")
    bilinear = load_backbone("tiny", pretrained=None, image_size=112, device="cpu")
    assert bicubic.info["pos_embed_resize"] == "bicubic_antialias"
    assert not torch.allclose(bicubic.visual.positional_embedding, bilinear.visual.positional_embedding)
    with pytest.raises(BackboneError, match="pos_embed_resize"):
        load_backbone("tiny", pretrained=None, image_size=112, pos_embed_resize="nearest")


# ---- weights: files, tags, errors -----------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_file_round_trip(tmp_path, tiny_images, suffix):
    source = load_backbone("tiny", pretrained=None, image_size=TINY_SIZE, device="cpu", seed=1)
    state = source.model.state_dict()
    # a checkpoint is stored at the native grid, as real ones are: undo our resize for the file
    native = load_backbone("tiny", pretrained=None, image_size=336, device="cpu", seed=1).model.state_dict()
    state["visual.positional_embedding"] = native["visual.positional_embedding"]
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = load_backbone("tiny", pretrained=str(path), image_size=TINY_SIZE, device="cpu", seed=99)
    assert loaded.info["random_weights"] is False
    assert loaded.info["weights_sha256"] and len(loaded.info["weights_sha256"]) == 64
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(tiny_images), source.encode_image(tiny_images))
    other_seed = load_backbone("tiny", pretrained=None, image_size=TINY_SIZE, device="cpu", seed=99)
    with torch.no_grad():
        assert not torch.allclose(other_seed.encode_image(tiny_images), source.encode_image(tiny_images))


def test_checkpoint_that_does_not_fit_names_the_file(tmp_path):
    state = load_backbone("tiny", pretrained=None, image_size=336, device="cpu").model.state_dict()
    state.pop("visual.proj")
    state["visual.conv1.weight"] = torch.zeros(8, 3, 14, 14)
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(BackboneError) as error:
        load_backbone("tiny", pretrained=str(path), image_size=TINY_SIZE, device="cpu")
    message = str(error.value)
    assert str(path) in message and "missing" in message and "visual.conv1.weight" in message


def test_missing_file_is_one_clear_error(tmp_path):
    path = tmp_path / "nope.bin"
    with pytest.raises(WeightsNotFoundError, match="nope.bin does not exist"):
        load_backbone("tiny", pretrained=str(path), device="cpu")


def test_offline_tag_gives_one_line_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as error:
        load_backbone("ViT-L-14-336-quickgelu", pretrained="openai", device="cpu", cache_dir=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    for part in ("ViT-L-14-336-quickgelu", "'openai'", str(tmp_path), "pretrained='/path/to/"):
        assert part in message
    assert error.value.__cause__ is None and (error.value.__context__ is None or error.value.__suppress_context__)


def test_unknown_model_and_tag():
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("ViT-Z-99", device="cpu")
    with pytest.raises(BackboneError, match="known tags: .*openai"):
        load_backbone("ViT-L-14-336-quickgelu", pretrained="not-a-tag", device="cpu")


def test_tiny_is_seeded_and_small():
    a = load_backbone("tiny", pretrained=None, image_size=TINY_SIZE, device="cpu", seed=3)
    b = load_backbone("tiny", pretrained=None, image_size=TINY_SIZE, device="cpu", seed=3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    assert sum(p.numel() for p in a.parameters()) < 3_000_000
    assert a.num_layers == 24 and a.patch_size == 14 and a.info["quick_gelu"]


@torch.no_grad()
def test_truncated_text_encoding_equals_open_clip(tiny_backbone):
    texts = ["a photo of a bottle.", "damaged", "a cropped photo of the flawless screw without defect."]
    tokens = tiny_backbone.tokenize(texts)
    expected = tiny_backbone.model.encode_text(tokens)
    torch.testing.assert_close(tiny_backbone.encode_text(texts), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(tiny_backbone.encode_text(texts, truncate=False), expected)


def test_text_encoding(tiny_backbone):
    tokens = tiny_backbone.tokenize(["a photo of a bottle.", "damaged bottle"])
    assert tokens.shape == (2, 77)
    with torch.no_grad():
        embeddings = tiny_backbone.encode_text(["a photo of a bottle.", "damaged bottle"], normalize=True)
    assert embeddings.shape == (2, tiny_backbone.embed_dim)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))


REAL_WEIGHTS = os.environ.get("ZSAD_CLIP_WEIGHTS", "")


@pytest.mark.real_weights
@pytest.mark.skipif(not os.path.isfile(REAL_WEIGHTS), reason="set ZSAD_CLIP_WEIGHTS to a ViT-L-14-336 checkpoint")
def test_real_vit_l_14_336_features():
    backbone = load_backbone("ViT-L-14-336-quickgelu", pretrained=REAL_WEIGHTS, image_size=518, device="auto")
    assert backbone.grid_size == (37, 37) and backbone.vision_width == 1024 and backbone.embed_dim == 768
    with torch.no_grad():
        features = backbone.forward_features(torch.zeros(1, 3, 518, 518, device=backbone.device), dense_from=6)
    assert features.patch_embeddings[0].shape == (1, 1369, 768)
    assert F.cosine_similarity(features.global_embedding, backbone.encode_image(
        torch.zeros(1, 3, 518, 518, device=backbone.device))).item() > 0.999


def _fake_hub_cache(root, repo_id, filename, content=b"weights"):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/<file>}."""
    folder = root / ("models--" + repo_id.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    snapshot = folder / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_bytes(content)
    return snapshot / filename


def test_cached_tag_weights_are_found_without_the_network(tmp_path, monkeypatch):
    from zsadlib import backbone as module

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(module, "_hub_reachable", lambda timeout=3.0: pytest.fail("no network look-up expected"))
    cfg = open_clip.get_pretrained_cfg("ViT-L-14-336-quickgelu", "openai")
    repo_id = cfg["hf_hub"].rstrip("/")
    path = _fake_hub_cache(tmp_path, repo_id, "open_clip_pytorch_model.bin")
    assert module._download_tag("ViT-L-14-336-quickgelu", "openai", str(tmp_path)) == str(path)


def test_unreachable_hub_fails_fast_with_one_line(tmp_path, monkeypatch):
    from zsadlib import backbone as module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(module, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: pytest.fail("no download expected"))
    with pytest.raises(WeightsNotFoundError, match="unreachable") as error:
        load_backbone("ViT-B-16-plus-240", pretrained="laion400m_e31", image_size=240, cache_dir=str(tmp_path))
    assert "\n" not in str(error.value)


def test_checksum_of_a_hub_cache_blob_is_its_name(tmp_path):
    from zsadlib.backbone import _weights_sha256
    from zsadlib.utils import sha256_file

    content = b"not really weights"
    digest = __import__("hashlib").sha256(content).hexdigest()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / digest).write_bytes(content)
    (tmp_path / "model.bin").symlink_to(tmp_path / "blobs" / digest)
    assert _weights_sha256(tmp_path / "model.bin") == digest == sha256_file(tmp_path / "model.bin")
    (tmp_path / "plain.bin").write_bytes(content)
    assert _weights_sha256(tmp_path / "plain.bin") == digest
