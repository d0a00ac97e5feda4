"""UCD's uncertainty-aware contrastive distillation (Yang et al., TPAMI 2022; SPEC §3).

Layout:

* :func:`prepare_contrastive_inputs` turns feature maps, old logits and labels into flat tensors
  (:class:`ContrastiveInputs`): the anchors, their labels / old-model probabilities / GT flags,
  and the contrast set with the same attributes.
* :func:`contrastive_distillation_flat` computes the loss from such flat tensors. A distributed
  version can all-gather the contrast set (detached) from every process, keep the local anchors
  (with gradients), and shift ``self_index`` by the process's offset.
* :func:`contrastive_distillation` is the thin composition of the two.

The loss is computed by a custom :class:`torch.autograd.Function` that streams over blocks of
the contrast set in forward *and* backward, so memory is ``O(|A| * block_size)`` instead of
several dense ``|A| x |C|`` matrices.

Numerics (all in float32, or float64 for float64 inputs). With ``s_ik = <a_i, c_k> / tau``,
``logN_i = log sum_{n in neg(i)} exp(s_in)`` (computed as a streamed logsumexp, so any
temperature is safe) and ``shift_i = m_i`` ("reference") or 0 ("supcon"), one positive pair costs

    -l_ik = log(exp(s_ik - shift_i) + N_i) - (s_ik - shift_i) = softplus(logN_i + shift_i - s_ik)

and the loss is ``mean over anchors with >= 1 positive of (1/|P(i)|) sum_{k in P(i)} w_ik * softplus(...)``.
``m_i`` follows the UCD release (``PixelConLossV2``): the row maximum of the similarities over the
**whole** contrast set (positives, negatives and the anchor's own copy, so it is ~``1/tau`` when
the own copy is present), detached -- a constant for the gradient, as in SupCon's code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
FORMULATIONS = ("reference", "supcon")
DEFAULT_BLOCK_SIZE = 1024
FLAT_REDUCTIONS = ("mean", "sum", "none")

__all__ = [
    "ContrastiveInputs",
    "prepare_contrastive_inputs",
    "contrastive_distillation_flat",
    "contrastive_distillation",
    "resize_labels_nearest",
    "FORMULATIONS",
    "DEFAULT_BLOCK_SIZE",
]


class ContrastiveInputs(NamedTuple):
    """Flat inputs of :func:`contrastive_distillation_flat` (``N`` anchors, ``K`` contrast elements).

    ``anchors`` ``(N, D)``: L2-normalised new-model features at the kept pixels (with gradient).
    ``anchor_labels`` ``(N,)`` int64; ``anchor_probs`` ``(N, C_old)`` old-model softmax;
    ``anchor_is_gt`` ``(N,)`` bool. ``contrast`` ``(K, D)`` detached, L2-normalised: the anchors
    followed by the old-model features at kept non-GT pixels; ``contrast_*`` likewise.
    ``self_index`` ``(N,)`` int64: position of each anchor's own copy in ``contrast`` (-1: none).
    """

    anchors: torch.Tensor
    anchor_labels: torch.Tensor
    anchor_probs: torch.Tensor
    anchor_is_gt: torch.Tensor
    contrast: torch.Tensor
    contrast_labels: torch.Tensor
    contrast_probs: torch.Tensor
    contrast_is_gt: torch.Tensor
    self_index: torch.Tensor


# ----------------------------------------------------------------------------------------------
# pixel selection
# ----------------------------------------------------------------------------------------------
def _cell_centres(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """Input index read by each output cell: ``floor((i + 1/2) * size_in / size_out)``.

    At an integer stride ``s = size_in / size_out`` this is pixel ``s*i + s/2``, the input pixel
    at the centre of cell ``i`` (where bilinear upsampling with ``align_corners=False`` places
    it); PyTorch's ``mode="nearest-exact"`` uses the same rule. Computed in integers, so it is
    exact at any ratio.
    """
    i = torch.arange(size_out, device=device)
    return ((2 * i + 1) * size_in) // (2 * size_out)


def resize_labels_nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(B, H, W)`` integer labels to ``size`` by reading each output cell's centre.

    Output pixel ``(i, j)`` takes input pixel ``(floor((i + 1/2) H / h), floor((j + 1/2) W / w))``
    (``nearest-exact``; at stride 16 that is pixel ``16 i + 8``, not the top-left corner ``16 i``
    that ``mode="nearest"`` reads). It only gathers input pixels: no new class id can appear.
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    rows = _cell_centres(labels.shape[-2], size[0], labels.device)
    cols = _cell_centres(labels.shape[-1], size[1], labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)


def _check_maps(
    features: torch.Tensor, old_features: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor
) -> None:
    for name, t in (("features", features), ("old_features", old_features), ("old_logits", old_logits)):
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dim() != 4:
            got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor of shape (B, D, h, w), got {got}")
    if old_features.shape != features.shape:
        raise ValueError(
            f"old_features {tuple(old_features.shape)} must have the shape of features "
            f"{tuple(features.shape)}"
        )
    b, _, h, w = features.shape
    if old_logits.shape[0] != b or old_logits.shape[2:] != (h, w):
        raise ValueError(
            f"old_logits {tuple(old_logits.shape)} must be (B={b}, C_old, h={h}, w={w}), "
            "i.e. at the feature resolution"
        )
    if not torch.is_tensor(labels) or labels.is_floating_point() or labels.dim() != 3:
        got = f"{labels.dtype} {tuple(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of shape (B, H, W), got {got}")
    if labels.shape[0] != b:
        raise ValueError(f"labels have batch size {labels.shape[0]}, features have {b}")
    if bool((labels < 0).any()):
        raise ValueError(f"labels contain {int(labels.min())}, expected ids >= 0 or {IGNORE_INDEX}")


def _flat_pixels(x: torch.Tensor) -> torch.Tensor:
    """``(B, D, h, w)`` -> ``(B*h*w, D)``."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def prepare_contrastive_inputs(
    features: torch.Tensor,
    old_features: torch.Tensor,
    old_logits: torch.Tensor,
    labels: torch.Tensor,
) -> ContrastiveInputs:
    """Select the pixels, anchors and contrast set of SPEC §3 "UCD contrastive distillation".

    1. ``labels`` are resized to the feature map by reading each cell's centre
       (:func:`resize_labels_nearest`); ``p = softmax(old_logits)``.
       "GT pixels" are those whose label is neither 0 nor 255 (current-step ground truth, or
       pseudo-labels under PLOP); they keep their label. Pixels labelled 0 take ``argmax p``.
       Pixels still labelled 0 and pixels labelled 255 are dropped.
    2. Anchors: L2-normalised ``features`` at every kept pixel of the batch (computed in float32,
       float64 for float64 inputs). Contrast set: the detached anchors followed by the
       L2-normalised ``old_features`` at kept non-GT pixels. ``self_index[i] = i``.
    """
    _check_maps(features, old_features, old_logits, labels)
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    _, _, h, w = features.shape
    y = resize_labels_nearest(labels, (h, w)).reshape(-1).long()
    probs = _flat_pixels(torch.softmax(old_logits.detach().to(dtype), dim=1))
    old_pred = probs.argmax(dim=1)

    is_gt = (y != 0) & (y != IGNORE_INDEX)
    mixed = torch.where(y == 0, old_pred, y)
    kept = (mixed != 0) & (y != IGNORE_INDEX)
    from_old = kept & ~is_gt

    anchors = F.normalize(_flat_pixels(features.to(dtype))[kept], dim=1)
    old = F.normalize(_flat_pixels(old_features.detach().to(dtype))[from_old], dim=1)
    n = anchors.shape[0]
    return ContrastiveInputs(
        anchors=anchors,
        anchor_labels=mixed[kept],
        anchor_probs=probs[kept],
        anchor_is_gt=is_gt[kept],
        contrast=torch.cat([anchors.detach(), old], dim=0),
        contrast_labels=torch.cat([mixed[kept], mixed[from_old]]),
        contrast_probs=torch.cat([probs[kept], probs[from_old]], dim=0),
        contrast_is_gt=torch.cat([is_gt[kept], is_gt[from_old]]),
        self_index=torch.arange(n, device=anchors.device),
    )


