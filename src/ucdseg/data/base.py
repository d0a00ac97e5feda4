"""The raw dataset reader shared by every dataset, and :func:`build_dataset`.

A dataset is one :class:`SegmentationDataset` subclass (its class names, palette and layout as
class data; hooks with defaults), registered in :data:`~ucdseg.registry.DATASETS`. A reader is
a list of (image file, mask file) pairs plus a :class:`~ucdseg.data.meta.DatasetMeta`. It reads
in *dataset space*: ``load_mask`` returns the class ids of the dataset (0 background, 255 void),
after any dataset-specific id mapping (:meth:`SegmentationDataset.convert_mask`, e.g. Cityscapes
label ids -> train ids).
Label look-up tables and transforms are applied later, by :class:`~ucdseg.data.StepDataset`.

Every fault of a file is a :class:`DataFileError` (a ``ValueError``: the CLI prints it as one
line) naming the file: an image or mask that is not an image, truncated or unreadable; a mask
whose size is not its image's (naming both); a mask holding ids outside the dataset's classes
(other than 255, void), with the ids and the expected range. A missing file stays a
``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..registry import DATASETS, UnknownName
from .layout import Layout, Pair, raise_first
from .meta import DatasetMeta

__all__ = ["SegmentationDataset", "StepDataset", "SPLITS", "DATASETS", "build_dataset", "dataset_names",
           "dataset_meta", "register_dataset", "open_dataset_split", "CheckRules", "dataset_class", "DataFileError",
           "read_mask", "read_image", "check_mask_ids", "check_sizes", "check_split"]

PathLike = Union[str, "os.PathLike[str]"]
SPLITS = ("train", "val")


@dataclass(frozen=True)
class CheckRules:
    """What the messages about a dataset's files say (``check_rules`` class attribute): how to get
    the data, the mask values it allows (default: its class ids and 255), how to fix the usual
    mistakes, the official split sizes. ``ucdseg data check`` uses all of it, the reader
    ``missing_fix`` (``{root}`` is replaced by the folder read)."""

    missing_fix: str = "restore the dataset's files as its layout says"  # how to get the data
    values_fix: str = "masks must hold the dataset's class ids"  # mask values that are not class ids
    mode_fix: str = "masks must be palette (P) or grayscale (L) PNGs of class ids"  # other mask modes
    allowed: frozenset[int] | None = None  # None: 0..num_classes-1 and 255
    values_text: str | None = None  # the allowed values, for messages (None: derived)
    official: Optional[dict[str, int]] = None  # images per split in the official release


def register_dataset(name: str) -> Callable:
    """Class decorator: make a reader class available to :func:`build_dataset` under ``name``
    (:data:`~ucdseg.registry.DATASETS`: a name taken by another class is an error)."""

    def wrap(cls):
        return DATASETS.register(name, cls)

    return wrap


def dataset_class(name: str) -> type["SegmentationDataset"]:
    """The reader class registered as ``name`` (a one-line error naming the registered ones)."""
    return DATASETS.get(name)


def dataset_names() -> tuple[str, ...]:
    """The names :func:`build_dataset` accepts (without importing their readers)."""
    return DATASETS.names()


def dataset_meta(name: str, root: Optional[PathLike] = None) -> DatasetMeta:
    """Class names and palette of dataset ``name`` without opening a split (its reader's
    :meth:`~SegmentationDataset.read_meta`: the class's ``meta``, or the folder's for a folder dataset)."""
    return dataset_class(name).read_meta(root)


def build_dataset(name: str, root: PathLike, split: str, **options) -> "SegmentationDataset":
    """The raw reader of dataset ``name`` (``dataset_names()``: voc, ade, cityscapes, embedded, folder
    and yours) for ``split``.

    ``options`` are the reader's keyword options (e.g. ``score_background=True`` for ADE20K and
    Cityscapes); an unknown name or option raises a ``ValueError`` that lists the valid ones.
    """
    cls = dataset_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root", "split")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for dataset {name!r}: valid options: {valid}")
    return cls(root, split, **options)


def open_dataset_split(data, split: str, prepare: bool = True, progress: bool = True) -> "SegmentationDataset":
    """The reader of ``data.dataset`` (a :class:`~ucdseg.config.DataConfig`) for ``split``, through the
    reader's hooks: ``default_root()`` when ``data.root`` is unset, ``prepare(root, data, progress)``
    (the embedded benchmark generates itself) and ``config_keys`` (the ``data.*`` keys passed as its
    keyword options, e.g. ADE20K's ``score_background``)."""
    try:
        cls = dataset_class(data.dataset)
    except UnknownName as exc:
        raise ValueError(f"config key 'data.dataset': {exc}") from None
    root = data.root if data.root is not None else cls.default_root()
    if root is None:
        raise ValueError(f"data.root is not set; give the {data.dataset} dataset directory (data.root=DIR)")
    if prepare:
        cls.prepare(str(root), data, progress)
    options = {key: getattr(data, key) for key in cls.config_keys}
    return build_dataset(data.dataset, str(root), split, **options)


# ------------------------------------------------------------------------------- small helpers
def check_split(dataset: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for dataset {dataset!r}: expected one of {', '.join(SPLITS)}")
    return split


class DataFileError(ValueError):
    """A dataset file that cannot be used: not an image, truncated, unreadable, of the wrong size
    for its pair, or holding ids outside the dataset's classes. The message names the file.

    Raised in a DataLoader worker (``data.workers > 0``), torch re-raises it in the main process as
    ``DataFileError("Caught DataFileError in DataLoader worker process N.\\nOriginal Traceback ...
    ...DataFileError: <message>")``; the error keeps ``<message>``, the one line naming the file.
    """

    def __init__(self, message: str = ""):
        text = str(message)
        last = text.rstrip().splitlines()[-1] if text.strip() else ""
        marker = f"{type(self).__name__}: "
        if text.startswith("Caught ") and "\nOriginal Traceback" in text and marker in last:
            text = last.split(marker, 1)[1]
        super().__init__(text)


def _unreadable(kind: str, path: Path, exc: BaseException) -> DataFileError:
    """One line: which file, and why PIL could not read it."""
    if isinstance(exc, UnidentifiedImageError):
        reason = "not an image file PIL can identify"
    elif isinstance(exc, PermissionError):
        reason = "permission denied"
    elif isinstance(exc, IsADirectoryError):
        reason = "a folder, not a file"
    else:
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return DataFileError(f"{kind} {path} cannot be read ({reason}); expected a complete image file")


# what PIL raises for a file that is not an image, truncated or corrupt (FileNotFoundError is kept)
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def read_mask(path: Path) -> np.ndarray:
    """A single-channel PNG (palette "P" or grayscale "L") as a uint8 (H, W) array of its pixel values."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataFileError(f"mask {path} has mode {im.mode!r}: expected a palette (P) or grayscale (L) "
                                    f"PNG whose pixel values are class ids")
            return np.array(im, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file not found: {path}") from None
    except DataFileError:
        raise
    except _PIL_ERRORS as exc:
        raise _unreadable("mask", path, exc) from None


def read_image(path: Path) -> Image.Image:
    """An image file as an RGB PIL image (fully loaded, file closed)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except _PIL_ERRORS as exc:
        raise _unreadable("image", path, exc) from None


def _id_list(ids: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def check_mask_ids(mask: np.ndarray, path: Path, num_ids: int, what: str) -> np.ndarray:
    """``mask`` if its values are all below ``num_ids`` or 255 (void); else a :class:`DataFileError`
    naming the file, the offending ids and the expected range (``what``: whose ids, e.g. "voc")."""
    present = np.flatnonzero(np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=256))
    bad = [int(v) for v in present if num_ids <= v < 255]
    if bad:
        raise DataFileError(f"mask {path} holds id(s) {_id_list(bad)} outside the {num_ids} ids of {what}; expected "
                            f"0..{num_ids - 1} (255 void)")
    return mask


def check_sizes(image: Image.Image, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    """A :class:`DataFileError` naming both files when the mask's size is not the image's."""
    height, width = np.shape(mask)[:2]
    size = tuple(image.size) if isinstance(image, Image.Image) else tuple(np.shape(image)[1::-1])  # (w, h)
    if (width, height) != size:
        raise DataFileError(f"mask {mask_path} is {width}x{height} but its image {image_path} is "
                            f"{size[0]}x{size[1]}; expected a mask of the image's size")


# --------------------------------------------------------------------------------- the reader
class SegmentationDataset(torch.utils.data.Dataset):
    """Pairs of (image, mask) files of one split of a dataset, read in dataset id space.

    ``dataset[i]`` is ``(PIL RGB image, uint8 mask)``. A dataset is one subclass; it declares, as
    class data, what the reader and ``ucdseg data check`` both use:

    * ``meta``: its class names and palette (:class:`~ucdseg.data.meta.DatasetMeta`, whose ``name``
      is the dataset's);
    * ``layout``: where the pairs of a split are (:class:`~ucdseg.data.layout.ListedPairs`,
      :class:`~ucdseg.data.layout.PairedFolders`, or a :class:`~ucdseg.data.layout.Layout` of its own);
    * ``check_rules``: what the messages say about its files (:class:`CheckRules`);

    and overrides, when it needs them, the hooks below, each with a default: ``config_keys``,
    :meth:`read_meta`, :meth:`default_root`, :meth:`prepare`, :meth:`convert_mask` and
    :attr:`stored_ids`, :meth:`saliency_path` and ``saliency_layout``, :meth:`run_check`.
    Keyword options of ``__init__`` (after ``root`` and ``split``) are the reader's options.
    """

    meta: ClassVar[Optional[DatasetMeta]] = None
    layout: ClassVar[Optional[Layout]] = None
    check_rules: ClassVar[CheckRules] = CheckRules()
    #: The ``data.*`` config keys passed to the reader as keyword options of the same name.
    config_keys: ClassVar[tuple[str, ...]] = ()
    #: Where a dataset keeps its per-image saliency maps, for messages (None: it has none).
    saliency_layout: ClassVar[Optional[str]] = None

    def __init__(self, root: PathLike, split: str):
        root = Path(root).expanduser()
        meta = self.read_meta(root)
        check_split(meta.name, split)
        self._open(root, split, meta, self.find_pairs(root, split, meta.name))

    def _open(self, root: Path, split: str, meta: DatasetMeta, pairs: Sequence[Pair]) -> None:
        if not pairs:
            raise ValueError(f"{meta.name}: no images found for split {split!r} under {root}")
        self.split = split
        self.root = Path(root)
        self.meta = meta
        self._images = [Path(p[0]) for p in pairs]
        self._masks = [Path(p[1]) for p in pairs]

    @property
    def name(self) -> str:
        """The dataset's name (its meta's), in messages, index caches and a run's data identity."""
        return self.meta.name

    # ------------------------------------------------------------------ hooks with defaults
    @classmethod
    def read_meta(cls, root: Optional[PathLike] = None) -> DatasetMeta:
        """Class names and palette: the class's ``meta`` (a dataset whose classes live in its folder
        reads them from ``root``, as the folder dataset does)."""
        if not isinstance(cls.meta, DatasetMeta):
            raise ValueError(f"dataset class {cls.__module__}.{cls.__qualname__} declares no class names: expected a "
                             "class attribute meta = DatasetMeta(...) or a read_meta(root) class method")
        return cls.meta

    @classmethod
    def default_root(cls) -> Optional[Path]:
        """The folder read when ``data.root`` is not set (None: it must be set)."""
        return None

    @classmethod
    def prepare(cls, root: PathLike, data, progress: bool = True) -> None:
        """Make the data at ``root`` on first use, before a run opens it (the embedded benchmark
        generates itself); by default the data must be there."""
        return None

    @classmethod
    def find_pairs(cls, root: Path, split: str, name: str) -> list[Pair]:
        """The (image, mask) files of ``split`` in the dataset's ``layout``; the layout's first error
        (a missing folder, list or mask, a bad list line) as one line naming the file."""
        layout = cls.declared_layout()
        found = layout.find(root, split)
        raise_first(name, root, found, layout.describe(), cls.check_rules.missing_fix.format(root=root) +
                    layout.hint(root))
        return found.pairs

    @classmethod
    def declared_layout(cls) -> Layout:
        if not isinstance(cls.layout, Layout):
            raise ValueError(f"dataset class {cls.__module__}.{cls.__qualname__} declares no layout: expected a class "
                             "attribute layout = ListedPairs(...), PairedFolders(...) or a Layout of its own")
        return cls.layout

    @classmethod
    def of_pairs(cls, root: PathLike, split: str, pairs: Sequence[Pair], meta: Optional[DatasetMeta] = None
                 ) -> "SegmentationDataset":
        """A reader of the given (image, mask) files, without walking the layout (``ucdseg data
        check`` reads the pairs of a layout that has faults)."""
        self = cls.__new__(cls)
        root = Path(root).expanduser()
        SegmentationDataset._open(self, root, split, meta or cls.read_meta(root), pairs)
        return self

    @classmethod
    def run_check(cls, name: str, root: PathLike, limit: Optional[int] = None, progress: bool = True,
                  saliency: bool = False) -> int:
        """``ucdseg data check --dataset name``: print the report, return the exit code (0: no error).
        By default the checks of :mod:`ucdseg.data.check` on the dataset's layout and masks."""
        from .check import run_check  # the check reads the readers: it imports this module

        return run_check(name, root, limit=limit, progress=progress, saliency=saliency)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return self.meta.num_classes

    def __len__(self) -> int:
        return len(self._images)

    def _check_index(self, i: int) -> int:
        n = len(self._images)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= int(i) < n:
            raise IndexError(f"index {i!r} out of range for {self.name}/{self.split} with {n} images")
        return int(i)

    def image_path(self, i: int) -> Path:
        return self._images[self._check_index(i)]

    def mask_path(self, i: int) -> Path:
        return self._masks[self._check_index(i)]

    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image."""
        return read_image(self.image_path(i))

    @property
    def stored_ids(self) -> int:
        """How many ids a stored mask may hold (0..n-1, plus 255 void): the classes unless
        :meth:`convert_mask` maps other stored ids (Cityscapes' 34 label ids)."""
        return self.num_classes

    def load_mask(self, i: int) -> np.ndarray:
        """Mask ``i`` as uint8 (H, W) dataset class ids (0 background, 255 void); a stored id outside
        :attr:`stored_ids` (other than 255) is a :class:`DataFileError` naming the file."""
        path = self.mask_path(i)
        return self.convert_mask(check_mask_ids(read_mask(path), path, self.stored_ids, self.name))

    def convert_mask(self, raw: np.ndarray) -> np.ndarray:
        """Stored pixel values -> dataset class ids (identity unless a dataset overrides it)."""
        return raw

    def saliency_path(self, i: int) -> Optional[Path]:
        """The saliency map of image ``i`` (a grayscale PNG of the image's size, > 0 = salient), or
        None when the dataset has no saliency maps (the default)."""
        return None

    def load_saliency(self, i: int) -> np.ndarray:
        """Saliency map ``i`` as a uint8 (H, W) array; a missing or unreadable map, or one of
        another size than its image, is a one-line error naming the file."""
        path = self.saliency_path(i)
        if path is None:
            raise ValueError(f"{self.name}: no saliency maps (a method with the unknown class from saliency "
                             f"needs them); expected {self.saliency_layout or 'none: this dataset has no saliency'}")
        if not path.is_file():
            raise FileNotFoundError(f"saliency map not found: {path}; expected {self.saliency_layout}")
        try:
            with Image.open(path) as im:
                saliency = np.array(im.convert("L") if im.mode not in ("L", "P", "1") else im, dtype=np.uint8)
        except _PIL_ERRORS as exc:
            raise _unreadable("saliency map", path, exc) from None
        mask_path = self.mask_path(i)
        with Image.open(mask_path) as m:
            size = m.size
        if saliency.shape[::-1] != tuple(size):
            raise DataFileError(f"saliency map {path} is {saliency.shape[1]}x{saliency.shape[0]} but its mask "
                                f"{mask_path} is {size[0]}x{size[1]}; expected a map of the image's size")
        return saliency

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        image, mask = self.load_image(i), self.load_mask(i)
        check_sizes(image, mask, self.image_path(i), self.mask_path(i))
        return image, mask

    def check_pair(self, i: int) -> None:
        """Read pair ``i`` as training would: a :class:`DataFileError` (or FileNotFoundError) naming the
        file when the image or mask is unreadable, their sizes differ or the mask's ids are not the
        dataset's. Cheap enough to run on a split's first and last pairs before training."""
        self[i]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, root='{self.root}', "
                f"images={len(self)})")


# ------------------------------------------------------------------------------ one step's view
class StepDataset(torch.utils.data.Dataset):
    """The images ``indices`` of ``base`` with their masks mapped by ``lut`` and then ``transform``.

    ``lut`` is a (256,) uint8 look-up table (dataset id -> step label, see ``ucdseg.label_maps``);
    ``transform(image, mask) -> (float C x H x W, int64 H x W)``, e.g. :func:`train_transforms`.
    ``transform=None`` uses ``eval_transforms(None)`` (no geometry, ImageNet normalisation).
    """

    def __init__(self, base: SegmentationDataset, indices: Sequence[int], lut: np.ndarray,
                 transform: Optional[Callable] = None, label_transform: Optional[Callable] = None,
                 needs: Sequence[str] = ()):
        lut = np.asarray(lut)
        if lut.shape != (256,):
            raise ValueError(f"lut must have shape (256,) (one entry per uint8 id), got {lut.shape}")
        if lut.dtype != np.uint8:
            if lut.min() < 0 or lut.max() > 255:
                raise ValueError(f"lut values must be in 0..255, got {lut.min()}..{lut.max()}")
            lut = lut.astype(np.uint8)
        self.base = base
        self.indices = [int(i) for i in indices]
        n = len(base)
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"indices {bad[:5]} out of range for {base.name}/{base.split} with {n} images")
        self.lut = lut
        # a method's label rule on the mapped labels (before the geometry: it is per pixel, and masks are
        # resampled with nearest neighbour), with the per-image inputs it needs ("saliency")
        self.label_transform = label_transform
        self.needs = tuple(needs)
        unknown = sorted(set(self.needs) - {"saliency"})
        if unknown:
            raise ValueError(f"unknown per-image input(s) {', '.join(unknown)}; expected saliency")
        if transform is None:
            from .transforms import eval_transforms

            transform = eval_transforms(None)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        image, mask = self.base.load_image(j), self.base.load_mask(j)
        check_sizes(image, mask, self.base.image_path(j), self.base.mask_path(j))
        labels = self.lut[mask]
        if self.label_transform is not None:
            inputs = {"saliency": self.base.load_saliency(j)} if "saliency" in self.needs else {}
            labels = np.asarray(self.label_transform(labels, **inputs), dtype=np.uint8)
        return self.transform(image, labels)
