"""WinCLIP on the tiny random-weight backbone (112 px, patch 14 -> 8 x 8 grid): contract, math, prompts."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from zsadlib import ops
from zsadlib.methods import MethodError, build_method, list_methods
from zsadlib.methods.winclip import (
    WinCLIP,
    WinCLIPConfig,
    embed_tokens,
    encode_class_token,
    encode_token_windows,
    normal_reference_images,
    reference_images_from_folder,
    visual_association,
)
from zsadlib.prompts import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES_ANOMALIB,
    TEMPLATES_WINCLIP22,
    encode_prompt_ensemble,
    prompt_ensemble,
    winclip_prompts,
)

from .conftest import TINY_SIZE

GRID = TINY_SIZE // 14


@pytest.fixture(scope="module")
def winclip(tiny_backbone):
    return build_method("winclip", backbone=tiny_backbone)


@pytest.fixture(scope="module")
def batch_output(winclip, tiny_images):
    return winclip(tiny_images, ["bottle", "screw", "bottle"])


# ---- plain reference: each window's token set built by hand -------------------------------------------------
def plain_window_embeddings(backbone, images, windows_topleft, size):
    """Loop over images and windows; rebuild the input tokens from conv1 / class / positional embeddings."""
    visual = backbone.visual
    grid_h, grid_w = backbone.grid_size
    out = []
    for image in images:
        patches = visual.conv1(image[None]).flatten(2)[0].T  # [N, W], row-major
        per_window = []
        for top, left in windows_topleft:
            picked = [(top + dr) * grid_w + (left + dc) for dr in range(size) for dc in range(size)]
            rows = [visual.class_embedding + visual.positional_embedding[0]]
            rows += [patches[p] + visual.positional_embedding[1 + p] for p in picked]
            x = visual.ln_pre(torch.stack(rows)[None])
            for block in visual.transformer.resblocks:
                x = block(x)
            per_window.append(visual.ln_post(x[0, 0]) @ visual.proj)
        out.append(torch.stack(per_window))
    return torch.stack(out)


# ---- registry and config -------------------------------------------------------------------------------
def test_registry_lists_winclip():
    assert "winclip" in list_methods()
    assert WinCLIP.uses_class_names and not WinCLIP.trainable
    assert WinCLIP.paper == "WinCLIP (Jeong et al., CVPR 2023)"


def test_config_defaults_are_the_paper_values():
    config = WinCLIPConfig()
    assert config.backbone == "ViT-B-16-plus-240"
    assert config.pretrained == "laion400m_e31"
    assert config.image_size == 240
    assert config.scales == (2, 3)
    assert config.window_stride == 1
    assert config.temperature == pytest.approx(0.07)
    assert config.include_image_score is True
    assert config.scale_fusion == "harmonic"
    assert config.templates == "anomalib"
    assert config.normalize_prompt_embeddings is False
    assert config.blur_sigma == 0.0
    assert config.k_shot == 0
    assert WinCLIPConfig.from_dict(config.to_dict()) == config


def test_build_records_backbone_and_rejects_bad_options(tiny_backbone):
    method = build_method("winclip", backbone=tiny_backbone, scales=(2,))
    assert method.config.backbone == "tiny" and method.config.image_size == TINY_SIZE
    with pytest.raises(MethodError):
        build_method("winclip", backbone=tiny_backbone, reference_batch=0)
    with pytest.raises(MethodError):
        build_method("winclip", backbone=tiny_backbone, scales=(GRID + 1,))
    with pytest.raises(MethodError):
        build_method("winclip", backbone=tiny_backbone, scale_fusion="max")
    with pytest.raises(MethodError):
        build_method("winclip", backbone=tiny_backbone, scales=(), include_image_score=False)


# ---- prompts -----------------------------------------------------------------------------------------------
def test_prompt_ensemble_counts_match_anomalib():
    assert len(NORMAL_STATES) == 7 and len(ANOMALOUS_STATES) == 4
    assert len(TEMPLATES_ANOMALIB) == 21 and len(set(TEMPLATES_ANOMALIB)) == 20  # one duplicate, as in anomalib
    assert len(TEMPLATES_WINCLIP22) == 22 and len(set(TEMPLATES_WINCLIP22)) == 22
    normal, anomalous = winclip_prompts("bottle")
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert normal[0] == "a cropped photo of the bottle."
    assert anomalous[0] == "a cropped photo of the damaged bottle."
    assert "a photo of a bottle with defect for anomaly detection." in anomalous
    normal22, anomalous22 = winclip_prompts("bottle", "winclip22")
    assert len(normal22) == 7 * 22 and len(anomalous22) == 4 * 22
    assert "a jpeg corrupted photo of a flawless bottle" in normal22
    assert prompt_ensemble("x", ["{}", "bad {}"], ["a {}.", "the {}"]) == ["a x.", "the x", "a bad x.", "the bad x"]


@pytest.mark.parametrize("normalize_each", [False, True])
def test_encode_prompt_ensemble_is_normalised_group_mean(tiny_backbone, normalize_each):
    templates = TEMPLATES_ANOMALIB[:3]
    got = encode_prompt_ensemble(tiny_backbone, "cable", templates=templates, normalize_each=normalize_each)
    assert got.shape == (2, tiny_backbone.embed_dim)
    expected = []
    for states in (NORMAL_STATES, ANOMALOUS_STATES):
        embeddings = torch.stack([tiny_backbone.encode_text([p])[0]
                                  for p in prompt_ensemble("cable", states, templates)])
        if normalize_each:
            embeddings = F.normalize(embeddings, dim=-1)
        expected.append(F.normalize(embeddings.mean(0), dim=-1))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)


# ---- window encoding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [2, 3])
def test_encode_token_windows_equals_plain_loop(tiny_backbone, tiny_images, size):
    images = tiny_images[:2]
    windows = ops.sliding_windows((GRID, GRID), size)
    topleft = [(top, left) for top in range(GRID - size + 1) for left in range(GRID - size + 1)]
    picked = [0, 5, len(topleft) // 2, len(topleft) - 1]  # a few windows keep the loop fast
    with torch.no_grad():
        got = encode_token_windows(tiny_backbone, images, windows, window_batch=7)  # chunks of 7 windows
        expected = plain_window_embeddings(tiny_backbone, images, [topleft[i] for i in picked], size)
    assert got.shape == (2, windows.shape[0], tiny_backbone.embed_dim)
    torch.testing.assert_close(got[:, picked], expected, atol=1e-5, rtol=1e-4)


def test_window_batch_does_not_change_embeddings(tiny_backbone, tiny_images):
    windows = ops.sliding_windows((GRID, GRID), 3)
    with torch.no_grad():
        one_chunk = encode_token_windows(tiny_backbone, tiny_images[:1], windows, window_batch=1000)
        many = encode_token_windows(tiny_backbone, tiny_images[:1], windows, window_batch=5)
    torch.testing.assert_close(one_chunk, many, atol=1e-5, rtol=1e-5)


def test_full_grid_window_is_the_image_embedding(tiny_backbone, tiny_images):
    with torch.no_grad():
        whole = encode_token_windows(tiny_backbone, tiny_images, ops.sliding_windows((GRID, GRID), GRID))[:, 0]
        image = tiny_backbone.encode_image(tiny_images)
        from_tokens = encode_class_token(tiny_backbone, embed_tokens(tiny_backbone, tiny_images))
    torch.testing.assert_close(whole, image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_tokens, image, atol=1e-5, rtol=1e-5)


# ---- the method ------------------------------------------------------------------------------------------
def test_output_shapes(batch_output):
    out = batch_output
    assert out.scores.shape == (3,)
    assert out.maps.shape == (3, TINY_SIZE, TINY_SIZE)
    assert set(out.extras["scale_maps"]) == {2, 3}
    assert all(m.shape == (3, GRID, GRID) for m in out.extras["scale_maps"].values())


def plain_harmonic_grid(scores, size):
    """Each patch's harmonic mean over the scores of the windows (row-major, stride 1) that cover it, by loops."""
    topleft = [(r, c) for r in range(GRID - size + 1) for c in range(GRID - size + 1)]
    grid = torch.zeros(GRID, GRID)
    for row in range(GRID):
        for col in range(GRID):
            covering = [float(scores[m]) for m, (top, left) in enumerate(topleft)
                        if top <= row < top + size and left <= col < left + size]
            grid[row, col] = len(covering) / sum(1.0 / v for v in covering)
    return grid


