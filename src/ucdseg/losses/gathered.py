"""Global-batch UCD contrastive distillation for distributed (DDP) training.

:func:`gathered_contrastive_distillation` is :func:`~ucdseg.losses.contrastive_distillation`
with the contrast set taken from the *global* batch: every process all-gathers the detached
contrast elements of every other process (their labels, old-model probabilities and GT flags
too), so each local anchor is contrasted against what a single process would see on the
concatenated batch. Outside an initialised process group of two or more processes it is the
plain loss.

Value and gradient (the DDP convention)
---------------------------------------
Let ``L = (1/V) sum_i l_i`` be the single-process loss on the concatenated batch: ``l_i`` the
loss of anchor ``i`` against the global contrast set, ``V`` the number of anchors (over all
processes) with at least one positive. Process ``r`` holds the anchors ``A_r`` and computes
``S_r = sum_{i in A_r} l_i`` (reduction ``"sum"``); one all-reduce gives ``S = sum_r S_r`` and
``V``. The function returns, on every process,

* the **value** ``S / V = L``: the same number on every rank (so logs show the global loss and
  a non-finite loss is seen by every rank at once);
* the **gradient** of ``W * S_r / V`` (``W`` = world size) w.r.t. the local features: the
  contrast set is a constant, so ``d l_i / d f`` is non-zero only on the process owning
  anchor ``i``, and ``dL/df_r = (1/V) sum_{i in A_r} d l_i / d f_r``.

DDP *averages* parameter gradients over the ``W`` processes, so the parameters receive
``(1/W) sum_r W * d(S_r / V)/d theta = d L / d theta``: exactly the single-process gradient on
the concatenated batch. Equivalently, w.r.t. its own features process ``r`` sees ``W`` times
the matching slice of the single-process gradient. (If you reduce gradients with a plain sum
instead of DDP's mean, divide this loss's gradient by ``W``.)

Cost: one all-gather of ``W`` integers, one all-gather of the packed contrast sets (padded to
the largest), one all-reduce of two numbers. Every process must call the function the same
number of times (it is a collective), even when it has no kept pixel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .contrastive_stats import contrastive_input_stats
from .contrastive import (
    DEFAULT_BLOCK_SIZE,
    _check_options,
    _check_void,
    contrastive_distillation,
    contrastive_distillation_flat,
    prepare_contrastive_inputs,
)
from .device_generic import full_precision

__all__ = ["all_gather_rows", "gathered_contrastive_distillation", "is_distributed"]

# Labels travel in the packed float tensor: integers below 2**24 are exact in float32.
_MAX_PACKED_LABEL = 2**24


def is_distributed() -> bool:
    """True inside an initialised process group of two or more processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate the ``(n_r, F)`` tensors of every process along dim 0 (``n_r`` may differ).

    Sizes are gathered first, each tensor is zero-padded to the largest ``n_r``, gathered and
    trimmed back. Returns ``(rows of rank 0, rows of rank 1, ...)`` concatenated, and the
    ``n_r``. Raises ValueError on every process if the row widths ``F`` differ between
    processes. The result is not differentiable (use it for detached tensors).
    """
    if rows.dim() != 2:
        raise ValueError(f"all_gather_rows expects a 2-d (n, F) tensor, got shape {tuple(rows.shape)}")
    world = dist.get_world_size()
    shape = torch.tensor([rows.shape[0], rows.shape[1]], dtype=torch.int64, device=rows.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    sizes = [int(s[0]) for s in shapes]
    widths = sorted({int(s[1]) for s in shapes})
    if len(widths) > 1:
        raise ValueError(
            f"processes gather rows of different widths {widths} "
            "(feature dimension or number of old classes differ between ranks)"
        )
    longest = max(sizes)
    if longest == 0:
        return rows[:0], sizes
    padded = rows.new_zeros((longest, rows.shape[1]))
    padded[: rows.shape[0]] = rows
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded.contiguous())
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0), sizes


def gathered_contrastive_distillation(
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
    """UCD contrastive distillation against the global batch (see the module docstring).

    Same arguments (``void`` and ``stats`` included: the counts are this process's inputs) and semantics as
    :func:`~ucdseg.losses.contrastive_distillation` (0-d float32 tensor, float64 for float64
    inputs, computed in full precision even under autocast). Under ``torch.distributed`` with
    ``world_size > 1`` the contrast set is gathered from every process; the value is the loss on
    the concatenated batch (identical on every rank) and the gradient is scaled for DDP's
    gradient averaging, so DDP training sees the single-process gradient of the concatenated
    batch. Returns an exact 0 with a gradient path to ``features`` when no anchor of any process
    has a positive. It is a collective: every process must call it.
    """
    _check_options(temperature, formulation, block_size)
    _check_void(void)
    if not is_distributed():
        with full_precision(features):
            return contrastive_distillation(features, old_features, old_logits, labels, temperature=temperature,
                                            formulation=formulation, block_size=block_size, void=void, stats=stats)

    with full_precision(features):
        local = prepare_contrastive_inputs(features, old_features, old_logits, labels, void=void)
        if stats is not None:
            stats.update(contrastive_input_stats(local))
        dtype = local.anchors.dtype
        if local.contrast_labels.numel() and int(local.contrast_labels.max()) >= _MAX_PACKED_LABEL:
            raise ValueError(f"labels must be < {_MAX_PACKED_LABEL} to be gathered, got "
                             f"{int(local.contrast_labels.max())}")
        width, num_old = local.contrast.shape[1], local.contrast_probs.shape[1]
        packed = torch.cat([local.contrast, local.contrast_probs, local.contrast_labels[:, None].to(dtype),
                            local.contrast_is_gt[:, None].to(dtype)], dim=1)
        rows, sizes = all_gather_rows(packed)
        zero = local.anchors.flatten()[:0].sum()  # exact 0 with a gradient path to the features
        if rows.shape[0] == 0:  # no process kept a pixel (every process takes this branch)
            return zero

        contrast, probs = rows[:, :width], rows[:, width:width + num_old]
        contrast_labels = rows[:, width + num_old].round().long()
        contrast_is_gt = rows[:, width + num_old + 1] > 0.5
        offset = sum(sizes[: dist.get_rank()])
        self_index = local.self_index + offset  # own copies: this process's block of the gathered set

        # anchors with >= 1 positive: |P(i)| = #(gathered elements with label y_i) - own copy
        if local.anchors.shape[0]:
            size = int(max(local.anchor_labels.max(), contrast_labels.max())) + 1
            num_pos = torch.bincount(contrast_labels, minlength=size)[local.anchor_labels] - 1
            valid = (num_pos > 0).sum()
        else:
            valid = torch.zeros((), dtype=torch.int64, device=rows.device)

        local_sum = contrastive_distillation_flat(
            local.anchors, local.anchor_labels, local.anchor_probs, local.anchor_is_gt,
            contrast, contrast_labels, probs, contrast_is_gt, self_index,
            temperature=temperature, formulation=formulation, block_size=block_size, reduction="sum",
        )
        totals = torch.stack([local_sum.detach().to(torch.float64), valid.to(torch.float64)])
        dist.all_reduce(totals)
        total, count = float(totals[0]), float(totals[1])
        if count == 0:  # every process agrees: nothing to contrast
            return zero
        scaled = local_sum * (dist.get_world_size() / count)  # what DDP's averaging turns into dL
        value = torch.tensor(total / count, dtype=scaled.dtype, device=scaled.device)
        return value + (scaled - scaled.detach())
