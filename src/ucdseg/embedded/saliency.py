"""Saliency maps of the embedded benchmark (SSUL's unknown class, docs/embedded.md "Saliency").

SSUL marks as *unknown* the background pixels a saliency detector finds salient (the objects of
classes not labelled at the step). The embedded benchmark has no detector; its maps are derived
from the scenes' masks: the silhouette of every object (every pixel that is not background, the
void ring included), made imperfect as a detector's are by growing it ``DILATION`` pixels into
the background (a detector's maps bleed over object borders). They are a pure function of the
masks, so an existing benchmark gains them without any scene changing; ``SALIENCY_VERSION`` names
the recipe (the file ``saliency_map/VERSION``): a changed recipe writes the maps again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SALIENCY_VERSION", "DILATION", "saliency_from_mask", "ensure_saliency"]

SALIENCY_VERSION = 1
DILATION = 1  # pixels the silhouettes grow into the background
_FOLDER = "saliency_map"


def saliency_from_mask(mask: np.ndarray, dilation: int = DILATION) -> np.ndarray:
    """uint8 (H, W): 255 on the objects of ``mask`` (every id but 0) grown by ``dilation`` pixels
    (a (2d+1) x (2d+1) square), 0 elsewhere."""
    salient = np.asarray(mask) != 0
    if dilation > 0:
        padded = np.pad(salient, dilation)
        h, w = salient.shape
        grown = np.zeros_like(salient)
        for dy in range(2 * dilation + 1):
            for dx in range(2 * dilation + 1):
                grown |= padded[dy: dy + h, dx: dx + w]
        salient = grown
    return np.where(salient, 255, 0).astype(np.uint8)


def ensure_saliency(root: str | os.PathLike) -> Path:
    """Write ``root/saliency_map/<id>.png`` for every training scene of the benchmark in ``root``
    unless the maps of this recipe are there (written in a temporary folder, then moved in)."""
    root = Path(root)
    folder = root / _FOLDER
    version = folder / "VERSION"
    if version.is_file() and version.read_text(encoding="utf-8").strip() == str(SALIENCY_VERSION):
        return folder
    ids = (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text(encoding="utf-8").split()
    tmp = Path(tempfile.mkdtemp(prefix=f".{_FOLDER}.tmp-", dir=root))
    try:
        for name in ids:
            with Image.open(root / "SegmentationClassAug" / f"{name}.png") as im:
                mask = np.array(im, dtype=np.uint8)
            Image.fromarray(saliency_from_mask(mask)).save(tmp / f"{name}.png")
        (tmp / "VERSION").write_text(f"{SALIENCY_VERSION}\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{_FOLDER}.old-", dir=root))
            os.replace(folder, old / _FOLDER)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
