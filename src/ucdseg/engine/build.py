"""Everything a run is made of, built from its :class:`~ucdseg.config.RunConfig`, and the plan
of each of its steps.

This is the only module of the engine that reads the config: the loop (:mod:`.loop`), the
evaluation (:mod:`.evaluation`) and the run (:mod:`.runner`) receive the objects built here.
:class:`RunContext` is what every step of a run shares (made once by :class:`~.runner.Run`);
:func:`plan_step` builds one step's models, exemplar memory, data, criterion and optimiser (a
:class:`StepPlan`), which :func:`.loop.run_plan` trains; :func:`save_step` writes its checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader

from .. import io, label_maps
from ..config import RunConfig, to_dict
from ..data import StepDataset, dataset_meta, eval_transforms, identity, open_dataset_split, train_transforms
from ..data.index import StepIndex, scan_presence, step_index
from ..methods import Method, StepSetup, get_method
from ..models import build_model, load_previous_step
from ..tasks import Task, TaskError, get_task
from .loop import Criterion, LoopOptions, Trainee, shares_trunk
from .memory import choose_memory, load_memory, memory_checksum, memory_path
from .process_group import Dist, barrier
from .run_folder import RunFolder
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
    """What a run was trained on, independent of where the data lives (:mod:`ucdseg.data.identity`:
    the lists of files, their sizes and a sample of their bytes). A run resumes only on the same data."""
    return identity.data_identity(cfg.data.dataset, train_set, val_set)


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
    (none at step 0, the only step of a joint run)."""
    method = build_method(cfg)
    size = cfg.data.memory.size if cfg.data.memory.size is not None else method.memory_size
    return size if step > 0 else 0


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


# ------------------------------------------------------------------------------ a step's plan
@dataclass
class RunContext:
    """What every step of a run shares."""

    cfg: RunConfig
    dist: Dist
    method: Method
    weights: dict[str, float]
    options: dict[str, Any]
    task: Task  # the benchmark's task: old and new classes are reported against its step 0
    train_task: Task  # the task trained (its joint version for joint training)
    train_set: Any
    val_set: Any
    folder: RunFolder
    data_identity: dict
    progress: bool = True

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def num_base(self) -> int:
        """The benchmark's step-0 classes (background included): the classes reported as old."""
        return len(self.task.steps[0])

    def classes(self, step: int) -> tuple[int, int]:
        """The classes known before ``step`` (background included) and the classes it adds."""
        per_step = self.train_task.classes_per_step
        return sum(per_step[:step]), per_step[step]


@dataclass
class StepPlan:
    """Everything step ``step`` trains with, continued from a mid-step checkpoint when ``start > 0``."""

    step: int
    trainee: Trainee
    criterion: Criterion
    loader: Any
    opts: LoopOptions
    start: int  # the first iteration to run
    total: int
    parent_sha256: str | None  # the checksum of the checkpoint of step - 1 it starts from
    data: dict  # what the step trains on, for its record (:func:`data_record`)


def plan_step(ctx: RunContext, step: int) -> StepPlan:
    """Build step ``step``: seeded, its models (with step ``step-1``'s weights and the method's
    classifier init), memory, data, criterion, optimiser and schedule, and the train mode of its
    layers; a mid-step checkpoint of this step (from the same parent) is continued."""
    cfg, dist, opts = ctx.cfg, ctx.dist, loop_options(ctx.cfg, step)
    torch.manual_seed(cfg.seed * 1000 + step)
    model, old_model, carried, parent = step_models(ctx, step, opts)
    memory = step_memory(ctx, step, old_model)
    samples, index = train_data(cfg, ctx.train_task, ctx.train_set, step, ctx.progress, memory)
    total = planned_iterations(ctx, step, index, memory)
    criterion = step_criterion(ctx, step, model, old_model, len(index.indices), samples, carried)
    optimizer, scheduler = optimizer_and_schedule(cfg, model, step, total)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=opts.amp_dtype == torch.float16)
    trainee = Trainee(model, model, old_model, optimizer, scheduler, scaler, step_state=criterion.step_state)
    start = _continue(ctx, step, trainee, parent)
    trainee.forward = DistributedDataParallel(model) if dist.enabled else model
    if opts.compile:  # the training forward only; ``model`` stays plain for state dicts and evaluation
        import torch._dynamo as dynamo

        dynamo.reset()  # the previous step's graphs are of no use; keep clear of the recompile limit
        trainee.forward = torch.compile(trainee.forward)
    _train_mode(ctx, step, trainee, opts)
    sampler = batch_sampler(cfg, step, len(index.indices), total, dist, start, memory=len(memory or []))
    loader = train_loader(cfg, samples, sampler, ctx.device)
    return StepPlan(step, trainee, criterion, loader, opts, start, total, parent, data_record(index, memory))


