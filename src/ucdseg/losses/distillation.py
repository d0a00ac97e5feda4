"""Plain distillation losses of the MiB-paper baselines: LwF (KD), LwF-MC (iCaRL BCE) and ILT (MSE).

All functions take plain tensors with the class axis at dim 1 (``(B, C, H, W)`` or any
``(B, C, *spatial)``). ``old_*`` arguments are targets produced by the frozen previous-step model:
they are detached, no gradient ever flows into them. Half-precision inputs (float16/bfloat16) are
computed in float32; float32/float64 inputs keep their dtype.

``reduction`` is ``"mean"`` (scalar), ``"sum"`` (scalar) or ``"none"`` (per pixel, ``(B, *spatial)``;
for :func:`feature_distillation`, per element).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .device_generic import any_true

REDUCTIONS = ("mean", "sum", "none")

__all__ = [
    "knowledge_distillation",
    "label_bce",
    "old_sigmoid_bce",
    "multiclass_bce_distillation",
    "feature_distillation",
]


# ----------------------------------------------------------------------------------------------
# small shared helpers (also used by mib.py)
# ----------------------------------------------------------------------------------------------
def check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of :data:`REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 if any input is float64."""
    dtype = torch.float32
    for t in tensors:
        if t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def upcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (a no-op when it already is)."""
    return t if t.dtype == dtype else t.to(dtype)


def reduce_pixels(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a per-pixel loss map (``"none"`` returns it unchanged)."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    """Raise ``ValueError`` unless ``logits`` is a floating tensor ``(B, C, *spatial)``."""
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() < 2:
        got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"{name} must be a floating tensor of shape (B, C, ...), got {got}")


def check_old_logits(logits: torch.Tensor, old_logits: torch.Tensor) -> None:
    """``old_logits`` must match ``logits`` except for having at most as many channels."""
    check_logits(logits)
    check_logits(old_logits, "old_logits")
    c_old = old_logits.shape[1]
    same_layout = (
        old_logits.dim() == logits.dim()
        and old_logits.shape[0] == logits.shape[0]
        and old_logits.shape[2:] == logits.shape[2:]
    )
    if not same_layout or not 1 <= c_old <= logits.shape[1]:
        raise ValueError(
            f"old_logits of shape {tuple(old_logits.shape)} do not fit logits of shape "
            f"{tuple(logits.shape)}: expected the same batch and spatial size and "
            f"1 <= C_old <= {logits.shape[1]} channels"
        )


def check_label_shape(labels: torch.Tensor, logits: torch.Tensor, name: str = "labels") -> None:
    """``labels`` must be an integer tensor ``(B, *spatial)`` matching ``logits`` ``(B, C, *spatial)``."""
    expected = (logits.shape[0], *logits.shape[2:])
    if not torch.is_tensor(labels) or labels.is_floating_point() or tuple(labels.shape) != expected:
        got = (
            f"{labels.dtype} {tuple(labels.shape)}"
            if torch.is_tensor(labels)
            else type(labels).__name__
        )
        raise ValueError(f"{name} must be an integer tensor of shape {expected}, got {got}")


def check_labels(
    labels: torch.Tensor, logits: torch.Tensor, ignore_index: int, name: str = "labels"
) -> None:
    """``labels`` must be integer ``(B, *spatial)`` with values in ``[0, C)`` or ``ignore_index``."""
    check_label_shape(labels, logits, name)
    num_classes = logits.shape[1]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if any_true(bad):
        value = int(labels[bad][0])
        raise ValueError(
            f"{name} contain {value}, expected class ids in [0, {num_classes}) "
            f"or ignore_index={ignore_index}"
        )


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------
def knowledge_distillation(
    logits: torch.Tensor,
    old_logits: torch.Tensor,
    alpha: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Plain knowledge distillation of the old logits (LwF, ILT), as MiB's ``KnowledgeDistillationLoss``.

    With ``C_old = old_logits.shape[1]``, ``q = softmax(alpha * old_logits)`` and
    ``log p = log_softmax(logits[:, :C_old])`` (the new model's old channels only, renormalised
    among themselves; ``alpha`` sharpens the target only, the student has no temperature), the
    loss of a pixel is ``-(1 / C_old) * sum_c q_c log p_c``: MiB takes the *mean* over the
    channels, not the sum, i.e. the usual soft cross-entropy divided by ``C_old``. That is why
    MiB weights this term by 100 for LwF/ILT. ``"mean"`` then averages over all pixels (there is
    no ignore mask: the old model's output is defined everywhere).
    """
    check_reduction(reduction)
    check_old_logits(logits, old_logits)
    dtype = compute_dtype(logits, old_logits)
    c_old = old_logits.shape[1]
    log_p = torch.log_softmax(upcast(logits[:, :c_old], dtype), dim=1)
    q = torch.softmax(alpha * upcast(old_logits.detach(), dtype), dim=1)
    loss = -(q * log_p).sum(dim=1) / c_old
    return reduce_pixels(loss, reduction)


