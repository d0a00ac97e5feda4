"""Check a dataset folder before training: ``ucdseg data check --dataset voc --root DIR``.

:func:`check_dataset` walks the layout the dataset's class declares, as its reader does
(``layout``, :mod:`ucdseg.data.layout`; see ``docs/datasets.md``), and returns a list of
:class:`Problem`, each naming the path, what is wrong and how to fix it:

* what the layout finds: missing root, folders and list files (VOC: ``JPEGImages``,
  ``SegmentationClassAug``, ``ImageSets/Segmentation/{train_aug,val}.txt``; ADE20K: ``images`` /
  ``annotations`` ``/{training,validation}``; Cityscapes: ``leftImg8bit`` / ``gtFine``
  ``/{train,val}``), malformed or duplicate list lines, images without a mask, masks without an
  image;
* every listed file that does not exist;
* per (image, mask) pair: unreadable image, unreadable or non-class-id mask (not a palette /
  grayscale PNG), mask values that are not class ids of the dataset (VOC 0..20, ADE20K 0..150,
  embedded 0..10, plus 255 void; Cityscapes: the official label ids 0..33 of ``*_labelIds.png``),
  image and mask of different sizes.

Reading the pairs is the slow part: it runs on a thread pool (PIL releases the GIL while
decoding) with a progress bar; JPEGs are decoded at 1/8 scale (enough to find truncated files)
and PNG images are CRC-verified without being inflated; masks are decoded fully. ``limit=N``
reads only ``N`` evenly spaced pairs per split (existence checks still cover every entry).

:func:`format_report` turns the problems into text with a final verdict line and
:func:`run_check` prints it and returns the command's exit code.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .base import SPLITS, dataset_class
from .layout import ERROR, WARNING, Found, Pair, Problem
from .meta import VOID

__all__ = ["Problem", "CheckResult", "SplitSummary", "check_dataset", "check", "format_report", "run_check",
           "saliency_problems", "ERROR", "WARNING", "Rules", "Pair", "existing_pairs"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class SplitSummary:
    """What was found for one split."""

    split: str
    entries: int = 0  # the pairs the layout names (VOC: list entries; ADE20K, Cityscapes: images)
    read: int = 0  # (image, mask) pairs whose content was read
    official: Optional[int] = None


@dataclass
class CheckResult:
    """Problems and per-split counts of one check."""

    dataset: str
    root: Path
    problems: list[Problem] = field(default_factory=list)
    splits: list[SplitSummary] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem is an error (warnings do not fail a check)."""
        return not any(p.severity == ERROR for p in self.problems)


# ----------------------------------------------------------------------------- dataset rules
@dataclass(frozen=True)
class Rules:
    """What a dataset's masks may hold and how to fix the usual mistakes, for the folder checked."""

    allowed: frozenset[int]
    values_text: str  # the expected values, for messages
    values_fix: str
    mode_fix: str
    missing_fix: str  # how to get the data


def _rules(cls, root: Path) -> Rules:
    """The check rules the dataset's class declares (``check_rules``), for the folder ``root``."""
    spec = cls.check_rules
    classes = cls.read_meta(root).num_classes
    allowed = spec.allowed if spec.allowed is not None else frozenset(range(classes)) | {VOID}
    values_text = spec.values_text or f"class ids 0..{classes - 1} and {VOID} (void)"
    return Rules(allowed, values_text, spec.values_fix.format(root=root), spec.mode_fix.format(root=root),
                 spec.missing_fix.format(root=root) + cls.declared_layout().hint(root))


# ---------------------------------------------------------------------------------- the files
def existing_pairs(found: Sequence[Pair], source: Path, rules: Rules, problems: list[Problem],
                   missing_dirs: set[Path]) -> list[Pair]:
    """Pairs whose two files exist; reports the others (once per missing folder, else per file)."""
    pairs: list[Pair] = []
    for image, mask in found:
        ok = True
        for path, role, kind in ((image, "image", "missing-image"), (mask, "mask", "missing-mask")):
            if path.is_file():
                continue
            ok = False
            if path.parent in missing_dirs:
                continue
            if not path.parent.is_dir():
                missing_dirs.add(path.parent)
                problems.append(Problem(ERROR, path.parent, f"folder not found (named by {source.name})",
                                        rules.missing_fix, "missing-folder"))
                continue
            problems.append(Problem(ERROR, path, f"{role} file not found for the entry {image.stem!r} of "
                                    f"{source.name}", f"restore the file, or remove the entry from {source}"
                                    if source.is_file() else rules.missing_fix, kind))
        if ok:
            pairs.append((image, mask))
    return pairs


