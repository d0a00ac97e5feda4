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

What it takes (:func:`read_image`; docs in README.md, "ucdseg predict"): every input is read in
full before the model runs, and anything it cannot segment faithfully is refused with one line
naming the file, before anything is written. Every mode Pillow opens becomes the RGB image the
model sees: 8-bit modes by Pillow's conversion (CMYK without a colour profile), 16-bit ones
(``I;16``, and ``I`` holding values in 0..65535) scaled to 8 bits, transparent pixels laid over
the ImageNet mean colour (what the model reads as no signal); ``F`` (floating point) and ``I``
beyond 16 bits are refused, having no fixed scale. An animated or multi-page file gives its first
frame, an EXIF orientation is applied (the mask matches the image as viewers show it); each such
choice is a ``ucdseg: note:`` line. The model sees at most ``max_pixels`` pixels at once
(:data:`MAX_PIXELS`, about 16.8 megapixels; larger images are refused with the ``--size`` that
fits), and a file beyond Pillow's decompression-bomb limit is refused. In a folder, only files
with an image suffix are taken (not hidden ones, not sub-folders): the others are listed in one
note line; an image file that is empty, truncated or not an image is refused.
"""

from __future__ import annotations

import csv
import io
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from .figures import palette_png

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "CheckpointClasses", "checkpoint_classes", "load_predictor",
           "find_images", "read_image", "predict", "palette_png", "overlay_figure"]

#: File suffixes taken from a folder (a file named explicitly may have any suffix PIL reads).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
#: The most pixels the model segments at once (``--max-pixels``): 4096 x 4096. The model runs at the
#: input's own size, so its activations' memory grows with the pixels (and the batch).
MAX_PIXELS = 4096 * 4096
#: What transparent pixels are laid over: the ImageNet mean, zero after the model's normalisation.
MEAN_COLOUR = (124, 116, 104)
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


def _check_dataset_classes(path: Path, dataset: str, names: Sequence[str]) -> None:
    """Refuse a checkpoint whose carried class ``names`` are not as many as its config's built-in
    ``dataset`` has: it is named by its own class count, which the dataset's name would belie."""
    from .tasks import DATASETS

    if dataset in DATASETS and DATASETS[dataset] != len(names) - 1:
        raise ValueError(f"checkpoint {path} carries {len(names) - 1} classes ({_listed(list(names[1:]), 4)}) and "
                         f"background, but its config names the dataset {dataset}, which has {DATASETS[dataset]}: "
                         "it is not a checkpoint of that dataset; use a checkpoint written by `ucdseg run`")


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
        _check_dataset_classes(path, cfg.data.dataset, names)
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
class ImageNotes:
    """The ``ucdseg: note:`` lines of :func:`read_image`'s choices, one line per kind of choice
    naming the images it concerns."""

    def __init__(self):
        self.files: dict[str, list[str]] = {}
        self.skipped: list[str] = []  # whole lines: what a folder holds besides its images

    def add(self, what: str, path: Path) -> None:
        names = self.files.setdefault(what, [])
        if str(path) not in names:
            names.append(str(path))

    def lines(self) -> list[str]:
        return self.skipped + [f"ucdseg: note: {_listed(names)}: {what}" for what, names in self.files.items()]


def _listed(names: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _open(path: Path) -> Image.Image:
    """The opened (not decoded) image file; an empty file, a non-image or a file beyond Pillow's
    decompression-bomb limit (:data:`PIL.Image.MAX_IMAGE_PIXELS`) is one line."""
    try:
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty (0 bytes); expected an image file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{path}: {_first_line(exc).rstrip('.')}; predict opens images of at most "
                         f"{Image.MAX_IMAGE_PIXELS} pixels (Pillow's limit): downscale it first") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image file PIL can read (UnidentifiedImageError); expected a "
                         f"JPEG, PNG or other image") from None
    except OSError as exc:
        if exc.strerror:  # the system's: permission denied, ...
            raise ValueError(f"{path} cannot be read: {exc.strerror}") from None
        raise ValueError(f"{path} cannot be decoded ({_first_line(exc)}): truncated or corrupt; expected a "
                         "complete image file") from None


def _check_pixels(path: Path, image_size: tuple[int, int], size: Optional[int], max_pixels: int) -> None:
    """Refuse an image whose model input (its size, or its ``--size`` resize) exceeds ``max_pixels``."""
    width, height = _model_size(image_size, size)
    if width * height <= max_pixels:
        return
    fits = max(1, int((max_pixels * min(image_size) / max(image_size)) ** 0.5))  # the shorter side that fits
    while fits > 1 and np.prod(_model_size(image_size, fits)) > max_pixels:  # rounding of the longer side
        fits -= 1
    seen = f"{image_size[0]}x{image_size[1]}" + (f", {width}x{height} at --size {size}" if size else "")
    raise ValueError(f"{path} is {seen}: {width * height} pixels for the model, more than its limit of {max_pixels} "
                     f"(--max-pixels); give --size {fits} (or less: the shorter side the model sees), or raise "
                     "--max-pixels (memory grows with it)")


