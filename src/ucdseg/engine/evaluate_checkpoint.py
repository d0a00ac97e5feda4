"""``ucdseg eval``: evaluate a step checkpoint written by a run."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from ..config import ConfigError, from_dict
from ..methods import get_method
from ..models import build_model
from .. import io as ckpt
from .distributed import setup
from .trainer import build_task, evaluate_step, joint_task, open_dataset


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = (), progress: bool = True) -> dict:
    """Rebuild the model of ``path`` from the config saved in it and evaluate it after its step.

    ``overrides`` (``key=value``) may point to the data elsewhere (``data.root=DIR``) or change
    evaluation settings; they must not change the model or the task.
    """
    state = ckpt.load_checkpoint(path)
    if "config" not in state or "step" not in state:
        raise ValueError(f"checkpoint {path} is a mid-step checkpoint; evaluate a finished step's stepN.pt")
    saved = OmegaConf.create(state["config"])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0]
        if key.split(".")[0] in ("model", "task", "method"):
            raise ConfigError(f"override {key!r} would change the checkpoint's model or task")
    cfg = from_dict(OmegaConf.to_container(OmegaConf.merge(saved, OmegaConf.from_dotlist(list(overrides)))))
    dist = setup(cfg.device)
    task = build_task(cfg)
    train_task = joint_task(task) if get_method(cfg.method.name).joint else task
    step = int(state["step"])
    model = build_model(cfg.model.backbone, state["classes_per_step"], output_stride=cfg.model.output_stride)
    model.load_state_dict(state["model"])
    model.to(dist.device)
    val_set = open_dataset(cfg, "val", prepare=False)
    return evaluate_step(model, cfg, train_task, len(task.steps[0]), val_set, step, dist, progress)
