"""Files: atomic writes, JSON, checkpoints. The bottom layer every other module writes through.

Every file ucdseg writes goes to a temporary file beside its destination (``.<name>.<random>.tmp``),
is flushed to disk, and replaces the destination with ``os.replace``: a process killed at any
moment leaves the previous file or the new one, never a partial one. Files get the permissions
the umask allows (as ``open`` would give), not ``mkstemp``'s private 0600. A temporary file
orphaned by a killed process is removed by :func:`remove_orphans` when the folder is next used.

Errors are one line naming the file: :class:`FileError` (a ``ValueError``, so the CLI prints it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

PathLike = str | os.PathLike


class FileError(ValueError):
    """A file could not be read or written as expected (one line naming it)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def os_error(path: PathLike, exc: OSError, doing: str = "write") -> FileError:
    """One line for an ``OSError`` met while ``doing`` ``path`` (disk full, read-only, a file
    where a folder should be, ...)."""
    reasons = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOTDIR: "a file stands where a folder is expected",
               errno.EEXIST: "a file stands where a folder is expected",
               errno.EISDIR: "a folder stands where a file is expected"}
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    where = exc.filename if exc.filename and Path(exc.filename) != Path(path) else None
    return FileError(f"cannot {doing} {path}: {reason}" + (f" ({where})" if where else ""))


def make_dirs(path: PathLike) -> Path:
    """``mkdir -p path`` with a one-line error (a file in the way, no permission, ...)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FileError(f"cannot create folder {path}: a file of that name exists") from None
    except OSError as exc:
        raise os_error(path, exc, "create folder") from None
    if not path.is_dir():
        raise FileError(f"cannot create folder {path}: a file of that name exists")
    return path


def env_folder(variable: str, what: str) -> Path | None:
    """The folder the environment ``variable`` names (None when it is unset or empty), checked
    before anything is written there: a file at its place or on its path, or a folder that cannot
    be written, is one line saying what the variable is for (``what``) and what was expected."""
    value = os.environ.get(variable)
    if not value:
        return None
    path = Path(value).expanduser()
    expected = f"expected a folder ucdseg can create and write; point {variable} at one, or unset it"
    # the nearest part of it that exists (a root or "." at worst): a folder, or what stands in the way
    existing = next(p for p in (path, *path.parents, Path(".")) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        whose = "it" if existing == path else f"{existing}, on its path,"
        state = "a file" if existing.exists() else "a broken symbolic link"
        raise FileError(f"{variable}={value} ({what}): {whose} is {state}; {expected}")
    if not os.access(existing, os.W_OK | os.X_OK):
        whose = "it" if existing == path else f"{existing}, where it would be created,"
        raise FileError(f"{variable}={value} ({what}): {whose} is not writable; {expected}")
    return path


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, it replaces ``path``.

    The caller writes the temporary file (by name); it is synced to disk before the swap.
    """
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise os_error(path, exc) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise os_error(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """The JSON in ``path``; a missing, unreadable or corrupt file is one line naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FileError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise FileError(f"{what} {path} is corrupt (not valid JSON: {exc}); "
                        "it was truncated or edited") from None


def sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: PathLike, state: dict) -> None:
    """``torch.save`` through :func:`atomic_path` (a full disk is one line, the old file kept)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch reports write failures (ENOSPC, ...) as RuntimeError
            raise FileError(f"cannot write checkpoint {path}: {_write_failure(exc)}") from None


def _write_failure(exc: RuntimeError) -> str:
    text = str(exc)
    if "file write failed" in text or "unexpected pos" in text or "No space" in text:
        return "the write failed (is the disk full?)"
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by ucdseg (tensors and plain values only: ``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        raise FileError(f"checkpoint {path} is a folder; expected a step checkpoint file such as "
                        f"{path / 'checkpoints' / 'step0.pt'}")
    if not path.is_file():
        raise FileError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FileError(f"checkpoint {path} could not be read as a ucdseg checkpoint (truncated, corrupt or "
                        f"not a checkpoint): {first}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise FileError(f"checkpoint {path} has no 'model' entry; expected a checkpoint written by ucdseg")
    return state


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def remove_orphans(folder: PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` leaves in ``folder`` when its process is
    killed mid-write (only files of that exact name pattern); returns what was removed.

    Call it only on folders a single process writes (a run folder under its lock).
    """
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_file() and _TEMPORARY.match(entry.name):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
