"""Everything a run is made of, built from its :class:`~ucdseg.config.RunConfig`.

This is the only module of the engine that reads the config: the loop (:mod:`.loop`), the
evaluation (:mod:`.evaluation`) and the run (:mod:`.runner`) receive the objects built here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader

from .. import label_maps
from ..config import RunConfig
from ..data import StepDataset, dataset_meta, eval_transforms, open_dataset_split, train_transforms
from ..data.index import StepIndex, scan_presence, step_index
from ..methods import Method, get_method
from ..models import build_model
from ..tasks import Task, TaskError, get_task
from .process_group import Dist, barrier
from .sampling import SeededSamples, StepBatchSampler, num_iterations

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------ task, method, data
def build_task(cfg: RunConfig) -> Task:
    """The benchmark's task: its steps are what results report as old and new classes. The dataset's
    class names (a folder dataset's are in its ``data.root``) give its number of classes."""
    order: Any = cfg.task.order if cfg.task.order is not None else cfg.task.order_seed
    try:
        num_foreground = dataset_meta(cfg.data.dataset, cfg.data.root).num_classes - 1
    except (ValueError, FileNotFoundError) as exc:
        raise TaskError(str(exc)) from None
    return get_task(cfg.data.dataset, cfg.task.name, order=order, num_classes=num_foreground)


def joint_task(task: Task) -> Task:
    """All classes of ``task`` in a single step (the joint-training upper bound)."""
    return dataclasses.replace(task, name=f"{task.name} (joint)", steps=[[c for s in task.steps for c in s]])


def training_task(cfg: RunConfig, task: Task | None = None) -> Task:
    """The task the run trains: ``task`` itself, or its joint transformation when the method is
    ``joint``. Nothing else in the engine asks whether a run is joint."""
    task = task or build_task(cfg)
    return joint_task(task) if build_method(cfg).joint else task


def build_method(cfg: RunConfig) -> Method:
    return get_method(cfg.method.name)


def method_weights(cfg: RunConfig) -> dict[str, float]:
    """The method's loss weights with ``method.weights`` applied."""
    return build_method(cfg).weights(cfg.method.weights)


def method_options(cfg: RunConfig) -> dict[str, Any]:
    """The method's options (defaults updated by ``method.options``)."""
    return build_method(cfg).resolve_options(cfg.method.options)


def open_dataset(cfg: RunConfig, split: str, prepare: bool = True, progress: bool = True):
    """The raw dataset of ``split`` (the embedded benchmark is generated on first use when
    ``prepare``)."""
    return open_dataset_split(cfg.data, split, prepare=prepare, progress=progress)


def scan_datasets(cfg: RunConfig, train_set, val_set, dist: Dist, progress: bool) -> None:
    """Index which classes each image holds, once, by rank 0 (cached on disk for the others)."""
    if dist.is_main:
        scan_presence(train_set, cache_dir=cfg.data.cache_dir, progress=progress)
        if cfg.eval.images == "seen":
            scan_presence(val_set, cache_dir=cfg.data.cache_dir, progress=progress)
    barrier()


def check_readable(dataset, inputs: tuple[str, ...] = ()) -> None:
    """Read the first and the last (image, mask) pair of a split, and the per-image ``inputs`` the
    method needs (``("saliency",)``), so that unreadable or missing data fails before a step is
    trained (the readers' errors name the file)."""
    for i in sorted({0, len(dataset) - 1}):
        if i >= 0:
            dataset[i]
            if "saliency" in inputs:
                dataset.load_saliency(i)


def data_identity(cfg: RunConfig, train_set, val_set) -> dict:
    """What a run was trained on, independent of where the data lives: the dataset and checksums
    of its two lists of files (relative to the root). A run resumes only on the same data."""
    import hashlib

    def files(dataset) -> str:
        root = dataset.root
        names = "\n".join(Path(os.path.relpath(dataset.mask_path(i), root)).as_posix() for i in range(len(dataset)))
        return hashlib.sha256(names.encode()).hexdigest()

    return {"dataset": cfg.data.dataset, "train_files": files(train_set), "val_files": files(val_set)}


def train_index(cfg: RunConfig, task: Task, train_set, step: int, progress: bool = True) -> StepIndex:
    """Step ``step``'s training images, by ``data.setting``."""
    return step_index(train_set, task, cfg.data.setting, step, cache_dir=cfg.data.cache_dir, seed=cfg.seed,
                      progress=progress)


def train_data(cfg: RunConfig, task: Task, train_set, step: int, progress: bool = True,
               memory: list[dict] | None = None) -> tuple[SeededSamples, StepIndex]:
    """Step ``step``'s training images (by ``data.setting``), their labels mapped for the step and
    by the method's label rule, with the training transforms (seeded per sample); then the memory's
    images (``memory``: entries of :func:`ucdseg.engine.memory.choose_memory`), labelled as the
    method's :class:`~ucdseg.methods.MemorySpec` says (every seen class, or the step's only)."""
    method, options = build_method(cfg), method_options(cfg)
    index = train_index(cfg, task, train_set, step, progress)
    transform = train_transforms(cfg.data.crop_size, scale=(cfg.data.scale_min, cfg.data.scale_max))
    rule = {"label_transform": None, "needs": method.inputs(options)}
    if method.label_transform is not None:
        rule["label_transform"] = functools.partial(method.label_transform, options=options)
    samples = StepDataset(train_set, index.indices, label_maps.train_lut(task, step), transform, **rule)
    if memory:
        lut = (label_maps.eval_lut(task, step, unseen="background") if method.memory.labels == "seen"
               else label_maps.train_lut(task, step))
        exemplars = StepDataset(train_set, [e["index"] for e in memory], lut, transform, **rule)
        samples = ConcatDataset([samples, exemplars])
    return SeededSamples(samples), index


def memory_size(cfg: RunConfig, step: int) -> int:
    """Exemplars replayed at ``step``: ``data.memory.size``, or the method's default when it is unset
    (none at step 0 or in a joint run)."""
    method = build_method(cfg)
    size = cfg.data.memory.size if cfg.data.memory.size is not None else method.memory_size
    return size if step > 0 and not method.joint else 0


def check_memory_size(cfg: RunConfig, task: Task, train_set) -> None:
    """Refuse a memory larger than the images it is first chosen from before any step trains: step 1
    chooses it among step 0's training images (later steps among their images and the previous memory,
    never fewer than ``data.memory.size``). Found at step 1 instead, step 0's training would be lost:
    ``data.memory.size`` cannot change in a run folder, nor between runs sharing a step 0."""
    size = memory_size(cfg, 1)
    if not size or task.num_steps < 2:
        return
    available = len(train_index(cfg, task, train_set, 0, progress=False).indices)
    if size > available:
        raise ValueError(f"data.memory.size={size} is larger than the {available} training images of step 0 that "
                         f"step 1's memory is chosen from; expected at most {available}")


def val_data(cfg: RunConfig, task: Task, val_set, step: int) -> StepDataset:
    """The validation images scored after ``step`` and their labels, by ``cfg.eval``'s conventions
    (``eval.images``, ``eval.unseen``; see :func:`ucdseg.label_maps.eval_images` and ``eval_lut``)."""
    lut = label_maps.eval_lut(task, step, ignore_background=val_set.meta.ignore_background_in_eval,
                              unseen=cfg.eval.unseen)
    indices: Any = range(len(val_set))
    if cfg.eval.images != "all":
        presence = scan_presence(val_set, cache_dir=cfg.data.cache_dir, progress=False)
        indices = label_maps.eval_images(presence, task, step, images=cfg.eval.images)
    return StepDataset(val_set, indices, lut, eval_transforms(cfg.data.eval_crop_size))


def train_loader(cfg: RunConfig, dataset, sampler, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.workers,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def eval_loader(cfg: RunConfig, dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.data.workers)


# ------------------------------------------------------------------------------ model
def pretrained_weights(cfg: RunConfig, dist: Dist, progress: bool = True) -> str | None:
    """``model.pretrained``, with ``embedded`` made (once, by rank 0) and resolved to its file."""
    from ..embedded import pretrain

    value = cfg.model.pretrained
    if value != pretrain.EMBEDDED_PRETRAINED:
        return value
    if dist.is_main:
        pretrain.pretrain_embedded_backbone(cfg.model.backbone, progress=progress)
    barrier()
    return str(pretrain.pretrain_embedded_backbone(cfg.model.backbone, progress=False))


def step_model(cfg: RunConfig, classes_per_step: list[int], device: torch.device,
               pretrained: str | None = None) -> torch.nn.Module:
    """The DeepLab of ``model.*`` for the classes of the steps in ``classes_per_step``, with the
    classifiers the method asks for (its ``model`` spec)."""
    return build_model(cfg.model.backbone, classes_per_step, output_stride=cfg.model.output_stride,
                       pretrained=pretrained, spec=build_method(cfg).model,
                       first_block_dilation=cfg.model.first_block_dilation).to(device)


# ------------------------------------------------------------------------------ schedule
@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How the loop runs an iteration (the config's ``train.*`` keys the loop needs)."""

    batch_size: int  # global
    accumulate: int
    amp_dtype: torch.dtype | None
    log_every: int
    checkpoint_every: int
    compile: bool
    channels_last: bool
    bn: str
    sampler_seed: int


def loop_options(cfg: RunConfig, step: int) -> LoopOptions:
    t = cfg.train
    return LoopOptions(t.batch_size, t.accumulate, AMP_DTYPES[t.amp], t.log_every, t.checkpoint_every, t.compile,
                       t.channels_last, t.bn, sampler_seed=cfg.seed * 1000 + step)


def step_iterations(cfg: RunConfig, step: int, num_images: int) -> int:
    """Iterations of step ``step``: ``train.iterations(_next)``, else ``epochs(_next)`` over its images."""
    first = step == 0
    epochs = cfg.train.epochs if first or cfg.train.epochs_next is None else cfg.train.epochs_next
    iters = cfg.train.iterations if first or cfg.train.iterations_next is None else cfg.train.iterations_next
    return num_iterations(num_images, cfg.train.batch_size, epochs, iters)


def optimizer_and_schedule(cfg: RunConfig, model: torch.nn.Module, step: int, total: int):
    """SGD at ``train.lr`` (step 0) or ``train.lr_next``, with a per-iteration poly schedule.

    The method's ``param_groups`` split the parameters into groups of their own learning rate and
    weight decay (one group by default); a parameter in no group is frozen (``requires_grad``
    off), so autograd does not run through it."""
    lr = cfg.train.lr if step == 0 else cfg.train.lr_next
    groups = build_method(cfg).param_groups(model, step, lr, cfg.train.weight_decay)
    trained = {id(p) for group in groups for p in group["params"]}
    for p in model.parameters():
        if id(p) not in trained:
            p.requires_grad_(False)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.train.momentum,
                                nesterov=cfg.train.nesterov, weight_decay=cfg.train.weight_decay)
    power = cfg.train.poly_power
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, total) / total) ** power)
    return optimizer, scheduler


def batch_sampler(cfg: RunConfig, step: int, num_images: int, total: int, dist: Dist, start: int = 0,
                  memory: int = 0) -> StepBatchSampler:
    """The step's seeded batches (this process's share), resumable at iteration ``start``.
    ``memory``: exemplars after the ``num_images`` step images, mixed in as the method says
    (``concat``: sampled with them; ``replace_half``: half of every batch)."""
    mixing = build_method(cfg).memory.mixing
    if memory and mixing == "concat":
        num_images, memory = num_images + memory, 0
    return StepBatchSampler(num_images, cfg.train.batch_size, total, seed=cfg.seed * 1000 + step, start=start,
                            rank=dist.rank, world_size=dist.world_size, memory=memory, mixing=mixing)


def one_epoch_sampler(cfg: RunConfig, step: int, num_images: int, dist: Dist) -> StepBatchSampler:
    """One pass over the step's images (a method's ``before_step`` pass, e.g. PLOP's thresholds)."""
    total = num_iterations(num_images, cfg.train.batch_size, 1, None)
    return batch_sampler(cfg, step, num_images, total, dist)
