"""``ucdseg predict``: segment your own images with a step checkpoint.

``predict(checkpoint, inputs, output)`` rebuilds the model of a ``checkpoints/stepN.pt`` written by
``ucdseg run`` (its config, step and classes per step are saved in it), segments every image of
``inputs`` (image files and folders of images) and writes into ``output``:

* ``masks/<image stem>.png``: the predicted dataset class ids as a palette PNG (the dataset's
  colours; open it in any viewer, or read the ids with ``numpy.array(Image.open(f))``);
* ``overlays/<image stem>.png``: the image with the coloured prediction on top and a legend of
  the classes present with their pixel share;
* ``summary.csv``: one row per (image, class present): ``image, width, height, class_id,
  class_name, pixels, share``, classes of an image by decreasing share.

Class names and colours come from the checkpoint when it carries them (``class_names``,
``palette``), else from the dataset named in its saved config (the built-in datasets' tables, or
a folder dataset's ``classes.yaml`` in its ``data.root``). Model channel ``k`` is mapped back to
the dataset class id of position ``k`` in the task's steps, so the ids in the masks are the
dataset's whatever the class order of the run.

Images are segmented at their own size (``size=S`` resizes the shorter side to ``S`` for the
model and upsamples the logits back), in batches of images of the same size (padding would
change every prediction through DeepLab's image-pooling branch), on CPU or GPU.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .figures import palette_png

__all__ = ["IMAGE_SUFFIXES", "CheckpointClasses", "checkpoint_classes", "load_predictor", "find_images",
           "predict", "palette_png", "overlay_figure"]

#: File suffixes taken from a folder (a file named explicitly may have any suffix PIL reads).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SUMMARY_HEADER = ["image", "width", "height", "class_id", "class_name", "pixels", "share"]


@dataclass(frozen=True)
class CheckpointClasses:
    """What a checkpoint's output channels mean."""

    ids: list[int]  # dataset class id of each model output channel
    class_names: list[str]  # dataset space: index = class id
    palette: list[tuple[int, int, int]]  # dataset space


def _state_config(state: dict, path: Path):
    from .config import ConfigError, from_dict

    missing = [k for k in ("config", "step", "classes_per_step") if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} has no {', '.join(missing)}: expected a finished step's "
                         "checkpoints/stepN.pt written by `ucdseg run` (not a mid-step stepN-last.pt)")
    try:
        return from_dict(state["config"])
    except ConfigError as exc:
        raise ValueError(f"checkpoint {path}: its saved config is not valid here: {exc}") from None


def _dataset_classes(cfg, path: Path) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Class names and palette of the checkpoint's dataset, when the checkpoint does not carry them."""
    from .data import dataset_meta

    try:
        meta = dataset_meta(cfg.data.dataset, cfg.data.root)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"checkpoint {path} does not carry its class names and they could not be read from its "
                         f"dataset: {exc}") from None
    return list(meta.class_names), [tuple(int(v) for v in c) for c in meta.palette]


def checkpoint_classes(state: dict, path: str | Path) -> CheckpointClasses:
    """The dataset class id, name and colour of every output channel of a step checkpoint."""
    from .tasks import TaskError, get_task

    path = Path(path)
    cfg = _state_config(state, path)
    if "class_names" in state:
        names = [str(n) for n in state["class_names"]]
        palette = state.get("palette")
        if palette is None:
            from .data.meta import default_palette

            palette = default_palette(len(names))
        palette = [tuple(int(v) for v in c) for c in palette]
    else:
        names, palette = _dataset_classes(cfg, path)
    order = cfg.task.order if cfg.task.order is not None else cfg.task.order_seed
    try:
        task = get_task(cfg.data.dataset, cfg.task.name, order=order, num_classes=len(names) - 1)
    except TaskError as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from None
    per_step = [int(n) for n in state["classes_per_step"]]
    step = int(state["step"])
    expected = task.classes_per_step[: step + 1]
    if per_step != expected and per_step != [sum(task.classes_per_step)]:  # joint training: one step
        raise ValueError(f"checkpoint {path}: classes_per_step {per_step} do not match step {step} of task "
                         f"{task.name} on {cfg.data.dataset} ({expected})")
    flat = [c for s in task.steps for c in s]
    return CheckpointClasses(ids=flat[: sum(per_step)], class_names=names, palette=palette)


def load_predictor(path: str | Path, device: str | torch.device = "cpu", with_rule: bool = False):
    """``(model in eval mode on device, CheckpointClasses)`` of a step checkpoint; ``with_rule``:
    and the inference rule of its method (logits -> model-space ids)."""
    from .io import load_checkpoint
    from .methods import get_method
    from .models import build_model

    path = Path(path)
    try:
        state = load_checkpoint(path, map_location="cpu")
    except ValueError as exc:  # torch's reasons span several lines
        raise ValueError(str(exc).splitlines()[0].rstrip(" .:") + "; expected a checkpoints/stepN.pt written by "
                         "`ucdseg run`") from None
    classes = checkpoint_classes(state, path)
    cfg = _state_config(state, path)
    method = get_method(cfg.method.name)
    model = build_model(cfg.model.backbone, [int(n) for n in state["classes_per_step"]],
                        output_stride=cfg.model.output_stride, spec=method.model,
                        first_block_dilation=cfg.model.first_block_dilation)
    weights = dict(state["model"])
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ValueError(f"checkpoint {path}: its weights do not fit a {cfg.model.backbone} model with "
                         f"classes_per_step {state['classes_per_step']}: {first}") from None
    if with_rule:
        return model.to(device).eval(), classes, method.predict
    return model.to(device).eval(), classes


