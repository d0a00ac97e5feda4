"""MiB / LwF / LwF-MC / ILT losses vs per-pixel loops written from docs/protocol.md §3 and MiB's definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from ucdseg.losses import (
    feature_distillation,
    knowledge_distillation,
    label_bce,
    multiclass_bce_distillation,
    old_sigmoid_bce,
    unbiased_cross_entropy,
    unbiased_kd,
)


def make_logits(seed, b=2, c=6, h=3, w=4, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)


def make_labels(seed, values, b=2, h=3, w=4):
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor(values)
    return values[torch.randint(len(values), (b, h, w), generator=gen)]


def pixels(b, h, w):
    return [(i, j, k) for i in range(b) for j in range(h) for k in range(w)]


# ----------------------------------------------------------------------------------------------
# UNCE
# ----------------------------------------------------------------------------------------------
def naive_unce(z, y, c_old, ignore=255):
    b, _, h, w = z.shape
    out = torch.zeros(b, h, w, dtype=z.dtype)
    for i, j, k in pixels(b, h, w):
        lab = int(y[i, j, k])
        if lab == ignore:
            continue
        p = torch.softmax(z[i, :, j, k], dim=0)
        out[i, j, k] = -torch.log(p[:c_old].sum()) if lab < c_old else -torch.log(p[lab])
    return out


def test_unbiased_ce_matches_loop_with_ignore():
    z = make_logits(0)
    y = make_labels(1, [0, 1, 2, 3, 4, 5, 255])  # C_old = 4: labels 1..3 are old -> background
    want = naive_unce(z, y, 4)
    valid = y != 255
    got_map = unbiased_cross_entropy(z, y, 4, reduction="none")
    assert got_map.shape == (2, 3, 4)
    torch.testing.assert_close(got_map, want)
    assert torch.equal(got_map[~valid], torch.zeros(int((~valid).sum()), dtype=torch.float64))
    torch.testing.assert_close(unbiased_cross_entropy(z, y, 4), want[valid].mean())
    torch.testing.assert_close(unbiased_cross_entropy(z, y, 4, reduction="sum"), want.sum())


def test_unbiased_ce_custom_ignore_index_and_plain_ce_limit():
    z = make_logits(2)
    y = make_labels(3, [0, 4, 5, 7])
    y7 = y.clone()
    torch.testing.assert_close(
        unbiased_cross_entropy(z, y7, 3, ignore_index=7, reduction="none"),
        naive_unce(z, y7, 3, ignore=7),
    )
    # one old class (background only): UNCE is the ordinary cross-entropy
    y = make_labels(4, [0, 1, 2, 5, 255])
    torch.testing.assert_close(
        unbiased_cross_entropy(z, y, 1), F.cross_entropy(z, y, ignore_index=255)
    )


def test_unbiased_ce_hand_value_and_all_ignored():
    # 3 channels all equal, C_old = 2: background prob = 2/3, new class prob = 1/3
    z = torch.zeros(1, 3, 1, 2, requires_grad=True)
    y = torch.tensor([[[1, 2]]])
    loss = unbiased_cross_entropy(z, y, 2)
    assert loss.item() == pytest.approx((math.log(1.5) + math.log(3.0)) / 2)
    # every pixel ignored: exactly 0 (not NaN) and still differentiable
    loss = unbiased_cross_entropy(z, torch.full((1, 1, 2), 255), 2)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_unbiased_ce_gradient_matches_loop():
    z = make_logits(5).requires_grad_(True)
    y = make_labels(6, [0, 2, 4, 5, 255])
    unbiased_cross_entropy(z, y, 4).backward()
    z2 = z.detach().clone().requires_grad_(True)
    want = naive_unce(z2, y, 4)
    (want.sum() / (y != 255).sum()).backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_unbiased_ce_errors():
    z = make_logits(7)
    y = make_labels(8, [0, 4])
    with pytest.raises(ValueError, match="num_old_classes=0"):
        unbiased_cross_entropy(z, y, 0)
    with pytest.raises(ValueError, match="num_old_classes=7"):
        unbiased_cross_entropy(z, y, 7)
    with pytest.raises(ValueError, match="contain 6"):
        unbiased_cross_entropy(z, torch.where(y == 4, 6, y), 4)
    with pytest.raises(ValueError, match="contain -1"):
        unbiased_cross_entropy(z, y - 1, 4)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        unbiased_cross_entropy(z, y[:, :2], 4)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        unbiased_cross_entropy(z, y.float(), 4)
    with pytest.raises(ValueError, match="reduction"):
        unbiased_cross_entropy(z, y, 4, reduction="avg")


# ----------------------------------------------------------------------------------------------
# UNKD
# ----------------------------------------------------------------------------------------------
def naive_unkd(z, z_old, alpha=1.0):
    b, c_all, h, w = z.shape
    c_old = z_old.shape[1]
    out = torch.zeros(b, h, w, dtype=z.dtype)
    for i, j, k in pixels(b, h, w):
        p = torch.softmax(z[i, :, j, k], dim=0)
        q = torch.softmax(alpha * z_old[i, :, j, k], dim=0)
        p_bg = p[0] + sum(p[c] for c in range(c_old, c_all))
        total = q[0] * torch.log(p_bg)
        for c in range(1, c_old):
            total = total + q[c] * torch.log(p[c])
        out[i, j, k] = -total / c_old
    return out


@pytest.mark.parametrize("c_old", [2, 4, 6])  # 6 = no new class
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_unbiased_kd_matches_loop(c_old, alpha):
    z = make_logits(10)
    z_old = make_logits(11, c=c_old)
    want = naive_unkd(z, z_old, alpha)
    got = unbiased_kd(z, z_old, alpha=alpha, reduction="none")
    assert got.shape == (2, 3, 4)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(unbiased_kd(z, z_old, alpha=alpha), want.mean())
    torch.testing.assert_close(unbiased_kd(z, z_old, alpha=alpha, reduction="sum"), want.sum())


def test_unbiased_kd_hand_value_and_gradients():
    # C_all = 3, C_old = 2, all logits 0: q = (1/2, 1/2), p_bg = p0 + p2 = 2/3, p1 = 1/3
    # loss = -(0.5 log(2/3) + 0.5 log(1/3)) / 2 = (log 1.5 + log 3) / 4
    z = torch.zeros(1, 3, 1, 1, requires_grad=True)
    z_old = torch.zeros(1, 2, 1, 1, requires_grad=True)
    loss = unbiased_kd(z, z_old)
    assert loss.item() == pytest.approx((math.log(1.5) + math.log(3.0)) / 4)
    loss.backward()
    assert z_old.grad is None and z.grad.abs().sum() > 0


def test_unbiased_kd_errors():
    z = make_logits(12)
    with pytest.raises(ValueError, match="old_logits"):
        unbiased_kd(z, make_logits(13, c=7))
    with pytest.raises(ValueError, match="old_logits"):
        unbiased_kd(z, make_logits(13, c=3, h=2))
    with pytest.raises(ValueError, match="reduction"):
        unbiased_kd(z, make_logits(13, c=3), reduction="max")


# ----------------------------------------------------------------------------------------------
# KD (LwF)
# ----------------------------------------------------------------------------------------------
def naive_kd(z, z_old, alpha=1.0):
    b, _, h, w = z.shape
    c_old = z_old.shape[1]
    out = torch.zeros(b, h, w, dtype=z.dtype)
    for i, j, k in pixels(b, h, w):
        logp = torch.log_softmax(z[i, :c_old, j, k], dim=0)
        q = torch.softmax(alpha * z_old[i, :, j, k], dim=0)
        out[i, j, k] = -sum(q[c] * logp[c] for c in range(c_old)) / c_old
    return out


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_knowledge_distillation_matches_loop(alpha):
    z = make_logits(20)
    z_old = make_logits(21, c=4)
    want = naive_kd(z, z_old, alpha)
    torch.testing.assert_close(knowledge_distillation(z, z_old, alpha=alpha, reduction="none"), want)
    torch.testing.assert_close(knowledge_distillation(z, z_old, alpha=alpha), want.mean())
    torch.testing.assert_close(
        knowledge_distillation(z, z_old, alpha=alpha, reduction="sum"), want.sum()
    )


def test_knowledge_distillation_hand_value():
    # the new channel (index 2) is ignored: log-softmax over 2 channels of 0 -> log 1/2
    # loss = -(1/2) * (0.5 log 0.5 + 0.5 log 0.5) = log(2) / 2
    z = torch.tensor([[[[0.0]], [[0.0]], [[50.0]]]])
    z_old = torch.zeros(1, 2, 1, 1)
    assert knowledge_distillation(z, z_old).item() == pytest.approx(math.log(2.0) / 2)


# ----------------------------------------------------------------------------------------------
# LwF-MC
# ----------------------------------------------------------------------------------------------
def naive_lwf_mc(z, z_old, y, ignore=255):
    b, c_all, h, w = z.shape
    c_old = z_old.shape[1]
    out = torch.zeros(b, h, w, dtype=z.dtype)
    for i, j, k in pixels(b, h, w):
        total = 0.0
        for c in range(c_all):
            if c < c_old:
                t = torch.sigmoid(z_old[i, c, j, k])
            else:
                t = 1.0 if int(y[i, j, k]) == c else 0.0
            s = torch.sigmoid(z[i, c, j, k])
            total = total - (t * torch.log(s) + (1 - t) * torch.log(1 - s))
        out[i, j, k] = total
    return out


def test_multiclass_bce_distillation_matches_loop():
    z = make_logits(30)
    z_old = make_logits(31, c=4)
    y = make_labels(32, [0, 1, 3, 4, 5, 255])
    want = naive_lwf_mc(z, z_old, y)
    torch.testing.assert_close(multiclass_bce_distillation(z, z_old, y, reduction="none"), want)
    torch.testing.assert_close(multiclass_bce_distillation(z, z_old, y), want.mean())
    torch.testing.assert_close(multiclass_bce_distillation(z, z_old, y, reduction="sum"), want.sum())


def test_multiclass_bce_distillation_hand_value():
    # 1 pixel, C_all = 3, C_old = 2, label 2, logits z = (0, 0, 0), old logits (0, 0):
    # every channel is BCE(sigmoid(0) = 1/2, t) = log 2 whatever t -> 3 log 2.
    # with z_2 = 10 and label 2 (t = 1): channel 2 costs log(1 + e^-10) instead.
    z = torch.tensor([[[[0.0]], [[0.0]], [[10.0]]]])
    z_old = torch.zeros(1, 2, 1, 1)
    y = torch.tensor([[[2]]])
    want = 2 * math.log(2.0) + math.log1p(math.exp(-10.0))
    assert multiclass_bce_distillation(z, z_old, y).item() == pytest.approx(want, rel=1e-6)
    # label 0 (t_2 = 0): channel 2 costs log(1 + e^10)
    want0 = 2 * math.log(2.0) + math.log1p(math.exp(10.0))
    assert multiclass_bce_distillation(z, z_old, y * 0).item() == pytest.approx(want0, rel=1e-6)
    # ignored pixel: the same targets as background (MiB's behaviour)
    assert multiclass_bce_distillation(z, z_old, y * 0 + 255).item() == pytest.approx(
        want0, rel=1e-6
    )


def test_multiclass_bce_distillation_errors():
    z = make_logits(33)
    with pytest.raises(ValueError, match="contain 6"):
        multiclass_bce_distillation(z, make_logits(34, c=4), make_labels(35, [0, 6]))
    with pytest.raises(ValueError, match="old_logits"):
        multiclass_bce_distillation(z, make_logits(34, c=8), make_labels(35, [0, 5]))


def naive_label_bce(z, y, ignore=255):
    """MiB's BCEWithLogitsLossWithIgnoreIndex(reduction='none'): sum over channels, 0 on void."""
    b, c_all, h, w = z.shape
    out = torch.zeros(b, h, w, dtype=z.dtype)
    for i, j, k in pixels(b, h, w):
        if int(y[i, j, k]) == ignore:
            continue
        for c in range(c_all):
            t = 1.0 if int(y[i, j, k]) == c else 0.0
            s = torch.sigmoid(z[i, c, j, k])
            out[i, j, k] -= t * torch.log(s) + (1 - t) * torch.log(1 - s)
    return out


