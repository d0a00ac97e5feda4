"""Confusion matrix and the incremental-segmentation summaries built from it."""

from __future__ import annotations

import math
from typing import Sequence

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


def nanmean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def miou_summary(iou: Sequence[float], num_base: int, num_seen: int, score_background: bool = True) -> dict:
    """mIoU over old / new / all seen classes, with and without the background class.

    ``iou`` is indexed by model-space class id; ``num_base`` counts the step-0 classes (background
    included) and ``num_seen`` all classes seen so far. *old* are the step-0 classes, *new* every
    class added later. ``with_background`` counts class 0 among the old classes (PLOP, SDR, RCIL
    papers); ``without_background`` leaves it out (MiB and UCD papers). When the background is not
    scored (ADE20K, Cityscapes by default) both conventions coincide. Empty groups give ``None``.
    """
    seen = list(iou[:num_seen])
    if not score_background:
        seen[0] = math.nan

    def groups(first: int) -> dict:
        return {
            "old": nanmean(seen[first:num_base]),
            "new": nanmean(seen[num_base:]),
            "all": nanmean(seen[first:]),
        }

    return {"with_background": groups(0), "without_background": groups(1)}


def average_over_steps(records: Sequence[dict]) -> dict:
    """"avg" of PLOP, SSUL and RCIL: the mean over the steps of mIoU *all* (each step's classes seen
    so far), in both conventions; steps where it is undefined are left out, ``None`` if none is."""
    out = {}
    for conv in ("with_background", "without_background"):
        values = [r["miou"][conv]["all"] for r in records if r["miou"][conv]["all"] is not None]
        out[conv] = sum(values) / len(values) if values else None
    return out
