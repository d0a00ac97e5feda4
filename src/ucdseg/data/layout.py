"""Folder layouts of datasets: where the (image, mask) pairs of a split are, and what is wrong there.

A dataset class declares its layout once (``layout = ListedPairs(...)``, ``PairedFolders(...)``, or
a :class:`Layout` of its own). Both users of the layout walk it the same way,
:meth:`Layout.find`, which returns the pairs of a split and every :class:`Problem` of its
structure (a missing folder or list, a bad list line, an image without its mask, ...):

* the reader (:class:`~ucdseg.data.SegmentationDataset`) stops at the first error, as a run must
  (:func:`raise_first`);
* ``ucdseg data check`` (:mod:`ucdseg.data.check`) reports them all, then checks that every file
  exists and reads the pairs' contents.

A problem's ``fix`` is left empty when the fix is to get the dataset's files again: the check and
the reader then give the dataset's own instructions (``CheckRules.missing_fix``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

__all__ = ["ERROR", "WARNING", "Problem", "Pair", "Found", "Layout", "ListedPairs", "PairedFolders",
           "nested_hint", "raise_first"]

ERROR = "error"
WARNING = "warning"

Pair = tuple[Path, Path]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset folder."""

    severity: str  # ERROR (training would fail or use wrong data) | WARNING
    path: Path  # the offending (or missing) file or folder
    what: str  # what is wrong
    fix: str  # how to fix it ("": get the dataset's files again, see CheckRules.missing_fix)
    kind: str = "other"  # machine-readable category, e.g. "missing-mask" (groups the report)

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.what} (fix: {self.fix})"


@dataclass
class Found:
    """The pairs of one split (in the reader's order) and the problems of its layout."""

    pairs: list[Pair] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    source: Optional[Path] = None  # what names the pairs (a list file), for messages

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]


def missing_dir(path: Path, what: str) -> Problem:
    return Problem(ERROR, path, f"folder not found ({what})", "", "missing-folder")


def nested_hint(root: Path, inner: Optional[str]) -> str:
    """'; ROOT holds ROOT/inner: pass that folder as the root' when ``root`` holds ``inner``, else ''."""
    candidates = [root / inner, *(root.glob(f"*/{inner}"))] if inner and root.is_dir() else []
    for cand in candidates:
        if cand.is_dir():
            return f"; {root} holds {cand}: pass that folder as the root"
    return ""


def raise_first(name: str, root: Path, found: Found, layout: str, fix: str) -> None:
    """The reader's way with a layout's problems: the first error as one line (a ``FileNotFoundError``
    for something missing, else a ``ValueError``) naming the file, the expected layout and the fix;
    warnings are ignored."""
    errors = found.errors
    if not errors:
        return
    first = errors[0]
    more = (f" ({len(errors) - 1} more problem(s): `ucdseg data check --dataset {name} --root {root}` lists them)"
            if len(errors) > 1 else "")
    hint = first.fix or fix
    message = f"{name}: {first.what}: {first.path}{more}; expected layout: {layout}" + (f"; {hint}" if hint else "")
    raise (FileNotFoundError if first.kind.startswith("missing") else ValueError)(message)


class Layout:
    """Where a dataset's files are. :meth:`find` checks the root, then :meth:`walk`\\ s a split."""

    #: The folder the root must be (e.g. "VOC2012"): named in the layout's description, and a root
    #: that holds it is told to pass it instead.
    root_name: Optional[str] = None

    def find(self, root: Path, split: str) -> Found:
        """The pairs of ``split`` under ``root`` and the problems of the layout."""
        root = Path(root)
        if not root.is_dir():
            what = "root folder not found" if not root.exists() else "root is not a folder"
            return Found([], [Problem(ERROR, root, what, "", "missing-root")])
        return self.walk(root, split)

    def walk(self, root: Path, split: str) -> Found:  # pragma: no cover - every layout defines it
        raise NotImplementedError

    def describe(self) -> str:
        """The layout in one line, for messages."""
        raise NotImplementedError

    def hint(self, root: Path) -> str:
        """Where the root probably is, when ``root`` holds :attr:`root_name` ('' otherwise)."""
        return nested_hint(Path(root), self.root_name)

    def _root(self) -> str:
        return f"root = the {self.root_name} folder holding" if self.root_name else "root holding"


def _dirs(names: Sequence[str]) -> str:
    return ", ".join(f"{n}/" for n in names)


