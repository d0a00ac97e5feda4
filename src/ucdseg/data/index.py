"""Cached per-image class presence and per-step training-image lists (docs/protocol.md §1).

A benchmark split is only reproducible if its per-step image lists are, so they are built once
from the masks, cached on disk and recorded with a checksum.

* :func:`scan_presence` reads every mask of a dataset split once (in parallel worker processes)
  and caches the class ids present in each image, next to a JSON manifest listing every mask
  file's relative path, size and modification time. The cache is reused while none of these
  change; otherwise only the new or modified masks are read again.
* :func:`step_index` selects the training images of one step of a task (see
  :func:`ucdseg.label_maps.select_images`) and caches the list with its manifest and checksum.
* :func:`index_report` / :func:`format_index_report` summarise every step of a task.

Cache layout (``cache_dir``: argument, else ``$UCDSEG_CACHE``, else ``~/.cache/ucdseg``)::

    <cache_dir>/<dataset>-<split>-<sha256(root)[:12]>/presence.json   manifest
                                                     /presence.npz    class ids per image
                                                     /steps/<key>.json  one step's image list

All writes are atomic (temporary file + ``os.replace``), so concurrent processes (e.g. the ranks
of a distributed run) never read a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from ..label_maps import SETTINGS, select_images
from ..io import env_folder, write_bytes
from .base import DataFileError
from ..tasks import Task

__all__ = ["StepIndex", "default_cache_dir", "scan_presence", "step_index", "index_report", "format_index_report"]

CACHE_VERSION = 1
_AUTO_PARALLEL_MIN = 256  # below this many masks to read, workers=None reads them in-process

PathLike = Union[str, os.PathLike, None]


class MaskDataset(Protocol):
    """What this module needs from a dataset."""

    name: str
    split: str
    root: Any

    def __len__(self) -> int: ...
    def mask_path(self, i: int) -> Any: ...
    def load_mask(self, i: int) -> np.ndarray: ...


@dataclass(frozen=True)
class StepIndex:
    """The training images of one step: dataset indices (sorted), their checksum and a manifest."""

    indices: list[int]
    checksum: str
    manifest: dict


# ---------------------------------------------------------------------- small helpers
#: What ``$UCDSEG_CACHE`` is, in its errors.
CACHE_VARIABLE_ROLE = "the folder of ucdseg's caches: image indexes and the embedded benchmark"


def default_cache_dir() -> Path:
    """``$UCDSEG_CACHE`` if set (checked: :func:`ucdseg.io.env_folder`), else ``~/.cache/ucdseg``."""
    return env_folder("UCDSEG_CACHE", CACHE_VARIABLE_ROLE) or Path.home() / ".cache" / "ucdseg"


def _dataset_dir(dataset: MaskDataset, cache_dir: PathLike) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = os.path.abspath(os.fspath(dataset.root))
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset.name}-{dataset.split}")
    return base / f"{safe}-{hashlib.sha256(root.encode()).hexdigest()[:12]}"


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _mask_files(dataset: MaskDataset) -> list[list]:
    """``[relative path, size, mtime_ns]`` of every mask file, in dataset order."""
    root = os.path.abspath(os.fspath(dataset.root))
    files = []
    for i in range(len(dataset)):
        path = os.path.abspath(os.fspath(dataset.mask_path(i)))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"mask file of image {i} of {dataset.name}/{dataset.split} not found: {path}") from None
        rel = path[len(root) + 1:] if path.startswith(root + os.sep) else path
        files.append([rel.replace(os.sep, "/"), int(st.st_size), int(st.st_mtime_ns)])
    return files


def _presence_digest(relpaths: Sequence[str], presence: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for rel, ids in zip(relpaths, presence):
        h.update(rel.encode())
        h.update(b"\0")
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"\n")
    return h.hexdigest()


def _list_checksum(relpaths: Sequence[str]) -> str:
    """sha256 of the sorted relative mask paths, one per line."""
    return hashlib.sha256("\n".join(sorted(relpaths)).encode()).hexdigest()


# ---------------------------------------------------------------------- mask reading
def _mask_ids(dataset: MaskDataset, i: int) -> np.ndarray:
    """Sorted class ids present in mask ``i`` (255 excluded), as int64."""
    try:
        mask = np.asarray(dataset.load_mask(i))
    except (FileNotFoundError, DataFileError):  # these name the file already
        raise
    except Exception as exc:  # name the file: a corrupt mask must be easy to find
        raise ValueError(f"cannot read mask {dataset.mask_path(i)}: {exc}") from exc
    if mask.dtype == np.uint8:
        ids = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    else:
        ids = np.unique(mask)
    return ids[ids != 255].astype(np.int64)


_WORKER_DATASET: Optional[MaskDataset] = None


def _init_worker(dataset: MaskDataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _scan_chunk(indices: list[int]) -> list[tuple[int, np.ndarray]]:
    assert _WORKER_DATASET is not None
    return [(i, _mask_ids(_WORKER_DATASET, i)) for i in indices]


def _resolve_workers(workers: Optional[int], todo: int) -> int:
    if workers is None:
        return min(os.cpu_count() or 1, 8) if todo >= _AUTO_PARALLEL_MIN else 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be None or an int >= 0, got {workers!r}")
    return max(1, min(workers, todo))


def _read_masks(dataset: MaskDataset, todo: list[int], workers: Optional[int], progress: bool) -> dict[int, np.ndarray]:
    """Class ids of the masks ``todo``, read in ``workers`` processes (1: in this process)."""
    out: dict[int, np.ndarray] = {}
    if not todo:
        return out
    n_workers = _resolve_workers(workers, len(todo))
    bar = tqdm(total=len(todo), desc=f"scanning {dataset.name}/{dataset.split} masks", unit="img",
               disable=not progress, dynamic_ncols=True)
    try:
        if n_workers <= 1:
            for i in todo:
                out[i] = _mask_ids(dataset, i)
                bar.update(1)
            return out
        size = max(1, min(64, math.ceil(len(todo) / (n_workers * 4))))
        chunks = [todo[k: k + size] for k in range(0, len(todo), size)]
        with ProcessPoolExecutor(max_workers=n_workers, initializer=_init_worker, initargs=(dataset,)) as pool:
            futures = [pool.submit(_scan_chunk, chunk) for chunk in chunks]
            for future in as_completed(futures):
                result = future.result()
                out.update(result)
                bar.update(len(result))
        return out
    finally:
        bar.close()


# ---------------------------------------------------------------------- presence cache
def _load_presence(folder: Path, manifest: Optional[dict]) -> Optional[list[np.ndarray]]:
    """The cached presence if it exists and matches ``manifest``'s digest, else None."""
    if not manifest or manifest.get("version") != CACHE_VERSION:
        return None
    try:
        with np.load(folder / "presence.npz") as data:
            values, offsets = data["values"], data["offsets"]
    except (OSError, ValueError, KeyError):
        return None
    files = manifest.get("files", [])
    if len(offsets) != len(files) + 1:
        return None
    presence = [values[offsets[k]: offsets[k + 1]] for k in range(len(files))]
    if _presence_digest([f[0] for f in files], presence) != manifest.get("presence_sha256"):
        return None
    return presence


