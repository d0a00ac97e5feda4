"""``ucdseg data check --dataset folder``: every fault of a folder dataset in one pass.

The reader (:class:`~ucdseg.data.folder.FolderSegmentation`) and the check walk the same layout
(:class:`~ucdseg.data.folder.FolderLayout`); the reader stops at its first structural fault, as
a run must, the check reports them all as :class:`~ucdseg.data.layout.Problem`, so that one run
of the check lists everything to fix (docs/own_dataset.md):

* the root, ``classes.yaml`` (its keys, class names, palette, options), ``images/``, ``masks/``;
* images sharing an id, a folder without images, one split list without the other, list lines
  naming no image or repeated, ids in both lists, a split left empty by ``val_fraction``;
* every image of a split without its mask; masks without an image (a warning);
* per (image, mask) pair, ``limit`` evenly spaced pairs per split (all by default): the image
  unreadable, the mask unreadable, of another mode, holding ids or colours that are not classes
  of ``classes.yaml``, or of another size than its image.

The report groups the problems by kind, at most ``max_per_kind`` shown each, with the kind's fix
(:func:`ucdseg.data.check.format_report`), and ends with the verdict line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .base import PathLike
from .check import format_report
from .folder import CLASSES_FILE, FOLDER_LAYOUT, FolderSegmentation, _first_line, read_classes
from .layout import ERROR, Problem

__all__ = ["folder_problems", "run_check_folder"]


def _mask_kind(message: str) -> str:
    if "has mode" in message:
        return "bad-mask-mode"
    if "colour" in message or "palette" in message:
        return "unknown-colour"
    if "class id" in message:
        return "unexpected-values"
    return "unreadable-mask"


def _pairs(dataset: FolderSegmentation, limit: Optional[int], problems: list[Problem]) -> int:
    """Read ``limit`` evenly spaced pairs (all when None); returns how many were read."""
    n = len(dataset)
    picks = range(n) if limit is None or limit >= n else np.unique(np.linspace(0, n - 1, limit).round().astype(int))
    for i in map(int, picks):
        image_path, mask_path = dataset.image_path(i), dataset.mask_path(i)
        size = None
        try:
            with Image.open(image_path) as im:
                size = im.size
                im.load()
        except Exception as exc:  # PIL raises many types for broken files
            problems.append(Problem(ERROR, image_path, f"image is unreadable ({type(exc).__name__}: "
                                    f"{_first_line(exc)})", "re-export or remove the image", "unreadable-image"))
        try:
            mask = dataset.load_mask(i)
        except Exception as exc:  # the reader's messages name the mask and what is wrong
            text = _first_line(exc)
            problems.append(Problem(ERROR, mask_path, text.replace(f"mask {mask_path} ", "").replace(str(mask_path), "")
                                    .strip(" :"), "fix the mask, or name its classes in classes.yaml",
                                    _mask_kind(text)))
            continue
        if size is not None and (mask.shape[1], mask.shape[0]) != size:
            problems.append(Problem(ERROR, mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                    f"{image_path.name} is {size[0]}x{size[1]}", "the mask must have its image's size",
                                    "size-mismatch"))
    return len(picks)


def _check(root: PathLike, limit: Optional[int] = None) -> tuple[list[Problem], list[str]]:
    """The problems, and the header lines (classes, split sizes, pairs read)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        return [Problem(ERROR, root, f"folder dataset root {what}", f"expected layout: {FOLDER_LAYOUT}",
                        "missing-root")], [f"folder at {root}"]
    problems: list[Problem] = []
    meta = None
    try:
        meta = read_classes(root)
    except (ValueError, FileNotFoundError) as exc:
        text = _first_line(exc).replace(f"{root / CLASSES_FILE}: ", "")
        problems.append(Problem(ERROR, root / CLASSES_FILE, text, "classes: [background, ...] (docs/own_dataset.md)",
                                "classes-yaml"))
    images, masks, splits, layout_problems = FolderSegmentation.layout.walk_all(root)  # the reader's walk
    problems += layout_problems
    header = [f"folder at {root}: " + (f"{meta.num_classes} classes ({', '.join(meta.class_names)})" if meta else
                                       "classes.yaml unreadable") + ", "
              + ", ".join(f"{split} {len(ids)} images" for split, ids in splits.items())]
    if meta is not None:
        for split, ids in splits.items():
            if ids:
                dataset = FolderSegmentation.of_pairs(root, split, [(images[i], masks[i]) for i in ids], meta)
                read = _pairs(dataset, limit, problems)
                if limit is not None:
                    header.append(f"  {split}: {read} of {len(ids)} pairs read (--limit {limit})")
    return problems, header


def folder_problems(root: PathLike, limit: Optional[int] = None) -> list[Problem]:
    """Every problem of the folder dataset at ``root`` (empty: ready to train); see the module docstring."""
    return _check(root, limit)[0]


def run_check_folder(root: PathLike, limit: Optional[int] = None, max_per_kind: int = 10,
                     saliency: bool = False) -> int:
    """Print the report (problems grouped by kind, ``max_per_kind`` each) and the verdict; exit
    code 0 when no error was found, 1 otherwise. ``saliency``: also the optional ``saliency/`` maps."""
    problems, header = _check(root, limit)
    if saliency and not any(p.severity == ERROR for p in problems):
        from .base import build_dataset
        from .check import saliency_problems

        problems += saliency_problems(build_dataset("folder", root, "train"), limit)
    print(format_report(problems, max_per_kind=max_per_kind, header="\n".join(header)), flush=True)
    return 1 if any(p.severity == ERROR for p in problems) else 0
