"""zsadlib.ops: every kernel against a plain implementation (numpy / scipy / explicit loops)."""
import math
import re

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from zsadlib import ops


def rng(seed=0):
    return np.random.default_rng(seed)


# ---- plain references --------------------------------------------------------------------------------------
def plain_cosine(patches, text):
    """patches [B, N, D], text [C, D] or [B, C, D] -> [B, N, C] with explicit loops."""
    batch, count, _ = patches.shape
    per_image = text if text.ndim == 3 else np.stack([text] * batch)
    out = np.zeros((batch, count, per_image.shape[1]))
    for b in range(batch):
        for n in range(count):
            for c in range(per_image.shape[1]):
                u, v = patches[b, n], per_image[b, c]
                out[b, n, c] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return out


def plain_bilinear(image, out_h, out_w):
    """Half-pixel-centre bilinear resize of one [h, w] array (PyTorch align_corners=False semantics)."""
    in_h, in_w = image.shape

    def taps(out_size, in_size):
        result = []
        for i in range(out_size):
            src = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
            low = min(int(math.floor(src)), in_size - 1)
            high = min(low + 1, in_size - 1)
            result.append((low, high, src - low))
        return result

    rows, cols = taps(out_h, in_h), taps(out_w, in_w)
    out = np.zeros((out_h, out_w))
    for i, (r0, r1, fr) in enumerate(rows):
        for j, (c0, c1, fc) in enumerate(cols):
            top = image[r0, c0] * (1 - fc) + image[r0, c1] * fc
            bottom = image[r1, c0] * (1 - fc) + image[r1, c1] * fc
            out[i, j] = top * (1 - fr) + bottom * fr
    return out


def plain_windows(h, w, size, stride=1):
    windows = []
    for top in range(0, h - size + 1, stride):
        for left in range(0, w - size + 1, stride):
            windows.append([(top + dr) * w + (left + dc) for dr in range(size) for dc in range(size)])
    return np.array(windows)


def plain_harmonic_aggregate(scores, windows, h, w):
    batch = scores.shape[0]
    out = np.zeros((batch, h * w))
    for b in range(batch):
        for patch in range(h * w):
            covering = [m for m in range(windows.shape[0]) if patch in windows[m]]
            values = [scores[b, m] for m in covering]
            if not values or min(values) == 0:
                out[b, patch] = 0.0
            else:
                out[b, patch] = len(values) / sum(1.0 / v for v in values)
    return out.reshape(batch, h, w)


# ---- similarity --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_image_text", [False, True])
def test_cosine_similarity_maps_matches_loops(per_image_text):
    generator = rng(1)
    patches = generator.normal(size=(2, 5, 7))
    text = generator.normal(size=(2, 3, 7) if per_image_text else (3, 7))
    got = ops.cosine_similarity_maps(torch.from_numpy(patches), torch.from_numpy(text))
    assert got.shape == (2, 5, 3)
    np.testing.assert_allclose(got.numpy(), plain_cosine(patches, text), atol=1e-12)


def test_anomaly_probability_is_tempered_softmax():
    generator = rng(2)
    patches, text = generator.normal(size=(3, 4, 6)), generator.normal(size=(2, 6))
    cos = plain_cosine(patches, text)
    logits = cos / 0.07
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    got = ops.anomaly_probability(torch.from_numpy(patches), torch.from_numpy(text), temperature=0.07)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    with pytest.raises(ValueError):
        ops.anomaly_probability(torch.from_numpy(patches), torch.from_numpy(generator.normal(size=(3, 6))))


def test_layer_anomaly_map_formula_and_layout():
    generator = rng(3)
    probs = generator.random(size=(2, 6, 2))
    got = ops.layer_anomaly_map(torch.from_numpy(probs), (2, 3)).numpy()
    for b in range(2):
        for r in range(2):
            for c in range(3):
                p = probs[b, r * 3 + c]
                assert got[b, r, c] == pytest.approx((p[1] + 1 - p[0]) / 2)