def _layout_problems(cls, root: Path, rules: Rules) -> tuple[list[Problem], dict[str, Found]]:
    """The problems of the layout over both splits (each once; a fix left empty is the dataset's
    ``missing_fix``) and what the layout finds per split, as the reader walks it."""
    layout = cls.declared_layout()
    problems: dict[tuple, Problem] = {}
    pairs: dict[str, Found] = {}
    for split in SPLITS:
        found = layout.find(root, split)
        for p in found.problems:  # a missing folder is one problem, whichever split needs it
            key = (p.severity, p.kind, p.path) + (() if p.kind in ("missing-folder", "missing-root") else (p.what,))
            problems.setdefault(key, p if p.fix else dataclasses.replace(p, fix=rules.missing_fix))
        if found.pairs:
            pairs[split] = found
    return list(problems.values()), pairs


# --------------------------------------------------------------------------------- contents
def _check_image(path: Path) -> tuple[Optional[tuple[int, int]], Optional[str]]:
    """(size, None) for a readable image, (None, reason) otherwise."""
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "PNG":
                im.verify()  # walks every chunk and checks its CRC without inflating
            else:
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))  # JPEG: decode at 1/8 scale
                im.load()
        return size, None
    except Exception as exc:  # PIL raises many types for broken files
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"


