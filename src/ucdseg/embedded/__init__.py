"""The embedded benchmark: Fashion-MNIST objects composed into small segmentation scenes, with
its reader and its backbone pre-training (the benchmark's stand-in for ImageNet weights).

* :func:`prepare_embedded` generates the benchmark (Pascal VOC layout) in a folder, once;
  :func:`default_root` is where runs look when ``data.root`` is not set.
* :class:`EmbeddedSegmentation` reads it (``build_dataset("embedded", root, split)``).
* :func:`pretrain_embedded_backbone` makes (once, cached) the backbone weights that
  ``model.pretrained=embedded`` (:data:`EMBEDDED_PRETRAINED`) loads.

See docs/embedded.md.
"""

from .generate import GENERATOR_VERSION, default_root, find_fashion_mnist, load_fashion_mnist, prepare_embedded
from .pretrain import EMBEDDED_PRETRAINED, embedded_backbone_path, pretrain_embedded_backbone
from .reader import EmbeddedSegmentation

__all__ = ["GENERATOR_VERSION", "EMBEDDED_PRETRAINED", "EmbeddedSegmentation", "default_root", "embedded_backbone_path",
           "find_fashion_mnist", "load_fashion_mnist", "prepare_embedded", "pretrain_embedded_backbone"]