# ---- post-processing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_size,out_size", [((4, 4), (16, 16)), ((3, 5), (7, 11)), ((8, 8), (5, 3))])
def test_upsample_maps_matches_plain_bilinear(in_size, out_size):
    maps = rng(4).random(size=(2, *in_size))
    got = ops.upsample_maps(torch.from_numpy(maps), out_size).numpy()
    expected = np.stack([plain_bilinear(m, *out_size) for m in maps])
    np.testing.assert_allclose(got, expected, atol=1e-12)
    stacked = rng(5).random(size=(2, 3, *in_size)).astype(np.float32)
    got4 = ops.upsample_maps(torch.from_numpy(stacked), out_size)
    assert got4.shape == (2, 3, *out_size) and got4.dtype == torch.float32
    np.testing.assert_allclose(got4[1, 2].numpy(), plain_bilinear(stacked[1, 2].astype(np.float64), *out_size),
                               atol=1e-6)


@pytest.mark.parametrize(
    "shape,sigma",
    [((2, 32, 32), 4.0), ((3, 37, 29), 4.0), ((1, 8, 8), 4.0), ((2, 5, 3), 1.5), ((1, 1, 6), 2.0), ((2, 20, 20), 8.0)],
)
def test_gaussian_blur_matches_scipy_reflect(shape, sigma):
    maps = rng(6).random(size=shape).astype(np.float32)
    expected = np.stack([ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in maps])
    got = ops.gaussian_blur(torch.from_numpy(maps), sigma)
    assert got.shape == maps.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_gaussian_blur_float64_leading_dims_and_sigma_zero():
    maps = rng(7).random(size=(2, 3, 9, 10))
    expected = np.stack([[ndimage.gaussian_filter(m, 2.5, mode="reflect") for m in group] for group in maps])
    np.testing.assert_allclose(ops.gaussian_blur(torch.from_numpy(maps), 2.5).numpy(), expected, atol=1e-12)
    same = ops.gaussian_blur(torch.from_numpy(maps), 0.0)
    np.testing.assert_array_equal(same.numpy(), maps)


@pytest.mark.parametrize("sigma", [0.6, 1.2, 1.3, 2.6, 3.9])
def test_gaussian_blur_radius_rounding_matches_scipy(sigma):
    # sigmas where 4 * sigma has a fractional part on either side of 0.5, so a radius of int(4 sigma),
    # ceil(4 sigma) or round-half-down instead of scipy's int(4 sigma + 0.5) changes the result
    maps = rng(11).random(size=(2, 23, 19))
    expected = np.stack([ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in maps])
    got = ops.gaussian_blur(torch.from_numpy(maps), sigma)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    got32 = ops.gaussian_blur(torch.from_numpy(maps.astype(np.float32)), sigma)
    np.testing.assert_allclose(got32.numpy(), expected, rtol=0, atol=1e-6)


def test_gaussian_kernel_radius_follows_scipy():
    for sigma in (0.5, 1.0, 1.2, 2.6, 4.0, 8.0):
        kernel = ops.gaussian_kernel1d(sigma)
        assert kernel.numel() == 2 * int(4.0 * sigma + 0.5) + 1
        assert float(kernel.sum()) == pytest.approx(1.0)


# ---- aggregation -------------------------------------------------------------------------------------------
def test_harmonic_mean_matches_scipy():
    values = rng(8).random(size=(4, 5)) + 0.05
    np.testing.assert_allclose(ops.harmonic_mean(torch.from_numpy(values)).numpy(), stats.hmean(values, axis=-1))
    np.testing.assert_allclose(ops.harmonic_mean(torch.from_numpy(values), dim=0).numpy(),
                               stats.hmean(values, axis=0))
    assert float(ops.harmonic_mean(torch.tensor([0.0, 0.5]))) == 0.0


@pytest.mark.parametrize("grid,size,stride", [((8, 8), 2, 1), ((8, 8), 3, 1), ((5, 7), 3, 1), ((6, 6), 2, 2),
                                              ((4, 4), 4, 1)])
def test_sliding_windows_match_loops_and_cover_grid(grid, size, stride):
    h, w = grid
    got = ops.sliding_windows(grid, size, stride)
    expected = plain_windows(h, w, size, stride)
    np.testing.assert_array_equal(got.numpy(), expected)
    assert got.dtype == torch.long
    if stride == 1:
        assert got.shape == ((h - size + 1) * (w - size + 1), size * size)
        assert set(got.flatten().tolist()) == set(range(h * w))
    with pytest.raises(ValueError):
        ops.sliding_windows(grid, max(grid) + 1)


