"""The confusion matrix of an evaluation (torch, reduced across processes); the summaries built
from its IoU (mIoU old / new / all, avg) are plain arithmetic, in :mod:`ucdseg.stats`."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Accumulates a ``(n, n)`` confusion matrix (rows: ground truth, columns: prediction).

    Pixels whose target is outside ``[0, n)`` (``255`` included) are ignored.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        n = self.num_classes
        target = target.flatten()
        keep = (target >= 0) & (target < n)
        index = n * target[keep].to(torch.int64) + pred.flatten()[keep].to(torch.int64)
        self.mat += torch.bincount(index, minlength=n * n).reshape(n, n)

    def reduce_from_all_processes(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def iou(self) -> list[float]:
        """Per-class IoU; NaN for a class absent from both ground truth and prediction."""
        mat = self.mat.double()
        inter = mat.diag()
        union = mat.sum(0) + mat.sum(1) - inter
        return [float(i / u) if u > 0 else math.nan for i, u in zip(inter, union)]

    def pixel_accuracy(self) -> float:
        total = self.mat.sum()
        return float(self.mat.diag().sum() / total) if total > 0 else math.nan