def label_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-label BCE on the one-hot labels: LwF-MC's classification term (MiB, ``--method LWF-MC``).

    MiB's ``BCEWithLogitsLossWithIgnoreIndex`` as its trainer uses it (``reduction='none'``, then
    ``.mean()``): per pixel, the **sum** over all ``C`` channels of
    ``BCE_with_logits(logits_c, [labels == c])``; pixels labelled ``ignore_index`` cost 0 (their
    one-hot row is empty, and MiB multiplies by it). ``"mean"`` averages over **all** pixels,
    ignored ones included as zeros, as MiB's ``loss.mean()``; ``"sum"`` sums; ``"none"`` returns
    the ``(B, *spatial)`` map.
    """
    check_reduction(reduction)
    check_logits(logits)
    check_labels(labels, logits, ignore_index)
    dtype = compute_dtype(logits)
    c_all = logits.shape[1]
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels).long()
    targets = F.one_hot(safe, c_all).movedim(-1, 1).to(dtype)
    loss = F.binary_cross_entropy_with_logits(upcast(logits, dtype), targets, reduction="none").sum(1)
    loss = torch.where(ignored, torch.zeros_like(loss), loss)
    return reduce_pixels(loss, reduction)


def old_sigmoid_bce(
    logits: torch.Tensor, old_logits: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """LwF-MC's distillation term: BCE of the old channels against the old model's sigmoids.

    MiB (``icarl_combined``): ``C_old * BCEWithLogitsLoss(reduction='mean')(logits[:, :C_old],
    sigmoid(old_logits))``, i.e. per pixel the **sum** over the ``C_old`` old channels of
    ``BCE_with_logits(logits_c, sigmoid(old_logits_c))``, averaged over all pixels (no ignore
    mask). MiB weights it by ``--icarl_importance 10``. Targets are detached.
    """
    check_reduction(reduction)
    check_old_logits(logits, old_logits)
    dtype = compute_dtype(logits, old_logits)
    c_old = old_logits.shape[1]
    targets = torch.sigmoid(upcast(old_logits.detach(), dtype))
    loss = F.binary_cross_entropy_with_logits(upcast(logits[:, :c_old], dtype), targets, reduction="none")
    return reduce_pixels(loss.sum(dim=1), reduction)


def multiclass_bce_distillation(
    logits: torch.Tensor,
    old_logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """Single mixed-target iCaRL loss, as MiB's ``IcarlLoss`` (the ``--icarl_disjoint`` variant).

    Every channel ``c`` of ``logits`` gets a binary cross-entropy with logits against a target
    ``t_c``: on the old channels (``c < C_old``) ``t_c = sigmoid(old_logits_c)``; on the new
    channels ``t_c = 1`` if ``labels == c`` else ``0`` (the one-hot of the current labels; labels
    of old classes and background therefore give all-zero new-channel targets). The per-pixel
    loss is the **sum** over channels; ``"mean"`` averages over **all** pixels.

    Pixels labelled ``ignore_index`` are *not* dropped, exactly as in MiB: their one-hot row is
    all zero, so they are distilled on the old channels and push the new channels to 0 -- the
    same targets a background pixel gets. (MiB turned void into background, so on void pixels
    this reproduces its numbers.)

    MiB's ``--method LWF-MC`` ("combined", what the MiB paper reports and what our ``lwf-mc``
    method computes) instead adds two separate terms: :func:`label_bce` plus
    ``10 *`` :func:`old_sigmoid_bce`. No registered method uses this function.
    """
    check_reduction(reduction)
    check_old_logits(logits, old_logits)
    check_labels(labels, logits, ignore_index)
    dtype = compute_dtype(logits, old_logits)
    c_all, c_old = logits.shape[1], old_logits.shape[1]
    # one-hot over C_all + 1 channels, the extra one absorbing ignored pixels, then dropped
    safe = torch.where(labels == ignore_index, torch.full_like(labels, c_all), labels).long()
    targets = F.one_hot(safe, c_all + 1).movedim(-1, 1)[:, :c_all].to(dtype)
    targets = torch.cat([torch.sigmoid(upcast(old_logits.detach(), dtype)), targets[:, c_old:]], 1)
    loss = F.binary_cross_entropy_with_logits(upcast(logits, dtype), targets, reduction="none")
    return reduce_pixels(loss.sum(dim=1), reduction)


def feature_distillation(
    features: torch.Tensor, old_features: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """ILT's feature distillation (MiB's ``loss_de``): mean squared error to the old features.

    ``"mean"`` averages over every element, like ``torch.nn.MSELoss``; ``"none"`` returns the
    element-wise squared error with the shape of ``features``.
    """
    check_reduction(reduction)
    if not torch.is_tensor(features) or not torch.is_tensor(old_features):
        raise ValueError("features and old_features must be tensors")
    if features.shape != old_features.shape:
        raise ValueError(
            f"features {tuple(features.shape)} and old_features {tuple(old_features.shape)} "
            "must have the same shape"
        )
    dtype = compute_dtype(features, old_features)
    return F.mse_loss(
        upcast(features, dtype), upcast(old_features.detach(), dtype), reduction=reduction
    )
