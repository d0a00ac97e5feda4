"""The files of a run folder (``output_dir/name``): its lock, ``config.yaml``, ``results.json``
and ``checkpoints/stepN.pt`` (``stepN-last.pt`` mid-step), and which config changes a run may
be continued with."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from .. import io
from ..config import RunConfig, migrate, to_dict, to_yaml
from .config_change import EVALUATED_KEYS, changed_config_error, has_finished_step

# Keys that may change between a run and its resumption without changing its results.
# The paths only locate the run and its inputs (a moved dataset or run directory may resume).
# train.channels_last and train.compile only choose how the same computation is laid out in
# memory and which kernels run it: like ``device`` they can change the last bits of the floats,
# never what is computed, so a run may be resumed with them switched (e.g. on a machine without
# a C++ compiler for torch.compile). train.steps only says where a command stops. train.threads
# may change the last bits too (a resume says so, ucdseg.threads); results.json records each count.
RESUMABLE_KEYS = {"device", "data.workers", "data.cache_dir", "train.log_every", "eval.batch_size",
                  "eval.num_images", "train.checkpoint_every", "name", "output_dir", "data.root",
                  "model.pretrained", "train.channels_last", "train.compile", "train.steps", "train.threads"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("weights", "options"):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(a: dict, b: dict, ignore: set[str] = RESUMABLE_KEYS) -> list[str]:
    """Keys whose values differ; a key missing from a config (saved before the key existed) has
    its default value."""
    defaults = _flatten(to_dict(RunConfig()))
    fa, fb = defaults | _flatten(migrate(a)), defaults | _flatten(migrate(b))
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))


class RunFolder:
    """The files of a run folder: its lock, config, results and checkpoints."""

    LOCK = ".ucdseg.lock"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._lock = None

    def final(self, step: int) -> Path:
        return self.checkpoints / f"step{step}.pt"

    def partial(self, step: int) -> Path:
        return self.checkpoints / f"step{step}-last.pt"

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    # ---------------------------------------------------------------- exclusive use
    def acquire(self) -> None:
        """Take the folder's lock (``.ucdseg.lock``, an OS file lock: a killed process releases it,
        so a stale lock is simply taken over); a second process gets one line naming the holder."""
        io.make_dirs(self.path)
        io.make_dirs(self.checkpoints)
        try:
            import fcntl
        except ImportError:  # no POSIX file locks (Windows): the folder is not locked
            return
        path = self.path / self.LOCK
        for _ in range(10):  # the holder removes the file when it finishes: lock the file that is there
            try:
                handle = open(path, "a+", encoding="utf-8")
            except OSError as exc:
                raise io.os_error(path, exc, "open") from None
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise RuntimeError(f"run folder {self.path} is in use by {holder}; wait for it to finish, "
                                   "or give this run another name=") from None
            if _same_file(handle, path):
                break
            handle.close()  # locked a file its holder removed meanwhile
        else:
            raise RuntimeError(f"run folder {self.path}: its lock file {path} keeps being replaced; is another "
                               "process starting there?")
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock = handle
        io.remove_orphans(self.path)  # temporary files of a killed writer: ours, as we hold the lock
        io.remove_orphans(self.checkpoints)

    def release(self) -> None:
        """Give the folder up; the lock file goes too (removed while still locked: a process that
        opened it meanwhile sees it replaced, :meth:`acquire`)."""
        if self._lock is not None:
            (self.path / self.LOCK).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    # ---------------------------------------------------------------- config and results
    def has_progress(self) -> bool:
        """Whether anything of a run was trained here (a finished step or a mid-step checkpoint)."""
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("step*.pt"))

    def check_config(self, cfg: RunConfig) -> None:
        """Refuse to continue a run folder started with a different config.

        A folder where nothing was trained yet (a start that failed) takes the new config."""
        if self.config.exists() and self.has_progress():
            import yaml

            try:
                saved = yaml.safe_load(self.config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise io.FileError(f"{self.config} is corrupt ({first}); it records the config of the run in "
                                   f"{self.path}: restore it, or give this run another name=") from None
            if not isinstance(saved, dict):
                raise io.FileError(f"{self.config} is corrupt (not a mapping of config keys); restore it, or give "
                                   "this run another name=")
            # a finished step was evaluated with the saved eval.num_images: config.yaml must keep saying so
            keep = EVALUATED_KEYS if has_finished_step(self.checkpoints) else frozenset()
            diff = config_differences(saved, to_dict(cfg), RESUMABLE_KEYS - keep)
            if diff:
                raise changed_config_error(self.path, saved, to_dict(cfg), diff)

    def write_config(self, cfg: RunConfig) -> None:
        """``config.yaml``: the config of the command that continues the run (written once every
        check of the run has passed, so a refused command changes nothing)."""
        io.write_text(self.config, to_yaml(cfg))


def _same_file(handle, path: Path) -> bool:
    """Whether the open file ``handle`` is still the file at ``path`` (not removed or replaced)."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False
