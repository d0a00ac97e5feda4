"""DKD's loss terms, decomposed logits, pseudo-labels and inference (Baek et al., NeurIPS 2022;
cvlab-yonsei/DKD @ fb4693f).

DKD has **no background channel**: its classifiers are an auxiliary 1-channel classifier plus one
sigmoid channel per foreground class (models/model.py:41,67-75). Every function here takes the
*foreground* logits only, ``(B, C_fg, *spatial)``, where model-space class ``k >= 1`` lives on
channel ``k - 1``; the auxiliary logits are separate (:func:`dkd_aux_loss`). Labels are in model
space (0 background, 255 void).

Every loss is, as in the release (trainer/trainer_voc.py:121-128,348-376), a binary cross-entropy
averaged **per class over all (B, H, W) pixels**, then **summed over the classes**; the total is
``sum_k DKD_WEIGHTS[k] * L_k``. The rules are listed with their release lines in docs/methods.md (DKD).

Half-precision inputs are computed in float32; float32/float64 keep their dtype.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

from .defaults import DKD_POS_WEIGHT, DKD_POS_WEIGHT_ADE, DKD_POS_WEIGHT_STEP0, DKD_PSEUDO_THRESHOLD, DKD_WEIGHTS
from .device_generic import any_true
from .distillation import check_label_shape, check_logits, compute_dtype, upcast

__all__ = [
    "DKD_WEIGHTS",
    "DKD_POS_WEIGHT_STEP0",
    "DKD_POS_WEIGHT",
    "DKD_POS_WEIGHT_ADE",
    "DKD_PSEUDO_THRESHOLD",
    "dkd_mbce",
    "dkd_kd",
    "decomposed_logits",
    "dkd_decomposed_kd",
    "dkd_aux_loss",
    "dkd_pseudo_labels",
    "dkd_predict",
]

VOID = 255

Channels = Union[slice, Sequence[int], range]


def _check_fg_labels(labels: torch.Tensor, logits: torch.Tensor) -> None:
    expected = (logits.shape[0], *logits.shape[2:])
    if not torch.is_tensor(labels) or labels.is_floating_point() or tuple(labels.shape) != expected:
        got = f"{labels.dtype} {tuple(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of shape {expected}, got {got}")
    c_fg = logits.shape[1]
    bad = (labels != VOID) & ((labels < 0) | (labels > c_fg))
    if any_true(bad):
        raise ValueError(f"labels contain {int(labels[bad][0])}, expected model-space ids in [0, {c_fg}] or 255 (void)")


def _channel_list(channels: Channels, c_fg: int) -> list[int]:
    if isinstance(channels, slice):
        picked = list(range(c_fg))[channels]
    else:
        picked = [int(c) for c in channels]
    if not picked or len(set(picked)) != len(picked) or not all(0 <= c < c_fg for c in picked):
        raise ValueError(f"new_classes must be distinct foreground channel indices in [0, {c_fg}), got {channels!r}")
    return picked


def _per_class_bce_sum(logits: torch.Tensor, targets: torch.Tensor, pos_weight=None) -> torch.Tensor:
    """BCE-with-logits averaged over every pixel of each channel, summed over the channels."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    return loss.flatten(2).mean(dim=(0, 2)).sum()