# ----------------------------------------------------------------------------------------------
# streamed loss
# ----------------------------------------------------------------------------------------------
class _Block(NamedTuple):
    scores: torch.Tensor  # (N, b) s_ik
    positive: torch.Tensor  # (N, b) bool
    negative: torch.Tensor  # (N, b) bool
    weight: torch.Tensor | None  # (N, b) w_ik (only meaningful on positives)


def _block(anchors, contrast, a_labels, c_labels, a_probs, c_probs, a_gt, c_gt, self_index,
           start, end, inv_tau, with_weight=True) -> _Block:  # fmt: skip
    """Similarities, masks and (optionally) uncertainty weights of contrast elements ``start:end``."""
    scores = anchors @ contrast[start:end].T * inv_tau
    same = a_labels[:, None] == c_labels[None, start:end]
    cols = torch.arange(start, end, device=anchors.device)
    positive = same & (cols[None, :] != self_index[:, None])
    if not with_weight:
        return _Block(scores, positive, ~same, None)
    weight = a_probs @ c_probs[start:end].T
    weight = torch.where(a_gt[:, None] & c_gt[None, start:end], torch.ones_like(weight), weight)
    return _Block(scores, positive, ~same, weight)


class _StreamedContrastive(torch.autograd.Function):
    """Per-anchor UCD loss ``(N,)``; gradient only w.r.t. the (L2-normalised) anchors."""

    @staticmethod
    def forward(ctx, anchors, contrast, a_labels, c_labels, a_probs, c_probs, a_gt, c_gt,
                self_index, num_pos, inv_tau, reference, block_size):  # fmt: skip
        n, k = anchors.shape[0], contrast.shape[0]
        args = (anchors, contrast, a_labels, c_labels, a_probs, c_probs, a_gt, c_gt, self_index)
        neg_inf = torch.full((n,), float("-inf"), dtype=anchors.dtype, device=anchors.device)

        # pass 1: m_i = max_k s_ik and logN_i = logsumexp over the negatives
        row_max, log_neg = neg_inf.clone(), neg_inf.clone()
        for start in range(0, k, block_size):
            blk = _block(*args, start, min(start + block_size, k), inv_tau, with_weight=False)
            row_max = torch.maximum(row_max, blk.scores.max(dim=1).values)
            neg_scores = blk.scores.masked_fill(~blk.negative, float("-inf"))
            log_neg = torch.logaddexp(log_neg, torch.logsumexp(neg_scores, dim=1))

        # pass 2: positive terms and the aggregate G_i = (1/|P_i|) sum_k w_ik sigmoid(u_ik)
        offset = log_neg + (row_max if reference else torch.zeros_like(row_max))
        loss = torch.zeros_like(row_max)
        agg = torch.zeros_like(row_max)
        for start in range(0, k, block_size):
            blk = _block(*args, start, min(start + block_size, k), inv_tau)
            u = offset[:, None] - blk.scores
            wp = torch.where(blk.positive, blk.weight, torch.zeros_like(blk.weight))
            loss += (wp * F.softplus(u)).sum(dim=1)
            agg += (wp * torch.sigmoid(u)).sum(dim=1)
        inv_pos = 1.0 / num_pos.clamp(min=1).to(loss.dtype)
        inv_pos = torch.where(num_pos > 0, inv_pos, torch.zeros_like(inv_pos))

        ctx.save_for_backward(*args, offset, log_neg, agg * inv_pos, inv_pos)
        ctx.inv_tau, ctx.block_size = inv_tau, block_size
        return loss * inv_pos

    @staticmethod
    def backward(ctx, grad_loss):
        *args, offset, log_neg, agg, inv_pos = ctx.saved_tensors
        anchors, contrast = args[0], args[1]
        k, block_size = contrast.shape[0], ctx.block_size
        grad = torch.zeros_like(anchors)
        pos_scale = (grad_loss * inv_pos)[:, None]
        neg_scale = (grad_loss * agg)[:, None]
        for start in range(0, k, block_size):
            end = min(start + block_size, k)
            blk = _block(*args, start, end, ctx.inv_tau)
            u = offset[:, None] - blk.scores
            d_pos = -blk.weight * torch.sigmoid(u) * pos_scale  # dL/ds_ik, k positive
            d_neg = torch.exp(blk.scores - log_neg[:, None]) * neg_scale  # dL/ds_in, n negative
            coef = torch.where(blk.positive, d_pos, torch.zeros_like(d_pos))
            coef = torch.where(blk.negative, d_neg, coef)
            grad += coef @ contrast[start:end]
        grad *= ctx.inv_tau
        return (grad,) + (None,) * 12