def step_models(ctx: RunContext, step: int, opts: LoopOptions):
    """Step ``step``'s model (step ``t-1``'s weights, new classifier initialised), the frozen old
    model (None at step 0), the method state step ``t-1`` carried (None without one) and the
    checksum of step ``t-1``'s checkpoint; SyncBatchNorm under CUDA DDP, the memory layout applied."""
    cfg, classes = ctx.cfg, ctx.train_task.classes_per_step
    pretrained = pretrained_weights(cfg, ctx.dist, ctx.progress) if step == 0 else None
    model = step_model(cfg, classes[: step + 1], ctx.device, pretrained)
    old_model = carried = parent = None
    if step > 0:
        path = ctx.folder.final(step - 1)
        parent = io.sha256(path)
        checkpoint = io.load_checkpoint(path, map_location=ctx.device)
        old_model = step_model(cfg, classes[:step], ctx.device)
        old_model.load_state_dict(checkpoint["model"])
        old_model.eval().requires_grad_(False)
        load_previous_step(model, checkpoint["model"])
        model.init_new_classifier(ctx.method.classifier_init)
        carried = checkpoint.get("method_state")
    if opts.bn == "sync" and ctx.dist.enabled and ctx.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if opts.channels_last:  # parameters keep their identity: the optimizer sees them
        for m in (model, old_model):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    return model, old_model, carried, parent


def step_memory(ctx: RunContext, step: int, old_model, choose: bool = True) -> list[dict] | None:
    """The exemplars of ``step`` (``data.memory.size``): read from ``memory/stepT.json`` when this
    run chose them already, else chosen by rank 0 (:mod:`.memory`) and written there."""
    cfg = ctx.cfg
    size = memory_size(cfg, step)
    if not size:
        return None
    path = memory_path(ctx.folder.path, step)
    if ctx.dist.is_main and not path.is_file() and choose:
        previous = None
        if step > 1:
            previous = load_memory(memory_path(ctx.folder.path, step - 1), ctx.data_identity, ctx.train_set)
        entries = choose_memory(ctx.method, ctx.train_task, ctx.train_set, step, size, seed=cfg.seed * 1000 + step,
                                setting_index=train_index(cfg, ctx.train_task, ctx.train_set, step - 1,
                                                                progress=False),
                                previous=previous, old_model=old_model, device=ctx.device,
                                crop_size=cfg.data.crop_size, cache_dir=cfg.data.cache_dir,
                                batch_size=cfg.eval.batch_size)
        io.write_json(path, {"step": step, "size": size, "data": ctx.data_identity, "entries": entries})
    barrier()
    return load_memory(path, ctx.data_identity, ctx.train_set)


def planned_iterations(ctx: RunContext, step: int, index: StepIndex, memory: list[dict] | None) -> int:
    """The step's iterations: over its images, and its memory when the memory joins them (concat)."""
    joined = len(memory or []) if ctx.method.memory.mixing == "concat" else 0
    return step_iterations(ctx.cfg, step, len(index.indices) + joined)


def data_record(index: StepIndex, memory: list[dict] | None) -> dict:
    """What a step was trained on: its images (count, checksum) and its memory's."""
    record = {"num_train_images": len(index.indices), "index_checksum": index.checksum}
    if memory:
        record.update(num_memory_images=len(memory), memory_checksum=memory_checksum(memory))
    return record


