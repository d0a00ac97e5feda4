"""SDR's latent-space terms (Michieli & Zanuttigh, "Continual Semantic Segmentation via
Repulsion-Attraction of Sparse and Disentangled Latent Representations", CVPR 2021) as plain
functions of tensors.

The release is ``LTTM/SDR`` (commit 8638296): ``utils/loss.py`` and ``train.py``. Every term works
on the encoder's output features ``f`` (``features['body']``, ``(B, D, h, w)``, D = 2048 for a
ResNet-101) and on labels brought to the feature resolution with :func:`downsample_labels`.
Prototypes ``p`` (``(C, D)``, C = classes seen so far, background included) and their pixel counts
``n`` (``(C,)``, int64 as the release's ``count_features``, run.py:255-256) are state kept across
steps (docs/methods.md, "MiB+SDR"; docs/protocol.md §3 for the other losses):

* :func:`update_prototypes` -- running class means of the current model's detached features,
  called on every batch *before* the losses (train.py:160-164, 460-484).
* :func:`prototype_matching` -- old classes' current means pulled to their prototypes, on the
  background pixels the old model assigns to them (loss.py:476-510).
* :func:`feature_clustering` -- attraction of every pixel to its class prototype (loss.py:369-395).
* :func:`feature_separation` -- repulsion of the batch's class means (loss.py:397-408).
* :func:`feature_sparsification` -- class-wise max-normalised sparsity ratio (loss.py:524-574).

``release_compat``: ``False`` (default) computes what the paper describes, per-pixel features and
true class means. ``True`` reproduces the release's numbers with its three bugs:

1. ``features[mask.expand(...)].view(D, -1)`` (train.py:474, loss.py:383) reads the selected values
   in (image, channel, pixel) order, so the "channel" rows mix channels and images as soon as the
   batch has more than one image; ``.view(-1, D)`` (loss.py:501) mixes channels for any batch.
2. Attraction divides the running sum by the number of classes *inside* the class loop
   (loss.py:395), so the k-th of K classes is divided K - k times.
3. The prototype update drops "the first unique label" (``cl_present[1:]``, train.py:466), a real
   class when the batch has no background pixel.

Where a mode changes nothing (sparsification), the flag is accepted and documented as such.
Half-precision inputs are computed in float32.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .defaults import SDR_README_WEIGHTS, SDR_WEIGHTS

__all__ = [
    "SDR_WEIGHTS",
    "SDR_README_WEIGHTS",
    "SDR_EPS",
    "downsample_labels",
    "old_prediction_down",
    "check_prototypes",
    "update_prototypes",
    "prototype_matching",
    "feature_clustering",
    "feature_separation",
    "feature_sparsification",
]

#: ``self.eps`` of ``FeaturesSparsificationLoss`` (loss.py:521).
SDR_EPS = 1e-15


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def downsample_labels(labels: Tensor, size: int | Sequence[int]) -> Tensor:
    """Labels ``(B, H, W)`` at the feature size ``(h, w)``, as every SDR term does it.

    ``F.interpolate(labels[:, None].double(), size, mode="nearest").long()`` (loss.py:371, 482,
    529; train.py:161-163): output pixel ``i`` takes source pixel ``floor(i * H / h)`` (not PyTorch's
    ``nearest-exact``). Values are copied, so void (255) stays void. The same in both modes.
    """
    if not torch.is_tensor(labels) or labels.dim() != 3 or labels.is_floating_point():
        got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of shape (B, H, W), got {got}")
    return F.interpolate(labels[:, None].double(), size=size, mode="nearest").long()[:, 0]


def old_prediction_down(old_logits: Tensor, size: int | Sequence[int]) -> Tensor:
    """The old model's prediction at the feature size: argmax of ``old_logits`` ``(B, C_old, H, W)``
    over classes, then :func:`downsample_labels` (loss.py:491-492: argmax of the full-resolution
    output, then nearest down-sampling)."""
    if not torch.is_tensor(old_logits) or old_logits.dim() != 4 or not old_logits.is_floating_point():
        got = tuple(old_logits.shape) if torch.is_tensor(old_logits) else type(old_logits).__name__
        raise ValueError(f"old_logits must be a floating tensor (B, C_old, H, W), got {got}")
    return downsample_labels(old_logits.detach().argmax(dim=1), size)


def check_prototypes(prototypes: Tensor, num_classes: int, feat_dim: int) -> None:
    """Raise ``ValueError`` unless ``prototypes`` is ``(num_classes, feat_dim)``."""
    if not torch.is_tensor(prototypes) or tuple(prototypes.shape) != (num_classes, feat_dim):
        got = tuple(prototypes.shape) if torch.is_tensor(prototypes) else type(prototypes).__name__
        raise ValueError(
            f"prototypes have shape {got}, expected (classes, feature channels) = "
            f"({num_classes}, {feat_dim})"
        )


def _check_features(features: Tensor) -> None:
    if not torch.is_tensor(features) or features.dim() != 4 or not features.is_floating_point():
        got = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise ValueError(f"features must be a floating tensor of shape (B, D, h, w), got {got}")


def _check_labels(labels: Tensor, features: Tensor, name: str = "labels_down") -> None:
    b, _, h, w = features.shape
    if not torch.is_tensor(labels) or labels.is_floating_point() or tuple(labels.shape) != (b, h, w):
        got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(
            f"{name} must be an integer tensor (B, h, w) = {(b, h, w)} matching features of shape "
            f"{tuple(features.shape)} (use downsample_labels), got {got}"
        )


def _check_fit(prototypes: Tensor, features: Tensor, labels: Tensor, ignore_index: int | None,
               name: str = "labels_down") -> None:
    """Prototypes ``(C, D)`` must match the features' D and cover every label value."""
    if not torch.is_tensor(prototypes) or prototypes.dim() != 2 or prototypes.shape[1] != features.shape[1]:
        got = tuple(prototypes.shape) if torch.is_tensor(prototypes) else type(prototypes).__name__
        raise ValueError(
            f"prototypes of shape {got} do not fit features of shape {tuple(features.shape)}: "
            f"expected (C, {features.shape[1]})"
        )
    if labels.device.type == "meta":  # no values to check
        return
    values = labels if ignore_index is None else labels[labels != ignore_index]
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= prototypes.shape[0]):
        bad = int(values.max()) if int(values.max()) >= prototypes.shape[0] else int(values.min())
        void = "" if ignore_index is None else f" or {ignore_index}"
        raise ValueError(
            f"{name} holds class {bad}, outside prototypes of shape {tuple(prototypes.shape)} "
            f"(expected 0..{prototypes.shape[0] - 1}{void})"
        )


