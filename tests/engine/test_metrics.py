import math

import pytest
import torch

from ucdseg.engine.metrics import ConfusionMatrix


def test_confusion_matrix_counts_and_ignores_void():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = ConfusionMatrix(3)
    cm.update(target, pred)
    # rows = ground truth, columns = prediction; the two 255 pixels are ignored
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # IoU = TP / (TP + FP + FN): class 0: 1/(1+1+1), class 1: 2/(2+1+0), class 2: 1/(1+0+1)
    assert cm.iou() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)


def test_confusion_matrix_accumulates_over_updates():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    cm.update(torch.tensor([1, 1]), torch.tensor([0, 1]))
    assert cm.mat.tolist() == [[1, 0], [1, 2]]


def test_absent_class_has_nan_iou():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    iou = cm.iou()
    assert iou[:2] == [1.0, 1.0] and math.isnan(iou[2])
