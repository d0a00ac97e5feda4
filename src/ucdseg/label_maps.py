"""Label maps and training-image selection of a task step (docs/protocol.md §1). Pure numpy functions.

Look-up tables (LUTs) are ``(256,)`` uint8 arrays indexed by a dataset id (a mask value); they
give the label in *model space* (see :mod:`ucdseg.tasks`).

* Training labels at step ``t`` (:func:`train_lut`): step-``t`` classes -> their model id; every
  other class (background, old and future classes) -> 0 (the "background shift"); void 255 stays
  255.
* Evaluation labels after step ``t`` (:func:`eval_lut`): seen classes -> model id, unseen classes
  -> 255 (``unseen="ignore"``, MiB) or the background's label (``unseen="background"``, PLOP and
  UCD), background -> 0 (255 with ``ignore_background``).
* Evaluation images after step ``t`` (:func:`eval_images`): every image (``"all"``), or not those
  whose foreground classes are all unseen (``"seen"``).
* Mask values that are not classes of the dataset (``num_classes..254``) are treated as void
  everywhere: 255 in both LUTs, and ignored by :func:`select_images`.

Settings (:func:`select_images`): ``overlapped``, ``disjoint`` and ``partitioned`` (Kwak et al.
2024); see the function's docstring.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .tasks import Task

__all__ = ["SETTINGS", "EVAL_IMAGES", "EVAL_UNSEEN", "VOID", "train_lut", "eval_lut", "eval_images", "apply_lut",
           "select_images", "partition_steps"]

SETTINGS = ("overlapped", "disjoint", "partitioned")
EVAL_IMAGES = ("all", "seen")
EVAL_UNSEEN = ("ignore", "background")
VOID = 255


def _check_step(task: Task, step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= int(step) < task.num_steps:
        raise ValueError(f"step {step!r} out of range for task {task.name!r}: expected 0..{task.num_steps - 1}")
    return int(step)


def _check_setting(setting: str) -> str:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}: expected one of {', '.join(SETTINGS)}")
    return setting


def train_lut(task: Task, step: int) -> np.ndarray:
    """Dataset id -> step-``step`` training label (model space), as a ``(256,)`` uint8 LUT."""
    step = _check_step(task, step)
    model = task.model_lut
    lut = np.full(256, VOID, dtype=np.uint8)
    lut[: task.num_classes] = 0
    for cls in task.new(step):
        lut[cls] = model[cls]
    return lut


def eval_lut(task: Task, step: int, ignore_background: bool = False, unseen: str = "ignore") -> np.ndarray:
    """Dataset id -> evaluation label after step ``step`` (model space), as a ``(256,)`` uint8 LUT.

    ``unseen``: ``"ignore"`` makes the classes not seen yet void (MiB); ``"background"`` gives them
    the background's label, 0, or 255 when the background itself is ignored (PLOP, UCD).
    """
    step = _check_step(task, step)
    if unseen not in EVAL_UNSEEN:
        raise ValueError(f"unknown unseen-class convention {unseen!r}: expected one of {', '.join(EVAL_UNSEEN)}")
    model = task.model_lut
    background = VOID if ignore_background else 0
    lut = np.full(256, VOID, dtype=np.uint8)
    if unseen == "background":
        lut[: task.num_classes] = background
    for cls in task.seen(step):
        lut[cls] = model[cls]
    lut[0] = background
    return lut


def eval_images(presence: Sequence[Iterable[int]], task: Task, step: int, images: str = "all") -> list[int]:
    """Indices (sorted) of the validation images scored after ``step``.

    ``presence[i]`` lists the dataset class ids present in image ``i``'s mask. ``"all"`` keeps
    every image; ``"seen"`` drops the images that hold foreground classes but none seen so far
    (MiB, PLOP and UCD test only on images with a seen class). Images without any foreground class
    are kept, so after the last step both give every image.
    """
    step = _check_step(task, step)
    if images not in EVAL_IMAGES:
        raise ValueError(f"unknown evaluation image set {images!r}: expected one of {', '.join(EVAL_IMAGES)}")
    classes = _image_classes(presence, task.num_classes)
    if images == "all":
        return list(range(len(classes)))
    seen = set(task.seen(step))
    return [i for i, fg in enumerate(classes) if not fg or fg & seen]


def apply_lut(mask: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map every value of an integer ``mask`` (values 0..255) through ``lut``; same shape, ``lut``'s dtype."""
    mask = np.asarray(mask)
    lut = np.asarray(lut)
    if lut.shape != (256,):
        raise ValueError(f"lut must have shape (256,), got {lut.shape}")
    if mask.dtype == np.uint8:
        return lut[mask]
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must hold integer class ids, got dtype {mask.dtype}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"mask values must lie in 0..255, got range {mask.min()}..{mask.max()}")
    return lut[mask]


def _foreground_sets(task: Task) -> list[set[int]]:
    """Foreground classes of every step (background 0 removed from step 0)."""
    return [set(step) - {0} for step in task.steps]


def _image_classes(presence: Sequence[Iterable[int]], num_classes: int) -> list[set[int]]:
    """Foreground dataset classes of every image; 0, 255 and non-class ids dropped."""
    out = []
    for ids in presence:
        values = {int(v) for v in (ids.ravel().tolist() if isinstance(ids, np.ndarray) else ids)}
        out.append({v for v in values if 0 < v < num_classes})
    return out


def partition_steps(presence: Sequence[Iterable[int]], task: Task, seed: int = 0) -> np.ndarray:
    """The step each image is assigned to in the ``partitioned`` setting (-1: none).

    The candidates of an image are the steps (in increasing order) with at least one of its
    foreground classes. One uniform number ``u_i`` per image is drawn, in image order, from
    ``numpy.random.default_rng(seed).random(len(presence))``; the image goes to candidate
    ``floor(u_i * len(candidates))``. The result depends only on ``(presence, task, seed)``.
    """
    images = _image_classes(presence, task.num_classes)
    fg_steps = _foreground_sets(task)
    u = np.random.default_rng(seed).random(len(images))
    assigned = np.full(len(images), -1, dtype=np.int64)
    for i, classes in enumerate(images):
        candidates = [t for t, fg in enumerate(fg_steps) if classes & fg]
        if candidates:
            assigned[i] = candidates[min(int(u[i] * len(candidates)), len(candidates) - 1)]
    return assigned


def select_images(presence: Sequence[Iterable[int]], task: Task, step: int, setting: str,
                  seed: int = 0) -> list[int]:
    """Indices (sorted) of the training images kept at ``step`` under ``setting``.

    ``presence[i]`` lists the dataset class ids present in image ``i``'s raw mask.

    * ``overlapped``: images with at least one foreground class of ``step`` (background alone never
      qualifies; at step 0 the base classes); they may contain old and future classes.
    * ``disjoint``: as overlapped, and every class of the image is background, void, old or of
      ``step`` (no future class).
    * ``partitioned``: each image belongs to exactly one step (see :func:`partition_steps`), so the
      steps' image sets are disjoint; ``seed`` only matters here.
    """
    step = _check_step(task, step)
    _check_setting(setting)
    if setting == "partitioned":
        return [int(i) for i in np.flatnonzero(partition_steps(presence, task, seed) == step)]
    images = _image_classes(presence, task.num_classes)
    current = _foreground_sets(task)[step]
    allowed = set(task.seen(step))
    keep = []
    for i, classes in enumerate(images):
        if not classes & current:
            continue
        if setting == "disjoint" and not classes <= allowed:
            continue
        keep.append(i)
    return keep