@pytest.fixture(scope="module")
def plain_maps(tiny_backbone, tiny_images):
    """Image 1 ("screw") by hand: every window's embedding from the plain loop, its softmax score against the
    prompt ensemble, each patch's harmonic mean over the windows that cover it (loops), per scale."""
    text = F.normalize(encode_prompt_ensemble(tiny_backbone, "screw"), dim=-1)  # [2, D]
    maps = {}
    with torch.no_grad():
        for size in (2, 3):
            topleft = [(r, c) for r in range(GRID - size + 1) for c in range(GRID - size + 1)]
            embeddings = plain_window_embeddings(tiny_backbone, tiny_images[1:2], topleft, size)[0]  # [M, D]
            scores = ((F.normalize(embeddings, dim=-1) @ text.T) / 0.07).softmax(-1)[:, 1]
            maps[size] = plain_harmonic_grid(scores, size)
    return maps


def test_scale_maps_are_harmonic_means_of_plain_window_scores(batch_output, plain_maps):
    for size in (2, 3):
        torch.testing.assert_close(batch_output.extras["scale_maps"][size][1], plain_maps[size], atol=1e-5, rtol=1e-4)


def test_fusion_is_harmonic_mean_of_image_score_and_plain_scales(batch_output, plain_maps):
    score = float(batch_output.scores[1])
    expected = 3 / (1 / score + 1 / plain_maps[2] + 1 / plain_maps[3])
    torch.testing.assert_close(batch_output.extras["grid_map"][1], expected, atol=1e-5, rtol=1e-4)
    upsampled = F.interpolate(expected[None, None], size=(TINY_SIZE, TINY_SIZE), mode="bilinear", align_corners=False)
    torch.testing.assert_close(batch_output.maps[1], upsampled[0, 0], atol=1e-5, rtol=1e-4)