def _check_options(temperature: float, formulation: str, block_size: int) -> None:
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    is_number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not is_number or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _check_flat(anchors, anchor_labels, anchor_probs, anchor_is_gt, contrast, contrast_labels,
                contrast_probs, contrast_is_gt, self_index) -> None:  # fmt: skip
    if anchors.dim() != 2 or contrast.dim() != 2 or anchors.shape[1] != contrast.shape[1]:
        raise ValueError(
            f"anchors {tuple(anchors.shape)} and contrast {tuple(contrast.shape)} must be "
            "(N, D) and (K, D) with the same D"
        )
    n, k = anchors.shape[0], contrast.shape[0]
    expected = {
        "anchor_labels": (anchor_labels, (n,)),
        "anchor_is_gt": (anchor_is_gt, (n,)),
        "self_index": (self_index, (n,)),
        "contrast_labels": (contrast_labels, (k,)),
        "contrast_is_gt": (contrast_is_gt, (k,)),
    }
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if anchor_probs.dim() != 2 or anchor_probs.shape[0] != n or contrast_probs.shape != (
        k,
        anchor_probs.shape[1],
    ):
        raise ValueError(
            f"anchor_probs {tuple(anchor_probs.shape)} and contrast_probs "
            f"{tuple(contrast_probs.shape)} must be ({n}, C_old) and ({k}, C_old)"
        )
    if bool(((self_index < -1) | (self_index >= k)).any()):
        raise ValueError(f"self_index must be in [-1, {k}), got values {self_index.tolist()[:8]}...")
    has_copy = self_index >= 0
    if bool((contrast_labels[self_index[has_copy]] != anchor_labels[has_copy]).any()):
        raise ValueError("self_index points to contrast elements whose label differs from the anchor's")


