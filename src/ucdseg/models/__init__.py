"""Segmentation models: DeepLab-v3 with per-step classifiers on torchvision backbones.

See ``docs/architecture.md`` (``ucdseg.models``) and SPEC §2.
"""

from .backbones import (
    BACKBONES,
    OUTPUT_STRIDES,
    Backbone,
    build_backbone,
    load_backbone_weights,
    read_state_dict,
)
from .pretrain import EMBEDDED_PRETRAINED, pretrain_embedded_backbone
from .deeplab import (
    INIT_MODES,
    DeepLabV3Head,
    IncrementalDeepLab,
    SegOutput,
    build_model,
    load_previous_step,
)

__all__ = [
    "EMBEDDED_PRETRAINED",
    "pretrain_embedded_backbone",
    "BACKBONES",
    "OUTPUT_STRIDES",
    "INIT_MODES",
    "Backbone",
    "DeepLabV3Head",
    "IncrementalDeepLab",
    "SegOutput",
    "build_backbone",
    "build_model",
    "load_backbone_weights",
    "load_previous_step",
    "read_state_dict",
]
