"""Joint image + mask transforms (torchvision.transforms.v2 with tv_tensors).

Both pipelines are callables ``(PIL image, uint8 mask) -> (float32 C x H x W, int64 H x W)``; the
mask is already in the step's label space (LUT applied). Geometry is applied to the image and
the mask together (masks are always resampled with nearest neighbour, so no new ids appear) and
any padded mask pixel is void (255). Randomness comes from torch's global RNG, so a seeded
``torch.manual_seed`` (e.g. per DataLoader worker or per sample) makes the output reproducible.

* :func:`train_transforms`: RandomResizedCrop(crop, scale=(0.5, 2.0)) as MiB does (when a scale
  above 1 cannot be cut out of the image, torchvision falls back to a centre crop of the whole
  image, as MiB's copy does), horizontal flip, float conversion and ImageNet normalisation.
* :func:`eval_transforms`: Resize(shorter side = crop) + CenterCrop(crop), or no geometry at all
  when ``crop_size`` is None; then the same conversion and normalisation.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "JointTransform", "train_transforms", "eval_transforms", "to_tv_tensors"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VOID = 255

Size = Union[int, Sequence[int]]


def _size(crop_size: Size, what: str) -> tuple[int, int]:
    """``crop_size`` (int or (h, w)) as (h, w) of positive ints."""
    if isinstance(crop_size, (int, np.integer)) and not isinstance(crop_size, bool):
        h = w = int(crop_size)
    elif isinstance(crop_size, Sequence) and len(crop_size) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in crop_size):
        h, w = int(crop_size[0]), int(crop_size[1])
    else:
        raise ValueError(f"{what}: crop_size must be an int or (height, width), got {crop_size!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"{what}: crop_size must be positive, got {crop_size!r}")
    return h, w


def to_tv_tensors(image, mask) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """A PIL image (or H x W x 3 uint8 array) and an (H, W) uint8 mask as tv_tensors."""
    if isinstance(image, Image.Image):
        img = F.pil_to_tensor(image.convert("RGB") if image.mode != "RGB" else image)
    elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
        img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    else:
        raise TypeError(f"image must be a PIL image or an H x W x 3 array, got {type(image).__name__}")
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be a 2-D uint8 array, got shape {mask.shape} dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(img.shape[1:]):
        raise ValueError(f"mask size {tuple(mask.shape)} differs from the image size {tuple(img.shape[1:])}")
    return tv_tensors.Image(img), tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)))


class _PadTo(v2.Transform):
    """Pads (evenly on both sides) up to ``size`` when smaller: images with 0, masks with 255."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = size

    def transform(self, inpt, params):
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        h, w = inpt.shape[-2:]
        ph, pw = max(0, self.size[0] - h), max(0, self.size[1] - w)
        if ph == 0 and pw == 0:
            return inpt
        fill = VOID if isinstance(inpt, tv_tensors.Mask) else 0
        return F.pad(inpt, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=fill)


class JointTransform:
    """Applies a geometric v2 pipeline to (image, mask), then converts and normalises the image."""

    def __init__(self, geometry: Sequence[v2.Transform], mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have 3 values with std > 0, got mean={mean!r} std={std!r}")
        self.geometry = v2.Compose(list(geometry)) if geometry else None
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        img, target = to_tv_tensors(image, mask)
        if self.geometry is not None:
            img, target = self.geometry(img, target)
        x = F.to_dtype(img, torch.float32, scale=True)
        x = F.normalize(x, mean=self.mean, std=self.std)
        return x.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor).to(torch.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(geometry={self.geometry}, mean={self.mean}, std={self.std})"


def train_transforms(crop_size: Size, scale: tuple[float, float] = (0.5, 2.0), hflip: bool = True,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> JointTransform:
    """Random resized crop to ``crop_size`` (area ``scale``, aspect 3/4..4/3), optional flip, normalise."""
    size = _size(crop_size, "train_transforms")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ValueError(f"train_transforms: scale must be (min, max) with 0 < min <= max, got {scale!r}")
    area = (float(scale[0]), float(scale[1]))
    geometry: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=area, antialias=True)]
    if hflip:
        geometry.append(v2.RandomHorizontalFlip(0.5))
    return JointTransform(geometry, mean, std)


def eval_transforms(crop_size: Optional[Size], mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> JointTransform:
    """Resize (shorter side = crop) + centre crop; ``crop_size=None``: native size. Then normalise.

    With a non-square ``(h, w)`` crop the shorter side is resized to ``min(h, w)``; a side that is
    then still shorter than the crop is padded (mask with 255) before the centre crop.
    """
    if crop_size is None:
        return JointTransform([], mean, std)
    size = _size(crop_size, "eval_transforms")
    geometry = [v2.Resize(min(size), antialias=True), _PadTo(size), v2.CenterCrop(size)]
    return JointTransform(geometry, mean, std)