def test_harmonic_aggregate_matches_loops():
    h, w = 5, 6
    generator = rng(9)
    for size, stride in ((2, 1), (3, 1), (3, 2)):
        windows = plain_windows(h, w, size, stride)
        scores = generator.random(size=(2, windows.shape[0])) + 0.01
        scores[1, 0] = 0.0  # a zero-score window zeroes the patches it covers (anomalib convention)
        got = ops.harmonic_aggregate(torch.from_numpy(scores), torch.from_numpy(windows), (h, w))
        np.testing.assert_allclose(got.numpy(), plain_harmonic_aggregate(scores, windows, h, w), atol=1e-12)


def test_harmonic_aggregate_worked_example():
    # 3 x 3 grid, four 2 x 2 windows scoring 1, 0.75, 0.5, 0.25: the centre patch sees all four
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25]])
    got = ops.harmonic_aggregate(scores, ops.sliding_windows((3, 3), 2), (3, 3))
    assert got[0, 0, 0] == pytest.approx(1.0)
    assert got[0, 1, 1] == pytest.approx(4 / (1 + 1 / 0.75 + 2 + 4))
    assert got[0, 2, 2] == pytest.approx(0.25)


def test_topk_mean_matches_sort():
    x = rng(10).normal(size=(3, 20))
    for k in (1, 5, 20):
        expected = np.sort(x, axis=1)[:, ::-1][:, :k].mean(axis=1)
        np.testing.assert_allclose(ops.topk_mean(torch.from_numpy(x), k).numpy(), expected)
    with pytest.raises(ValueError):
        ops.topk_mean(torch.from_numpy(x), 21)


