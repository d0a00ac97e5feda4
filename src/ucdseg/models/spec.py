"""What a method asks of the model (torch-free: method declarations import it, not the network).

:class:`ModelSpec` names a method's classifier layout (:data:`HEADS`) and its backbone's
BatchNorm momentum; :func:`ucdseg.models.build_model` builds the network it describes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HEADS", "ModelSpec"]

#: Classifier layouts (``IncrementalDeepLab(heads=...)``); channel ``k`` of the logits is
#:
#: * ``linear``: model-space class ``k`` (one 1x1 conv per step; background is channel 0);
#: * ``ssul``: channel 0 is *unknown*, channel ``k + 1`` model-space class ``k`` (SSUL,
#:   network/_deeplab.py:84-111: heads ``[1, 1, c0 - 1, c1, ...]``, each conv3x3 (no bias) + BN +
#:   ReLU + conv1x1, kaiming-normal convs);
#: * ``dkd``: channel 0 is DKD's auxiliary classifier, computed on the detached features, channel
#:   ``k >= 1`` foreground class ``k``; there is no background channel (DKD models/model.py:41,67-75).
HEADS = ("linear", "ssul", "dkd")


@dataclass(frozen=True)
class ModelSpec:
    """What a method asks of the model: its classifier layout and the backbone's BN momentum."""

    heads: str = "linear"  # one of HEADS
    backbone_bn_momentum: float | None = None  # None: PyTorch's 0.1 (SSUL and DKD set 0.01)

    def __post_init__(self) -> None:
        if self.heads not in HEADS:
            raise ValueError(f"unknown classifier layout {self.heads!r}; expected one of {', '.join(HEADS)}")
