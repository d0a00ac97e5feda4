"""Cityscapes, class-incremental (the 19 evaluation classes, as in UCD's release).

Layout (``root`` holds ``leftImg8bit`` and ``gtFine``)::

    root/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    root/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png

The stored label ids are mapped to the 19 standard train ids (:data:`LABEL_TO_TRAIN_ID`), then
train id ``k`` becomes class ``k + 1`` and every void/ignored label id becomes 0: void is
background in training, as UCD's release does. Since that "background" is really the void
pixels, it is not scored at evaluation by default (``meta.ignore_background_in_eval=True``);
``score_background=True`` scores it. A stored id above 33 other than 255 is not a Cityscapes
label id: an error naming the mask.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .base import CheckRules, PathLike, SegmentationDataset, check_split, register_dataset, require_dir
from .meta import CITYSCAPES_META
from .check import ERROR, Pair, Problem, Rules, match_pairs, missing_dir

__all__ = ["CityscapesSegmentation", "CITYSCAPES_LAYOUT", "LABEL_TO_TRAIN_ID", "label_id_lut"]

CITYSCAPES_LAYOUT = ("root holding leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
                     "gtFine/{train,val}/<city>/*_gtFine_labelIds.png")
IGNORE = 255

#: The standard Cityscapes table (cityscapesScripts ``labels.py``): label id -> train id,
#: ``IGNORE`` for the classes not evaluated. Label ids not listed (e.g. license plate, -1) are void.
LABEL_TO_TRAIN_ID: dict[int, int] = {
    0: IGNORE,   # unlabeled
    1: IGNORE,   # ego vehicle
    2: IGNORE,   # rectification border
    3: IGNORE,   # out of roi
    4: IGNORE,   # static
    5: IGNORE,   # dynamic
    6: IGNORE,   # ground
    7: 0,        # road
    8: 1,        # sidewalk
    9: IGNORE,   # parking
    10: IGNORE,  # rail track
    11: 2,       # building
    12: 3,       # wall
    13: 4,       # fence
    14: IGNORE,  # guard rail
    15: IGNORE,  # bridge
    16: IGNORE,  # tunnel
    17: 5,       # pole
    18: IGNORE,  # polegroup
    19: 6,       # traffic light
    20: 7,       # traffic sign
    21: 8,       # vegetation
    22: 9,       # terrain
    23: 10,      # sky
    24: 11,      # person
    25: 12,      # rider
    26: 13,      # car
    27: 14,      # truck
    28: 15,      # bus
    29: IGNORE,  # caravan
    30: IGNORE,  # trailer
    31: 16,      # train
    32: 17,      # motorcycle
    33: 18,      # bicycle
}


def label_id_lut() -> np.ndarray:
    """(256,) uint8: stored label id -> class id (train id + 1; void and ignored ids -> 0)."""
    lut = np.zeros(256, dtype=np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        if train_id != IGNORE:
            lut[label_id] = train_id + 1
    return lut


_LUT = label_id_lut()


# ------------------------------------------------------------------ `ucdseg data check`
IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"


def check_layout(root: Path, rules: Rules) -> tuple[list[Problem], dict[str, list[Pair]], dict[str, int]]:
    """``ucdseg data check``'s walk of the Cityscapes layout: image/label-id pairs, and what is missing."""
    problems: list[Problem] = []
    pairs: dict[str, list[Pair]] = {}
    entries: dict[str, int] = {}
    for split in ("train", "val"):
        image_dir, mask_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        bad = False
        for d, what in ((image_dir, f"{split} images, leftImg8bit_trainvaltest.zip"),
                        (mask_dir, f"{split} masks, gtFine_trainvaltest.zip")):
            if not d.is_dir():
                problems.append(missing_dir(d, what, rules.missing_fix))
                bad = True
        if bad:
            continue
        images = {str(p.relative_to(image_dir))[: -len(IMAGE_SUFFIX)]: p
                  for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}")}
        masks = {str(p.relative_to(mask_dir))[: -len(MASK_SUFFIX)]: p
                 for p in mask_dir.glob(f"*/*{MASK_SUFFIX}")}
        entries[split] = len(images)
        if not images:
            problems.append(Problem(ERROR, image_dir, f"no <city>/*{IMAGE_SUFFIX} image in the folder",
                                    rules.missing_fix, "no-images"))
        elif not masks:
            problems.append(Problem(ERROR, mask_dir, f"no <city>/*{MASK_SUFFIX} mask in the folder",
                                    rules.missing_fix, "no-masks"))
            continue
        pairs[split] = match_pairs(images, masks, image_dir, mask_dir, IMAGE_SUFFIX, MASK_SUFFIX, problems, rules)
    return problems, pairs, entries


@register_dataset("cityscapes")
class CityscapesSegmentation(SegmentationDataset):
    """Cityscapes, 20 classes (0 = void as background, 1..19 = the train-id classes)."""

    check_rules = CheckRules(
        layout=check_layout, official={"train": 2975, "val": 500},
        allowed=frozenset(LABEL_TO_TRAIN_ID), values_text="the official Cityscapes label ids 0..33",
        missing_fix="download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from cityscapes-dataset.com "
                    "and unzip both into {root}; see docs/datasets.md",
        values_fix="use the gtFine *_gtFine_labelIds.png files (label ids 0..33); *_labelTrainIds.png (0..18 and "
                   "255) and *_color.png are not read by ucdseg",
        mode_fix="use *_gtFine_labelIds.png (grayscale label ids), not *_gtFine_color.png")

    config_keys = ("score_background",)  # data.score_background -> the keyword option of that name

    def __init__(self, root: PathLike, split: str, score_background: bool = False):
        check_split("cityscapes", split)
        root = Path(root).expanduser()
        require_dir(root, "cityscapes", CITYSCAPES_LAYOUT)
        image_dir = require_dir(root / "leftImg8bit" / split, "cityscapes", CITYSCAPES_LAYOUT)
        mask_dir = require_dir(root / "gtFine" / split, "cityscapes", CITYSCAPES_LAYOUT)
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        masks = [mask_dir / p.parent.name / p.name.replace(IMAGE_SUFFIX, MASK_SUFFIX)
                 for p in images]
        missing = [m for m in masks if not m.is_file()]
        if missing:
            raise FileNotFoundError(f"cityscapes: {len(missing)} image(s) have no gtFine labelIds mask, e.g. "
                                    f"{missing[0]}; expected layout: {CITYSCAPES_LAYOUT}")
        meta = dataclasses.replace(CITYSCAPES_META, ignore_background_in_eval=not bool(score_background))
        super().__init__("cityscapes", root, split, meta, images, masks)

    @property
    def stored_ids(self) -> int:
        """The masks hold the 34 label ids 0..33 of :data:`LABEL_TO_TRAIN_ID` (and 255)."""
        return max(LABEL_TO_TRAIN_ID) + 1

    def convert_mask(self, raw: np.ndarray) -> np.ndarray:
        """Cityscapes label ids -> class ids (train id + 1, void -> 0)."""
        return _LUT[raw]