def naive_old_sigmoid_bce(z, z_old):
    """MiB's icarl_combined term without its weight: C_old * mean over (B, C_old, H, W) of BCE."""
    b, _, h, w = z.shape
    c_old = z_old.shape[1]
    total = 0.0
    for i, j, k in pixels(b, h, w):
        for c in range(c_old):
            t, s = torch.sigmoid(z_old[i, c, j, k]), torch.sigmoid(z[i, c, j, k])
            total = total - (t * torch.log(s) + (1 - t) * torch.log(1 - s))
    return c_old * total / (b * c_old * h * w)


def test_label_bce_matches_loop_and_averages_over_all_pixels():
    z = make_logits(40)
    y = make_labels(41, [0, 1, 3, 5, 255])
    want = naive_label_bce(z, y)
    torch.testing.assert_close(label_bce(z, y, reduction="none"), want)
    torch.testing.assert_close(label_bce(z, y), want.sum() / y.numel())  # void pixels count in the mean
    torch.testing.assert_close(label_bce(z, y, reduction="sum"), want.sum())
    assert (label_bce(z, y, reduction="none")[y == 255] == 0).all()


def test_label_bce_hand_value():
    # 1 pixel, 2 channels, z = (0, 10), label 1: log 2 + log(1 + e^-10)
    z = torch.tensor([[[[0.0]], [[10.0]]]])
    assert label_bce(z, torch.tensor([[[1]]])).item() == pytest.approx(
        math.log(2.0) + math.log1p(math.exp(-10.0)), rel=1e-6)
    with pytest.raises(ValueError, match="contain 2"):
        label_bce(z, torch.tensor([[[2]]]))


