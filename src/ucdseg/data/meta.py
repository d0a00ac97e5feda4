"""Class names and palettes of every dataset, declared as data.

Each dataset's classes live in *dataset space*: index ``k`` of ``class_names`` / ``palette`` is the
class whose id is ``k`` in the dataset's masks; ``255`` is void. Index 0 is always background
(VOC "background", ADE20K "other", Cityscapes "void", embedded "background").

:func:`colorize` turns a class-id mask into an RGB picture with one of these palettes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "DatasetMeta", "VOC_META", "ADE_META", "CITYSCAPES_META", "EMBEDDED_META", "METAS", "VOID",
    "VOID_COLOR", "colorize", "default_palette",
]

VOID = 255  #: the "ignore" id of every mask
VOID_COLOR = (224, 224, 192)  #: the colour VOC's palette gives to void (255)

Color = tuple[int, int, int]


@dataclass(frozen=True)
class DatasetMeta:
    """What a dataset's classes are called and how they are drawn."""

    name: str
    class_names: tuple[str, ...]
    palette: tuple[Color, ...]
    ignore_background_in_eval: bool = False

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.palette):
            raise ValueError(f"dataset meta {self.name!r}: {len(self.class_names)} class names but "
                             f"{len(self.palette)} palette colours; expected one colour per class")

    @property
    def num_classes(self) -> int:
        """Number of classes including background (index 0)."""
        return len(self.class_names)


# ----------------------------------------------------------------------------------------- VOC
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
#: The standard Pascal VOC colour map (the colours of the palette PNGs in SegmentationClass/).
VOC_PALETTE: tuple[Color, ...] = (
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
    (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
    (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128),
)

# -------------------------------------------------------------------------------------- ADE20K
#: ADEChallengeData2016 (SceneParsing) class names; id 0 is "other", used as background.
ADE_CLASSES: tuple[str, ...] = (
    "background",
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
#: The standard ADE20K colours of the 150 classes, preceded by black for "other".
ADE_PALETTE: tuple[Color, ...] = (
    (0, 0, 0),
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

# ---------------------------------------------------------------------------------- Cityscapes
#: Cityscapes class-incremental: 0 = void (every ignored label id), then the 19 train-id classes.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "background", "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
#: The standard Cityscapes colours of the 19 train-id classes, preceded by black for void.
CITYSCAPES_PALETTE: tuple[Color, ...] = (
    (0, 0, 0), (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180),
    (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230),
    (119, 11, 32),
)

# ------------------------------------------------------------------------------------ embedded
#: The embedded benchmark: background + the 10 Fashion-MNIST classes (label k -> class id k+1).
EMBEDDED_CLASSES: tuple[str, ...] = (
    "background", "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
    "bag", "ankle boot",
)
#: Black background, then ten well separated colours (matplotlib's "tab10").
EMBEDDED_PALETTE: tuple[Color, ...] = (
    (0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)

VOC_META = DatasetMeta("voc", VOC_CLASSES, VOC_PALETTE, ignore_background_in_eval=False)
ADE_META = DatasetMeta("ade", ADE_CLASSES, ADE_PALETTE, ignore_background_in_eval=True)
CITYSCAPES_META = DatasetMeta("cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, ignore_background_in_eval=True)
EMBEDDED_META = DatasetMeta("embedded", EMBEDDED_CLASSES, EMBEDDED_PALETTE, ignore_background_in_eval=False)

#: Every dataset's meta by name.
METAS: dict[str, DatasetMeta] = {m.name: m for m in (VOC_META, ADE_META, CITYSCAPES_META, EMBEDDED_META)}


def default_palette(num_classes: int) -> tuple[Color, ...]:
    """The Pascal VOC colour map extended to ``num_classes`` colours (VOC's own for the first 21).

    Class ``k``'s colour spreads the bits of ``k`` over the high bits of R, G and B (the formula
    behind VOC's palette PNGs), so any number of classes up to 255 gets distinct colours.
    """
    colors = []
    for k in range(num_classes):
        r = g = b = 0
        c = k
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colors.append((r, g, b))
    return tuple(colors)


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], void: Sequence[int] = VOID_COLOR) -> np.ndarray:
    """RGB picture (H, W, 3) uint8 of a class-id mask (H, W).

    Class ``k`` gets ``palette[k]``; void (255) gets ``void``. Any other id outside the palette
    is an error.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"colorize expects a 2-D class-id mask, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > VOID):
        raise ValueError(f"colorize: mask ids must be in 0..255, got {mask.min()}..{mask.max()}")
    mask = mask.astype(np.uint8, copy=False)
    colors = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if len(colors) > VOID:
        raise ValueError(f"colorize: a palette has at most {VOID} colours (255 is void), got {len(colors)}")
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    bad = [int(i) for i in present if len(colors) <= i < VOID]
    if bad:
        raise ValueError(f"colorize: class ids {bad} have no colour in a palette of {len(colors)} classes "
                         f"(expected ids 0..{len(colors) - 1} or 255)")
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(colors)] = colors
    lut[VOID] = np.asarray(void, dtype=np.uint8)
    return lut[mask]
