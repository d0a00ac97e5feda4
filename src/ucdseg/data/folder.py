"""Your own dataset: a folder of images, masks and a YAML of class names (``data.dataset=folder``).

Layout (``root`` is the folder given as ``data.root``; ``docs/own_dataset.md`` walks through it)::

    root/classes.yaml              class names (+ optional palette, evaluation and split options)
    root/images/<id>.<ext>         .jpg .jpeg .png .bmp .tif .tiff .webp
    root/masks/<id>.png            one mask per image, same size
    root/train.txt, root/val.txt   optional split lists: one <id> per line

``classes.yaml``::

    classes: [background, cat, dog]      # class id = position in the list; id 0 is background
    palette: [[0, 0, 0], [255, 0, 0], [0, 0, 255]]  # optional: one RGB colour per class
    ignore_background_in_eval: false     # optional: do not score class 0 (as ADE20K, Cityscapes)
    val_fraction: 0.2                    # optional: share of images in val when there are no lists

Masks are single-channel PNGs (grayscale "L" or palette "P", as VOC's) whose pixel values are
class ids, 255 being void (not trained, not scored); or RGB PNGs painted with the palette's
colours (then ``palette`` is required, and VOC's void colour (224, 224, 192) is void). A mask
value or colour that is not a class of ``classes.yaml`` is an error naming the mask.

Without split lists, an image goes to ``val`` when the first 8 hex digits of the sha1 of its id,
over 2^32, fall below ``val_fraction``: the split is fixed by the ids alone, so adding images
never moves the others.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
from PIL import Image

from .base import _PIL_ERRORS, CheckRules, DataFileError, PathLike, SegmentationDataset, _unreadable
from .layout import ERROR, WARNING, Found, Layout, Problem
from .meta import VOID, VOID_COLOR, DatasetMeta, default_palette

__all__ = ["FolderSegmentation", "FolderLayout", "FOLDER_LAYOUT", "CLASSES_FILE", "read_classes", "check_folder",
           "run_check_folder"]

CLASSES_FILE = "classes.yaml"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FOLDER_LAYOUT = ("root holding classes.yaml (classes: [background, ...]), images/<id>.<jpg|png|...>, "
                 "masks/<id>.png and optionally train.txt / val.txt (one id per line); see docs/own_dataset.md")
_KEYS = ("classes", "palette", "ignore_background_in_eval", "val_fraction")
_DEFAULT_VAL_FRACTION = 0.2


def _fail(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what}")


def _load_yaml(root: Path) -> tuple[Path, dict]:
    path = root / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"folder: class file not found: {path}; expected layout: {FOLDER_LAYOUT}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise _fail(path, "expected a mapping with the key 'classes: [background, ...]'")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise _fail(path, f"unknown key(s) {', '.join(map(str, unknown))}; expected {', '.join(_KEYS)}")
    return path, data


def read_classes(root: PathLike) -> DatasetMeta:
    """The :class:`DatasetMeta` of the folder dataset at ``root``, from its ``classes.yaml``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"folder: root folder not found: {root}; expected layout: {FOLDER_LAYOUT}")
    path, data = _load_yaml(root)
    names = data.get("classes")
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise _fail(path, "'classes' must be a list of class names (non-empty strings), background first")
    if len(names) < 2 or len(names) > VOID:
        raise _fail(path, f"'classes' has {len(names)} names: expected 2..{VOID} (background and at least one class; "
                          f"{VOID} is void)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise _fail(path, f"'classes' repeats {', '.join(repeated)}: every class needs its own name")
    palette = data.get("palette")
    if palette is None:
        colors = default_palette(len(names))
    else:
        ok = isinstance(palette, list) and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                        and 0 <= v <= 255 for v in c) for c in palette)
        if not ok:
            raise _fail(path, "'palette' must be a list of [R, G, B] colours with values 0..255")
        if len(palette) != len(names):
            raise _fail(path, f"'palette' has {len(palette)} colours for {len(names)} classes: expected one per class")
        colors = tuple(tuple(c) for c in palette)
        if len(set(colors)) != len(colors):
            raise _fail(path, "'palette' repeats a colour: RGB masks need one colour per class")
    ignore = data.get("ignore_background_in_eval", False)
    if not isinstance(ignore, bool):
        raise _fail(path, f"'ignore_background_in_eval' must be true or false, got {ignore!r}")
    return DatasetMeta("folder", tuple(names), tuple(colors), ignore_background_in_eval=ignore)


