"""What a dataset's classes are called and how they are drawn: :class:`DatasetMeta`, the type each
dataset class declares its ``meta`` with (beside its reader: ``VOCSegmentation.meta``, ...).

A dataset's classes live in *dataset space*: index ``k`` of ``class_names`` / ``palette`` is the
class whose id is ``k`` in the dataset's masks; ``255`` is void. Index 0 is always background
(VOC "background", ADE20K "other", Cityscapes "void", embedded "background").

:func:`colorize` turns a class-id mask into an RGB picture with a palette; :func:`default_palette`
is the VOC colour map extended to any number of classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["DatasetMeta", "VOID", "VOID_COLOR", "colorize", "default_palette"]

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
