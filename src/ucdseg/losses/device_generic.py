"""What keeps the losses device-generic: they run on whatever device their inputs are on, meta included.

``tests/losses/test_devices.py`` runs every loss on ``meta`` tensors (shapes without values, on no real
device) and on CPU inputs with ``meta`` as torch's default device, so a tensor created without
``device=`` shows up as a device mismatch; ``ucdseg.device_check`` runs them on the GPU.

* :func:`full_precision` -- the region of a loss that must not run under autocast (float32
  similarities, squared activations), for the inputs' device; meta tensors have no autocast.
* :func:`any_true` -- the value checks of the losses (labels outside the classes, negative weights):
  a meta tensor has no values to check, so they pass there.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["full_precision", "any_true"]


def full_precision(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """``torch.autocast(..., enabled=False)`` for ``tensor``'s device type (nothing on meta, which
    has no autocast: ``torch.autocast("meta")`` raises)."""
    if tensor.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def any_true(mask: torch.Tensor) -> bool:
    """Whether any element of the boolean ``mask`` is true (a host read); False on a meta tensor,
    which has no values."""
    return mask.device.type != "meta" and bool(mask.any())
