"""Evaluation after a step: one confusion matrix, reduced across processes."""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm import tqdm

from .metrics import ConfusionMatrix


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, num_classes: int, device: torch.device,
             progress: bool = True, amp_dtype: torch.dtype | None = None) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over ``loader`` (targets in model space, 255 ignored)."""
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(images).logits
        cm.update(targets, logits.argmax(1))
    cm.reduce_from_all_processes()
    return cm
