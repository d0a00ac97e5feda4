"""UCD's uncertainty-aware contrastive distillation (Yang et al., TPAMI 2022; docs/protocol.md §3).

Layout:

* :func:`prepare_contrastive_inputs` turns feature maps, old logits and labels into flat tensors
  (:class:`ContrastiveInputs`): the anchors, their labels / old-model probabilities / GT flags,
  and the contrast set with the same attributes.
* :func:`contrastive_distillation_flat` computes the loss from such flat tensors. A distributed
  version can all-gather the contrast set (detached) from every process, keep the local anchors
  (with gradients), and shift ``self_index`` by the process's offset.
* :func:`contrastive_distillation` is the thin composition of the two.

The loss is computed by a custom :class:`torch.autograd.Function` (``_SortedContrastive``):

* anchors and contrast set are sorted by ``(label, is_gt)``, so the elements of each class are one
  contiguous range of columns: negatives are everything outside the range (no masks), positives
  the small ``|A_c| x |C_c|`` block inside it;
* rows of anchors go in chunks of about ``block_size * |A| / |C|`` rows (memory
  ``O(|A| * block_size)``): one product gives the shifted similarities, ``exp`` runs in place, the
  class ranges are zeroed, and one product with ``[C, 1]`` gives both ``N_i`` and the negatives'
  part of the gradient; the positive terms are computed on the class blocks only;
* each per-anchor loss depends on its own anchor only, so the forward pass computes its gradient
  (one ``D`` vector per anchor) together with the loss, and backward scales it by the incoming
  gradient. Nothing ``|A| x |C|`` is kept between forward and backward.

Numerics (all in float32, or float64 for float64 inputs). With ``s_ik = <a_i, c_k> / tau``,
``logN_i = log sum_{n in neg(i)} exp(s_in)`` (exp of ``s_in`` minus an upper bound of the row,
or minus the negatives' exact maximum when ``2/tau`` is beyond exp()'s safe range, so any
temperature is safe) and ``shift_i = m_i`` ("reference") or 0 ("supcon"), one positive pair costs

    -l_ik = log(exp(s_ik - shift_i) + N_i) - (s_ik - shift_i) = softplus(logN_i + shift_i - s_ik)

and the loss is ``mean over anchors with >= 1 positive of (1/|P(i)|) sum_{k in P(i)} w_ik * softplus(...)``.
``m_i`` follows the UCD release (``PixelConLossV2``): the row maximum of the similarities over the
**whole** contrast set (positives, negatives and the anchor's own copy, so it is ~``1/tau`` when
the own copy is present), detached -- a constant for the gradient, as in SupCon's code. When the
own copy is present it is the row's maximum (cosine <= 1; another element can exceed it only by
rounding, a few ulp of ``1/tau``), so ``m_i`` is taken from the anchor's class block; anchors
without an own copy take the exact maximum of their row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .device_generic import any_true, full_precision

IGNORE_INDEX = 255
FORMULATIONS = ("reference", "supcon")
DEFAULT_BLOCK_SIZE = 1024
FLAT_REDUCTIONS = ("mean", "sum", "none")
#: What void (255) cells are to the loss: "ignore" drops them; "background" turns them into 0 first
#: (they take the old model's argmax, as every other background cell), what both UCD releases compute.
VOID_MODES = ("ignore", "background")

__all__ = [
    "ContrastiveInputs",
    "prepare_contrastive_inputs",
    "contrastive_distillation_flat",
    "contrastive_distillation",
    "resize_labels_nearest",
    "FORMULATIONS",
    "VOID_MODES",
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
    if any_true(labels < 0):
        raise ValueError(f"labels contain {int(labels.min())}, expected ids >= 0 or {IGNORE_INDEX}")


def _flat_pixels(x: torch.Tensor) -> torch.Tensor:
    """``(B, D, h, w)`` -> ``(B*h*w, D)``."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def prepare_contrastive_inputs(
    features: torch.Tensor,
    old_features: torch.Tensor,
    old_logits: torch.Tensor,
    labels: torch.Tensor,
    void: str = "ignore",
) -> ContrastiveInputs:
    """Select the pixels, anchors and contrast set of docs/protocol.md §3.8.

    1. ``labels`` are resized to the feature map by reading each cell's centre
       (:func:`resize_labels_nearest`); ``p = softmax(old_logits)``. With
       ``void="background"`` the void cells (255) are then labelled 0, as both UCD releases do
       (see below); with ``void="ignore"`` (default) they stay 255.
       "GT pixels" are those whose label is neither 0 nor 255 (the current step's ground truth:
       under PLOP too, UCD reads the step's labels, not the pseudo-labels); they keep their label. Pixels labelled 0 take ``argmax p``.
       Pixels still labelled 0 and pixels labelled 255 are dropped.
    2. Anchors: L2-normalised ``features`` at every kept pixel of the batch (computed in float32,
       float64 for float64 inputs). Contrast set: the detached anchors followed by the
       L2-normalised ``old_features`` at kept non-GT pixels. ``self_index[i] = i``.

    ``void="background"`` reproduces the releases: ``pre_contrastive_pixel`` casts the
    (bilinearly resized) labels to ``torch.int8``, which cannot hold 255 (it becomes -1 on a CPU),
    and then sets ``label < 0`` and ``label > 20`` to 0 (``utils/loss.py:261-270`` of
    ygjwd12345/UCD's MiB-based HEAD cc73546, ``:453-462`` of its PLOP-based first commit 51b783a);
    those 0s then take the old model's argmax (HEAD ``:358``, first commit ``:550``). A void cell
    thus enters as a non-GT pixel wherever the old model predicts an old class: an anchor, and an
    old-model element of the contrast set, its pairs weighted by ``<p_i, p_k>``.
    """
    _check_void(void)
    _check_maps(features, old_features, old_logits, labels)
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    _, _, h, w = features.shape
    y = resize_labels_nearest(labels, (h, w)).reshape(-1).long()
    if void == "background":
        y = torch.where(y == IGNORE_INDEX, torch.zeros_like(y), y)
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
# Similarities are shifted by an upper bound before exp(); the smallest shifted value is then
# >= -2 * bound. Up to this range exp() stays a normal float (float32: exp(-60) ~ 1e-26); beyond
# it, each row is shifted by the exact maximum over its negatives instead (one more pass).
_EXP_RANGE = {torch.float32: 60.0, torch.float64: 600.0}