def test_layer_maps_fuse_and_pixel_probabilities_match_plain_steps():
    generator = torch.Generator().manual_seed(3)
    probs = [torch.softmax(torch.randn(2, 12, 2, generator=generator), dim=-1) for _ in range(3)]
    maps = ops.layer_maps(probs, (3, 4), (6, 8))
    for index, p in enumerate(probs):
        plain = ((p[..., 1] + 1 - p[..., 0]) / 2).reshape(2, 1, 3, 4)
        expected = torch.nn.functional.interpolate(plain, size=(6, 8), mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(maps[:, index], expected)
    torch.testing.assert_close(ops.fuse_layers(maps, "sum"), maps[:, 0] + maps[:, 1] + maps[:, 2])
    torch.testing.assert_close(ops.fuse_layers(maps, "mean"), (maps[:, 0] + maps[:, 1] + maps[:, 2]) / 3)
    with pytest.raises(ValueError):
        ops.fuse_layers(maps, "max")
    pixel = ops.pixel_probabilities(probs[0], (3, 4), (6, 8))
    expected = torch.nn.functional.interpolate(probs[0].permute(0, 2, 1).reshape(2, 2, 3, 4), size=(6, 8),
                                               mode="bilinear", align_corners=False)
    torch.testing.assert_close(pixel, expected)


# ---- input checks (mutation testing: these branches were reachable by no test) ------------------------------
def test_sliding_windows_of_one_patch_and_bad_sizes():
    single = ops.sliding_windows((3, 4), 1)
    assert single.tolist() == [[i] for i in range(12)]
    for size, stride in ((0, 1), (2, 0)):
        with pytest.raises(ValueError, match=rf"^window size and stride must be >= 1, got size={size}, stride={stride}$"):
            ops.sliding_windows((4, 4), size, stride)
    for grid in ((2, 5), (5, 2)):  # too tall for one side only
        with pytest.raises(ValueError, match=rf"^window size 3 does not fit in the {grid[0]} x {grid[1]} patch grid$"):
            ops.sliding_windows(grid, 3)


def test_harmonic_aggregate_and_topk_mean_refuse_bad_shapes():
    windows = ops.sliding_windows((3, 3), 2)  # [4, 4]
    for scores, wins in ((torch.ones(2, 4), windows[:, 0]), (torch.ones(4), windows), (torch.ones(2, 3), windows)):
        with pytest.raises(ValueError, match=r"^window_scores \[B, M\] and windows \[M, K\] do not fit: "
                                             rf"{re.escape(str(tuple(scores.shape)))}, {re.escape(str(tuple(wins.shape)))}$"):
            ops.harmonic_aggregate(scores, wins, (3, 3))
    with pytest.raises(ValueError, match=r"^x must be \[B, N\], got \(4,\)$"):
        ops.topk_mean(torch.ones(4), 1)
    with pytest.raises(ValueError, match=r"^k must be in 1..4, got 5$"):
        ops.topk_mean(torch.ones(2, 4), 5)


def test_similarity_kernels_refuse_bad_inputs_and_default_to_temperature_007():
    patches, text = torch.randn(2, 5, 4), torch.randn(2, 4)
    torch.testing.assert_close(ops.anomaly_probability(patches, text), ops.anomaly_probability(patches, text, 0.07))
    cases = [
        (lambda: ops.cosine_similarity_maps(torch.ones(5, 4), text), r"^patch_features must be \[B, N, D\], got \(5, 4\)$"),
        (lambda: ops.cosine_similarity_maps(patches, torch.ones(4)), r"^text_features must be \[C, D\] or \[B, C, D\], got \(4,\)$"),
        (lambda: ops.cosine_similarity_maps(patches, torch.ones(3, 2, 4)), r"^text_features batch 3 != patch batch 2$"),
        (lambda: ops.anomaly_probability(patches, torch.ones(3, 4)), r"^text_features must hold 2 rows \(normal, anomalous\), got \(3, 4\)$"),
        (lambda: ops.anomaly_probability(patches, text, 0.0), r"^temperature must be > 0, got 0.0$"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_gaussian_blur_single_map_half_precision_truncate_and_bad_input():
    one = rng(12).random(size=(9, 11))
    np.testing.assert_allclose(ops.gaussian_blur(torch.from_numpy(one), 1.2).numpy(),
                               ndimage.gaussian_filter(one, 1.2, mode="reflect", truncate=4.0), atol=1e-12)
    np.testing.assert_allclose(ops.gaussian_blur(torch.from_numpy(one), 1.7, truncate=2.0).numpy(),
                               ndimage.gaussian_filter(one, 1.7, mode="reflect", truncate=2.0), atol=1e-12)
    half = torch.from_numpy(one).half()
    blurred = ops.gaussian_blur(half, 1.2)  # blurred in float32, returned in float16
    assert blurred.dtype == torch.float16
    assert torch.equal(blurred, ops.gaussian_blur(half.float(), 1.2).half())
    x = np.arange(-5, 6, dtype=np.float64)
    plain = np.exp(-0.5 * (x / 1.2) ** 2)
    np.testing.assert_allclose(ops.gaussian_kernel1d(1.2).numpy(), plain / plain.sum(), rtol=0, atol=1e-15)
    for call, message in ((lambda: ops.gaussian_blur(torch.ones(4), 1.0), r"^maps must be \[\.\.\., H, W\], got \(4,\)$"),
                          (lambda: ops.gaussian_blur(torch.ones(3, 3), -1.0), r"^sigma must be >= 0, got -1.0$"),
                          (lambda: ops.gaussian_kernel1d(0.0), r"^sigma must be > 0, got 0.0$")):
        with pytest.raises(ValueError, match=message):
            call()


# ---- survivors of the full mutmut run (issue 15) ------------------------------------------------------------
def plain_nearest(image, out_h, out_w):
    """PyTorch's legacy ``mode="nearest"``: output pixel i takes input pixel floor(i * in / out)."""
    in_h, in_w = image.shape
    rows = [min(math.floor(i * in_h / out_h), in_h - 1) for i in range(out_h)]
    cols = [min(math.floor(j * in_w / out_w), in_w - 1) for j in range(out_w)]
    return image[np.ix_(rows, cols)]


@pytest.mark.parametrize("in_size,out_size", [((3, 5), (7, 11)), ((8, 8), (5, 3))])
def test_nearest_upsampling_and_pixel_probabilities_match_plain_nearest(in_size, out_size):
    maps = rng(13).random(size=(2, *in_size))
    got = ops.upsample_maps(torch.from_numpy(maps), out_size, mode="nearest").numpy()
    np.testing.assert_array_equal(got, np.stack([plain_nearest(m, *out_size) for m in maps]))
    probs = torch.softmax(torch.from_numpy(rng(14).normal(size=(2, in_size[0] * in_size[1], 2))), dim=-1)
    pixel = ops.pixel_probabilities(probs, in_size, out_size, mode="nearest")
    grid = probs.transpose(1, 2).reshape(2, 2, *in_size).numpy()
    expected = np.stack([[plain_nearest(c, *out_size) for c in image] for image in grid])
    np.testing.assert_array_equal(pixel.numpy(), expected)


def test_upsample_maps_keeps_a_single_layer_axis_the_dtype_and_upsamples_integer_maps_as_float():
    one_layer = rng(15).random(size=(2, 1, 3, 4))  # [B, L=1, h, w] stays 4-D
    got = ops.upsample_maps(torch.from_numpy(one_layer), (6, 8))
    assert got.shape == (2, 1, 6, 8)
    np.testing.assert_allclose(got[1, 0].numpy(), plain_bilinear(one_layer[1, 0], 6, 8), atol=1e-12)
    half = torch.from_numpy(one_layer[:, 0]).half()  # computed in float32, returned in float16
    got_half = ops.upsample_maps(half, (7, 9))
    assert got_half.dtype == torch.float16
    assert torch.equal(got_half, ops.upsample_maps(half.float(), (7, 9)).half())
    counts = torch.tensor([[[0, 3], [1, 2]]])  # an integer map is resized as float, not rounded back
    got_int = ops.upsample_maps(counts, (4, 4))
    assert got_int.dtype == torch.float32
    np.testing.assert_allclose(got_int[0].numpy(), plain_bilinear(counts[0].numpy().astype(np.float64), 4, 4),
                               atol=1e-6)


def test_map_kernels_refuse_bad_inputs_naming_them_and_fuse_by_sum_by_default():
    maps = torch.from_numpy(rng(16).random(size=(2, 3, 4, 5)))
    torch.testing.assert_close(ops.fuse_layers(maps), maps.sum(dim=1))  # AnomalyCLIP's sum is the default
    cases = [
        (lambda: ops.upsample_maps(torch.ones(4, 4), 8), r"^maps must be \[B, h, w\] or \[B, L, h, w\], got \(4, 4\)$"),
        (lambda: ops.upsample_maps(torch.ones(1, 4, 4), 8, mode="bicubic"),
         r"^upsampling mode must be 'bilinear' or 'nearest', not 'bicubic'$"),
        (lambda: ops.upsample_maps(torch.ones(1, 4, 4), (8, 8, 8)), r"^size must be an int or \(H, W\), got \(8, 8, 8\)$"),
        (lambda: ops.layer_anomaly_map(torch.ones(2, 6, 3), (2, 3)),  # 3 classes, right patch count
         r"^probs must be \[B, 6, 2\] for grid \(2, 3\), got \(2, 6, 3\)$"),
        (lambda: ops.layer_anomaly_map(torch.ones(2, 6, 1, 2), (2, 3)),  # 4-D, right patch count and classes
         r"^probs must be \[B, 6, 2\] for grid \(2, 3\), got \(2, 6, 1, 2\)$"),
        (lambda: ops.layer_anomaly_map(torch.ones(2, 5, 2), (2, 3)), r"^probs must be \[B, 6, 2\] for grid \(2, 3\), got \(2, 5, 2\)$"),
        (lambda: ops.fuse_layers(maps, "max"), r"^layer fusion must be 'sum' or 'mean', not 'max'$"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_cosine_similarity_maps_accepts_text_in_another_dtype():
    generator = rng(17)
    patches, text = generator.normal(size=(2, 5, 7)), generator.normal(size=(3, 7)).astype(np.float32)
    got = ops.cosine_similarity_maps(torch.from_numpy(patches), torch.from_numpy(text))  # computed in float64
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), plain_cosine(patches, text.astype(np.float64)), atol=1e-12)
