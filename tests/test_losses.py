"""zsadlib.losses against plain per-pixel implementations (Python loops / numpy) and simple properties."""
import math

import numpy as np
import pytest
import torch

from zsadlib.losses import dice_loss, focal_loss, image_cross_entropy, layer_pixel_losses


# ---- plain references ---------------------------------------------------------------------------------------
def plain_focal(probs, target, gamma=2.0, alpha=None, smooth=1e-5, balance_index=0):
    """One pixel at a time: smoothed one-hot, pt = <onehot, p> + smooth, -w_t (1 - pt)^gamma log pt, mean."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(target)
    batch, classes, height, width = p.shape
    if alpha is None:
        weights = [1.0] * classes
    elif isinstance(alpha, float):
        weights = [1.0 - alpha] * classes
        weights[balance_index] = alpha
    else:
        total = float(sum(alpha))
        weights = [a / total for a in alpha]
    losses = []
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                true_class = int(t[b, y, x])
                pt = 0.0
                for c in range(classes):
                    hot = 1.0 if c == true_class else 0.0
                    if smooth:
                        hot = min(max(hot, smooth / (classes - 1)), 1.0 - smooth)
                    pt += hot * p[b, c, y, x]
                pt += smooth
                losses.append(-weights[true_class] * (1.0 - pt) ** gamma * math.log(pt))
    return sum(losses) / len(losses)


def plain_dice(pred, target, smooth=1.0):
    """Per sample (2 * overlap + 1) / (sum p + sum t + 1), one minus the batch mean."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    coefficients = []
    for p, t in zip(pred, target):
        overlap = float((p * t).sum())
        coefficients.append((2 * overlap + smooth) / (p.sum() + t.sum() + smooth))
    return 1.0 - sum(coefficients) / len(coefficients)


def random_probs(batch=2, classes=2, size=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, size, size, generator=generator, dtype=torch.float64)
    target = torch.randint(0, classes, (batch, size, size), generator=generator)
    return logits.softmax(dim=1), target


# ---- focal ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 1.5])
def test_focal_matches_plain_loop(classes, gamma):
    probs, target = random_probs(classes=classes, seed=classes)
    expected = plain_focal(probs.numpy(), target.numpy(), gamma=gamma)
    assert float(focal_loss(probs, target, gamma=gamma)) == pytest.approx(expected, rel=1e-10)


# 0.3, [1, 2], [1, 2, 4] give weights float32 cannot hold (0.7, 1/3, 1/7): the loss is computed in the
# probabilities' dtype, so float64 matches the float64 loop to 1e-12, and bfloat16 (autocast) stays bfloat16
@pytest.mark.parametrize("alpha", [0.25, [1.0, 3.0], [2.0, 1.0, 1.0], 0.3, [1.0, 2.0], [1.0, 2.0, 4.0]])
def test_focal_alpha_conventions_match_plain_loop(alpha):
    classes = len(alpha) if isinstance(alpha, list) else 2
    probs, target = random_probs(classes=classes, seed=7)
    expected = plain_focal(probs.numpy(), target.numpy(), alpha=alpha)
    assert float(focal_loss(probs, target, alpha=alpha)) == pytest.approx(expected, rel=1e-12)
    for weights in (None, alpha):
        assert focal_loss(probs.bfloat16(), target, alpha=weights).dtype == torch.bfloat16


def test_focal_without_smoothing_is_textbook_focal():
    probs, target = random_probs(seed=3)
    pt = probs.gather(1, target[:, None])[:, 0]
    textbook = (-(1 - pt) ** 2 * pt.log()).mean()
    assert float(focal_loss(probs, target, smooth=0.0)) == pytest.approx(float(textbook), rel=1e-12)


def test_focal_accepts_bool_and_float_masks():
    probs, target = random_probs(seed=4)
    reference = focal_loss(probs, target)
    assert torch.equal(focal_loss(probs, target.bool()), reference)
    assert torch.equal(focal_loss(probs, target.double()), reference)


def test_focal_decreases_as_true_class_probability_rises():
    target = torch.ones(1, 1, 1, dtype=torch.long)
    values = []
    for p in [0.05, 0.2, 0.5, 0.8, 0.95, 0.999]:
        probs = torch.tensor([1 - p, p], dtype=torch.float64).view(1, 2, 1, 1)
        values.append(float(focal_loss(probs, target)))
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.0, abs=1e-6)


