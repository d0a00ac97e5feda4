"""ADE20K (the ADEChallengeData2016 scene-parsing release).

Layout (``root`` is the ``ADEChallengeData2016`` folder)::

    root/images/training/ADE_train_<n>.jpg      root/annotations/training/ADE_train_<n>.png
    root/images/validation/ADE_val_<n>.jpg      root/annotations/validation/ADE_val_<n>.png

Mask values are 0..150: 0 is "other", used as the background class in training; 1..150 are the
challenge classes. By default background is not scored at evaluation
(``meta.ignore_background_in_eval=True``, the MiB convention); ``score_background=True`` scores
it, as PLOP does. A mask value 151..254 (255 is void) is an error naming the mask.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .base import CheckRules, PathLike, SegmentationDataset, check_split, register_dataset, require_dir
from .meta import ADE_META
from .check import ERROR, Pair, Problem, Rules, match_pairs, missing_dir, nested_hint

__all__ = ["ADE20KSegmentation", "ADE_LAYOUT"]

ADE_LAYOUT = ("root = ADEChallengeData2016 holding images/{training,validation}/*.jpg and "
              "annotations/{training,validation}/*.png")
_FOLDERS = {"train": "training", "val": "validation"}


# ------------------------------------------------------------------ `ucdseg data check`
def check_layout(root: Path, rules: Rules) -> tuple[list[Problem], dict[str, list[Pair]], dict[str, int]]:
    """``ucdseg data check``'s walk of the ADE20K layout: image/annotation pairs, and what is missing."""
    problems: list[Problem] = []
    pairs: dict[str, list[Pair]] = {}
    entries: dict[str, int] = {}
    hint = nested_hint(root, "ADEChallengeData2016")
    for split, folder in _FOLDERS.items():
        image_dir, mask_dir = root / "images" / folder, root / "annotations" / folder
        bad = False
        for d, what in ((image_dir, f"{split} images"), (mask_dir, f"{split} annotations")):
            if not d.is_dir():
                problems.append(missing_dir(d, what, rules.missing_fix + hint))
                bad = True
        if bad:
            continue
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() == ".jpg"}
        masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
        entries[split] = len(images)
        if not images:
            problems.append(Problem(ERROR, image_dir, "no .jpg image in the folder", rules.missing_fix, "no-images"))
        pairs[split] = match_pairs(images, masks, image_dir, mask_dir, ".jpg", ".png", problems, rules)
    return problems, pairs, entries


@register_dataset("ade")
class ADE20KSegmentation(SegmentationDataset):
    """ADE20K, 151 classes (0 = "other"/background, 1..150)."""

    check_rules = CheckRules(
        layout=check_layout, official={"train": 20210, "val": 2000},
        missing_fix="download ADEChallengeData2016.zip (MIT Scene Parsing) and unzip it so that {root} is the "
                    "ADEChallengeData2016 folder; see docs/datasets.md",
        values_fix="use ADEChallengeData2016 (annotations 0..150); the full ADE20K release (thousands of classes) "
                   "is a different dataset; see docs/datasets.md",
        mode_fix="annotations must be the grayscale PNGs of ADEChallengeData2016/annotations")

    config_keys = ("score_background",)  # data.score_background -> the keyword option of that name

    def __init__(self, root: PathLike, split: str, score_background: bool = False):
        check_split("ade", split)
        root = Path(root).expanduser()
        require_dir(root, "ade", ADE_LAYOUT)
        image_dir = require_dir(root / "images" / _FOLDERS[split], "ade", ADE_LAYOUT)
        mask_dir = require_dir(root / "annotations" / _FOLDERS[split], "ade", ADE_LAYOUT)
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".jpg")
        available = {p.stem for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
        missing = [p for p in images if p.stem not in available]
        if missing:
            raise FileNotFoundError(f"ade: {len(missing)} image(s) have no annotation, e.g. "
                                    f"{mask_dir / (missing[0].stem + '.png')}; expected layout: {ADE_LAYOUT}")
        masks = [mask_dir / f"{p.stem}.png" for p in images]
        meta = dataclasses.replace(ADE_META, ignore_background_in_eval=not bool(score_background))
        super().__init__("ade", root, split, meta, images, masks)
