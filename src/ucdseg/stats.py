"""The arithmetic of results, in one place below everything that reports them.

The engine summarises a step's per-class IoU (:func:`miou_summary`) and a run's steps
(:func:`average_over_steps`); ``ucdseg report`` pools seeds (:func:`mean_std`) and pairs runs
by seed (:func:`paired_gain`, with :func:`ci95_half_width`). Plain numbers in, plain numbers out:
no torch, no files (docs/protocol.md, metrics).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["nanmean", "miou_summary", "average_over_steps", "mean_std", "ci95_half_width", "paired_gain"]


def nanmean(values: Sequence[float]) -> float | None:
    """The mean of the values that are not NaN; None when every value is NaN (or there is none)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def miou_summary(iou: Sequence[float], num_base: int, num_seen: int, score_background: bool = True) -> dict:
    """mIoU over old / new / all seen classes, with and without the background class.

    ``iou`` is indexed by model-space class id; ``num_base`` counts the step-0 classes (background
    included) and ``num_seen`` all classes seen so far. *old* are the step-0 classes, *new* every
    class added later. ``with_background`` counts class 0 among the old classes (PLOP, SDR, RCIL
    papers); ``without_background`` leaves it out (MiB and UCD papers). When the background is not
    scored (ADE20K, Cityscapes by default) both conventions coincide. Empty groups give ``None``.
    """
    seen = list(iou[:num_seen])
    if not score_background:
        seen[0] = math.nan

    def groups(first: int) -> dict:
        return {
            "old": nanmean(seen[first:num_base]),
            "new": nanmean(seen[num_base:]),
            "all": nanmean(seen[first:]),
        }

    return {"with_background": groups(0), "without_background": groups(1)}


def average_over_steps(records: Sequence[dict]) -> dict:
    """"avg" of PLOP, SSUL and RCIL: the mean over the steps of mIoU *all* (each step's classes seen
    so far), in both conventions; steps where it is undefined are left out, ``None`` if none is."""
    out = {}
    for conv in ("with_background", "without_background"):
        values = [r["miou"][conv]["all"] for r in records if r["miou"][conv]["all"] is not None]
        out[conv] = sum(values) / len(values) if values else None
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``ddof=1``); one value has no spread (None, not 0)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def ci95_half_width(std: float | None, n: int) -> float | None:
    """Half-width of the two-sided 95 % interval of a mean of ``n`` values with sample std ``std``:
    Student's t with ``n - 1`` degrees of freedom, ``t * std / sqrt(n)``; None below two values."""
    if std is None or n < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1) * std / np.sqrt(n))


def paired_gain(ours: Sequence[float | None], theirs: Sequence[float | None]) -> dict:
    """What ``ours`` adds to ``theirs``, paired position by position (one pair per seed): the mean
    and sample std of the differences ``ours - theirs``, the half-width of their 95 % interval
    (:func:`ci95_half_width`) and ``wins``, the pairs where ours is strictly higher. A pair with an
    undefined side (None) is left out; no pair left gives None for the mean, std and interval."""
    deltas = [a - b for a, b in zip(ours, theirs, strict=True) if a is not None and b is not None]
    mean, std = mean_std(deltas) if deltas else (None, None)
    return {"mean": mean, "std": std, "ci95": ci95_half_width(std, len(deltas)), "wins": sum(d > 0 for d in deltas)}