def _val_fraction(data: dict, path: Path) -> float:
    value = data.get("val_fraction", _DEFAULT_VAL_FRACTION)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise _fail(path, f"'val_fraction' must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _in_val(image_id: str, fraction: float) -> bool:
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


_LIST_FIX = "one image id (or file name) per line, each image in one list"


class FolderLayout(Layout):
    """``root/images``, ``root/masks``, optional ``train.txt`` / ``val.txt`` (else ``val_fraction``
    of ``classes.yaml`` splits the images by the hash of their ids): the module docstring."""

    def describe(self) -> str:
        return FOLDER_LAYOUT

    def walk(self, root: Path, split: str) -> Found:
        images, masks, splits, problems = self.walk_all(root)
        return Found([(images[i], masks[i]) for i in splits[split]], problems)

    @staticmethod
    def _read_list(path: Path, images: dict[str, Path], problems: list[Problem]) -> list[str]:
        """The ids of a split list; each bad line is a problem (the ids that are valid are kept)."""
        ids: list[str] = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(ERROR, path, f"cannot be read ({_first_line(exc)})", _LIST_FIX, "bad-list"))
            return ids
        for number, line in enumerate(lines, start=1):
            entry = line.strip()
            if not entry:
                continue
            image_id = Path(entry).stem if Path(entry).suffix.lower() in IMAGE_SUFFIXES else entry
            if image_id not in images:
                problems.append(Problem(ERROR, path, f"line {number}: no image {image_id!r} in images/",
                                        "add the image, or remove the line", "list-entry-without-image"))
            elif image_id in ids:
                problems.append(Problem(ERROR, path, f"line {number}: {image_id!r} is listed twice",
                                        "remove the repeated line", "repeated-list-entry"))
            else:
                ids.append(image_id)
        if not ids and not any(p.path == path for p in problems):
            problems.append(Problem(ERROR, path, "names no image", _LIST_FIX, "bad-list"))
        return ids

    def walk_all(self, root: Path) -> tuple[dict[str, Path], dict[str, Path], dict[str, list[str]], list[Problem]]:
        """Images and masks by id, the ids of each split that have both, and every structural fault."""
        problems: list[Problem] = []
        image_dir, mask_dir = root / "images", root / "masks"
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                problems.append(Problem(ERROR, folder, "folder not found", f"expected layout: {FOLDER_LAYOUT}",
                                        "missing-folder"))
        images: dict[str, Path] = {}
        if image_dir.is_dir():
            for p in sorted(image_dir.iterdir()):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    if p.stem in images:
                        problems.append(Problem(ERROR, p, f"shares the id {p.stem!r} with {images[p.stem].name}",
                                                "rename one of the two images (an id names one image)", "repeated-id"))
                        continue
                    images[p.stem] = p
            if not images:
                problems.append(Problem(ERROR, image_dir, f"holds no image (looked for {', '.join(IMAGE_SUFFIXES)})",
                                        f"expected layout: {FOLDER_LAYOUT}", "no-images"))
        masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.is_file() and p.suffix.lower() == ".png"} \
            if mask_dir.is_dir() else {}
        lists = {split: root / f"{split}.txt" for split in ("train", "val")}
        present = [s for s, p in lists.items() if p.is_file()]
        splits: dict[str, list[str]] = {"train": [], "val": []}
        if len(present) == 1:
            other = "val" if present[0] == "train" else "train"
            problems.append(Problem(ERROR, lists[other], f"not found, but {lists[present[0]].name} exists",
                                    "give both split lists or neither (then val_fraction of classes.yaml splits the "
                                    "images)", "missing-list"))
        fraction = _DEFAULT_VAL_FRACTION
        try:
            path, data = _load_yaml(root)
        except (ValueError, FileNotFoundError):  # classes.yaml's own faults are read_classes'
            pass
        else:
            try:
                fraction = _val_fraction(data, path)
            except ValueError as exc:
                problems.append(Problem(ERROR, path, _first_line(exc).replace(f"{path}: ", ""),
                                        "val_fraction: a number between 0 and 1", "classes-yaml"))
        if present:
            for split in present:
                splits[split] = self._read_list(lists[split], images, problems)
            for image_id in sorted(set(splits["train"]) & set(splits["val"])):
                problems.append(Problem(ERROR, lists["val"], f"{image_id!r} is also in train.txt",
                                        "keep each id in one of the two lists", "in-both-lists"))
        elif images:
            splits = {"train": [i for i in images if not _in_val(i, fraction)],
                      "val": [i for i in images if _in_val(i, fraction)]}
            for split, ids in splits.items():
                if not ids:
                    problems.append(Problem(ERROR, image_dir, f"its {len(images)} images leave {split} empty with "
                                            f"val_fraction {fraction}", f"write train.txt and val.txt in {root}",
                                            "empty-split"))
        listed = set(splits["train"]) | set(splits["val"]) if present else set(images)
        if mask_dir.is_dir():
            for split, ids in splits.items():
                for image_id in ids:
                    if image_id not in masks:
                        problems.append(Problem(ERROR, mask_dir / f"{image_id}.png", f"not found: image "
                                                f"{images[image_id].name} ({split}) has no mask", "add the mask, or "
                                                "remove the image" + (" from its list" if present else ""),
                                                "missing-mask"))
            for mask_id in sorted(set(masks) - set(images)):
                problems.append(Problem(WARNING, masks[mask_id], "has no image in images/ (not used)",
                                        "remove the mask, or add its image", "mask-without-image"))
        splits = {split: [i for i in ids if i in masks and i in listed] for split, ids in splits.items()}
        return images, masks, splits, problems