def _presence(dataset: MaskDataset, workers: Optional[int], progress: bool,
              cache_dir: PathLike, write_cache: bool = True) -> tuple[list[np.ndarray], list[str], str]:
    """``(presence, relative mask paths, digest)``, from the cache or (re)built (and cached
    unless ``write_cache`` is false)."""
    folder = _dataset_dir(dataset, cache_dir)
    files = _mask_files(dataset)
    manifest_path = folder / "presence.json"
    manifest = _read_json(manifest_path)
    cached = _load_presence(folder, manifest)
    if cached is not None and manifest is not None and manifest["files"] == files:
        return cached, [f[0] for f in files], manifest["presence_sha256"]

    # reuse the entries of unchanged files, read the others
    known: dict[tuple, np.ndarray] = {}
    if cached is not None and manifest is not None:
        known = {tuple(f): ids for f, ids in zip(manifest["files"], cached)}
    presence: list[Optional[np.ndarray]] = [known.get(tuple(f)) for f in files]
    todo = [i for i, ids in enumerate(presence) if ids is None]
    for i, ids in _read_masks(dataset, todo, workers, progress).items():
        presence[i] = ids
    result = [np.asarray(ids, dtype=np.int64) for ids in presence]
    relpaths = [f[0] for f in files]
    digest = _presence_digest(relpaths, result)
    if not write_cache:
        return result, relpaths, digest

    lengths = np.array([len(ids) for ids in result], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate(result) if result else np.zeros(0, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, values=values.astype(np.int64), offsets=offsets)
    write_bytes(folder / "presence.npz", buf.getvalue())
    new_manifest = {
        "version": CACHE_VERSION,
        "dataset": dataset.name,
        "split": dataset.split,
        "root": os.path.abspath(os.fspath(dataset.root)),
        "num_images": len(files),
        "presence_sha256": digest,
        "files": files,
    }
    write_bytes(manifest_path, json.dumps(new_manifest).encode())
    return result, relpaths, digest


def scan_presence(dataset: MaskDataset, workers: Optional[int] = None, progress: bool = True,
                  cache_dir: PathLike = None, write_cache: bool = True) -> list[np.ndarray]:
    """Sorted class ids (dataset space, 255 excluded) present in every mask of ``dataset``.

    Reads each mask once with ``dataset.load_mask`` in ``workers`` processes (``None``: up to 8,
    one per CPU, for 256+ masks; ``0``/``1``: in this process) and caches the result under
    ``cache_dir``. The cache is reused while every mask file keeps its relative path, size and
    mtime; new or modified masks are read again, removed ones dropped. ``write_cache=False``
    (``ucdseg run --dry-run``) reads a valid cache but writes nothing.
    """
    return _presence(dataset, workers, progress, cache_dir, write_cache)[0]


# ---------------------------------------------------------------------- step lists
def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}: expected one of {', '.join(SETTINGS)}")


