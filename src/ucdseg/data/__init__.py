"""Datasets: raw readers of the official layouts, joint transforms, per-step views and the
embedded Fashion-MNIST benchmark.

``build_dataset(name, root, split)`` gives a :class:`SegmentationDataset` in dataset id space;
``StepDataset(base, indices, lut, transform)`` maps its masks with a step's label table and
transforms image and mask together. The embedded benchmark is :mod:`ucdseg.embedded`.
(Per-step image lists live in ``ucdseg.data.index``.)
"""

from .base import SegmentationDataset, StepDataset, build_dataset, dataset_meta, dataset_names, open_dataset_split
from .meta import METAS, DatasetMeta, colorize
from . import ade, cityscapes, folder, voc  # noqa: F401  (register the readers)
from .transforms import eval_transforms, train_transforms

__all__ = ["SegmentationDataset", "StepDataset", "DatasetMeta", "METAS", "build_dataset", "dataset_meta", "dataset_names", "open_dataset_split",
           "colorize", "train_transforms", "eval_transforms"]
from ..embedded import reader as _embedded_reader  # noqa: E402,F401  (registers the embedded benchmark's reader)