def contrastive_distillation_flat(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    anchor_probs: torch.Tensor,
    anchor_is_gt: torch.Tensor,
    contrast: torch.Tensor,
    contrast_labels: torch.Tensor,
    contrast_probs: torch.Tensor,
    contrast_is_gt: torch.Tensor,
    self_index: torch.Tensor | None = None,
    temperature: float = 0.07,
    formulation: str = "reference",
    block_size: int = DEFAULT_BLOCK_SIZE,
    reduction: str = "mean",
) -> torch.Tensor:
    """UCD loss from flat, already gathered tensors (see :class:`ContrastiveInputs`).

    ``anchors`` ``(N, D)`` and ``contrast`` ``(K, D)`` must already be L2-normalised (they are
    not renormalised here). Gradients flow only into ``anchors``; the contrast set, labels and
    probabilities are constants. Positives of anchor ``i``: contrast elements with its label
    except ``contrast[self_index[i]]`` (``self_index=None``: no own copies; ``-1``: none for that
    anchor). Negatives: elements with a different label. ``w_ik = <p_i, p_k>``, 1 if both are GT.

    ``reduction``: ``"mean"`` over anchors with at least one positive (an exact 0 that keeps a
    gradient path to ``anchors`` when there is none), ``"sum"``, or ``"none"`` (per-anchor
    ``(N,)``, 0 for anchors without positives). A distributed caller can sum ``"sum"`` results
    and divide by the global count of anchors with positives.
    """
    _check_options(temperature, formulation, block_size)
    if reduction not in FLAT_REDUCTIONS:
        raise ValueError(f"reduction must be one of {FLAT_REDUCTIONS}, got {reduction!r}")
    if self_index is None:
        self_index = torch.full_like(anchor_labels, -1)
    _check_flat(anchors, anchor_labels, anchor_probs, anchor_is_gt, contrast, contrast_labels,
                contrast_probs, contrast_is_gt, self_index)  # fmt: skip

    dtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    anchors = anchors.to(dtype)
    a_labels, c_labels = anchor_labels.long(), contrast_labels.long()
    self_index = self_index.long()

    # |P(i)| = (# contrast elements with label y_i) - (own copy present)
    if anchors.shape[0] and contrast.shape[0]:
        size = int(max(a_labels.max(), c_labels.max())) + 1
        num_pos = torch.bincount(c_labels, minlength=size)[a_labels] - (self_index >= 0).long()
    else:
        num_pos = torch.zeros_like(a_labels)
    valid = num_pos > 0
    if not bool(valid.any()):
        zero = anchors.flatten()[:0].sum()  # exactly 0, with a grad path to the anchors
        return zero if reduction != "none" else anchors[:, 0] * 0

    per_anchor = _StreamedContrastive.apply(
        anchors,
        contrast.detach().to(dtype),
        a_labels,
        c_labels,
        anchor_probs.detach().to(dtype),
        contrast_probs.detach().to(dtype),
        anchor_is_gt.bool(),
        contrast_is_gt.bool(),
        self_index,
        num_pos,
        1.0 / float(temperature),
        formulation == "reference",
        block_size,
    )
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor.sum() / valid.sum()


