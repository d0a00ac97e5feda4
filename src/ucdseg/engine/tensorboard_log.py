"""What a run logs to TensorBoard beside the per-iteration losses (``tensorboard --logdir runs``).

* ``config`` (Text tab): the resolved config as YAML, once per session;
* ``per_class_iou/<class>`` (Scalars): each class's IoU after every step (x axis: the step), so a
  class's forgetting is one curve;
* ``predictions`` (Images): the run's prediction figure of each trained step
  (``predictions/stepN.png``: the first ``eval.num_images`` validation images, the same ones at
  every step, with their ground truth and prediction), the slider being the step.

The mIoU groups per step (``miou_<convention>/<group>``) and the iteration scalars are written by
the runner and the loop (:mod:`.runner`, :mod:`.loop`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..config import RunConfig, to_yaml

__all__ = ["log_config", "log_step", "tag"]


def tag(name: str) -> str:
    """A class name as a TensorBoard tag part: ``/`` would open a sub-group (``T-shirt/top``)."""
    return name.replace("/", "_").replace(" ", "_")


def open_writer(run_dir: Path, cfg: RunConfig):
    """The run's SummaryWriter (``run_dir/tensorboard``, with the config logged), or None with a
    warning when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # a dependency since issue 14: only a broken install lacks it
        print(f"ucdseg: warning: TensorBoard logging is off ({exc}); install it with "
              f"`pip install tensorboard` to log to {run_dir / 'tensorboard'}", file=sys.stderr)
        return None
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    log_config(writer, cfg)
    return writer


def log_config(writer, cfg: RunConfig) -> None:
    """The resolved config as a text summary (indented: TensorBoard renders text as Markdown)."""
    if writer is None:
        return
    writer.add_text("config", "\n".join("    " + line for line in to_yaml(cfg).splitlines()), 0)


def log_step(writer, record: dict, predictions: Path | None = None) -> None:
    """Per-class IoU of a finished step and, when the step drew it, its prediction figure."""
    if writer is None or record is None:
        return
    step = record["step"]
    for name, value in record["per_class_iou"].items():
        if value is not None:
            writer.add_scalar(f"per_class_iou/{tag(name)}", value, step)
    if predictions is not None and predictions.is_file():
        from PIL import Image

        with Image.open(predictions) as image:
            array = np.asarray(image.convert("RGB"))
        writer.add_image("predictions", array, step, dataformats="HWC")
    writer.flush()
