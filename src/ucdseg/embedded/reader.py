"""The reader of the embedded benchmark: the Pascal VOC layout that :mod:`.generate` writes."""

from __future__ import annotations

import functools

from ..data.base import CheckRules, PathLike, register_dataset
from ..data.meta import EMBEDDED_META
from ..data.voc import _VOCLayout, check_layout


@register_dataset("embedded")
class EmbeddedSegmentation(_VOCLayout):
    """The embedded Fashion-MNIST benchmark written by :func:`ucdseg.embedded.prepare_embedded`."""

    check_rules = CheckRules(
        layout=functools.partial(check_layout, nested=None),
        missing_fix="delete {root} and regenerate it with `ucdseg prepare-embedded --root {root}`",
        values_fix="delete {root} and regenerate it with `ucdseg prepare-embedded --root {root}`",
        mode_fix="delete {root} and regenerate it with `ucdseg prepare-embedded --root {root}`")

    _hint = " (create it with ucdseg.embedded.prepare_embedded(root) or `ucdseg prepare-embedded --root DIR`)"

    def __init__(self, root: PathLike, split: str):
        super().__init__("embedded", EMBEDDED_META, root, split)

    @staticmethod
    def default_root():
        from .generate import default_root

        return default_root()

    @staticmethod
    def prepare(root, data, progress: bool = True) -> None:
        """Generate the benchmark of ``data.embedded_*`` in ``root`` unless it is there. An explicit
        ``data.root`` that does not exist is an error (a typo must not generate a benchmark)."""
        from pathlib import Path

        from .generate import prepare_embedded

        if data.root is not None and not Path(root).expanduser().exists():
            raise FileNotFoundError(f"data.root={root} does not exist; create the embedded benchmark there with "
                                    f"`ucdseg prepare-embedded --root {root}`, or leave data.root unset to use "
                                    f"its default location")

        from .saliency import ensure_saliency

        prepare_embedded(root, num_train=data.embedded_train, num_val=data.embedded_val,
                         image_size=data.embedded_size, progress=progress)
        ensure_saliency(root)  # derived from the masks (SSUL's unknown class): no scene changes
