"""The incremental training engine: every step of a task, with one readable training loop.

For step ``t`` the engine builds the model for the classes seen so far, loads step ``t-1`` into
it and into a frozen copy (the old model), initialises the new classifier as the method says,
selects and maps the step's images, trains with SGD and a per-iteration poly schedule, evaluates
on the validation set and saves. A run directory holds everything; running the same command
again continues from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import ucdseg

from .. import labels as label_maps
from ..config import RunConfig, to_dict
from ..data import StepDataset, build_dataset, eval_transforms, prepare_embedded, train_transforms
from ..data.embedded import default_root as default_embedded_root
from ..data.index import scan_presence, step_index
from ..methods import LossContext, get_method
from ..models import EMBEDDED_PRETRAINED, build_model, load_previous_step, pretrain_embedded_backbone
from ..tasks import Task, get_task
from . import checkpoint as ckpt
from .distributed import Dist, barrier, setup
from .evaluate import evaluate
from .metrics import miou_summary
from .sampling import SeededSamples, StepBatchSampler, num_iterations

# Keys that may change between a run and its resumption without changing its results.
# The paths only locate the run and its inputs (a moved dataset or run directory may resume).
# train.channels_last and train.compile only choose how the same computation is laid out in
# memory and which kernels run it: like ``device`` they can change the last bits of the floats,
# never what is computed, so a run may be resumed with them switched (e.g. on a machine without
# a C++ compiler for torch.compile).
RESUMABLE_KEYS = {"device", "data.workers", "data.cache_dir", "train.log_every", "eval.batch_size",
                  "eval.num_images", "train.checkpoint_every", "name", "output_dir", "data.root",
                  "model.pretrained", "train.channels_last", "train.compile"}


# Settings a reused step 0 must share with this run (the method may differ: step 0 is plain CE).
STEP0_TRAIN_KEYS = {f"train.{k}" for k in ("batch_size", "epochs", "iterations", "lr", "momentum", "nesterov",
                                           "weight_decay", "poly_power", "amp")}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class CompileError(RuntimeError):
    """``train.compile=true`` but torch.compile cannot build the model here."""


@contextlib.contextmanager
def _compile_errors(active: bool):
    """Turn a failure of torch.compile's backend (no C/C++ toolchain, ...) into one clear line."""
    if not active:
        yield
        return
    import torch._dynamo as dynamo

    try:
        yield
    except dynamo.exc.BackendCompilerFailed as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CompileError(
            "train.compile=true: torch.compile failed to build the model; it needs a working C/C++ toolchain "
            f"(a C++ compiler such as g++ on the PATH and the Python headers; Triton on CUDA), "
            f"or set train.compile=false ({first})") from exc


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "weights":
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(a: dict, b: dict, ignore: set[str] = RESUMABLE_KEYS) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))


def build_task(cfg: RunConfig) -> Task:
    order: Any = cfg.task.order if cfg.task.order is not None else cfg.task.order_seed
    return get_task(cfg.data.dataset, cfg.task.name, order=order, root=cfg.data.root)


def joint_task(task: Task) -> Task:
    """All classes of ``task`` in a single step."""
    return dataclasses.replace(task, name=f"{task.name} (joint)", steps=[[c for s in task.steps for c in s]])


def open_dataset(cfg: RunConfig, split: str, prepare: bool = True, progress: bool = True):
    """The raw dataset of ``split``; the embedded benchmark is generated on first use."""
    options: dict[str, Any] = {}
    root = cfg.data.root
    if cfg.data.dataset == "embedded":
        root = root or str(default_embedded_root())
        if prepare:
            prepare_embedded(root, num_train=cfg.data.embedded_train, num_val=cfg.data.embedded_val,
                             image_size=cfg.data.embedded_size, progress=progress)
    elif root is None:
        raise ValueError(f"data.root is not set; give the {cfg.data.dataset} dataset directory (data.root=DIR)")
    if cfg.data.dataset in ("ade", "cityscapes"):
        options["score_background"] = cfg.data.score_background
    return build_dataset(cfg.data.dataset, root, split, **options)


def versions() -> dict:
    """Versions, platform and torch's intra-op thread count: on CPU a seed fixes a run for a given
    thread count (reductions split across threads add in another order)."""
    import torchvision

    return {"ucdseg": ucdseg.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}


def _float(out):
    """Losses are computed in float32 even when the forward ran under autocast."""
    return type(out)(*(
        [t.float() for t in v] if isinstance(v, list) else v.float() for v in out
    ))


