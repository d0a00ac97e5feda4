"""Pascal VOC 2012 with the SBD augmented masks (and the embedded benchmark, same layout).

Layout (``root`` is the ``VOC2012`` folder)::

    root/JPEGImages/<id>.jpg
    root/SegmentationClassAug/<id>.png        SBD augmented masks (train_aug)
    root/SegmentationClass/<id>.png           the official VOC masks (val)
    root/ImageSets/Segmentation/train_aug.txt
    root/ImageSets/Segmentation/val.txt

``train`` reads ``train_aug.txt`` with ``SegmentationClassAug``; ``val`` reads ``val.txt`` with
``SegmentationClass``, or ``SegmentationClassAug`` when the former is absent. A list line is
either a bare id (``2007_000032``) or a MiB-style pair of root-relative paths
(``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``), which is used as
written. Masks are palette or grayscale PNGs whose pixel values are class ids (255 void); a mask
holding any other value (21..254 on VOC) is an error naming it, never silently void.
"""

from __future__ import annotations

from pathlib import Path
from .base import CheckRules, PathLike, SegmentationDataset, check_split, register_dataset, require_dir, require_file
from .meta import VOC_META, DatasetMeta
from .check import ERROR, WARNING, Pair, Problem, Rules, existing_pairs, missing_dir, nested_hint

__all__ = ["VOCSegmentation", "VOC_LAYOUT", "read_list"]

VOC_LAYOUT = ("root = the VOC2012 folder holding JPEGImages/, SegmentationClassAug/, SegmentationClass/ (val) "
              "and ImageSets/Segmentation/{train_aug,val}.txt")
_LISTS = {"train": "train_aug.txt", "val": "val.txt"}
_MASK_DIRS = {"train": ("SegmentationClassAug",), "val": ("SegmentationClass", "SegmentationClassAug")}


def read_list(path: Path, root: Path, mask_dir: Path) -> tuple[list[Path], list[Path]]:
    """The (image, mask) paths named by a VOC list file.

    Bare ids use ``root/JPEGImages/<id>.jpg`` and ``mask_dir/<id>.png``; two-path lines are taken
    relative to ``root`` (a leading ``/`` is dropped).
    """
    images: list[Path] = []
    masks: list[Path] = []
    with open(path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 1:
                images.append(root / "JPEGImages" / f"{parts[0]}.jpg")
                masks.append(mask_dir / f"{parts[0]}.png")
            elif len(parts) == 2:
                images.append(root / parts[0].lstrip("/"))
                masks.append(root / parts[1].lstrip("/"))
            else:
                raise ValueError(f"{path} line {number}: {line.strip()!r}: expected an image id or "
                                 f"'/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png'")
    return images, masks


# ------------------------------------------------------------------ `ucdseg data check`
def check_layout(root: Path, rules: Rules, nested: str | None = "VOC2012") -> tuple[list[Problem], dict[str, list[Pair]], dict[str, int]]:
    """``ucdseg data check``'s walk of the VOC layout: every list entry's pair, and what is missing."""
    problems: list[Problem] = []
    pairs: dict[str, list[Pair]] = {}
    entries: dict[str, int] = {}
    hint = nested_hint(root, nested) if nested else ""
    for folder, what in (("JPEGImages", "the images"), ("SegmentationClassAug", "the SBD augmented masks")):
        if not (root / folder).is_dir():
            problems.append(missing_dir(root / folder, what, rules.missing_fix + hint))
    missing_dirs = {p.path for p in problems}
    for split, list_name in _LISTS.items():
        list_file = root / "ImageSets" / "Segmentation" / list_name
        if not list_file.is_file():
            what = ("the list of the 10582 training ids (SBD + VOC train, minus VOC val)" if split == "train"
                    else "the list of the 1449 validation ids, part of VOC2012")
            problems.append(Problem(ERROR, list_file, f"list file not found: {what}",
                                    rules.missing_fix + hint, "missing-list"))
            continue
        mask_dir = next((root / d for d in _MASK_DIRS[split] if (root / d).is_dir()),
                        root / _MASK_DIRS[split][0])
        found, list_problems = _read_voc_list(list_file, root, mask_dir)
        problems += list_problems
        entries[split] = len(found)
        pairs[split] = existing_pairs(found, list_file, rules, problems, missing_dirs)
    return problems, pairs, entries


def _read_voc_list(list_file: Path, root: Path, mask_dir: Path) -> tuple[list[Pair], list[Problem]]:
    """The (image, mask) paths of a VOC list (bare ids or MiB-style path pairs) and its line problems."""
    problems: list[Problem] = []
    found: list[Pair] = []
    seen: dict[str, int] = {}
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem(ERROR, list_file, f"list file is unreadable ({exc.__class__.__name__})",
                            "re-create it: one image id per line", "missing-list")]
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 1:
            pair = (root / "JPEGImages" / f"{parts[0]}.jpg", mask_dir / f"{parts[0]}.png")
        elif len(parts) == 2:
            pair = (root / parts[0].lstrip("/"), root / parts[1].lstrip("/"))
        else:
            problems.append(Problem(ERROR, list_file, f"line {number} {line.strip()!r} is not an image id",
                                    "one id per line (2007_000032) or '/JPEGImages/<id>.jpg "
                                    "/SegmentationClassAug/<id>.png'", "bad-list-line"))
            continue
        key = " ".join(parts)
        if key in seen:
            problems.append(Problem(WARNING, list_file, f"line {number} repeats line {seen[key]} ({key!r})",
                                    "remove the duplicate line (the image would be counted twice)",
                                    "duplicate-entry"))
            continue
        seen[key] = number
        found.append(pair)
    if not found and not problems:
        problems.append(Problem(ERROR, list_file, "list file names no image", "one image id per line",
                                "empty-list"))
    return found, problems