# ------------------------------------------------------------------------------------ inputs
def _check_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image file; one clear error if it is not an image."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not an image file PIL can read ({type(exc).__name__}); expected a "
                         f"JPEG, PNG or other image") from None


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named by ``inputs`` (files, and the image files directly inside folders)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(f"no image file in folder {path} (looked for {', '.join(IMAGE_SUFFIXES)})")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"image or folder not found: {path}")
    if not found:
        raise ValueError("no image given: expected image files or folders of images")
    stems: dict[str, Path] = {}
    for path in found:
        if path.stem in stems:
            raise ValueError(f"{stems[path.stem]} and {path} would write the same output name {path.stem!r}; "
                             "predict them in separate runs")
        stems[path.stem] = path
    return found


# ----------------------------------------------------------------------------------- outputs
def _shares(mask: np.ndarray) -> list[tuple[int, int, float]]:
    """(class id, pixels, share) of the classes present, by decreasing share."""
    counts = np.bincount(mask.ravel(), minlength=256)
    present = sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c))
    return [(int(c), int(counts[c]), float(counts[c]) / mask.size) for c in present]


def overlay_figure(image: Image.Image, mask: np.ndarray, classes: CheckpointClasses, title: str = ""):
    """A matplotlib figure: the image, the coloured mask at half opacity, a legend of the classes present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .data.meta import colorize

    width, height = image.size
    scale = min(1.0, 1024 / max(width, height))
    fig = plt.figure(figsize=(max(width * scale, 320) / 100, max(height * scale, 240) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.asarray(image))
    ax.imshow(colorize(mask, classes.palette), alpha=0.5)
    ax.set_axis_off()
    handles = [Patch(facecolor=np.asarray(classes.palette[c]) / 255, edgecolor="black",
                     label=f"{classes.class_names[c]} ({100 * share:.1f}%)") for c, _, share in _shares(mask)]
    legend = ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.8)
    if title:
        legend.set_title(title, prop={"size": 8})
    return fig


def _save_png(image: Image.Image, path: Path) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    from .io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


# ------------------------------------------------------------------------------------ predict
def _model_size(image_size: tuple[int, int], size: Optional[int]) -> tuple[int, int]:
    """(width, height) the model sees: the image's, or its shorter side resized to ``size``."""
    if size is None:
        return image_size
    width, height = image_size
    factor = size / min(width, height)
    return max(1, round(width * factor)), max(1, round(height * factor))


def _to_tensor(image: Image.Image, size: Optional[int]) -> torch.Tensor:
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

    if size is not None:
        image = image.resize(_model_size(image.size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def _batches(sizes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of images of one size, in input order within each size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    return [idx[k: k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available here; use --device cpu")
    return torch.device(name)


def predict(checkpoint: str | Path, inputs: Sequence[str | Path], output: str | Path, batch_size: int = 4,
            device: str = "auto", size: Optional[int] = None, overlays: bool = True,
            progress: bool = True) -> list[dict]:
    """Segment the images of ``inputs`` with ``checkpoint``; write masks, overlays and summary.csv.

    Returns the summary rows (as written to ``output/summary.csv``).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    paths = find_images(inputs)
    sizes = [_check_image(p) for p in paths]  # every input is checked before the model runs
    dev = _device(device)
    model, classes, rule = load_predictor(checkpoint, dev, with_rule=True)
    lut = torch.tensor(classes.ids, dtype=torch.uint8)
    out = Path(output)
    input_sizes = [_model_size(s, size) for s in sizes]
    rows: dict[int, list[dict]] = {}
    bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress)
    with torch.inference_mode():
        for batch in _batches(input_sizes, batch_size):
            images = [Image.open(paths[i]).convert("RGB") for i in batch]
            x = torch.stack([_to_tensor(im, size) for im in images]).to(dev)
            logits = model(x).logits
            for j, i in enumerate(batch):
                width, height = sizes[i]
                scores = logits[j: j + 1]
                if scores.shape[-2:] != (height, width):
                    scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
                mask = lut[rule(scores)[0].cpu()].numpy()
                name = paths[i].stem
                _save_png(palette_png(mask, classes.palette), out / "masks" / f"{name}.png")
                if overlays:
                    _save_figure(overlay_figure(images[j], mask, classes, title=paths[i].name),
                                 out / "overlays" / f"{name}.png")
                rows[i] = [{"image": str(paths[i]), "width": width, "height": height, "class_id": c,
                            "class_name": classes.class_names[c], "pixels": n, "share": f"{share:.6f}"}
                           for c, n, share in _shares(mask)]
                bar.update(1)
    bar.close()
    ordered = [row for i in range(len(paths)) for row in rows[i]]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_HEADER, lineterminator="\n")
    writer.writeheader()
    writer.writerows(ordered)
    from .io import write_text

    write_text(out / "summary.csv", text.getvalue())
    return ordered