def test_old_sigmoid_bce_matches_mib_combined_term():
    z = make_logits(42)
    z_old = make_logits(43, c=4)
    want = naive_old_sigmoid_bce(z, z_old)
    torch.testing.assert_close(old_sigmoid_bce(z, z_old), want)
    # MiB: icarl_importance * n_cl_old * BCEWithLogitsLoss(reduction='mean')(z[:, :C_old], sigmoid(z_old))
    mib = 4 * F.binary_cross_entropy_with_logits(z[:, :4], torch.sigmoid(z_old))
    torch.testing.assert_close(old_sigmoid_bce(z, z_old), mib)
    z.requires_grad_(True)
    old_sigmoid_bce(z, z_old).backward()
    assert (z.grad[:, 4:] == 0).all() and (z.grad[:, :4] != 0).any()  # new channels are not distilled


# ----------------------------------------------------------------------------------------------
# ILT feature MSE
# ----------------------------------------------------------------------------------------------
def test_feature_distillation_is_mse():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    b = torch.tensor([[1.0, 0.0], [0.0, 4.0]], requires_grad=True)
    loss = feature_distillation(a, b)
    assert loss.item() == pytest.approx((0 + 4 + 9 + 0) / 4)
    assert feature_distillation(a, b, reduction="sum").item() == pytest.approx(13.0)
    assert feature_distillation(a, b, reduction="none").tolist() == [[0.0, 4.0], [9.0, 0.0]]
    loss.backward()
    assert b.grad is None
    assert a.grad.tolist() == [[0.0, 1.0], [1.5, 0.0]]  # 2 (a - b) / 4
    with pytest.raises(ValueError, match="same shape"):
        feature_distillation(a, b[:1])
    with pytest.raises(ValueError, match="reduction"):
        feature_distillation(a, b, reduction="batchmean")


# ----------------------------------------------------------------------------------------------
# precision
# ----------------------------------------------------------------------------------------------
def test_half_inputs_are_computed_in_float32():
    z = make_logits(40, scale=4.0)
    z_old = make_logits(41, c=4, scale=4.0)
    y = make_labels(42, [0, 4, 5, 255])
    zh, zoh = z.half(), z_old.half()
    cases = [
        (unbiased_cross_entropy(zh, y, 4), naive_unce(zh.double(), y, 4)[y != 255].mean()),
        (unbiased_kd(zh, zoh), naive_unkd(zh.double(), zoh.double()).mean()),
        (knowledge_distillation(zh, zoh), naive_kd(zh.double(), zoh.double()).mean()),
        (
            multiclass_bce_distillation(zh, zoh, y),
            naive_lwf_mc(zh.double(), zoh.double(), y).mean(),
        ),
        (feature_distillation(zh, zh + 1), ((zh.double() - (zh + 1).double()) ** 2).mean()),
    ]
    for got, want in cases:
        assert got.dtype == torch.float32 and torch.isfinite(got)
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
