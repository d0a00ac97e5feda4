"""``ucdseg data check --dataset folder``: every fault of a folder dataset in one pass.

The reader (:class:`~ucdseg.data.folder.FolderSegmentation`) stops at the first structural fault,
as a run must; the check walks on and collects them all as :class:`~ucdseg.data.check.Problem`,
so that one run of the check lists everything to fix (docs/own_dataset.md):

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
from .check import ERROR, WARNING, Problem, format_report
from .folder import (CLASSES_FILE, FOLDER_LAYOUT, IMAGE_SUFFIXES, FolderSegmentation, _in_val, _val_fraction,
                     read_classes)

__all__ = ["folder_problems", "run_check_folder"]

_LIST_FIX = "one image id (or file name) per line, each image in one list"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_list(path: Path, images: dict[str, Path], problems: list[Problem]) -> list[str]:
    """The ids of a split list; each bad line is a problem (the ids that are valid are kept)."""
    ids: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(ERROR, path, f"cannot be read ({_first_line(exc)})", _LIST_FIX, "bad-list"))
        return ids
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry:
            continue
        image_id = Path(entry).stem if Path(entry).suffix.lower() in IMAGE_SUFFIXES else entry
        if image_id not in images:
            problems.append(Problem(ERROR, path, f"line {number}: no image {image_id!r} in images/",
                                    "add the image, or remove the line", "list-entry-without-image"))
        elif image_id in ids:
            problems.append(Problem(ERROR, path, f"line {number}: {image_id!r} is listed twice",
                                    "remove the repeated line", "repeated-list-entry"))
        else:
            ids.append(image_id)
    if not ids and not any(p.path == path for p in problems):
        problems.append(Problem(ERROR, path, "names no image", _LIST_FIX, "bad-list"))
    return ids


def _layout(root: Path, problems: list[Problem]) -> tuple[dict[str, Path], dict[str, Path], dict[str, list[str]]]:
    """Images, masks and split ids of ``root``, every structural fault added to ``problems``."""
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            problems.append(Problem(ERROR, folder, "folder not found", f"expected layout: {FOLDER_LAYOUT}",
                                    "missing-folder"))
    images: dict[str, Path] = {}
    if image_dir.is_dir():
        for p in sorted(image_dir.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                if p.stem in images:
                    problems.append(Problem(ERROR, p, f"shares the id {p.stem!r} with {images[p.stem].name}",
                                            "rename one of the two images (an id names one image)", "repeated-id"))
                    continue
                images[p.stem] = p
        if not images:
            problems.append(Problem(ERROR, image_dir, f"holds no image (looked for {', '.join(IMAGE_SUFFIXES)})",
                                    f"expected layout: {FOLDER_LAYOUT}", "no-images"))
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.is_file() and p.suffix.lower() == ".png"} \
        if mask_dir.is_dir() else {}
    lists = {split: root / f"{split}.txt" for split in ("train", "val")}
    present = [s for s, p in lists.items() if p.is_file()]
    splits: dict[str, list[str]] = {"train": [], "val": []}
    if len(present) == 1:
        other = "val" if present[0] == "train" else "train"
        problems.append(Problem(ERROR, lists[other], f"not found, but {lists[present[0]].name} exists",
                                "give both split lists or neither (then val_fraction of classes.yaml splits the "
                                "images)", "missing-list"))
    if present:
        for split in present:
            splits[split] = _read_list(lists[split], images, problems)
        for image_id in sorted(set(splits["train"]) & set(splits["val"])):
            problems.append(Problem(ERROR, lists["val"], f"{image_id!r} is also in train.txt",
                                    "keep each id in one of the two lists", "in-both-lists"))
    elif images:
        try:
            fraction = _val_fraction(root)
        except (ValueError, FileNotFoundError):  # reported with classes.yaml's other faults
            fraction = 0.2
        splits = {"train": [i for i in images if not _in_val(i, fraction)],
                  "val": [i for i in images if _in_val(i, fraction)]}
        for split, ids in splits.items():
            if not ids:
                problems.append(Problem(ERROR, image_dir, f"its {len(images)} images leave {split} empty with "
                                        f"val_fraction {fraction}", f"write train.txt and val.txt in {root}",
                                        "empty-split"))
    listed = set(splits["train"]) | set(splits["val"]) if present else set(images)
    if mask_dir.is_dir():
        for split, ids in splits.items():
            for image_id in ids:
                if image_id not in masks:
                    problems.append(Problem(ERROR, mask_dir / f"{image_id}.png", f"not found: image "
                                            f"{images[image_id].name} ({split}) has no mask",
                                            "add the mask, or remove the image" + (" from its list" if present else ""),
                                            "missing-mask"))
        for mask_id in sorted(set(masks) - set(images)):
            problems.append(Problem(WARNING, masks[mask_id], "has no image in images/ (not used)",
                                    "remove the mask, or add its image", "mask-without-image"))
    return images, masks, {split: [i for i in ids if i in masks and i in listed] for split, ids in splits.items()}


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
    else:
        try:
            _val_fraction(root)
        except ValueError as exc:
            problems.append(Problem(ERROR, root / CLASSES_FILE, _first_line(exc).replace(f"{root / CLASSES_FILE}: ", ""),
                                    "val_fraction: a number between 0 and 1", "classes-yaml"))
    images, _, splits = _layout(root, problems)
    header = [f"folder at {root}: " + (f"{meta.num_classes} classes ({', '.join(meta.class_names)})" if meta else
                                       "classes.yaml unreadable") + ", "
              + ", ".join(f"{split} {len(ids)} images" for split, ids in splits.items())]
    if meta is not None:
        for split, ids in splits.items():
            if ids:
                dataset = FolderSegmentation.of_pairs(root, split, meta, [(images[i], root / "masks" / f"{i}.png")
                                                                          for i in ids])
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