def contrastive_distillation(
    features: torch.Tensor,
    old_features: torch.Tensor,
    old_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    formulation: str = "reference",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """UCD uncertainty-aware contrastive distillation (SPEC §3), a 0-d float32 tensor.

    Args:
        features: new-model pre-logits features ``(B, D, h, w)`` (gradients flow here only).
        old_features: old-model pre-logits features ``(B, D, h, w)`` (detached).
        old_logits: old-model logits at the feature resolution ``(B, C_old, h, w)`` (detached);
            any number of classes.
        labels: step-t training labels ``(B, H, W)`` at any resolution, 255 = ignore; resized to
            ``(h, w)`` by reading each feature cell's centre (``nearest-exact``). Class ids of
            any size are kept (no ``label > 20`` cut as in the release).
        temperature: ``tau``.
        formulation: ``"reference"`` (the release's numerics: the positive term is shifted by the
            detached row maximum ``m_i``) or ``"supcon"`` (no shift).
        block_size: contrast elements processed at once; memory is ``O(|A| * block_size)``.

    Returns an exact 0 that keeps a gradient path to ``features`` when no pixel is kept or no
    anchor has a positive. Computed in float32 whatever the input precision (float64 stays float64).
    """
    _check_options(temperature, formulation, block_size)
    # autocast would run the similarity matmuls in bfloat16/float16: SPEC §3 wants float32
    with torch.autocast(device_type=features.device.type, enabled=False):
        inputs = prepare_contrastive_inputs(features, old_features, old_logits, labels)
        if inputs.anchors.shape[0] == 0:
            return features.flatten()[:0].to(inputs.anchors.dtype).sum()
        return contrastive_distillation_flat(
            *inputs, temperature=temperature, formulation=formulation, block_size=block_size
        )
