"""Exemplar memory (``data.memory.size``): the images of earlier steps a step ``t >= 1`` replays.

The memory of step ``t`` is chosen once, at its start, from the candidates the releases use (SSUL
utils/memory.py:19-136, DKD utils/memory.py:46-175): the training images of step ``t-1`` and the
memory of step ``t-1``. Each candidate is described by the foreground classes it holds: for the
images of step ``t-1``, the ground truth of step ``t-1``'s classes, and (``t >= 2``, when the
method's :class:`~ucdseg.methods.MemorySpec` has a ``pseudo_threshold``) the old classes the old
model predicts with that confidence on their background, in one pass over those images; a memory
entry keeps the classes it was chosen with. The class-balanced round robin of the releases then
picks ``size`` of them (:func:`ucdseg.data.memory.class_balanced_memory`).

The choice is written to ``memory/stepT.json`` in the run folder (the images' paths relative to the
dataset root, their indices and classes, and the data's identity) and read back on resume, so a
resumed step replays the same images, and a memory file of other data is refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import io, label_maps
from ..data import StepDataset, eval_transforms
from ..data.identity import identity_difference
from ..data.index import scan_presence
from ..data.memory import class_balanced_memory

__all__ = ["memory_path", "load_memory", "choose_memory", "memory_checksum"]


def memory_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "memory" / f"step{step}.json"


def _relpath(dataset, i: int) -> str:
    return Path(os.path.relpath(dataset.image_path(i), dataset.root)).as_posix()


def memory_checksum(entries: Sequence[dict]) -> str:
    """sha256 of the memory's image paths, one per line in the order they are kept."""
    return hashlib.sha256("\n".join(e["image"] for e in entries).encode()).hexdigest()


def load_memory(path: Path, identity: dict, train_set) -> list[dict] | None:
    """The entries of a memory file written by this run on this data; None when there is none.
    A file of other data (another dataset, or images that are not this dataset's) is an error."""
    if not path.is_file():
        return None
    saved = io.read_json(path, "memory file")
    if not isinstance(saved, dict) or not isinstance(saved.get("entries"), list):
        raise io.FileError(f"memory file {path} is corrupt (no list of entries); delete it to choose the memory "
                           "again")
    difference = identity_difference(saved.get("data", {}), identity)
    if difference:
        raise ValueError(f"memory file {path} was chosen on other data ({difference}); point data.root at the "
                         "run's dataset, or use another name=")
    for entry in saved["entries"]:
        i = entry.get("index")
        if not isinstance(i, int) or not 0 <= i < len(train_set) or _relpath(train_set, i) != entry.get("image"):
            raise ValueError(f"memory file {path}: entry {entry!r} is not an image of this dataset at that index; "
                             "delete the file to choose the memory again")
    return saved["entries"]


@torch.no_grad()
def _pseudo_classes(old_model, method, dataset, indices: list[int], lut: np.ndarray, threshold: float,
                    crop_size: int | None, device: torch.device, batch_size: int) -> list[set[int]]:
    """Per image, the model-space classes the old model predicts with confidence >= ``threshold``
    on the pixels ``lut`` labels background (one pass, as the releases' samplers)."""
    view = StepDataset(dataset, indices, lut, eval_transforms(crop_size))
    loader = DataLoader(view, batch_size=batch_size if crop_size else 1)
    found: list[set[int]] = []
    old_model.eval()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        pseudo = method.confident_classes(old_model(images).logits.float(), threshold)
        pseudo = torch.where(labels == 0, pseudo, torch.zeros_like(pseudo))
        for b in range(len(images)):
            found.append({int(c) for c in torch.unique(pseudo[b]).tolist() if c > 0})
    return found


def choose_memory(method, task, train_set, step: int, size: int, seed: int, setting_index, previous: list[dict] | None,
                  old_model, device: torch.device, crop_size: int | None, cache_dir: Any = None,
                  batch_size: int = 16) -> list[dict]:
    """The memory of step ``step`` (module docstring): ``size`` entries ``{"image", "index", "classes"}``.

    ``setting_index``: the :class:`~ucdseg.data.index.StepIndex` of step ``step - 1``; ``previous``:
    the memory of step ``step - 1`` (None at step 1)."""
    presence = scan_presence(train_set, cache_dir=cache_dir, progress=False)
    model_ids = task.model_lut
    prior = set(task.steps[step - 1])
    indices = list(setting_index.indices)
    classes = [sorted({int(model_ids[c]) for c in presence[i] if c in prior and c != 0}) for i in indices]
    spec = method.memory
    if step >= 2 and spec.pseudo_threshold is not None:
        lut = label_maps.train_lut(task, step - 1)
        extra = _pseudo_classes(old_model, method, train_set, indices, lut, spec.pseudo_threshold, crop_size,
                                device, batch_size)
        classes = [sorted(set(c) | e) for c, e in zip(classes, extra)]
    entries = [{"image": _relpath(train_set, i), "index": int(i), "classes": c} for i, c in zip(indices, classes)]
    entries += list(previous or [])
    num_old = sum(len(s) for s in task.steps[:step])
    if size > len(entries):
        raise ValueError(f"data.memory.size={size} is larger than the {len(entries)} images it is chosen from at "
                         f"step {step} (the training images of step {step - 1} and its memory); expected at most "
                         f"{len(entries)}")
    chosen = class_balanced_memory([e["classes"] for e in entries], list(range(1, num_old)), size, seed)
    return [entries[k] for k in chosen]


