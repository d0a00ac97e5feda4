"""A training-memory estimate for ``ucdseg run --dry-run``, measured on the CPU in a second.

The method of ``benchmarks/estimate_memory.py`` (docs/performance.md), applied to the run's own
model: one training forward of two images at a small probe crop, adding up the bytes of every
tensor autograd saves for the backward pass (``torch.autograd.graph.saved_tensors_hooks``, each
storage once, the model's own parameters left out), per image, scaled to the run's crop by its
area (a fully convolutional network's activations grow with the pixels: at 64, 128 and 256 px
ResNet-101's give 0.68-0.70 GiB per 512 px image). With the weights (parameters, their gradients
and SGD's momentum, plus the frozen old model's parameters at steps >= 1) it gives, per process:

    weights + micro_batch * activations_per_image

It leaves out the CUDA context (~0.3-0.5 GB), cuDNN workspaces, the allocator's fragmentation,
the backward pass's transient buffers and a method's own tensors (UCD's pixel pairs); mixed
precision (``train.amp``) roughly halves the activations.
"""

from __future__ import annotations

import torch

from ..config import RunConfig
from .build import step_model

__all__ = ["estimate_memory", "PROBE_CROP"]

GIB = 1024 ** 3
PROBE_CROP = 64  # at most: larger crops are measured at this size and scaled by area


def _saved_bytes_per_image(model: torch.nn.Module, crop: int) -> int:
    """Bytes of the tensors (not parameters) autograd keeps for backward, per image of ``crop`` px."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    x = torch.randn(2, 3, crop, crop)  # BatchNorm needs 2 images; per image = half
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = out.logits.float().mean()
    del loss, out
    return sum(storages.values()) // 2


def estimate_memory(cfg: RunConfig, classes_per_step: list[int], world_size: int = 1) -> dict:
    """The estimate for the run's last (largest) step: ``{"gib", "weights_gib", "activations_gib"
    (per image), "micro_batch", "crop", "probe_crop"}``."""
    torch.manual_seed(0)
    model = step_model(cfg, classes_per_step, torch.device("cpu"))
    crop = int(cfg.data.crop_size)
    probe = max(16, min(crop, PROBE_CROP) // 16 * 16)  # a multiple of every output stride
    per_image = _saved_bytes_per_image(model, probe) * (crop / probe) ** 2
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = (4 if len(classes_per_step) > 1 else 3) * params  # + the old model at steps >= 1
    micro = max(1, cfg.train.batch_size // max(1, world_size) // cfg.train.accumulate)
    total = weights + micro * per_image
    return {"gib": total / GIB, "weights_gib": weights / GIB, "activations_gib": per_image / GIB,
            "micro_batch": micro, "crop": crop, "probe_crop": probe}
