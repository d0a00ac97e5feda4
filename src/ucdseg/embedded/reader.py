"""The reader of the embedded benchmark: the Pascal VOC layout that :mod:`.generate` writes.

It is the registry's built-in dataset ``embedded`` (:data:`ucdseg.registry.DATASETS`), imported
the first time the name is looked up: the data layer does not import this package.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data.base import CheckRules
from ..data.meta import DatasetMeta
from ..data.voc import VOCSegmentation

__all__ = ["EmbeddedSegmentation"]

_REGENERATE = ("delete {root} and regenerate it with `ucdseg prepare-embedded --root {root}` (or "
               "ucdseg.embedded.prepare_embedded(root))")


class EmbeddedSegmentation(VOCSegmentation):
    """The embedded Fashion-MNIST benchmark written by :func:`ucdseg.embedded.prepare_embedded`
    (the VOC layout and saliency maps, its own classes)."""

    meta = DatasetMeta(
        "embedded",
        # background + the 10 Fashion-MNIST classes (label k -> class id k+1)
        class_names=(
            "background", "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
            "bag", "ankle boot",
        ),
        # black background, then ten well separated colours (matplotlib's "tab10")
        palette=(
            (0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
        ),
    )
    layout = dataclasses.replace(VOCSegmentation.layout, root_name=None)
    check_rules = CheckRules(missing_fix=_REGENERATE, values_fix=_REGENERATE, mode_fix=_REGENERATE)

    @classmethod
    def default_root(cls) -> Path:
        from .generate import default_root

        return default_root()

    @classmethod
    def prepare(cls, root, data, progress: bool = True) -> None:
        """Generate the benchmark of ``data.embedded_*`` in ``root`` unless it is there. An explicit
        ``data.root`` that does not exist is an error (a typo must not generate a benchmark)."""
        from .generate import prepare_embedded
        from .saliency import ensure_saliency

        if data.root is not None and not Path(root).expanduser().exists():
            raise FileNotFoundError(f"data.root={root} does not exist; create the embedded benchmark there with "
                                    f"`ucdseg prepare-embedded --root {root}`, or leave data.root unset to use "
                                    f"its default location")
        prepare_embedded(root, num_train=data.embedded_train, num_val=data.embedded_val,
                         image_size=data.embedded_size, progress=progress)
        ensure_saliency(root)  # derived from the masks (SSUL's unknown class): no scene changes
