"""What a run was trained on, by content and not only by name.

A run resumes only on the data it started with. Its identity is, for each split:

* ``files``: the checksum of the list of mask files, relative to the dataset root (a moved
  dataset keeps it);
* ``sizes``: the checksum of every image's and mask's size in bytes, in list order;
* ``content``: the checksum of the bytes of a sample of image and mask files (:data:`SAMPLE`
  pairs, evenly spread over the list, the first and last included).

Re-encoded, flipped or replaced images change the sizes of nearly all files and the bytes of the
sampled ones. Modification times are not used: copying a dataset changes them and must not stop
a resume. The cost is a ``stat`` of every file and a read of the sample; on a VOC-sized list it is
measured by ``benchmarks/bench_data_identity.py`` (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SAMPLE = 32  # image/mask pairs read in full per split
PARTS = ("files", "sizes", "content")
_CHUNK = 1 << 20


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1  # a missing file is a difference too (the readers report it when they read it)


def _update_with_file(digest, path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        digest.update(b"\0unreadable")


def sample_indices(n: int, sample: int = SAMPLE) -> list[int]:
    """``sample`` indices spread evenly over ``range(n)``, the first and the last included."""
    if n <= sample:
        return list(range(n))
    return sorted({round(k * (n - 1) / (sample - 1)) for k in range(sample)})


def split_identity(dataset, sample: int = SAMPLE) -> dict[str, str]:
    """The identity of one split of a dataset (see the module's docstring)."""
    root = Path(dataset.root)
    names, sizes, content = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for i in range(len(dataset)):
        image, mask = Path(dataset.image_path(i)), Path(dataset.mask_path(i))
        names.update(_relative(mask, root).encode() + (b"\n" if i < len(dataset) - 1 else b""))
        sizes.update(f"{_size(image)} {_size(mask)}\n".encode())
    for i in sample_indices(len(dataset), sample):
        for path in (dataset.image_path(i), dataset.mask_path(i)):
            _update_with_file(content, Path(path))
    return {"files": names.hexdigest(), "sizes": sizes.hexdigest(), "content": content.hexdigest()}


def data_identity(dataset_name: str, train_set, val_set, sample: int = SAMPLE) -> dict:
    """The identity of a run's data: the dataset's name and each split's :func:`split_identity`
    (flat keys: ``train_files``, ``train_sizes``, ``train_content``, ``val_files``, ...)."""
    identity: dict = {"dataset": dataset_name}
    for split, dataset in (("train", train_set), ("val", val_set)):
        for part, digest in split_identity(dataset, sample).items():
            identity[f"{split}_{part}"] = digest
    return identity


def identity_difference(saved: dict, current: dict) -> str | None:
    """How the data ``current`` differs from the data of ``saved``, in words, or None when they are
    the same. A part that ``saved`` does not record (written before it existed) is not compared."""
    if saved.get("dataset") != current.get("dataset"):
        return f"dataset {saved.get('dataset')!r}, now {current.get('dataset')!r}"
    what = {"files": "other file names", "sizes": "files of other sizes", "content": "files with other content"}
    for split in ("train", "val"):
        for part in PARTS:
            key = f"{split}_{part}"
            if key in saved and saved[key] != current.get(key):
                return f"the {split} split has {what[part]} ({key} {str(saved[key])[:12]}, now {str(current.get(key))[:12]})"
    return None