def step_criterion(ctx: RunContext, step: int, model, old_model, num_images: int, samples,
                   carried: dict | None) -> Criterion:
    """The method's loss for the step, with its state: the state it carries across steps
    (``step_state``, from ``carried``) or its ``before_step`` pass over the step's ``num_images``
    images (PLOP's thresholds)."""
    cfg, method = ctx.cfg, ctx.method
    num_old, num_new = ctx.classes(step)

    def one_pass():
        sampler = one_epoch_sampler(cfg, step, num_images, ctx.dist)
        return train_loader(cfg, samples, sampler, ctx.device)

    setup = StepSetup(step=step, model=model, old_model=old_model, num_old=num_old, num_new=num_new,
                      options=ctx.options, previous=carried, device=ctx.device, loader=one_pass,
                      progress=ctx.progress and ctx.dist.is_main,
                      source=str(ctx.folder.final(step - 1)) if step else "", setting=cfg.data.setting)
    state = None
    if method.step_state is not None:
        state = method.step_state(setup)
    elif old_model is not None and method.before_step is not None:
        state = method.before_step(setup)
    return Criterion(method, ctx.weights, ctx.options, step, num_old, num_new, state)


def _continue(ctx: RunContext, step: int, trainee: Trainee, parent: str | None) -> int:
    """The iteration to start at: that of this step's mid-step checkpoint when a killed run left
    one trained from the same step ``t-1`` (else it is stale, and the step starts over)."""
    partial = ctx.folder.partial(step)
    if not partial.exists():
        return 0
    state = io.load_checkpoint(partial, ctx.device)
    if state.get("parent_sha256", parent) != parent:
        if ctx.dist.is_main:
            print(f"ucdseg: warning: {partial} continues a step {step - 1} that has been trained again since; step {step} starts "
                  "over", file=sys.stderr, flush=True)
        return 0
    return trainee.load_state_dict(state)


def _train_mode(ctx: RunContext, step: int, trainee: Trainee, opts: LoopOptions) -> None:
    """Train mode for the forward, BatchNorm frozen when ``train.bn=frozen``, the method's frozen
    layers (SSUL, DKD) at ``t >= 1``, and whether the old model's trunk is the model's."""
    getattr(trainee.forward, "_orig_mod", trainee.forward).train()  # the DDP wrapper (or the model)
    if opts.bn == "frozen":
        freeze_batchnorm(trainee.model)
    if step > 0 and ctx.method.train_mode is not None:
        ctx.method.train_mode(trainee.model, step)
    trainee.shared_trunk = shares_trunk(trainee.model, trainee.old_model)


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """``train.bn=frozen``: every BatchNorm layer in eval mode, so it normalises with its running
    statistics and never updates them; its affine weight and bias are still trained."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def checkpoint_state(plan: StepPlan, iteration: int) -> dict:
    """A mid-step checkpoint of ``plan``, which names the step ``t-1`` it continues."""
    return {**plan.trainee.state_dict(iteration, plan.step), "parent_sha256": plan.parent_sha256}


def save_step(ctx: RunContext, step: int, model: torch.nn.Module, step_state=None,
              parent_sha256: str | None = None) -> str | None:
    """``checkpoints/stepN.pt`` (rank 0), with the method state it carries to the next step and the
    checksum of the checkpoint it was trained from; returns its own checksum (None off rank 0)."""
    digest = None
    if ctx.dist.is_main:
        meta = ctx.train_set.meta
        state = {
            "model": model.state_dict(), "step": step, "config": to_dict(ctx.cfg),
            "classes_per_step": ctx.train_task.classes_per_step[: step + 1],
            # dataset space (index = class id), so ``ucdseg predict`` needs nothing else
            "class_names": list(meta.class_names), "palette": [list(c) for c in meta.palette],
            "parent_sha256": parent_sha256}
        if step_state is not None:
            state["method_state"] = step_state.carry()
        io.save_checkpoint(ctx.folder.final(step), state)
        digest = io.sha256(ctx.folder.final(step))
        ctx.folder.partial(step).unlink(missing_ok=True)
    return digest
