"""``ucdseg runs [DIR]``: the run folders under DIR and their state, without importing torch.

A run folder is a folder holding ``config.yaml`` or ``results.json`` (``runs/<name>``, and the
demo's ``runs/demo/<method>``), looked for up to three levels down. Per folder: task, method,
seed, steps finished out of the run's steps, the last finished step's mIoU (all classes, without
background, as MiB and UCD report it) and its state:

* ``running (process P on HOST since T)``: a process holds its lock (``.ucdseg.lock``; on this
  machine the process is checked to be alive, on another the lock itself is tested);
* ``done``: every step finished;
* ``interrupted in step N``: a mid-step checkpoint is there and nobody holds the folder (the
  same command continues it);
* ``stopped after step N``: some steps finished, none in progress (killed between steps, or
  ``train.steps`` asked to stop there);
* ``new``: nothing finished yet.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

__all__ = ["list_runs", "format_runs", "lock_holder"]

LOCK = ".ucdseg.lock"  # engine.runner.RunFolder.LOCK
_HOLDER = re.compile(r"process (\d+) on (\S+) since (.+)")


def _run_folders(root: Path, depth: int = 3) -> list[Path]:
    found = []
    if (root / "config.yaml").is_file() or (root / "results.json").is_file():
        return [root]
    if depth == 0:
        return found
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return found
    for child in children:
        if child.name in ("checkpoints", "tensorboard", "predictions"):
            continue
        found += _run_folders(child, depth - 1)
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def lock_holder(folder: Path) -> str | None:
    """``process P on HOST since T`` when a live process holds the folder's lock, else None."""
    path = Path(folder) / LOCK
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    match = _HOLDER.fullmatch(text)
    if match and match.group(2) == socket.gethostname():
        return text if _pid_alive(int(match.group(1))) else None
    try:  # another machine (a shared file system) or an unreadable record: test the lock itself
        import fcntl
    except ImportError:
        return None
    try:
        with open(path, "r", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return text or "another process"
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def _read(path: Path):
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        import yaml

        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # a damaged file: the row says what is known
        return None


def _describe(folder: Path, root: Path) -> dict:
    results = _read(folder / "results.json")
    results = results if isinstance(results, dict) else {}
    config = results.get("config") if isinstance(results.get("config"), dict) else _read(folder / "config.yaml")
    config = config if isinstance(config, dict) else {}
    section = lambda key: config.get(key) if isinstance(config.get(key), dict) else {}  # noqa: E731
    task = results.get("task") if isinstance(results.get("task"), dict) else {}
    steps = [s for s in results.get("steps", []) if isinstance(s, dict)] if isinstance(results.get("steps"), list) else []
    method = results.get("method") or section("method").get("name", "?")
    total = 1 if method == "joint" else (len(task["steps"]) if isinstance(task.get("steps"), list) else None)
    last = steps[-1] if steps else None
    miou = None
    if last is not None:
        try:
            miou = last["miou"]["without_background"]["all"]
        except (KeyError, TypeError):
            miou = None
    holder = lock_holder(folder)
    partial = sorted((folder / "checkpoints").glob("step*-last.pt")) if (folder / "checkpoints").is_dir() else []
    if holder:
        state = f"running ({holder})"
    elif total is not None and len(steps) >= total:
        state = "done"
    elif partial:
        state = f"interrupted in step {partial[-1].name[4:].split('-')[0]}"
    elif steps:
        state = f"stopped after step {last.get('step', '?')}"
    else:
        state = "new"
    try:
        name = folder.relative_to(root).as_posix() if folder != root else folder.name
    except ValueError:
        name = str(folder)
    dataset = task.get("dataset") or section("data").get("dataset", "?")
    return {"run": name or ".", "task": f"{dataset} {task.get('name') or section('task').get('name', '?')}",
            "method": method, "seed": results.get("seed", config.get("seed", "?")),
            "steps": f"{len(steps)}/{total if total is not None else '?'}",
            "miou": "-" if miou is None else f"{100 * miou:.1f}", "state": state}


def list_runs(root: str | Path = "runs") -> list[dict]:
    """One row per run folder under ``root`` (see the module docstring)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {root} does not exist; give the output_dir of your runs (default: runs)")
    return [_describe(folder, root) for folder in _run_folders(root)]


def format_runs(rows: list[dict], root: str | Path = "runs") -> str:
    """A plain-text table of :func:`list_runs` rows."""
    if not rows:
        return f"no run folder under {root} (a run folder holds config.yaml or results.json)"
    header = {"run": "run", "task": "task", "method": "method", "seed": "seed", "steps": "steps",
              "miou": "mIoU", "state": "state"}
    keys = list(header)
    widths = {k: max(len(str(r[k])) for r in [header, *rows]) for k in keys}
    right = {"seed", "steps", "miou"}
    lines = []
    for row in [header, *rows]:
        cells = [str(row[k]).rjust(widths[k]) if k in right else str(row[k]).ljust(widths[k]) for k in keys]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * widths[k] for k in keys))
    lines.append("mIoU: all classes without background after the last finished step")
    return "\n".join(lines)
