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

from .base import CheckRules, SegmentationDataset
from .layout import ListedPairs
from .meta import DatasetMeta

__all__ = ["VOCSegmentation"]


class VOCSegmentation(SegmentationDataset):
    """Pascal VOC 2012 + SBD (21 classes incl. background; 255 void). Saliency maps (SSUL's) are
    ``root/saliency_map/<id>.png`` (SSUL datasets/voc.py:66,96)."""

    meta = DatasetMeta(
        "voc",
        class_names=(
            "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
            "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
        ),
        # the standard Pascal VOC colour map (the colours of the palette PNGs in SegmentationClass/)
        palette=(
            (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
            (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
            (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128),
        ),
    )
    layout = ListedPairs(
        lists={"train": "ImageSets/Segmentation/train_aug.txt", "val": "ImageSets/Segmentation/val.txt"},
        masks={"train": ("SegmentationClassAug",), "val": ("SegmentationClass", "SegmentationClassAug")},
        images="JPEGImages", image_suffix=".jpg", mask_suffix=".png", root_name="VOC2012")
    check_rules = CheckRules(
        official={"train": 10582, "val": 1449},
        missing_fix="download VOCtrainval_11-May-2012.tar and SegmentationClassAug.zip and put them so that {root} "
                    "is the VOC2012 folder; see docs/datasets.md",
        values_fix="use SegmentationClassAug from the SBD conversion (grayscale or palette PNGs of class ids), not "
                   "colour renderings or converted JPEGs; see docs/datasets.md",
        mode_fix="masks must be palette (P) or grayscale (L) PNGs of class ids, e.g. SegmentationClassAug; "
                 "SegmentationClassAug_Visualization holds colour pictures, not labels")
    saliency_layout = "root/saliency_map/<id>.png (grayscale, > 0 = salient; SSUL's saliency_map.zip)"

    def saliency_path(self, i: int) -> Path:
        return self.root / "saliency_map" / f"{self.image_path(i).stem}.png"