@dataclass(frozen=True)
class ListedPairs(Layout):
    """A list file per split names its images (Pascal VOC's ``ImageSets``, the embedded benchmark).

    A line is an id (``2007_000032``: ``images/<id><image_suffix>`` and ``<mask folder>/<id><mask_suffix>``)
    or a MiB-style pair of root-relative paths (``/JPEGImages/2007_000032.jpg
    /SegmentationClassAug/2007_000032.png``), used as written. ``masks[split]`` lists the mask
    folders of a split, the first that exists being read (VOC's val: ``SegmentationClass``, else
    ``SegmentationClassAug``). A repeated line is a warning (its image counts twice).
    """

    lists: Mapping[str, str]  # split -> list file, relative to the root
    masks: Mapping[str, tuple[str, ...]]  # split -> mask folders, the first existing one read
    images: str = "JPEGImages"
    image_suffix: str = ".jpg"
    mask_suffix: str = ".png"
    root_name: Optional[str] = None

    def describe(self) -> str:
        folders = list(dict.fromkeys([self.images, *(d for ds in self.masks.values() for d in ds)]))
        return f"{self._root()} {_dirs(folders)} and the list files {', '.join(self.lists.values())}"

    def walk(self, root: Path, split: str) -> Found:
        found = Found()
        problems = found.problems
        if not (root / self.images).is_dir():
            problems.append(missing_dir(root / self.images, "the images"))
        list_file = root / self.lists[split]
        if not list_file.is_file():
            problems.append(Problem(ERROR, list_file, f"list file not found (the {split} split's image ids)", "",
                                    "missing-list"))
            return found
        found.source = list_file
        candidates = [root / d for d in self.masks[split]]
        mask_dir = next((d for d in candidates if d.is_dir()), candidates[0])
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(ERROR, list_file, f"list file is unreadable ({exc.__class__.__name__})",
                                    "re-create it: one image id per line", "missing-list"))
            return found
        seen: dict[str, int] = {}
        for number, line in enumerate(lines, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 1:
                pair = (root / self.images / f"{parts[0]}{self.image_suffix}",
                        mask_dir / f"{parts[0]}{self.mask_suffix}")
            elif len(parts) == 2:
                pair = (root / parts[0].lstrip("/"), root / parts[1].lstrip("/"))
            else:
                problems.append(Problem(ERROR, list_file, f"line {number} {line.strip()!r} is not an image id",
                                        f"one id per line (2007_000032) or '/{self.images}/<id>{self.image_suffix} "
                                        f"/{self.masks[split][-1]}/<id>{self.mask_suffix}'", "bad-list-line"))
                continue
            key = " ".join(parts)
            if key in seen:
                problems.append(Problem(WARNING, list_file, f"line {number} repeats line {seen[key]} ({key!r})",
                                        "remove the duplicate line (the image would be counted twice)",
                                        "duplicate-entry"))
            seen.setdefault(key, number)
            found.pairs.append(pair)
        if not found.pairs and not any(p.path == list_file for p in problems):
            problems.append(Problem(ERROR, list_file, "list file names no image", "one image id per line",
                                    "empty-list"))
        reported = {p.path for p in problems if p.kind == "missing-folder"}
        for folder in dict.fromkeys(p.parent for pair in found.pairs for p in pair):
            if folder not in reported and not folder.is_dir():
                problems.append(missing_dir(folder, f"named by {list_file.name}"))
        return found


@dataclass(frozen=True)
class PairedFolders(Layout):
    """A folder of images and a folder of masks per split, paired by name (ADE20K, Cityscapes).

    The images of a split are ``images.format(split=splits[split])/<key><image_suffix>`` (``depth``
    folder levels below it: Cityscapes' ``<city>/``), their masks
    ``masks.format(...)/<key><mask_suffix>``; suffixes match whatever their case. An image
    without its mask and a mask without its image are errors.
    """

    images: str  # e.g. "images/{split}"
    masks: str  # e.g. "annotations/{split}"
    image_suffix: str
    mask_suffix: str
    splits: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "val": "val"})
    depth: int = 0  # folder levels between a split's folder and its files
    root_name: Optional[str] = None

    def describe(self) -> str:
        names = "{" + ",".join(self.splits.values()) + "}"
        level = "<folder>/" * self.depth
        return (f"{self._root()} {self.images.format(split=names)}/{level}*{self.image_suffix} and "
                f"{self.masks.format(split=names)}/{level}*{self.mask_suffix}")

    def _files(self, folder: Path, suffix: str) -> dict[str, Path]:
        """``key -> file`` of the files ``depth`` levels below ``folder`` ending with ``suffix``."""
        n = len(suffix)
        return {str(p.relative_to(folder))[:-n]: p for p in sorted(folder.glob("*/" * self.depth + "*"))
                if p.name.lower().endswith(suffix.lower()) and len(p.name) > n}

    def walk(self, root: Path, split: str) -> Found:
        found = Found()
        problems = found.problems
        image_dir = root / self.images.format(split=self.splits[split])
        mask_dir = root / self.masks.format(split=self.splits[split])
        for folder, what in ((image_dir, f"{split} images"), (mask_dir, f"{split} masks")):
            if not folder.is_dir():
                problems.append(missing_dir(folder, what))
        if problems:
            return found
        images, masks = self._files(image_dir, self.image_suffix), self._files(mask_dir, self.mask_suffix)
        level = "<folder>/" * self.depth
        if not images:
            problems.append(Problem(ERROR, image_dir, f"no {level}*{self.image_suffix} image in the folder", "",
                                    "no-images"))
            return found
        if not masks:
            problems.append(Problem(ERROR, mask_dir, f"no {level}*{self.mask_suffix} mask in the folder", "",
                                    "no-masks"))
            return found
        for key in [k for k in images if k not in masks]:
            problems.append(Problem(ERROR, mask_dir / f"{key}{self.mask_suffix}", f"image {images[key].name} has "
                                    "no mask", "", "missing-mask"))
        for key in [k for k in masks if k not in images]:
            problems.append(Problem(ERROR, image_dir / f"{key}{self.image_suffix}", f"mask {masks[key].name} has "
                                    "no image", "", "missing-image"))
        found.pairs = [(path, masks[key]) for key, path in images.items() if key in masks]
        return found