def _compute(t: Tensor) -> Tensor:
    """float32 for half-precision inputs, else unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _pixels(features: Tensor) -> Tensor:
    """Per-pixel feature rows ``(B*h*w, D)`` (image, row, column order)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def _release_rows(features: Tensor, mask: Tensor) -> Tensor:
    """The release's ``features[mask.expand(-1, D, -1, -1)].view(D, -1)`` (train.py:474,
    loss.py:383): right (row d = channel d) only when the batch holds one image (bug 1)."""
    d = features.shape[1]
    return features[mask[:, None].expand_as(features)].view(d, -1)


def _class_sums(features: Tensor, labels: Tensor, num_classes: int, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class feature sums ``(C, D)`` and pixel counts ``(C,)`` over the ``valid`` pixels."""
    rows, ids = _pixels(features)[valid.reshape(-1)], labels.reshape(-1)[valid.reshape(-1)]
    sums = rows.new_zeros(num_classes, rows.shape[1]).index_add(0, ids, rows)
    return sums, torch.bincount(ids, minlength=num_classes)


def _zero(features: Tensor) -> Tensor:
    """An exact 0 that keeps a gradient path to ``features``."""
    return features.sum() * 0.0


# --------------------------------------------------------------------------------------------
# Prototypes
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def update_prototypes(
    prototypes: Tensor,
    counts: Tensor,
    features: Tensor,
    labels_down: Tensor,
    *,
    drop_first: bool,
    ignore_index: int = 255,
    release_compat: bool = False,
) -> tuple[Tensor, Tensor]:
    """One batch's update of the running class means (SDR's ``Trainer._update_running_stats``,
    train.py:460-484, called at train.py:160-164 before the losses).

    For every class ``c`` of ``labels_down`` (``(B, h, w)``, see :func:`downsample_labels`) but void,
    with ``S_c`` the sum and ``m_c`` the number of c's pixels over the batch::

        p_c <- (S_c + n_c p_c) / (n_c + m_c),    n_c <- n_c + m_c

    (a cumulative moving average: ``p_c`` is the mean of every feature of class c seen so far).
    ``drop_first`` is the release's ``overlapped or (not sequential and step > 0)`` (train.py:465):
    the background is excluded because its pixels may be old or future classes. Intended mode drops
    label 0 explicitly; ``release_compat`` drops the first unique label present, a real class when
    the batch has no background (bug 3), and sums the release's mixed rows (bug 1) when ``B > 1``
    (the counts are right either way). A batch with nothing to update returns the inputs unchanged
    (the release would raise an IndexError on a batch of background only with ``drop_first``).

    Args:
        prototypes: ``(C, D)`` floating; returned as a new tensor of the same dtype.
        counts: ``(C,)`` integer pixel counts (int64 in the release); returned as a new tensor.
        features: ``(B, D, h, w)``, detached here (no gradient ever flows through the update).
    Returns:
        ``(prototypes, counts)``, new tensors; the inputs are not modified.
    """
    _check_features(features)
    _check_labels(labels_down, features)
    _check_fit(prototypes, features, labels_down, ignore_index)
    if not torch.is_tensor(counts) or counts.is_floating_point() or tuple(counts.shape) != (prototypes.shape[0],):
        got = tuple(counts.shape) if torch.is_tensor(counts) else type(counts).__name__
        raise ValueError(
            f"counts must be an integer tensor of shape ({prototypes.shape[0]},) matching prototypes "
            f"of shape {tuple(prototypes.shape)}, got {got}"
        )
    features = features.detach().to(prototypes.dtype)
    prototypes, counts = prototypes.detach().clone(), counts.detach().clone()
    if release_compat:
        present = torch.unique(labels_down)
        if drop_first:
            present = present[1:]
        if present.numel() and int(present[-1]) == ignore_index:
            present = present[:-1]
        for cl in present.tolist():
            rows = _release_rows(features, labels_down == cl)
            m = rows.shape[-1]
            prototypes[cl] = (rows.sum(dim=-1) + counts[cl] * prototypes[cl]) / (counts[cl] + m)
            counts[cl] += m
        return prototypes, counts
    valid = labels_down != ignore_index
    if drop_first:
        valid &= labels_down != 0
    sums, m = _class_sums(features, labels_down, prototypes.shape[0], valid)
    seen = m > 0
    total = counts + m
    prototypes[seen] = (sums[seen] + counts[seen, None] * prototypes[seen]) / total[seen, None]
    return prototypes, total.to(counts.dtype)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def prototype_matching(
    features: Tensor,
    prototypes: Tensor,
    labels_down: Tensor,
    old_pred_down: Tensor,
    *,
    release_compat: bool = False,
) -> Tensor:
    """SDR's prototype matching (``DistillationEncoderPrototypesLoss`` with
    ``loss_de_prototypes_sumafter``, loss.py:476-510), for a step ``t >= 1``.

    Pseudo-labels ``y~ = old_pred_down * (labels_down == 0)`` (loss.py:483, 491-493): the old model's
    prediction on the background pixels of the step's labels (void pixels are not background). For
    the K old classes ``c != 0`` present in ``y~``, with ``mu_c`` the mean of the current features
    of c's pixels over the batch and MSE averaged over the D channels::

        L_pm = sum_c MSE(mu_c, p_c.detach()) / K          (0 when K = 0)

    ``release_compat`` averages the rows of ``features[mask].view(-1, D)`` instead of the pixels
    (bug 1: the rows mix channels for any batch size). ``old_pred_down`` is ``(B, h, w)``, e.g.
    :func:`old_prediction_down` of the old logits; gradients flow into ``features`` only.
    """
    _check_features(features)
    _check_labels(labels_down, features)
    _check_labels(old_pred_down, features, "old_pred_down")
    _check_fit(prototypes, features, old_pred_down, None, "old_pred_down")
    f = _compute(features)
    protos = prototypes.detach().to(f.dtype)
    pseudo = old_pred_down * (labels_down == 0).long()
    present = torch.unique(pseudo)
    present = present[present != 0]
    if present.numel() == 0:
        return _zero(f)
    d = f.shape[1]
    if release_compat:
        loss = _zero(f)
        for cl in present.tolist():
            rows = f[(pseudo == cl)[:, None].expand_as(f)].view(-1, d)
            loss = loss + F.mse_loss(rows.mean(dim=0), protos[cl]) / present.numel()
        return loss
    sums, m = _class_sums(f, pseudo, protos.shape[0], pseudo != 0)
    means = sums[present] / m[present, None].to(f.dtype)
    return ((means - protos[present]) ** 2).mean(dim=1).sum() / present.numel()


def _clustering_classes(labels_down: Tensor, ignore_index: int) -> Tensor:
    """Classes of attraction and repulsion: every label present but void (loss.py:372-378;
    ``lfc_nobgr`` is off in SDR's preset, so the background is one of them)."""
    present = torch.unique(labels_down)
    return present[present != ignore_index]


def feature_clustering(
    features: Tensor,
    prototypes: Tensor,
    labels_down: Tensor,
    *,
    ignore_index: int = 255,
    release_compat: bool = False,
) -> Tensor:
    """SDR's attraction ("features clustering", ``FeaturesClusteringSeparationLoss``,
    loss.py:369-395), for a step ``t >= 1``.

    For the K classes of ``labels_down`` but void (background included), with MSE averaged over
    c's pixels and the D channels::

        L_fc = sum_c [ sum_{i in c} ||f_i - p_c||^2 / (D |c|) ] / K

    ``prototypes`` are the running means *after* this batch's :func:`update_prototypes` (as in the
    release) and receive no gradient. ``release_compat`` reproduces bugs 1 and 2: the rows of the
    release's ``view(D, -1)`` are compared with ``p_c``'s channels, and the running sum is divided
    by K after every class (the k-th of K classes, from 0, weighs ``K^-(K-k)``).
    """
    _check_features(features)
    _check_labels(labels_down, features)
    _check_fit(prototypes, features, labels_down, ignore_index)
    f = _compute(features)
    protos = prototypes.detach().to(f.dtype)
    present = _clustering_classes(labels_down, ignore_index)
    if present.numel() == 0:
        return _zero(f)
    if release_compat:
        loss = _zero(f)
        for cl in present.tolist():
            rows = _release_rows(f, labels_down == cl)
            loss = loss + F.mse_loss(rows, protos[cl].unsqueeze(1).expand_as(rows))
            loss = loss / present.numel()
        return loss
    valid = (labels_down != ignore_index).reshape(-1)
    ids = labels_down.reshape(-1)[valid]
    sq = ((_pixels(f)[valid] - protos[ids]) ** 2).sum(dim=1)
    per_class = sq.new_zeros(protos.shape[0]).index_add(0, ids, sq)
    m = torch.bincount(ids, minlength=protos.shape[0]).to(f.dtype)
    return (per_class[present] / (f.shape[1] * m[present])).sum() / present.numel()


def feature_separation(
    features: Tensor,
    labels_down: Tensor,
    *,
    ignore_index: int = 255,
    release_compat: bool = False,
) -> Tensor:
    """SDR's repulsion ("separation between clusters", loss.py:397-408), for a step ``t >= 1``.

    ``mu_c`` is the mean of the current features of class c over the batch, for the K classes of
    ``labels_down`` but void (background included). The loss is the mean over ordered pairs
    ``a != b`` of ``1 / ||mu_a - mu_b||_2`` (``torch.cdist``; pairs at distance 0 are left out, as
    the release's ``~isinf`` filter does), and 0 with fewer than two classes. Distances are computed
    pair by pair (``compute_mode="donot_use_mm_for_euclid_dist"``).

    ``release_compat`` takes the means of the release's ``view(D, -1)`` rows (bug 1, from the
    attraction's loop, loss.py:390; they are the true means when the batch holds one image) and
    calls ``torch.cdist`` in its default mode, as the release does. With more than 25 classes in a
    batch (ADE20K) that mode uses the matrix-product formula, whose diagonal is not exactly 0
    (``sqrt(clamp(|x|^2 + |x|^2 - 2 x.x, 1e-30))``): the release's ``~isinf`` filter then keeps the
    self-pairs and their huge inverse distances. The default mode never has this.
    """
    _check_features(features)
    _check_labels(labels_down, features)
    f = _compute(features)
    present = _clustering_classes(labels_down, ignore_index)
    if present.numel() < 2:
        return _zero(f)
    if release_compat:
        means = torch.stack([_release_rows(f, labels_down == cl).mean(dim=-1) for cl in present.tolist()])
        inverse = 1 / torch.cdist(means[None], means[None])[0]  # default mode: mm for K > 25
        kept = inverse[~torch.isinf(inverse)]
        return kept.mean() if kept.numel() else _zero(f)
    num = int(present.max()) + 1
    sums, m = _class_sums(f, labels_down, num, labels_down != ignore_index)
    means = sums[present] / m[present, None].to(f.dtype)
    dist = torch.cdist(means[None], means[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    off = ~torch.eye(present.numel(), dtype=torch.bool, device=f.device) & (dist > 0)
    if not bool(off.any()):
        return _zero(f)
    return (1.0 / dist[off]).mean()


def feature_sparsification(
    features: Tensor,
    labels_down: Tensor,
    *,
    eps: float = SDR_EPS,
    release_compat: bool = False,
) -> Tensor:
    """SDR's features sparsification (``FeaturesSparsificationLoss`` with the preset's
    ``max_maskedforclass`` / ``exponential`` / ``ratio``, loss.py:524-574), at every step.

    Each pixel's features are divided by the maximum, over the pixels of its label value in the
    whole batch and all channels, of ``features`` (plus ``eps``); every label value counts here,
    background and void (255) included (loss.py:537-544). Per pixel
    ``r = sum_d exp(f~_d) / (sum_d f~_d + eps)``; the loss is the mean of r over all pixels.
    Two release rules are kept: a batch whose only label is 0 gives 0 (loss.py:540-541 drop a last
    label 0; nothing is normalised), and so does a batch whose normalised features sum to <= 0
    (loss.py:550). ``release_compat`` changes nothing here: the release has no bug in this term.
    """
    _check_features(features)
    _check_labels(labels_down, features)
    del release_compat  # same computation in both modes
    f = _compute(features)
    classes, index = torch.unique(labels_down, return_inverse=True)
    if classes[-1] == 0:
        return _zero(f)
    # Each pixel has one label, so the release's sum over classes of ``f / (peak + eps) * mask`` is
    # ``f / (peak[label] + eps)``, value for value. The peaks are taken per pixel then per label:
    # only a tie at a label's maximum would share its gradient differently (the release: evenly
    # over all tied values).
    pixel_peak = f.amax(dim=1)
    peaks = torch.stack([pixel_peak[index == k].max() for k in range(classes.numel())])
    normed = f / (peaks[index] + eps)[:, None]
    if not bool(normed.sum() > 0):
        return _zero(f)
    ratio = torch.exp(normed).sum(dim=1) / (normed.sum(dim=1) + eps)
    return ratio.mean()