class _VOCLayout(SegmentationDataset):
    """Reader of the VOC folder layout with a given name and meta. Saliency maps (SSUL's) are
    ``root/saliency_map/<id>.png`` (SSUL datasets/voc.py:66,96)."""

    _hint = ""
    saliency_layout = "root/saliency_map/<id>.png (grayscale, > 0 = salient; SSUL's saliency_map.zip)"

    def saliency_path(self, i: int) -> Path:
        return self.root / "saliency_map" / f"{self.image_path(i).stem}.png"

    def __init__(self, name: str, meta: DatasetMeta, root: PathLike, split: str):
        check_split(name, split)
        root = Path(root).expanduser()
        layout = VOC_LAYOUT + self._hint
        require_dir(root, name, layout)
        require_dir(root / "JPEGImages", name, layout)
        list_file = require_file(root / "ImageSets" / "Segmentation" / _LISTS[split], name, layout)
        candidates = [root / d for d in _MASK_DIRS[split]]
        mask_dir = next((d for d in candidates if d.is_dir()), candidates[0])
        images, masks = read_list(list_file, root, mask_dir)
        for folder in sorted({p.parent for p in images} | {p.parent for p in masks}):
            require_dir(folder, name, layout)
        if not images:
            raise ValueError(f"{name}: list file {list_file} names no image; expected one id per line")
        super().__init__(name, root, split, meta, images, masks)


@register_dataset("voc")
class VOCSegmentation(_VOCLayout):
    """Pascal VOC 2012 + SBD (21 classes incl. background; 255 void)."""

    check_rules = CheckRules(
        layout=check_layout, official={"train": 10582, "val": 1449},
        missing_fix="download VOCtrainval_11-May-2012.tar and SegmentationClassAug.zip and put them so that {root} "
                    "is the VOC2012 folder; see docs/datasets.md",
        values_fix="use SegmentationClassAug from the SBD conversion (grayscale or palette PNGs of class ids), not "
                   "colour renderings or converted JPEGs; see docs/datasets.md",
        mode_fix="masks must be palette (P) or grayscale (L) PNGs of class ids, e.g. SegmentationClassAug; "
                 "SegmentationClassAug_Visualization holds colour pictures, not labels")

    def __init__(self, root: PathLike, split: str):
        super().__init__("voc", VOC_META, root, split)
