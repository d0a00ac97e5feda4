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
from ..config import RunConfig, from_dict, to_dict
from ..data import StepDataset, build_dataset, eval_transforms, prepare_embedded, train_transforms
from ..data.embedded import default_root as default_embedded_root
from ..data.index import scan_presence, step_index
from ..methods import LossContext, get_method
from ..models import EMBEDDED_PRETRAINED, build_model, load_previous_step, pretrain_embedded_backbone
from ..tasks import Task, get_task
from .. import io as ckpt
from .distributed import Dist, barrier, setup
from .evaluate import evaluate
from .metrics import average_over_steps, miou_summary
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
                                           "weight_decay", "poly_power", "amp", "bn", "accumulate")}


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
    """Keys whose values differ; a key missing from a config (saved before the key existed) has
    its default value."""
    defaults = _flatten(to_dict(RunConfig()))
    fa, fb = defaults | _flatten(a), defaults | _flatten(b)
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """``train.bn=frozen``: every BatchNorm layer in eval mode, so it normalises with its running
    statistics and never updates them; its affine weight and bias are still trained."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def distributed_notes(cfg: RunConfig, weights: dict, dist: Dist) -> list[str]:
    """Warning lines for a run of several processes or micro-batches (printed by rank 0 only)."""
    if not dist.is_main:
        return []
    notes = []
    micro = cfg.train.batch_size // dist.world_size // cfg.train.accumulate
    if weights.get("ucd") and cfg.train.accumulate > 1:
        notes.append(f"ucdseg: warning: train.accumulate={cfg.train.accumulate}: UCD contrasts each pixel with the "
                     f"pixels of its micro-batch ({micro} images{' per process' if dist.enabled else ''}) only, "
                     "not with the whole batch")
    if not dist.enabled:
        return notes
    if weights.get("ucd") and not cfg.method.ucd_gather:
        notes.append(f"ucdseg: warning: {dist.world_size} processes and method.ucd_gather=false: UCD contrasts each "
                     f"pixel with its own process's {micro} images only, so the result depends on the "
                     "number of processes (method.ucd_gather=true contrasts with the global batch)")
    if cfg.train.bn == "sync" and dist.device.type != "cuda":
        notes.append(f"ucdseg: warning: train.bn=sync: SyncBatchNorm needs CUDA; on {dist.device.type} each of the "
                     f"{dist.world_size} processes normalises with its own batch statistics (as train.bn=local)")
    return notes


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
        per_process, accumulate = cfg.train.batch_size // self.dist.world_size, cfg.train.accumulate
        if cfg.train.batch_size % self.dist.world_size or per_process % accumulate:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} does not split into {self.dist.world_size} "
                             f"process(es) x train.accumulate={accumulate} equal micro-batches")
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
        if cfg.eval.images == "seen":  # the validation images' classes, scanned once for every rank
            if self.dist.is_main:
                scan_presence(self.val_set, cache_dir=cfg.data.cache_dir, progress=progress)
            barrier()
        self.meta = self.train_set.meta
        self.results = self._load_results()
        self.writer = self._tensorboard()
        for note in distributed_notes(cfg, self.weights, self.dist):
            print(note, file=sys.stderr, flush=True)

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

    def _add_step(self, record: dict) -> None:
        """Append a finished step to ``results.json``, with the average over the steps so far."""
        self.results["steps"].append(record)
        self.results["avg"] = average_over_steps(self.results["steps"])
        ckpt.write_json(self.run_dir / "results.json", self.results)

    def _logged_values(self, loss: torch.Tensor, terms: dict) -> dict[str, float]:
        """The total loss and its terms, averaged over the processes: under DDP the quantity whose
        gradient is applied (each process's value alone is a mean over its slice of the batch)."""
        values = torch.stack([loss.detach(), *(v.detach() for v in terms.values())]).float()
        if self.dist.enabled:
            torch.distributed.all_reduce(values)
            values /= self.dist.world_size
        return dict(zip(["loss", *terms], values.tolist()))

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
        """Take step 0 from another run with the same data, task and model (as papers share it):
        its run directory (step 0's checkpoint and record are copied) or a step-0 checkpoint file
        (copied, and evaluated here for step 0's record)."""
        import json
        import shutil

        if source.is_file():
            state = ckpt.load_checkpoint(source)
            if "config" not in state or state.get("step") != 0 or "classes_per_step" not in state:
                raise ValueError(f"train.step0_from={source}: not a step-0 checkpoint written by ucdseg (it has "
                                 f"{'step ' + str(state['step']) if 'step' in state else 'no step or config'}); "
                                 "give a run directory or its checkpoints/step0.pt")
            self._check_step0_source(source, state["config"], _step0_classes(source, state["config"]), eval_keys=False)
            checkpoint, model = source, self._check_step0_weights(source, state["model"])
            record = evaluate_step(model, self.cfg, self.train_task, len(self.task.steps[0]), self.val_set, 0,
                                   self.dist, self.progress, self._amp())
            record["step0_from"] = str(source)
        elif (source / "results.json").is_file():
            results = json.loads((source / "results.json").read_text())
            self._check_step0_source(source, results["config"], results["steps"][0]["classes"], eval_keys=True)
            checkpoint, record = source / "checkpoints" / "step0.pt", results["steps"][0]
            self._check_step0_weights(source, ckpt.load_checkpoint(checkpoint, map_location=self.device)["model"])
        else:
            raise FileNotFoundError(f"train.step0_from={source}: neither a checkpoint file nor a run directory "
                                    "(with results.json)")
        if self.dist.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            with ckpt.atomic_path(self._final_ckpt(0)) as tmp:
                shutil.copyfile(checkpoint, tmp)
            self._add_step(record)
        barrier()

    def _check_step0_source(self, source: Path, theirs: dict, their_classes: list[int], eval_keys: bool) -> None:
        """Same seed, data, task, model and step-0 training settings (and, when step 0's record is
        copied rather than measured here, the same evaluation conventions); same step-0 classes."""
        keys = STEP0_TRAIN_KEYS | ({"eval.images", "eval.unseen"} if eval_keys else set())
        diff = [k for k in config_differences(theirs, to_dict(self.cfg))
                if k == "seed" or k.split(".")[0] in ("data", "task", "model") or k in keys]
        if diff:
            raise ValueError(f"train.step0_from={source}: its step 0 was trained with different settings ({', '.join(diff)})")
        their_method = get_method(theirs.get("method", {}).get("name", "ft"))
        if their_method.first_step != self.method.first_step:
            raise ValueError(f"train.step0_from={source}: its step 0 was trained by {their_method.name} with the "
                             f"{their_method.first_step} loss, {self.method.name} trains step 0 with "
                             f"{self.method.first_step}; it cannot be shared")
        if self.method.joint or their_classes != self.train_task.steps[0]:
            raise ValueError(f"train.step0_from={source}: its step 0 has classes {their_classes}, "
                             f"this run's step 0 needs {self.train_task.steps[0]}; joint runs cannot share step 0")

    def _check_step0_weights(self, source: Path, weights: dict) -> torch.nn.Module:
        """This run's step-0 model holding ``weights`` (all of them, with the same shapes)."""
        model = build_model(self.cfg.model.backbone, self.train_task.classes_per_step[:1],
                            output_stride=self.cfg.model.output_stride).to(self.device)
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
            raise ValueError(f"train.step0_from={source}: its weights do not fit this run's step-0 model "
                             f"({self.cfg.model.backbone}, {self.train_task.classes_per_step[0]} classes): {first}") from None
        return model

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
        if cfg.train.bn == "sync" and dist.enabled and self.device.type == "cuda":
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
        if cfg.train.bn == "frozen":
            freeze_batchnorm(model)
        bar = tqdm(self._loader(train_data, sampler), total=total, initial=start, desc=f"step {step} train",
                   disable=not (self.progress and dist.is_main), dynamic_ncols=True)
        accumulate = cfg.train.accumulate
        for it, (images, labels) in enumerate(bar, start=start):
            images = images.to(self.device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(self.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logged: dict[str, torch.Tensor] = {}
            # train.accumulate=N: the process's images in N equal micro-batches, each loss divided by
            # N, the gradients summed; DDP all-reduces once, after the last micro-batch's backward
            for micro, (x, y) in enumerate(zip(images.chunk(accumulate), labels.chunk(accumulate))):
                last = micro == accumulate - 1
                with (ddp_model.no_sync() if dist.enabled and not last else contextlib.nullcontext()):
                    with torch.autocast(self.device.type, dtype=amp_dtype or torch.bfloat16,
                                        enabled=amp_dtype is not None), _compile_errors(cfg.train.compile):
                        out = forward(x)
                        old = None
                        if old_model is not None:
                            with torch.no_grad():
                                old = old_model(x)
                    ctx = LossContext(step, _float(out), None if old is None else _float(old), y, num_old, num_new,
                                      options=cfg.method, state=state)
                    terms = self.method.losses(ctx, self.weights)
                    loss = sum(terms.values())
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"loss is {loss.item()} at step {step}, iteration {it} "
                            f"(terms: {', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
                            f"the last good checkpoint is kept in {self.ckpt_dir}")
                    with _compile_errors(cfg.train.compile):
                        scaler.scale(loss / accumulate).backward()
                for k, v in {"loss": loss, **terms}.items():
                    logged[k] = logged.get(k, 0) + v.detach() / accumulate
            loss, terms = logged.pop("loss"), logged
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if (it + 1) % cfg.train.log_every == 0 or it + 1 == total:
                values = self._logged_values(loss, terms)
                bar.set_postfix(**{k: f"{v:.3f}" for k, v in values.items()})
                values.update(_diagnostics(ctx))
                if self.writer is not None:
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
                      train_seconds=round(train_seconds, 2), world_size=dist.world_size,
                      batch_per_process=cfg.train.batch_size // dist.world_size, accumulate=cfg.train.accumulate)
        if dist.is_main:
            ckpt.save_checkpoint(self._final_ckpt(step), {
                "model": model.state_dict(), "step": step, "config": to_dict(cfg),
                "classes_per_step": self.train_task.classes_per_step[: step + 1],
                # dataset space (index = class id), so ``ucdseg predict`` needs nothing else
                "class_names": list(self.meta.class_names), "palette": [list(c) for c in self.meta.palette]})
            self._add_step(record)
            partial.unlink(missing_ok=True)
            if self.writer is not None:
                for conv, groups in record["miou"].items():
                    for group, value in groups.items():
                        if value is not None:
                            self.writer.add_scalar(f"miou_{conv}/{group}", value, step)
        barrier()
        return record


def _step0_classes(source: Path, config: dict) -> list[int]:
    """The classes (dataset ids, model order) of the step 0 that ``config`` trained."""
    try:
        cfg = from_dict(config)
        task = build_task(cfg)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"train.step0_from={source}: its config cannot be read: {exc}") from None
    try:
        joint = get_method(cfg.method.name).joint
    except KeyError:  # a method registered by the user's code in the process that trained it
        joint = False
    return (joint_task(task) if joint else task).steps[0]


def _diagnostics(ctx: LossContext) -> dict[str, float]:
    """Non-loss values a method reported for the batch (``ctx.batch["diagnostics"]``), rank 0's own."""
    return {k: float(v) for k, v in ctx.batch.get("diagnostics", {}).items()}


def val_dataset(cfg: RunConfig, task: Task, val_set, step: int) -> StepDataset:
    """The validation images scored after ``step`` and their labels, by ``cfg.eval``'s conventions
    (``eval.images``, ``eval.unseen``; see :func:`ucdseg.labels.eval_images` and ``eval_lut``)."""
    lut = label_maps.eval_lut(task, step, ignore_background=val_set.meta.ignore_background_in_eval,
                              unseen=cfg.eval.unseen)
    indices: Any = range(len(val_set))
    if cfg.eval.images != "all":
        presence = scan_presence(val_set, cache_dir=cfg.data.cache_dir, progress=False)
        indices = label_maps.eval_images(presence, task, step, images=cfg.eval.images)
    return StepDataset(val_set, indices, lut, eval_transforms(cfg.data.eval_crop_size))


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
        "num_eval_images": len(val),
    }
    if dist.is_main and predictions is not None and cfg.eval.num_images:
        from .. import reporting

        reporting.write_predictions(model, val, seen, meta.palette, dist.device, predictions,
                                    num_images=cfg.eval.num_images, class_names=meta.class_names)
    return record


def run(cfg: RunConfig, progress: bool = True) -> dict:
    """Run (or continue) every step of ``cfg``'s task; returns the results dictionary."""
    return Trainer(cfg, progress=progress).run()