def dkd_mbce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    new_classes: Channels,
    pos_weight: Union[float, torch.Tensor] = DKD_POS_WEIGHT,
    ignore_void: bool = False,
) -> torch.Tensor:
    """DKD's ``L_mbce``: weighted BCE of the new classes' channels (models/loss.py:59-90).

    For each new channel ``c`` (``new_classes``: channel indices into the foreground logits, or a
    slice), ``BCE_with_logits(z_c, [labels == c + 1], pos_weight)`` averaged over all pixels, then
    summed over the new channels (trainer_voc.py:121-124,348-351). ``pos_weight`` is a float or one
    value per new class (:data:`DKD_POS_WEIGHT_STEP0` at step 0, :data:`DKD_POS_WEIGHT` later, on VOC).

    Pixels of background and of old classes are negatives of every new channel. Void pixels are
    negatives too, as in the release (``ignore_void=False``: WBCELoss builds its targets from
    ``label == cls`` and never masks 255); ``ignore_void=True`` drops them instead, each channel
    then averaging over the non-void pixels (an exact 0 if there is none).
    """
    check_logits(logits)
    _check_fg_labels(labels, logits)
    channels = _channel_list(new_classes, logits.shape[1])
    dtype = compute_dtype(logits)
    z = upcast(logits[:, channels], dtype)
    ids = torch.tensor([c + 1 for c in channels], device=labels.device).view(1, -1, *([1] * (labels.dim() - 1)))
    targets = (labels.unsqueeze(1) == ids).to(dtype)
    pw = torch.as_tensor(pos_weight, dtype=dtype, device=z.device)
    if pw.dim() > 1 or (pw.dim() == 1 and pw.numel() != len(channels)) or any_true(pw < 0):
        raise ValueError(f"pos_weight must be a non-negative float or one value per new class ({len(channels)}), got {pos_weight!r}")
    pw = pw.reshape(-1, *([1] * (z.dim() - 2))) if pw.dim() == 1 else pw
    loss = F.binary_cross_entropy_with_logits(z, targets, pos_weight=pw, reduction="none")
    if not ignore_void:
        return loss.flatten(2).mean(dim=(0, 2)).sum()
    kept = (labels != VOID).unsqueeze(1).to(dtype)
    per_class = (loss * kept).flatten(2).sum(dim=(0, 2)) / kept.sum().clamp(min=1)
    return per_class.sum()


def dkd_kd(logits: torch.Tensor, old_logits: torch.Tensor, num_old_fg: int) -> torch.Tensor:
    """DKD's ``L_kd``: ``BCE_with_logits(z_c, sigmoid(z^old_c))`` for the old foreground channels.

    ``logits[:, :num_old_fg]`` of the new model against the old model's foreground logits
    ``old_logits`` (``num_old_fg`` channels, detached), per class mean over all pixels, summed
    (trainer_voc.py:353-357; models/loss.py:93-107).
    """
    check_logits(logits)
    check_logits(old_logits, "old_logits")
    if isinstance(num_old_fg, bool) or not isinstance(num_old_fg, int) or not 1 <= num_old_fg <= logits.shape[1]:
        raise ValueError(f"num_old_fg must be an int in [1, {logits.shape[1]}], got {num_old_fg!r}")
    if old_logits.shape[1] != num_old_fg or old_logits.shape[0] != logits.shape[0] or old_logits.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"old_logits of shape {tuple(old_logits.shape)} do not fit logits of shape {tuple(logits.shape)} "
            f"with num_old_fg={num_old_fg}: expected the same batch and spatial size and {num_old_fg} channels"
        )
    dtype = compute_dtype(logits, old_logits)
    target = torch.sigmoid(upcast(old_logits.detach(), dtype))
    return _per_class_bce_sum(upcast(logits[:, :num_old_fg], dtype), target)