def _sixteen_bit(path: Path, values: np.ndarray, mode: str, notes: ImageNotes) -> Image.Image:
    """A 16-bit (or ``I`` holding 16-bit values) grey image scaled to 8 bits, as RGB."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise ValueError(f"{path} holds 32-bit integer pixels from {low} to {high} (mode {mode}); expected 8- or "
                         "16-bit values (0..65535): convert it to an 8-bit or 16-bit image")
    notes.add(f"{'16-bit' if mode.startswith('I;16') else '32-bit integer (values within 16 bits)'} grey, "
              "scaled to 8 bits (value / 257)", path)
    scaled = np.round(values.astype(np.float64) / 257).astype(np.uint8)
    return Image.fromarray(scaled, mode="L").convert("RGB")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _to_rgb(path: Path, im: Image.Image, notes: ImageNotes) -> Image.Image:
    """The decoded image ``im`` in RGB, as the model reads it (see the module docstring)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit(path, np.asarray(im), mode, notes)
    if mode == "F":
        values = np.asarray(im)
        raise ValueError(f"{path} holds floating-point pixels (mode F, values {float(values.min()):g} to "
                         f"{float(values.max()):g}), which have no fixed scale; expected an 8- or 16-bit image: "
                         "convert it to one")
    try:
        if _has_alpha(im):
            rgba = im.convert("RGBA")
            if rgba.getextrema()[3][0] < 255:
                notes.add(f"has transparent pixels, segmented as laid over the ImageNet mean colour {MEAN_COLOUR}",
                          path)
                base = Image.new("RGBA", rgba.size, MEAN_COLOUR + (255,))
                return Image.alpha_composite(base, rgba).convert("RGB")
            return rgba.convert("RGB")
        if mode == "CMYK":
            notes.add("CMYK, converted to RGB without a colour profile", path)
        return im.convert("RGB")
    except ValueError as exc:  # a mode Pillow opens but cannot convert
        raise ValueError(f"{path} has the image mode {mode}, which cannot be converted to RGB ({_first_line(exc)}); "
                         "save it as an RGB image") from None


def read_image(path: str | Path, notes: ImageNotes | None = None, size: Optional[int] = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The RGB image the model segments of the file ``path`` (see the module docstring); the
    choices made are added to ``notes``. Anything it cannot segment is a one-line ValueError."""
    path = Path(path)
    notes = notes if notes is not None else ImageNotes()
    im = _open(path)
    with im, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_pixels(path, im.size, size, max_pixels)
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            notes.add(f"has {frames} frames (animated or multi-page), the first is segmented", path)
        try:
            im.seek(0)
            im.load()
        except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
            raise ValueError(f"{path} cannot be decoded ({_first_line(exc)}): truncated or corrupt; expected a "
                             "complete image file") from None
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception as exc:  # a broken EXIF block: the pixels are still the image
            notes.add(f"EXIF unreadable ({_first_line(exc)}), segmented as stored", path)
            orientation = 1
        upright = im
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            upright = ImageOps.exif_transpose(im)
            notes.add(f"turned upright as its EXIF orientation ({orientation}) says", path)
        rgb = _to_rgb(path, upright, notes)
    for warning in caught:  # e.g. corrupt EXIF: one note, not Python's warning lines
        notes.add(f"Pillow warns: {_first_line(warning.message)}", path)
    return rgb


def find_images(inputs: Iterable[str | Path], notes: ImageNotes | None = None) -> list[Path]:
    """Image files named by ``inputs`` (files, and the image files directly inside folders: by
    suffix, not hidden; what else a folder holds is listed in ``notes``)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            entries = sorted(path.iterdir())
            images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                      and not p.name.startswith(".")]
            if not images:
                raise FileNotFoundError(f"no image file in folder {path} (looked for {', '.join(IMAGE_SUFFIXES)})")
            others = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in images]
            if others and notes is not None:
                notes.skipped.append(f"ucdseg: note: {path}: {len(others)} entr{'y' if len(others) == 1 else 'ies'} "
                                     f"skipped, not image files by name ({_listed(others)}): hidden files, "
                                     f"sub-folders and suffixes other than {' '.join(IMAGE_SUFFIXES)}; name a "
                                     "file to segment it")
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
            progress: bool = True, max_pixels: Optional[int] = None) -> list[dict]:
    """Segment the images of ``inputs`` with ``checkpoint``; write masks, overlays and summary.csv.

    Every input is read before the model runs (:func:`read_image`; its notes go to stderr).
    Returns the summary rows (as written to ``output/summary.csv``).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    if max_pixels < 1:
        raise ValueError(f"max pixels must be >= 1, got {max_pixels}")
    notes = ImageNotes()
    paths = find_images(inputs, notes)
    sizes = [read_image(p, notes, size, max_pixels).size for p in paths]  # every input, before the model runs
    dev = _device(device)
    model, classes, rule = load_predictor(checkpoint, dev, with_rule=True)
    for line in notes.lines():  # once nothing is refused: an error stays one line
        print(line, file=sys.stderr, flush=True)
    lut = torch.tensor(classes.ids, dtype=torch.uint8)
    out = Path(output)
    input_sizes = [_model_size(s, size) for s in sizes]
    rows: dict[int, list[dict]] = {}
    bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress)
    with torch.inference_mode():
        for batch in _batches(input_sizes, batch_size):
            images = [read_image(paths[i], size=size, max_pixels=max_pixels) for i in batch]
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