def test_image_score_is_softmax_against_prototypes(winclip, tiny_backbone, tiny_images, batch_output):
    text = encode_prompt_ensemble(tiny_backbone, "screw")
    with torch.no_grad():
        image = F.normalize(tiny_backbone.encode_image(tiny_images[1:2]), dim=-1)
    expected = ((image @ text.T) / 0.07).softmax(-1)[0, 1]
    assert float(batch_output.scores[1]) == pytest.approx(float(expected), abs=1e-5)


def test_batch_size_does_not_change_results(winclip, tiny_images, batch_output):
    names = ["bottle", "screw", "bottle"]
    singles = [winclip(tiny_images[i:i + 1], [names[i]]) for i in range(3)]
    torch.testing.assert_close(torch.cat([s.scores for s in singles]), batch_output.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([s.maps for s in singles]), batch_output.maps, atol=1e-5, rtol=1e-5)


def test_class_name_changes_the_query(winclip, tiny_images, batch_output):
    # image 0 was scored as "bottle"; as "screw" its score and map must move
    as_screw = winclip(tiny_images[:1], ["screw"])
    assert abs(float(as_screw.scores[0]) - float(batch_output.scores[0])) > 1e-4
    assert not torch.allclose(as_screw.maps[0], batch_output.maps[0])
    assert {"bottle", "screw"} <= set(winclip._text_cache)  # each name encoded once, then cached


def test_default_class_name_is_object(winclip, tiny_images):
    torch.testing.assert_close(winclip(tiny_images[:1]).scores, winclip(tiny_images[:1], ["object"]).scores)


def test_ablation_fields_change_outputs(tiny_backbone, tiny_images, batch_output):
    base = batch_output.maps[:1]
    names = ["bottle"]
    no_image = build_method("winclip", backbone=tiny_backbone, include_image_score=False)(tiny_images[:1], names)
    mean_fusion = build_method("winclip", backbone=tiny_backbone, scale_fusion="mean")(tiny_images[:1], names)
    blurred = build_method("winclip", backbone=tiny_backbone, blur_sigma=4.0)(tiny_images[:1], names)
    for variant in (no_image, mean_fusion, blurred):
        assert variant.maps.shape == base.shape and not torch.allclose(variant.maps, base)
    torch.testing.assert_close(blurred.maps, ops.gaussian_blur(base, 4.0))
    expected_no_image = 2 / (1 / no_image.extras["scale_maps"][2] + 1 / no_image.extras["scale_maps"][3])
    torch.testing.assert_close(no_image.extras["grid_map"], expected_no_image)


