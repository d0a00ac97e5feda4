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

import numpy as np

from .base import CheckRules, PathLike, SegmentationDataset
from .layout import PairedFolders
from .meta import DatasetMeta

__all__ = ["CityscapesSegmentation", "LABEL_TO_TRAIN_ID", "label_id_lut"]

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


class CityscapesSegmentation(SegmentationDataset):
    """Cityscapes, 20 classes (0 = void as background, 1..19 = the train-id classes)."""

    meta = DatasetMeta(
        "cityscapes",
        # 0 = void (every ignored label id), then the 19 train-id classes
        class_names=(
            "background", "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
            "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
            "motorcycle", "bicycle",
        ),
        # the standard Cityscapes colours of the 19 train-id classes, preceded by black for void
        palette=(
            (0, 0, 0), (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
            (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180),
            (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230),
            (119, 11, 32),
        ),
        ignore_background_in_eval=True,
    )
    layout = PairedFolders(images="leftImg8bit/{split}", masks="gtFine/{split}", image_suffix="_leftImg8bit.png",
                           mask_suffix="_gtFine_labelIds.png", depth=1)
    check_rules = CheckRules(
        official={"train": 2975, "val": 500},
        allowed=frozenset(LABEL_TO_TRAIN_ID), values_text="the official Cityscapes label ids 0..33",
        missing_fix="download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from cityscapes-dataset.com "
                    "and unzip both into {root}; see docs/datasets.md",
        values_fix="use the gtFine *_gtFine_labelIds.png files (label ids 0..33); *_labelTrainIds.png (0..18 and "
                   "255) and *_color.png are not read by ucdseg",
        mode_fix="use *_gtFine_labelIds.png (grayscale label ids), not *_gtFine_color.png")
    config_keys = ("score_background",)  # data.score_background -> the keyword option of that name

    def __init__(self, root: PathLike, split: str, score_background: bool = False):
        super().__init__(root, split)
        self.meta = dataclasses.replace(self.meta, ignore_background_in_eval=not bool(score_background))

    @property
    def stored_ids(self) -> int:
        """The masks hold the 34 label ids 0..33 of :data:`LABEL_TO_TRAIN_ID` (and 255)."""
        return max(LABEL_TO_TRAIN_ID) + 1

    def convert_mask(self, raw: np.ndarray) -> np.ndarray:
        """Cityscapes label ids -> class ids (train id + 1, void -> 0)."""
        return _LUT[raw]
