"""SSUL's class-balanced exemplar memory sampler (SSUL-M; DKD-M uses a copy of it).

Before training step ``t`` the releases choose ``size`` images among the *candidates*: the images
of step ``t-1`` (labelled with that step's ground truth, plus the old model's pseudo-labels when
``t > 1``), preceded by step ``t-1``'s own memory when ``t > 1``. The rule (clovaai/SSUL
utils/memory.py:102-124; cvlab-yonsei/DKD utils/memory.py:126-147, the same loop):

1. shuffle the candidates, then shuffle the old foreground classes;
2. round robin over the classes in that order: each class takes the **first unused** shuffled
   candidate whose labels contain it (a class with none left is skipped); repeat until ``size``
   images are taken.

:func:`round_robin_memory` is step 2 with both orders given (what the parity tests drive with the
release's own shuffles); :func:`class_balanced_memory` draws the two orders from a seeded numpy
``Generator`` (the releases use numpy's global RNG, so their draws are not reproduced, only the
rule). :func:`pseudo_label_presence` gives each candidate's classes from a batch of labels and the
old model's logits, with SSUL's (0.7) or DKD's (0.9) pseudo-label rule.

The releases loop forever when fewer candidates than ``size`` hold an old class; here that is a
``ValueError`` naming both counts. Details and differences between the two releases are in
docs/methods.md (SSUL-M, DKD-M).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "round_robin_memory",
    "class_balanced_memory",
    "pseudo_label_presence",
    "present_classes",
    "PSEUDO_THRESHOLDS",
]

#: pseudo-label threshold of each release's sampler (SSUL utils/memory.py:76, DKD utils/memory.py:105)
PSEUDO_THRESHOLDS = {"ssul": 0.7, "dkd": 0.9}
VOID = 255


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"memory size must be a non-negative int, got {size!r}")


def round_robin_memory(
    classes_per_candidate: Sequence[Iterable[int]],
    class_order: Sequence[int],
    candidate_order: Sequence[int],
    size: int,
) -> list[int]:
    """The releases' class-balanced round robin with given orders; returns candidate positions.

    Args:
        classes_per_candidate: the classes present in each candidate's labels (extra ids such as
            background or void are harmless: only the ids of ``class_order`` are looked up).
        class_order: the old foreground classes in the (shuffled) order of the round robin.
        candidate_order: a permutation of ``range(len(classes_per_candidate))``; the shuffled list
            is ``[candidates[i] for i in candidate_order]``, and "first unused candidate" means first
            in that list.
        size: how many candidates to take.

    Returns the positions (into ``classes_per_candidate``) of the ``size`` chosen candidates, in
    the releases' saved order: grouped by the class that took them, classes in ascending id order,
    each group in pick order (SSUL utils/memory.py:129; DKD 164). That order is also the order
    in which the releases put this memory first among the next step's candidates.
    """
    _check_size(size)
    n = len(classes_per_candidate)
    order = [int(i) for i in candidate_order]
    if sorted(order) != list(range(n)):
        raise ValueError(f"candidate_order must be a permutation of range({n}), got {len(order)} entries")
    classes = [int(c) for c in class_order]
    if len(set(classes)) != len(classes):
        raise ValueError(f"class_order must not repeat a class, got {classes}")
    wanted = set(classes)
    # for each class, the shuffled ranks of the candidates holding it, ascending
    holders: dict[int, list[int]] = {c: [] for c in classes}
    eligible = 0
    for rank, pos in enumerate(order):
        present = wanted.intersection(int(c) for c in classes_per_candidate[pos])
        eligible += bool(present)
        for c in present:
            holders[c].append(rank)
    if size > eligible:
        raise ValueError(
            f"memory size {size} is larger than the {eligible} candidate images holding an old foreground "
            f"class ({n} candidates in all)"
        )
    used = [False] * n
    cursor = {c: 0 for c in classes}
    picked: dict[int, list[int]] = {c: [] for c in classes}
    taken = 0
    while taken < size:
        for c in classes:
            ranks, k = holders[c], cursor[c]
            while k < len(ranks) and used[ranks[k]]:
                k += 1
            cursor[c] = k
            if k < len(ranks):
                used[ranks[k]] = True
                picked[c].append(order[ranks[k]])
                taken += 1
            if taken >= size:
                break
    return [pos for c in sorted(classes) for pos in picked[c]]


def class_balanced_memory(
    candidates_classes: Sequence[Iterable[int]],
    old_fg_classes: Sequence[int],
    size: int,
    seed: int,
) -> list[int]:
    """Class-balanced memory of ``size`` candidates (SSUL-M / DKD-M), seeded; returns positions.

    ``rng = numpy.random.default_rng(seed)`` first permutes the candidates, then the old foreground
    classes (sorted first, so the result does not depend on their given order), in the releases'
    order of shuffles; :func:`round_robin_memory` does the rest (see it for the returned order).
    A ``size`` larger than the candidates that hold an old class raises ``ValueError``.
    """
    _check_size(size)
    rng = np.random.default_rng(seed)
    candidate_order = rng.permutation(len(candidates_classes)).tolist()
    classes = sorted({int(c) for c in old_fg_classes})
    class_order = [classes[i] for i in rng.permutation(len(classes))]
    return round_robin_memory(candidates_classes, class_order, candidate_order, size)


def present_classes(labels: Union[torch.Tensor, np.ndarray]) -> list[list[int]]:
    """The foreground classes of each image of a batch ``(B, *spatial)`` of model-space labels.

    Sorted ids, background (0) and void (255) left out.
    """
    y = torch.from_numpy(np.asarray(labels)) if isinstance(labels, np.ndarray) else labels
    if not torch.is_tensor(y) or y.is_floating_point() or y.dim() < 1:
        raise ValueError(f"labels must be an integer batch (B, ...), got {getattr(y, 'dtype', type(y).__name__)}")
    return [[c for c in torch.unique(img).tolist() if c not in (0, VOID)] for img in y]


def pseudo_label_presence(
    labels: torch.Tensor,
    old_logits: Optional[torch.Tensor],
    rule: str,
    threshold: Optional[float] = None,
) -> list[list[int]]:
    """Each image's foreground classes for the sampler, with the old model's pseudo-labels.

    ``labels`` are model-space step labels ``(B, *spatial)`` (0 background, 255 void, *not*
    SSUL-shifted). ``old_logits=None`` (step ``t = 1``) gives the labels' own classes. Otherwise:

    * ``rule="ssul"``: ``old_logits`` are SSUL's ``[unknown, bg, old classes]`` channels; background
      pixels take the argmax of ``sigmoid`` when it is a class with score ``>= threshold`` (0.7):
      :func:`ucdseg.losses.ssul.ssul_pseudo_labels` on the shifted labels (SSUL utils/memory.py:68-96;
      unknown and background are the same here, both dropped).
    * ``rule="dkd"``: ``old_logits`` are DKD's foreground channels; background pixels whose maximum
      foreground sigmoid is ``>= threshold`` (0.9) take its class (DKD utils/memory.py:99-116).
    """
    if rule not in PSEUDO_THRESHOLDS:
        raise ValueError(f"rule must be one of {sorted(PSEUDO_THRESHOLDS)}, got {rule!r}")
    if old_logits is None:
        return present_classes(labels)
    thr = PSEUDO_THRESHOLDS[rule] if threshold is None else threshold
    if rule == "dkd":
        from ..losses.dkd import dkd_pseudo_labels

        return present_classes(dkd_pseudo_labels(labels, old_logits, thr))
    from ..losses.ssul import ssul_pseudo_labels

    shifted = torch.where(labels == VOID, labels, labels + 1).long()
    pseudo = ssul_pseudo_labels(shifted, old_logits, thr)
    return present_classes(torch.where(pseudo == VOID, pseudo, (pseudo - 1).clamp(min=0)))
