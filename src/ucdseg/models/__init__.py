"""Segmentation models: DeepLab-v3 with per-step classifiers on torchvision backbones.

See ``docs/architecture.md`` (``ucdseg.models``) and docs/protocol.md §2.

:class:`ModelSpec` and :data:`HEADS` (what a method declares) are imported with the package; the
network's names (:mod:`.backbones`, :mod:`.deeplab`: torch and torchvision) when first used, so
that method declarations, and ``ucdseg methods``, load without torch.
"""

from __future__ import annotations

import importlib

from .spec import HEADS, ModelSpec

#: The names of the network, by the module that defines them (imported on first use).
_LAZY = {
    **dict.fromkeys(("BACKBONES", "OUTPUT_STRIDES", "Backbone", "BackboneBuilder", "backbone_output_strides",
                     "build_backbone", "register_backbone", "load_backbone_weights", "read_state_dict"), "backbones"),
    **dict.fromkeys(("INIT_MODES", "DeepLabV3Head", "IncrementalDeepLab", "SegOutput", "build_model", "batchnorms",
                     "load_previous_step"), "deeplab"),
}

__all__ = ["HEADS", "ModelSpec", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in ("backbones", "deeplab"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