def _step_key(task: Task, setting: str, seed: int, step: int) -> dict:
    return {"dataset": task.dataset, "task": task.name, "steps": [list(map(int, s)) for s in task.steps],
            "order": [int(c) for c in task.order], "num_classes": int(task.num_classes), "setting": setting,
            "seed": int(seed), "step": int(step)}


def _step_index_from(dataset: MaskDataset, presence: list[np.ndarray], relpaths: list[str], digest: str,
                     task: Task, setting: str, step: int, cache_dir: PathLike, seed: int) -> StepIndex:
    key = _step_key(task, setting, seed, step)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = _dataset_dir(dataset, cache_dir) / "steps" / f"{name}.json"
    cached = _read_json(path)
    if (cached is not None and cached.get("version") == CACHE_VERSION and cached.get("key") == key
            and cached.get("presence_sha256") == digest):
        m = cached["manifest"]
        return StepIndex(indices=[int(i) for i in cached["indices"]], checksum=m["checksum"], manifest=m)

    indices = select_images(presence, task, step, setting, seed=seed)
    images = [relpaths[i] for i in indices]
    checksum = _list_checksum(images)
    manifest = {
        "dataset": dataset.name,
        "split": dataset.split,
        "task": task.name,
        "steps": key["steps"],
        "order": key["order"],
        "setting": setting,
        "seed": int(seed),
        "step": int(step),
        "classes": [int(c) for c in task.steps[step]],
        "num_images": len(indices),
        "checksum": checksum,
    }
    record = {"version": CACHE_VERSION, "key": key, "presence_sha256": digest, "manifest": manifest,
              "indices": indices, "images": images}
    write_bytes(path, json.dumps(record).encode())
    return StepIndex(indices=indices, checksum=checksum, manifest=manifest)


def step_index(dataset: MaskDataset, task: Task, setting: str, step: int, cache_dir: PathLike = None,
               seed: int = 0, workers: Optional[int] = None, progress: bool = True) -> StepIndex:
    """The training images of ``step`` of ``task`` under ``setting`` (cached).

    ``checksum`` is the sha256 of the selected images' relative mask paths (sorted, one per
    line), so it does not depend on where the dataset lives. The cached list is rebuilt when the
    masks' presence or the task (name, steps, order), setting, seed or step changes.
    """
    _check_setting(setting)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= int(step) < task.num_steps:
        raise ValueError(f"step {step!r} out of range for task {task.name!r}: expected 0..{task.num_steps - 1}")
    presence, relpaths, digest = _presence(dataset, workers, progress, cache_dir)
    return _step_index_from(dataset, presence, relpaths, digest, task, setting, int(step), cache_dir, seed)


def index_report(dataset: MaskDataset, task: Task, setting: str, cache_dir: PathLike = None, seed: int = 0,
                 workers: Optional[int] = None, progress: bool = True) -> list[dict]:
    """One row per step: ``{"step", "classes" (dataset ids), "num_images", "checksum"}``."""
    _check_setting(setting)
    presence, relpaths, digest = _presence(dataset, workers, progress, cache_dir)
    rows = []
    for step in range(task.num_steps):
        index = _step_index_from(dataset, presence, relpaths, digest, task, setting, step, cache_dir, seed)
        rows.append({"step": step, "classes": list(task.steps[step]), "num_images": len(index.indices),
                     "checksum": index.checksum})
    return rows


def _compact(classes: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 7, 9, 10]`` -> ``"0-3,7,9-10"`` (runs of consecutive ids, order kept)."""
    parts: list[str] = []
    k = 0
    while k < len(classes):
        j = k
        while j + 1 < len(classes) and classes[j + 1] == classes[j] + 1:
            j += 1
        parts.append(str(classes[k]) if j == k else f"{classes[k]}-{classes[j]}")
        k = j + 1
    return ",".join(parts)


def format_index_report(rows: Sequence[dict]) -> str:
    """A plain-text table of :func:`index_report` rows (checksums shortened to 16 hex digits)."""
    header = ("step", "classes", "images", "checksum")
    body = [(str(r["step"]), _compact(list(r["classes"])), str(r["num_images"]), r["checksum"][:16]) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