def _check_pair(pair: Pair, rules: Rules) -> list[Problem]:
    image, mask = pair
    problems: list[Problem] = []
    size, reason = _check_image(image)
    if reason is not None:
        problems.append(Problem(ERROR, image, f"image is unreadable ({reason})",
                                "re-extract or re-download this file", "unreadable-image"))
    try:
        with Image.open(mask) as im:
            mode, mask_size = im.mode, im.size
            values = np.asarray(im) if mode in ("P", "L") else None
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"
        return problems + [Problem(ERROR, mask, f"mask is unreadable ({reason})",
                                   "re-extract or re-download this file", "unreadable-mask")]
    if values is None:
        problems.append(Problem(ERROR, mask, f"mask has mode {mode!r}: expected a palette (P) or grayscale (L) "
                                f"PNG whose pixel values are class ids", rules.mode_fix, "bad-mask-mode"))
    else:
        counts = np.bincount(values.ravel(), minlength=256)
        bad = [int(v) for v in np.flatnonzero(counts) if int(v) not in rules.allowed]
        if bad:
            shown = ", ".join(f"{v} ({counts[v]} px)" for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
            problems.append(Problem(ERROR, mask, f"mask holds unexpected values {shown}; expected "
                                    f"{rules.values_text}", rules.values_fix, "unexpected-values"))
    if size is not None and size != mask_size:
        problems.append(Problem(ERROR, mask, f"mask is {mask_size[0]}x{mask_size[1]} but its image {image.name} "
                                f"is {size[0]}x{size[1]} (width x height)",
                                "the mask does not belong to this image: restore the matching pair", "size-mismatch"))
    return problems


def _sample(pairs: list[Pair], limit: Optional[int]) -> list[Pair]:
    """``limit`` evenly spaced pairs (all when ``limit`` is None or not smaller)."""
    if limit is None or limit >= len(pairs):
        return pairs
    idx = np.unique(np.linspace(0, len(pairs) - 1, num=limit).round().astype(int))
    return [pairs[i] for i in idx]


def _scan(name: str, split: str, pairs: list[Pair], rules: Rules, progress: bool, workers: int) -> list[Problem]:
    problems: list[Problem] = []
    with tqdm(total=len(pairs), desc=f"checking {name}/{split}", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        if workers <= 1:
            for pair in pairs:
                problems += _check_pair(pair, rules)
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for found in pool.map(lambda p: _check_pair(p, rules), pairs, chunksize=1):
                    problems += found
                    bar.update()
    return problems


# ------------------------------------------------------------------------------------ API
def check(name: str, root: PathLike, limit: Optional[int] = None, progress: bool = False,
          workers: Optional[int] = None) -> CheckResult:
    """Check the ``name`` dataset at ``root``; :class:`CheckResult` with problems and split counts.

    ``limit``: read at most this many evenly spaced (image, mask) pairs per split (None: all).
    ``workers``: reader threads (default: the number of CPUs, at most 8).
    """
    cls = dataset_class(name)  # a one-line error for an unknown dataset
    cls.declared_layout()  # ... and for one without a layout
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    workers = min(8, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    root = Path(root).expanduser()
    rules = _rules(cls, root)
    result = CheckResult(name, root)
    problems, pairs = _layout_problems(cls, root, rules)
    result.problems += problems
    missing_dirs = {p.path for p in problems if p.kind in ("missing-folder", "missing-root")}
    for split in SPLITS:
        if split not in pairs:
            continue
        found = pairs[split]
        existing = existing_pairs(found.pairs, found.source or root, rules, result.problems, missing_dirs)
        sample = _sample(list(dict.fromkeys(existing)), limit)  # a repeated entry is read once
        result.problems += _scan(name, split, sample, rules, progress, workers)
        result.splits.append(SplitSummary(split, len(found.pairs), len(sample),
                                          (cls.check_rules.official or {}).get(split)))
    return result


def saliency_problems(dataset, limit: Optional[int] = None) -> list[Problem]:
    """The problems of the saliency maps of a split (SSUL's unknown class, ``--saliency``): a map
    missing, unreadable, or not of its image's size; every map is looked for, ``limit`` of them read."""
    from .base import DataFileError

    if dataset.saliency_path(0) is None:
        return [Problem(ERROR, Path(dataset.root), f"{dataset.name} has no saliency maps",
                        "use method.options.unknown=background (every background pixel unknown)", "no-saliency")]
    problems: list[Problem] = []
    fix = f"put the maps at {dataset.saliency_layout}; see docs/datasets.md (SSUL's saliency maps)"
    read = set(_sample(list(range(len(dataset))), limit))
    for i in range(len(dataset)):
        path = dataset.saliency_path(i)
        if not path.is_file():
            problems.append(Problem(ERROR, path, "saliency map missing", fix, "missing-saliency"))
        elif i in read:
            try:
                dataset.load_saliency(i)
            except DataFileError as exc:
                problems.append(Problem(ERROR, path, str(exc).split(f"{path} ", 1)[-1], fix, "bad-saliency"))
    return problems


def check_dataset(name: str, root: PathLike, limit: Optional[int] = None, progress: bool = False,
                  workers: Optional[int] = None) -> list[Problem]:
    """The problems of the ``name`` dataset ("voc", "ade", "cityscapes", "embedded") at ``root``.

    An empty list means the layout is complete and every checked mask and image is valid.
    """
    return check(name, root, limit=limit, progress=progress, workers=workers).problems


def format_report(problems: Iterable[Problem], max_per_kind: int = 10, header: str = "") -> str:
    """Human-readable report: problems grouped by kind (at most ``max_per_kind`` shown each), each
    group's fix, and a final verdict line (``verdict: OK ...`` or ``verdict: FAILED ...``)."""
    problems = list(problems)
    groups: "OrderedDict[tuple[str, str], list[Problem]]" = OrderedDict()
    for p in sorted(problems, key=lambda p: p.severity != ERROR):  # errors first, stable otherwise
        groups.setdefault((p.severity, p.kind), []).append(p)
    lines = [header] if header else []
    for (severity, kind), items in groups.items():
        lines.append(f"{severity.upper()} {kind} ({len(items)}):")
        for p in items[:max_per_kind]:
            lines.append(f"  {p.path}: {p.what}")
        if len(items) > max_per_kind:
            lines.append(f"  ... and {len(items) - max_per_kind} more")
        fixes = list(OrderedDict.fromkeys(p.fix for p in items))
        for fix in fixes[:3]:
            lines.append(f"  fix: {fix}")
        if len(fixes) > 3:
            lines.append(f"  fix: ... ({len(fixes) - 3} more, see the entries above)")
    errors = sum(p.severity == ERROR for p in problems)
    warnings = len(problems) - errors
    if errors:
        verdict = f"verdict: FAILED -- {errors} error(s), {warnings} warning(s)"
    elif warnings:
        verdict = f"verdict: OK with {warnings} warning(s)"
    else:
        verdict = "verdict: OK -- no problem found"
    lines.append(verdict)
    return "\n".join(lines)


def _header(result: CheckResult, limit: Optional[int]) -> str:
    lines = [f"{result.dataset} at {result.root}"]
    for s in result.splits:
        official = f" (official release: {s.official})" if s.official is not None else ""
        sampled = f", {s.read} pairs read (--limit {limit})" if limit is not None and s.read < s.entries else \
            f", {s.read} pairs read"
        lines.append(f"  {s.split}: {s.entries} entries{official}{sampled}")
    return "\n".join(lines)


def run_check(dataset: str, root: PathLike, limit: Optional[int] = None, progress: bool = True,
              saliency: bool = False) -> int:
    """Check a dataset, print the report; exit code 0 when no error was found, 1 otherwise.
    ``saliency``: also the training images' saliency maps (SSUL's), when the layout is sound."""
    result = check(dataset, root, limit=limit, progress=progress)
    if saliency and result.ok:
        from .base import build_dataset

        result.problems += saliency_problems(build_dataset(dataset, root, "train"), limit)
    print(format_report(result.problems, header=_header(result, limit)), flush=True)
    return 0 if result.ok else 1