def test_focal_reductions_and_errors():
    probs, target = random_probs(seed=5)
    per_pixel = focal_loss(probs, target, reduction="none")
    assert per_pixel.shape == (probs.shape[0] * probs.shape[2] * probs.shape[3],)
    assert float(focal_loss(probs, target, reduction="sum")) == pytest.approx(float(per_pixel.sum()))
    with pytest.raises(ValueError, match="does not match"):
        focal_loss(probs, target[:, :2])
    with pytest.raises(ValueError, match="class indices"):
        focal_loss(probs, target + 5)
    with pytest.raises(ValueError, match="smooth"):
        focal_loss(probs, target, smooth=2.0)


def test_focal_gradient_flows():
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    focal_loss(logits.softmax(dim=1), torch.randint(0, 2, (2, 4, 4))).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


# ---- dice -----------------------------------------------------------------------------------------------------
def test_dice_matches_plain_loop():
    generator = torch.Generator().manual_seed(1)
    pred = torch.rand(3, 6, 6, generator=generator, dtype=torch.float64)
    target = torch.rand(3, 6, 6, generator=generator) > 0.7
    assert float(dice_loss(pred, target)) == pytest.approx(plain_dice(pred.numpy(), target.numpy()), rel=1e-12)


def test_dice_is_computed_in_the_prediction_dtype():
    generator = torch.Generator().manual_seed(2)
    pred = torch.rand(2, 5, 5, generator=generator)
    target = (torch.rand(2, 5, 5, generator=generator) > 0.6).double()  # a wider mask is cast to the prediction
    got = dice_loss(pred, target)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(plain_dice(pred.numpy(), target.numpy()), rel=1e-6)
    assert dice_loss(pred.bfloat16(), target.float()).dtype == torch.bfloat16  # autocast maps, float32 mask


def test_dice_is_per_sample_not_global():
    pred = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0]], [[1.0, 0.0]]])
    per_sample = 1 - ((2 * 2 + 1) / (2 + 2 + 1) + (0 + 1) / (0 + 1 + 1)) / 2
    assert float(dice_loss(pred, target)) == pytest.approx(per_sample)
    global_sums = 1 - (2 * 2 + 1) / (2 + 3 + 1)
    assert float(dice_loss(pred, target)) != pytest.approx(global_sums)


def test_dice_perfect_prediction_is_zero():
    target = torch.zeros(2, 8, 8)
    target[0, 2:5, 3:6] = 1
    assert float(dice_loss(target.clone(), target)) == 0.0
    assert float(dice_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))) == 0.0  # empty mask, empty prediction
    assert float(dice_loss(1 - target, target)) > 0.9


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        dice_loss(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))


