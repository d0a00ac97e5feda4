"""Backbone pre-training for the embedded benchmark: its stand-in for ImageNet weights.

Every method of the papers starts from an ImageNet-pretrained backbone, and
segmentation networks trained from scratch learn slowly: on the embedded benchmark pre-training
lifts step 0 of ``4-3-3`` from 36 % to 48 % mIoU at the same cost (docs/embedded.md, "Why version 2"). ImageNet weights
cannot be used there (nothing is downloaded, and 64 px scenes are far from ImageNet's photos),
so :func:`pretrain_embedded_backbone` makes the analogue the same way ImageNet weights are made:
the backbone's *classification* network (:func:`classification_network`) learns to name
object-centric images, one Fashion-MNIST object of the **training split**, tinted as in the scenes,
centred on a cluttered embedded background (32 x 32 px). As ImageNet does for Pascal VOC, this shows the network every class of the benchmark
as an image label, never a mask; the validation scenes' objects (test split) are never seen.

The result is a state dict in torchvision's format (classification head included, dropped when a
segmentation model loads it), so it goes through the same loader as user-given ImageNet files:
``model.pretrained=embedded`` makes (once, cached) and loads it. Same arguments -> same file on a
given machine and torch version (seeded numpy and torch generators).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm.auto import tqdm

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..models.backbones import EmbeddedResNet
from . import generate as emb

__all__ = ["pretrain_embedded_backbone", "embedded_backbone_path", "EMBEDDED_PRETRAINED"]

EMBEDDED_PRETRAINED = "embedded"  # the value of model.pretrained that asks for these weights
PRETRAIN_VERSION = 2  # bump when the recipe below changes (it names the cached file)
IMAGE_SIZE = 32
OBJECT_SCALE = (0.8, 1.1)  # object side / 28 px
# 1200 batches: step 0 of 6-1 reaches 61.9 % (600: 58.1 %, 1800: 63.7 %) for about a minute more
# of the demo's cold start, made once (docs/embedded.md, Pre-training)
ITERATIONS = 1200


def embedded_backbone_path(backbone: str, iterations: int, seed: int) -> Path:
    """Where the weights are cached: ``backbones/`` beside the embedded benchmark's default root."""
    name = f"{backbone}-embedded-v{PRETRAIN_VERSION}-i{iterations}-s{seed}.pth"
    return emb.default_root().parent / "backbones" / name


def classification_network(backbone: str, num_classes: int) -> torch.nn.Module:
    """The classification network whose weights the segmentation ``backbone`` loads: torchvision's
    architecture of that name, or :class:`~ucdseg.models.backbones.EmbeddedResNet`."""
    if backbone == "embedded_resnet":
        return EmbeddedResNet(num_classes=num_classes)
    try:
        return torchvision.models.get_model(backbone, weights=None, num_classes=num_classes)
    except ValueError as exc:
        raise ValueError(f"unknown backbone {backbone!r} for embedded pre-training: {exc}") from None


def _object_images(rng: np.random.Generator, objects: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """``n`` images (n, S, S, 3) float32 in [0, 1]: one tinted object centred (+-3 px) on a background."""
    images = emb._backgrounds(np.stack([emb._background_params(rng) for _ in range(n)]), IMAGE_SIZE)
    for i, (obj, label) in enumerate(zip(objects, labels)):
        side = int(round(obj.shape[0] * rng.uniform(*OBJECT_SCALE)))
        if rng.random() < 0.5:
            obj = np.ascontiguousarray(obj[:, ::-1])
        intensity, shape = emb._resize(obj, side), emb._resize(emb._close(obj), side)
        y0, x0 = (int(v) for v in (IMAGE_SIZE - side) // 2 + rng.integers(-3, 4, 2))
        ys, xs = slice(max(y0, 0), min(y0 + side, IMAGE_SIZE)), slice(max(x0, 0), min(x0 + side, IMAGE_SIZE))
        crop = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        lo, hi = emb.ALPHA_RANGE
        alpha = np.clip((shape[crop] - lo) / (hi - lo), 0, 1)[..., None]
        color = emb._tint(rng, int(label)) * (emb.SHADE_FLOOR + (1 - emb.SHADE_FLOOR) * intensity[crop][..., None])
        images[i, ys, xs] = images[i, ys, xs] * (1 - alpha) + color * alpha
    return images


def pretrain_embedded_backbone(
    backbone: str = "embedded_resnet",
    path: Optional[Union[str, "os.PathLike[str]"]] = None,
    iterations: int = ITERATIONS,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    fashion_mnist_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    progress: bool = True,
) -> Path:
    """Train (or find, when ``path`` exists) the embedded benchmark's pretrained ``backbone`` weights.

    ``backbone`` is a torchvision classification architecture of :func:`ucdseg.models.build_model`
    (``embedded_resnet``, ``resnet18``, ``resnet50``, ``resnet101``, ``mobilenet_v3_large``). SGD (momentum 0.9,
    Nesterov, weight decay 1e-4, poly schedule) on ``iterations`` batches of fresh images; the
    state dict is written atomically to ``path`` (default :func:`embedded_backbone_path`) with a
    JSON sidecar holding the recipe and the training accuracy of the last 20 batches.
    """
    path = Path(path) if path is not None else embedded_backbone_path(backbone, iterations, seed)
    if path.is_file():
        return path
    if iterations < 1 or batch_size < 1:
        raise ValueError(f"iterations and batch_size must be >= 1, got {iterations} and {batch_size}")
    # the caller's random state is left as it was: a run seeds itself before building its model,
    # and must build the same model whether these weights were cached or made just now
    with torch.random.fork_rng(devices=[]):
        return _pretrain(backbone, path, iterations, batch_size, lr, seed, fashion_mnist_dir, progress)


def _pretrain(backbone: str, path: Path, iterations: int, batch_size: int, lr: float, seed: int,
              fashion_mnist_dir, progress: bool) -> Path:
    from ..io import atomic_path, write_json

    torch.manual_seed(seed)  # the initialisation too
    model = classification_network(backbone, num_classes=10)
    images, labels = emb.load_fashion_mnist("train", fashion_mnist_dir)
    rng = np.random.default_rng([seed, 7])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - it / iterations) ** 0.9)
    model.train()
    hits, t0 = [], time.perf_counter()
    bar = tqdm(range(iterations), desc=f"pre-training {backbone} on embedded objects", disable=not progress)
    for _ in bar:
        pick = rng.integers(0, len(images), batch_size)
        x = torch.from_numpy(_object_images(rng, images[pick], labels[pick], batch_size)).permute(0, 3, 1, 2)
        y = torch.from_numpy(labels[pick].astype(np.int64))
        logits = model((x - mean) / std)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        hits = (hits + [(logits.argmax(1) == y).float().mean().item()])[-20:]
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{np.mean(hits):.2f}")
    bar.close()

    write_json(path.with_suffix(".json"), {  # first: the weights' file appearing means both are complete
        "what": "ucdseg embedded-benchmark backbone pre-training (stand-in for ImageNet weights)",
        "backbone": backbone, "version": PRETRAIN_VERSION, "iterations": iterations, "batch_size": batch_size,
        "lr": lr, "seed": seed, "image_size": IMAGE_SIZE, "source": "Fashion-MNIST training split",
        "train_accuracy_last_20_batches": round(float(np.mean(hits)), 4),
        "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__})
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return path