def test_config_is_a_dataclass_with_commented_defaults():
    names = {f.name for f in dataclasses.fields(WinCLIPConfig)}
    assert {"scales", "temperature", "include_image_score", "window_batch", "templates", "k_shot"} <= names


def test_cached_text_is_float32_even_when_first_built_under_autocast(tiny_backbone):
    from zsadlib.evaluate import run_method

    images = torch.zeros(1, 3, 112, 112)
    first = build_method("winclip", backbone=tiny_backbone)
    run_method(first, images, ["bottle"], precision="bf16")
    fresh = build_method("winclip", backbone=tiny_backbone)
    fresh.text_features(["bottle"])
    assert torch.equal(first.text_features(["bottle"]), fresh.text_features(["bottle"]))
    assert first.text_features(["bottle"]).dtype == torch.float32


# ---- WinCLIP+ (few-shot) -----------------------------------------------------------------------------------
def plain_few_shot(backbone, image, references, windows_memory_scales=(2, 3)):
    """One image against K references by hand: last-block patch tokens (forward_features + ln_post), every distance
    to every memory item with F.cosine_similarity in loops over the memory, harmonic means over covering windows by
    loops, then the mean of {patch map, scale maps}. Window embeddings come from encode_token_windows (itself held
    equal to a plain loop above)."""
    visual = backbone.visual

    def tokens(x):
        features = backbone.forward_features(x, layers=[backbone.num_layers])
        return visual.ln_post(features.layer_tokens[0][:, 1:])  # [B, N, W]

    def nearest(queries, memory):  # [M, C], [R, C] -> [M]
        distances = torch.stack([(1 - F.cosine_similarity(queries, item[None], dim=-1)) / 2 for item in memory])
        return distances.min(dim=0).values

    with torch.no_grad():
        patch_map = nearest(tokens(image[None])[0], tokens(references).flatten(0, 1)).reshape(GRID, GRID)
        maps = [patch_map]
        for size in windows_memory_scales:
            windows = ops.sliding_windows((GRID, GRID), size)
            query = encode_token_windows(backbone, image[None], windows)[0]
            memory = encode_token_windows(backbone, references, windows).flatten(0, 1)
            scores = nearest(query, memory)
            maps.append(plain_harmonic_grid(scores, size))
    return patch_map, sum(maps) / len(maps)


@pytest.fixture(scope="module")
def few_shot(tiny_backbone, tiny_images):
    """k=2 with tiny_images[0:2] as the references of every class; the batch is all three images."""
    method = build_method("winclip", backbone=tiny_backbone, k_shot=2)
    method.set_reference_images(tiny_images[:2])
    return method, method(tiny_images, ["bottle", "screw", "bottle"])


def test_few_shot_map_equals_plain_computation(tiny_backbone, tiny_images, few_shot, batch_output):
    _, out = few_shot
    patch_map, few_map = plain_few_shot(tiny_backbone, tiny_images[2], tiny_images[:2])
    torch.testing.assert_close(out.extras["few_shot_patch_map"][2], patch_map, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.extras["few_shot_map"][2], few_map, atol=1e-5, rtol=1e-4)
    # fusion: plain means of the zero-shot map / score and the few-shot map / its maximum
    zero_map = batch_output.extras["grid_map"][2]
    torch.testing.assert_close(out.extras["grid_map"][2], (zero_map + few_map) / 2, atol=1e-5, rtol=1e-4)
    expected_score = (float(batch_output.scores[2]) + float(few_map.max())) / 2
    assert float(out.scores[2]) == pytest.approx(expected_score, abs=1e-5)
    upsampled = F.interpolate(((zero_map + few_map) / 2)[None, None], size=(TINY_SIZE, TINY_SIZE), mode="bilinear",
                              align_corners=False)[0, 0]
    torch.testing.assert_close(out.maps[2], upsampled, atol=1e-5, rtol=1e-4)


