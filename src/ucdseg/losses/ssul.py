"""SSUL's label rule, pseudo-labels, loss and inference (Cha et al., NeurIPS 2021; clovaai/SSUL @ e08ee9c).

SSUL trains sigmoid outputs on channels ``[unknown, background, base classes, step-1 classes, ...]``
(main.py:187-188): channel 0 is "unknown", channel 1 background, and class ``k >= 1`` of model space
lives on channel ``k + 1``. Its *training* labels are therefore shifted by +1 (:func:`ssul_train_labels`);
its predictions fold unknown back into background and are plain model-space ids again
(:func:`ssul_predict`). There is no distillation term: the old model only gives pseudo-labels
(:func:`ssul_pseudo_labels`). The rules are listed with their release lines in docs/methods.md (SSUL).

Half-precision logits are computed in float32; float32/float64 keep their dtype.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .defaults import SSUL_PSEUDO_THRESHOLD
from .device_generic import any_true
from .distillation import check_label_shape, check_logits, check_reduction, compute_dtype, reduce_pixels, upcast

__all__ = [
    "SSUL_UNKNOWN",
    "SSUL_BACKGROUND",
    "SSUL_PSEUDO_THRESHOLD",
    "ssul_train_labels",
    "ssul_pseudo_labels",
    "ssul_bce",
    "ssul_predict",
]

SSUL_UNKNOWN = 0  #: channel (and shifted label) of "unknown"
SSUL_BACKGROUND = 1  #: channel (and shifted label) of background
VOID = 255

Labels = Union[torch.Tensor, np.ndarray]


def _check_label_map(labels: Labels, name: str = "labels") -> None:
    if isinstance(labels, np.ndarray):
        ok = np.issubdtype(labels.dtype, np.integer)
    else:
        ok = torch.is_tensor(labels) and not labels.is_floating_point() and not labels.is_complex()
    if not ok:
        got = f"{labels.dtype}" if hasattr(labels, "dtype") else type(labels).__name__
        raise ValueError(f"{name} must be an integer torch tensor or numpy array, got {got}")


def ssul_train_labels(labels: Labels, saliency: Optional[Labels]) -> Labels:
    """SSUL's training labels: shift by +1 and mark salient-free background as unknown.

    ``labels`` are step labels in model space (0 background, class ids ``1..``, 255 void), any shape,
    torch (uint8/long/...) or numpy. The result has the same type, shape and dtype:

    * ``y' = y + 1`` except void, which stays 255 (datasets/voc.py:135-138);
    * with a saliency map (VOC), background pixels (``y' == 1``) where ``saliency > 0`` become 0,
      "unknown" (voc.py:140-141): the salient object is some class not labelled at this step;
    * with ``saliency=None`` (ADE, which has no saliency), *every* background pixel becomes
      unknown (datasets/ade.py:291-298), so no pixel keeps label 1.

    ``saliency`` must have the labels' shape (torch or numpy, any numeric dtype; used as ``> 0``).
    Labels 254 (which would become 255, void) are refused.
    """
    _check_label_map(labels)
    is_numpy = isinstance(labels, np.ndarray)
    y = torch.from_numpy(np.asarray(labels)) if is_numpy else labels
    bad = (y != VOID) & ((y < 0) | (y >= VOID - 1))
    if any_true(bad):
        raise ValueError(f"labels contain {int(y[bad][0])}, expected model-space ids in [0, 254) or 255 (void)")
    shifted = torch.where(y == VOID, y, y + 1)
    if saliency is None:
        unknown = shifted == SSUL_BACKGROUND
    else:
        sal = torch.from_numpy(np.asarray(saliency)) if isinstance(saliency, np.ndarray) else saliency
        if not torch.is_tensor(sal) or tuple(sal.shape) != tuple(y.shape):
            got = tuple(sal.shape) if hasattr(sal, "shape") else type(saliency).__name__
            raise ValueError(f"saliency must have the labels' shape {tuple(y.shape)}, got {got}")
        unknown = (shifted == SSUL_BACKGROUND) & (sal.to(y.device) > 0)
    out = torch.where(unknown, torch.zeros_like(shifted), shifted)
    return out.numpy() if is_numpy else out


def ssul_pseudo_labels(
    labels: torch.Tensor, old_logits: torch.Tensor, threshold: float = SSUL_PSEUDO_THRESHOLD
) -> torch.Tensor:
    """SSUL's pseudo-labels on *shifted* labels (main.py:451-466, ``--pseudo``).

    ``p = sigmoid(old_logits)`` on the old model's channels ``[unknown, bg, old classes]``; with
    ``score, pred = max_c p`` (first maximum on ties, as ``torch.max``), a pixel gets ``pred`` where
    ``labels <= 1`` (unknown or background) ``and pred > 1`` (an old class) ``and score >= threshold``,
    and keeps its label otherwise (void included). Returns a long tensor ``(B, *spatial)``.
    """
    check_logits(old_logits, "old_logits")
    check_label_shape(labels, old_logits)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    prob = torch.sigmoid(upcast(old_logits.detach(), compute_dtype(old_logits)))
    score, pred = torch.max(prob, dim=1)
    labels = labels.long()
    take = (labels <= SSUL_BACKGROUND) & (pred > SSUL_BACKGROUND) & (score >= threshold)
    return torch.where(take, pred, labels)


def ssul_bce(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = VOID, reduction: str = "mean"
) -> torch.Tensor:
    """SSUL's loss: per pixel, the sum over **all** channels of ``BCE_with_logits(z_c, [c == target])``.

    SSUL's ``BCEWithLogitsLossWithIgnoreIndex`` (utils/loss.py:30-56): ``"mean"`` averages over the
    pixels whose target is not ``ignore_index`` (utils/loss.py:50), ``"sum"`` sums over them, ``"none"``
    returns the ``(B, *spatial)`` map with 0 on ignored pixels. ``targets`` are shifted labels (see
    :func:`ssul_train_labels`, possibly through :func:`ssul_pseudo_labels`), ids in ``[0, C)``.
    When every pixel is ignored, ``"mean"`` returns an exact 0 that keeps a gradient path (the
    release's ``masked_select(...).mean()`` would give NaN).
    """
    check_reduction(reduction)
    check_logits(logits)
    c_all = logits.shape[1]
    expected = (logits.shape[0], *logits.shape[2:])
    if not torch.is_tensor(targets) or targets.is_floating_point() or tuple(targets.shape) != expected:
        got = f"{targets.dtype} {tuple(targets.shape)}" if torch.is_tensor(targets) else type(targets).__name__
        raise ValueError(f"targets must be an integer tensor of shape {expected}, got {got}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= c_all))
    if any_true(bad):
        raise ValueError(
            f"targets contain {int(targets[bad][0])}, expected channel ids in [0, {c_all}) "
            f"or ignore_index={ignore_index}"
        )
    dtype = compute_dtype(logits)
    kept = targets != ignore_index
    safe = torch.where(kept, targets, torch.zeros_like(targets)).long()
    onehot = F.one_hot(safe, c_all).movedim(-1, 1).to(dtype)
    loss = F.binary_cross_entropy_with_logits(upcast(logits, dtype), onehot, reduction="none").sum(dim=1)
    loss = torch.where(kept, loss, torch.zeros_like(loss))
    if reduction == "mean":
        return loss.sum() / kept.sum().clamp(min=1)
    return reduce_pixels(loss, reduction)


def ssul_predict(logits: torch.Tensor) -> torch.Tensor:
    """SSUL's inference rule (main.py:163-173): model-space labels ``(B, *spatial)``, long.

    ``p = sigmoid(logits)``, ``p_bg += p_unknown``, the unknown channel is dropped and the argmax is
    taken (first maximum on ties, as ``torch.max``). Channel ``k + 1`` becomes class ``k``: the output
    is 0 for background and ``1..C-2`` for the classes, never "unknown".
    """
    check_logits(logits)
    if logits.shape[1] < 2:
        raise ValueError(f"SSUL logits need the unknown and background channels, got {logits.shape[1]} channel(s)")
    prob = torch.sigmoid(upcast(logits.detach(), compute_dtype(logits)))
    folded = torch.cat([prob[:, 1:2] + prob[:, 0:1], prob[:, 2:]], dim=1)
    return folded.max(dim=1)[1]