class _Group(NamedTuple):
    """Sorted anchors ``row_start:row_end`` share one label and one GT flag. In the sorted
    contrast set their class occupies columns ``start:end``, its GT elements ``gt_start:end``;
    every other column is a negative."""

    row_start: int
    row_end: int
    start: int
    gt_start: int
    end: int
    is_gt: bool


class _Sorted(NamedTuple):
    """Anchors and contrast set sorted by ``(label, is_gt)``; ``own`` = sorted column of each
    anchor's own copy (-1: none); ``order`` maps sorted anchors back (``x[order] = sorted``)."""

    order: torch.Tensor
    anchors: torch.Tensor
    anchor_probs: torch.Tensor
    own: torch.Tensor
    inv_pos: torch.Tensor
    contrast: torch.Tensor
    contrast_probs: torch.Tensor
    groups: list[_Group]


def _sort_by_class(anchors, contrast, a_labels, c_labels, a_probs, c_probs, a_gt, c_gt, self_index,
                   num_pos) -> _Sorted:  # fmt: skip
    """Sort both sets by ``2 * label + is_gt``: each class becomes one contiguous range of columns."""
    a_key, c_key = a_labels * 2 + a_gt.long(), c_labels * 2 + c_gt.long()
    a_order = torch.argsort(a_key, stable=True)
    c_order = torch.argsort(c_key, stable=True)
    c_rank = torch.empty_like(c_order)
    c_rank[c_order] = torch.arange(c_order.numel(), device=c_order.device)
    own = self_index[a_order]
    own = torch.where(own >= 0, c_rank[own.clamp(min=0)], own)
    inv_pos = 1.0 / num_pos[a_order].clamp(min=1).to(anchors.dtype)
    inv_pos = torch.where(num_pos[a_order] > 0, inv_pos, torch.zeros_like(inv_pos))

    keys, counts = torch.unique_consecutive(a_key[a_order], return_counts=True)
    first = keys - keys % 2  # 2 * label
    c_sorted = c_key[c_order]
    bounds = [torch.searchsorted(c_sorted, first + i) for i in (0, 1, 2)]  # start, gt_start, end
    row_end = counts.cumsum(0)
    groups = [_Group(*g) for g in zip((row_end - counts).tolist(), row_end.tolist(),
                                      *(b.tolist() for b in bounds), (keys % 2 == 1).tolist())]  # fmt: skip
    return _Sorted(a_order, anchors[a_order], a_probs[a_order], own, inv_pos,
                   contrast[c_order], c_probs[c_order], groups)  # fmt: skip


