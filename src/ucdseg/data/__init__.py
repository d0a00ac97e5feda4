"""Datasets: raw readers of the official layouts, joint transforms and per-step views.

A dataset is one class (``SegmentationDataset`` subclass: its class names, palette and folder
layout as class data, docs/extending.md), registered in :data:`DATASETS`; the built-in ones
(voc, ade, cityscapes, folder, and the embedded benchmark's reader in :mod:`ucdseg.embedded`)
are imported when their name is first looked up.

``build_dataset(name, root, split)`` gives a :class:`SegmentationDataset` in dataset id space;
``StepDataset(base, indices, lut, transform)`` maps its masks with a step's label table and
transforms image and mask together (``train_transforms`` / ``eval_transforms``, in
:mod:`.transforms`, which imports torchvision when first used). Per-step image lists live in
``ucdseg.data.index``.
"""

from .base import (DATASETS, SegmentationDataset, StepDataset, build_dataset, dataset_class, dataset_meta,
                   dataset_names, open_dataset_split, register_dataset)
from .layout import Layout, ListedPairs, PairedFolders
from .meta import DatasetMeta, colorize

__all__ = ["SegmentationDataset", "StepDataset", "DatasetMeta", "DATASETS", "Layout", "ListedPairs", "PairedFolders",
           "build_dataset", "dataset_class", "dataset_meta", "dataset_names", "open_dataset_split", "register_dataset",
           "colorize", "train_transforms", "eval_transforms"]


def __getattr__(name: str):
    """``train_transforms`` and ``eval_transforms`` (torchvision), imported on first use."""
    if name in ("train_transforms", "eval_transforms"):
        from . import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
