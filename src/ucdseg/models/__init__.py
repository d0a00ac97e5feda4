"""Segmentation models: DeepLab-v3 with per-step classifiers on torchvision backbones.

See ``docs/architecture.md`` (``ucdseg.models``) and docs/protocol.md §2.
"""

from .backbones import (
    BACKBONES,
    OUTPUT_STRIDES,
    Backbone,
    BackboneBuilder,
    backbone_output_strides,
    build_backbone,
    register_backbone,
    load_backbone_weights,
    read_state_dict,
)
from .deeplab import (
    HEADS,
    INIT_MODES,
    ModelSpec,
    DeepLabV3Head,
    IncrementalDeepLab,
    SegOutput,
    build_model,
    load_previous_step,
)

__all__ = [
    "BACKBONES",
    "OUTPUT_STRIDES",
    "HEADS",
    "INIT_MODES",
    "ModelSpec",
    "Backbone",
    "BackboneBuilder",
    "backbone_output_strides",
    "DeepLabV3Head",
    "IncrementalDeepLab",
    "SegOutput",
    "build_backbone",
    "register_backbone",
    "build_model",
    "load_backbone_weights",
    "load_previous_step",
    "read_state_dict",
]