def test_few_shot_keeps_the_zero_shot_parts(few_shot, batch_output):
    _, out = few_shot
    torch.testing.assert_close(out.extras["zero_shot_map"], batch_output.extras["grid_map"])
    torch.testing.assert_close(out.extras["zero_shot_scores"], batch_output.scores)


def test_k1_with_the_test_image_itself_gives_a_near_zero_map(tiny_backbone, tiny_images, batch_output):
    # few_shot_clamp: the distances to itself are 0 +- rounding; clamped, the harmonic means stay within [0, max]
    method = build_method("winclip", backbone=tiny_backbone, k_shot=1, few_shot_clamp=True)
    method.set_reference_images(tiny_images[1:2])
    out = method(tiny_images[1:2], ["screw"])
    assert float(out.extras["few_shot_map"].abs().max()) < 1e-5
    assert float(out.scores[0]) == pytest.approx(float(batch_output.scores[1]) / 2, abs=1e-5)
    torch.testing.assert_close(out.extras["grid_map"][0], batch_output.extras["grid_map"][1] / 2, atol=1e-5, rtol=1e-4)


def test_clamp_changes_only_negative_distances(tiny_backbone, tiny_images, few_shot):
    method, out = few_shot
    clamped = build_method("winclip", backbone=tiny_backbone, k_shot=2, few_shot_clamp=True)
    clamped.set_reference_images(tiny_images[:2])
    got = clamped(tiny_images, ["bottle", "screw", "bottle"])
    # image 2 is not in the memory: all its distances are > 0 and clamping changes nothing
    assert float(out.extras["few_shot_map"][2].min()) > 1e-3
    torch.testing.assert_close(got.maps[2], out.maps[2])
    # images 0 and 1 are in the memory: every patch and window has itself at distance 0
    assert float(got.extras["few_shot_map"][:2].min()) >= 0.0
    assert float(got.extras["few_shot_map"][:2].max()) < 1e-5


def test_few_shot_batch_size_does_not_change_results(few_shot, tiny_images):
    method, out = few_shot
    names = ["bottle", "screw", "bottle"]
    singles = [method(tiny_images[i:i + 1], [names[i]]) for i in range(3)]
    torch.testing.assert_close(torch.cat([s.scores for s in singles]), out.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([s.maps for s in singles]), out.maps, atol=1e-5, rtol=1e-5)


def test_reference_batch_does_not_change_the_memory(tiny_backbone, tiny_images, few_shot):
    _, out = few_shot
    method = build_method("winclip", backbone=tiny_backbone, k_shot=2, reference_batch=1)
    method.set_reference_images(tiny_images[:2])
    again = method(tiny_images, ["bottle", "screw", "bottle"])
    torch.testing.assert_close(again.maps, out.maps, atol=1e-5, rtol=1e-5)


def test_memory_is_per_class_with_a_shared_fallback(tiny_backbone, tiny_images, few_shot):
    _, out = few_shot
    method = build_method("winclip", backbone=tiny_backbone)  # k_shot 0: set_reference_images sets it to K
    method.set_reference_images(tiny_images[2:3].repeat(2, 1, 1, 1), class_name="screw")
    with pytest.raises(MethodError, match="no reference images for class 'bottle'"):
        method(tiny_images[:1], ["bottle"])
    method.set_reference_images(tiny_images[:2])  # every other class
    assert method.config.k_shot == 2
    mixed = method(tiny_images, ["bottle", "screw", "bottle"])
    torch.testing.assert_close(mixed.maps[[0, 2]], out.maps[[0, 2]], atol=1e-5, rtol=1e-5)
    assert float(mixed.extras["few_shot_map"][1].abs().max()) > 1e-3  # image 1 ("screw") is not in its memory
    assert set(method.describe()["reference_images"]) == {"*", "screw"}


def test_reference_count_must_match_k_shot(tiny_backbone, tiny_images):
    method = build_method("winclip", backbone=tiny_backbone, k_shot=2)
    with pytest.raises(MethodError, match="k_shot=2"):
        method.set_reference_images(tiny_images[:1])
    with pytest.raises(MethodError, match="no reference images"):
        method(tiny_images[:1], ["bottle"])
    with pytest.raises(MethodError, match="k_shot must be >= 0"):
        build_method("winclip", backbone=tiny_backbone, k_shot=-1)