class Trainer:
    """Runs every step of ``cfg``'s task and writes the run directory."""

    def __init__(self, cfg: RunConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.dist: Dist = setup(cfg.device)
        self.device = self.dist.device
        self.method = get_method(cfg.method.name)
        self.weights = self.method.weights(cfg.method.weights)
        self.task = build_task(cfg)  # the benchmark's task; old/new are reported against its step 0
        self.train_task = joint_task(self.task) if self.method.joint else self.task
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.dist.is_main:
            self._check_saved_config()
            self.train_set = open_dataset(cfg, "train", progress=progress)
            scan_presence(self.train_set, cache_dir=cfg.data.cache_dir, progress=progress)  # cached for all ranks
        barrier()
        if not self.dist.is_main:
            self.train_set = open_dataset(cfg, "train", prepare=False)
        self.val_set = open_dataset(cfg, "val", prepare=False)
        self.meta = self.train_set.meta
        self.results = self._load_results()
        self.writer = self._tensorboard()

    # ----------------------------------------------------------------- run directory
    def _check_saved_config(self) -> None:
        path = self.run_dir / "config.yaml"
        current = to_dict(self.cfg)
        if path.exists():
            import yaml

            saved = yaml.safe_load(path.read_text())
            diff = config_differences(saved, current)
            if diff:
                raise ValueError(
                    f"run directory {self.run_dir} was started with a different config "
                    f"(differing keys: {', '.join(diff)}); use another name= or the saved config"
                )
        from ..config import to_yaml

        ckpt.write_text(path, to_yaml(self.cfg))

    def _load_results(self) -> dict:
        path = self.run_dir / "results.json"
        if path.exists():
            import json

            results = json.loads(path.read_text())
            # keep only steps whose checkpoint exists (the results file is written after it)
            results["steps"] = [s for s in results["steps"] if self._final_ckpt(s["step"]).exists()]
            return results
        return {
            "format": 1,
            "seed": self.cfg.seed,
            "config": to_dict(self.cfg),
            "versions": versions(),
            "method": self.method.name,
            "weights": self.weights,
            "task": {"dataset": self.task.dataset, "name": self.task.name, "steps": self.task.steps,
                     "order": list(self.task.order), "setting": self.cfg.data.setting},
            "class_names": list(self.meta.class_names),
            "steps": [],
        }

    def _tensorboard(self):
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # a dependency since issue 14: only a broken install lacks it
            print(f"ucdseg: warning: TensorBoard logging is off ({exc}); install it with "
                  f"`pip install tensorboard` to log to {self.run_dir / 'tensorboard'}", file=sys.stderr)
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _final_ckpt(self, step: int) -> Path:
        return self.ckpt_dir / f"step{step}.pt"

    def _partial_ckpt(self, step: int) -> Path:
        return self.ckpt_dir / f"step{step}-last.pt"

    # ----------------------------------------------------------------- building blocks
    def _pretrained(self) -> str | None:
        """``model.pretrained``, with ``embedded`` made (once, by rank 0) and resolved to its file."""
        value = self.cfg.model.pretrained
        if value != EMBEDDED_PRETRAINED:
            return value
        if self.dist.is_main:
            pretrain_embedded_backbone(self.cfg.model.backbone, progress=self.progress)
        barrier()
        return str(pretrain_embedded_backbone(self.cfg.model.backbone, progress=False))

    def _model(self, step: int) -> torch.nn.Module:
        pretrained = self._pretrained() if step == 0 else None
        return build_model(self.cfg.model.backbone, self.train_task.classes_per_step[: step + 1],
                           output_stride=self.cfg.model.output_stride, pretrained=pretrained).to(self.device)

    def _train_data(self, step: int):
        index = step_index(self.train_set, self.train_task, self.cfg.data.setting, step,
                           cache_dir=self.cfg.data.cache_dir, seed=self.cfg.seed, progress=self.progress)
        transform = train_transforms(self.cfg.data.crop_size, scale=(self.cfg.data.scale_min, self.cfg.data.scale_max))
        lut = label_maps.train_lut(self.train_task, step)
        return SeededSamples(StepDataset(self.train_set, index.indices, lut, transform)), index

    def _loader(self, dataset, sampler) -> DataLoader:
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.cfg.data.workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _amp(self) -> torch.dtype | None:
        return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.cfg.train.amp]

    # ----------------------------------------------------------------- the steps
    def run(self) -> dict:
        done = {s["step"] for s in self.results["steps"]}
        for step in range(self.train_task.num_steps):
            if step in done:
                continue
            if step == 0 and self.cfg.train.step0_from:
                self._reuse_step0(Path(self.cfg.train.step0_from))
            else:
                self.train_step(step)
        if self.dist.is_main:
            from .. import reporting

            reporting.write_run_reports(self.results, self.run_dir)
        if self.writer is not None:
            self.writer.close()
        return self.results

    def _reuse_step0(self, source: Path) -> None:
        """Take step 0 from another run with the same data, task and model (as papers share it)."""
        import json
        import shutil

        results = json.loads((source / "results.json").read_text())
        theirs, ours = results["config"], to_dict(self.cfg)
        diff = [k for k in config_differences(theirs, ours)
                if k == "seed" or k.split(".")[0] in ("data", "task", "model") or k in STEP0_TRAIN_KEYS]
        if diff:
            raise ValueError(f"train.step0_from={source}: its step 0 was trained with different settings ({', '.join(diff)})")
        if self.method.joint or results["steps"][0]["classes"] != self.train_task.steps[0]:
            raise ValueError(f"train.step0_from={source}: its step 0 has classes {results['steps'][0]['classes']}, "
                             f"this run's step 0 needs {self.train_task.steps[0]}; joint runs cannot share step 0")
        if self.dist.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            with ckpt.atomic_path(self._final_ckpt(0)) as tmp:
                shutil.copyfile(source / "checkpoints" / "step0.pt", tmp)
            self.results["steps"].append(results["steps"][0])
            ckpt.write_json(self.run_dir / "results.json", self.results)
        barrier()

    def train_step(self, step: int) -> dict:
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(cfg.seed * 1000 + step)
        model = self._model(step)
        old_model = None
        if step > 0:
            previous = ckpt.load_checkpoint(self._final_ckpt(step - 1), map_location=self.device)["model"]
            old_model = self._model(step - 1)
            old_model.load_state_dict(previous)
            old_model.eval().requires_grad_(False)
            load_previous_step(model, previous)
            model.init_new_classifier(self.method.classifier_init)
        if dist.enabled and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.preserve_format
        if cfg.train.channels_last:  # parameters keep their identity: the optimizer below sees them
            model.to(memory_format=memory_format)
            if old_model is not None:
                old_model.to(memory_format=memory_format)

        train_data, index = self._train_data(step)
        first = step == 0
        epochs = cfg.train.epochs if first or cfg.train.epochs_next is None else cfg.train.epochs_next
        iters = cfg.train.iterations if first or cfg.train.iterations_next is None else cfg.train.iterations_next
        total = num_iterations(len(train_data), cfg.train.batch_size, epochs, iters)
        lr = cfg.train.lr if first else cfg.train.lr_next
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.train.momentum,
                                    nesterov=cfg.train.nesterov, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: (1 - min(it, total) / total) ** cfg.train.poly_power)
        amp_dtype = self._amp()
        scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)

        start = 0
        partial = self._partial_ckpt(step)
        if partial.exists():
            state = ckpt.load_checkpoint(partial, map_location=self.device)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
            start = state["iteration"]

        ddp_model = DistributedDataParallel(model) if dist.enabled else model
        # the training forward may be compiled; ``model`` itself stays plain for state_dict
        # (no ``_orig_mod.`` key prefix), checkpoints and evaluation
        forward = ddp_model
        if cfg.train.compile:
            import torch._dynamo as dynamo

            dynamo.reset()  # the previous step's graphs are of no use; keep clear of the recompile limit
            forward = torch.compile(ddp_model)
        sampler = StepBatchSampler(len(train_data), cfg.train.batch_size, total, seed=cfg.seed * 1000 + step,
                                   start=start, rank=dist.rank, world_size=dist.world_size)
        state: dict = {}
        if old_model is not None and self.method.before_step is not None:
            state = self.method.before_step(
                old_model=old_model, loader=self._loader(train_data, StepBatchSampler(
                    len(train_data), cfg.train.batch_size, num_iterations(len(train_data), cfg.train.batch_size, 1, None),
                    seed=cfg.seed * 1000 + step, rank=dist.rank, world_size=dist.world_size)),
                device=self.device, num_old=sum(self.train_task.classes_per_step[:step]),
                num_new=self.train_task.classes_per_step[step], progress=self.progress and dist.is_main)

        num_old = sum(self.train_task.classes_per_step[:step])
        num_new = self.train_task.classes_per_step[step]
        t0 = time.perf_counter()
        ddp_model.train()
        bar = tqdm(self._loader(train_data, sampler), total=total, initial=start, desc=f"step {step} train",
                   disable=not (self.progress and dist.is_main), dynamic_ncols=True)
        for it, (images, labels) in enumerate(bar, start=start):
            images = images.to(self.device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None), \
                    _compile_errors(cfg.train.compile):
                out = forward(images)
                old = None
                if old_model is not None:
                    with torch.no_grad():
                        old = old_model(images)
            ctx = LossContext(step, _float(out), None if old is None else _float(old), labels, num_old, num_new,
                              options=cfg.method, state=state)
            terms = self.method.losses(ctx, self.weights)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at step {step}, iteration {it} "
                    f"(terms: {', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
                    f"the last good checkpoint is kept in {self.ckpt_dir}")
            optimizer.zero_grad(set_to_none=True)
            with _compile_errors(cfg.train.compile):
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if (it + 1) % cfg.train.log_every == 0 or it + 1 == total:
                values = {k: v.item() for k, v in terms.items()}
                bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in values.items()})
                if self.writer is not None:
                    self.writer.add_scalar(f"step{step}/loss", loss.item(), it + 1)
                    for k, v in values.items():
                        self.writer.add_scalar(f"step{step}/{k}", v, it + 1)
                    self.writer.add_scalar(f"step{step}/lr", scheduler.get_last_lr()[0], it + 1)
            if cfg.train.checkpoint_every and (it + 1) % cfg.train.checkpoint_every == 0 and it + 1 < total:
                if dist.is_main:
                    ckpt.save_checkpoint(partial, {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                        "rng": torch.get_rng_state(), "iteration": it + 1, "step": step})
                barrier()
        bar.close()
        train_seconds = time.perf_counter() - t0
        if cfg.train.channels_last:  # evaluate and save in the default layout, as without the option
            model.to(memory_format=torch.contiguous_format)

        record = evaluate_step(model, cfg, self.train_task, len(self.task.steps[0]), self.val_set, step, dist,
                               self.progress, amp_dtype, predictions=self.run_dir / "predictions" / f"step{step}.png")
        record.update(num_train_images=len(index.indices), index_checksum=index.checksum, iterations=total,
                      train_seconds=round(train_seconds, 2))
        if dist.is_main:
            ckpt.save_checkpoint(self._final_ckpt(step), {
                "model": model.state_dict(), "step": step, "config": to_dict(cfg),
                "classes_per_step": self.train_task.classes_per_step[: step + 1]})
            self.results["steps"].append(record)
            ckpt.write_json(self.run_dir / "results.json", self.results)
            partial.unlink(missing_ok=True)
            if self.writer is not None:
                for conv, groups in record["miou"].items():
                    for group, value in groups.items():
                        if value is not None:
                            self.writer.add_scalar(f"miou_{conv}/{group}", value, step)
        barrier()
        return record