# ---- image cross-entropy -----------------------------------------------------------------------------------
def test_image_cross_entropy_matches_numpy():
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.9], [-0.5, -0.5]])
    labels = torch.tensor([0, 1, 1])
    values = logits.numpy().astype(np.float64)
    log_softmax = values - np.log(np.exp(values).sum(axis=1, keepdims=True))
    expected = -np.mean([log_softmax[i, labels[i]] for i in range(3)])
    assert float(image_cross_entropy(logits, labels)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        image_cross_entropy(logits[0], labels)


# ---- input checks (mutation testing: these branches were reachable by no test) ------------------------------
def test_dice_accepts_one_value_per_sample_and_refuses_an_empty_batch():
    pred, target = torch.tensor([0.2, 0.9, 0.5, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    plain = 1 - np.mean([(2 * p * t + 1) / (p + t + 1) for p, t in zip(pred.tolist(), target.tolist())])
    assert float(dice_loss(pred, target)) == pytest.approx(plain, abs=1e-6)
    with pytest.raises(ValueError, match="^dice_loss needs a non-empty batch$"):
        dice_loss(torch.zeros(0, 3, 3), torch.zeros(0, 3, 3))


def test_focal_on_rows_equals_focal_on_one_pixel_maps_and_checks_its_inputs():
    probs, target = random_probs(seed=7)  # [B, C, H, W], [B, H, W]
    classes = probs.shape[1]
    rows = probs.permute(0, 2, 3, 1).reshape(-1, classes)  # [N, C], the documented second form
    row_target = target.reshape(-1)
    as_maps = rows[:, :, None, None]  # each row as a 1 x 1 map
    for alpha in (None, 0.25, [0.2] * classes):
        assert float(focal_loss(rows, row_target, alpha=alpha)) == pytest.approx(
            float(focal_loss(as_maps, row_target[:, None, None], alpha=alpha)), rel=1e-6)
    assert float(focal_loss(rows, row_target, smooth=1.0)) == pytest.approx(  # smooth = 1 is allowed
        float(focal_loss(as_maps, row_target[:, None, None], smooth=1.0)), rel=1e-6)
    with pytest.raises(ValueError, match=rf"^target class indices must lie in 0..{classes - 1}$"):
        focal_loss(rows, torch.full_like(row_target, classes))
    with pytest.raises(ValueError, match=r"^probs must be \[B, C, H, W\] or \[N, C\], got \(4,\)$"):
        focal_loss(torch.ones(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^reduction must be 'mean', 'sum' or 'none', not 'max'$"):
        focal_loss(rows, row_target, reduction="max")
    with pytest.raises(ValueError, match=rf"^alpha has 1 weights for {classes} classes$"):
        focal_loss(rows, row_target, alpha=[0.5])
    with pytest.raises(ValueError, match=rf"^balance_index {classes} out of range for {classes} classes$"):
        focal_loss(rows, row_target, alpha=0.25, balance_index=classes)
    with pytest.raises(TypeError, match="^alpha must be None, a float, or a sequence of per-class weights$"):
        focal_loss(rows, row_target, alpha=True)


# ---- survivors of the full mutmut run (issue 15) ------------------------------------------------------------
def test_focal_of_an_all_normal_batch_matches_plain_loop():
    # a batch of normal images only: no pixel of the highest class, the one-hot still has every class
    for classes in (2, 3):
        probs, _ = random_probs(classes=classes, seed=9)
        target = torch.zeros(probs.shape[0], *probs.shape[2:], dtype=torch.long)
        expected = plain_focal(probs.numpy(), target.numpy())
        assert float(focal_loss(probs, target)) == pytest.approx(expected, rel=1e-10)


def test_focal_on_flattened_maps_equals_focal_on_maps():
    probs, target = random_probs(seed=10)  # [B, C, H, W]
    flat = probs.reshape(*probs.shape[:2], -1)  # [B, C, H*W], what the reference's view(N, C, -1) makes
    assert float(focal_loss(flat, target.reshape(target.shape[0], -1))) == pytest.approx(
        float(focal_loss(probs, target)), rel=1e-12)


def test_focal_and_image_cross_entropy_errors_name_the_problem():
    with pytest.raises(ValueError, match="^label smoothing needs at least 2 classes$"):
        focal_loss(torch.ones(2, 1, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long))
    logits = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"^logits must be \[B, C\], got \(2,\)$"):
        image_cross_entropy(logits[0], torch.zeros(3))
    with pytest.raises(ValueError, match=r"^labels \(2,\) do not match logits \(3, 2\)$"):
        image_cross_entropy(logits, torch.zeros(2))


def plain_layer_losses(layers, mask, gamma=2.0, smooth=1e-5, dice_on_normal=True):
    """Sum over layers of the plain focal loss and of dice(p_anomalous, mask) [+ dice(p_normal, 1 - mask)]."""
    mask = np.asarray(mask, dtype=np.float64)
    focal = sum(plain_focal(p, mask, gamma=gamma, smooth=smooth) for p in layers)
    dice = sum(plain_dice(p[:, 1], mask) + (plain_dice(p[:, 0], 1 - mask) if dice_on_normal else 0.0)
               for p in layers)
    return focal, dice


def test_layer_pixel_losses_sum_focal_and_dice_over_layers():
    layers = [random_probs(seed=seed)[0] for seed in (11, 12, 13)]  # L = 3 maps [B, 2, H, W]
    mask = random_probs(seed=14)[1].bool()  # [B, H, W], both classes present
    assert mask.any() and not mask.all()
    arrays = [p.numpy() for p in layers]
    for kwargs in ({}, {"gamma": 1.5, "smooth": 1e-3, "dice_on_normal": False}):
        focal, dice = layer_pixel_losses(layers, mask, **kwargs)
        expected_focal, expected_dice = plain_layer_losses(arrays, mask.numpy(), **kwargs)
        assert focal.shape == dice.shape == ()
        assert float(focal) == pytest.approx(expected_focal, rel=1e-10)
        assert float(dice) == pytest.approx(expected_dice, rel=1e-10)