def _negatives_max(rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Row maximum over the columns outside ``start:end`` (-inf when there are none)."""
    parts = [p.amax(dim=1) for p in (rows[:, :start], rows[:, end:]) if p.shape[1]]
    if not parts:
        return rows.new_full((rows.shape[0],), float("-inf"))
    return parts[0] if len(parts) == 1 else torch.maximum(*parts)


def _chunk_groups(groups: list[_Group], r0: int, r1: int) -> list[tuple[_Group, int, int]]:
    """The groups meeting sorted rows ``r0:r1``, with their rows relative to ``r0``."""
    return [(g, max(g.row_start, r0) - r0, min(g.row_end, r1) - r0)
            for g in groups if g.row_start < r1 and g.row_end > r0]  # fmt: skip


# oneDNN's float32 matmul (``torch._C._nn.mkldnn_linear``) reaches about twice the throughput of
# the BLAS behind ``torch.mm`` on the AMD development machine (MKL does not use AVX-512 there); on
# other CPUs the two are close. ``False`` forces ``torch.mm`` (float64 and GPU tensors always use it),
# as do small products, where oneDNN's per-call set-up costs more than it saves.
USE_ONEDNN = True
ONEDNN_MIN_ELEMENTS = 1 << 18  # elements of the fixed factor m


class _TimesTransposed:
    """``x @ m.T`` for one fixed ``m``: oneDNN on CPU float32 (``m`` packed once), else ``torch.mm``."""

    def __init__(self, m: torch.Tensor):
        self.m = m
        self.packed = None
        if (USE_ONEDNN and m.device.type == "cpu" and m.dtype == torch.float32 and m.numel() >= ONEDNN_MIN_ELEMENTS
                and torch.backends.mkldnn.is_available() and hasattr(torch._C._nn, "mkldnn_linear")):
            self.packed = m.contiguous().to_mkldnn()

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self.packed, None).to_dense()
        return torch.mm(x, self.m.T, out=out)


def _ucd_sorted(srt: _Sorted, inv_tau: float, reference: bool, block_size: int, need_grad: bool):
    """Per-anchor loss and its gradient w.r.t. the anchor (sorted order; see the module docstring).

    For a chunk of sorted anchors: one product ``S' = s - shift`` (the shift is folded into the
    product as an extra column), ``exp`` in place, the anchors' own class range set to 0, and one
    product ``exp(S') @ [C, 1]`` that gives at once the negatives' sum ``N_i`` (last column) and
    their softmax-weighted sum of contrast vectors (the gradient's negative part). The positive
    terms (weights, softplus, sigmoid) are computed on the small ``|A_c| x |C_c|`` blocks only.
    """
    anchors, contrast = srt.anchors, srt.contrast
    (n, dim), k = anchors.shape, contrast.shape[0]
    ones = contrast.new_ones((k, 1))
    contrast1 = torch.cat([contrast, ones], dim=1)  # [C, 1]
    bound = inv_tau * anchors.norm(dim=1) * contrast.norm(dim=1).max()  # >= s_ik (Cauchy-Schwarz)
    exact_shift = 2.0 * float(bound.max()) > _EXP_RANGE.get(anchors.dtype, 60.0)
    anchors1 = torch.cat([anchors * inv_tau, -bound[:, None]], dim=1)  # [a / tau, -bound]

    loss = anchors.new_zeros(n)
    grad = anchors.new_zeros((n, dim)) if need_grad else None
    rows_per_chunk = min(n, max(1, (block_size * n) // k))
    similarities = _TimesTransposed(contrast1)  # x @ [C, 1].T
    weighted_sum = _TimesTransposed(contrast1.T) if need_grad else None  # x @ [C, 1]
    # torch.mm writes into reused buffers: a fresh |rows| x |C| tensor per chunk is paged in again
    scores_buf = anchors.new_empty((rows_per_chunk, k)) if similarities.packed is None else None
    neg_buf = anchors.new_empty((rows_per_chunk, dim + 1)) if need_grad and weighted_sum.packed is None else None
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n)
        parts = _chunk_groups(srt.groups, r0, r1)
        scores = similarities(anchors1[r0:r1], None if scores_buf is None else scores_buf[: r1 - r0])
        # scores = s_ik - shift_i <= 0
        shift = bound[r0:r1].clone()
        if exact_shift:  # large 1/tau: shift by the negatives' own maximum so exp() cannot underflow
            neg_max = torch.cat([_negatives_max(scores[g0:g1], g.start, g.end) for g, g0, g1 in parts])
            neg_max = torch.where(torch.isfinite(neg_max), neg_max, torch.zeros_like(neg_max))
            scores -= neg_max[:, None]
            shift += neg_max
        blocks = [scores[g0:g1, g.start:g.end].clone() for g, g0, g1 in parts]  # positives + own copy
        if reference:  # m_i = max_k s_ik, i.e. shift_i + the maximum of row i of scores
            row_max = shift + _row_max(scores, parts, blocks, srt.own[r0:r1])
        scores.exp_()
        for g, g0, g1 in parts:
            scores[g0:g1, g.start:g.end] = 0.0  # only negatives remain
        if need_grad:  # (rows, D + 1): sum_n exp(s'_in) c_n | sum_n exp(s'_in)
            neg = weighted_sum(scores, None if neg_buf is None else neg_buf[: r1 - r0])
            neg_sum = neg[:, dim].clone()
        else:
            neg_sum = scores.sum(dim=1)
        # u_ik = log N_i + m_i - s_ik with log N_i = shift_i + log(neg_sum_i), s_ik = shift_i + s'_ik
        offset = neg_sum.log() + (row_max if reference else 0.0)  # u_ik = offset_i - s'_ik
        agg = anchors.new_zeros(r1 - r0) if need_grad else None
        for (g, g0, g1), u in zip(parts, blocks):
            rows = slice(r0 + g0, r0 + g1)
            weight = _pair_weights(srt, g, rows)
            u.neg_().add_(offset[g0:g1, None])
            if need_grad:
                coef = torch.sigmoid(u).mul_(weight)  # -dl/ds_ik * |P_i|
                agg[g0:g1] = coef.sum(dim=1)
                grad[rows] = -(coef @ contrast[g.start:g.end])
            loss[rows] = _softplus_(u).mul_(weight).sum(dim=1)
        if need_grad:
            # negative part: agg_i * softmax over the negatives of s_in, times c_n
            mean_neg = neg[:, :dim] / neg_sum.clamp(min=torch.finfo(neg_sum.dtype).tiny)[:, None]
            grad[r0:r1] += agg[:, None] * mean_neg
    loss *= srt.inv_pos
    if need_grad:
        grad *= (srt.inv_pos * inv_tau)[:, None]
    return loss, grad


def _pair_weights(srt: _Sorted, g: _Group, rows: slice) -> torch.Tensor:
    """``w_ik`` on a class block: ``<p_i, p_k>``, 1 for GT x GT, 0 at the anchor's own copy."""
    weight = srt.anchor_probs[rows] @ srt.contrast_probs[g.start:g.end].T
    if g.is_gt:
        weight[:, g.gt_start - g.start:] = 1.0
    own = srt.own[rows]
    has_own = own >= 0
    weight[has_own.nonzero()[:, 0], own[has_own] - g.start] = 0.0
    return weight


def _softplus_(u: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(u))``, overwriting ``u``: ``max(u, 0) + log1p(exp(-|u|))``.

    ``log1p`` is written as ``log(w) - ((w - 1) - e) / w`` with ``w = 1 + e`` (the rounding
    error of ``1 + e`` corrected to first order): relative error a few 1e-7 in float32, and
    vectorised ``exp`` / ``log`` run several times faster than ``F.softplus`` on a CPU.
    """
    e = u.abs().neg_().exp_()
    w = e + 1.0
    correction = (w - 1.0).sub_(e).div_(w)
    return w.log_().sub_(correction).add_(u.clamp_(min=0.0))


def _row_max(scores, parts, blocks, own) -> torch.Tensor:
    """``m_i - shift_i``: the maximum of row ``i`` of ``scores`` (the whole contrast set).

    With the anchor's own copy present the maximum is the similarity with that copy (cosine <= 1),
    which lies in the anchor's class block, so the small block's maximum is the row's maximum up
    to rounding (a few ulp of 1/tau). Rows without an own copy take the exact maximum of the row.
    """
    out = []
    for (g, g0, g1), block in zip(parts, blocks):
        own_rows = own[g0:g1] >= 0
        if block.shape[1] and bool(own_rows.all()):
            out.append(block.amax(dim=1))
        else:
            out.append(scores[g0:g1].amax(dim=1))
    return torch.cat(out)


class _SortedContrastive(torch.autograd.Function):
    """Per-anchor UCD loss ``(N,)``; gradient only w.r.t. the (L2-normalised) anchors.

    Each per-anchor loss depends on its own anchor only, so its Jacobian is one ``(D,)`` row per
    anchor: the forward pass computes it alongside the loss (when the anchors need a gradient) and
    the backward pass scales it by the incoming gradient. Nothing ``|A| x |C|`` is kept.
    """

    @staticmethod
    def forward(ctx, anchors, contrast, a_labels, c_labels, a_probs, c_probs, a_gt, c_gt,
                self_index, num_pos, inv_tau, reference, block_size):  # fmt: skip
        srt = _sort_by_class(anchors, contrast, a_labels, c_labels, a_probs, c_probs, a_gt, c_gt,
                             self_index, num_pos)  # fmt: skip
        need_grad = bool(ctx.needs_input_grad[0])
        loss_sorted, grad_sorted = _ucd_sorted(srt, inv_tau, reference, block_size, need_grad)
        loss = torch.empty_like(loss_sorted)
        loss[srt.order] = loss_sorted
        if need_grad:
            jacobian = torch.empty_like(grad_sorted)
            jacobian[srt.order] = grad_sorted
            ctx.save_for_backward(jacobian)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (jacobian,) = ctx.saved_tensors
        return (grad_loss[:, None] * jacobian,) + (None,) * 12


def _check_void(void: str) -> None:
    if not isinstance(void, str) or void not in VOID_MODES:
        raise ValueError(f"void must be one of {VOID_MODES}, got {void!r}")


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
    if any_true((self_index < -1) | (self_index >= k)):
        raise ValueError(f"self_index must be in [-1, {k}), got values {self_index.tolist()[:8]}...")
    own_labels = contrast_labels[self_index.clamp(min=0)] if k else anchor_labels
    if any_true((self_index >= 0) & (own_labels != anchor_labels)):
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

    Computed in float32 (float64 for float64 anchors) even under autocast.
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

    with full_precision(anchors):  # autocast would run the similarity products in bfloat16 / float16
        per_anchor = _SortedContrastive.apply(
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
    void: str = "ignore",
    stats: dict | None = None,
) -> torch.Tensor:
    """UCD uncertainty-aware contrastive distillation (docs/protocol.md §3), a 0-d float32 tensor.

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
        void: ``"ignore"`` (void cells never enter the loss) or ``"background"`` (void cells are
            labelled 0 before the selection, so they take the old model's argmax and enter as
            non-GT pixels, as in both UCD releases; see :func:`prepare_contrastive_inputs`).
        stats: a dict to fill with :func:`~ucdseg.losses.contrastive_input_stats` of the inputs the
            loss prepared (what it sees, for the logs), or None.

    Returns an exact 0 that keeps a gradient path to ``features`` when no pixel is kept or no
    anchor has a positive. Computed in float32 whatever the input precision (float64 stays float64).
    """
    _check_options(temperature, formulation, block_size)
    # autocast would run the similarity matmuls in bfloat16/float16: docs/protocol.md §3 wants float32
    with full_precision(features):
        inputs = prepare_contrastive_inputs(features, old_features, old_logits, labels, void=void)
        if stats is not None:
            from .contrastive_stats import contrastive_input_stats

            stats.update(contrastive_input_stats(inputs))
        if inputs.anchors.shape[0] == 0:
            return features.flatten()[:0].to(inputs.anchors.dtype).sum()
        return contrastive_distillation_flat(
            *inputs, temperature=temperature, formulation=formulation, block_size=block_size
        )
