"""MiB's unbiased cross-entropy and unbiased knowledge distillation (Cermelli et al., CVPR 2020).

Both model the background shift: at step t the background label of the new data covers the old
classes, and the old model's background covers the new classes. Tensors have the class axis at
dim 1 (``(B, C, H, W)`` or ``(B, C, *spatial)``); class ids are in model space, so
``label < C_old`` means "background or an old class". Half-precision inputs are computed in
float32. ``reduction``: ``"mean"``, ``"sum"`` or ``"none"`` (per-pixel map ``(B, *spatial)``).
"""

from __future__ import annotations

import torch

from .distillation import (
    check_labels,
    check_logits,
    check_old_logits,
    check_reduction,
    compute_dtype,
    reduce_pixels,
    upcast,
)

__all__ = ["unbiased_cross_entropy", "unbiased_kd"]


def unbiased_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_old_classes: int,
    ignore_index: int = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """MiB's unbiased cross-entropy (UNCE, docs/protocol.md §3).

    With ``den = logsumexp(logits)`` over all channels, a pixel labelled ``y`` costs
    ``-(logsumexp(logits[:C_old]) - den)`` if ``y < C_old`` (background: the probability of
    background *or any old class*) and ``-(logits[y] - den)`` for a new class ``y``. Pixels
    labelled ``ignore_index`` cost 0 and are not counted: ``"mean"`` divides by the number of
    non-ignored pixels (like ``F.cross_entropy``), and returns an exact 0 that keeps a gradient
    path when every pixel is ignored (``F.cross_entropy`` would give NaN). With
    ``num_old_classes == 1`` this is the plain cross-entropy.

    Args:
        logits: new-model logits ``(B, C_all, *spatial)``.
        labels: step-t training labels ``(B, *spatial)``, ids in ``[0, C_all)`` or ``ignore_index``.
        num_old_classes: ``C_old``, classes known before this step, background included.
    """
    check_reduction(reduction)
    check_logits(logits)
    c_all = logits.shape[1]
    if isinstance(num_old_classes, bool) or not isinstance(num_old_classes, int):
        raise ValueError(f"num_old_classes must be an int, got {num_old_classes!r}")
    if not 1 <= num_old_classes <= c_all:
        raise ValueError(
            f"num_old_classes={num_old_classes} must be in [1, {c_all}] (the logits' channels)"
        )
    check_labels(labels, logits, ignore_index)

    z = upcast(logits, compute_dtype(logits))
    den = torch.logsumexp(z, dim=1, keepdim=True)
    log_bg = torch.logsumexp(z[:, :num_old_classes], dim=1, keepdim=True) - den
    log_probs = torch.cat([log_bg, z[:, num_old_classes:] - den], dim=1)  # 1 + C_new channels

    ignored = labels == ignore_index
    shifted = torch.where(labels < num_old_classes, torch.zeros_like(labels), labels - num_old_classes + 1)
    target = torch.where(ignored, torch.zeros_like(labels), shifted).long()
    loss = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = torch.where(ignored, torch.zeros_like(loss), loss)
    if reduction == "mean":
        return loss.sum() / (~ignored).sum().clamp(min=1)
    return reduce_pixels(loss, reduction)


def unbiased_kd(
    logits: torch.Tensor,
    old_logits: torch.Tensor,
    alpha: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """MiB's unbiased knowledge distillation (UNKD, docs/protocol.md §3).

    Target ``q = softmax(alpha * old_logits)`` over the ``C_old`` old channels (detached). The new
    model's background log-probability is ``logsumexp(logits over {0} and the new classes
    C_old..C_all-1) - logsumexp(logits)``; old classes ``1..C_old-1`` use the plain log-softmax.
    Per pixel: ``-(q_0 logp_bg + sum_{c=1}^{C_old-1} q_c logp_c) / C_old`` (MiB divides by
    ``C_old``); ``"mean"`` averages over all pixels (no ignore mask). ``C_all == C_old`` (no new
    class) is allowed and reduces to a plain KD over all channels divided by ``C_old``.
    """
    check_reduction(reduction)
    check_old_logits(logits, old_logits)
    dtype = compute_dtype(logits, old_logits)
    c_all, c_old = logits.shape[1], old_logits.shape[1]
    z = upcast(logits, dtype)
    q = torch.softmax(alpha * upcast(old_logits.detach(), dtype), dim=1)

    den = torch.logsumexp(z, dim=1)
    bg_channels = torch.cat([z[:, :1], z[:, c_old:c_all]], dim=1)
    log_bg = torch.logsumexp(bg_channels, dim=1) - den
    log_old = z[:, 1:c_old] - den.unsqueeze(1)
    loss = -(q[:, 0] * log_bg + (q[:, 1:] * log_old).sum(dim=1)) / c_old
    return reduce_pixels(loss, reduction)