def decomposed_logits(features: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's positive and negative logits ``(s_plus, s_minus)`` at feature resolution (model.py:77-99).

    ``s_plus = x . max(W, 0)^T`` and ``s_minus = x . min(W, 0)^T`` per pixel, without bias, where
    ``features`` are the classifier's input ``(B, D, h, w)`` and ``weight`` the concatenated
    foreground classifiers' weights ``(C_fg, D)`` or ``(C_fg, D, 1, 1)`` (auxiliary classifier
    excluded). Gradients reach the features and the weights (where ``W > 0``, resp. ``W < 0``).
    Returns two ``(B, C_fg, h, w)`` tensors.
    """
    if not torch.is_tensor(features) or not features.is_floating_point() or features.dim() < 2:
        got = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise ValueError(f"features must be a floating tensor of shape (B, D, ...), got {got}")
    if not torch.is_tensor(weight) or not (weight.dim() == 2 or (weight.dim() == 4 and weight.shape[2:] == (1, 1))):
        got = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"weight must have shape (C, D) or (C, D, 1, 1), got {got}")
    w = weight.flatten(1)
    if w.shape[1] != features.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit features {tuple(features.shape)}: expected D={features.shape[1]}")
    dtype = compute_dtype(features, weight)
    x, w = upcast(features, dtype), upcast(w, dtype)
    zero = torch.zeros_like(w)
    w_pos = torch.where(w > 0, w, zero)
    w_neg = torch.where(w < 0, w, zero)
    x_last = x.movedim(1, -1)
    return (x_last @ w_pos.T).movedim(-1, 1), (x_last @ w_neg.T).movedim(-1, 1)


def dkd_decomposed_kd(s: torch.Tensor, s_old: torch.Tensor) -> torch.Tensor:
    """DKD's ``L_dkd+`` (or ``L_dkd-``): ``BCE_with_logits(s_c, sigmoid(s_old_c))`` over the old classes.

    ``s`` are the new model's decomposed logits over all its foreground classes, ``s_old`` the old
    model's (``C_old`` channels, detached); the first ``C_old`` channels of ``s`` are distilled, per
    class mean over all pixels, summed (trainer_voc.py:362-372). Use it once for ``s_plus`` and once
    for ``s_minus``.
    """
    check_logits(s, "s")
    check_logits(s_old, "s_old")
    c_old = s_old.shape[1]
    if c_old > s.shape[1] or s_old.shape[0] != s.shape[0] or s_old.shape[2:] != s.shape[2:]:
        raise ValueError(
            f"s_old of shape {tuple(s_old.shape)} does not fit s of shape {tuple(s.shape)}: expected the same "
            f"batch and spatial size and at most {s.shape[1]} channels"
        )
    dtype = compute_dtype(s, s_old)
    return _per_class_bce_sum(upcast(s[:, :c_old], dtype), torch.sigmoid(upcast(s_old.detach(), dtype)))


def dkd_aux_loss(aux_logits: torch.Tensor) -> torch.Tensor:
    """DKD's ``L_ac = BCE_with_logits(z_aux, 0)``, mean over all pixels (models/loss.py:110-119; trainer_voc.py:126,360).

    ``aux_logits`` are the auxiliary classifier's ``(B, 1, *spatial)`` logits (fed detached features
    in the model, model.py:71).
    """
    check_logits(aux_logits, "aux_logits")
    z = upcast(aux_logits, compute_dtype(aux_logits))
    return _per_class_bce_sum(z, torch.zeros_like(z))


def dkd_pseudo_labels(
    labels: torch.Tensor, old_logits: torch.Tensor, threshold: float = DKD_PSEUDO_THRESHOLD
) -> torch.Tensor:
    """DKD-M's memory pseudo-labels (utils/memory.py:99-105): background pixels take the old model's class.

    ``score, pred = max_c sigmoid(old_logits)`` over the old foreground channels; a pixel labelled 0
    with ``score >= threshold`` gets ``pred + 1``; other pixels (void included) keep their label.
    Returns a long tensor ``(B, *spatial)``.
    """
    check_logits(old_logits, "old_logits")
    check_label_shape(labels, old_logits)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    prob = torch.sigmoid(upcast(old_logits.detach(), compute_dtype(old_logits)))
    score, pred = torch.max(prob, dim=1)
    labels = labels.long()
    return torch.where((labels == 0) & (score >= threshold), pred + 1, labels)


def dkd_predict(logits: torch.Tensor) -> torch.Tensor:
    """DKD's inference rule (trainer/trainer_voc.py:181-185): model-space labels ``(B, *spatial)``, long.

    On the foreground logits: background (0) where no foreground sigmoid exceeds 0.5 (strictly), else
    ``1 + argmax_c sigmoid(z_c)`` (first maximum on ties).
    """
    check_logits(logits)
    prob = torch.sigmoid(upcast(logits.detach(), compute_dtype(logits)))
    pred = prob.argmax(dim=1) + 1
    none = (prob > 0.5).sum(dim=1) == 0
    return torch.where(none, torch.zeros_like(pred), pred)