def test_visual_association_is_min_half_cosine_distance():
    generator = torch.Generator().manual_seed(3)
    queries, memory = torch.randn(2, 5, 7, generator=generator), torch.randn(4, 7, generator=generator)
    expected = torch.tensor([[min((1 - float(F.cosine_similarity(q, m, dim=0))) / 2 for m in memory) for q in row]
                             for row in queries])
    torch.testing.assert_close(visual_association(queries, memory), expected, atol=1e-6, rtol=1e-5)


def test_fit_reference_draws_seeded_normal_train_images(tiny_backbone, synthetic_root):
    from zsadlib.data import open_dataset

    train = open_dataset("synthetic", synthetic_root, split="train", classes=["carpet", "pill"], image_size=TINY_SIZE)
    first = normal_reference_images(train, 2, seed=0)
    assert set(first) == {"carpet", "pill"}
    assert [first[name][1] for name in first] == [normal_reference_images(train, 2, seed=0)[n][1] for n in first]
    assert first["carpet"][1] != normal_reference_images(train, 2, seed=1)["carpet"][1]
    labels = {str(r.image_path): r.label for r in train.records}
    assert all(labels[path] == 0 and "/carpet/" in path for path in first["carpet"][1])
    method = build_method("winclip", backbone=tiny_backbone, k_shot=2)
    assert method.fit_reference(train, seed=0, progress=False) == {n: paths for n, (_, paths) in first.items()}
    assert method._reference_memory["pill"]["patches"].shape[0] == 2 * GRID * GRID
    with pytest.raises(MethodError, match="fewer than k_shot=99"):
        normal_reference_images(train, 99)


def test_reference_images_from_folder(tmp_path, tiny_images):
    from PIL import Image

    for sub in ("a", "b"):
        (tmp_path / "per_class" / sub).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 30), (40 * i, 10, 200)).save(tmp_path / "per_class" / sub / f"{i}.png")
    chosen = reference_images_from_folder(tmp_path / "per_class", TINY_SIZE, k=2)
    assert set(chosen) == {"a", "b"} and chosen["a"][0].shape == (2, 3, TINY_SIZE, TINY_SIZE)
    assert [p.rsplit("/", 1)[-1] for p in chosen["b"][1]] == ["0.png", "1.png"]
    shared = reference_images_from_folder(tmp_path / "per_class" / "a", TINY_SIZE)
    assert set(shared) == {None} and shared[None][0].shape[0] == 3
    with pytest.raises(MethodError, match="fewer than 5"):
        reference_images_from_folder(tmp_path / "per_class", TINY_SIZE, k=5)


def test_cli_eval_k_shot_and_reference_folder(capsys, tmp_path, synthetic_root):
    import json

    from zsadlib.cli import main

    common = ["eval", "--method", "winclip", "--dataset", "synthetic", "--data-root", str(synthetic_root),
              "--classes", "carpet", "--max-per-class", "4", "--backbone", "tiny", "--pretrained", "none",
              "--image-size", str(TINY_SIZE), "--device", "cpu", "--quiet"]
    assert main([*common, "--k-shot", "2", "--out", str(tmp_path / "k2")]) == 0
    summary = json.loads((tmp_path / "k2" / "metrics.json").read_text())
    assert summary["method"]["config"]["k_shot"] == 2
    paths = summary["method"]["reference_images"]["carpet"]
    assert len(paths) == 2 and all("/train/good/" in p for p in paths)
    folder = tmp_path / "refs"
    folder.mkdir()
    for path in paths:
        (folder / path.rsplit("/", 1)[-1]).write_bytes(open(path, "rb").read())
    assert main([*common, "--reference-images", str(folder), "--out", str(tmp_path / "dir")]) == 0
    again = json.loads((tmp_path / "dir" / "metrics.json").read_text())
    assert again["method"]["config"]["k_shot"] == 2
    assert again["metrics"] == summary["metrics"]  # the same two images, from the folder instead of the dataset
    capsys.readouterr()
    assert main([*common, "--k-shot", "0"]) != 0
    assert "--k-shot must be at least 1" in capsys.readouterr().err