class FolderSegmentation(SegmentationDataset):
    """A dataset of your own: ``root/images``, ``root/masks`` and ``root/classes.yaml`` (module docstring)."""

    layout = FolderLayout()
    check_rules = CheckRules(missing_fix="see docs/own_dataset.md")
    saliency_layout = "root/saliency/<image stem>.png (optional; grayscale, > 0 = salient)"

    @classmethod
    def read_meta(cls, root: Optional[PathLike] = None) -> DatasetMeta:
        """The classes of ``root/classes.yaml``."""
        if root is None:
            raise ValueError("dataset 'folder' reads its class names from its folder: data.root is not set")
        return read_classes(root)

    @classmethod
    def run_check(cls, name: str, root: PathLike, limit: Optional[int] = None, progress: bool = True,
                  saliency: bool = False) -> int:
        """Every fault of the folder in one pass (:mod:`.folder_check`)."""
        return run_check_folder(root, limit=limit, saliency=saliency)

    def saliency_path(self, i: int) -> Path:
        return self.root / "saliency" / f"{self.image_path(i).stem}.png"

    @functools.cached_property
    def _classes_file(self) -> Path:
        return self.root / CLASSES_FILE

    @functools.cached_property
    def _color_codes(self) -> dict[int, int]:
        """RGB colour (as one int) -> class id, for masks painted with the palette; VOC's void colour is void."""
        colors = np.asarray(self.meta.palette, dtype=np.int64)
        codes = {int(c): k for k, c in enumerate(colors[:, 0] << 16 | colors[:, 1] << 8 | colors[:, 2])}
        codes.setdefault(VOID_COLOR[0] << 16 | VOID_COLOR[1] << 8 | VOID_COLOR[2], VOID)
        return codes

    @functools.cached_property
    def _has_palette(self) -> bool:
        return "palette" in _load_yaml(self.root)[1]

    def load_mask(self, i: int) -> np.ndarray:
        """Mask ``i`` as class ids; RGB masks through the palette; every id checked against classes.yaml."""
        path = self.mask_path(i)
        try:
            with Image.open(path) as im:
                mode = im.mode
                raw = np.array(im.convert("RGB") if mode in ("RGB", "RGBA") else im)
        except FileNotFoundError:
            raise FileNotFoundError(f"mask file not found: {path}") from None
        except _PIL_ERRORS as exc:
            raise _unreadable("mask", path, exc) from None
        if mode in ("RGB", "RGBA"):
            return self._from_colors(raw, path)
        if mode not in ("P", "L"):
            raise DataFileError(f"mask {path} has mode {mode!r}: expected a grayscale (L) or palette (P) PNG of class "
                             "ids, or an RGB PNG painted with the palette of classes.yaml")
        return self._checked(raw.astype(np.uint8), path)

    def _from_colors(self, rgb: np.ndarray, path: Path) -> np.ndarray:
        if not self._has_palette:
            raise DataFileError(f"mask {path} is an RGB picture but {self._classes_file} has no 'palette': give the "
                             "colour of every class there, or save the masks as PNGs of class ids")
        codes = rgb[..., 0].astype(np.int64) << 16 | rgb[..., 1].astype(np.int64) << 8 | rgb[..., 2]
        values, inverse = np.unique(codes, return_inverse=True)
        unknown = [int(v) for v in values if int(v) not in self._color_codes]
        if unknown:
            shown = ", ".join(f"({v >> 16}, {v >> 8 & 255}, {v & 255})" for v in unknown[:4])
            raise DataFileError(f"mask {path} holds colour(s) {shown} that are not in the palette of "
                             f"{self._classes_file}; expected the colours of its {self.num_classes} classes")
        ids = np.array([self._color_codes[int(v)] for v in values], dtype=np.uint8)
        return ids[inverse.reshape(codes.shape)]

    def _checked(self, mask: np.ndarray, path: Path) -> np.ndarray:
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
        bad = [int(v) for v in present if self.num_classes <= v < VOID]
        if bad:
            raise DataFileError(f"mask {path} holds class id(s) {', '.join(map(str, bad[:8]))} but {self._classes_file} "
                             f"names {self.num_classes} classes (ids 0..{self.num_classes - 1}, {VOID} void); add "
                             "their names to classes.yaml or fix the mask")
        return mask


def check_folder(root: PathLike, limit: Optional[int] = None) -> list[str]:
    """Every problem of the folder dataset at ``root``, one line each (empty: ready to train);
    :func:`ucdseg.data.folder_check.folder_problems` has them as :class:`~ucdseg.data.check.Problem`."""
    from .folder_check import folder_problems

    return [f"{p.path}: {p.what}" for p in folder_problems(root, limit=limit)]


def run_check_folder(root: PathLike, limit: Optional[int] = None, saliency: bool = False) -> int:
    """``ucdseg data check --dataset folder``: every fault in one pass, grouped by kind; exit code 0 or 1."""
    from .folder_check import run_check_folder as run

    return run(root, limit=limit, saliency=saliency)
