"""Counts describing what the UCD loss sees in a batch, for the training logs.

A degenerate input (no old-model element in the contrast set, every positive pair GT-GT with
weight 1) leaves UCD a plain SupCon of the anchors against their own copies; these counts make it
visible. They are computed from :func:`ucdseg.losses.prepare_contrastive_inputs`' output with a
few ``bincount`` calls: no ``N x K`` matrix is built.
"""

from __future__ import annotations

import torch

from .contrastive import ContrastiveInputs

__all__ = ["contrastive_input_stats"]


@torch.no_grad()
def contrastive_input_stats(inputs: ContrastiveInputs) -> dict[str, float]:
    """Sizes of the anchor and contrast sets and how many positive pairs get a real weight.

    Returns floats:

    * ``anchors``: ``N``, kept pixels of the batch;
    * ``contrast``: ``K``, the contrast set (the anchors' copies plus the old-model elements);
    * ``old_elements``: ``K - N``, old-model features at kept non-GT pixels;
    * ``positive_pairs``: anchor / contrast pairs with the same label, an anchor's own copy excluded;
    * ``weighted_pair_share``: share of those positive pairs whose uncertainty weight is the old
      model's ``sum_c p_i(c) p_k(c)``, i.e. not both GT (their weight is forced to 1); 0 when there
      is no positive pair.
    """
    n, k = inputs.anchors.shape[0], inputs.contrast.shape[0]
    labels = torch.cat([inputs.anchor_labels, inputs.contrast_labels])
    size = int(labels.max()) + 1 if labels.numel() else 1

    def count(values: torch.Tensor) -> torch.Tensor:
        return torch.bincount(values, minlength=size).double()

    same_label = (count(inputs.anchor_labels) * count(inputs.contrast_labels)).sum()
    gt_gt = (count(inputs.anchor_labels[inputs.anchor_is_gt])
             * count(inputs.contrast_labels[inputs.contrast_is_gt])).sum()
    has_copy = inputs.self_index >= 0  # an anchor's copy carries its label and its GT flag
    positive = same_label - has_copy.sum()
    positive_gt_gt = gt_gt - (has_copy & inputs.anchor_is_gt).sum()
    share = float(1.0 - positive_gt_gt / positive) if positive > 0 else 0.0
    return {
        "anchors": float(n),
        "contrast": float(k),
        "old_elements": float(k - n),
        "positive_pairs": float(positive),
        "weighted_pair_share": share,
    }
