"""SSUL's label rule, pseudo-labels, BCE and inference rule.

Parity: tests/parity/data/ssul.npz, made by tests/parity/make_ssul.py running clovaai/SSUL's own code
(datasets/voc.py, datasets/ade.py, main.py, utils/loss.py). Hand-derived cases and a naive loop beside them.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ucdseg.losses.ssul import ssul_bce, ssul_predict, ssul_pseudo_labels, ssul_train_labels

DATA = np.load(Path(__file__).resolve().parents[1] / "parity" / "data" / "ssul.npz")


def close32(ours: torch.Tensor, release: np.ndarray) -> None:
    """float32 parity: 1e-6 relative to the release's largest magnitude."""
    ref = torch.from_numpy(np.asarray(release)).to(ours.dtype)
    scale = float(ref.abs().max()) or 1.0
    torch.testing.assert_close(ours.detach(), ref, rtol=1e-6, atol=1e-6 * scale)


# ------------------------------------------------------------------------------------------
# parity with the release
# ------------------------------------------------------------------------------------------
def test_release_voc_train_labels_numpy_and_torch():
    labels, sal, expected = DATA["labels_in"], DATA["labels_saliency"], DATA["labels_voc_out"]
    out = ssul_train_labels(labels, sal)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    for dtype in (torch.uint8, torch.long):
        out_t = ssul_train_labels(torch.from_numpy(labels).to(dtype), torch.from_numpy(sal))
        assert out_t.dtype == dtype
        np.testing.assert_array_equal(out_t.numpy(), expected)


def test_release_ade_train_labels_every_background_pixel_unknown():
    out = ssul_train_labels(torch.from_numpy(DATA["labels_in"]), None)
    np.testing.assert_array_equal(out.numpy(), DATA["labels_ade_out"])
    assert not (out == 1).any()


def test_release_pseudo_labels():
    labels = torch.from_numpy(DATA["loss_labels"])
    out = ssul_pseudo_labels(labels, torch.from_numpy(DATA["loss_old_logits"]), 0.7)
    assert (out != labels).sum() > 0  # the case exercises the rule
    np.testing.assert_array_equal(out.numpy(), DATA["pseudo_labels"])


@pytest.mark.parametrize("targets, loss, grad", [("pseudo_labels", "pseudo_loss", "pseudo_loss_grad"),
                                                 ("loss_labels", "plain_loss", "plain_loss_grad")])
def test_release_bce_value_and_gradient(targets, loss, grad):
    logits = torch.from_numpy(DATA["loss_logits"]).requires_grad_(True)
    value = ssul_bce(logits, torch.from_numpy(DATA[targets]))
    value.backward()
    close32(value, DATA[loss])
    close32(logits.grad, DATA[grad])


def test_release_predict():
    np.testing.assert_array_equal(ssul_predict(torch.from_numpy(DATA["predict_logits"])).numpy(), DATA["predict_out"])


# ------------------------------------------------------------------------------------------
# hand-derived
# ------------------------------------------------------------------------------------------
def test_train_labels_2x2_with_saliency():
    # bg not salient -> bg (1); class 3 -> 4; bg salient -> unknown (0); void stays void
    labels = torch.tensor([[0, 3], [0, 255]], dtype=torch.uint8)
    saliency = torch.tensor([[0, 200], [7, 255]], dtype=torch.uint8)
    assert ssul_train_labels(labels, saliency).tolist() == [[1, 4], [0, 255]]
    assert ssul_train_labels(labels, None).tolist() == [[0, 4], [0, 255]]


def test_train_labels_refuse_254_and_bad_saliency():
    with pytest.raises(ValueError, match="254"):
        ssul_train_labels(torch.tensor([[254]]), None)
    with pytest.raises(ValueError, match="saliency must have the labels' shape"):
        ssul_train_labels(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer"):
        ssul_train_labels(torch.zeros(2, 2), None)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_pseudo_labels_by_hand():
    # old channels [unknown, bg, c1, c2]; 6 pixels in a row
    low = -20.0
    old = torch.full((1, 4, 1, 6), low, dtype=torch.float64)
    old[0, 2, 0, 0] = logit(0.8)  # unknown pixel, c1 at 0.8: -> channel 2
    old[0, 3, 0, 1] = logit(0.6)  # bg pixel, c2 at 0.6 < 0.7: kept
    old[0, 1, 0, 2] = logit(0.9)  # bg pixel, argmax is bg: kept
    old[0, 3, 0, 3] = logit(0.95)  # pixel of a current class (4): kept
    old[0, 2, 0, 4] = logit(0.95)  # void: kept
    old[0, 3, 0, 5] = 0.0  # bg pixel, c2 at exactly 0.5, threshold 0.5 (>=): -> channel 3
    labels = torch.tensor([[[0, 1, 1, 4, 255, 1]]])
    assert ssul_pseudo_labels(labels, old, 0.7).tolist() == [[[2, 1, 1, 4, 255, 1]]]
    assert ssul_pseudo_labels(labels, old, 0.5).tolist() == [[[2, 3, 1, 4, 255, 3]]]


def test_bce_matches_a_naive_loop_and_skips_void():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 4, (2, 3, 3), generator=g)
    targets[0, 0, 0] = targets[1, 2, 1] = 255
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                t = int(targets[b, i, j])
                if t == 255:
                    continue
                count += 1
                for c in range(4):
                    z = float(logits[b, c, i, j])
                    p = 1 / (1 + math.exp(-z))
                    total += -math.log(p) if c == t else -math.log(1 - p)
    assert math.isclose(float(ssul_bce(logits, targets)), total / count, rel_tol=1e-12)
    assert math.isclose(float(ssul_bce(logits, targets, reduction="sum")), total, rel_tol=1e-12)
    per_pixel = ssul_bce(logits, targets, reduction="none")
    assert per_pixel.shape == (2, 3, 3) and per_pixel[0, 0, 0] == 0 and per_pixel[1, 2, 1] == 0


def test_bce_all_void_is_zero_with_a_gradient_and_bad_targets_raise():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = ssul_bce(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and not logits.grad.any()
    with pytest.raises(ValueError, match=r"targets contain 3, expected channel ids in \[0, 3\)"):
        ssul_bce(logits, torch.tensor([[[0, 3], [1, 2]]]))


def test_predict_folds_unknown_into_background():
    # channels [unknown, bg, c1, c2]
    logits = torch.tensor([logit(0.6), logit(0.3), logit(0.8), logit(0.1)]).view(1, 4, 1, 1)
    assert ssul_predict(logits).tolist() == [[[0]]]  # bg 0.3 + unknown 0.6 = 0.9 > 0.8
    logits[0, 0] = logit(0.4)
    assert ssul_predict(logits).tolist() == [[[1]]]  # 0.7 < 0.8: class 1 (channel 2)
    logits[0, 3] = logit(0.99)
    assert ssul_predict(logits).tolist() == [[[2]]]  # channel 3 -> class 2, never "unknown"
    with pytest.raises(ValueError, match="unknown and background"):
        ssul_predict(torch.zeros(1, 1, 2, 2))