def val_dataset(cfg: RunConfig, task: Task, val_set, step: int) -> StepDataset:
    """All validation images, labelled for evaluation after ``step`` (unseen classes ignored)."""
    lut = label_maps.eval_lut(task, step, ignore_background=val_set.meta.ignore_background_in_eval)
    return StepDataset(val_set, range(len(val_set)), lut, eval_transforms(cfg.data.eval_crop_size))


def evaluate_step(model: torch.nn.Module, cfg: RunConfig, task: Task, num_base: int, val_set, step: int,
                  dist: Dist, progress: bool = True, amp_dtype: torch.dtype | None = None,
                  predictions: Path | None = None) -> dict:
    """Evaluate ``model`` after ``step``: per-class IoU, mIoU old/new/all (both conventions), accuracy.

    ``num_base`` is the number of step-0 classes of the benchmark's task (background included):
    the classes reported as *old*.
    """
    val = val_dataset(cfg, task, val_set, step)
    indices = list(range(dist.rank, len(val), dist.world_size))
    loader = DataLoader(Subset(val, indices), batch_size=cfg.eval.batch_size, num_workers=cfg.data.workers)
    seen = task.seen(step)
    cm = evaluate(model, loader, len(seen), dist.device, progress=progress and dist.is_main, amp_dtype=amp_dtype)
    iou = cm.iou()
    meta = val_set.meta
    record = {
        "step": step,
        "classes": task.steps[step],
        "seen": seen,
        "per_class_iou": {meta.class_names[c]: (None if np.isnan(v) else v) for c, v in zip(seen, iou)},
        "miou": miou_summary(iou, num_base, len(seen), score_background=not meta.ignore_background_in_eval),
        "pixel_accuracy": cm.pixel_accuracy(),
    }
    if dist.is_main and predictions is not None and cfg.eval.num_images:
        from .. import reporting

        reporting.write_predictions(model, val, seen, meta.palette, dist.device, predictions,
                                    num_images=cfg.eval.num_images)
    return record


def run(cfg: RunConfig, progress: bool = True) -> dict:
    """Run (or continue) every step of ``cfg``'s task; returns the results dictionary."""
    return Trainer(cfg, progress=progress).run()
