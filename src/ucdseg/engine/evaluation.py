"""Evaluation, in one place: after a step of a run, and of a saved checkpoint (``ucdseg eval``).

One confusion matrix per evaluation, reduced across processes; the record of a step holds the
per-class IoU, mIoU of the old / new / all classes under both background conventions, and the
pixel accuracy (docs/protocol.md, metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import Subset
from tqdm.auto import tqdm

from .. import figures, io
from ..config import ConfigError, RunConfig, from_dict, migrate
from ..methods.method import argmax_prediction
from ..stats import miou_summary
from ..tasks import Task
from . import build
from .metrics import ConfusionMatrix
from .process_group import Dist, setup


@torch.no_grad()
def confusion_matrix(model: torch.nn.Module, loader: Iterable, num_classes: int, device: torch.device,
                     progress: bool = True, amp_dtype: torch.dtype | None = None,
                     predict: Callable[[torch.Tensor], torch.Tensor] = argmax_prediction) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over ``loader`` (targets in model space, 255 ignored), its
    logits turned into classes by the method's inference rule ``predict``, summed over the processes."""
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(images).logits
        cm.update(targets, predict(logits))
    cm.reduce_from_all_processes()
    return cm


def evaluate_step(model: torch.nn.Module, cfg: RunConfig, task: Task, num_base: int, val_set, step: int,
                  dist: Dist, progress: bool = True, predictions: Path | None = None) -> dict:
    """Evaluate ``model`` after ``step`` of ``task`` (the task it trains): per-class IoU, mIoU
    old/new/all (both conventions), accuracy.

    ``num_base`` is the number of step-0 classes of the benchmark's task (background included):
    the classes reported as *old*. ``predictions``: where rank 0 draws ``eval.num_images``
    validation images with their predictions.
    """
    val = build.val_data(cfg, task, val_set, step)
    loader = build.eval_loader(cfg, Subset(val, list(range(dist.rank, len(val), dist.world_size))))
    seen = task.seen(step)
    rule = build.build_method(cfg).predict
    cm = confusion_matrix(model, loader, len(seen), dist.device, progress=progress and dist.is_main,
                          amp_dtype=build.AMP_DTYPES[cfg.train.amp], predict=rule)
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
        figures.write_predictions(model, val, seen, meta.palette, dist.device, predictions,
                                  num_images=cfg.eval.num_images, class_names=meta.class_names, predict=rule,
                                  title=f"{cfg.name}: {cfg.method.name}, after step {step} ({task.name})")
    return record


def _check_same_classes(path: Path, state: dict, saved: dict, val_set) -> None:
    """Refuse to score a checkpoint on a dataset of other classes (``data.dataset`` or ``data.root``
    overridden): its output channels are its own classes, named here by their count."""
    theirs = state.get("class_names")
    ours = list(val_set.meta.class_names)
    if theirs is None or list(theirs) == ours:
        return
    dataset = saved.get("data", {}).get("dataset", "?")
    def shown(names) -> str:
        return f"{len(names) - 1} classes (" + ", ".join(map(str, names[1:4])) + (", ...)" if len(names) > 4 else ")")

    raise ValueError(f"checkpoint {path} was trained on {dataset} with {shown(list(theirs))}; the dataset given here "
                     f"({val_set.name} at {val_set.root}) has {shown(ours)}: evaluate it on the classes it was "
                     "trained on (its own data.dataset and data.root)")


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = (), progress: bool = True,
                        save_predictions: str | Path | None = None) -> dict:
    """Rebuild the model of the step checkpoint ``path`` from the config saved in it and evaluate
    it after its step.

    ``overrides`` (``key=value``) may point to the data elsewhere (``data.root=DIR``) or change
    evaluation settings; they must not change the model or the task. ``save_predictions``: a
    folder where every validation image's prediction is written as a palette PNG
    (:mod:`.export`; the record's ``saved_predictions`` counts them).
    """
    path = Path(path)
    if path.is_dir():
        found = sorted((path / "checkpoints").glob("step[0-9]*.pt")) if (path / "checkpoints").is_dir() else []
        raise io.FileError(f"checkpoint {path} is a folder; give a step checkpoint file"
                           + (f", e.g. {found[-1]}" if found else " such as RUN/checkpoints/stepN.pt"))
    state = io.load_checkpoint(path)
    if "config" not in state or "step" not in state or "classes_per_step" not in state:
        raise ValueError(f"checkpoint {path} is a mid-step checkpoint; evaluate a finished step's stepN.pt")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0]
        if key.split(".")[0] in ("model", "task", "method"):
            raise ConfigError(f"override {key!r} would change the checkpoint's model or task")
    saved = OmegaConf.create(migrate(state["config"]))
    cfg = from_dict(OmegaConf.to_container(OmegaConf.merge(saved, OmegaConf.from_dotlist(list(overrides)))))
    dist = setup(cfg.device)
    val_set = build.open_dataset(cfg, "val", prepare=False)
    _check_same_classes(path, state, migrate(state["config"]), val_set)
    task = build.build_task(cfg)
    model = build.step_model(cfg, state["classes_per_step"], dist.device)
    model.load_state_dict(state["model"])
    trained = build.training_task(cfg, task)
    record = evaluate_step(model, cfg, trained, len(task.steps[0]), val_set, int(state["step"]), dist, progress)
    if save_predictions is not None and dist.is_main:
        from .export import save_predictions as save

        record["saved_predictions"] = save(model, val_set, trained.seen(int(state["step"])), save_predictions,
                                           dist.device, progress)
    return record
